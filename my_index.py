"""A gather over the teacher->student split map whose backward uses the inverse (student->teacher) map.

The reduce-map alignment scores every teacher token v from the student pieces of its split:
`values[:, t2s_padded]` with `values: [N, V_S + 1]` (the last column is the pad column) and
`t2s_padded: [V_T, S]` gives an `[N, V_T, S]` tensor. Autograd's backward for that advanced indexing is a
dense scatter (`index_put_(accumulate=True)`) over all N x V_T x S entries. `MyIndex` replaces it by a
gather through the inverse map: `s2t_padded[u]` lists the teacher ids whose split contains student id u
and `s2t_idxs_padded[u]` the slot of u in that split, so

    grad_values[:, u] = sum_k grad_out[:, s2t_padded[u, k], s2t_idxs_padded[u, k]]

(pad entries, teacher id == V_T, contribute nothing; the pad column gets a zero gradient). When every
student id's inverse list fits in the map's width C the gradient is exact. When the inverse map was capped
(the preprocessing keeps at most `cut_len` teacher ids per student id, sampled by teacher frequency), the
dropped (v, slot) pairs contribute nothing, so the gradient of frequent student pieces is a partial sum:
an approximation, as in the paper.

`MyIndex` still materialises its `[N, V_T, S]` output, and a following logsumexp saves it (and builds
several more of that size in its backward); on CPU that forward tensor, not autograd's scatter, dominates
the peak memory (see bench/reduce_map.py). `MyIndexReduce` therefore fuses the gather with the reduction
over the pieces (sum or logsumexp) and takes `values` without the pad column. It works on blocks of rows
of `values`, transposed so that every gathered entry is a contiguous run of at least MIN_BLOCK_ROWS
values, and on the split lists grouped by length (pads removed: real splits average ~2 pieces for a
width S of ~10, so a padded gather would do several times the work). Forward: for each group of teacher
rows with L pieces, gather `[rows, L, block]` and reduce it over L (torch.logsumexp: max-shifted, so
nothing overflows), then copy the results into place; nothing is scattered or accumulated. Backward: the
same over the inverse map, its student ids grouped by the length of their lists, using
d z(v) / d values[:, u] = 1 ("sum") or exp(values[:, u] - z(v)) ("logsumexp") for every occurrence of u in
the split of v (so the slots are not needed), summed over the list and copied into place. Deterministic,
no atomics. The same capping caveat applies, and the inverse map must list the pairs of every scored
teacher row (the pipeline's maps cover `t2s_mapped_ids`: score those columns).

Memory bounds, besides inputs, outputs and the gradient of `values`: the grouped lists (int64, about
P = number of (teacher, piece) pairs entries) and temporaries of at most max(MAX_CHUNK_ELEMENTS,
MIN_BLOCK_ROWS * max(V_T, V_S)) entries each: in `MyIndex.backward` one gradient block plus its int64
flat indices; in `MyIndexReduce` up to five at a time (transposed fp32 blocks of the values or of the
incoming gradient and, for logsumexp, of the saved output; the output or gradient block being filled; the
gathered pieces with one same-sized intermediate).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

MAX_CHUNK_ELEMENTS = 1 << 18
"""Upper bound on the entries of one temporary block (rows of `values` x a block of pairs, or x a block of
teacher rows x S), unless MIN_BLOCK_ROWS x max(V_T, V_S) is larger."""


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other floating dtype accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def inverse_pairs(s2t_padded: Tensor, n_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """The valid entries of an inverse map `[V_S, C]` as three int64 vectors [P], ordered by student id:
    (student id u, teacher row v = s2t_padded[u, k], column k); pad entries (v outside 0..n_rows-1) are
    dropped."""
    valid = (s2t_padded >= 0) & (s2t_padded < n_rows)
    students, k = valid.nonzero(as_tuple=True)
    return students, s2t_padded[students, k].long(), k


class MyIndex(torch.autograd.Function):
    """`values[:, t2s_padded]` with a backward through the inverse map (see the module docstring)."""

    @staticmethod
    def forward(ctx: FunctionCtx, values: Tensor, t2s_padded: Tensor, s2t_padded: Tensor,
                s2t_idxs_padded: Tensor) -> Tensor:
        """Gather the split pieces of every teacher row.

        values: float [N, V_S + 1], last column = pad column.
        t2s_padded: int [V_T, S], student ids, pad = V_S.
        s2t_padded: int [V_S, C], teacher row ids (0..V_T-1), pad = V_T.
        s2t_idxs_padded: int [V_S, C], the slot j with t2s_padded[s2t_padded[u, k], j] == u; pad = 0.
        Returns values.dtype [N, V_T, S] == values[:, t2s_padded].
        """
        n_cols = values.shape[1]
        if s2t_padded.shape != s2t_idxs_padded.shape or s2t_padded.shape[0] != n_cols - 1:
            raise ValueError(f"inverse maps {tuple(s2t_padded.shape)} / {tuple(s2t_idxs_padded.shape)} do not "
                             f"match values with {n_cols} columns (V_S + 1)")
        n_rows, width = t2s_padded.shape
        ctx.save_for_backward(s2t_padded, s2t_idxs_padded)
        ctx.shape = (values.shape[0], n_cols, n_rows, width)
        ctx.dtype = values.dtype
        return values.index_select(1, t2s_padded.reshape(-1)).view(values.shape[0], n_rows, width)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        """grad_values[:, u] = sum_k grad_out[:, s2t_padded[u, k], s2t_idxs_padded[u, k]], chunked over pairs."""
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        s2t_padded, s2t_idxs_padded = ctx.saved_tensors
        n, n_cols, n_rows, width = ctx.shape
        students, teachers, k = inverse_pairs(s2t_padded, n_rows)
        slots = s2t_idxs_padded[students, k].long()
        grad = torch.zeros(n, n_cols, dtype=_accumulation_dtype(ctx.dtype), device=grad_out.device)
        flat = grad_out.view(n, n_rows * width) if grad_out.is_contiguous() else None
        for block in _blocks(students.numel(), n):
            if flat is not None:
                part = flat.index_select(1, teachers[block] * width + slots[block])
            else:
                part = grad_out[:, teachers[block], slots[block]]
            grad.index_add_(1, students[block], part.to(grad.dtype))
        return grad.to(ctx.dtype), None, None, None


REDUCTIONS = ("sum", "logsumexp")
"""Reductions over the pieces of a teacher token supported by `MyIndexReduce`."""


MIN_BLOCK_ROWS = 16
"""Fewest rows per block in `MyIndexReduce` (16 fp32 values = one 64-byte cache line per gathered entry)."""


def _blocks(n_items: int, n: int) -> list[slice]:
    """Slices over `n_items` items such that one [block, n] temporary holds at most MAX_CHUNK_ELEMENTS."""
    step = max(1, MAX_CHUNK_ELEMENTS // max(n, 1))
    return [slice(start, start + step) for start in range(0, n_items, step)]


def _row_blocks(n: int, width: int) -> list[slice]:
    """Slices over the n rows of `values`: as many rows as keep a [width, rows] temporary within
    MAX_CHUNK_ELEMENTS, but at least MIN_BLOCK_ROWS (and at most n)."""
    step = min(max(n, 1), max(MIN_BLOCK_ROWS, MAX_CHUNK_ELEMENTS // max(width, 1)))
    return [slice(start, start + step) for start in range(0, n, step)]


def _grouped_lists(lists: Tensor, valid: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The rows of a padded list matrix grouped by their number of valid entries, pads removed.

    lists: int [R, W]; valid: bool [R, W], the entries that are not padding (anywhere in the row).
    Returns [(rows int64 [R_L], entries int64 [R_L, L])] for every length L >= 1 that occurs, the entries
    of each row in their original order. Rows without a valid entry are in no group.
    """
    rows, cols = valid.nonzero(as_tuple=True)
    entries = lists[rows, cols].long()
    lengths = valid.sum(1)
    starts = lengths.cumsum(0) - lengths
    groups = []
    for length in lengths.unique().tolist():
        if length == 0:
            continue
        ids = (lengths == length).nonzero().squeeze(1)
        offsets = starts[ids, None] + torch.arange(length, device=lists.device)
        groups.append((ids, entries[offsets]))
    return groups


