"""`custom_step.py`: losses, pooling, reduce-map, column/row selection and MLM masking against independent
computations (loops, plain autograd, torch.nn.functional)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import custom_step
from custom_step import (
    IGNORE_INDEX,
    kl_and_mlm_loss,
    kl_div_loss,
    lm_head_logits,
    mlm_loss,
    mlm_mask,
    mlm_token_probs,
    reduce_map_logits,
    reduce_map_matrix,
    reduce_pool,
)
from student2teacher import invert

# ---------------------------------------------------------------------------------------------------------
# KL
# ---------------------------------------------------------------------------------------------------------


def kl_by_hand(teacher: list[list[float]], student: list[list[float]], temperature: float) -> float:
    """T^2 * mean over rows of sum_c p_c (log p_c - log q_c), p = softmax(t / T), q = softmax(s / T)."""
    total = 0.0
    for t_row, s_row in zip(teacher, student):
        t_norm = math.log(sum(math.exp(x / temperature) for x in t_row))
        s_norm = math.log(sum(math.exp(x / temperature) for x in s_row))
        for t, s in zip(t_row, s_row):
            log_p, log_q = t / temperature - t_norm, s / temperature - s_norm
            total += math.exp(log_p) * (log_p - log_q)
    return temperature ** 2 * total / len(teacher)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kl_equals_hand_computation(temperature):
    gen = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(5, 7, generator=gen, dtype=torch.float64)
    student = (3 * torch.randn(5, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    loss = kl_div_loss(teacher, student, temperature)
    assert loss.dim() == 0 and loss.dtype == torch.float64
    assert loss.item() == pytest.approx(kl_by_hand(teacher.tolist(), student.tolist(), temperature), rel=1e-12)
    # the reduction is "batchmean" (sum over columns, mean over rows), scaled by T^2
    batchmean = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                         reduction="batchmean", log_target=True) * temperature ** 2
    torch.testing.assert_close(loss, batchmean)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all()
    # d loss / d s = T * (q - p) / N
    expected = temperature * (torch.softmax(student / temperature, -1) - torch.softmax(teacher / temperature, -1)) / 5
    torch.testing.assert_close(grad, expected.detach())


def test_kl_zero_for_equal_logits_and_no_teacher_gradient():
    logits = torch.randn(4, 9)
    teacher = logits.clone().requires_grad_()
    student = logits.clone().requires_grad_()
    loss = kl_div_loss(teacher, student, 2.0)
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert teacher.grad is None
    assert student.grad.abs().max() < 1e-6
    # invariant to a constant shift of either side
    assert abs(kl_div_loss(logits + 5.0, logits - 3.0, 2.0).item()) < 1e-5


def test_kl_bf16_computes_in_fp32():
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(6, 11, generator=gen).to(torch.bfloat16)
    student = torch.randn(6, 11, generator=gen).to(torch.bfloat16).requires_grad_()
    loss = kl_div_loss(teacher, student, 2.0)
    assert loss.dtype == torch.float32
    expected = kl_by_hand(teacher.float().tolist(), student.detach().float().tolist(), 2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert student.grad.dtype == torch.bfloat16 and torch.isfinite(student.grad.float()).all()


def test_kl_teacher_minus_inf_columns_are_safe():
    teacher = torch.tensor([[1.0, float("-inf"), 0.5], [float("-inf"), 2.0, 0.0]])
    student = torch.tensor([[0.3, 4.0, -1.0], [2.0, 0.1, 0.2]], requires_grad=True)
    loss = kl_div_loss(teacher, student, 2.0)
    finite = [[1.0, -1e30, 0.5], [-1e30, 2.0, 0.0]]  # exp(-1e30 / T) == 0: the same distribution
    assert loss.item() == pytest.approx(kl_by_hand(finite, student.tolist(), 2.0), rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_kl_empty_rows_and_shape_mismatch():
    student = torch.zeros(0, 5, requires_grad=True)
    loss = kl_div_loss(torch.zeros(0, 5), student, 2.0)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert student.grad.shape == (0, 5)
    with pytest.raises(ValueError, match="differ in shape"):
        kl_div_loss(torch.zeros(2, 5), torch.zeros(2, 4), 2.0)


def kl_reference(teacher: torch.Tensor, student: torch.Tensor, temperature) -> torch.Tensor:
    """The straightforward autograd formula: clamped teacher log-softmax, student log-softmax, F.kl_div."""
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    log_p = F.log_softmax(teacher.detach().to(dtype) / temperature, -1).clamp_min(torch.finfo(dtype).min)
    log_q = F.log_softmax(student.to(dtype) / temperature, -1)
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True) * (temperature ** 2 / student.shape[0])


def kl_inputs(n: int, c: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random teacher and student logits [n, c] with teacher columns at -inf and at -1e30 in some rows."""
    gen = torch.Generator().manual_seed(seed)
    teacher = 4 * torch.randn(n, c, generator=gen, dtype=torch.float64)
    student = 4 * torch.randn(n, c, generator=gen, dtype=torch.float64)
    teacher[:, 1] = -math.inf
    teacher[::2, c - 1] = -1e30
    return teacher.to(dtype), student.to(dtype)


