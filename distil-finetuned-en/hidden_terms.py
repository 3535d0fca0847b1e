"""Hidden-state distillation terms of `distil_teacher` (MSE, cosine, contrastive, hyperbolic contrastive).

The losses are the shared ones: `hidden_projection.HiddenLosses` (layer strategies, projections, the
hyperbolic head) over the pure functions of `custom_step.py`, with the Poincare-ball maths of `hyptorch/`;
nothing is re-implemented here. In the GLUE setting teacher and student read the same ids (one tokenizer),
so the rows are aligned one to one: every real position of every example ("shared" alignment), or one row
per example with `--projection_strategy pool_and_project`.

Curvature (`hyperbolic` sub-command): fixed `--c`, trainable through one side's exponential map
(`--adjust_c train_exp_map_teacher|student`), estimated before training from the teacher's or the
student's outputs on the dev set (`--init_c precompute_from_teacher|student`: Gromov delta of
`--n_samples_to_precompute_c` vectors after PCA, `hyptorch.delta.estimate_curvature`), and re-estimated
after every epoch with `--adjust_c recompute_after_epoch`. The vectors (`--delta_vectors`) are the last
hidden states at random real positions (default) or the classifier logits of random examples.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
from torch import Tensor, nn

from kdcore.errors import UserError

TERMS = ("mse", "cos", "contrastive")


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


def alphas(a: argparse.Namespace) -> dict[str, float]:
    """The weights of the enabled hidden-state terms."""
    return {name: getattr(a, f"alpha_{name}") for name in TERMS if getattr(a, f"alpha_{name}", 0.0) > 0}


def validate(a: argparse.Namespace) -> None:
    """One-line errors for inconsistent hidden-state and hyperbolic options."""
    from kdcore.hidden_args import validate_hidden_losses

    hyperbolic = a.hidden_distil_type == "hyperbolic"
    if hyperbolic and a.alpha_contrastive <= 0:
        raise UserError("hyperbolic is the hyperbolic variant of the contrastive loss: set --alpha_contrastive > 0")
    if not alphas(a):
        return
    validate_hidden_losses(a, row="example")


def build_hidden_terms(a: argparse.Namespace, teacher_config, student_config, n_train: int) -> HiddenTerms | None:
    """The hidden-state terms for the arguments (None when none is asked for)."""
    weights = alphas(a)
    if not weights:
        return None
    from kdcore.hidden_projection import HiddenConfig, HiddenLosses, HyperbolicConfig, parse_layer_ids

    hyperbolic = None
    if a.hidden_distil_type == "hyperbolic":
        hyperbolic = HyperbolicConfig(c=a.c, adjust_c=a.adjust_c, riemannian=a.riemannian, train_x=a.train_x,
                                      use_hyperbolic_projections=a.use_hyperbolic_projections, use_bias=a.use_bias)
    cfg = HiddenConfig(
        losses=tuple(weights), align="shared", strategy=a.projection_strategy,
        layer_ids=parse_layer_ids(a.t_s_layers_ids) if a.projection_strategy == "select_by_ids" else None,
        project_to=a.project_to, intermediate_dim=a.intermediate_dim, train_projections=a.train_projections,
        train_weights=a.train_weights, n_negatives=a.n_negative_samples,
        negative_strategy=a.negative_sampling_strategy, teacher_student_prop=a.teacher_student_prop,
        temperature=a.contrastive_temperature, from_one_sample=a.from_one_sample,
        noise_prob=1.0 / max(n_train, 1) if a.add_neg_size_constant else 0.0, hyperbolic=hyperbolic)
    t, s = teacher_config, student_config
    try:
        losses = HiddenLosses(cfg, t.num_hidden_layers, s.num_hidden_layers, t.hidden_size, s.hidden_size)
    except ValueError as err:
        raise UserError(f"{err} (teacher {t.num_hidden_layers} layers, student {s.num_hidden_layers})") from None
    return HiddenTerms(losses, weights)


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
    """Estimate c from the teacher's (--init_c precompute_from_teacher) or else the student's outputs on
    `data`, set it in the hyperbolic layers of `hidden` and return it."""
    from hyptorch.delta import estimate_curvature as from_vectors

    side = "teacher" if a.init_c == "precompute_from_teacher" else "student"
    model = teacher if side == "teacher" else student
    x = sample_vectors(model, data, collator, a.n_samples_to_precompute_c, a.batch_size, device, a.seed + epoch,
                       a.delta_vectors)
    if x.shape[0] < 2:
        raise UserError(f"only {x.shape[0]} output vectors to estimate the curvature from; it needs at least 2")
    try:
        c, details = from_vectors(x, n_components=a.n_components, n_tries=a.n_tries,
                                  n_samples=a.n_samples_to_precompute_c, seed=a.seed + epoch)
    except ValueError as err:
        raise UserError(f"cannot estimate the curvature from the {side}'s {a.delta_vectors} vectors: {err}") from None
    hidden.losses.hyperbolic.set_curvature(c)
    logger.info(f"curvature c = {c:.6g} from {x.shape[0]} {side} {a.delta_vectors} vectors (relative delta "
                f"{np.mean(details['delta_rel']):.4g}, PCA {details['n_components']} components)"
                f"{f' after epoch {epoch}' if epoch else ''}")
    return c

