"""Trainable parts of the hidden-state losses: layer selection, projections, the hyperbolic head, and
`HiddenLosses`, the module that turns teacher and student hidden states into the MSE, cosine and
contrastive terms (the loss formulas themselves are the pure functions of `custom_step.py`).

Hidden states are indexed as HF returns them with `output_hidden_states=True`: state 0 is the embedding
output, state l (1..L) the output of layer l, so a model with L layers has L + 1 states.

Layer strategies (`--projection_strategy`; every one works for any layer counts, see `layer_pairs`):
- `last`: the student's m + 1 last states against the teacher's m + 1 last states, m = min(L_T, L_S)
  (12/3: teacher 9..12 vs student 0..3, as the original code);
- `skip`: embeddings vs embeddings, then student layer k vs the last teacher layer of the k-th group
  (12/3: 4, 8, 12; 4/3: 2, 3, 4);
- `average`: embeddings vs embeddings, then student layer k vs the mean of the k-th group of teacher layers.
  Groups are consecutive with sizes differing by at most one, larger first (np.array_split, as
  `preprocessing/init_weights.py` averages layers: 12/3 -> 1-4, 5-8, 9-12; 4/3 -> 1-2, 3, 4);
- `average_by_layers`: the mean of all states on each side (one pair);
- `weighted_average_by_layers`: softmax(w) weighted mean of all states on each side, w learnable with
  `--train_weights` (initialised uniform, so it starts as `average_by_layers`);
- `select_by_ids`: the pairs given by `--t_s_layers_ids` (JSON, e.g. '{"teacher": [4, 8, 12], "student":
  [1, 2, 3]}' or '{"teacher": 12, "student": 3}'; negative indices count from the end);
- `pool_and_project`: sequence level: every state is mean-pooled over the real positions of each sequence
  (padding excluded), then the states are combined by a learnable linear map over layers (weights
  initialised to 1/(L+1), no bias), one vector per sequence and side.
When the student has more layers than the teacher the roles of the two sides swap in skip and average.

Projections (`--project_to`): `teacher` maps student rows to the teacher's width, `student` teacher rows to
the student's, `intermediate` both to `--intermediate_dim`. One `nn.Linear` per layer pair and per loss
(the MSE, cosine and contrastive terms each have their own, as in the original code); a square projection
starts as the identity. Trainable unless `--no-train_projections`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from custom_step import HIDDEN_LOSSES, contrastive_loss, masked_mean_pool
from hyptorch.nn import HyperbolicDistanceLayer, HypLinear, ToPoincare
from kdcore.alignments import Positions, row_sequences
from kdcore.errors import UserError

PROJECTION_STRATEGIES = ("last", "skip", "average", "average_by_layers", "weighted_average_by_layers",
                         "select_by_ids", "pool_and_project")
PROJECT_TO = ("teacher", "student", "intermediate")
ADJUST_C = ("train_exp_map_teacher", "train_exp_map_student", "recompute_after_epoch")


# ---------------------------------------------------------------------------------------------------------
# Layer strategies
# ---------------------------------------------------------------------------------------------------------


def layer_groups(n_big: int, n_small: int) -> list[list[int]]:
    """Layers 1..n_big cut into n_small consecutive groups whose sizes differ by at most one, larger groups
    first (12, 3 -> [1-4], [5-8], [9-12]; 4, 3 -> [1, 2], [3], [4])."""
    return [part.tolist() for part in np.array_split(np.arange(1, n_big + 1), n_small)]


def parse_layer_ids(text: str) -> list[tuple[int, int]]:
    """`--t_s_layers_ids` JSON -> [(teacher state, student state), ...].

    Accepts {"teacher": int | [ints], "student": int | [ints]} (lists of equal length) or a list of
    [teacher, student] pairs. Raises ValueError with the reason.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--t_s_layers_ids is not JSON ({err.msg})") from err
    if isinstance(value, dict) and set(value) == {"teacher", "student"}:
        t, s = value["teacher"], value["student"]
        t, s = (t if isinstance(t, list) else [t]), (s if isinstance(s, list) else [s])
        if len(t) != len(s):
            raise ValueError(f"--t_s_layers_ids lists {len(t)} teacher and {len(s)} student layers")
        pairs = list(zip(t, s))
    elif isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
        pairs = [tuple(p) for p in value]
    else:
        raise ValueError('--t_s_layers_ids must look like {"teacher": [4, 8], "student": [1, 2]} or [[4, 1], [8, 2]]')
    if not pairs or not all(isinstance(i, int) and not isinstance(i, bool) for p in pairs for i in p):
        raise ValueError("--t_s_layers_ids must name at least one pair of integer layer indices")
    return [(int(t), int(s)) for t, s in pairs]


