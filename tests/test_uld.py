"""The `uld` alignment: `custom_step.uld_loss` against independent computations (numpy, scipy), its gradient, its
row chunking, and `train.py --align_logits uld` end to end (both --uld_positions, torchrun, resume, export)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from alignment_checks import (
    check_cache_teacher_refuses,
    check_one_line_error,
    check_resume_is_exact,
    check_torchrun_agrees,
)
from custom_step import uld_loss
from test_train import kd_flags, run_train


def sorted_padded(logits: np.ndarray, temperature: float, width: int) -> np.ndarray:
    """[N, width]: softmax(logits / T) per row, sorted in decreasing order, zero-padded on the right (numpy)."""
    z = logits / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros((len(p), width))
    out[:, :p.shape[1]] = -np.sort(-p, -1)
    return out


def brute_force(teacher: np.ndarray, student: np.ndarray, temperature: float) -> float:
    """Sort, pad, sum |difference| over columns, mean over rows: the loss as the brief states it."""
    width = max(teacher.shape[1], student.shape[1])
    return float(np.abs(sorted_padded(teacher, temperature, width)
                        - sorted_padded(student, temperature, width)).sum(-1).mean())


def via_scipy(teacher: np.ndarray, student: np.ndarray, temperature: float) -> float:
    """The same through `scipy.stats.wasserstein_distance`.

    Relation: the sorted-probability L1 is a W1 distance in the *value* space of the ranks, not over the tokens.
    Read the two sorted, zero-padded vectors a, b [W] as two functions of the rank k = 0..W-1. For non-increasing
    a, b with values in [0, 1], sum_k |a_k - b_k| = integral over the level y in [0, 1] of
    |#{k: a_k > y} - #{k: b_k > y}| dy; each count is W times the survival function of the multiset of the values
    {a_k} (a distribution of W atoms, weight 1 / W each) at y. So the L1 equals W times the 1-D Wasserstein-1
    distance between the empirical distributions of the values {a_k} and {b_k} (the padding zeros included), which
    is what scipy computes from the two value lists."""
    width = max(teacher.shape[1], student.shape[1])
    a, b = sorted_padded(teacher, temperature, width), sorted_padded(student, temperature, width)
    return float(np.mean([width * wasserstein_distance(x, y) for x, y in zip(a, b)]))


@pytest.mark.parametrize(("v_teacher", "v_student", "temperature"), [(13, 7, 2.0), (6, 11, 1.0), (9, 9, 0.5)])
def test_loss_equals_sorted_l1_and_scipy_w1(v_teacher, v_student, temperature):
    rng = np.random.default_rng(v_teacher)
    teacher, student = 3 * rng.normal(size=(5, v_teacher)), 3 * rng.normal(size=(5, v_student))
    got = float(uld_loss(torch.from_numpy(teacher), torch.from_numpy(student), temperature))
    assert got == pytest.approx(brute_force(teacher, student, temperature), rel=1e-12)
    assert got == pytest.approx(via_scipy(teacher, student, temperature), rel=1e-9)
    # fp32 logits: computed in fp32, same value
    f32 = uld_loss(torch.from_numpy(teacher).float(), torch.from_numpy(student).float(), temperature)
    assert f32.dtype == torch.float32 and float(f32) == pytest.approx(got, rel=1e-5)


def test_loss_properties():
    logits = torch.randn(4, 10, dtype=torch.float64)
    assert float(uld_loss(logits, logits, 2.0)) == pytest.approx(0, abs=1e-15)
    # invariant to permuting the columns (no vocabulary map); a distance in [0, 2] per row
    assert float(uld_loss(logits, logits[:, torch.randperm(10)], 2.0)) == pytest.approx(0, abs=1e-15)
    peaked, flat = torch.tensor([[100.0, 0, 0]]), torch.zeros(1, 50)
    assert float(uld_loss(peaked, flat, 1.0)) == pytest.approx(2 * (1 - 1 / 50), rel=1e-6)
    empty = torch.zeros(0, 5, requires_grad=True)
    loss = uld_loss(torch.zeros(0, 8), empty, 2.0)
    loss.backward()
    assert float(loss.detach()) == 0 and empty.grad is not None
    with pytest.raises(ValueError, match="same rows"):
        uld_loss(torch.zeros(3, 4), torch.zeros(2, 4), 1.0)


@pytest.mark.parametrize(("v_teacher", "v_student"), [(12, 7), (5, 9)])
def test_gradcheck_float64(v_teacher, v_student):
    torch.manual_seed(v_teacher)
    teacher = torch.randn(4, v_teacher, dtype=torch.float64)
    student = torch.randn(4, v_student, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: uld_loss(teacher, s, 1.5, chunk_rows=3), (student,))


def test_chunked_equals_unchunked():
    torch.manual_seed(0)
    teacher = torch.randn(37, 300)
    student = torch.randn(37, 120, requires_grad=True)
    grads, values = [], []
    for rows in (None, 1, 5, 37, 1000):
        student.grad = None
        loss = uld_loss(teacher, student, 2.0, chunk_rows=rows)
        loss.backward()
        values.append(loss.detach())
        grads.append(student.grad.clone())
    for value, grad in zip(values[1:], grads[1:]):
        torch.testing.assert_close(value, values[0], rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, grads[0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("positions", ["match", "reduce"])
def test_train_py_trains_uld_and_exports_a_plain_student(tmp_path, pipeline_out, teacher_dir, positions):
    from transformers import AutoModelForMaskedLM

    dump = tmp_path / "dump"
    argv = ["--pipeline_dir", str(pipeline_out), "--teacher_name", str(teacher_dir), "--align_logits", "uld",
            "--uld_positions", positions, "--dump_path", str(dump), "--device", "cpu", "--max_steps", "2",
            "--batch_size", "8", "--gradient_accumulation_steps", "1", "--valid_prop", "0.05", "--n_epoch", "1"]
    assert run_train(argv) == 0
    params = json.loads((dump / "parameters.json").read_text())
    filled = {flag for flag, value in params["alignment"].items() if value and flag in (
        "matching_ids", "t2s_mapping", "t2s_vocab_padded", "t2s_mapped_ids", "s2t_vocab_padded", "s2t_idxs_padded")}
    assert filled == ({"t2s_mapping"} if positions == "reduce" else set())
    summary = json.loads((dump / "train_summary.json").read_text())
    assert summary["global_step"] == 2
    assert all(np.isfinite(h["valid_loss"]) for h in summary["history"])
    assert f"KL: uld ({positions} rows, all teacher and all student columns" in (dump / "train.log").read_text()
    model = AutoModelForMaskedLM.from_pretrained(str(dump))
    assert model.config.vocab_size == json.loads((pipeline_out / "student" / "config.json").read_text())["vocab_size"]


def test_torchrun_two_cpu_processes_agree(tmp_path, pipeline_out, teacher_dir):
    check_torchrun_agrees(pipeline_out, tmp_path / "ddp", kd_flags(pipeline_out, teacher_dir, "uld_reduce"))


def test_resume_equals_uninterrupted(tmp_path, pipeline_out, teacher_dir):
    check_resume_is_exact(pipeline_out, tmp_path, kd_flags(pipeline_out, teacher_dir, "uld"))


@pytest.mark.parametrize(("extra", "needle"), [
    (["--align_logits", "match", "--matching_ids", "{out}/matched_vocab.json", "--uld_positions", "reduce"],
     "--uld_positions only applies to --align_logits uld"),
    (["--align_logits", "uld", "--matching_ids", "{out}/matched_vocab.json"],
     "--matching_ids is not read by --align_logits uld"),
    (["--align_logits", "uld", "--t2s_mapping", "{out}/teacher2student.json"],
     "--t2s_mapping is not read by --align_logits uld"),
    (["--align_logits", "uld", "--teacher_cache", "{out}/teacher_cache"],
     "--teacher_cache cannot serve --align_logits uld"),
])
def test_bad_flags_are_one_line_errors(tmp_path, pipeline_out, teacher_dir, capsys, extra, needle):
    check_one_line_error(pipeline_out, tmp_path / "dump", teacher_dir, extra, needle, capsys)


def test_cache_teacher_refuses_uld(capsys):
    check_cache_teacher_refuses("uld", capsys)
