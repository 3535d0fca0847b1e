"""How teacher and student outputs are aligned (DESIGN.md s.4): one class per alignment, chosen by name from a
registry. Nothing outside this module compares an alignment's name.

Two halves:
- **positions** (`Positions`): which teacher rows pair with which student rows, and from which student pass.
  `MatchPositions`: positions holding the same token over the same text span (the shards' match masks), the
  student's own pass; `ReducePositions`: every real teacher position, the student's pass over the t2s sequence
  (every teacher token re-expressed by its student pieces), the pieces pooled (sum or mean) onto their teacher
  token; `SharedPositions`: one vocabulary, both models read the student's masked ids, every real position (or
  only the MLM targets). The hidden-state losses use positions alone (`--align_hiddens`).
- **logit alignments** (`LogitAlignment`, registry `ALIGNMENTS`, `--align_logits`): positions plus the vocabulary
  columns compared. `match` and `reduce`: by `--column_map` (`COLUMN_MAPS`), `exact` the matched vocabulary (tokens
  in both vocabularies), `mined` every non-special teacher token, mapped to the student token at minimum edit
  distance (MinED; pipeline step 12), the teacher distribution projected onto the mapped student ids; `reduce_map`:
  reduce positions, every mapped teacher token scored from its pieces' student logits (sum, or logsumexp with
  `--sum_probs`); `shared`: every column (chosen automatically when teacher and student share the tokenizer);
  `uld`: match or reduce positions (`--uld_positions`), every teacher and every student column, compared by the
  Universal Logit Distillation loss (sorted probability vectors, no vocabulary map) instead of the KL; `dskd`:
  dual-space KD, a learned cross-model attention instead of a position map, each model's distribution compared in
  the other's output space (`kdcore/dual_space.py`; its projections are the alignment's `aligner`, a trainable
  module of the run).

Each class declares the artifact flags it reads (`artifacts`), so a run fills exactly those from a pipeline
directory and refuses the others; the teacher rows and columns it reads (`Positions.teacher_rows`,
`LogitAlignment.teacher_columns`), so that the teacher computes nothing else; the student pass it needs
(`Positions.student_pass`); and how the student's scores are aligned to the teacher rows
(`Positions.select` -> logits -> `Positions.pool` -> `LogitAlignment.scores`); the loss that compares them
(`LogitAlignment.loss`: the KL unless the alignment says otherwise) and whether a teacher cache can serve it
(`LogitAlignment.uncacheable`).

Adding an alignment is one class with `@register`; the command line's choices come from the registry.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from custom_step import (
    IGNORE_INDEX,
    REDUCE_MAP_IMPLS,
    kl_div_loss,
    reduce_map_logits,
    reduce_map_matrix,
    reduce_pool,
    uld_loss,
)
from kdcore.artifacts import (
    ARTIFACT_FLAGS,
    load_matched_vocab,
    load_mined_vocab,
    load_s2t,
    load_t2s_input,
    load_t2s_mapped_ids,
    load_t2s_padded,
)
from kdcore.dual_space import EXTRA_TERMS as DUAL_SPACE_TERMS
from kdcore.dual_space import build_dual_space
from kdcore.errors import UserError

EXACT_REDUCE_MAP_IMPLS = ("sparse", "my_index")
"""`--reduce_map_impl` choices: `sparse` (exact, the default) and `my_index` (inverse-map backward; a partial-sum
gradient when the pipeline capped the inverse map, see `ReduceMap.approximation`)."""


COLUMN_MAPS = ("exact", "mined")
"""`--column_map` choices of match and reduce: `exact` (the matched vocabulary, `--matching_ids`) or `mined` (the
MinED map of every teacher token, `--mined_vocab`)."""


class StudentPass(enum.Enum):
    """The student run that a position alignment reads."""

    OWN = "own"  # the student's own tokens (MLM-masked)
    T2S = "t2s"  # the teacher's tokens re-expressed by their student pieces


@dataclass(frozen=True)
class AlignmentConfig:
    """The alignment options of a run (the `--align_*` flags and the artifact files they read).

    logits: the `--align_logits` choice (ignored with one vocabulary, which always aligns `shared`);
    hiddens: the `--align_hiddens` choice; column_map: the `--column_map` choice (`COLUMN_MAPS`, match and reduce
    only); artifact paths: see `kdcore.artifacts.ARTIFACT_FLAGS`.
    """

    logits: str = "match"
    hiddens: str = "match"
    column_map: str = "exact"
    matching_ids: str | None = None
    t2s_mapping: str | None = None
    t2s_vocab_padded: str | None = None
    t2s_mapped_ids: str | None = None
    s2t_vocab_padded: str | None = None
    s2t_idxs_padded: str | None = None
    mined_vocab: str | None = None
    sum_probs: bool = False
    average_logits: bool = False
    average_hiddens: bool = False
    reduce_map_impl: str = "sparse"
    restrict_ce_to_mask: bool = False
    uld_positions: str | None = None  # --align_logits uld: "match" (None: not given, match) or "reduce"

    def artifact(self, flag: str) -> str:
        """The path given for an artifact flag (a UserError naming the flag when it is missing)."""
        value = getattr(self, flag)
        if not value:
            raise UserError(f"this alignment reads --{flag} ({ARTIFACT_FLAGS[flag].file}); pass it or --pipeline_dir")
        return value


@dataclass(frozen=True)
class Vocabularies:
    """Sizes of both vocabularies and the tokenizer fingerprints that artifacts must carry."""

    n_teacher: int
    n_student: int
    fingerprints: dict[str, str]


# ---------------------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------------------


def row_sequences(mask: Tensor) -> Tensor:
    """int64 [mask.sum()]: the batch row of every True of mask [B, L], in row-major order."""
    return torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]


class Positions:
    """Pairs teacher rows with student rows. Batch keys as `lm_seqs_dataset.Collator` makes them.

    Class facts: `student_pass`; `teacher_reads_student_ids` (one vocabulary); `needs_match_masks` (the shards
    must carry pipeline step 9's masks); `has_unaligned_rows` (`unaligned` gives real positions that pair with
    nothing, usable as extra contrastive negatives); `artifacts` (the artifact flags it reads)."""

    name: ClassVar[str]
    student_pass: ClassVar[StudentPass]
    teacher_reads_student_ids: ClassVar[bool] = False
    needs_match_masks: ClassVar[bool] = False
    has_unaligned_rows: ClassVar[bool] = False
    artifacts: ClassVar[tuple[str, ...]] = ()

    def teacher_rows(self, batch: dict[str, Tensor], labels: Tensor | None = None) -> Tensor:
        """bool [B, Lt]: the teacher positions this alignment reads (`labels` [B, L]: MLM targets, shared only)."""
        raise NotImplementedError

    def teacher_mask(self, batch: dict[str, Tensor]) -> Tensor:
        """bool [B, Lt]: every real position of the sequence the teacher reads."""
        return batch["s_mask"] if self.teacher_reads_student_ids else batch["t_mask"]

    def pass_mask(self, batch: dict[str, Tensor]) -> Tensor:
        """bool [B, L]: every real position of the student pass."""
        return batch["t2s_mask"] if self.student_pass is StudentPass.T2S else batch["s_mask"]

    def select(self, values: Tensor, batch: dict[str, Tensor], labels: Tensor | None = None) -> Tensor:
        """[B, L, ...] values of the student pass -> [M, ...] the rows that `pool` turns into aligned rows."""
        raise NotImplementedError

    def pool(self, rows: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """[M, ...] selected student rows -> [N, ...] rows aligned with `teacher_rows` (identity by default)."""
        return rows

    def unaligned(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor] | None:
        """(teacher bool [B, Lt], student bool [B, Ls]) real positions that pair with nothing, where there are."""
        return None

    def teacher_row_flags(self, shard) -> np.ndarray:
        """bool [teacher tokens of the shard]: the flat teacher positions this alignment reads (a teacher cache
        stores one row per True, in order). Only for alignments whose teacher reads its own tokens."""
        raise ValueError(f"the {self.name} alignment's teacher reads the student's masked ids, which change every "
                         "step: its outputs cannot be cached")

class MatchPositions(Positions):
    """Teacher and student positions holding the same token over the same text span, paired in row-major order."""

    name = "match"
    student_pass = StudentPass.OWN
    needs_match_masks = True
    has_unaligned_rows = True

    def teacher_rows(self, batch, labels=None):
        return batch["t_match"]

    def select(self, values, batch, labels=None):
        return values[batch["s_match"]]

    def unaligned(self, batch):
        return batch["t_mask"] & ~batch["t_match"], batch["s_mask"] & ~batch["s_match"]

    def teacher_row_flags(self, shard):
        if shard.match is None:
            raise ValueError(f"shard {shard.dir} has no match masks (pipeline step 9)")
        return np.asarray(shard.match["teacher"], dtype=bool)


class ReducePositions(Positions):
    """Every real teacher position against the pooled pieces of its split in the student's t2s pass."""

    name = "reduce"
    student_pass = StudentPass.T2S
    artifacts = ("t2s_mapping",)

    def __init__(self, pooling: str = "sum"):
        self.pooling = pooling

    def teacher_rows(self, batch, labels=None):
        return batch["t_mask"]

    def select(self, values, batch, labels=None):
        return values[batch["t2s_mask"]]

    def pool(self, rows, batch):
        return reduce_pool(rows, batch["t2s_segment"][batch["t2s_mask"]], int(batch["t_mask"].sum()), self.pooling)

    def teacher_row_flags(self, shard):
        return np.ones(shard.ids["teacher"].size, dtype=bool)