def _grouped_pairs(n_teacher: int, n_student: int, reduce: str) -> list[tuple[list[int], list[int]]]:
    """Embeddings pair plus one pair per layer of the shallower side against its group on the deeper side;
    `reduce` "last" keeps the group's last layer, "mean" all of it."""
    swap = n_student > n_teacher
    big, small = (n_student, n_teacher) if swap else (n_teacher, n_student)
    pairs = [([0], [0])]
    for k, group in enumerate(layer_groups(big, small), start=1):
        deep = group[-1:] if reduce == "last" else group
        pairs.append(([k], deep) if swap else (deep, [k]))
    return pairs


def layer_pairs(strategy: str, n_teacher_layers: int, n_student_layers: int,
                layer_ids: list[tuple[int, int]] | None = None) -> tuple[Tensor, Tensor]:
    """The layer pairs of a strategy as combination matrices (W_T fp32 [P, L_T + 1], W_S fp32 [P, L_S + 1]).

    Pair p compares sum_l W_T[p, l] h^T_l with sum_l W_S[p, l] h^S_l (h_0 = embeddings); every row sums to
    1. For `weighted_average_by_layers` and `pool_and_project` this is the initial (uniform) combination.
    Raises ValueError for an unknown strategy, missing or out-of-range `layer_ids`.
    """
    lt, ls = n_teacher_layers, n_student_layers
    if lt < 1 or ls < 1:
        raise ValueError(f"layer counts must be positive, got teacher {lt}, student {ls}")
    if strategy == "last":
        m = min(lt, ls)
        pairs = [([lt - m + k], [ls - m + k]) for k in range(m + 1)]
    elif strategy == "skip":
        pairs = _grouped_pairs(lt, ls, "last")
    elif strategy == "average":
        pairs = _grouped_pairs(lt, ls, "mean")
    elif strategy in ("average_by_layers", "weighted_average_by_layers", "pool_and_project"):
        pairs = [(list(range(lt + 1)), list(range(ls + 1)))]
    elif strategy == "select_by_ids":
        if not layer_ids:
            raise ValueError("--projection_strategy select_by_ids needs --t_s_layers_ids")
        pairs = []
        for t, s in layer_ids:
            if not (-(lt + 1) <= t <= lt and -(ls + 1) <= s <= ls):
                raise ValueError(f"--t_s_layers_ids pair ({t}, {s}) is out of range: the teacher has states "
                                 f"0..{lt}, the student 0..{ls} (0 = embeddings)")
            pairs.append(([t % (lt + 1)], [s % (ls + 1)]))
    else:
        raise ValueError(f"unknown projection strategy {strategy!r}; choose one of {PROJECTION_STRATEGIES}")
    w_t = torch.zeros(len(pairs), lt + 1)
    w_s = torch.zeros(len(pairs), ls + 1)
    for p, (t_layers, s_layers) in enumerate(pairs):
        w_t[p, t_layers] = 1.0 / len(t_layers)
        w_s[p, s_layers] = 1.0 / len(s_layers)
    return w_t, w_s


