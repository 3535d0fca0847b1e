"""The training objective of `train_single` and `distil_teacher`:

    total = alpha_task * task + alpha_kl * distil + sum over hidden-state terms of alpha_h * term_h

- task: cross-entropy on the labels, or MSE on the score for STS-B (regression);
- distil (only with a teacher): `custom_step.kl_div_loss`, i.e. T^2 * KL(softmax(z_T/T) || softmax(z_S/T))
  averaged over the batch, on the classifier logits. A regression task has one output and no
  distribution, so for STS-B the distil term is the MSE between the student's and the teacher's predicted
  scores (the temperature does not apply). With `train_temperature` T is a learned scalar (stored as
  log T, initialised at `temperature`, optimised with the student);
- hidden-state terms (MSE, cosine, contrastive, hyperbolic contrastive): `hidden_terms.HiddenTerms`,
  called with both models' hidden states and the attention mask, weighted by its `alphas`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from glue_tasks import TaskSpec
from torch import Tensor, nn

from custom_step import kl_div_loss


def task_loss(spec: TaskSpec, logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy (classification, logits [B, C], int labels [B]) or MSE (regression, [B, 1] vs [B])."""
    if spec.regression:
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    return F.cross_entropy(logits.float(), labels)


class Objective(nn.Module):
    """Computes the weighted losses of one batch; its parameters (learned temperature, projections of the
    hidden terms) are trained with the student."""

    def __init__(self, spec: TaskSpec, alpha_task: float = 1.0, alpha_kl: float = 0.0, temperature: float = 1.0,
                 train_temperature: bool = False, hidden: nn.Module | None = None):
        super().__init__()
        self.spec, self.alpha_task, self.alpha_kl = spec, alpha_task, alpha_kl
        log_t = torch.tensor(math.log(temperature), dtype=torch.float32)
        if train_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        self.hidden = hidden

    @property
    def needs_teacher(self) -> bool:
        return self.alpha_kl > 0 or self.hidden is not None

    @property
    def needs_hidden_states(self) -> bool:
        return self.hidden is not None

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp()

    def curvature(self) -> float | None:
        """The curvature of the hyperbolic contrastive term, when there is one."""
        if self.hidden is None:
            return None
        from kdcore.hidden_projection import curvature_value

        return curvature_value(self.hidden)

    def distil_loss(self, teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
        """KL with temperature on the logits; MSE between predicted scores for regression."""
        if self.spec.regression:
            return F.mse_loss(student_logits.float().squeeze(-1), teacher_logits.detach().float().squeeze(-1))
        return kl_div_loss(teacher_logits, student_logits, self.temperature)

    def forward(self, student_out, labels: Tensor, teacher_out=None,
                attention_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(total loss, {part: detached 0-dim value}) for a batch; `*_out` are HF outputs (logits,
        hidden_states)."""
        parts: dict[str, Tensor] = {}
        total = student_out.logits.new_zeros((), dtype=torch.float32)
        if self.alpha_task > 0:
            parts["task"] = task_loss(self.spec, student_out.logits, labels)
            total = total + self.alpha_task * parts["task"]
        if self.alpha_kl > 0:
            name = "pred_mse" if self.spec.regression else "kl"
            parts[name] = self.distil_loss(teacher_out.logits, student_out.logits)
            total = total + self.alpha_kl * parts[name]
        if self.hidden is not None:
            terms = self.hidden(teacher_out.hidden_states, student_out.hidden_states, attention_mask)
            for name, value in terms.items():
                parts[name] = value
                total = total + self.hidden.alphas[name] * value
        return total, {name: value.detach() for name, value in parts.items()}