class SharedPositions(Positions):
    """One vocabulary: both models read the student's masked ids; every real position pairs with itself (or only
    the MLM targets with `restrict_to_mask`)."""

    name = "shared"
    student_pass = StudentPass.OWN
    teacher_reads_student_ids = True

    def __init__(self, restrict_to_mask: bool = False):
        self.restrict_to_mask = restrict_to_mask

    def teacher_rows(self, batch, labels=None):
        if self.restrict_to_mask:
            if labels is None:
                raise ValueError("restrict_to_mask needs the MLM labels")
            return labels != IGNORE_INDEX
        return batch["s_mask"]

    def select(self, values, batch, labels=None):
        return values[self.teacher_rows(batch, labels)]


HIDDEN_POSITIONS: dict[str, type[Positions]] = {cls.name: cls for cls in (MatchPositions, ReducePositions)}
"""`--align_hiddens` choices (with one vocabulary the hidden states always pair `shared`)."""
ULD_POSITIONS: dict[str, type[Positions]] = dict(HIDDEN_POSITIONS)
"""`--uld_positions` choices (the first is the default)."""


def make_positions(cls: type[Positions], average: bool) -> Positions:
    """An instance of a `HIDDEN_POSITIONS` class (reduce positions pool the pieces by mean with `average`, else
    by sum)."""
    return cls("mean" if average else "sum") if cls is ReducePositions else cls()