class LayerSelector(nn.Module):
    """Combines the hidden states of each side into the P states compared by a strategy.

    Fixed strategies keep their combination matrices as Python lists (no parameters, nothing saved);
    `weighted_average_by_layers` holds softmax logits `teacher_logits` [L_T + 1] / `student_logits`
    [L_S + 1] and `pool_and_project` raw weights `teacher_weights` / `student_weights`; these are parameters
    with `train_weights`, buffers otherwise.
    forward(teacher_states, student_states), each a dict {state index: [N, D]} with at least the states of
    `teacher_layers` / `student_layers`, returns P pairs (teacher [N, D_T], student [N, D_S]).
    """

    def __init__(self, strategy: str, n_teacher_layers: int, n_student_layers: int,
                 layer_ids: list[tuple[int, int]] | None = None, train_weights: bool = True):
        super().__init__()
        self.strategy = strategy
        w_t, w_s = layer_pairs(strategy, n_teacher_layers, n_student_layers, layer_ids)
        self.n_pairs = w_t.shape[0]
        self.learned = strategy in ("weighted_average_by_layers", "pool_and_project")
        if self.learned:
            init_t = torch.zeros(n_teacher_layers + 1) if strategy == "weighted_average_by_layers" else w_t[0]
            init_s = torch.zeros(n_student_layers + 1) if strategy == "weighted_average_by_layers" else w_s[0]
            name = "logits" if strategy == "weighted_average_by_layers" else "weights"
            for side, init in (("teacher", init_t), ("student", init_s)):
                if train_weights:
                    self.register_parameter(f"{side}_{name}", nn.Parameter(init.clone()))
                else:
                    self.register_buffer(f"{side}_{name}", init.clone())
        self._fixed = {"teacher": w_t.tolist(), "student": w_s.tolist()}
        self.teacher_layers = sorted({i for row in self._fixed["teacher"] for i, w in enumerate(row) if w})
        self.student_layers = sorted({i for row in self._fixed["student"] for i, w in enumerate(row) if w})

    def layer_weights(self, side: str) -> Tensor | None:
        """The current combination weights of one side ([L + 1]) for the learned strategies, else None."""
        if self.strategy == "weighted_average_by_layers":
            return torch.softmax(getattr(self, f"{side}_logits"), dim=0)
        if self.strategy == "pool_and_project":
            return getattr(self, f"{side}_weights")
        return None

    def combine(self, side: str, states: dict[int, Tensor]) -> list[Tensor]:
        """The P combined states of one side: [N, D] each."""
        weights = self.layer_weights(side)
        if weights is not None:
            layers = sorted(states)
            stacked = torch.stack([states[i] for i in layers])  # [L + 1, N, D]
            w = weights[layers].to(stacked.dtype)
            return [torch.tensordot(w, stacked, dims=1)]
        out = []
        for row in self._fixed[side]:
            terms = [(i, w) for i, w in enumerate(row) if w]
            if len(terms) == 1:
                out.append(states[terms[0][0]])
            else:
                out.append(sum(states[i] for i, _ in terms) * (1.0 / len(terms)))
        return out

    def forward(self, teacher_states: dict[int, Tensor], student_states: dict[int, Tensor]) -> list[tuple[Tensor, Tensor]]:
        return list(zip(self.combine("teacher", teacher_states), self.combine("student", student_states)))

    def extra_repr(self) -> str:
        return f"strategy={self.strategy}, pairs={self.n_pairs}"


# ---------------------------------------------------------------------------------------------------------
# Projections
# ---------------------------------------------------------------------------------------------------------


def _linear(d_in: int, d_out: int) -> nn.Linear:
    """nn.Linear(d_in, d_out); a square one starts as the identity with zero bias."""
    layer = nn.Linear(d_in, d_out)
    if d_in == d_out:
        with torch.no_grad():
            layer.weight.copy_(torch.eye(d_in))
            layer.bias.zero_()
    return layer


def projection_dims(project_to: str, d_teacher: int, d_student: int, intermediate_dim: int | None) -> tuple[
        int | None, int | None, int]:
    """(teacher input dim or None, student input dim or None, common dim): a side whose dim is None stays
    unprojected."""
    if project_to == "teacher":
        return None, d_student, d_teacher
    if project_to == "student":
        return d_teacher, None, d_student
    if project_to == "intermediate":
        if not intermediate_dim or intermediate_dim < 1:
            raise ValueError("--project_to intermediate needs a positive --intermediate_dim")
        return d_teacher, d_student, intermediate_dim
    raise ValueError(f"unknown --project_to {project_to!r}; choose one of {PROJECT_TO}")


class PairProjector(nn.Module):
    """One projection per layer pair and projected side: `teacher(p, t)` [N, D_T] -> [N, dim],
    `student(p, s)` [N, D_S] -> [N, dim]; an unprojected side passes through unchanged."""

    def __init__(self, n_pairs: int, d_teacher: int, d_student: int, project_to: str,
                 intermediate_dim: int | None = None, trainable: bool = True):
        super().__init__()
        t_in, s_in, self.dim = projection_dims(project_to, d_teacher, d_student, intermediate_dim)
        self.teacher_proj = nn.ModuleList(_linear(t_in, self.dim) for _ in range(n_pairs)) if t_in else None
        self.student_proj = nn.ModuleList(_linear(s_in, self.dim) for _ in range(n_pairs)) if s_in else None
        self.requires_grad_(trainable)

    def teacher(self, p: int, t: Tensor) -> Tensor:
        return t if self.teacher_proj is None else self.teacher_proj[p](t)

    def student(self, p: int, s: Tensor) -> Tensor:
        return s if self.student_proj is None else self.student_proj[p](s)