def finite_difference_check(fn, inputs: tuple[torch.Tensor, ...], eps: float = 1e-6, rtol: float = 1e-3,
                            atol: float = 1e-5) -> None:
    """gradcheck's numerical test for a 0-dim fp64 `fn(*inputs)` whose backward runs once per forward (the KL scales
    its saved buffer in place; gradcheck calls backward twice on one forward): the gradient of one backward against
    central differences, element by element, with gradcheck's default eps and tolerances."""
    grads = torch.autograd.grad(fn(*inputs), inputs)
    with torch.no_grad():
        for value, grad in zip(inputs, grads):
            flat, flat_grad = value.view(-1), grad.reshape(-1)
            for i in range(flat.numel()):
                x = flat[i].item()
                flat[i] = x + eps
                up = fn(*inputs).item()
                flat[i] = x - eps
                down = fn(*inputs).item()
                flat[i] = x
                numerical = (up - down) / (2 * eps)
                assert abs(flat_grad[i].item() - numerical) <= atol + rtol * abs(numerical), (i, flat_grad[i], numerical)


def kl_and_grad(fn, teacher: torch.Tensor, student: torch.Tensor, temperature) -> tuple[torch.Tensor, torch.Tensor]:
    student = student.detach().clone().requires_grad_()
    loss = fn(teacher, student, temperature)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kl_gradcheck_and_equal_to_the_reference_formula_in_float64(temperature):
    teacher, student = kl_inputs(6, 9, torch.float64, seed=3)
    student.requires_grad_()
    finite_difference_check(lambda s: kl_div_loss(teacher, s, temperature), (student,))
    loss, grad = kl_and_grad(kl_div_loss, teacher, student, temperature)
    ref_loss, ref_grad = kl_and_grad(kl_reference, teacher, student, temperature)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("block_rows", [None, 2])
def test_kl_learned_temperature_gradient(block_rows, monkeypatch):
    if block_rows is not None:
        monkeypatch.setitem(custom_step.KL_CHUNK_ELEMENTS, "cpu", block_rows * 7)
    teacher, student = kl_inputs(5, 7, torch.float64, seed=4)
    temperature = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    student.requires_grad_()
    finite_difference_check(lambda s, t: kl_div_loss(teacher, s, t), (student, temperature))
    finite = teacher.clamp_min(-50.0)  # the reference formula's temperature gradient is NaN at -inf columns
    grads = torch.autograd.grad(kl_div_loss(finite, student, temperature), (student, temperature))
    ref_grads = torch.autograd.grad(kl_reference(finite, student, temperature), (student, temperature))
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # an fp32 temperature with a bf16 student: the loss is fp32, the gradient reaches the temperature in fp32
    t32 = torch.tensor(2.0, requires_grad=True)
    kl_div_loss(finite.to(torch.bfloat16), student.detach().to(torch.bfloat16), t32).backward()
    assert t32.grad.dtype == torch.float32 and torch.isfinite(t32.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_rows", [None, 7])
def test_kl_equal_to_the_reference_formula_fp32_and_bf16(dtype, block_rows, monkeypatch):
    if block_rows is not None:  # row blocks of 7: 9 full blocks and a last one of 1 row
        monkeypatch.setitem(custom_step.KL_CHUNK_ELEMENTS, "cpu", block_rows * 300)
    teacher, student = kl_inputs(64, 300, dtype, seed=5)
    loss, grad = kl_and_grad(kl_div_loss, teacher, student, 2.0)
    ref_loss, ref_grad = kl_and_grad(kl_reference, teacher, student, 2.0)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert torch.isfinite(loss) and torch.isfinite(grad.float()).all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7 if dtype == torch.float32 else 1e-4)


