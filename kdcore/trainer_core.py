"""The trainer core shared by `distiller.Distiller` (pretraining distillation, `train.py`) and the GLUE trainer
(`distil-finetuned-en/`): one implementation of each of

- precision: `PRECISIONS`, `autocast`, `grad_scaler` (native AMP; fp16 with a GradScaler),
  `store_linears_in` (a frozen teacher's Linears stored once in its autocast dtype);
- the optimizer: `build_optimizer` (AdamW, fused where possible, no weight decay on biases, norms and scalars)
  and `optimizer_step` (unscale, clip, step, scaler update, zero the gradients), also in two halves:
  `clip_gradients` then `apply_update` or `discard_update` (for a caller that decides between them);
- the learning-rate schedule: `LrSchedule` = base lr x linear warm-up x (constant or linear decay) x a
  ReduceLROnPlateau factor (`PlateauScaler`) driven by validations;
- the hidden-state losses from the command line: `hidden_config` (the shared `--alpha_mse/cos/contrastive`,
  layer, projection, contrastive and hyperbolic flags) and `build_hidden_losses`;
- the curvature of the hyperbolic contrastive loss: `CurvatureConfig` and `fit_curvature` (Gromov delta of
  sampled output vectors, averaged over processes, set in the hyperbolic head, logged).
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kdcore.errors import UserError
from utils import adamw

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""`--precision` choices -> autocast dtype (None: no autocast)."""


