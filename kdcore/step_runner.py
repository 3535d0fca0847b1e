"""The forward passes of one distillation step: which positions and vocabulary columns each loss reads,
the student's and the teacher's runs restricted to them, and the weighted sum of the losses.

`StudentRunner` is the one `nn.Module` the trainer wraps in DDP: a single forward call does every student
pass of the step (the MLM pass on the student's own masked tokens and, for reduce alignment, the pass on
the t2s sequence), so DDP sees one forward per backward. Logits are computed only at the rows a loss
reads and only for the columns it reads; no full-vocabulary logits elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from custom_step import IGNORE_INDEX, kl_and_mlm_loss, lm_head_logits, mlm_loss
from kdcore.alignments import LogitAlignment, StudentPass
from kdcore.errors import UserError

HIDDEN_LOSS_NAMES = ("loss_mse", "loss_cos", "loss_contrastive")


def base_model(model: nn.Module) -> nn.Module:
    """The encoder of a *ForMaskedLM model (DistilBertModel, BertModel, ...)."""
    return model.base_model


def _module_call(module: nn.Module, frozen: bool):
    """`module` itself, or with `frozen` a function calling it on detached parameters (no gradient reaches them;
    the gradient still flows into the input)."""
    if not frozen:
        return module
    params = {name: p.detach() for name, p in module.named_parameters()}
    return lambda h: torch.func.functional_call(module, params, (h,))


def head_transform(model: nn.Module, frozen: bool = False):
    """The MLM head's hidden->hidden transform (dense, activation, LayerNorm) of a BERT or DistilBERT (with
    `frozen`: on detached parameters)."""
    if hasattr(model, "vocab_transform"):
        dense, norm = _module_call(model.vocab_transform, frozen), _module_call(model.vocab_layer_norm, frozen)
        return lambda h: norm(model.activation(dense(h)))
    if hasattr(model, "cls") and hasattr(model.cls, "predictions"):
        return _module_call(model.cls.predictions.transform, frozen)
    raise UserError(f"{type(model).__name__} has no BERT/DistilBERT MLM head; use a BertForMaskedLM or "
                    "DistilBertForMaskedLM")


def output_layer(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight [V, D], bias [V]) of the output projection onto the vocabulary."""
    decoder = model.get_output_embeddings()
    return decoder.weight, decoder.bias


def head_logits(model: nn.Module, hidden: Tensor, columns: Tensor | None = None, frozen: bool = False) -> Tensor:
    """The MLM head of `model` on last hidden states [M, D] -> logits [M, K] over `columns` (int64 [K], None: all
    V). frozen: the head's parameters get no gradient (the input still does)."""
    weight, bias = output_layer(model)
    if frozen:
        weight, bias = weight.detach(), None if bias is None else bias.detach()
    return lm_head_logits(head_transform(model, frozen)(hidden), weight, bias, columns)


