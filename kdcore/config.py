"""The typed configuration of a distillation run (`train.py`): one frozen dataclass per concern, built once from
the command line by `TrainConfig.from_args`, which also fills the artifact flags from `--pipeline_dir` and runs
every check before any heavy work (one-line `UserError`s). The trainer, the step and the losses read these typed
fields; nothing downstream sees the argparse namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from kdcore.alignments import (
    ALIGNMENTS,
    AlignmentConfig,
    AlignmentPlan,
    Vocabularies,
    build_alignments,
    check_artifact_flags,
    hidden_positions_class,
    logit_alignment_class,
    required_artifacts,
)
from kdcore.artifacts import ARTIFACT_FLAGS, PipelineDir
from kdcore.errors import UserError
from kdcore.hidden_projection import HiddenConfig
from kdcore.trainer_core import CurvatureConfig, hidden_config


@dataclass(frozen=True)
class OutputConfig:
    """Where and how often the run writes: `dump_path` (refused when it holds files, unless `force`, which empties
    it, or a resume), TensorBoard, training logs every `log_interval` updates, validation + checkpoint every
    `checkpoint_interval` updates. Resume from `load_from_checkpoint` (a checkpoint or a dump_path: its newest
    complete checkpoint), or with `resume` "auto" from the newest complete checkpoint in `dump_path` when there
    is one (a fresh start otherwise), so that a relaunch after a crash is the same command."""

    dump_path: Path
    force: bool = False
    tensorboard_logs_path: str | None = None
    tensorboard_log_name: str = "run"
    log_interval: int = 50
    checkpoint_interval: int = 1000
    load_from_checkpoint: str | None = None
    resume: str = "never"


@dataclass(frozen=True)
class DataConfig:
    """The shard set, the student and the teacher (None: MLM-only training)."""

    binarized_data_folder: str
    student_name: str
    student_pretrained_weights: str | None = None
    teacher_name: str | None = None
    student_token_counts: str | None = None
    valid_prop: float = 0.1
    batch_size: int = 5
    group_by_size: bool = True
    freeze_pos_embs: bool = False
    freeze_token_type_embds: bool = False
    teacher_cache: str | None = None


@dataclass(frozen=True)
class LossConfig:
    """Total = alpha_ce KL(T) + alpha_mlm MLM + alpha_mse MSE + alpha_cos COS + alpha_contrastive CONTRASTIVE."""

    temperature: float = 2.0
    alpha_ce: float = 0.0
    alpha_mlm: float = 0.0
    alpha_mse: float = 0.0
    alpha_cos: float = 0.0
    alpha_contrastive: float = 0.0

    @property
    def weights(self) -> dict[str, float]:
        """{"ce", "mlm", "mse", "cos", "contrastive"} -> alpha, as `step_runner.combine_losses` reads them."""
        return {"ce": self.alpha_ce, "mlm": self.alpha_mlm, "mse": self.alpha_mse, "cos": self.alpha_cos,
                "contrastive": self.alpha_contrastive}

    @property
    def kl(self) -> bool:
        return self.alpha_ce > 0

    @property
    def hidden(self) -> bool:
        return self.alpha_mse + self.alpha_cos + self.alpha_contrastive > 0


@dataclass(frozen=True)
class MlmConfig:
    """DistilBERT's masking: `mask_prop` of the student tokens, drawn with probability ~ count^(-smoothing), of
    which `word_mask` become [MASK], `word_keep` stay and `word_rand` become a random token."""

    mask_prop: float = 0.15
    word_mask: float = 0.8
    word_keep: float = 0.1
    word_rand: float = 0.1
    smoothing: float = 0.7


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedule (`kdcore.trainer_core`): linear warm-up over `warmup_prop` of the planned updates, then
    constant, times `reduce_factor` on every validation plateau."""

    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    adam_epsilon: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.98)
    max_grad_norm: float = 5.0
    warmup_prop: float = 0.05
    reduce_factor: float = 0.5
    gradient_accumulation_steps: int = 50
    precision: str = "fp32"
    teacher_precision: str | None = None  # the frozen teacher's autocast (None: as `precision`)
    aligner_lr_scale: float = 1.0  # learning-rate multiplier of the alignment's trainable part (dskd's projections)

    @property
    def teacher_autocast(self) -> str:
        """The precision the frozen teacher runs in: `teacher_precision`, else `precision`."""
        return self.teacher_precision or self.precision