def test_kl_keeps_only_q_minus_p_for_backward_and_is_once_differentiable():
    teacher, student = kl_inputs(8, 50, torch.float32, seed=6)
    student.requires_grad_()
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = kl_div_loss(teacher, student, 2.0)
    assert sum(t.numel() for t in saved) == 8 * 50  # q - p only
    (grad,) = torch.autograd.grad(loss, student, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()
    empty = torch.zeros(0, 50, requires_grad=True)
    loss = kl_div_loss(torch.zeros(0, 50), empty, 2.0)
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 50)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_backward_runs_once_per_forward(dtype):
    """The backward scales the saved q - p in place: the gradient of a first backward is right (and repeatable with
    a new forward), a second backward of the same graph (retain_graph) raises instead of scaling it twice."""
    teacher, student = kl_inputs(8, 50, dtype, seed=6)
    student.requires_grad_()
    loss = kl_div_loss(teacher, student, 2.0) * 3.0
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    _, ref_grad = kl_and_grad(kl_reference, teacher.double(), student.detach().double(), 2.0)
    tol = {"rtol": 1e-4, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-4}
    torch.testing.assert_close(first.double(), ref_grad * 3.0, **tol)
    with pytest.raises(RuntimeError, match="second time on one forward"):
        loss.backward()
    student.grad = None
    (kl_div_loss(teacher, student, 2.0) * 3.0).backward()
    assert torch.equal(student.grad, first)



def kl_mlm_inputs(dtype: torch.dtype, n_targets: int, seed: int = 7):
    """Teacher and student logits [12, 40] (`kl_inputs`) and labels [12] with `n_targets` target rows."""
    teacher, student = kl_inputs(12, 40, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.full((12,), IGNORE_INDEX, dtype=torch.long)
    rows = torch.randperm(12, generator=gen)[:n_targets]
    labels[rows] = torch.randint(0, 40, (n_targets,), generator=gen)
    return teacher, student, labels


def separate_kl_and_mlm(teacher, student, labels, temperature):
    """The two terms as the trainer computes them apart: the KL over every row, the MLM over the target rows."""
    targets = labels != IGNORE_INDEX
    return kl_div_loss(teacher, student, temperature), mlm_loss(student[targets], labels[targets])


@pytest.mark.parametrize("n_targets", [0, 1, 5, 12])
def test_kl_and_mlm_equal_the_two_losses_in_float64(n_targets):
    teacher, student, labels = kl_mlm_inputs(torch.float64, n_targets)
    student.requires_grad_()
    kl, mlm = kl_and_mlm_loss(teacher, student, labels, 2.0)
    (grad,) = torch.autograd.grad(5.0 * kl + 2.0 * mlm, student)
    ref_kl, ref_mlm = separate_kl_and_mlm(teacher, student, labels, 2.0)
    (ref_grad,) = torch.autograd.grad(5.0 * ref_kl + 2.0 * ref_mlm, student)
    assert kl.dtype == mlm.dtype == torch.float64 and kl.dim() == mlm.dim() == 0
    torch.testing.assert_close(kl, ref_kl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mlm, ref_mlm, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)

    def weighted(s: torch.Tensor) -> torch.Tensor:
        kl, mlm = kl_and_mlm_loss(teacher, s, labels, 2.0)
        return 5.0 * kl + 2.0 * mlm

    finite_difference_check(weighted, (student,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_and_mlm_in_fp32_from_any_student_dtype(dtype, monkeypatch):
    monkeypatch.setitem(custom_step.KL_CHUNK_ELEMENTS, "cpu", 5 * 40)  # row blocks of 5: 5, 5 and 2
    teacher, student, labels = kl_mlm_inputs(dtype, 4)
    student.requires_grad_()
    kl, mlm = kl_and_mlm_loss(teacher, student, labels, 2.0)
    (kl + 3.0 * mlm).backward()
    assert kl.dtype == mlm.dtype == torch.float32 and student.grad.dtype == dtype
    exact = student.detach().double().requires_grad_()
    ref_kl, ref_mlm = separate_kl_and_mlm(teacher.double(), exact, labels, 2.0)
    (ref_kl + 3.0 * ref_mlm).backward()
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mlm.double(), ref_mlm, rtol=1e-5, atol=1e-7)
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    # bf16: the fp32 sum of both terms' gradients rounded once, i.e. exactly the fp64 gradient's rounding (to
    # the nearest bf16, barring a double-rounding tie)
    expected = exact.grad.to(dtype) if dtype == torch.bfloat16 else exact.grad
    torch.testing.assert_close(student.grad.to(expected.dtype), expected, **tol)


def test_kl_and_mlm_edge_cases():
    teacher, student, labels = kl_mlm_inputs(torch.float32, 3)
    with pytest.raises(ValueError, match="differ in shape"):
        kl_and_mlm_loss(teacher, student, labels[:5], 2.0)
    empty = torch.zeros(0, 40, requires_grad=True)
    kl, mlm = kl_and_mlm_loss(torch.zeros(0, 40), empty, torch.zeros(0, dtype=torch.long), 2.0)
    (kl + mlm).backward()
    assert kl.item() == mlm.item() == 0.0 and empty.grad.shape == (0, 40)
    student.requires_grad_()
    kl, mlm = kl_and_mlm_loss(teacher, student, labels, 2.0)
    kl.backward(retain_graph=True)  # only the KL read: the MLM's gradient is 0
    torch.testing.assert_close(student.grad, torch.autograd.grad(kl_div_loss(teacher, student, 2.0), student)[0])
    with pytest.raises(RuntimeError, match="second time on one forward"):
        mlm.backward()


# ---------------------------------------------------------------------------------------------------------
# reduce_pool
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_reduce_pool_against_loops(mode):
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    segments = torch.tensor([0, 0, 1, 3, 3, 3, 4, 4, 6])  # 2 and 5 are empty, 7 is past the last piece
    out = reduce_pool(values, segments, 8, mode)
    assert out.shape == (8, 4) and out.dtype == torch.float64
    for seg in range(8):
        rows = [i for i, s in enumerate(segments.tolist()) if s == seg]
        if not rows:
            assert (out[seg] == 0).all()
            continue
        pooled = values[rows].sum(0)
        expected = pooled / len(rows) if mode == "mean" else pooled
        torch.testing.assert_close(out[seg], expected)
    (grad,) = torch.autograd.grad(out.sum(), values)
    counts = torch.bincount(segments, minlength=8).to(torch.float64)
    expected_grad = (1 / counts[segments] if mode == "mean" else torch.ones(9, dtype=torch.float64))
    torch.testing.assert_close(grad, expected_grad[:, None].expand(9, 4))


def test_reduce_pool_unsorted_segments_trailing_dims_and_bf16():
    values = torch.arange(12.0).view(3, 2, 2)
    out = reduce_pool(values, torch.tensor([1, 0, 1]), 2, "sum")
    torch.testing.assert_close(out, torch.stack([values[1], values[0] + values[2]]))
    out16 = reduce_pool(values.view(3, 4).to(torch.bfloat16), torch.tensor([1, 0, 1]), 2, "mean")
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), torch.stack([values[1], (values[0] + values[2]) / 2]).view(2, 4))
    with pytest.raises(ValueError, match="pooling mode"):
        reduce_pool(values, torch.tensor([0, 0, 1]), 2, "max")


