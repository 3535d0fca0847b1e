"""The forward passes of one distillation step: which positions and vocabulary columns each loss reads,
the student's and the teacher's runs restricted to them, and the weighted sum of the losses.

`StudentRunner` is the one `nn.Module` the trainer wraps in DDP: a single forward call does every student
pass of the step (the MLM pass on the student's own masked tokens and, for reduce alignment, the pass on
the t2s sequence), so DDP sees one forward per backward. Logits are computed only at the rows a loss
reads and only for the columns it reads; no full-vocabulary logits elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from custom_step import IGNORE_INDEX, kl_div_loss, lm_head_logits, mlm_loss, reduce_map_logits, reduce_pool
from kdcore.errors import UserError

ALIGNMENTS = ("match", "reduce", "reduce_map", "shared")
HIDDEN_LOSS_NAMES = ("loss_mse", "loss_cos", "loss_contrastive")


def base_model(model: nn.Module) -> nn.Module:
    """The encoder of a *ForMaskedLM model (DistilBertModel, BertModel, ...)."""
    return model.base_model


def head_transform(model: nn.Module):
    """The MLM head's hidden->hidden transform (dense, activation, LayerNorm) of a BERT or DistilBERT."""
    if hasattr(model, "vocab_transform"):
        return lambda h: model.vocab_layer_norm(model.activation(model.vocab_transform(h)))
    if hasattr(model, "cls") and hasattr(model.cls, "predictions"):
        return model.cls.predictions.transform
    raise UserError(f"{type(model).__name__} has no BERT/DistilBERT MLM head; use a BertForMaskedLM or "
                    "DistilBertForMaskedLM")