NONFINITE_POLICIES = ("stop", "skip")
"""`--on_nonfinite` choices: what an update with a NaN/inf loss term (or, without a GradScaler, gradient norm) does."""


@dataclass(frozen=True)
class LoopConfig:
    """How long and where: `n_epoch` epochs or `max_steps` updates (0: the epochs decide), early stop after
    `valid_epochs_patience` validations without improvement (0: never), the seed, `--device`, the seconds a
    collective may wait for a peer before the process group fails (`dist_timeout_s`); an update with a NaN/inf
    loss or gradient norm stops the run (`on_nonfinite` "stop") or is dropped ("skip"), stopping after
    `max_nonfinite_skips` consecutive dropped updates."""

    n_epoch: int = 3
    max_steps: int = 0
    valid_epochs_patience: int = 0
    seed: int = 42
    device: str = "auto"
    dist_timeout_s: int = 1800
    on_nonfinite: str = "stop"
    max_nonfinite_skips: int = 10


@dataclass(frozen=True)
class TrainConfig:
    """Everything a distillation run reads. `hidden` (`hidden_projection.HiddenConfig`) is None without
    hidden-state losses; its NCE noise term is set from the training-set size when `add_neg_size_constant`;
    `curvature` is None unless the hyperbolic sub-command estimates c; `shared_vocab` says that teacher and
    student share one tokenizer (then the alignment is `shared`)."""

    output: OutputConfig
    data: DataConfig
    losses: LossConfig
    mlm: MlmConfig
    alignment: AlignmentConfig
    optim: OptimConfig
    loop: LoopConfig
    hidden: HiddenConfig | None = None
    add_neg_size_constant: bool = False
    curvature: CurvatureConfig | None = None
    shared_vocab: bool = False

    def to_json(self) -> dict:
        """A JSON-ready dict of every field (for `parameters.json`)."""
        def plain(value):
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return str(value) if isinstance(value, Path) else value
        return plain(self)

    @classmethod
    def from_namespace(cls, a: argparse.Namespace, shared_vocab: bool = False) -> TrainConfig:
        """The configuration of a parsed command line as it stands (no file is read, nothing is checked)."""
        losses = LossConfig(a.temperature, *default_alphas(a), a.alpha_mse, a.alpha_cos, a.alpha_contrastive)
        return cls(
            output=OutputConfig(Path(a.dump_path), a.force, a.tensorboard_logs_path, a.tensorboard_log_name,
                                a.log_interval, a.checkpoint_interval, a.load_from_checkpoint, a.resume),
            data=DataConfig(a.binarized_data_folder, a.student_name, a.student_pretrained_weights, a.teacher_name,
                            a.student_token_counts, a.valid_prop, a.batch_size, a.group_by_size, a.freeze_pos_embs,
                            a.freeze_token_type_embds, a.teacher_cache),
            losses=losses,
            mlm=MlmConfig(a.mlm_mask_prop, a.word_mask, a.word_keep, a.word_rand, a.mlm_smoothing),
            alignment=alignment_config(a),
            optim=OptimConfig(a.learning_rate, a.weight_decay, a.adam_epsilon, (0.9, 0.98), a.max_grad_norm,
                              a.warmup_prop, a.reduce_factor, a.gradient_accumulation_steps, a.precision,
                              a.teacher_precision, a.aligner_lr_scale),
            loop=LoopConfig(a.n_epoch, a.max_steps, a.valid_epochs_patience, a.seed, a.device, a.dist_timeout_s,
                            a.on_nonfinite, a.max_nonfinite_skips),
            hidden=hidden_config(a, None) if losses.hidden else None,
            add_neg_size_constant=a.add_neg_size_constant,
            curvature=CurvatureConfig.from_args(a) if losses.hidden else None,
            shared_vocab=shared_vocab,
        )

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> TrainConfig:
        """Fill the artifact flags from `--pipeline_dir`, build and check the configuration (one-line errors)."""
        if a.pipeline_dir:
            fill_from_pipeline(a)
        for flag in ("binarized_data_folder", "student_name"):
            if not getattr(a, flag):
                raise UserError(f"--{flag} is required (or --pipeline_dir, which fills it)")
        check_hidden_args(a)
        cfg = cls.from_namespace(a)
        cfg.check()
        shared = bool(cfg.data.teacher_name) and shared_vocabulary(cfg.data.teacher_name, cfg.data.student_name)
        cfg = dataclasses.replace(cfg, shared_vocab=shared)
        check_artifact_flags(cfg.alignment, cfg.losses.kl, cfg.losses.hidden, shared)
        if cfg.data.teacher_cache and shared:
            raise UserError("--teacher_cache needs different vocabularies: with one vocabulary the teacher reads the "
                            "student's masked ids, which change every step")
        kl_class = logit_alignment_class(cfg.alignment, shared) if cfg.losses.kl else None
        if cfg.optim.aligner_lr_scale != 1.0 and not (kl_class and kl_class.has_aligner()):
            takers = " / ".join(name for name, c in ALIGNMENTS.items() if c.has_aligner())
            raise UserError(f"--aligner_lr_scale only applies to alignments with trainable parts (--align_logits "
                            f"{takers}, with --alpha_ce > 0); drop it")
        if cfg.data.teacher_cache and kl_class and kl_class.uncacheable:
            raise UserError(f"--teacher_cache cannot serve --align_logits {kl_class.name}: {kl_class.uncacheable}")
        if cfg.losses.hidden and a.alpha_contrastive > 0 and a.use_mismatched_ids:
            positions = hidden_positions_class(cfg.alignment, shared)
            if not positions.has_unaligned_rows or a.projection_strategy == "pool_and_project":
                raise UserError(f"--use_mismatched_ids needs token-level rows that leave positions unpaired (--align_hiddens "
                                f"match with different vocabularies, not pool_and_project); --align_hiddens "
                                f"{positions.name} pairs every position")
        return cfg

    def alignments(self, vocab: Vocabularies) -> AlignmentPlan:
        """The run's `AlignmentPlan` (loads the artifacts its alignments read)."""
        return build_alignments(self.alignment, self.losses.temperature, self.losses.kl, self.losses.hidden,
                                self.shared_vocab, vocab)

    def check(self) -> None:
        """The checks that need no file contents (the alignment checks its artifacts when it loads them)."""
        w, m, o = self.losses, self.mlm, self.output
        for name, value in w.weights.items():
            if value < 0:
                raise UserError(f"--alpha_{name} must not be negative")
        if sum(w.weights.values()) <= 0:
            raise UserError("the loss weights sum to zero; set --alpha_ce and/or --alpha_mlm")
        if w.kl and not self.data.teacher_name:
            raise UserError("--alpha_ce > 0 needs a teacher: pass --teacher_name")
        if w.hidden and not self.data.teacher_name:
            raise UserError("the hidden-state losses need a teacher: pass --teacher_name")
        if self.data.teacher_cache and not w.kl:
            raise UserError("--teacher_cache serves the KL term; set --alpha_ce > 0 or drop the cache")
        if self.data.teacher_name and not (w.kl or w.hidden):
            raise UserError("--teacher_name is given but --alpha_ce is 0; set --alpha_ce (or a hidden-state loss) or "
                            "drop the teacher")
        if abs(m.word_mask + m.word_keep + m.word_rand - 1.0) > 1e-6:
            raise UserError("--word_mask + --word_keep + --word_rand must sum to 1")
        if not 0 < m.mask_prop < 1:
            raise UserError(f"--mlm_mask_prop {m.mask_prop} must be in (0, 1)")
        if not self.optim.aligner_lr_scale > 0:
            raise UserError(f"--aligner_lr_scale {self.optim.aligner_lr_scale} must be positive")
        if not 0 <= self.data.valid_prop < 1:
            raise UserError(f"--valid_prop {self.data.valid_prop} must be in [0, 1)")
        for flag, value in (("batch_size", self.data.batch_size), ("n_epoch", self.loop.n_epoch),
                            ("gradient_accumulation_steps", self.optim.gradient_accumulation_steps),
                            ("log_interval", o.log_interval), ("checkpoint_interval", o.checkpoint_interval),
                            ("max_nonfinite_skips", self.loop.max_nonfinite_skips)):
            if value < 1:
                raise UserError(f"--{flag} must be at least 1")
        if self.loop.dist_timeout_s < 1:
            raise UserError("--dist_timeout_s must be at least 1")
        if o.resume not in RESUME_MODES:
            raise UserError(f"--resume {o.resume}: choose one of {', '.join(RESUME_MODES)}")
        if o.resume == "auto" and (o.force or o.load_from_checkpoint):
            raise UserError("--resume auto resumes from the newest checkpoint in --dump_path: drop --force (it would "
                            "delete them) and --load_from_checkpoint")
        if self.loop.on_nonfinite not in NONFINITE_POLICIES:
            raise UserError(f"--on_nonfinite {self.loop.on_nonfinite}: choose from {', '.join(NONFINITE_POLICIES)}")
        dump = o.dump_path
        if dump.exists() and any(dump.iterdir()) and not (o.force or o.load_from_checkpoint or o.resume == "auto"):
            raise UserError(f"--dump_path {dump} already exists; pass --force to overwrite it, or --resume auto "
                            "(or --load_from_checkpoint) to resume")
        for flag in ("binarized_data_folder", "student_name"):
            if not Path(getattr(self.data, flag)).is_dir():
                raise UserError(f"--{flag} {getattr(self.data, flag)} is not a directory")