class MyIndexReduce(torch.autograd.Function):
    """`reduce(values[:, t2s_padded], dim=-1)` without the `[N, V_T, S]` tensor (see the module docstring)."""

    @staticmethod
    def forward(ctx: FunctionCtx, values: Tensor, t2s_padded: Tensor, s2t_padded: Tensor, mode: str) -> Tensor:
        """Reduce the split pieces of every teacher row.

        values: float [N, V_S], finite (no pad column: pads contribute nothing).
        t2s_padded: int [V_T, S], student ids, pad = V_S.
        s2t_padded: int [V_S, C], teacher row ids (0..V_T-1), pad = V_T; only the backward reads it.
        mode: "sum" or "logsumexp". Returns values.dtype [N, V_T], accumulated in fp32 (fp64 for fp64).
        A row without pieces gives 0 ("sum") or finfo(values.dtype).min ("logsumexp", the finite stand-in
        for log 0), as the padded gather does.
        """
        if mode not in REDUCTIONS:
            raise ValueError(f"unknown reduction {mode!r}")
        n, n_student = values.shape
        n_rows = t2s_padded.shape[0]
        if s2t_padded.shape[0] != n_student:
            raise ValueError(f"inverse map with {s2t_padded.shape[0]} rows does not match values with "
                             f"{n_student} columns (V_S)")
        dtype = _accumulation_dtype(values.dtype)
        empty = 0.0 if mode == "sum" else torch.finfo(values.dtype).min
        groups = _grouped_lists(t2s_padded, t2s_padded != n_student)
        out = values.new_empty((n, n_rows))
        for rows in _row_blocks(n, max(n_rows, n_student)):
            values_t = values[rows].t().to(dtype).contiguous()
            width = values_t.shape[1]
            out_t = values_t.new_full((n_rows, width), empty)
            for teachers, students in groups:
                length = students.shape[1]
                for b in _blocks(teachers.numel(), length * width):
                    pieces = values_t.index_select(0, students[b].reshape(-1)).view(-1, length, width)
                    out_t.index_copy_(0, teachers[b], pieces.sum(1) if mode == "sum" else torch.logsumexp(pieces, 1))
            out[rows] = out_t.t()
        ctx.mode, ctx.dtype, ctx.n_rows = mode, values.dtype, n_rows
        ctx.save_for_backward(s2t_padded, *((values, out) if mode == "logsumexp" else ()))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        """grad_values[:, u] = sum over the inverse list of u (teacher rows v) of grad_out[:, v] * dz(v)/dvalues[:, u]."""
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        s2t_padded, *saved = ctx.saved_tensors
        n, n_student, n_rows = grad_out.shape[0], s2t_padded.shape[0], ctx.n_rows
        dtype = _accumulation_dtype(ctx.dtype)
        groups = _grouped_lists(s2t_padded, (s2t_padded >= 0) & (s2t_padded < n_rows))
        grad = grad_out.new_empty((n, n_student), dtype=ctx.dtype)
        for rows in _row_blocks(n, max(n_rows, n_student)):
            grad_t = grad_out[rows].t().to(dtype).contiguous()
            width = grad_t.shape[1]
            if ctx.mode == "logsumexp":
                values_t, out_t = (t[rows].t().to(dtype).contiguous() for t in saved)
            acc = grad_t.new_zeros((n_student, width))
            for students, teachers in groups:
                length = teachers.shape[1]
                for b in _blocks(students.numel(), length * width):
                    v = teachers[b].reshape(-1)
                    part = grad_t.index_select(0, v).view(-1, length, width)
                    if ctx.mode == "logsumexp":
                        factor = out_t.index_select(0, v).view(-1, length, width).neg_()
                        part *= factor.add_(values_t.index_select(0, students[b]).unsqueeze(1)).exp_()
                    acc.index_copy_(0, students[b], part.sum(1))
            grad[rows] = acc.t()
        return grad, None, None, None


