"""Loss building blocks of the distillation step: KL, ULD, alignment (reduce / reduce-map / match) and MLM.

Notation: teacher vocabulary V_T, student vocabulary V_S; N aligned rows, D hidden size.
All functions are pure, vectorised and run on the device of their inputs. Losses are computed in fp32
(fp64 stays fp64) whatever the input dtype (fp32, bf16, fp16); every loss returns a 0-dim tensor that is
connected to the differentiable input even when there are no rows, so that `backward()` and DDP's
gradient hooks always run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from my_index import my_index, my_index_reduce, restrict_inverse_map

IGNORE_INDEX = -100
"""Label value of positions that the MLM loss does not read."""


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other floating dtype is promoted to fp32 for softmax / log-softmax."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _connected_zero(tensor: Tensor) -> Tensor:
    """A 0-dim fp32/fp64 zero whose grad_fn reaches `tensor` (for empty batches)."""
    return tensor.sum().to(_loss_dtype(tensor.dtype)) * 0.0


# ---------------------------------------------------------------------------------------------------------
# KL divergence
# ---------------------------------------------------------------------------------------------------------


KL_CHUNK_ELEMENTS = {"cpu": 2**20}
"""Elements per row block of `kl_div_loss`'s work buffers by device type (others: `KL_CHUNK_DEFAULT`): cache-sized
blocks on CPU, blocks of many rows (enough for a kernel per row block) on accelerators."""
KL_CHUNK_DEFAULT = 2**24


def _divide(logits: Tensor, temperature: float | Tensor, out: Tensor) -> Tensor:
    """out = logits / temperature, computed in out's dtype (logits of any floating dtype); returns out."""
    if logits.dtype == out.dtype:
        return torch.div(logits, temperature, out=out)
    return out.copy_(logits).div_(temperature)


def _temperature_term(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """0-dim sum over rows r and columns c of p (d - K_r) log p + (q - p) log q for p, log_p, log_q [R, C],
    with d = log p - log q, K_r = sum_c p d (the row's KL) and q = exp(log q). The row KL's derivative along
    the scaled logits t / T is p (d - K_r), along s / T it is q - p; replacing t / T and s / T by log p and
    log q (a row constant apart, which neither derivative sees) gives d KL_r / d T = -(row's sum) / T."""
    pd = p * (log_p - log_q)
    return ((pd - p * pd.sum(-1, keepdim=True)) * log_p + (log_q.exp() - p) * log_q).sum()


def _kl_rows(teacher: Tensor, student: Tensor, temperature: float | Tensor, dtype: torch.dtype,
             teacher_log_probs: bool, with_t_term: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The forward of the KL over float [N, C] logits (N > 0) in `dtype`, by row blocks of `KL_CHUNK_ELEMENTS`
    through two reused [R, C] work buffers: (q - p [N, C], the KL summed over rows (0-dim, not yet scaled by
    T^2 / N), and with `with_t_term` the `_temperature_term` summed over rows, else None). `teacher` holds logits,
    or with `teacher_log_probs` log p at T (a cached distribution). One [N, C] tensor is written: the student's
    log-probabilities, then q - p over them. `temperature`: a float or a detached 0-dim tensor in `dtype`."""
    n, c = student.shape
    device = student.device
    rows = max(1, KL_CHUNK_ELEMENTS.get(device.type, KL_CHUNK_DEFAULT) // max(c, 1))
    q_minus_p = torch.empty((n, c), dtype=dtype, device=device)
    work = torch.empty((2, min(rows, n), c), dtype=dtype, device=device)
    kl = q_minus_p.new_zeros(())
    t_term = q_minus_p.new_zeros(()) if with_t_term else None
    floor = torch.finfo(dtype).min
    for start in range(0, n, rows):
        block = slice(start, min(start + rows, n))
        scaled, log_p = work[0, :block.stop - start], work[1, :block.stop - start]
        if teacher_log_probs:  # log p given (a cached distribution at T)
            log_p.copy_(teacher[block]).clamp_min_(floor)
        else:
            torch.log_softmax(_divide(teacher[block], temperature, scaled), -1, out=log_p).clamp_min_(floor)
        log_q = torch.log_softmax(_divide(student[block], temperature, scaled), -1, out=q_minus_p[block])
        p = torch.exp(log_p, out=scaled)
        if t_term is not None:
            t_term += _temperature_term(p, log_p, log_q)
        kl += log_p.sub_(log_q).mul_(p).sum()  # p (log p - log q); 0 where p == 0 (log p is clamped, finite)
        log_q.exp_().sub_(p)
    return q_minus_p, kl, t_term


def _spend(ctx) -> None:
    """Mark a KL autograd function's single backward as done (it scales its saved q - p in place); raise on a
    second one."""
    if ctx.spent:
        raise RuntimeError("the KL loss's backward ran a second time on one forward (retain_graph=True): it "
                           "scales its saved q - p in place; compute the loss again for another backward")
    ctx.spent = True


class _KLDiv(torch.autograd.Function):
    """T^2 / N * sum_r KL(softmax(t_r / T) || softmax(s_r / T)) for float [N, C] logits (N > 0), computed in
    `dtype` (`_kl_rows`); see `kl_div_loss`. Only q - p [N, C] is kept for the gradient T / N * (q - p), which
    the backward scales in place and hands on (fp32/fp64 students) or casts: no second [N, C] fp32 tensor at the
    backward's peak (bench/kl_loss.py, 2,000 x 16,000 on the CPU: 118 instead of 150 ms for forward and
    backward). So the backward runs once per forward: a second one (retain_graph) raises. A temperature tensor
    that requires a gradient also keeps the 0-dim factor of d loss / d T = T / N * (2 KL - term) (KL summed over
    rows, term from `_temperature_term`). No double backward."""

    @staticmethod
    def forward(ctx, teacher: Tensor, student: Tensor, temperature: float | Tensor, dtype: torch.dtype,
                teacher_log_probs: bool = False) -> Tensor:
        temp = temperature.detach().to(dtype) if isinstance(temperature, Tensor) else temperature
        n = student.shape[0]
        q_minus_p, kl, t_term = _kl_rows(teacher, student, temp, dtype, teacher_log_probs, ctx.needs_input_grad[2])
        ctx.save_for_backward(q_minus_p, None if t_term is None else 2 * kl - t_term)
        ctx.temp, ctx.n, ctx.student_dtype, ctx.spent = temp, n, student.dtype, False
        ctx.temperature_dtype = temperature.dtype if isinstance(temperature, Tensor) else None
        return kl * (temp ** 2 / n)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[None, Tensor | None, Tensor | None, None, None]:
        _spend(ctx)
        q_minus_p, t_factor = ctx.saved_tensors
        scale = grad_out * (ctx.temp / ctx.n)
        grad_student = q_minus_p.mul_(scale).to(ctx.student_dtype) if ctx.needs_input_grad[1] else None
        grad_temperature = None if t_factor is None else (scale * t_factor).to(ctx.temperature_dtype)
        return None, grad_student, grad_temperature, None, None


class _KLAndMLM(torch.autograd.Function):
    """(T^2 / N * sum_r KL(softmax(t_r / T) || softmax(s_r / T)), mean over the M target rows of
    -log softmax(s_r)[label_r]) from one [N, C] student tensor (N > 0), computed in `dtype`; see
    `kl_and_mlm_loss`. Keeps q - p [N, C] (`_kl_rows`), softmax(s) - onehot [M, C] at the target rows and their
    indices; the backward writes one gradient, T / N * g_kl (q - p) + g_mlm / M (softmax - onehot) at the target
    rows, summed in `dtype` and cast once, into the saved q - p (so once per forward, as `_KLDiv`)."""

    @staticmethod
    def forward(ctx, teacher: Tensor, student: Tensor, labels: Tensor, temperature: float,
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        n = student.shape[0]
        q_minus_p, kl, _ = _kl_rows(teacher, student, temperature, dtype, False, False)
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        targets = labels.index_select(0, rows).unsqueeze(1)
        log_probs = torch.log_softmax(student.index_select(0, rows).to(dtype), -1)
        m = rows.numel()
        mlm = -log_probs.gather(1, targets).sum() / max(m, 1)
        softmax_minus_onehot = log_probs.exp_().scatter_add_(1, targets, log_probs.new_full(targets.shape, -1.0))
        ctx.save_for_backward(q_minus_p, softmax_minus_onehot, rows)
        ctx.temp, ctx.n, ctx.m, ctx.student_dtype, ctx.spent = temperature, n, m, student.dtype, False
        return kl * (temperature ** 2 / n), mlm

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl: Tensor, grad_mlm: Tensor) -> tuple[None, Tensor | None, None, None, None]:
        _spend(ctx)
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
        q_minus_p, softmax_minus_onehot, rows = ctx.saved_tensors
        grad = q_minus_p.mul_(grad_kl * (ctx.temp / ctx.n))
        if ctx.m:
            grad.index_add_(0, rows, softmax_minus_onehot.mul_(grad_mlm / ctx.m))
        return None, grad.to(ctx.student_dtype), None, None, None


def kl_div_loss(teacher_logits: Tensor, student_logits: Tensor, temperature: float | Tensor) -> Tensor:
    """T^2 * mean over rows of KL(softmax(teacher / T) || softmax(student / T)).

    teacher_logits, student_logits: float [N, C] (any floating dtype, same columns in the same order).
    temperature: T > 0, a float or a 0-dim tensor (which gets a gradient when it requires one).
    Returns a 0-dim fp32 tensor (fp64 for fp64 students). Gradients flow into `student_logits` (and a
    temperature tensor) only: d loss / d student = T / N * (softmax(student / T) - softmax(teacher / T)).
    Teacher columns at -inf (or very negative) are safe: the teacher log-probabilities are clamped to the
    most negative finite value of the computation dtype, so such columns contribute exactly 0 instead of
    0 * inf = NaN. Student logits must be finite. N == 0 gives a zero connected to `student_logits`.
    One autograd function: a few passes over [N, C] forward, one backward; the work buffers are row blocks,
    and only q - p [N, C] is kept for the backward, which scales it in place: one backward per forward (a second
    backward of the same graph, retain_graph=True, raises).
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher {tuple(teacher_logits.shape)} and student {tuple(student_logits.shape)} "
                         "logits differ in shape")
    if student_logits.shape[0] == 0:
        return _connected_zero(student_logits)
    return _KLDiv.apply(teacher_logits.detach(), student_logits, temperature, _loss_dtype(student_logits.dtype))


