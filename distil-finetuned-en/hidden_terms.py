"""Hidden-state distillation terms of `distil_teacher` (MSE, cosine, contrastive, hyperbolic contrastive).

The losses are the shared ones, built by the trainer core (`kdcore.trainer_core.hidden_config` and
`build_hidden_losses`: `hidden_projection.HiddenLosses` over the pure functions of `custom_step.py`, with the
Poincare-ball maths of `hyptorch/`); nothing is re-implemented here. In the GLUE setting teacher and student read
the same ids (one tokenizer), so the rows pair one to one (`kdcore.alignments.SharedPositions`): every real
position of every example, or one row per example with `--projection_strategy pool_and_project`.

Curvature (`hyperbolic` sub-command): fixed `--c`, trainable through one side's exponential map
(`--adjust_c train_exp_map_teacher|student`), estimated before training from the teacher's or the
student's outputs on the dev set (`--init_c precompute_from_teacher|student`: Gromov delta of
`--n_samples_to_precompute_c` vectors after PCA, `kdcore.trainer_core.fit_curvature`), and re-estimated
after every epoch with `--adjust_c recompute_after_epoch`. The vectors (`--delta_vectors`) are the last
hidden states at random real positions (default) or the classifier logits of random examples.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
from torch import Tensor, nn

from kdcore.alignments import SharedPositions
from kdcore.errors import UserError
from kdcore.trainer_core import (
    CurvatureConfig,
    build_hidden_losses,
    fit_curvature,
    hidden_config,
    hidden_weights,
)


class HiddenTerms(nn.Module):
    """forward(teacher_hidden, student_hidden, attention_mask) -> {"mse" | "cos" | "contrastive": loss}:
    the enabled terms (each the mean over layer pairs), unweighted; `alphas` holds their weights.
    teacher_hidden / student_hidden: HF `hidden_states` tuples (embeddings + every layer, [B, L, D]);
    attention_mask [B, L] (1 = real position)."""

    def __init__(self, losses: nn.Module, alphas: dict[str, float]):
        super().__init__()
        self.losses, self.alphas = losses, alphas

    def forward(self, teacher_hidden, student_hidden, attention_mask: Tensor) -> dict[str, Tensor]:
        out = self.losses({"s_mask": attention_mask.bool()}, teacher_hidden, student_hidden)
        return {name.removeprefix("loss_"): value for name, value in out.items()}


def validate(a: argparse.Namespace) -> None:
    """One-line errors for inconsistent hidden-state and hyperbolic options."""
    from kdcore.hidden_args import validate_hidden_losses

    hyperbolic = a.hidden_distil_type == "hyperbolic"
    if hyperbolic and a.alpha_contrastive <= 0:
        raise UserError("hyperbolic is the hyperbolic variant of the contrastive loss: set --alpha_contrastive > 0")
    if not hidden_weights(a):
        return
    validate_hidden_losses(a, row="example")


def build_hidden_terms(a: argparse.Namespace, teacher_config, student_config, n_train: int) -> HiddenTerms | None:
    """The hidden-state terms for the arguments (None when none is asked for): the trainer core's builders, with
    shared positions (teacher and student read the same ids)."""
    cfg = hidden_config(a, n_train)
    if cfg is None:
        return None
    return HiddenTerms(build_hidden_losses(cfg, SharedPositions(), teacher_config, student_config), hidden_weights(a))


# ---------------------------------------------------------------------------------------------------------
# Curvature from the models' outputs
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_vectors(model: nn.Module, data, collator, n_samples: int, batch_size: int, device: torch.device,
                   seed: int, vectors: str = "hidden") -> Tensor:
    """fp32 CPU [n, D] output vectors of `model` on `data` (an EncodedSplit): last hidden states at up to
    `n_samples` random real positions ("hidden"), or the logits of up to `n_samples` random examples
    ("logits"). Examples are visited in a random order (numpy `default_rng(seed)`)."""
    from glue_models import run_model

    from delta import sample_rows

    def rows_of(indices: np.ndarray) -> Tensor:
        batch = {k: v.to(device) for k, v in collator([data[int(i)] for i in indices]).items()}
        out = run_model(model, batch, hidden_states=vectors == "hidden")
        return out.hidden_states[-1][batch["attention_mask"].bool()] if vectors == "hidden" else out.logits

    return sample_rows(model, len(data), rows_of, n_samples, batch_size, seed)


def estimate_curvature(a: argparse.Namespace, hidden: HiddenTerms, teacher: nn.Module, student: nn.Module, data,
                       collator, device: torch.device, logger: logging.Logger, epoch: int = 0) -> float:
    """Estimate c from the teacher's (--init_c precompute_from_teacher) or else the student's outputs on `data`
    (`sample_vectors`), set it in the hyperbolic layers of `hidden` and return it (`trainer_core.fit_curvature`)."""
    cfg = CurvatureConfig.from_args(a)
    model = teacher if cfg.side == "teacher" else student
    x = sample_vectors(model, data, collator, cfg.n_samples, a.batch_size, device, cfg.seed + epoch, cfg.delta_vectors)
    return fit_curvature(hidden.losses, x, cfg, epoch, logger)