def test_reduce_pool_of_collated_t2s_pieces():
    """The pipeline's use: pieces of the t2s run at real positions, pooled back to teacher positions."""
    t2s_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    t2s_segment = torch.tensor([[0, 1, 1, 2, 0], [3, 4, 4, 0, 0]])  # pads carry a dummy segment 0
    logits = torch.randn(2, 5, 3)
    pooled = reduce_pool(logits[t2s_mask], t2s_segment[t2s_mask], 5, "sum")
    torch.testing.assert_close(pooled, torch.stack([logits[0, 0], logits[0, 1] + logits[0, 2], logits[0, 3],
                                                    logits[1, 0], logits[1, 1] + logits[1, 2]]))


# ---------------------------------------------------------------------------------------------------------
# reduce_map_logits
# ---------------------------------------------------------------------------------------------------------

N_STUDENT = 6
N_TEACHER = 9
# t2s_padded as preprocessing/teacher_tokens_split.py writes it (int32, pad = V_S): a repeated piece
# (row 2), an unmapped row (3), a special token mapped to itself (0), splits up to S = 3.
T2S = np.array([[0, 6, 6], [1, 2, 6], [2, 2, 3], [6, 6, 6], [4, 5, 1], [5, 6, 6], [1, 3, 6], [0, 4, 6],
                [3, 5, 2]], dtype=np.int32)
MAPPED = np.array([1, 2, 4, 5, 6, 7, 8])  # t2s_mapped_ids: non-special, mapped rows
IMPLS = ["gather", "sparse", "my_index", "my_index_gather"]


def maps(cut_len: int = 100) -> dict[str, torch.Tensor]:
    """The reduce-map inputs as train.py loads them (artifacts.load_* cast to int64); the inverse map from
    preprocessing/student2teacher.py covers `MAPPED`."""
    s2t, idxs, _ = invert(T2S, MAPPED, N_STUDENT, cut_len, np.arange(N_TEACHER) * 10, seed=0)
    return {"t2s": torch.from_numpy(T2S.astype(np.int64)), "mapped": torch.from_numpy(MAPPED),
            "s2t_padded": torch.from_numpy(s2t.astype(np.int64)),
            "s2t_idxs_padded": torch.from_numpy(idxs.astype(np.int64))}


def dense_reference(reduced: torch.Tensor, columns: list[int], mode: str) -> torch.Tensor:
    """z(v) = sum (or logsumexp) of reduced[:, u] over the pieces u of teacher token v, by loops."""
    out = []
    for v in columns:
        pieces = [u for u in T2S[v].tolist() if u != N_STUDENT]
        scores = reduced[:, pieces]
        out.append(scores.sum(1) if mode == "sum" else torch.logsumexp(scores, 1))
    return torch.stack(out, 1)