def kl_div_from_log_probs(teacher_log_probs: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """`kl_div_loss` against a stored teacher distribution: T^2 * mean over rows of KL(p || softmax(student / T)).

    teacher_log_probs: float [N, C], log p = log_softmax(teacher / T) computed beforehand (a teacher cache's `exact`
    encoding); student_logits: float [N, C]; temperature: the T that p was computed at (a fixed float).
    The same computation and gradient as `kl_div_loss` from the point where the teacher's log-probabilities
    exist: equal to it when the stored values are fp32."""
    if teacher_log_probs.shape != student_logits.shape:
        raise ValueError(f"teacher {tuple(teacher_log_probs.shape)} and student {tuple(student_logits.shape)} differ "
                         "in shape")
    if student_logits.shape[0] == 0:
        return _connected_zero(student_logits)
    return _KLDiv.apply(teacher_log_probs.detach(), student_logits, float(temperature),
                        _loss_dtype(student_logits.dtype), True)


def kl_and_mlm_loss(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor,
                    temperature: float) -> tuple[Tensor, Tensor]:
    """(`kl_div_loss`, `mlm_loss`) where the MLM targets are rows of the KL's logits (one vocabulary, DistilBERT:
    the KL reads every real position, the MLM its masked ones): (T^2 * mean over rows of KL(softmax(teacher / T) ||
    softmax(student / T)), mean over the rows whose label is not IGNORE_INDEX of -log softmax(student)[label]).

    teacher_logits, student_logits: float [N, C]; labels: int64 [N] (IGNORE_INDEX: not an MLM target);
    temperature: T > 0 (a float). Returns two 0-dim fp32 tensors (fp64 for fp64 students), equal to the two
    functions apart from rounding. One autograd function: the student's gradient of both terms is summed in fp32
    and cast once, where autograd would add two gradients in the student's dtype, one of them a dense [N, C]
    tensor holding M rows (a zeros, a scatter and an add over [N, C]). One backward per forward, as `kl_div_loss`.
    No target row gives an MLM term of 0 connected to `student_logits`; N == 0 gives two such zeros.
    """
    if teacher_logits.shape != student_logits.shape or labels.shape != student_logits.shape[:1]:
        raise ValueError(f"teacher {tuple(teacher_logits.shape)}, student {tuple(student_logits.shape)} and labels "
                         f"{tuple(labels.shape)} differ in shape")
    if student_logits.shape[0] == 0:
        return _connected_zero(student_logits), _connected_zero(student_logits)
    return _KLAndMLM.apply(teacher_logits.detach(), student_logits, labels, float(temperature),
                           _loss_dtype(student_logits.dtype))


def kl_div_top_k(columns: Tensor, probs: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * mean over rows of the KL between two distributions over K + 1 classes: the teacher's K largest
    probabilities plus one tail class holding the rest of its mass, and the student's probabilities of the same
    K columns plus the student's own remaining mass. Biased (the tail's inner shape is lost); equal to the full
    KL when K covers every column.

    columns: int64 [N, K] column indices into the student's C columns; probs: float [N, K] the teacher's
    probabilities at T of those columns; student_logits: float [N, C]. Returns a 0-dim fp32 (fp64) tensor."""
    if student_logits.shape[0] == 0:
        return _connected_zero(student_logits)
    dtype = _loss_dtype(student_logits.dtype)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, -1)
    log_q_top = log_q.gather(1, columns.long())
    p_top = probs.detach().to(dtype)
    p_tail = (1 - p_top.sum(-1)).clamp_min(0)
    log_q_tail = torch.log1p(-log_q_top.exp().sum(-1).clamp(max=1 - torch.finfo(dtype).eps))
    floor = torch.finfo(dtype).min
    top = torch.xlogy(p_top, p_top) - p_top * log_q_top
    tail = torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail.clamp_min(floor)
    return (top.sum(-1) + tail).mean() * temperature ** 2


def kl_div_sampled(columns: Tensor, counts: Tensor | None, entropy: Tensor, student_logits: Tensor,
                   temperature: float) -> Tensor:
    """Unbiased estimate of `kl_div_loss` from K draws of the teacher distribution ("random sampling KD",
    Anshumann et al., ACL 2025, with the teacher itself as the proposal, so every draw weighs 1 / K):
    T^2 * mean over rows of (-sum_k (c_k / K) log q(v_k) - H(p)), q = softmax(student / T).

    columns: int64 [N, S] the drawn columns; counts: int [N, S] how often each was drawn (sum K per row; padding
    slots 0), or None when `columns` lists the K draws themselves (each weighs 1 / K); entropy: float [N] the teacher's entropy H(p) at T (so the value estimates the
    KL itself); student_logits: float [N, C]. Its gradient T / N * (q - c / K) has the exact KL gradient
    T / N * (q - p) as its expectation."""
    if student_logits.shape[0] == 0:
        return _connected_zero(student_logits)
    dtype = _loss_dtype(student_logits.dtype)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, -1)
    picked = log_q.gather(1, columns.long())
    if counts is None:
        cross = -picked.mean(-1)
    else:
        weights = counts.to(dtype)
        cross = -(weights / weights.sum(-1, keepdim=True) * picked).sum(-1)
    return (cross - entropy.to(dtype)).mean() * temperature ** 2


# ---------------------------------------------------------------------------------------------------------
# Universal Logit Distillation: L1 between sorted probability vectors
# ---------------------------------------------------------------------------------------------------------


class _Uld(torch.autograd.Function):
    """1 / N * sum_r sum_k |sort(p_r)_k - sort(q_r)_k| for teacher logits [N, V_T] and student logits [N, V_S]
    (N > 0), p = softmax(t / T), q = softmax(s / T), both sorted in decreasing order, the shorter vector padded
    with zeros; computed in `dtype`, `rows` rows at a time. Only the K = min(V_T, V_S) largest values of each side
    meet a nonzero partner: past rank K one side is padding, so those ranks add the rest of the longer side's mass
    (its total minus its K largest) and a student column there has the sign +1. Hence a partial sort (the K
    largest, `torch.topk`) of the longer vector. One [N, V_S] tensor is kept for the backward:
    d loss_r / d s_r = q * (g - <g, q>) / T, where g [V_S] is the sign of (q - p) at the rank of each student
    column among its K largest, sign(q) elsewhere. No double backward."""

    @staticmethod
    def forward(ctx, teacher: Tensor, student: Tensor, temperature: float, dtype: torch.dtype,
                rows: int) -> Tensor:
        n, v_student = student.shape
        k = min(teacher.shape[1], v_student)
        grad = torch.empty((n, v_student), dtype=dtype, device=student.device)
        total = grad.new_zeros(())
        for start in range(0, n, rows):
            block = slice(start, min(start + rows, n))
            p = torch.softmax(teacher[block].to(dtype) / temperature, -1)
            p_top = p.topk(k, -1).values
            q = torch.softmax(student[block].to(dtype) / temperature, -1)
            q_top, order = q.topk(k, -1)
            diff = q_top - p_top
            total += diff.abs().sum() + (p.sum() - p_top.sum()) + (q.sum() - q_top.sum())
            g = torch.sign(q, out=grad[block]).scatter_(1, order, diff.sign())
            g.sub_((g * q).sum(-1, keepdim=True)).mul_(q).div_(temperature)
        ctx.save_for_backward(grad)
        ctx.n, ctx.student_dtype = n, student.dtype
        return total / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[None, Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
        return None, torch.mul(grad, grad_out / ctx.n).to(ctx.student_dtype), None, None, None


def uld_loss(teacher_logits: Tensor, student_logits: Tensor, temperature: float, chunk_rows: int | None = None
             ) -> Tensor:
    """Universal Logit Distillation (Boizard et al., 2024): the mean over rows of the L1 distance between the
    teacher's and the student's probability vectors at temperature T, each sorted in decreasing order, the shorter
    padded with zeros (the paper's closed form of the Wasserstein-1 distance between the two sorted distributions).
    No T^2 factor: the value is a distance in [0, 2] per row, weighted by --alpha_ce.

    teacher_logits: float [N, V_T] (no gradient); student_logits: float [N, V_S] (any V_T, V_S); temperature: T > 0.
    Returns a 0-dim fp32 tensor (fp64 for fp64 students); N == 0 gives a zero connected to `student_logits`.
    d loss / d student_r = q_r * (g_r - <g_r, q_r>) / (T N), g_r the sign of (sorted q - sorted p) put back at the
    student's columns (a subgradient where two sorted values tie).
    Memory: rows go `chunk_rows` at a time (default: `KL_CHUNK_ELEMENTS` elements of the wider vocabulary, e.g.
    139 rows at V_T = 120K on an accelerator), each block holding its softmaxes and sorts (scaled logits,
    probabilities, sorted values and int64 indices: about 20 bytes per element in fp32); kept for the backward:
    one [N, V_S] tensor. Nothing of size V_T x V_S is built. Cost: per row a sort of the shorter vector and a
    partial sort (its K = min(V_T, V_S) largest) of the longer one; on 2 (shared) CPU threads, 64 rows at
    V_T = 120K, V_S = 30K: about 0.3-0.5 s for the teacher's top 30K (its full sort: 1.3-1.6 s) and 0.25-0.35 s for
    the student's sort, against 0.02 s for a KL over 30K columns: the sorts dominate the loss."""
    if teacher_logits.dim() != 2 or student_logits.dim() != 2 or teacher_logits.shape[0] != student_logits.shape[0]:
        raise ValueError(f"teacher {tuple(teacher_logits.shape)} and student {tuple(student_logits.shape)} logits "
                         "must be [N, V_T] and [N, V_S] over the same rows")
    if student_logits.shape[0] == 0:
        return _connected_zero(student_logits)
    if chunk_rows is None:
        elements = KL_CHUNK_ELEMENTS.get(student_logits.device.type, KL_CHUNK_DEFAULT)
        chunk_rows = elements // max(teacher_logits.shape[1], student_logits.shape[1])
    return _Uld.apply(teacher_logits.detach(), student_logits, float(temperature),
                      _loss_dtype(student_logits.dtype), max(1, chunk_rows))


# ---------------------------------------------------------------------------------------------------------
# Reduce: pool the student's rows on the t2s sequence back onto teacher positions
# ---------------------------------------------------------------------------------------------------------


def _sum_pool(values: Tensor, segment_ids: Tensor, n_segments: int) -> Tensor:
    """Sum of the rows of each segment: [M, D] -> [n_segments, D] (values.dtype)."""
    out = values.new_zeros((n_segments, *values.shape[1:]))
    return out.index_add(0, segment_ids, values)


def _mean_pool(values: Tensor, segment_ids: Tensor, n_segments: int) -> Tensor:
    """Mean of the rows of each segment; empty segments give zeros."""
    counts = torch.bincount(segment_ids, minlength=n_segments).clamp_min(1).to(values.dtype)
    return _sum_pool(values, segment_ids, n_segments) / counts.view(-1, *([1] * (values.dim() - 1)))


POOLING: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {"sum": _sum_pool, "mean": _mean_pool}
"""Pooling of student pieces onto teacher positions, by name (`--average_logits` selects "mean")."""


def reduce_pool(values: Tensor, segment_ids: Tensor, n_segments: int,
                mode: Literal["sum", "mean"] = "sum") -> Tensor:
    """Pool rows of the student's run on the t2s sequence back onto teacher positions.

    values: float [M, D] (any trailing shape works), one row per t2s piece.
    segment_ids: int64 [M], the teacher position (0..n_segments-1) each piece came from; a teacher token
    split into k pieces has k rows with the same id.
    Returns values.dtype [n_segments, D]: the sum (or mean) of each segment's rows; segments without rows
    are zero (no NaN for "mean").
    """
    if mode not in POOLING:
        raise ValueError(f"unknown pooling mode {mode!r}; expected one of {sorted(POOLING)}")
    return POOLING[mode](values, segment_ids.to(device=values.device, dtype=torch.long), n_segments)


# ---------------------------------------------------------------------------------------------------------
# Reduce-map: scores for teacher tokens from the scores of their student pieces
# ---------------------------------------------------------------------------------------------------------


def _lse_pad(dtype: torch.dtype) -> float:
    """Pad value for logsumexp: the most negative finite number of `dtype` (exp() of it relative to any
    real score is exactly 0; a row of pads only stays finite and gets no NaN gradient)."""
    return torch.finfo(dtype).min


def _extend(reduced: Tensor, mode: str) -> Tensor:
    """[N, V_S] -> [N, V_S + 1] with the pad column: 0 for "sum", `_lse_pad` for "logsumexp"."""
    pad = 0.0 if mode == "sum" else _lse_pad(reduced.dtype)
    return torch.cat([reduced, reduced.new_full((reduced.shape[0], 1), pad)], dim=1)


def _reduce_pieces(pieces: Tensor, mode: str) -> Tensor:
    """[N, K, S] -> [N, K]: sum or logsumexp over the pieces of each teacher token."""
    return pieces.sum(-1) if mode == "sum" else torch.logsumexp(pieces, dim=-1)


def _rows(t2s_padded: Tensor, columns: Tensor | None) -> Tensor:
    """The rows of `t2s_padded` that are scored, int64 [K, S]."""
    return (t2s_padded if columns is None else t2s_padded.index_select(0, columns)).long()


def reduce_map_matrix(t2s_padded: Tensor, n_student: int, columns: Tensor | None = None,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """Sparse COO [K, V_S] (dtype) counting how often student id u occurs in the split of teacher token
    `columns[k]` (all rows of t2s_padded when `columns` is None); pad entries (== n_student) are dropped.
    Built by `reduce_map_logits(impl="sparse")` on every call unless passed as `map_matrix`."""
    rows = _rows(t2s_padded, columns)
    k, slot = (rows != n_student).nonzero(as_tuple=True)
    indices = torch.stack([k, rows[k, slot]])
    ones = torch.ones(k.numel(), dtype=dtype, device=rows.device)
    shape = (rows.shape[0], n_student)
    return torch.sparse_coo_tensor(indices, ones, shape, check_invariants=False).coalesce()


def _reduce_map_gather(reduced: Tensor, t2s_padded: Tensor, mode: str, columns: Tensor | None,
                       **_: Tensor | None) -> Tensor:
    """Plain advanced indexing: reduced_ext[:, t2s_padded[columns]] -> [N, K, S], reduced over S."""
    return _reduce_pieces(_extend(reduced, mode)[:, _rows(t2s_padded, columns)], mode)


def _inverse_for(t2s_padded: Tensor, columns: Tensor | None, s2t_padded: Tensor | None,
                 s2t_idxs_padded: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The inverse maps re-expressed over the scored rows (positions in `columns`), int [V_S, C]."""
    if s2t_padded is None:
        raise ValueError("the my_index implementations need s2t_padded")
    if columns is None:
        return s2t_padded, s2t_idxs_padded
    return restrict_inverse_map(s2t_padded, s2t_idxs_padded, columns, t2s_padded.shape[0])


def _reduce_map_my_index(reduced: Tensor, t2s_padded: Tensor, mode: str, columns: Tensor | None, *,
                         s2t_padded: Tensor | None = None, **_: Tensor | None) -> Tensor:
    """Gather and reduction fused in `MyIndexReduce`: blocked forward, inverse-map backward, no [N, K, S]."""
    s2t, _ = _inverse_for(t2s_padded, columns, s2t_padded, None)
    return my_index_reduce(reduced, _rows(t2s_padded, columns), s2t, mode)


def _reduce_map_my_index_gather(reduced: Tensor, t2s_padded: Tensor, mode: str, columns: Tensor | None, *,
                                s2t_padded: Tensor | None = None, s2t_idxs_padded: Tensor | None = None,
                                **_: Tensor | None) -> Tensor:
    """As the gather implementation, with `MyIndex` (inverse-map backward) for the gather."""
    if s2t_idxs_padded is None:
        raise ValueError("impl='my_index_gather' needs s2t_idxs_padded")
    s2t, idxs = _inverse_for(t2s_padded, columns, s2t_padded, s2t_idxs_padded)
    return _reduce_pieces(my_index(_extend(reduced, mode), _rows(t2s_padded, columns), s2t, idxs), mode)


def _reduce_map_sparse(reduced: Tensor, t2s_padded: Tensor, mode: str, columns: Tensor | None, *,
                       map_matrix: Tensor | None = None, **_: Tensor | None) -> Tensor:
    """Sparse product with the [K, V_S] count matrix A; never builds [N, K, S].

    "sum": z = reduced @ A^T. "logsumexp": z = log(exp(reduced - m) @ A^T) + m with m the (detached) row
    maximum of `reduced`; the product is clamped below at finfo.tiny, so a teacher token whose pieces all
    lie more than -log(tiny) below the row maximum (about 87 in fp32, 708 in fp64), or that has no piece,
    scores m + log(tiny) and gets no gradient. Computed in fp32 (fp64 for fp64 inputs).
    """
    dtype = _loss_dtype(reduced.dtype)
    matrix = reduce_map_matrix(t2s_padded, reduced.shape[1], columns, dtype) if map_matrix is None \
        else map_matrix.to(dtype)
    # outside autocast: it would cast the dense operand of the sparse product to bf16/fp16, whose backward then
    # meets the fp32 matrix and fails ("expected scalar type Float but found BFloat16")
    with torch.autocast(reduced.device.type, enabled=False):
        scores = reduced.to(dtype)
        if mode == "sum":
            return torch.sparse.mm(matrix, scores.t()).t().to(reduced.dtype)
        row_max = scores.detach().amax(dim=1, keepdim=True)
        summed = torch.sparse.mm(matrix, torch.exp(scores - row_max).t()).t()
        return (torch.log(summed.clamp_min(torch.finfo(dtype).tiny)) + row_max).to(reduced.dtype)


REDUCE_MAP_IMPLS: dict[str, Callable[..., Tensor]] = {
    "gather": _reduce_map_gather, "my_index": _reduce_map_my_index, "my_index_gather": _reduce_map_my_index_gather,
    "sparse": _reduce_map_sparse}
"""Implementations of `reduce_map_logits`, by name; all agree in value and gradient (see its docstring)."""


def reduce_map_logits(reduced: Tensor, t2s_padded: Tensor, mode: Literal["sum", "logsumexp"] = "sum",
                      columns: Tensor | None = None,
                      impl: Literal["gather", "sparse", "my_index", "my_index_gather"] = "gather", *,
                      s2t_padded: Tensor | None = None, s2t_idxs_padded: Tensor | None = None,
                      map_matrix: Tensor | None = None) -> Tensor:
    """Project reduced student logits onto teacher tokens through their splits.

    reduced: float [N, V_S], student logits pooled onto teacher positions.
    t2s_padded: int [V_T, S], the split of every teacher token into student ids, pad = V_S.
    columns: int64 [K] teacher ids to score (e.g. `t2s_mapped_ids`); all V_T rows when None.
    Returns reduced.dtype [N, K] with z(v) = sum of reduced[:, u] over the pieces u of v (pads add 0), or
    for mode "logsumexp" z(v) = log sum_u exp(reduced[:, u]) (pads add exp(-inf) = 0).
    A teacher token with no piece at all scores 0 for "sum"; for "logsumexp" it scores finfo(dtype).min
    (the finite stand-in for log 0; `log S` is lost to rounding) with "gather"/"my_index", and
    rowmax + log(finfo.tiny) with "sparse" (see `_reduce_map_sparse`), with zero gradient in both cases.
    impl: "gather" plain autograd indexing (materialises [N, K, S] and autograd's dense scatter backward);
    "my_index_gather" the same gather through `my_index.MyIndex`, whose backward uses the inverse maps
    `s2t_padded` / `s2t_idxs_padded` (int [V_S, C] over teacher ids, pad V_T / 0);
    "my_index" gather and reduction fused in `my_index.MyIndexReduce` (blocked forward that never holds
    [N, K, S], inverse-map backward; needs `s2t_padded` only, the slots are not needed after reduction);
    both my_index variants give the exact gradient when the inverse map lists every (teacher token, piece)
    pair of the scored rows (uncapped; the pipeline's maps cover `t2s_mapped_ids`) and an approximation
    (dropped pairs contribute nothing) when it was capped;
    "sparse" a sparse [K, V_S] product that never materialises [N, K, S] (`map_matrix` from
    `reduce_map_matrix` may be passed to avoid rebuilding it; it must match `columns`).
    """
    if mode not in ("sum", "logsumexp"):
        raise ValueError(f"unknown reduce-map mode {mode!r}")
    if impl not in REDUCE_MAP_IMPLS:
        raise ValueError(f"unknown reduce-map implementation {impl!r}; expected one of {sorted(REDUCE_MAP_IMPLS)}")
    return REDUCE_MAP_IMPLS[impl](reduced, t2s_padded, mode, columns, s2t_padded=s2t_padded,
                                  s2t_idxs_padded=s2t_idxs_padded, map_matrix=map_matrix)


# ---------------------------------------------------------------------------------------------------------
# Logits only where a loss reads them
# ---------------------------------------------------------------------------------------------------------


def lm_head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, columns: Tensor | None) -> Tensor:
    """Logits of an LM head only for the vocabulary columns that a loss reads.

    hidden: float [M, D] (already through the head's transform); weight: [V, D]; bias: [V] or None;
    columns: int64 [K] or None (all V). Returns [M, K] = hidden @ weight[columns].T + bias[columns], in the
    dtype F.linear gives for the inputs.
    """
    if columns is not None:
        columns = columns.to(device=weight.device, dtype=torch.long)
        weight = weight.index_select(0, columns)
        bias = None if bias is None else bias.index_select(0, columns)
    return F.linear(hidden, weight, bias)


# ---------------------------------------------------------------------------------------------------------
# MLM: masking of the student's own tokens and its loss
# ---------------------------------------------------------------------------------------------------------


def mlm_token_probs(counts: np.ndarray | Tensor, smoothing: float, special_ids: Sequence[int]) -> Tensor:
    """Per-token masking weights, fp32 [V]: max(count, 1) ** (-smoothing), 0 for special tokens.

    The exponent is negative (DistilBERT's frequency smoothing), so rarer tokens get larger weights.
    counts: [V] corpus counts of the student vocabulary.
    """
    counts = counts.to(torch.float64) if isinstance(counts, Tensor) else torch.from_numpy(np.array(counts, np.float64))
    probs = counts.clamp_min(1.0).pow(-smoothing)
    if len(special_ids):
        probs[torch.as_tensor(list(special_ids), dtype=torch.long)] = 0.0
    return probs.to(torch.float32)


def mlm_mask(input_ids: Tensor, attention_mask: Tensor, token_probs: Tensor, mask_prop: float,
             word_mask: float, word_keep: float, word_rand: float, mask_id: int, vocab_size: int,
             generator: torch.Generator, random_token_probs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Choose MLM targets and corrupt them, reproducibly from `generator`.

    input_ids: int64 [B, L]; attention_mask: [B, L] (non-zero = real token); token_probs: float [V]
    (`mlm_token_probs`; 0 for special tokens). Picks n = round_half_up(mask_prop * number of real tokens)
    positions (at least 1 when a candidate exists, at most the number of candidates) by weighted sampling
    without replacement with weight token_probs[id]; pad positions and zero-weight (special) tokens are
    never picked. Each picked position is independently replaced by `mask_id` with probability word_mask,
    by a random token with probability word_rand, or kept with probability word_keep (normalised to sum
    to 1). Random tokens are drawn from ids 0..vocab_size-1 with weights `random_token_probs` (default:
    uniform over the ids with token_probs > 0, i.e. the non-special tokens).
    All draws use `generator` (on its own device; results are moved to input_ids.device), so the same
    generator state gives the same result.
    Returns (masked_ids int64 [B, L], labels int64 [B, L] = original id at targets, -100 elsewhere).
    """
    device = input_ids.device
    draw_device = generator.device
    flat_ids = input_ids.reshape(-1).to(draw_device)
    real = attention_mask.reshape(-1).to(draw_device) != 0
    weights = token_probs.to(device=draw_device, dtype=torch.float64)[flat_ids] * real
    n_candidates = int((weights > 0).sum())
    n_targets = min(n_candidates, max(math.floor(mask_prop * int(real.sum()) + 0.5), 1))
    masked = input_ids.reshape(-1).clone()
    labels = torch.full_like(masked, IGNORE_INDEX)
    if n_targets == 0:
        return masked.view(input_ids.shape), labels.view(input_ids.shape)
    targets = torch.multinomial(weights, n_targets, replacement=False, generator=generator)
    choice = torch.rand(n_targets, generator=generator, device=draw_device, dtype=torch.float64)
    total = word_mask + word_rand + word_keep
    if random_token_probs is None:
        random_token_probs = (token_probs[:vocab_size] > 0).to(torch.float64)
    random_ids = torch.multinomial(random_token_probs.to(device=draw_device, dtype=torch.float64)[:vocab_size],
                                   n_targets, replacement=True, generator=generator)
    original = flat_ids[targets]
    new_ids = torch.where(choice < word_mask / total, torch.full_like(original, mask_id),
                          torch.where(choice < (word_mask + word_rand) / total, random_ids, original))
    targets, original, new_ids = targets.to(device), original.to(device), new_ids.to(device)
    labels[targets] = original
    masked[targets] = new_ids
    return masked.view(input_ids.shape), labels.view(input_ids.shape)


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of the student's MLM predictions, 0-dim fp32 (fp64 for fp64 logits).

    logits: float [K, V] at the target positions; labels: int64 [K] (entries equal to -100 are ignored).
    K == 0 (or no valid label) gives a zero connected to `logits`.
    """
    if logits.shape[0] == 0:
        return _connected_zero(logits)
    total = F.cross_entropy(logits.to(_loss_dtype(logits.dtype)), labels, ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------------------
# Hidden states: MSE, cosine and contrastive (InfoNCE) losses between aligned teacher and student rows
# ---------------------------------------------------------------------------------------------------------


def masked_mean_pool(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over the real positions of every sequence: values [B, L, D], mask [B, L] (non-zero = real)
    -> [B, D] in values.dtype. Padding never enters the mean; a sequence without real positions gives 0."""
    weights = mask.to(device=values.device, dtype=values.dtype).unsqueeze(-1)
    return (values * weights).sum(1) / weights.sum(1).clamp_min(1)


def hidden_mse_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over rows of the squared Euclidean distance, (1/N) sum_i ||s_i - t_i||^2 (the paper's L_MSE:
    summed over the feature dimension, averaged over the N aligned rows).

    student, teacher: float [N, D] (already projected to one space). Returns a 0-dim fp32 tensor (fp64 for
    fp64 inputs); N == 0 gives a zero connected to both inputs.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} rows differ in shape")
    dtype = _loss_dtype(student.dtype)
    if student.shape[0] == 0:
        return _connected_zero(student) + _connected_zero(teacher).to(dtype)
    return (student.to(dtype) - teacher.to(dtype)).pow(2).sum(-1).mean()


def hidden_cosine_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over rows of 1 - cos(s_i, t_i) (torch's CosineEmbeddingLoss with target +1, as DistilBERT).

    student, teacher: float [N, D]. Returns a 0-dim fp32 tensor (fp64 for fp64 inputs); N == 0 gives a zero
    connected to both inputs.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} rows differ in shape")
    dtype = _loss_dtype(student.dtype)
    if student.shape[0] == 0:
        return _connected_zero(student) + _connected_zero(teacher).to(dtype)
    return (1 - F.cosine_similarity(student.to(dtype), teacher.to(dtype), dim=-1)).mean()


HIDDEN_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mse": hidden_mse_loss, "cos": hidden_cosine_loss}
"""Row-wise hidden-state losses by name (`--alpha_mse`, `--alpha_cos`): f(student [N, D], teacher [N, D])."""

SIMILARITIES = ("cosine", "poincare")
"""Similarity of the contrastive loss: cosine, or the negative Poincare distance at curvature c."""


def pointwise_similarity(a: Tensor, b: Tensor, metric: str = "cosine", c: float | Tensor | None = None) -> Tensor:
    """Similarity of matching rows: a, b float [..., D] (broadcasting) -> [...].

    "cosine": cos(a, b); "poincare": -d_c(a, b), the negative geodesic distance in the Poincare ball of
    curvature -c (a and b must lie in that ball; `c` is required).
    """
    if metric == "cosine":
        return F.cosine_similarity(a, b, dim=-1)
    if metric == "poincare":
        from hyptorch import pmath

        return -pmath.dist(a, b, c=_need_c(c))
    raise ValueError(f"unknown similarity {metric!r}; choose one of {SIMILARITIES}")


def pairwise_similarity(a: Tensor, b: Tensor, metric: str = "cosine", c: float | Tensor | None = None) -> Tensor:
    """Similarity of every row of a [N, D] with every row of b [M, D] -> [N, M] (see `pointwise_similarity`).
    Memory O(N M); the cosine form is one matrix product of the normalised rows."""
    if metric == "cosine":
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2)
    if metric == "poincare":
        from hyptorch import pmath

        return -pmath.dist_matrix(a, b, c=_need_c(c))
    raise ValueError(f"unknown similarity {metric!r}; choose one of {SIMILARITIES}")


def _need_c(c: float | Tensor | None) -> float | Tensor:
    if c is None:
        raise ValueError("the poincare similarity needs the curvature c")
    return c


def sample_without_replacement(n_candidates: Tensor, k: int,
                               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """For every row i, min(k, n_candidates[i]) distinct offsets drawn uniformly from 0..n_candidates[i]-1.

    n_candidates: int64 [N] (on the device where the draw happens). Returns (offsets int64 [N, k],
    valid bool [N, k]); invalid slots (rows with fewer than k candidates) hold 0. Robert Floyd's algorithm,
    vectorised over rows: k steps (a loop over the sample size, never over rows), O(N k^2) comparisons and
    O(N k) memory, whatever the number of candidates. Draws from `generator` (default: torch's global RNG
    on the device of `n_candidates`).
    """
    n = n_candidates.to(torch.long)
    device = n.device
    chosen = torch.full((n.shape[0], max(k, 0)), -1, dtype=torch.long, device=device)
    for i in range(max(k, 0)):
        top = n - k + i  # Floyd: draw t in [0, top]; if already chosen, take top itself
        usable = top >= 0
        draw = torch.rand(n.shape[0], generator=generator, device=device, dtype=torch.float64)
        t = torch.minimum((draw * (top.clamp_min(0) + 1)).long(), top.clamp_min(0))
        taken = (chosen[:, :i] == t.unsqueeze(1)).any(1)
        chosen[:, i] = torch.where(usable, torch.where(taken, top, t), -1)
    valid = chosen >= 0
    return chosen.clamp_min(0), valid


def info_nce_loss(positive: Tensor, negatives: Tensor, valid: Tensor | None = None, temperature: float = 1.0,
                  noise_prob: float = 0.0) -> Tensor:
    """InfoNCE from similarities: mean over rows i of -log(e^{p_i/T} / (e^{p_i/T} + sum_k e^{n_ik/T} + C_i)).

    positive: float [N], the anchor-positive similarities; negatives: float [N, K], anchor-negative
    similarities; valid: bool [N, K] (False slots are left out), None = all valid. C_i = K_i * noise_prob
    with K_i the number of valid negatives of row i: the noise term of NCE with a uniform noise distribution
    over a data set of 1/noise_prob items (`--add_neg_size_constant`, noise_prob = 1 / training-set size);
    0 by default. Computed in fp32 (fp64 stays fp64) with logsumexp. Returns a 0-dim tensor; N == 0 gives a
    zero connected to the inputs.
    """
    dtype = _loss_dtype(positive.dtype)
    if positive.shape[0] == 0:
        return _connected_zero(positive) + _connected_zero(negatives).to(dtype)
    pos = positive.to(dtype).unsqueeze(1) / temperature
    neg = negatives.to(dtype) / temperature
    if valid is not None:
        neg = neg.masked_fill(~valid, -math.inf)
    logits = [pos, neg]
    if noise_prob > 0:
        count = (valid.sum(1) if valid is not None else torch.full_like(positive, negatives.shape[1])).to(dtype)
        logits.append(torch.log(count * noise_prob).unsqueeze(1))
    return (torch.logsumexp(torch.cat(logits, 1), dim=1) - pos.squeeze(1)).mean()


NEGATIVE_SAMPLING = ("student", "teacher", "teacher_and_student")
"""Where the negatives come from (`--negative_sampling_strategy`); see `contrastive_loss`."""


def _pool_negatives(anchor: Tensor, pool: Tensor, pool_seq: Tensor | None, anchor_seq: Tensor | None, k: int,
                    metric: str, c: float | Tensor | None,
                    generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Similarities of every anchor i with negatives from `pool` [M, D], whose first N rows are aligned with
    the anchors (row i of the pool is the positive or the anchor itself and is never a negative of anchor i).

    With `anchor_seq` [N] / `pool_seq` [M] (sequence ids) the candidates of anchor i are restricted to the
    rows of its own sequence. k == -1: every candidate; else min(k, candidates) drawn uniformly without
    replacement. Returns (similarities [N, K'], valid bool [N, K']).
    """
    n, m = anchor.shape[0], pool.shape[0]
    sims = pairwise_similarity(anchor, pool, metric, c)  # [N, M]
    rows = torch.arange(n, device=anchor.device)
    if k == -1:
        valid = torch.ones(n, m, dtype=torch.bool, device=anchor.device)
        valid[rows, rows] = False
        if anchor_seq is not None:
            valid &= anchor_seq.unsqueeze(1) == pool_seq.unsqueeze(0)
        return sims, valid
    if anchor_seq is None:
        lo, hi = torch.zeros_like(rows), torch.full_like(rows, m)
        order, own = None, rows
    else:
        order = torch.argsort(pool_seq, stable=True)  # candidates of one sequence become contiguous
        sorted_seq = pool_seq[order]
        lo = torch.searchsorted(sorted_seq, anchor_seq, right=False)
        hi = torch.searchsorted(sorted_seq, anchor_seq, right=True)
        own = torch.empty_like(order)
        own[order] = torch.arange(m, device=anchor.device)
        own = own[:n]  # position of pool row i in the sorted order
    offsets, valid = sample_without_replacement(hi - lo - 1, k, generator)
    skip = own - lo  # offsets at or past the excluded row move one further
    picked = lo.unsqueeze(1) + offsets + (offsets >= skip.unsqueeze(1)).long()
    picked = picked.clamp_max(m - 1)
    if order is not None:
        picked = order[picked]
    return sims.gather(1, picked), valid


def contrastive_loss(teacher: Tensor, student: Tensor, *, strategy: str = "student", n_negatives: int = -1,
                     teacher_student_prop: float = 0.5, temperature: float = 1.0, metric: str = "cosine",
                     c: float | Tensor | None = None, sequence_ids: Tensor | None = None,
                     extra_teacher: Tensor | None = None, extra_teacher_seq: Tensor | None = None,
                     extra_student: Tensor | None = None, extra_student_seq: Tensor | None = None,
                     noise_prob: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """InfoNCE between aligned teacher and student rows, vectorised over rows.

    teacher, student: float [N, D] in one space (projected; points of the Poincare ball of curvature -c for
    metric "poincare"), row i of each forms the positive pair i. For every pair, the anchor is scored against
    its positive and against negatives from the other rows:
    - "student": anchor t_i, positive s_i, negatives student rows s_j (j != i);
    - "teacher": anchor s_i, positive t_i, negatives teacher rows t_j (j != i);
    - "teacher_and_student": anchor s_i, positive t_i, negatives round(K * teacher_student_prop) teacher
      rows t_j and the rest student rows s_j (j != i), as in SimCLR's NT-Xent where the other samples of
      both views are negatives. The anchor is the student row, so every similarity involves a trainable
      vector (with a teacher anchor, the teacher-teacher similarities of an unprojected frozen teacher would
      be constants).
    n_negatives K: per anchor and in total, drawn uniformly without replacement from each pool; -1 = every
    candidate of every pool (then teacher_student_prop is not used). Fewer candidates than K: all of them.
    sequence_ids: int64 [N], the sequence of every row; when given, negatives come only from the anchor's
    own sequence (`--from_one_sample`). extra_teacher [E_t, D] / extra_student [E_s, D] with their sequence
    ids (`--use_mismatched_ids`: rows without a partner, e.g. unmatched positions) join the teacher / student
    negative pools; they are never anchors or positives.
    Similarity: `pairwise_similarity(metric, c)` divided by `temperature`; `noise_prob` as in `info_nce_loss`.
    Randomness: `generator` (default: the global RNG of the device). Memory O(N (N + E)) for the similarity
    matrices; no Python loop over rows. Returns a 0-dim fp32 tensor (fp64 for fp64 inputs).
    """
    if strategy not in NEGATIVE_SAMPLING:
        raise ValueError(f"unknown negative sampling strategy {strategy!r}; choose one of {NEGATIVE_SAMPLING}")
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(f"{teacher.shape[0]} teacher rows but {student.shape[0]} student rows")
    n = teacher.shape[0]
    if n == 0:
        dtype = _loss_dtype(student.dtype)
        return _connected_zero(student) + _connected_zero(teacher).to(dtype)

    def pool(side: str) -> tuple[Tensor, Tensor | None]:
        rows, extra, extra_seq = (teacher, extra_teacher, extra_teacher_seq) if side == "teacher" else \
            (student, extra_student, extra_student_seq)
        seq = sequence_ids
        if extra is not None and extra.shape[0] > 0:
            rows = torch.cat([rows, extra.to(rows.dtype)])
            if seq is not None:
                if extra_seq is None:
                    raise ValueError(f"extra_{side}_seq is needed with sequence_ids")
                seq = torch.cat([seq, extra_seq.to(seq.device)])
        return rows, seq

    if strategy == "student":
        anchor, positive, pools = teacher, student, [("student", n_negatives)]
    elif strategy == "teacher":
        anchor, positive, pools = student, teacher, [("teacher", n_negatives)]
    else:
        n_teacher = -1 if n_negatives == -1 else math.floor(n_negatives * teacher_student_prop + 0.5)
        n_student = -1 if n_negatives == -1 else n_negatives - n_teacher
        anchor, positive, pools = student, teacher, [("teacher", n_teacher), ("student", n_student)]
    sims, valids = [], []
    for side, k in pools:
        if k == 0:
            continue
        rows, seq = pool(side)
        s, v = _pool_negatives(anchor, rows, seq, sequence_ids, k, metric, c, generator)
        sims.append(s)
        valids.append(v)
    positive_sim = pointwise_similarity(anchor, positive, metric, c)
    if not sims:
        sims, valids = [positive_sim.new_zeros(n, 0)], [torch.zeros(n, 0, dtype=torch.bool, device=anchor.device)]
    return info_nce_loss(positive_sim, torch.cat(sims, 1), torch.cat(valids, 1), temperature, noise_prob)
