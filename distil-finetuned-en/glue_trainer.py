"""The GLUE training loop shared by `train_single` and `distil_teacher`: batches, gradient accumulation,
validation on the dev set(s), early stopping, best-model keeping, TensorBoard scalars. What the loss is comes
from `glue_objective.Objective`; precision, AdamW and its step and the learning-rate schedule are the trainer
core's (`kdcore/trainer_core.py`, shared with `train.py`).

Schedule (`trainer_core.LrSchedule`): lr = base_lr x warm-up (linear over the first `warmup_prop` of the planned
updates) x decay (`linear`: down to 0 at the last planned update; `plateau`: 1) x drop factor. The drop factor is
divided by `lr_drop_div` after `lr_drop_patience` validations without a new best score (never below `min_lr`; a
`trainer_core.PlateauScaler` in mode "max"). Training stops after `valid_patience` validations without a new best
(0: never). Validation
runs every `log_after_n_steps` updates, after every epoch with `log_after_epoch`, and always after the last
update; the best model (highest selection score on the primary dev split) is handed to `on_best` and
restored into the model when training ends.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from glue_data import Collator, EncodedSplit
from glue_metrics import compute_metrics, predictions, selection_score
from glue_models import run_model
from glue_objective import Objective
from glue_tasks import TaskSpec
from torch import nn
from torch.utils.data import DataLoader

from kdcore.errors import UserError
from kdcore.trainer_core import (
    LrSchedule,
    PlateauScaler,
    autocast,
    build_optimizer,
    grad_scaler,
    optimizer_step,
)


@dataclass
class TrainConfig:
    """Optimisation settings (the CLI flags)."""

    lr: float = 5e-5
    weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    batch_size: int = 32
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    n_epochs: int = 3
    max_steps: int = 0
    max_grad_norm: float = 1.0
    log_after_n_steps: int = 0
    log_after_epoch: bool = True
    valid_patience: int = 0
    schedule: str = "plateau"
    warmup_prop: float = 0.0
    lr_drop_patience: int = 0
    lr_drop_div: float = 1.5
    min_lr: float = 0.0
    precision: str = "fp32"
    seed: int = 42


@dataclass
class TrainResult:
    """What training found: the best validation and the history of all of them."""

    best_step: int = -1
    best_epoch: int = -1
    best_score: float = -math.inf
    best_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    global_step: int = 0
    stopped_early: bool = False


@torch.no_grad()
def predict(model: nn.Module, data: EncodedSplit, collator: Collator, batch_size: int, device: torch.device,
            precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """Model outputs (fp32 logits [N, C]) and labels of every example, in order."""
    was_training = model.training
    model.eval()
    outputs, labels = [], []
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collator):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, precision):
            logits = run_model(model, batch).logits
        outputs.append(logits.float().cpu().numpy())
        labels.append(batch["labels"].cpu().numpy())
    model.train(was_training)
    return np.concatenate(outputs), np.concatenate(labels)


def evaluate(spec: TaskSpec, model: nn.Module, data: EncodedSplit, collator: Collator, batch_size: int,
             device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """The task's official metrics of `model` on `data`."""
    logits, labels = predict(model, data, collator, batch_size, device, precision)
    return compute_metrics(spec, predictions(spec, logits), labels)


def lr_schedule(cfg: TrainConfig, total_steps: int) -> LrSchedule:
    """The trainer core's schedule for the GLUE options: linear decay or plateau drops (by `lr_drop_div` after
    `lr_drop_patience` validations without a new best score, never below `min_lr`)."""
    plateau = None
    if cfg.schedule == "plateau" and cfg.lr_drop_patience > 0:
        plateau = PlateauScaler(cfg.lr, factor=1 / cfg.lr_drop_div, patience=cfg.lr_drop_patience - 1, cooldown=0,
                                threshold=0.0, min_lr=cfg.min_lr, mode="max")
    return LrSchedule(cfg.lr, total_steps, cfg.warmup_prop, "linear" if cfg.schedule == "linear" else "constant",
                      plateau)