# ---------------------------------------------------------------------------------------------------------
# Hyperbolic head
# ---------------------------------------------------------------------------------------------------------


@dataclass
class HyperbolicConfig:
    """Options of the `hyperbolic` sub-command that shape the model (see `HyperbolicHead`)."""

    c: float = 1.0
    adjust_c: str | None = None
    riemannian: bool = True
    train_x: bool = False
    use_hyperbolic_projections: bool = False
    use_bias: bool = True


class HyperbolicHead(nn.Module):
    """Maps the rows of a layer pair into one Poincare ball of curvature -c for the contrastive term.

    Default: Euclidean projections (`PairProjector`), then `ToPoincare` (exp map at 0, or at a trainable
    point with `train_x`; Riemannian gradient rescaling with `riemannian`) on each side.
    `use_hyperbolic_projections`: `ToPoincare` first (in each side's own width), then a `HypLinear` (Mobius
    matrix-vector product, Mobius bias with `use_bias`) per pair on the projected side(s).
    The curvature is one number for both sides (distances are defined within one ball), held by
    `self.distance` (a `HyperbolicDistanceLayer`): a buffer, or with `adjust_c` train_exp_map_teacher /
    train_exp_map_student the trainable `distance.log_c`. Its gradient then comes only through the named
    side's maps (exp map and hyperbolic projection); the other side and the distance use its value without
    gradient. `set_curvature` changes it in place (precomputed or recomputed curvature).
    """

    def __init__(self, cfg: HyperbolicConfig, n_pairs: int, d_teacher: int, d_student: int, project_to: str,
                 intermediate_dim: int | None = None, trainable: bool = True):
        super().__init__()
        self.cfg = cfg
        train_c = cfg.adjust_c in ("train_exp_map_teacher", "train_exp_map_student")
        self.distance = HyperbolicDistanceLayer(cfg.c, train_c=train_c)
        t_in, s_in, self.dim = projection_dims(project_to, d_teacher, d_student, intermediate_dim)
        self.euclidean = None
        self.teacher_hyp = self.student_hyp = None
        if cfg.use_hyperbolic_projections:
            t_ball, s_ball = d_teacher, d_student

            def hyp(d_in: int) -> nn.ModuleList:
                return nn.ModuleList(HypLinear(d_in, self.dim, cfg.c, bias=cfg.use_bias) for _ in range(n_pairs))

            self.teacher_hyp = hyp(t_in) if t_in else None
            self.student_hyp = hyp(s_in) if s_in else None
            for layers in (self.teacher_hyp, self.student_hyp):
                if layers is not None:
                    layers.requires_grad_(trainable)
        else:
            t_ball = s_ball = self.dim
            self.euclidean = PairProjector(n_pairs, d_teacher, d_student, project_to, intermediate_dim, trainable)
        self.teacher_map = ToPoincare(cfg.c, train_x=cfg.train_x, ball_dim=t_ball, riemannian=cfg.riemannian)
        self.student_map = ToPoincare(cfg.c, train_x=cfg.train_x, ball_dim=s_ball, riemannian=cfg.riemannian)

    @property
    def c(self) -> Tensor:
        """The curvature (0-dim tensor; differentiable when trainable)."""
        return self.distance.c

    def set_curvature(self, value: float) -> None:
        """Set the curvature everywhere in place (the trainable parameter object is kept)."""
        for module in self.modules():
            if isinstance(module, (HyperbolicDistanceLayer, ToPoincare, HypLinear)):
                module.c = value

    def side_curvature(self, side: str) -> Tensor:
        """The curvature as seen by one side's maps: with gradient only on the side that trains it."""
        c = self.c
        return c if self.cfg.adjust_c == f"train_exp_map_{side}" else c.detach()

    def _side(self, side: str, p: int, x: Tensor) -> Tensor:
        c = self.side_curvature(side)
        if self.euclidean is not None:
            x = getattr(self.euclidean, side)(p, x)
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # Poincare maths needs at least fp32 near the boundary
        x = getattr(self, f"{side}_map")(x, c=c)
        layers = getattr(self, f"{side}_hyp")
        return x if layers is None else layers[p](x, c=c)

    def teacher(self, p: int, t: Tensor) -> Tensor:
        """[N, D_T] -> [N, dim] points of the ball (fp32)."""
        return self._side("teacher", p, t)

    def student(self, p: int, s: Tensor) -> Tensor:
        """[N, D_S] -> [N, dim] points of the ball (fp32)."""
        return self._side("student", p, s)