# ---------------------------------------------------------------------------------------------------------
# Logit alignments
# ---------------------------------------------------------------------------------------------------------


class LogitAlignment:
    """What the KL term compares: `positions` (rows), the teacher's and the student's vocabulary columns
    (int64 [K] or None = all), `scores`, which turns the student's pooled logits over `student_columns`
    into scores over the compared columns ([N, K_S] -> [N, K], the identity unless a map is involved),
    `teacher_scores`, which turns the teacher's logits over `teacher_columns` into logits over the compared columns
    ([N, K_T] -> [N, K]: the identity, or with `groups` (int64 [K_T], the compared column of every teacher column,
    a column map that merges teacher columns) the projection of the teacher distribution onto the groups), and
    `loss`, which compares the two (the KL at `temperature` by default)."""

    name: ClassVar[str]
    selectable: ClassVar[bool] = True  # offered by --align_logits (shared is chosen by the tokenizers)
    uncacheable: ClassVar[str | None] = None  # why a teacher cache cannot serve this alignment (None: it can)
    column_maps: ClassVar[tuple[str, ...]] = ("exact",)  # the --column_map choices it accepts
    extra_terms: ClassVar[tuple[str, ...]] = ()  # loss names its aligner adds besides loss_ce (weighted by alpha_ce)

    def __init__(self, positions: Positions, temperature: float, teacher_columns: Tensor | None = None,
                 student_columns: Tensor | None = None, groups: Tensor | None = None):
        self.positions, self.temperature = positions, temperature
        self.teacher_columns, self.student_columns, self.groups = teacher_columns, student_columns, groups

    @classmethod
    def artifacts(cls, cfg: AlignmentConfig) -> tuple[str, ...]:
        """The artifact flags this alignment reads under `cfg`."""
        raise NotImplementedError

    @classmethod
    def build(cls, cfg: AlignmentConfig, temperature: float, vocab: Vocabularies) -> LogitAlignment:
        """Load the artifacts and build the alignment (one-line errors for bad files)."""
        raise NotImplementedError

    def scores(self, pooled: Tensor) -> Tensor:
        return pooled

    def aligner(self, teacher: torch.nn.Module, student: torch.nn.Module) -> torch.nn.Module | None:
        """The alignment's trainable part (trained, synchronised and checkpointed with the student, never exported),
        which then computes the student's outputs itself from the teacher's last hidden states
        (`step_runner.StudentRunner`); None: it has none."""
        return None

    @classmethod
    def has_aligner(cls) -> bool:
        """Whether the alignment has a trainable part (it overrides `aligner`)."""
        return cls.aligner is not LogitAlignment.aligner

    def loss(self, teacher_logits: Tensor, student_scores: Tensor) -> Tensor:
        """The term's 0-dim value from the teacher's logits over the compared columns [N, K] (`teacher_scores`)
        and the student's `scores` [N, K]:
        T^2 * mean over rows of KL(softmax(teacher / T) || softmax(student / T)) (`custom_step.kl_div_loss`)."""
        return kl_div_loss(teacher_logits, student_scores, self.temperature)

    def teacher_scores(self, logits: Tensor) -> Tensor:
        """Teacher logits [N, K_T] over `teacher_columns` -> [N, K] logits over the compared columns."""
        if self.groups is None:
            return logits
        return project_logits(logits, self.groups, self.student_columns.numel(), self.temperature)

    def n_compared(self, n_teacher: int) -> int:
        """K, the number of compared columns (the width of a teacher cache's rows); n_teacher: V_T."""
        if self.groups is not None:
            return self.student_columns.numel()
        return n_teacher if self.teacher_columns is None else self.teacher_columns.numel()

    def columns_key(self) -> Tensor | None:
        """What a teacher cache fingerprints as the alignment's columns: the teacher columns (None: all), with a
        merging column map followed by the student id of every teacher column (int64 [2 K_T])."""
        if self.groups is None:
            return self.teacher_columns
        return torch.cat([self.teacher_columns, self.student_columns[self.groups]])

    def approximation(self) -> str | None:
        """What this alignment approximates in the run, for the log (None: it is exact)."""
        return None

    def describe(self) -> str:
        """One line for the log: name, rows and columns."""
        cols = "all" if self.teacher_columns is None else f"{self.teacher_columns.numel():,}"
        merged = "" if self.groups is None else (f" projected onto {self.student_columns.numel():,} student columns "
                                                 "(--column_map mined)")
        return f"{self.name} ({self.positions.name} rows, {cols} teacher columns{merged})"

    def to(self, device: torch.device) -> LogitAlignment:
        """A copy whose tensors live on `device`."""
        clone = copy.copy(self)
        for key, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(clone, key, value.to(device))
        return clone