class GlueTrainer:
    """Trains `model` (the student, or the only model) on `train_set` with `objective`; `teacher`, when
    given, runs frozen in eval mode on the same batches."""

    def __init__(self, spec: TaskSpec, model: nn.Module, objective: Objective, train_set: EncodedSplit,
                 dev_sets: dict[str, EncodedSplit], collator: Collator, cfg: TrainConfig, device: torch.device,
                 logger: logging.Logger, writer=None, on_best: Callable[[nn.Module], None] | None = None,
                 teacher: nn.Module | None = None, on_epoch_end: Callable[[int], None] | None = None):
        self.spec, self.model, self.objective, self.teacher = spec, model.to(device), objective.to(device), teacher
        self.train_set, self.dev_sets, self.collator, self.cfg = train_set, dev_sets, collator, cfg
        self.device, self.logger, self.writer, self.on_best = device, logger, writer, on_best
        self.on_epoch_end = on_epoch_end
        if teacher is not None:
            teacher.to(device).eval()
            teacher.requires_grad_(False)
        generator = torch.Generator().manual_seed(cfg.seed)
        self.loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, collate_fn=collator,
                                 generator=generator)
        self.updates_per_epoch = math.ceil(len(self.loader) / cfg.gradient_accumulation_steps)
        total = self.updates_per_epoch * cfg.n_epochs
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps > 0 else total
        self.schedule = lr_schedule(cfg, self.total_steps)
        params = list(model.named_parameters()) + list(objective.named_parameters())
        self.params = [p for _, p in params if p.requires_grad]
        self.optimizer = build_optimizer(params, cfg.lr, cfg.weight_decay, cfg.adam_epsilon)
        self.scaler = grad_scaler(device, cfg.precision)
        self.result = TrainResult()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_validations = 0

    # -- one update ---------------------------------------------------------------------------------------

    def _micro_step(self, batch: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> None:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        hidden = self.objective.needs_hidden_states
        with autocast(self.device, self.cfg.precision):
            teacher_out = None
            if self.teacher is not None and self.objective.needs_teacher:
                with torch.no_grad():
                    teacher_out = run_model(self.teacher, batch, hidden)
            student_out = run_model(self.model, batch, hidden)
            loss, parts = self.objective(student_out, batch["labels"], teacher_out, batch["attention_mask"])
        self.scaler.scale(loss / self.cfg.gradient_accumulation_steps).backward()
        for name, value in {"loss": loss.detach(), **parts}.items():
            sums[name] = sums.get(name, 0.0) + value

    def _optimizer_step(self) -> float:
        self.schedule.apply(self.optimizer, self.result.global_step)
        grad_norm = optimizer_step(self.optimizer, self.scaler, self.params, self.cfg.max_grad_norm)
        self.result.global_step += 1
        return grad_norm

    def _log_update(self, sums: dict[str, torch.Tensor], n_micro: int, grad_norm: float, lr: float) -> float:
        step = self.result.global_step
        values = {name: float(value) / n_micro for name, value in sums.items()}
        if not math.isfinite(values["loss"]):
            raise UserError(f"the training loss became {values['loss']} at update {step}; lower --lr or use fp32")
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", value, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/grad_norm", grad_norm, step)
            if self.objective.alpha_kl > 0 and not self.spec.regression:
                self.writer.add_scalar("train/temperature", float(self.objective.temperature.detach()), step)
            c = self.objective.curvature()
            if c is not None:
                self.writer.add_scalar("train/c", c, step)
        return values["loss"]

    # -- the loop -----------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        cfg, accum = self.cfg, self.cfg.gradient_accumulation_steps
        self.model.train()
        self.objective.train()
        self.logger.info(f"{len(self.train_set)} training examples, {self.updates_per_epoch} updates per epoch, "
                         f"{self.total_steps} updates planned on {self.device}")
        start, losses, validated_at = time.time(), [], -1
        stop = False
        for epoch in range(cfg.n_epochs):
            sums: dict[str, torch.Tensor] = {}
            n_micro = 0
            n_batches = len(self.loader)
            for i, batch in enumerate(self.loader):
                self._micro_step(batch, sums)
                n_micro += 1
                if n_micro < accum and i + 1 < n_batches:
                    continue
                lr = self.schedule.lr(self.result.global_step)
                grad_norm = self._optimizer_step()
                losses.append(self._log_update(sums, n_micro, grad_norm, lr))
                sums, n_micro = {}, 0
                step = self.result.global_step
                if cfg.log_after_n_steps > 0 and step % cfg.log_after_n_steps == 0:
                    stop = self._validate(epoch, losses, start)
                    losses, validated_at = [], step
                if stop or step >= self.total_steps:
                    break
            finished = self.result.global_step >= self.total_steps
            if self.on_epoch_end is not None and not stop and not finished:
                self.on_epoch_end(epoch + 1)
            if not stop and cfg.log_after_epoch and validated_at != self.result.global_step:
                stop = self._validate(epoch, losses, start)
                losses, validated_at = [], self.result.global_step
            if stop or self.result.global_step >= self.total_steps:
                break
        if validated_at != self.result.global_step:
            self._validate(epoch, losses, start)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.result.stopped_early = stop
        return self.result

    def _validate(self, epoch: int, losses: list[float], start: float) -> bool:
        """Evaluate on every dev split, keep the best model, adjust the lr; True means stop."""
        step = self.result.global_step
        metrics = {name: evaluate(self.spec, self.model, data, self.collator, self.cfg.eval_batch_size, self.device,
                                  self.cfg.precision) for name, data in self.dev_sets.items()}
        score = selection_score(self.spec, metrics[self.spec.primary_dev])
        improved = score > self.result.best_score
        lr = self.schedule.lr(max(0, step - 1))
        train_loss = float(np.mean(losses)) if losses else float("nan")
        self.result.history.append({"step": step, "epoch": epoch, "train_loss": train_loss, "lr": lr, "score": score,
                                    **metrics})
        if self.writer is not None:
            for split, values in metrics.items():
                for name, value in values.items():
                    self.writer.add_scalar(f"{split}/{name}", value, step)
            self.writer.add_scalar(f"{self.spec.primary_dev}/score", score, step)
        shown = "; ".join(f"{split} " + ", ".join(f"{k} {v:.4f}" for k, v in values.items())
                          for split, values in metrics.items())
        self.logger.info(f"update {step} (epoch {epoch + 1}, {time.time() - start:.0f}s): train loss {train_loss:.4f}, "
                         f"{shown}{' (best)' if improved else ''}")
        if improved:
            self.result.best_score, self.result.best_step, self.result.best_epoch = score, step, epoch
            self.result.best_metrics = metrics
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self.bad_validations = 0
            if self.on_best is not None:
                self.on_best(self.model)
        else:
            self.bad_validations += 1
        if self.schedule.on_validation(score):
            self.logger.info(f"no improvement for {self.cfg.lr_drop_patience} validations: lr divided by "
                             f"{self.cfg.lr_drop_div} to {self.schedule.lr(step):.3g}")
        if self.cfg.valid_patience > 0 and self.bad_validations >= self.cfg.valid_patience:
            self.logger.info(f"early stop: no improvement for {self.bad_validations} validations")
            return True
        return False