def output_layer(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight [V, D], bias [V]) of the output projection onto the vocabulary."""
    decoder = model.get_output_embeddings()
    return decoder.weight, decoder.bias


@dataclass
class KLPlan:
    """What the KL term compares.

    align: "match" (matched positions x matched columns), "reduce" (t2s pass pooled onto teacher positions,
    matched columns), "reduce_map" (t2s pass pooled, all student columns mapped onto teacher tokens) or
    "shared" (one vocabulary: teacher and student read the same masked ids; every non-pad position, or
    only the MLM targets with `restrict_to_mask`, over all columns).
    s_columns: int64 [K] student columns (None = all); t_columns: int64 [K'] teacher columns (matched ids,
    `t2s_mapped_ids` for reduce_map, None = all); t2s_padded: int64 [V_T, S] (reduce_map only).
    """

    align: str
    temperature: float
    t_columns: Tensor | None = None
    s_columns: Tensor | None = None
    average: bool = False
    t2s_padded: Tensor | None = None
    sum_probs: bool = False
    impl: str = "sparse"
    s2t_padded: Tensor | None = None
    s2t_idxs_padded: Tensor | None = None
    map_matrix: Tensor | None = None
    restrict_to_mask: bool = False

    @property
    def needs_t2s(self) -> bool:
        return self.align in ("reduce", "reduce_map")

    def teacher_rows(self, batch: dict[str, Tensor], labels: Tensor | None = None) -> Tensor:
        """bool [B, L]: the teacher positions the KL reads (`labels` [B, L]: the MLM targets, shared only)."""
        if self.align == "shared":
            return labels != IGNORE_INDEX if self.restrict_to_mask else batch["s_mask"]
        return batch["t_match"] if self.align == "match" else batch["t_mask"]

    def to(self, device: torch.device) -> KLPlan:
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(self).items()}
        return KLPlan(**moved)


class StudentRunner(nn.Module):
    """Every student pass of a step, returning only what the losses read.

    forward(batch, masked_ids, labels, teacher_states=None) returns a dict with
    - `mlm_logits` [M, V_S], `mlm_labels` [M]: at the MLM targets (when mlm is on);
    - `kl_student` [N, K]: the student's scores aligned with the teacher rows of `KLPlan.teacher_rows`
      (when a KL plan is given);
    - `loss_mse`, `loss_cos`, `loss_contrastive`: the hidden-state terms of `hidden`
      (`hidden_projection.HiddenLosses`, when given; it needs the teacher's hidden states `teacher_states`).
      The student's hidden states are requested only then, from the pass the alignment names (its own
      tokens for match / shared, the t2s pass for reduce, shared with the KL when the KL runs it too).
    `hidden` is a submodule, so its projections, layer weights and hyperbolic layers are optimised, synced by
    DDP and checkpointed with the student.
    """

    def __init__(self, student: nn.Module, mlm: bool, kl: KLPlan | None, hidden: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.mlm = mlm
        self.kl = kl
        self.hidden = hidden
        self.transform = head_transform(student)

    def _logits(self, hidden: Tensor, columns: Tensor | None) -> Tensor:
        weight, bias = output_layer(self.student)
        return lm_head_logits(self.transform(hidden), weight, bias, columns)

    def forward(self, batch: dict[str, Tensor], masked_ids: Tensor, labels: Tensor,
                teacher_states: tuple[Tensor, ...] | None = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        encoder = base_model(self.student)
        kl = self.kl
        if kl is not None and kl.align == "shared":
            return self._shared(batch, masked_ids, labels, teacher_states)
        hid = self.hidden
        native_states = hid is not None and not hid.needs_t2s
        t2s_states = hid is not None and hid.needs_t2s
        student_states = None
        if self.mlm or (kl is not None and kl.align == "match") or native_states:
            enc = encoder(input_ids=masked_ids, attention_mask=batch["s_mask"], output_hidden_states=native_states)
            hidden, student_states = enc.last_hidden_state, enc.hidden_states
            if self.mlm:
                targets = labels != IGNORE_INDEX
                out["mlm_logits"] = self._logits(hidden[targets], None)
                out["mlm_labels"] = labels[targets]
            if kl is not None and kl.align == "match":
                out["kl_student"] = self._logits(hidden[batch["s_match"]], kl.s_columns)
        if (kl is not None and kl.needs_t2s) or t2s_states:
            enc = encoder(input_ids=batch["t2s_ids"], attention_mask=batch["t2s_mask"], output_hidden_states=t2s_states)
            student_states = enc.hidden_states if t2s_states else student_states
        if kl is not None and kl.needs_t2s:
            hidden = enc.last_hidden_state
            rows = batch["t2s_mask"]
            pieces = self._logits(hidden[rows], kl.s_columns)
            pooled = reduce_pool(pieces, batch["t2s_segment"][rows], int(batch["t_mask"].sum()),
                                 "mean" if kl.average else "sum")
            if kl.align == "reduce_map":
                pooled = reduce_map_logits(pooled, kl.t2s_padded, "logsumexp" if kl.sum_probs else "sum",
                                           columns=kl.t_columns, impl=kl.impl, s2t_padded=kl.s2t_padded,
                                           s2t_idxs_padded=kl.s2t_idxs_padded, map_matrix=kl.map_matrix)
            out["kl_student"] = pooled
        if hid is not None:
            out.update(hid(batch, teacher_states, student_states))
        return out

    def _shared(self, batch: dict[str, Tensor], masked_ids: Tensor, labels: Tensor,
                teacher_states: tuple[Tensor, ...] | None = None) -> dict[str, Tensor]:
        """One vocabulary: one pass; the full-vocabulary logits of the KL rows also serve the MLM targets
        (a subset of them), so the output layer runs once per row."""
        hid = self.hidden
        enc = base_model(self.student)(input_ids=masked_ids, attention_mask=batch["s_mask"],
                                       output_hidden_states=hid is not None)
        hidden = enc.last_hidden_state
        rows = self.kl.teacher_rows(batch, labels)
        logits = self._logits(hidden[rows], None)
        out = {"kl_student": logits}
        if self.mlm:
            row_labels = labels[rows]
            targets = row_labels != IGNORE_INDEX
            out["mlm_logits"], out["mlm_labels"] = logits[targets], row_labels[targets]
        if hid is not None:
            out.update(hid(batch, teacher_states, enc.hidden_states))
        return out


@torch.no_grad()
def teacher_logits(teacher: nn.Module, batch: dict[str, Tensor], kl: KLPlan, masked_ids: Tensor | None = None,
                   labels: Tensor | None = None) -> Tensor:
    """[N, K'] teacher logits at `kl.teacher_rows(batch, labels)` over `kl.t_columns` (no gradient). With a
    shared vocabulary the teacher reads the student's masked ids [B, L], as in DistilBERT."""
    return teacher_forward(teacher, batch, kl, masked_ids, labels)[0]


@torch.no_grad()
def teacher_forward(teacher: nn.Module, batch: dict[str, Tensor], kl: KLPlan | None,
                    masked_ids: Tensor | None = None, labels: Tensor | None = None, hidden_states: bool = False,
                    shared: bool = False) -> tuple[Tensor | None, tuple[Tensor, ...] | None]:
    """One teacher pass serving every loss of the step (no gradient).

    Returns (logits [N, K'] at `kl.teacher_rows(batch, labels)` over `kl.t_columns`, or None without `kl`;
    the hidden states, a tuple of L_T + 1 tensors [B, L, D_T] (embeddings first), requested from the model
    only with `hidden_states`, else None). The teacher reads its own tokens, or with a shared vocabulary
    (`kl.align == "shared"` or `shared`) the student's masked ids [B, L], as in DistilBERT.
    """
    if shared or (kl is not None and kl.align == "shared"):
        ids, mask = masked_ids, batch["s_mask"]
    else:
        ids, mask = batch["t_ids"], batch["t_mask"]
    enc = base_model(teacher)(input_ids=ids, attention_mask=mask, output_hidden_states=hidden_states)
    logits = None
    if kl is not None:
        weight, bias = output_layer(teacher)
        rows = kl.teacher_rows(batch, labels)
        logits = lm_head_logits(head_transform(teacher)(enc.last_hidden_state[rows]), weight, bias, kl.t_columns)
    return logits, (enc.hidden_states if hidden_states else None)


def combine_losses(student_out: dict[str, Tensor], t_logits: Tensor | None, kl: KLPlan | None,
                   alphas: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
    """(total = sum of alpha * loss, {name: loss}) with names `loss_ce` (KL), `loss_mlm` and the hidden-state
    terms `loss_mse`, `loss_cos`, `loss_contrastive` (computed by the runner; alphas "mse", "cos",
    "contrastive")."""
    losses: dict[str, Tensor] = {}
    if "mlm_logits" in student_out:
        losses["loss_mlm"] = mlm_loss(student_out["mlm_logits"], student_out["mlm_labels"])
    if kl is not None:
        losses["loss_ce"] = kl_div_loss(t_logits, student_out["kl_student"], kl.temperature)
    losses.update({name: student_out[name] for name in HIDDEN_LOSS_NAMES if name in student_out})
    weights = {"loss_mlm": alphas.get("mlm", 0.0), "loss_ce": alphas.get("ce", 0.0),
               **{name: alphas.get(name[len("loss_"):], 0.0) for name in HIDDEN_LOSS_NAMES}}
    total = sum(weights[name] * value for name, value in losses.items())
    return total, losses