ALIGNMENTS: dict[str, type[LogitAlignment]] = {}


def register(cls: type[LogitAlignment]) -> type[LogitAlignment]:
    """Class decorator: make an alignment selectable by its `name`."""
    ALIGNMENTS[cls.name] = cls
    return cls


def selectable_alignments() -> tuple[str, ...]:
    """The `--align_logits` choices."""
    return tuple(name for name, cls in ALIGNMENTS.items() if cls.selectable)


def cacheable_alignments() -> tuple[str, ...]:
    """The `--align_logits` choices that a teacher cache can serve (`cache_teacher.py`'s choices)."""
    return tuple(name for name in selectable_alignments() if not ALIGNMENTS[name].uncacheable)


def project_logits(logits: Tensor, groups: Tensor, n_groups: int, temperature: float) -> Tensor:
    """Teacher logits z [N, K_T] -> logits y [N, n_groups] whose softmax at `temperature` T is the teacher
    distribution summed per group: y_g = T * log(sum over the columns v of group g of exp(z_v / T)), so that
    softmax(y / T)_g = sum_{v in g} softmax(z / T)_v. groups: int64 [K_T] in [0, n_groups). fp32 result; a group
    whose mass underflows gets -inf (the KL counts it as 0)."""
    scaled = logits.float() / temperature
    top = scaled.amax(dim=1, keepdim=True)
    sums = scaled.new_zeros(logits.shape[0], n_groups).index_add_(1, groups, (scaled - top).exp())
    return (sums.log() + top) * temperature


def _column_artifacts(cfg: AlignmentConfig) -> tuple[str, ...]:
    return ("mined_vocab",) if cfg.column_map == "mined" else ("matching_ids",)