def my_index(values: Tensor, t2s_padded: Tensor, s2t_padded: Tensor, s2t_idxs_padded: Tensor) -> Tensor:
    """`values[:, t2s_padded]` ([N, V_S + 1] -> [N, V_T, S], values.dtype) with the inverse-map backward."""
    return MyIndex.apply(values, t2s_padded, s2t_padded, s2t_idxs_padded)


def my_index_reduce(values: Tensor, t2s_padded: Tensor, s2t_padded: Tensor, mode: str = "sum") -> Tensor:
    """Sum or logsumexp over the split pieces of every teacher row ([N, V_S] -> [N, V_T], values.dtype)
    through `MyIndexReduce`: never materialises [N, V_T, S]; backward through the inverse map `s2t_padded`."""
    return MyIndexReduce.apply(values, t2s_padded, s2t_padded, mode)


def restrict_inverse_map(s2t_padded: Tensor, s2t_idxs_padded: Tensor | None, rows: Tensor,
                         n_teacher: int) -> tuple[Tensor, Tensor | None]:
    """Re-express an inverse map over a subset of teacher rows, for `my_index(values, t2s_padded[rows], ...)`.

    s2t_padded, s2t_idxs_padded: int [V_S, C] over teacher ids 0..n_teacher-1 (pad = n_teacher / 0); the
    slots may be None. rows: int [K], distinct teacher ids (e.g. `t2s_mapped_ids`).
    Returns [V_S, C] maps (int32, or int64 beyond 2^31 rows) whose teacher entries are positions 0..K-1 in
    `rows`, pad = K (slots 0, or None); entries for teacher ids outside `rows` become pad, which is exact:
    those rows receive no gradient once they are not selected.
    """
    index_dtype = torch.int32 if rows.numel() < 2**31 - 1 else torch.long
    lookup = torch.full((n_teacher + 1,), rows.numel(), dtype=index_dtype, device=rows.device)
    lookup[rows] = torch.arange(rows.numel(), dtype=index_dtype, device=rows.device)
    restricted = lookup[s2t_padded]
    if s2t_idxs_padded is None:
        return restricted, None
    return restricted, torch.where(restricted < rows.numel(), s2t_idxs_padded, 0)