class StudentRunner(nn.Module):
    """Every student pass of a step, returning only what the losses read.

    forward(batch, masked_ids, labels, teacher_states=None) returns a dict with
    - `mlm_logits` [M, V_S], `mlm_labels` [M]: at the MLM targets (when mlm is on), except with one vocabulary, where
      the targets are rows of `kl_student` and `kl_mlm_labels` [N] gives every KL row's label (IGNORE_INDEX: not a
      target), so that both terms come from one pass over those logits (`custom_step.kl_and_mlm_loss`);
    - `kl_student` [N, K]: the student's scores aligned with the teacher rows of `kl.positions.teacher_rows`
      over `kl.teacher_columns` (when a KL alignment is given);
    - `loss_mse`, `loss_cos`, `loss_contrastive`: the hidden-state terms of `hidden`
      (`hidden_projection.HiddenLosses`, when given; it needs the teacher's hidden states `teacher_states`);
    - with an `aligner` (the trainable part of an alignment, `LogitAlignment.aligner`; e.g.
      `dual_space.DualSpace`): `kl_student` and the alignment's `extra_terms` come from it, given the last
      hidden states of the KL's pass and the teacher's last hidden states (`teacher_states[-1]`).
    A pass runs only when something reads it: the student's own (masked) tokens for the MLM loss and for
    alignments whose `student_pass` is OWN, the t2s sequence for those whose pass is T2S; hidden states are
    requested only from the pass the hidden-state positions read.
    `hidden` and `aligner` are submodules, so their projections, layer weights and hyperbolic layers are
    optimised, synced by DDP and checkpointed with the student (and left out of the exported student).
    """

    def __init__(self, student: nn.Module, mlm: bool, kl: LogitAlignment | None, hidden: nn.Module | None = None,
                 aligner: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.mlm = mlm
        self.kl = kl
        self.hidden = hidden
        self.aligner = aligner

    def _logits(self, hidden: Tensor, columns: Tensor | None) -> Tensor:
        return head_logits(self.student, hidden, columns)

    def _kl_outputs(self, last_hidden: Tensor, batch: dict[str, Tensor], labels: Tensor,
                    teacher_states: tuple[Tensor, ...] | None) -> dict[str, Tensor]:
        """`kl_student` (and an aligner's extra terms) from the last hidden states [B, L, D_S] of the KL's pass."""
        kl = self.kl
        if self.aligner is not None:
            if teacher_states is None:
                raise ValueError(f"the {kl.name} alignment reads the teacher's hidden states")
            return self.aligner(self.student, last_hidden, teacher_states[-1], batch, kl.temperature)
        rows = kl.positions.select(last_hidden, batch, labels)
        return {"kl_student": kl.scores(kl.positions.pool(self._logits(rows, kl.student_columns), batch))}

    def forward(self, batch: dict[str, Tensor], masked_ids: Tensor, labels: Tensor,
                teacher_states: tuple[Tensor, ...] | None = None) -> dict[str, Tensor]:
        kl, hid = self.kl, self.hidden
        if kl is not None and kl.positions.teacher_reads_student_ids:
            return self._one_vocabulary(batch, masked_ids, labels, teacher_states)
        encoder = base_model(self.student)
        out: dict[str, Tensor] = {}
        kl_pass = kl.positions.student_pass if kl is not None else None
        hidden_pass = hid.positions.student_pass if hid is not None else None
        states: tuple[Tensor, ...] | None = None
        if self.mlm or StudentPass.OWN in (kl_pass, hidden_pass):
            own_states = hidden_pass is StudentPass.OWN
            enc = encoder(input_ids=masked_ids, attention_mask=batch["s_mask"], output_hidden_states=own_states)
            if own_states:
                states = enc.hidden_states
            if self.mlm:
                targets = labels != IGNORE_INDEX
                out["mlm_logits"] = self._logits(enc.last_hidden_state[targets], None)
                out["mlm_labels"] = labels[targets]
            if kl_pass is StudentPass.OWN:
                out.update(self._kl_outputs(enc.last_hidden_state, batch, labels, teacher_states))
        if StudentPass.T2S in (kl_pass, hidden_pass):
            t2s_states = hidden_pass is StudentPass.T2S
            enc = encoder(input_ids=batch["t2s_ids"], attention_mask=batch["t2s_mask"], output_hidden_states=t2s_states)
            if t2s_states:
                states = enc.hidden_states
            if kl_pass is StudentPass.T2S:
                out.update(self._kl_outputs(enc.last_hidden_state, batch, labels, teacher_states))
        if hid is not None:
            out.update(hid(batch, teacher_states, states))
        return out

    def _one_vocabulary(self, batch: dict[str, Tensor], masked_ids: Tensor, labels: Tensor,
                        teacher_states: tuple[Tensor, ...] | None = None) -> dict[str, Tensor]:
        """One vocabulary: one pass; the full-vocabulary logits of the KL rows also serve the MLM targets
        (a subset of them), so the output layer runs once per row, and the labels of the KL rows go with them."""
        hid = self.hidden
        enc = base_model(self.student)(input_ids=masked_ids, attention_mask=batch["s_mask"],
                                       output_hidden_states=hid is not None)
        rows = self.kl.positions.teacher_rows(batch, labels)
        logits = self._logits(enc.last_hidden_state[rows], None)
        out = {"kl_student": logits}
        if self.mlm:
            out["kl_mlm_labels"] = labels[rows]
        if hid is not None:
            out.update(hid(batch, teacher_states, enc.hidden_states))
        return out


@torch.no_grad()
def teacher_forward(teacher: nn.Module, batch: dict[str, Tensor], kl: LogitAlignment | None,
                    masked_ids: Tensor | None = None, labels: Tensor | None = None, hidden_states: bool = False,
                    reads_student_ids: bool = False) -> tuple[Tensor | None, tuple[Tensor, ...] | None]:
    """One teacher pass serving every loss of the step (no gradient).

    Returns (logits [N, K'] at `kl.positions.teacher_rows(batch, labels)` over `kl.teacher_columns`, through
    `kl.teacher_scores` (a merging column map projects them onto the compared columns), or None
    without `kl`; the hidden states, a tuple of L_T + 1 tensors [B, L, D_T] (embeddings first), requested from the
    model only with `hidden_states`, else None). The teacher reads its own tokens, or with `reads_student_ids` (one
    vocabulary) the student's masked ids [B, L], as in DistilBERT.
    """
    if reads_student_ids:
        ids, mask = masked_ids, batch["s_mask"]
    else:
        ids, mask = batch["t_ids"], batch["t_mask"]
    enc = base_model(teacher)(input_ids=ids, attention_mask=mask, output_hidden_states=hidden_states)
    logits = None
    if kl is not None:
        rows = kl.positions.teacher_rows(batch, labels)
        logits = kl.teacher_scores(head_logits(teacher, enc.last_hidden_state[rows], kl.teacher_columns))
    return logits, (enc.hidden_states if hidden_states else None)


def combine_losses(student_out: dict[str, Tensor], t_logits, kl: LogitAlignment | None,
                   alphas: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
    """(total = sum of alpha * loss, {name: loss}) with names `loss_ce` (`kl.loss`: the KL, or the alignment's own
    distance; with one vocabulary's `kl_mlm_labels`, the KL and `loss_mlm` of `kl_and_mlm_loss`) and the alignment's
    `extra_terms` (alpha "ce" too), `loss_mlm` and the hidden-state terms `loss_mse`,
    `loss_cos`, `loss_contrastive` (computed by the runner; alphas "mse", "cos", "contrastive"). t_logits: the
    teacher's logits [N, K] (`teacher_forward`), or an object with `kl(student_scores, temperature)`
    (`teacher_cache.CachedTeacher`), or None without KL."""
    losses: dict[str, Tensor] = {}
    if "kl_mlm_labels" in student_out:  # one vocabulary (shared: the plain KL, the teacher online): one pass
        kl_term, mlm_term = kl_and_mlm_loss(t_logits, student_out["kl_student"], student_out["kl_mlm_labels"],
                                            kl.temperature)
        losses["loss_mlm"], losses["loss_ce"] = mlm_term, kl_term
    elif "mlm_logits" in student_out:
        losses["loss_mlm"] = mlm_loss(student_out["mlm_logits"], student_out["mlm_labels"])
    if kl is not None and "loss_ce" not in losses:
        student = student_out["kl_student"]
        losses["loss_ce"] = (kl.loss(t_logits, student) if isinstance(t_logits, Tensor)
                             else t_logits.kl(student, kl.temperature))
    if kl is not None:
        losses.update({name: student_out[name] for name in kl.extra_terms})
    losses.update({name: student_out[name] for name in HIDDEN_LOSS_NAMES if name in student_out})
    weights = {"loss_mlm": alphas.get("mlm", 0.0), "loss_ce": alphas.get("ce", 0.0),
               **{name: alphas.get("ce", 0.0) for name in (kl.extra_terms if kl is not None else ())},
               **{name: alphas.get(name[len("loss_"):], 0.0) for name in HIDDEN_LOSS_NAMES}}
    total = sum(weights[name] * value for name, value in losses.items())
    return total, losses