def _columns(cfg: AlignmentConfig, vocab: Vocabularies) -> tuple[Tensor, Tensor, Tensor | None]:
    """(teacher columns int64 [K_T], student columns int64 [K_S], groups int64 [K_T] or None) of `cfg.column_map`:
    exact: the matched pairs (K_T = K_S, no groups); mined: every non-special teacher id, the distinct student ids
    they map to (sorted) and the index of each teacher column's student id among them."""
    if cfg.column_map != "mined":
        t_cols, s_cols = load_matched_vocab(cfg.artifact("matching_ids"), vocab.n_teacher, vocab.n_student)
        return torch.from_numpy(t_cols), torch.from_numpy(s_cols), None
    mapped, special = load_mined_vocab(cfg.artifact("mined_vocab"), vocab.n_teacher, vocab.n_student,
                                       vocab.fingerprints)
    t_cols = np.flatnonzero(~special).astype(np.int64)
    s_cols, groups = np.unique(mapped[t_cols], return_inverse=True)
    return torch.from_numpy(t_cols), torch.from_numpy(s_cols.astype(np.int64)), torch.from_numpy(groups.astype(np.int64))


@register
class Match(LogitAlignment):
    """KL at matched positions over the matched vocabulary, or with `--column_map mined` over every teacher token
    projected onto its MinED student token (the student runs once, on its own tokens)."""

    name = "match"
    column_maps = COLUMN_MAPS

    @classmethod
    def artifacts(cls, cfg):
        return _column_artifacts(cfg)

    @classmethod
    def build(cls, cfg, temperature, vocab):
        return cls(MatchPositions(), temperature, *_columns(cfg, vocab))


@register
class Reduce(LogitAlignment):
    """KL at every teacher position, the student's t2s pieces pooled onto it, over the matched vocabulary (or the
    MinED projection with `--column_map mined`)."""

    name = "reduce"
    column_maps = COLUMN_MAPS

    @classmethod
    def artifacts(cls, cfg):
        return (*_column_artifacts(cfg), *ReducePositions.artifacts)

    @classmethod
    def build(cls, cfg, temperature, vocab):
        pooling = "mean" if cfg.average_logits else "sum"
        return cls(ReducePositions(pooling), temperature, *_columns(cfg, vocab))


@register
class ReduceMap(LogitAlignment):
    """KL at every teacher position over every mapped teacher token, scored from the pooled student logits of its
    pieces: z(v) = sum of z(u) over the pieces u of v, or logsumexp with `sum_probs` (`custom_step.reduce_map_logits`
    with the implementation `impl`)."""

    name = "reduce_map"

    def __init__(self, positions: Positions, temperature: float, teacher_columns: Tensor, t2s_padded: Tensor,
                 sum_probs: bool, impl: str, s2t_padded: Tensor | None = None, s2t_idxs_padded: Tensor | None = None,
                 map_matrix: Tensor | None = None, dropped_pairs: float = 0.0):
        super().__init__(positions, temperature, teacher_columns, None)
        self.t2s_padded, self.sum_probs, self.impl = t2s_padded, sum_probs, impl
        self.s2t_padded, self.s2t_idxs_padded, self.map_matrix = s2t_padded, s2t_idxs_padded, map_matrix
        self.dropped_pairs = dropped_pairs

    @classmethod
    def artifacts(cls, cfg):
        inverse = ("s2t_vocab_padded", "s2t_idxs_padded") if cfg.reduce_map_impl.startswith("my_index") else ()
        return (*ReducePositions.artifacts, "t2s_vocab_padded", "t2s_mapped_ids", *inverse)

    @classmethod
    def build(cls, cfg, temperature, vocab):
        impl = cfg.reduce_map_impl
        if impl not in REDUCE_MAP_IMPLS:
            raise UserError(f"--reduce_map_impl {impl} is not one of {', '.join(EXACT_REDUCE_MAP_IMPLS)}")
        padded = torch.from_numpy(load_t2s_padded(cfg.artifact("t2s_vocab_padded"), vocab.n_teacher, vocab.n_student))
        mapped = torch.from_numpy(load_t2s_mapped_ids(cfg.artifact("t2s_mapped_ids"), vocab.n_teacher))
        s2t = idxs = matrix = None
        dropped = 0.0
        if impl.startswith("my_index"):
            s2t_np, idxs_np = load_s2t(cfg.artifact("s2t_vocab_padded"), cfg.artifact("s2t_idxs_padded"),
                                       vocab.n_teacher, vocab.n_student, padded.shape[1])
            s2t, idxs = torch.from_numpy(s2t_np), torch.from_numpy(idxs_np)
            dropped = dropped_pair_share(padded.numpy(), mapped.numpy(), s2t_np, vocab.n_teacher, vocab.n_student)
        if impl == "sparse":
            matrix = reduce_map_matrix(padded, vocab.n_student, mapped)
        pooling = "mean" if cfg.average_logits else "sum"
        return cls(ReducePositions(pooling), temperature, mapped, padded, cfg.sum_probs, impl, s2t, idxs, matrix,
                   dropped)

    def scores(self, pooled):
        return reduce_map_logits(pooled, self.t2s_padded, "logsumexp" if self.sum_probs else "sum",
                                 columns=self.teacher_columns, impl=self.impl, s2t_padded=self.s2t_padded,
                                 s2t_idxs_padded=self.s2t_idxs_padded, map_matrix=self.map_matrix)

    def approximation(self) -> str | None:
        if self.dropped_pairs <= 0:
            return None
        return (f"--reduce_map_impl {self.impl} with a capped inverse map drops {self.dropped_pairs:.1%} of the "
                "(student piece, teacher token) pairs from the backward: a partial-sum gradient (use --reduce_map_impl "
                "sparse for the exact one)")

    def describe(self):
        mode = "logsumexp" if self.sum_probs else "sum"
        return f"{super().describe()}, pieces combined by {mode}, {self.impl} implementation"