def run_impl(impl: str, reduced: torch.Tensor, mode: str, columns: torch.Tensor | None, m: dict,
             **kwargs) -> torch.Tensor:
    return reduce_map_logits(reduced, m["t2s"], mode, columns, impl, s2t_padded=m["s2t_padded"],
                             s2t_idxs_padded=m["s2t_idxs_padded"], **kwargs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["sum", "logsumexp"])
def test_reduce_map_values_and_gradients_equal_dense_reference(impl, mode):
    m = maps()
    gen = torch.Generator().manual_seed(3)
    reduced = (2 * torch.randn(5, N_STUDENT, generator=gen, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(5, len(MAPPED), generator=gen, dtype=torch.float64)
    out = run_impl(impl, reduced, mode, m["mapped"], m)
    expected = dense_reference(reduced, MAPPED.tolist(), mode)
    assert out.shape == (5, len(MAPPED)) and out.dtype == torch.float64
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad((out * weight).sum(), reduced)
    (expected_grad,) = torch.autograd.grad((expected * weight).sum(), reduced)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_reduce_map_column_subset_in_any_order(impl):
    m = maps()
    columns = torch.tensor([8, 2, 5])
    reduced = torch.randn(4, N_STUDENT, dtype=torch.float64, requires_grad=True)
    for mode in ("sum", "logsumexp"):
        out = run_impl(impl, reduced, mode, columns, m)
        expected = dense_reference(reduced, columns.tolist(), mode)
        torch.testing.assert_close(out, expected)
        (grad,) = torch.autograd.grad(out.pow(2).sum(), reduced)
        (expected_grad,) = torch.autograd.grad(expected.pow(2).sum(), reduced)
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_reduce_map_all_rows_with_unmapped_row(impl):
    """columns=None scores every teacher row (the inverse map must then cover them all): the unmapped row
    scores 0 ("sum") or a huge negative number ("logsumexp") and gets no gradient."""
    m = maps()
    all_rows = np.arange(N_TEACHER)
    s2t, idxs, _ = invert(T2S, all_rows, N_STUDENT, 100, np.ones(N_TEACHER), seed=0)
    m["s2t_padded"], m["s2t_idxs_padded"] = torch.from_numpy(s2t), torch.from_numpy(idxs)  # int32 as written
    reduced = torch.randn(3, N_STUDENT, dtype=torch.float64, requires_grad=True)
    mapped_rows = [v for v in range(N_TEACHER) if v != 3]
    for mode in ("sum", "logsumexp"):
        out = run_impl(impl, reduced, mode, None, m)
        assert out.shape == (3, N_TEACHER)
        torch.testing.assert_close(out[:, mapped_rows], dense_reference(reduced, mapped_rows, mode))
        if mode == "sum":
            assert (out[:, 3] == 0).all()
        else:
            assert (out[:, 3] < reduced.min() - 80).all()
        (grad,) = torch.autograd.grad(out[:, 3].sum(), reduced)
        assert (grad == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_reduce_map_logsumexp_is_stable_for_large_logits(impl):
    """fp32 logits far beyond exp()'s range (+-200): every implementation shifts before exponentiating."""
    m = maps()
    reduced = torch.randn(3, N_STUDENT) * 3
    reduced[0] += 200
    reduced[1] -= 200
    reduced = reduced.requires_grad_()
    out = run_impl(impl, reduced, "logsumexp", m["mapped"], m)
    expected = dense_reference(reduced.double(), MAPPED.tolist(), "logsumexp")
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-4)
    (grad,) = torch.autograd.grad(out.sum(), reduced)
    (expected_grad,) = torch.autograd.grad(expected.sum(), reduced)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_reduce_map_sum_probs_is_the_sum_of_piece_probabilities():
    """--sum_probs: with log-probabilities as input, exp(z(v)) is the sum of v's pieces' probabilities."""
    m = maps()
    log_probs = torch.log_softmax(torch.randn(4, N_STUDENT, dtype=torch.float64), -1)
    probs = log_probs.exp()
    expected = torch.stack([sum(probs[:, u] for u in T2S[v] if u != N_STUDENT) for v in MAPPED], 1)
    for impl in IMPLS:
        z = run_impl(impl, log_probs, "logsumexp", m["mapped"], m)
        torch.testing.assert_close(z.exp(), expected)


def test_reduce_map_capped_inverse_map_approximates_only_the_gradient():
    """With the inverse map capped (cut_len), my_index keeps the exact forward and drops the gradient of
    the pairs that the map lost; gather and sparse need no inverse map and stay exact."""
    m = maps(cut_len=1)
    assert (m["s2t_padded"] != N_TEACHER).sum() < (T2S[MAPPED] != N_STUDENT).sum()
    reduced = torch.randn(3, N_STUDENT, dtype=torch.float64, requires_grad=True)
    expected = dense_reference(reduced, MAPPED.tolist(), "sum")
    (exact,) = torch.autograd.grad(expected.sum(), reduced)
    kept = torch.zeros(N_STUDENT, dtype=torch.float64)
    for u in range(N_STUDENT):
        kept[u] = int((m["s2t_padded"][u] != N_TEACHER).sum())
    for impl in IMPLS:
        out = run_impl(impl, reduced, "sum", m["mapped"], m)
        torch.testing.assert_close(out, expected)
        (grad,) = torch.autograd.grad(out.sum(), reduced)
        # d sum(z) / d reduced[:, u] counts the (teacher, slot) pairs of u that the backward sees
        torch.testing.assert_close(grad, (kept if impl.startswith("my_index") else exact[0]).expand(3, -1))


def test_reduce_map_sparse_with_prebuilt_matrix_and_matrix_contents():
    m = maps()
    matrix = reduce_map_matrix(m["t2s"], N_STUDENT, m["mapped"])
    dense = torch.zeros(len(MAPPED), N_STUDENT)
    for k, v in enumerate(MAPPED):
        for u in T2S[v]:
            if u != N_STUDENT:
                dense[k, u] += 1
    torch.testing.assert_close(matrix.to_dense(), dense)
    reduced = torch.randn(3, N_STUDENT)
    for mode in ("sum", "logsumexp"):
        torch.testing.assert_close(run_impl("sparse", reduced, mode, m["mapped"], m, map_matrix=matrix),
                                   run_impl("sparse", reduced, mode, m["mapped"], m))


@pytest.mark.parametrize("impl", IMPLS)
def test_reduce_map_bf16_and_empty_rows(impl):
    m = maps()
    reduced = torch.randn(4, N_STUDENT)
    for mode in ("sum", "logsumexp"):
        low = reduced.to(torch.bfloat16).requires_grad_()
        out = run_impl(impl, low, mode, m["mapped"], m)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), dense_reference(low.detach().float(), MAPPED.tolist(), mode),
                                   rtol=2e-2, atol=2e-2)
        out.float().sum().backward()
        assert low.grad.dtype == torch.bfloat16 and torch.isfinite(low.grad.float()).all()
        empty = torch.zeros(0, N_STUDENT, requires_grad=True)
        out = run_impl(impl, empty, mode, m["mapped"], m)
        assert out.shape == (0, len(MAPPED))
        out.sum().backward()
        assert empty.grad.shape == (0, N_STUDENT)