# ---------------------------------------------------------------------------------------------------------
# The hidden-state losses of a step
# ---------------------------------------------------------------------------------------------------------


@dataclass
class HiddenConfig:
    """What the hidden-state terms compute (built from the command line by `kdcore.trainer_core`).

    losses: the enabled terms among "mse", "cos", "contrastive". Contrastive options as in
    `custom_step.contrastive_loss`; `noise_prob` > 0 adds the NCE noise term (`--add_neg_size_constant`).
    `hyperbolic`: the contrastive similarity is the negative Poincare distance (None: cosine). Which rows pair is
    the `kdcore.alignments.Positions` object given to `HiddenLosses`.
    """

    losses: tuple[str, ...]
    strategy: str = "average_by_layers"
    layer_ids: list[tuple[int, int]] | None = None
    project_to: str = "teacher"
    intermediate_dim: int | None = None
    train_projections: bool = True
    train_weights: bool = True
    n_negatives: int = -1
    negative_strategy: str = "student"
    teacher_student_prop: float = 0.5
    temperature: float = 1.0
    from_one_sample: bool = False
    use_mismatched_ids: bool = False
    noise_prob: float = 0.0
    hyperbolic: HyperbolicConfig | None = None


@dataclass
class AlignedRows:
    """Selected hidden states: {state index: [N, D]} per side, aligned row by row, with the sequence of every
    row (int64 [N]); `extra_*`: unaligned rows for the contrastive negatives (`use_mismatched_ids`)."""

    teacher: dict[int, Tensor]
    student: dict[int, Tensor]
    seq: Tensor | None = None
    extra_teacher: dict[int, Tensor] | None = None
    extra_student: dict[int, Tensor] | None = None
    extra_teacher_seq: Tensor | None = None
    extra_student_seq: Tensor | None = None