def autocast(device: torch.device, precision: str):
    """The autocast context of `precision` on `device` (a no-op context for fp32)."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def store_linears_in(model: nn.Module, precision: str) -> int:
    """Store every `nn.Linear` weight and bias of a frozen `model` in the autocast dtype of `precision` (bf16,
    fp16; fp32 changes nothing), once. Autocast casts a parameter that does not require a gradient again at every
    call (its cast cache holds only tensors that require one), which at the user's size is ~1 GB of memory traffic
    per teacher forward; under autocast of the same precision the outputs are bit-identical, because autocast would
    cast those same fp32 values to the same dtype. A weight shared with another module (BERT's decoder, tied to the
    word embeddings) is replaced by a copy in the Linear only; the other module keeps its fp32 tensor. Call it only
    when every use of the model's Linears runs under that autocast. Returns the number of values converted."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return 0
    converted = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        for name in ("weight", "bias"):
            param = getattr(module, name)
            if param is not None and param.dtype != dtype:
                setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=False))
                converted += param.numel()
    return converted


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def build_optimizer(named_parameters: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float, eps: float,
                    betas: tuple[float, float] = (0.9, 0.999),
                    lr_scales: dict[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (fused where `utils.adamw` can): weight decay on matrices, none on
    biases, norms and scalars (parameters with fewer than 2 dimensions). lr_scales: {parameter-name prefix:
    learning-rate multiplier} (the first matching prefix; others 1); each group records its `lr_scale`, which
    `LrSchedule.apply` keeps."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in named_parameters:
        if param.requires_grad:
            scale = next((v for prefix, v in (lr_scales or {}).items() if name.startswith(prefix)), 1.0)
            groups.setdefault((scale, param.ndim >= 2), []).append(param)
    ordered = sorted(groups.items(), key=lambda item: (item[0][0] != 1.0, item[0][0], not item[0][1]))
    return adamw([{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale,
                   "lr_scale": scale} for (scale, decay), params in ordered], lr=lr, betas=betas, eps=eps)


def clip_gradients(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: Iterable[nn.Parameter],
                   max_grad_norm: float) -> torch.Tensor:
    """Unscale the accumulated gradients (fp16) and clip them to `max_grad_norm`; returns their total norm before
    clipping (a 0-dim tensor, NaN/inf when a gradient is). Follow with `apply_update` or `discard_update`."""
    scaler.unscale_(optimizer)
    return torch.nn.utils.clip_grad_norm_(params, max_grad_norm)


def apply_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Step (skipped by the scaler on inf/NaN fp16 gradients), update the scaler, zero the gradients."""
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def discard_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Drop the accumulated gradients without stepping. An fp16 scaler that unscaled them still updates its scale
    (backing off when they overflowed), which also readies it for the next `clip_gradients`."""
    if scaler.is_enabled():
        scaler.update()
    optimizer.zero_grad(set_to_none=True)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: Iterable[nn.Parameter],
                   max_grad_norm: float) -> float:
    """One update from the accumulated gradients: unscale, clip to `max_grad_norm`, step (skipped by the scaler on
    inf/NaN gradients), update the scaler, zero the gradients. Returns the gradient norm before clipping."""
    norm = clip_gradients(optimizer, scaler, params, max_grad_norm)
    apply_update(optimizer, scaler)
    return float(norm)


class PlateauScaler:
    """ReduceLROnPlateau as a multiplicative factor (so that it composes with warm-up and decay): a value counts as
    an improvement when it beats the best by the relative `threshold` (mode "min": lower is better, "max": higher);
    after more than `patience` validations without one, the factor is multiplied by `factor` (never making the
    learning rate fall below `min_lr`), then `cooldown` validations are not counted."""

    def __init__(self, base_lr: float, factor: float = 0.5, patience: int = 3, cooldown: int = 3,
                 threshold: float = 1e-2, min_lr: float = 1e-6, mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be min or max, got {mode!r}")
        self.base_lr, self.factor, self.patience, self.mode = base_lr, factor, patience, mode
        self.cooldown, self.threshold, self.min_lr = cooldown, threshold, min_lr
        self.scale, self.best, self.bad, self.cooldown_left = 1.0, math.inf if mode == "min" else -math.inf, 0, 0

    def _improves(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best * (1 - self.threshold)
        return value > self.best * (1 + self.threshold if self.best >= 0 else 1 - self.threshold)

    def step(self, value: float) -> bool:
        """Record a validation value; returns True when the factor was reduced."""
        if self._improves(value):
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad = 0
        if self.bad > self.patience:
            new = max(self.scale * self.factor, self.min_lr / self.base_lr)
            reduced = new < self.scale
            self.scale, self.cooldown_left, self.bad = new, self.cooldown, 0
            return reduced
        return False

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "bad": self.bad, "cooldown_left": self.cooldown_left}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.best = state["scale"], state["best"]
        self.bad, self.cooldown_left = state["bad"], state["cooldown_left"]


class LrSchedule:
    """lr(step) = base_lr x warm-up x decay x plateau factor, for the 0-based update `step`.

    Warm-up: linear from 1/W to 1 over the first W = ceil(warmup_prop x total_steps) updates. Decay: "constant", or
    "linear" from 1 at the end of the warm-up down to 0 at the last planned update. Plateau: a `PlateauScaler` fed
    by `on_validation`, or None."""

    def __init__(self, base_lr: float, total_steps: int, warmup_prop: float = 0.0, decay: str = "constant",
                 plateau: PlateauScaler | None = None):
        if decay not in ("constant", "linear"):
            raise ValueError(f"decay must be constant or linear, got {decay!r}")
        self.base_lr, self.total, self.decay, self.plateau = base_lr, max(1, total_steps), decay, plateau
        self.warmup = math.ceil(warmup_prop * self.total)

    def lr(self, step: int) -> float:
        factor = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        if self.decay == "linear" and step >= self.warmup:
            factor *= max(0.0, (self.total - step) / max(1, self.total - self.warmup))
        return self.base_lr * factor * (self.plateau.scale if self.plateau is not None else 1.0)

    def on_validation(self, value: float) -> bool:
        """Feed a validation value to the plateau factor (non-finite values are ignored); True when it dropped."""
        if self.plateau is None or not math.isfinite(value):
            return False
        return self.plateau.step(value)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set the learning rate of update `step` in every parameter group (times the group's `lr_scale`, see
        `build_optimizer`); returns it."""
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr


# ---------------------------------------------------------------------------------------------------------
# Hidden-state losses and curvature from the command line (both CLIs share these flags, see hidden_args.py)
# ---------------------------------------------------------------------------------------------------------

HIDDEN_TERMS = ("mse", "cos", "contrastive")


def hidden_weights(a: argparse.Namespace) -> dict[str, float]:
    """{term: alpha} of the enabled hidden-state terms (`--alpha_mse`, `--alpha_cos`, `--alpha_contrastive`)."""
    return {name: getattr(a, f"alpha_{name}") for name in HIDDEN_TERMS if getattr(a, f"alpha_{name}", 0.0) > 0}


def hidden_config(a: argparse.Namespace, n_train: int | None):
    """The `hidden_projection.HiddenConfig` of the command line, or None when no hidden-state term is on.

    n_train: training rows over all processes, for the NCE constant 1 / n_train of `--add_neg_size_constant` (None:
    not known yet, the caller sets `noise_prob` later). The contrastive
    temperature is `--contrastive_temperature`, or `--temperature` when it is not given."""
    from kdcore.hidden_projection import HiddenConfig, HyperbolicConfig, parse_layer_ids

    weights = hidden_weights(a)
    if not weights:
        return None
    hyperbolic = None
    if a.hidden_distil_type == "hyperbolic":
        hyperbolic = HyperbolicConfig(c=a.c, adjust_c=a.adjust_c, riemannian=a.riemannian, train_x=a.train_x,
                                      use_hyperbolic_projections=a.use_hyperbolic_projections, use_bias=a.use_bias)
    return HiddenConfig(
        losses=tuple(weights), strategy=a.projection_strategy,
        layer_ids=parse_layer_ids(a.t_s_layers_ids) if a.projection_strategy == "select_by_ids" else None,
        project_to=a.project_to, intermediate_dim=a.intermediate_dim, train_projections=a.train_projections,
        train_weights=a.train_weights, n_negatives=a.n_negative_samples, negative_strategy=a.negative_sampling_strategy,
        teacher_student_prop=a.teacher_student_prop,
        temperature=a.contrastive_temperature if a.contrastive_temperature is not None else a.temperature,
        from_one_sample=a.from_one_sample, use_mismatched_ids=getattr(a, "use_mismatched_ids", False),
        noise_prob=1.0 / max(n_train, 1) if a.add_neg_size_constant and n_train is not None else 0.0,
        hyperbolic=hyperbolic)


def build_hidden_losses(cfg, positions, teacher_config, student_config):
    """`hidden_projection.HiddenLosses` for two HF configs (one-line error when the layer choice does not fit)."""
    from kdcore.hidden_projection import HiddenLosses

    t, s = teacher_config, student_config
    try:
        return HiddenLosses(cfg, positions, t.num_hidden_layers, s.num_hidden_layers, t.hidden_size, s.hidden_size)
    except ValueError as err:
        raise UserError(f"{err} (teacher {t.num_hidden_layers} layers, student {s.num_hidden_layers})") from None


@dataclass(frozen=True)
class CurvatureConfig:
    """How the curvature of the hyperbolic contrastive loss is estimated (`hyperbolic --init_c ...`): from the
    teacher's or the student's output vectors (`delta_vectors`: MLM logits / classifier logits or last hidden
    states), `n_samples` of them after PCA to `n_components`, averaged over `n_tries` random subsets;
    `initial`: once before training (`--init_c`); `recompute_after_epoch`: again after every epoch."""

    side: str
    n_samples: int
    n_components: int
    n_tries: int
    delta_vectors: str
    initial: bool
    recompute_after_epoch: bool
    seed: int

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> CurvatureConfig | None:
        """None unless the hyperbolic sub-command asks for an estimate (`--init_c` or `--adjust_c
        recompute_after_epoch`)."""
        if a.hidden_distil_type != "hyperbolic" or not (a.init_c or a.adjust_c == "recompute_after_epoch"):
            return None
        return cls("teacher" if a.init_c == "precompute_from_teacher" else "student", a.n_samples_to_precompute_c,
                   a.n_components, a.n_tries, a.delta_vectors, a.init_c is not None,
                   a.adjust_c == "recompute_after_epoch", a.seed)


def fit_curvature(hidden: nn.Module, vectors: torch.Tensor, cfg: CurvatureConfig, epoch: int,
                  logger: logging.Logger | None, device: torch.device | None = None, distributed: bool = False) -> float:
    """Estimate c from `vectors` (fp32 [n, D], see `hyptorch.delta.estimate_curvature`), average it over the
    processes when `distributed`, set it in the hyperbolic head of `hidden` (a `HiddenLosses`) and log it."""
    from hyptorch.delta import estimate_curvature

    if vectors.shape[0] < 2:
        raise UserError(f"only {vectors.shape[0]} output vectors to estimate the curvature from; it needs at least 2 "
                        "(use more data or a larger validation split)")
    seed = cfg.seed + epoch
    try:
        c, details = estimate_curvature(vectors, n_components=cfg.n_components, n_tries=cfg.n_tries,
                                        n_samples=cfg.n_samples, seed=seed)
    except ValueError as err:
        raise UserError(f"cannot estimate the curvature from the {cfg.side}'s {cfg.delta_vectors} vectors: {err}") \
            from None
    if distributed:
        import torch.distributed as dist

        value = torch.tensor([c], dtype=torch.float64, device=device)
        dist.all_reduce(value)
        c = float(value.item()) / dist.get_world_size()
    hidden.hyperbolic.set_curvature(c)
    if logger is not None:
        logger.info(f"curvature c = {c:.6g} from {vectors.shape[0]} {cfg.side} {cfg.delta_vectors} vectors (relative "
                    f"delta {np.mean(details['delta_rel']):.4g}, PCA {details['n_components']} components)"
                    f"{f' after epoch {epoch}' if epoch else ''}")
    return c