def test_reduce_map_rejects_bad_arguments():
    m = maps()
    reduced = torch.randn(2, N_STUDENT)
    with pytest.raises(ValueError, match="mode"):
        run_impl("gather", reduced, "max", None, m)
    with pytest.raises(ValueError, match="implementation"):
        run_impl("dense", reduced, "sum", None, m)
    with pytest.raises(ValueError, match="s2t_padded"):
        reduce_map_logits(reduced, m["t2s"], "sum", m["mapped"], "my_index")
    with pytest.raises(ValueError, match="s2t_idxs_padded"):
        reduce_map_logits(reduced, m["t2s"], "sum", m["mapped"], "my_index_gather", s2t_padded=m["s2t_padded"])


# ---------------------------------------------------------------------------------------------------------
# LM-head logits
# ---------------------------------------------------------------------------------------------------------


def test_lm_head_logits_equal_full_logits_then_columns():
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 8, generator=gen)
    weight = torch.randn(11, 8, generator=gen, requires_grad=True)
    bias = torch.randn(11, generator=gen, requires_grad=True)
    full = F.linear(hidden, weight, bias)
    torch.testing.assert_close(lm_head_logits(hidden, weight, bias, None), full, rtol=0, atol=0)
    columns = torch.tensor([10, 2, 5])
    part = lm_head_logits(hidden, weight, bias, columns)
    torch.testing.assert_close(part, full[:, [10, 2, 5]])
    torch.testing.assert_close(lm_head_logits(hidden, weight, None, columns), F.linear(hidden, weight)[:, [10, 2, 5]])
    # gradients reach only the selected rows of the output layer
    part.sum().backward()
    untouched = [i for i in range(11) if i not in (10, 2, 5)]
    assert (weight.grad[untouched] == 0).all() and (bias.grad[untouched] == 0).all()
    torch.testing.assert_close(weight.grad[2], hidden.sum(0))


# ---------------------------------------------------------------------------------------------------------
# MLM
# ---------------------------------------------------------------------------------------------------------

SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
VOCAB = 40