@register
class Shared(LogitAlignment):
    """One vocabulary (DistilBERT): both models read the student's masked ids; every real position (or the MLM
    targets) over every column."""

    name = "shared"
    selectable = False

    @classmethod
    def artifacts(cls, cfg):
        return ()

    @classmethod
    def build(cls, cfg, temperature, vocab):
        return cls(SharedPositions(cfg.restrict_ce_to_mask), temperature)


@register
class Uld(LogitAlignment):
    """Universal Logit Distillation (Boizard et al., 2024): at match positions (`--uld_positions match`, the
    student's own pass) or reduce positions (`reduce`: the t2s pass, the pieces' logits pooled onto each teacher
    position by sum, or mean with `--average_logits`), the teacher's probabilities over its whole vocabulary and
    the student's over its whole vocabulary (with reduce: the softmax of the pooled logits), both at T, sorted and
    compared by L1 (`custom_step.uld_loss`); no vocabulary map, no matched columns."""

    name = "uld"
    uncacheable = ("its loss reads the teacher's whole distribution (every column, sorted) at every aligned row, "
                   "which no cache encoding stores; drop --teacher_cache (the teacher runs online)")

    @classmethod
    def positions_class(cls, cfg: AlignmentConfig) -> type[Positions]:
        """The positions chosen by `--uld_positions` (match when not given)."""
        choice = cfg.uld_positions or next(iter(ULD_POSITIONS))
        if choice not in ULD_POSITIONS:
            raise UserError(f"--uld_positions {choice} is not one of {', '.join(ULD_POSITIONS)}")
        return ULD_POSITIONS[choice]

    @classmethod
    def artifacts(cls, cfg):
        return cls.positions_class(cfg).artifacts

    @classmethod
    def build(cls, cfg, temperature, vocab):
        return cls(make_positions(cls.positions_class(cfg), cfg.average_logits), temperature)

    def loss(self, teacher_logits, student_scores):
        """Mean over rows of the L1 distance between the sorted probability vectors at T (`uld_loss`; teacher
        [N, V_T], student [N, V_S])."""
        return uld_loss(teacher_logits, student_scores, self.temperature)

    def describe(self):
        return (f"{self.name} ({self.positions.name} rows, all teacher and all student columns, L1 between sorted "
                "probability vectors)")


class DualSpacePositions(Positions):
    """DSKD: every real teacher position (the teacher-space KL's rows) and the student's own pass; the pairing of
    student and teacher tokens is learned (`dual_space.DualSpace`), not read from the shards."""

    name = "dual_space"
    student_pass = StudentPass.OWN

    def teacher_rows(self, batch, labels=None):
        return batch["t_mask"]


