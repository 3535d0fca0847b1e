"""Dual-Space Knowledge Distillation with cross-model attention (DSKD, Zhang et al., 2024), for masked LMs whose
vocabularies differ (`--align_logits dskd`).

No span matching and no vocabulary map: a learned cross-model attention aligns every student token with the
teacher's tokens of the same text, and each model's distribution is compared in the other's output space.

- **Queries and keys**: every token is described by the word embeddings of itself and of the token after it
  (`token_pairs`; in the causal LMs of the paper, the input and the target token; zeros after the last real
  token). Queries: the student's pair embeddings [2 D_S] through a trainable linear map to [2 D_T]; keys: the
  teacher's pair embeddings [2 D_T], standardised per row (no parameters). Both embedding tables stay frozen for
  this term (detached), so the attention is learned by the projections alone.
- **Teacher -> student** (`DualSpace.align`): a [B, L_S, L_T] = softmax over the teacher's real tokens of
  Q K^T / sqrt(2 D_T); h_t2s = a P_t2s(h_T) [B, L_S, D_S], the teacher's last hidden states projected into the
  student's space (P_t2s: trainable linear D_T -> D_S) and attended onto the student's tokens.
- **Student -> teacher**: a' [B, L_T, L_S] = softmax over the student's real tokens of K Q^T / sqrt(2 D_T);
  h_s2t = a' P_s2t(h_S) [B, L_T, D_T] (P_s2t: trainable linear D_S -> D_T).
- **Terms** (`DualSpace.forward`), at temperature T, all weighted by `--alpha_ce`:
  `loss_ce`: T^2 KL(teacher || teacher head(h_s2t)) at every real teacher position over the teacher's whole
  vocabulary (the teacher-space term: the gradient reaches the student through P_s2t and the frozen teacher head);
  `loss_kl_student_space`: T^2 KL(student head(h_t2s) || student) at every real student position over the student's
  vocabulary (the student-space term; the projected teacher is a fixed target here);
  `loss_projector_ce`: the cross-entropy of student head(h_t2s) against the student's original tokens, which trains
  P_t2s and the attention so that the projected teacher predicts the text (the student's head is frozen for it).

Departures for encoders: the teacher reads its own unmasked tokens and the student its MLM-masked ones (as with
every cross-vocabulary alignment here); queries and keys describe the original (unmasked) tokens; the student and
teacher heads are the full MLM heads (transform, LayerNorm, decoder).

The projections are a submodule of the trained `StudentRunner`: optimised and synchronised with the student, saved
in checkpoints, and left out of the exported student.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from custom_step import kl_div_loss, mlm_loss

EXTRA_TERMS = ("loss_kl_student_space", "loss_projector_ce")
"""The terms `DualSpace` adds besides the teacher-space KL (`loss_ce`); weighted by `--alpha_ce` like it."""


def token_pairs(embeddings: Tensor, mask: Tensor) -> Tensor:
    """[B, L, D] embeddings of a batch, mask bool [B, L] (real tokens) -> [B, L, 2 D]: each token's embedding
    followed by the next real token's (zeros after the last real token and at padding)."""
    real = embeddings * mask.unsqueeze(-1).to(embeddings.dtype)
    following = F.pad(real[:, 1:], (0, 0, 0, 1))
    return torch.cat([real, following], dim=-1)


def standardise(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Every row of x [..., D] shifted to mean 0 and scaled to variance 1 (no parameters)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def cross_model_attention(queries: Tensor, keys: Tensor, values: Tensor, key_mask: Tensor) -> Tensor:
    """softmax(queries keys^T / sqrt(D)) values over the real keys, per sequence.

    queries [B, Lq, D], keys [B, Lk, D], values [B, Lk, E], key_mask bool [B, Lk] (at least one real key per
    sequence). Returns [B, Lq, E] in values' dtype; the scores and the softmax are computed in fp32."""
    scores = torch.bmm(queries.float(), keys.float().transpose(1, 2)) / math.sqrt(queries.shape[-1])
    scores = scores.masked_fill(~key_mask.unsqueeze(1), float("-inf"))
    return torch.bmm(scores.softmax(-1).to(values.dtype), values)


class DualSpace(nn.Module):
    """The trainable part of DSKD: the query map (2 D_S -> 2 D_T) and the two hidden-state projections
    (D_T -> D_S, D_S -> D_T), with the frozen teacher it reads (held outside the module's parameters, so that it is
    neither trained, synchronised nor checkpointed with the student)."""

    def __init__(self, teacher: nn.Module, student_dim: int, teacher_dim: int):
        super().__init__()
        self.query = nn.Linear(2 * student_dim, 2 * teacher_dim)
        self.t2s = nn.Linear(teacher_dim, student_dim)
        self.s2t = nn.Linear(student_dim, teacher_dim)
        self._frozen = (teacher,)  # a tuple: not registered as a submodule

    @property
    def teacher(self) -> nn.Module:
        return self._frozen[0]

    def align(self, s_hidden: Tensor, t_hidden: Tensor, s_embeds: Tensor, t_embeds: Tensor, s_mask: Tensor,
              t_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(h_t2s [B, L_S, D_S], h_s2t [B, L_T, D_T]) from the models' last hidden states s_hidden [B, L_S, D_S],
        t_hidden [B, L_T, D_T], their word embeddings of the original tokens s_embeds [B, L_S, D_S], t_embeds
        [B, L_T, D_T] (no gradient is taken into them) and their real-token masks (bool)."""
        queries = self.query(token_pairs(s_embeds.detach(), s_mask))
        keys = standardise(token_pairs(t_embeds.detach(), t_mask))
        t2s = cross_model_attention(queries, keys, self.t2s(t_hidden.detach()), t_mask)
        s2t = cross_model_attention(keys, queries, self.s2t(s_hidden), s_mask)
        return t2s, s2t

    def forward(self, student: nn.Module, s_hidden: Tensor, t_hidden: Tensor, batch: dict[str, Tensor],
                temperature: float) -> dict[str, Tensor]:
        """The student's outputs of one step: `kl_student` [N_T, V_T] (the teacher head's logits of h_s2t at every
        real teacher position, compared with the teacher's logits by `loss_ce`) and the terms `EXTRA_TERMS`.

        student: the student *ForMaskedLM; s_hidden [B, L_S, D_S]: its last hidden states on its (masked) input;
        t_hidden [B, L_T, D_T]: the teacher's on its own tokens; batch: `s_ids`, `s_mask`, `t_ids`, `t_mask`."""
        from kdcore.step_runner import head_logits

        s_mask, t_mask = batch["s_mask"].bool(), batch["t_mask"].bool()
        s_embeds = student.get_input_embeddings()(batch["s_ids"])
        t_embeds = self.teacher.get_input_embeddings()(batch["t_ids"])
        t2s, s2t = self.align(s_hidden, t_hidden, s_embeds, t_embeds, s_mask, t_mask)
        student_logits = head_logits(student, s_hidden[s_mask])
        projected = head_logits(student, t2s[s_mask], frozen=True)
        return {
            "kl_student": head_logits(self.teacher, s2t[t_mask]),
            "loss_kl_student_space": kl_div_loss(projected.detach(), student_logits, temperature),
            "loss_projector_ce": mlm_loss(projected, batch["s_ids"][s_mask]),
        }


def build_dual_space(teacher: nn.Module, student: nn.Module) -> DualSpace:
    """A `DualSpace` for two HF masked LMs (hidden sizes from their word embeddings)."""
    return DualSpace(teacher, student.get_input_embeddings().embedding_dim,
                     teacher.get_input_embeddings().embedding_dim)