RESUME_MODES = ("never", "auto")

TEACHER_ALPHAS = (2.0, 0.5)
"""(alpha_ce, alpha_mlm) when a teacher is given and the command line leaves them out: the paper's weights."""


def default_alphas(a: argparse.Namespace) -> tuple[float, float]:
    """(alpha_ce, alpha_mlm): the given values, else the paper's with a teacher and MLM alone (1.0) without."""
    ce, mlm = TEACHER_ALPHAS if a.teacher_name else (0.0, 1.0)
    return (ce if a.alpha_ce is None else a.alpha_ce), (mlm if a.alpha_mlm is None else a.alpha_mlm)


def check_hidden_args(a: argparse.Namespace) -> None:
    """One-line errors for inconsistent hidden-state and hyperbolic options (`hidden_args.validate_hidden_losses`
    once a hidden-state loss is on)."""
    from kdcore.hidden_args import validate_hidden_losses

    if a.hidden_distil_type == "hyperbolic" and a.alpha_contrastive <= 0:
        raise UserError("the hyperbolic sub-command changes the contrastive loss; set --alpha_contrastive")
    if a.alpha_mse + a.alpha_cos + a.alpha_contrastive > 0:
        validate_hidden_losses(a, row="sequence")


def alignment_config(a: argparse.Namespace) -> AlignmentConfig:
    """The `--align_*` options and artifact flags of the command line."""
    return AlignmentConfig(
        logits=a.align_logits, hiddens=a.align_hiddens, column_map=a.column_map, **{flag: getattr(a, flag) for flag in ARTIFACT_FLAGS},
        sum_probs=a.sum_probs, average_logits=a.average_logits, average_hiddens=a.average_hiddens,
        reduce_map_impl=a.reduce_map_impl or "sparse", restrict_ce_to_mask=a.restrict_ce_to_mask,
        uld_positions=a.uld_positions)