@register
class Dskd(LogitAlignment):
    """Dual-Space KD with cross-model attention (Zhang et al., 2024; `kdcore/dual_space.py`): trainable projections
    and a cross-model attention align the two token sequences; the student is compared with the teacher in the
    teacher's space (KL over the whole teacher vocabulary at every real teacher position: `loss_ce`) and in its own
    space (`loss_kl_student_space`), and the projected teacher is trained to predict the text
    (`loss_projector_ce`). No artifacts."""

    name = "dskd"
    uncacheable = ("it reads the teacher's last hidden states at every position and learns how to align them, which "
                   "no cache encoding stores; drop --teacher_cache (the teacher runs online)")
    extra_terms = DUAL_SPACE_TERMS

    @classmethod
    def artifacts(cls, cfg):
        return ()

    @classmethod
    def build(cls, cfg, temperature, vocab):
        return cls(DualSpacePositions(), temperature)

    def aligner(self, teacher, student):
        return build_dual_space(teacher, student)

    def describe(self):
        return (f"{self.name} (dual-space KD: cross-model attention between all real teacher and student positions, "
                "KL in the teacher's space over all teacher columns and in the student's space over all student "
                "columns, projector cross-entropy)")


def dropped_pair_share(t2s_padded: np.ndarray, mapped: np.ndarray, s2t_padded: np.ndarray, n_teacher: int,
                       n_student: int) -> float:
    """Share of the (teacher token, piece) pairs of the mapped teacher tokens that the inverse map lacks.

    t2s_padded int [V_T, S] (pad V_S); mapped int [K] teacher ids; s2t_padded int [V_S, C] (pad V_T)."""
    pieces = t2s_padded[mapped]
    real = pieces != n_student
    wanted = np.unique(mapped.repeat(pieces.shape[1])[real.ravel()].astype(np.int64) * (n_student + 1)
                       + pieces[real].astype(np.int64))
    students = np.repeat(np.arange(s2t_padded.shape[0], dtype=np.int64), s2t_padded.shape[1])
    teachers = s2t_padded.ravel().astype(np.int64)
    listed = np.unique(teachers[teachers != n_teacher] * (n_student + 1) + students[teachers != n_teacher])
    return float(1 - np.isin(wanted, listed).mean()) if wanted.size else 0.0


# ---------------------------------------------------------------------------------------------------------
# The plan of a run
# ---------------------------------------------------------------------------------------------------------


@dataclass
class AlignmentPlan:
    """Everything a run aligns: the KL alignment (None without KL), the positions of the hidden-state losses (None
    without them) and the collator's t2s map (int64 [V_T, S], pad V_S; None when no pass reads t2s tokens)."""

    kl: LogitAlignment | None
    hidden: Positions | None
    t2s_input: np.ndarray | None

    @property
    def needs_match_masks(self) -> bool:
        """Whether the shards must carry match masks (pipeline step 9)."""
        return any(p.needs_match_masks for p in self._positions())

    @property
    def teacher_reads_student_ids(self) -> bool:
        return any(p.teacher_reads_student_ids for p in self._positions())

    @property
    def needs_t2s(self) -> bool:
        return any(p.student_pass is StudentPass.T2S for p in self._positions())

    def _positions(self) -> list[Positions]:
        return [p for p in (self.kl.positions if self.kl else None, self.hidden) if p is not None]


def logit_alignment_class(cfg: AlignmentConfig, shared_vocab: bool) -> type[LogitAlignment]:
    """The KL alignment class of a run: `shared` with one vocabulary, else the `--align_logits` choice."""
    name = Shared.name if shared_vocab else cfg.logits
    if name not in ALIGNMENTS:
        raise UserError(f"--align_logits {name} is not one of {', '.join(selectable_alignments())}")
    return ALIGNMENTS[name]


def hidden_positions_class(cfg: AlignmentConfig, shared_vocab: bool) -> type[Positions]:
    """The positions of the hidden-state losses: `shared` with one vocabulary, else the `--align_hiddens` choice."""
    if shared_vocab:
        return SharedPositions
    if cfg.hiddens not in HIDDEN_POSITIONS:
        raise UserError(f"--align_hiddens {cfg.hiddens} is not one of {', '.join(HIDDEN_POSITIONS)}")
    return HIDDEN_POSITIONS[cfg.hiddens]