def test_mlm_token_probs():
    counts = np.array([100, 0, 5, 7, 1, 1000, 8], dtype=np.int64)
    probs = mlm_token_probs(counts, 0.7, [0, 4])
    assert probs.dtype == torch.float32
    expected = np.maximum(counts, 1).astype(np.float64) ** -0.7
    expected[[0, 4]] = 0
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-6)
    assert probs[1] > probs[2] > probs[6] > probs[5] > 0  # rarer tokens weigh more
    torch.testing.assert_close(mlm_token_probs(torch.from_numpy(counts), 0.7, [0, 4]), probs)
    torch.testing.assert_close(mlm_token_probs(counts, 0.0, []), torch.ones(7))


def batch(n_seqs: int, max_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] tokens [SEP] [PAD]... with random lengths; token ids avoid the specials."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((n_seqs, max_len), SPECIAL["pad"])
    mask = torch.zeros(n_seqs, max_len, dtype=torch.long)
    lengths = torch.randint(4, max_len + 1, (n_seqs,), generator=gen)
    for i, length in enumerate(lengths.tolist()):
        ids[i, 0], ids[i, length - 1] = SPECIAL["cls"], SPECIAL["sep"]
        ids[i, 1:length - 1] = torch.randint(len(SPECIAL), VOCAB, (length - 2,), generator=gen)
        mask[i, :length] = 1
    return ids, mask


def uniform_probs() -> torch.Tensor:
    return mlm_token_probs(np.ones(VOCAB, dtype=np.int64), 0.7, list(SPECIAL.values()))


def call_mask(ids, mask, probs, seed, prop=0.15, split=(0.8, 0.1, 0.1)):
    """mlm_mask with split = (word_mask, word_keep, word_rand)."""
    return mlm_mask(ids, mask, probs, prop, split[0], split[1], split[2], SPECIAL["mask"], VOCAB,
                    torch.Generator().manual_seed(seed))


def test_mlm_mask_count_targets_and_labels():
    ids, mask = batch(64, 30, seed=0)
    masked, labels = call_mask(ids, mask, uniform_probs(), seed=1)
    targets = labels != IGNORE_INDEX
    n_real = int(mask.sum())
    assert int(targets.sum()) == math.floor(0.15 * n_real + 0.5)  # the fraction of the real tokens
    assert (labels[targets] == ids[targets]).all()
    assert (masked[~targets] == ids[~targets]).all()  # untouched outside the targets
    special = torch.isin(ids, torch.tensor(list(SPECIAL.values())))
    assert not (targets & (mask == 0)).any() and not (targets & special).any()
    assert masked.dtype == labels.dtype == torch.long and masked.shape == labels.shape == ids.shape
    # the attention mask alone decides what padding is, whatever ids the padded positions hold
    filled = torch.where(mask == 0, torch.full_like(ids, 9), ids)
    masked, labels = call_mask(filled, mask, uniform_probs(), seed=1)
    assert not ((labels != IGNORE_INDEX) & (mask == 0)).any() and (masked[mask == 0] == 9).all()
    assert int((labels != IGNORE_INDEX).sum()) == math.floor(0.15 * n_real + 0.5)


def test_mlm_mask_replacement_split_and_random_tokens():
    ids, mask = batch(400, 64, seed=2)
    masked, labels = call_mask(ids, mask, uniform_probs(), seed=3)
    targets = labels != IGNORE_INDEX
    n = int(targets.sum())
    assert n > 2000
    new = masked[targets]
    is_mask = new == SPECIAL["mask"]
    kept = new == labels[targets]
    rand = ~is_mask & ~kept
    sigma = math.sqrt(0.1 * 0.9 / n)
    assert abs(is_mask.float().mean().item() - 0.8) < 4 * math.sqrt(0.16 / n)
    # a random draw equals the original with probability 1 / (non-special tokens)
    p_rand_differs = 0.1 * (1 - 1 / (VOCAB - len(SPECIAL)))
    assert abs(rand.float().mean().item() - p_rand_differs) < 4 * sigma
    assert abs(kept.float().mean().item() - (0.1 + 0.1 - p_rand_differs)) < 4 * sigma
    # random replacements are never special tokens
    assert not torch.isin(new[rand], torch.tensor(list(SPECIAL.values()))).any()
    # other splits (word_mask, word_keep, word_rand) are honoured too, and normalised
    masked, labels = call_mask(ids, mask, uniform_probs(), seed=3, split=(0.0, 2.0, 0.0))
    assert (masked == ids).all() and (labels != IGNORE_INDEX).sum() == n
    masked, labels = call_mask(ids, mask, uniform_probs(), seed=3, split=(1.6, 0.2, 0.2))
    assert abs((masked[targets] == SPECIAL["mask"]).float().mean().item() - 0.8) < 4 * math.sqrt(0.16 / n)
    masked, labels = call_mask(ids, mask, uniform_probs(), seed=3, split=(0.0, 0.0, 1.0))
    new = masked[labels != IGNORE_INDEX]
    assert not (new == SPECIAL["mask"]).any()
    assert (new == labels[labels != IGNORE_INDEX]).float().mean() < 0.1