class HiddenLosses(nn.Module):
    """The hidden-state terms of a step: `forward(batch, teacher_states, student_states)` returns
    {"loss_mse", "loss_cos", "loss_contrastive"} (the enabled ones), each the mean over layer pairs.

    positions: a `kdcore.alignments.Positions` (match, reduce or shared) saying which rows pair and from which
    student pass the student states come. teacher_states: the teacher's hidden states (tuple of L_T + 1 tensors
    [B, Lt, D_T], no gradient); student_states: the student's (L_S + 1 tensors [B, L, D_S] of that pass). Batch keys
    as `lm_seqs_dataset.Collator` makes them. Token-level rows pair as the positions say (match: the i-th matched
    teacher position with the i-th matched student position; reduce: every real teacher position with the pooled
    pieces of its split; shared: every real position); `pool_and_project` makes one row per sequence of every real
    position on each side. Only the states that the strategy reads are selected.
    """

    def __init__(self, cfg: HiddenConfig, positions: Positions, n_teacher_layers: int, n_student_layers: int,
                 d_teacher: int, d_student: int):
        super().__init__()
        self.cfg, self.positions = cfg, positions
        self.selector = LayerSelector(cfg.strategy, n_teacher_layers, n_student_layers, cfg.layer_ids,
                                      cfg.train_weights)
        n_pairs = self.selector.n_pairs
        self.projections = nn.ModuleDict()
        for name in cfg.losses:
            if name == "contrastive" and cfg.hyperbolic is not None:
                continue
            self.projections[name] = PairProjector(n_pairs, d_teacher, d_student, cfg.project_to,
                                                   cfg.intermediate_dim, cfg.train_projections)
        self.hyperbolic = None
        if "contrastive" in cfg.losses and cfg.hyperbolic is not None:
            self.hyperbolic = HyperbolicHead(cfg.hyperbolic, n_pairs, d_teacher, d_student, cfg.project_to,
                                             cfg.intermediate_dim, cfg.train_projections)
        self._negatives: torch.Generator | None = None  # None: torch's global RNG

    @contextmanager
    def seeded_negatives(self, generator: torch.Generator) -> Iterator[None]:
        """Draw the contrastive negatives from `generator` inside the block (validation: the same negatives in
        every pass, and the training RNG is left untouched)."""
        previous, self._negatives = self._negatives, generator
        try:
            yield
        finally:
            self._negatives = previous

    # ----- rows ---------------------------------------------------------------------------------------
    def _select(self, states, layers, mask: Tensor) -> dict[int, Tensor]:
        return {i: states[i][mask] for i in layers}

    def rows(self, batch: dict[str, Tensor], teacher_states, student_states) -> AlignedRows:
        """The aligned rows of the states that the strategy reads (see the class docstring)."""
        cfg, sel, pos = self.cfg, self.selector, self.positions
        t_layers, s_layers = sel.teacher_layers, sel.student_layers
        if cfg.strategy == "pool_and_project":
            t_mask = pos.teacher_mask(batch)
            return AlignedRows({i: masked_mean_pool(teacher_states[i], t_mask) for i in t_layers},
                               {i: masked_mean_pool(student_states[i], pos.pass_mask(batch)) for i in s_layers},
                               torch.arange(t_mask.shape[0], device=t_mask.device))
        t_rows = pos.teacher_rows(batch)
        student = {i: pos.pool(pos.select(student_states[i], batch), batch) for i in s_layers}
        rows = AlignedRows(self._select(teacher_states, t_layers, t_rows), student, row_sequences(t_rows))
        unaligned = pos.unaligned(batch)
        if cfg.use_mismatched_ids and "contrastive" in cfg.losses and unaligned is not None:
            t_rest, s_rest = unaligned
            rows.extra_teacher = self._select(teacher_states, t_layers, t_rest)
            rows.extra_student = self._select(student_states, s_layers, s_rest)
            rows.extra_teacher_seq, rows.extra_student_seq = row_sequences(t_rest), row_sequences(s_rest)
        return rows

    # ----- losses -------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor], teacher_states, student_states) -> dict[str, Tensor]:
        rows = self.rows(batch, teacher_states, student_states)
        n_t, n_s = next(iter(rows.teacher.values())).shape[0], next(iter(rows.student.values())).shape[0]
        if n_t != n_s:
            raise UserError(f"{n_t} teacher rows but {n_s} student rows are aligned in a batch: the match masks "
                            "of the shards are inconsistent; re-run find_matching_ids.py")
        pairs = self.selector(rows.teacher, rows.student)
        out: dict[str, Tensor] = {}
        for name in ("mse", "cos"):
            if name in self.projections:
                proj = self.projections[name]
                values = [HIDDEN_LOSSES[name](proj.student(p, s), proj.teacher(p, t)) for p, (t, s) in enumerate(pairs)]
                out[f"loss_{name}"] = torch.stack(values).mean()
        if "contrastive" in self.cfg.losses:
            out["loss_contrastive"] = self._contrastive(rows, pairs)
        return out

    def _contrastive(self, rows: AlignedRows, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
        cfg = self.cfg
        head = self.hyperbolic if self.hyperbolic is not None else self.projections["contrastive"]
        extra_t = self.selector.combine("teacher", rows.extra_teacher) if rows.extra_teacher else None
        extra_s = self.selector.combine("student", rows.extra_student) if rows.extra_student else None
        metric, c = ("poincare", self.hyperbolic.c.detach()) if self.hyperbolic is not None else ("cosine", None)
        values = []
        for p, (t, s) in enumerate(pairs):
            with torch.autocast(t.device.type, enabled=False) if self.hyperbolic is not None else nullcontext():
                values.append(contrastive_loss(
                    head.teacher(p, t), head.student(p, s), strategy=cfg.negative_strategy,
                    n_negatives=cfg.n_negatives, teacher_student_prop=cfg.teacher_student_prop,
                    temperature=cfg.temperature, metric=metric, c=c,
                    sequence_ids=rows.seq if cfg.from_one_sample else None,
                    extra_teacher=None if extra_t is None else head.teacher(p, extra_t[p]),
                    extra_student=None if extra_s is None else head.student(p, extra_s[p]),
                    extra_teacher_seq=rows.extra_teacher_seq, extra_student_seq=rows.extra_student_seq,
                    noise_prob=cfg.noise_prob, generator=self._negatives))
        return torch.stack(values).mean()


def curvature_value(module: nn.Module) -> float | None:
    """The curvature of a module holding `HiddenLosses` with a hyperbolic head, else None."""
    for sub in module.modules():
        if isinstance(sub, HyperbolicHead):
            value = float(sub.c.detach())
            return value if math.isfinite(value) else None
    return None