def shared_vocabulary(teacher_name: str, student_name: str) -> bool:
    """True when the teacher's and the student's tokenizers are the same (same vocabulary and rules)."""
    from kdcore.tokenizer_utils import fingerprint, load_tokenizer

    for flag, path in (("--teacher_name", teacher_name), ("--student_name", student_name)):
        if not Path(path).is_dir():
            raise UserError(f"{flag} {path} is not a directory")
    return fingerprint(load_tokenizer(teacher_name, "teacher")) == fingerprint(load_tokenizer(student_name, "student"))


def fill_from_pipeline(a: argparse.Namespace) -> None:
    """Fill, in `a`, every data and artifact flag that the run reads and the command line left empty, from the
    `run_pipeline.py` output `a.pipeline_dir` (its `manifest.json` says which steps finished). An artifact that the
    run needs but the pipeline did not make is a one-line error naming the step that makes it."""
    pipe = PipelineDir(a.pipeline_dir)
    alpha_ce, alpha_mlm = default_alphas(a)
    kl, hidden = alpha_ce > 0, a.alpha_mse + a.alpha_cos + a.alpha_contrastive > 0
    wanted = ["binarized_data_folder", "student_name", "student_pretrained_weights"]
    if alpha_mlm > 0:
        wanted.append("student_token_counts")
    if kl or hidden:
        student = a.student_name or pipe.path("student_name")
        shared = bool(a.teacher_name) and shared_vocabulary(a.teacher_name, student)
        wanted += required_artifacts(alignment_config(a), kl, hidden, shared)
    for flag in wanted:
        if not getattr(a, flag):  # an explicit flag wins
            setattr(a, flag, pipe.path(flag))