def test_mlm_mask_is_deterministic_given_the_generator():
    ids, mask = batch(16, 20, seed=4)
    first = call_mask(ids, mask, uniform_probs(), seed=5)
    again = call_mask(ids, mask, uniform_probs(), seed=5)
    other = call_mask(ids, mask, uniform_probs(), seed=6)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other[1])
    # a shared generator advances: two successive calls differ
    gen = torch.Generator().manual_seed(5)
    one = mlm_mask(ids, mask, uniform_probs(), 0.15, 0.8, 0.1, 0.1, SPECIAL["mask"], VOCAB, gen)
    two = mlm_mask(ids, mask, uniform_probs(), 0.15, 0.8, 0.1, 0.1, SPECIAL["mask"], VOCAB, gen)
    assert torch.equal(one[1], first[1]) and not torch.equal(two[1], one[1])


def test_mlm_mask_favours_rare_tokens():
    """Weights count^-0.7: a token 1000x rarer is picked about 1000^0.7 ~ 126x more often per occurrence."""
    rare, frequent = 10, 11
    counts = np.ones(VOCAB, dtype=np.int64)
    counts[frequent] = 1000
    probs = mlm_token_probs(counts, 0.7, list(SPECIAL.values()))
    ids = torch.full((50, 40), frequent)
    ids[:, ::2] = rare
    mask = torch.ones_like(ids)
    picked_rare = picked_frequent = 0
    for seed in range(5):
        _, labels = call_mask(ids, mask, probs, seed=seed, prop=0.05)
        picked_rare += int((labels == rare).sum())
        picked_frequent += int((labels == frequent).sum())
    assert picked_rare > 20 * max(picked_frequent, 1)


def test_mlm_mask_small_inputs():
    probs = uniform_probs()
    # only specials: nothing to predict
    ids = torch.tensor([[SPECIAL["cls"], SPECIAL["sep"], SPECIAL["pad"]]])
    masked, labels = call_mask(ids, torch.tensor([[1, 1, 0]]), probs, seed=0)
    assert torch.equal(masked, ids) and (labels == IGNORE_INDEX).all()
    # a short sequence still gets one target
    ids = torch.tensor([[SPECIAL["cls"], 7, SPECIAL["sep"]]])
    _, labels = call_mask(ids, torch.ones_like(ids), probs, seed=0)
    assert labels.tolist() == [[IGNORE_INDEX, 7, IGNORE_INDEX]]
    # non-contiguous input ids
    ids, mask = batch(6, 12, seed=7)
    masked, labels = call_mask(ids.t().contiguous().t(), mask, probs, seed=1)
    expected = call_mask(ids, mask, probs, seed=1)
    assert torch.equal(masked, expected[0]) and torch.equal(labels, expected[1])


def test_mlm_loss_equals_cross_entropy_with_ignore_index():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(6, VOCAB, generator=gen, requires_grad=True)
    labels = torch.tensor([3, IGNORE_INDEX, 17, 0, IGNORE_INDEX, 39])
    loss = mlm_loss(logits, labels)
    expected = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad)
    low = mlm_loss(logits.detach().to(torch.bfloat16), labels)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, F.cross_entropy(logits.detach().to(torch.bfloat16).float(), labels,
                                                    ignore_index=IGNORE_INDEX))


def test_mlm_loss_without_targets_is_a_connected_zero():
    empty = torch.zeros(0, VOCAB, requires_grad=True)
    loss = mlm_loss(empty, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert empty.grad.shape == (0, VOCAB)
    logits = torch.randn(2, VOCAB, requires_grad=True)
    loss = mlm_loss(logits, torch.full((2,), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()
    assert (logits.grad == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["sum", "logsumexp"])
def test_reduce_map_under_bf16_autocast(impl, mode):
    """Every implementation runs forward and backward inside CPU bf16 autocast (as train.py --precision bf16 runs
    it) and agrees with the fp32 computation to bf16 precision."""
    m = maps()
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(5, 6, generator=gen)
    weight = torch.randn(N_STUDENT, 6, generator=gen)
    kwargs = {"s2t_padded": m["s2t_padded"], "s2t_idxs_padded": m["s2t_idxs_padded"]}
    results = []
    for autocast in (False, True):
        h = hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            z = reduce_map_logits(h @ weight.t(), m["t2s"], mode, m["mapped"], impl, **kwargs)
        z.float().pow(2).sum().backward()
        results.append((z.detach().float(), h.grad))
    (z32, g32), (z16, g16) = results
    torch.testing.assert_close(z16, z32, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(g16, g32, rtol=1e-1, atol=1e-1 * float(g32.abs().max()))
