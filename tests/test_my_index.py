"""`my_index.py`: the inverse-map gather and the fused gather+reduce against plain autograd indexing."""

from __future__ import annotations

import pytest
import torch

import my_index as mi
from my_index import inverse_pairs, my_index, my_index_reduce, restrict_inverse_map

N_STUDENT = 6
PAD_S = N_STUDENT
# Teacher rows split into student ids, padded with V_S: single pieces, a repeated piece (row 2), an
# unmapped row (3), splits of every length up to S = 3, and (row 8) pads that are not trailing.
T2S = torch.tensor([[0, PAD_S, PAD_S],
                    [1, 2, PAD_S],
                    [2, 2, 3],
                    [PAD_S, PAD_S, PAD_S],
                    [4, 5, 1],
                    [5, PAD_S, PAD_S],
                    [1, 3, PAD_S],
                    [0, 4, PAD_S],
                    [PAD_S, 3, 5]])
N_TEACHER = T2S.shape[0]


def inverse_by_loop(t2s: torch.Tensor, n_student: int, rows: list[int] | None = None,
                    cap: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s2t_padded, s2t_idxs_padded) [V_S, C] over `rows` (all teacher rows by default), pad V_T / 0; with
    `cap`, only the first `cap` (teacher, slot) pairs of each student id are kept."""
    n_teacher = t2s.shape[0]
    rows = list(range(n_teacher)) if rows is None else rows
    lists: list[list[tuple[int, int]]] = [[] for _ in range(n_student)]
    for v in rows:
        for j, u in enumerate(t2s[v].tolist()):
            if u != n_student:
                lists[u].append((v, j))
    if cap is not None:
        lists = [pairs[:cap] for pairs in lists]
    width = max(1, max(len(pairs) for pairs in lists))
    s2t = torch.full((n_student, width), n_teacher, dtype=torch.long)
    idxs = torch.zeros((n_student, width), dtype=torch.long)
    for u, pairs in enumerate(lists):
        for k, (v, j) in enumerate(pairs):
            s2t[u, k], idxs[u, k] = v, j
    return s2t, idxs


def extended(values: torch.Tensor, pad: float) -> torch.Tensor:
    """[N, V_S] -> [N, V_S + 1] with a constant pad column."""
    return torch.cat([values, values.new_full((values.shape[0], 1), pad)], dim=1)


def reference_reduce(values: torch.Tensor, t2s: torch.Tensor, mode: str) -> torch.Tensor:
    """Plain autograd: sum or logsumexp of values_ext[:, t2s] over the pieces."""
    if mode == "sum":
        return extended(values, 0.0)[:, t2s].sum(-1)
    return torch.logsumexp(extended(values, torch.finfo(values.dtype).min)[:, t2s], dim=-1)


@pytest.fixture
def small_blocks(monkeypatch):
    """Force many tiny blocks (rows, teacher rows and pairs) so that the blocking is exercised."""
    monkeypatch.setattr(mi, "MAX_CHUNK_ELEMENTS", 4)
    monkeypatch.setattr(mi, "MIN_BLOCK_ROWS", 1)


def test_inverse_by_loop_matches_hand_written():
    s2t, idxs = inverse_by_loop(T2S, N_STUDENT)
    # student id 2 occurs in row 1 (slot 1) and twice in row 2 (slots 0 and 1)
    assert s2t[2].tolist()[:3] == [1, 2, 2] and idxs[2].tolist()[:3] == [1, 0, 1]
    assert (s2t[2, 3:] == N_TEACHER).all()


def test_inverse_pairs_drops_pads_and_orders_by_student():
    s2t = torch.tensor([[3, 0, 5], [5, 5, 5], [1, -1, 2]], dtype=torch.int32)
    students, teachers, k = inverse_pairs(s2t, n_rows=5)
    assert students.tolist() == [0, 0, 2, 2]
    assert teachers.tolist() == [3, 0, 1, 2]
    assert k.tolist() == [0, 1, 0, 2]
    assert teachers.dtype == torch.long


@pytest.mark.parametrize("blocks", [False, True])
def test_my_index_forward_and_backward_equal_gather(blocks, request):
    if blocks:
        request.getfixturevalue("small_blocks")
    s2t, idxs = inverse_by_loop(T2S, N_STUDENT)
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(5, N_STUDENT + 1, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, N_TEACHER, T2S.shape[1], generator=gen, dtype=torch.float64)
    out = my_index(values, T2S, s2t, idxs)
    torch.testing.assert_close(out, values[:, T2S], rtol=0, atol=0)
    (grad,) = torch.autograd.grad((out * weight).sum(), values)
    (expected,) = torch.autograd.grad((values[:, T2S] * weight).sum(), values)
    # the pad column is a constant: its gradient is zero instead of the sum over all pad slots
    expected[:, PAD_S] = 0
    torch.testing.assert_close(grad, expected)
    # a non-contiguous incoming gradient (from a following sum) takes the other path
    (grad_sum,) = torch.autograd.grad(my_index(values, T2S, s2t, idxs).sum(-1).pow(2).sum(), values)
    (expected_sum,) = torch.autograd.grad(values[:, T2S].sum(-1).pow(2).sum(), values)
    expected_sum[:, PAD_S] = 0
    torch.testing.assert_close(grad_sum, expected_sum)


def test_my_index_gradcheck():
    s2t, idxs = inverse_by_loop(T2S, N_STUDENT)
    values = torch.randn(3, N_STUDENT + 1, dtype=torch.float64)
    values[:, PAD_S] = 0
    values.requires_grad_()
    # gradcheck perturbs the pad column too; compare on a function where that column is masked out
    keep = torch.ones(N_STUDENT + 1, dtype=torch.float64)
    keep[PAD_S] = 0
    assert torch.autograd.gradcheck(lambda x: my_index(x * keep, T2S, s2t, idxs), (values,))


def test_my_index_rejects_mismatched_inverse_maps():
    s2t, idxs = inverse_by_loop(T2S, N_STUDENT)
    values = torch.randn(2, N_STUDENT + 1)
    with pytest.raises(ValueError, match="inverse maps"):
        my_index(values, T2S, s2t[:-1], idxs[:-1])
    with pytest.raises(ValueError, match="inverse maps"):
        my_index(values, T2S, s2t, idxs[:, :-1])


@pytest.mark.parametrize("mode", ["sum", "logsumexp"])
@pytest.mark.parametrize("blocks", [False, True])
def test_my_index_reduce_equals_reference(mode, blocks, request):
    if blocks:
        request.getfixturevalue("small_blocks")
    s2t, _ = inverse_by_loop(T2S, N_STUDENT)
    gen = torch.Generator().manual_seed(1)
    values = (3 * torch.randn(5, N_STUDENT, generator=gen, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(5, N_TEACHER, generator=gen, dtype=torch.float64)
    out = my_index_reduce(values, T2S, s2t, mode)
    expected = reference_reduce(values, T2S, mode)
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad((out * weight).sum(), values)
    (expected_grad,) = torch.autograd.grad((expected * weight).sum(), values)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("mode", ["sum", "logsumexp"])
def test_my_index_reduce_gradcheck(mode, small_blocks):
    s2t, _ = inverse_by_loop(T2S, N_STUDENT)
    values = torch.randn(3, N_STUDENT, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: my_index_reduce(x, T2S, s2t, mode), (values,))


def test_my_index_reduce_unmapped_rows():
    s2t, _ = inverse_by_loop(T2S, N_STUDENT)
    values = torch.randn(4, N_STUDENT, requires_grad=True)
    assert (my_index_reduce(values, T2S, s2t, "sum")[:, 3] == 0).all()
    lse = my_index_reduce(values, T2S, s2t, "logsumexp")
    assert (lse[:, 3] == torch.finfo(torch.float32).min).all()
    (grad,) = torch.autograd.grad(lse[:, 3].sum(), values)
    assert (grad == 0).all()


def test_my_index_reduce_large_spread_logsumexp_is_exact():
    """Pieces hundreds apart (and huge negative ones) give the same results as torch.logsumexp."""
    values = torch.tensor([[0.0, 1.0, 500.0, -300.0, 2.0, -1e30]], dtype=torch.float64, requires_grad=True)
    s2t, _ = inverse_by_loop(T2S, N_STUDENT)
    out = my_index_reduce(values, T2S, s2t, "logsumexp")
    expected = reference_reduce(values, T2S, "logsumexp")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(out.sum(), values)
    (expected_grad,) = torch.autograd.grad(expected.sum(), values)
    torch.testing.assert_close(grad, expected_grad)


def test_my_index_reduce_bf16_computes_in_fp32():
    s2t, _ = inverse_by_loop(T2S, N_STUDENT)
    values = torch.randn(6, N_STUDENT).to(torch.bfloat16).requires_grad_()
    for mode in ("sum", "logsumexp"):
        out = my_index_reduce(values, T2S, s2t, mode)
        assert out.dtype == torch.bfloat16
        expected = reference_reduce(values.detach().float(), T2S, mode).to(torch.bfloat16)
        mapped = [v for v in range(N_TEACHER) if v != 3]
        torch.testing.assert_close(out[:, mapped], expected[:, mapped], rtol=0, atol=0)
        assert (out[:, 3] == (0 if mode == "sum" else torch.finfo(torch.bfloat16).min)).all()
        (grad,) = torch.autograd.grad(out.float().sum(), values)
        assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()


def test_my_index_reduce_rejects_bad_input():
    s2t, _ = inverse_by_loop(T2S, N_STUDENT)
    values = torch.randn(2, N_STUDENT)
    with pytest.raises(ValueError, match="unknown reduction"):
        my_index_reduce(values, T2S, s2t, "max")
    with pytest.raises(ValueError, match="inverse map"):
        my_index_reduce(values, T2S, s2t[:-1], "sum")


def test_my_index_reduce_empty_rows():
    s2t, _ = inverse_by_loop(T2S, N_STUDENT)
    values = torch.zeros(0, N_STUDENT, requires_grad=True)
    out = my_index_reduce(values, T2S, s2t, "logsumexp")
    assert out.shape == (0, N_TEACHER)
    out.sum().backward()
    assert values.grad.shape == (0, N_STUDENT)


@pytest.mark.parametrize("mode", ["sum", "logsumexp"])
def test_capped_inverse_map_gives_the_partial_sum(mode):
    """A capped inverse map drops pairs: their contributions are missing from the gradient, nothing else."""
    cap = 2
    s2t, idxs = inverse_by_loop(T2S, N_STUDENT, cap=cap)
    full, _ = inverse_by_loop(T2S, N_STUDENT)
    assert (full != N_TEACHER).sum(1).max() > cap  # the cap really drops pairs
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(3, N_STUDENT, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, N_TEACHER, generator=gen, dtype=torch.float64)
    out = my_index_reduce(values, T2S, s2t, mode)
    torch.testing.assert_close(out, reference_reduce(values, T2S, mode))  # the forward is exact
    (grad,) = torch.autograd.grad((out * weight).sum(), values)
    z = reference_reduce(values, T2S, mode).detach()
    expected = torch.zeros_like(values)
    for u in range(N_STUDENT):
        for v in s2t[u].tolist():
            if v == N_TEACHER:
                continue
            factor = 1.0 if mode == "sum" else torch.exp(values[:, u] - z[:, v])
            expected[:, u] += weight[:, v] * factor
    torch.testing.assert_close(grad, expected.detach())
    # the unfused variant drops the same pairs
    ext = extended(values, 0.0 if mode == "sum" else torch.finfo(torch.float64).min)
    gathered = my_index(ext, T2S, s2t, idxs)
    reduced = gathered.sum(-1) if mode == "sum" else torch.logsumexp(gathered, -1)
    (grad_gather,) = torch.autograd.grad((reduced * weight).sum(), values)
    torch.testing.assert_close(grad_gather, expected.detach())


def test_restrict_inverse_map():
    rows = torch.tensor([7, 1, 2, 5])
    s2t, idxs = inverse_by_loop(T2S, N_STUDENT)
    restricted, restricted_idxs = restrict_inverse_map(s2t, idxs, rows, N_TEACHER)
    assert restricted.shape == s2t.shape
    position = {int(v): k for k, v in enumerate(rows)}
    for u in range(N_STUDENT):
        for c in range(s2t.shape[1]):
            v = int(s2t[u, c])
            if v in position:
                assert restricted[u, c] == position[v] and restricted_idxs[u, c] == idxs[u, c]
            else:
                assert restricted[u, c] == rows.numel() and restricted_idxs[u, c] == 0
    only_map, none = restrict_inverse_map(s2t, None, rows, N_TEACHER)
    assert none is None and torch.equal(only_map, restricted)

    # used with the restricted rows, both functions give the gather's gradient
    sub = T2S[rows]
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(4, N_STUDENT + 1, generator=gen, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(my_index(values, sub, restricted, restricted_idxs).pow(2).sum(), values)
    (expected,) = torch.autograd.grad(values[:, sub].pow(2).sum(), values)
    expected[:, PAD_S] = 0
    torch.testing.assert_close(grad, expected)
    plain = values[:, :N_STUDENT].detach().requires_grad_()
    for mode in ("sum", "logsumexp"):
        out = my_index_reduce(plain, sub, restricted, mode)
        ref = reference_reduce(plain, sub, mode)
        torch.testing.assert_close(out, ref)
        (grad,) = torch.autograd.grad(out.pow(2).sum(), plain)
        (expected,) = torch.autograd.grad(ref.pow(2).sum(), plain)
        torch.testing.assert_close(grad, expected)