def required_artifacts(cfg: AlignmentConfig, kl: bool, hidden: bool, shared_vocab: bool) -> dict[str, str]:
    """{artifact flag: what reads it} for a run with or without KL and hidden-state losses."""
    needed: dict[str, str] = {}
    if kl:
        cls = logit_alignment_class(cfg, shared_vocab)
        needed.update({flag: f"--align_logits {cls.name}" for flag in cls.artifacts(cfg)})
    if hidden:
        cls = hidden_positions_class(cfg, shared_vocab)
        needed.update({flag: f"--align_hiddens {cls.name}" for flag in cls.artifacts if flag not in needed})
    return needed


def check_artifact_flags(cfg: AlignmentConfig, kl: bool, hidden: bool, shared_vocab: bool) -> None:
    """A one-line error for an artifact flag that nothing in the run reads (the alignment is chosen by
    `--align_logits`, never by the files passed), and for options that only one alignment reads."""
    chosen_cls = logit_alignment_class(cfg, shared_vocab) if kl else None
    if cfg.column_map not in COLUMN_MAPS:
        raise UserError(f"--column_map {cfg.column_map} is not one of {', '.join(COLUMN_MAPS)}")
    if cfg.column_map != "exact" and (chosen_cls is None or cfg.column_map not in chosen_cls.column_maps):
        takers = " / ".join(name for name, c in ALIGNMENTS.items() if cfg.column_map in c.column_maps)
        what = (f"--align_logits {chosen_cls.name}{' (one vocabulary)' if shared_vocab else ''}" if chosen_cls
                else "a run without KL")
        raise UserError(f"--column_map {cfg.column_map} only applies to the KL of --align_logits {takers} with "
                        f"different vocabularies, not to {what}; drop it")
    needed = required_artifacts(cfg, kl, hidden, shared_vocab)
    chosen = chosen_cls.name if chosen_cls else None
    for flag, reader in needed.items():
        if not getattr(cfg, flag):
            raise UserError(f"{reader} reads --{flag} ({ARTIFACT_FLAGS[flag].file}); pass it or --pipeline_dir")
    for flag in ARTIFACT_FLAGS:
        if getattr(cfg, flag) and flag not in needed:
            readers = [name for name, cls in ALIGNMENTS.items() if any(flag in cls.artifacts(
                dataclasses.replace(cfg, reduce_map_impl="my_index", uld_positions="reduce", column_map=cm))
                for cm in cls.column_maps)]
            what = f"--align_logits {chosen}" if chosen else "a run without KL"
            if chosen and cfg.column_map != "exact":
                what += f" --column_map {cfg.column_map}"
            raise UserError(f"--{flag} is not read by {what}"
                            f"{' with one vocabulary' if shared_vocab and kl else ''}; drop it "
                            f"(it is read by --align_logits {' / '.join(readers)})")
    if chosen != ReduceMap.name:
        for flag, on in (("sum_probs", cfg.sum_probs), ("reduce_map_impl", cfg.reduce_map_impl != "sparse")):
            if on:
                raise UserError(f"--{flag} only applies to --align_logits reduce_map")
    if cfg.uld_positions is not None and chosen != Uld.name:
        raise UserError(f"--uld_positions only applies to --align_logits {Uld.name}")
    if cfg.restrict_ce_to_mask and chosen != Shared.name:
        raise UserError("--restrict_ce_to_mask needs a teacher with the student's vocabulary (shared-vocabulary "
                        "distillation) and --alpha_ce > 0; with different vocabularies --align_logits chooses the "
                        "positions")


def build_alignments(cfg: AlignmentConfig, temperature: float, kl: bool, hidden: bool, shared_vocab: bool,
                     vocab: Vocabularies) -> AlignmentPlan:
    """Load the artifacts the run reads and build its `AlignmentPlan`."""
    check_artifact_flags(cfg, kl, hidden, shared_vocab)
    kl_alignment = logit_alignment_class(cfg, shared_vocab).build(cfg, temperature, vocab) if kl else None
    positions = None
    if hidden:
        cls = hidden_positions_class(cfg, shared_vocab)
        positions = make_positions(cls, cfg.average_hiddens)
    plan = AlignmentPlan(kl_alignment, positions, None)
    if plan.needs_t2s:
        plan.t2s_input = load_t2s_input(cfg.artifact("t2s_mapping"), vocab.n_teacher, vocab.n_student,
                                        vocab.fingerprints)
    return plan
