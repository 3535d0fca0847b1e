"""The teacher-output cache: the KL estimators against the exact KL, cached training against online training,
mismatched or broken caches, a resumed build, the pipeline step and torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from custom_step import kl_div_from_log_probs, kl_div_loss, kl_div_sampled, kl_div_top_k
from test_alignment_regression import tensorboard_scalars
from test_train import run_train

ROOT = Path(__file__).resolve().parents[1]
T = 2.0


def _logits(n: int = 6, c: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3, torch.randn(n, c, generator=g, dtype=torch.float64).float()


def _grad(loss_fn, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = student.clone().requires_grad_(True)
    loss = loss_fn(s)
    loss.backward()
    return loss.detach(), s.grad


def test_kl_from_log_probs_and_top_k_of_every_column_equal_the_exact_kl():
    teacher, student = _logits()
    probs = torch.softmax(teacher / T, -1)
    exact, g_exact = _grad(lambda s: kl_div_loss(teacher, s, T), student)
    value, grad = _grad(lambda s: kl_div_from_log_probs(torch.log_softmax(teacher / T, -1), s, T), student)
    assert torch.equal(value, exact) and torch.equal(grad, g_exact)  # the same computation from log p on
    columns = torch.argsort(probs, -1, descending=True)
    value, grad = _grad(lambda s: kl_div_top_k(columns, probs.gather(1, columns), s, T), student)
    torch.testing.assert_close(value, exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, g_exact, rtol=1e-4, atol=1e-6)


def test_top_k_is_the_kl_of_k_classes_and_a_tail():
    teacher, student = _logits()
    p, q = torch.softmax(teacher / T, -1), torch.softmax(student / T, -1)
    columns = torch.topk(p, 3, -1).indices
    pk, qk = p.gather(1, columns), q.gather(1, columns)
    p_full = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    q_full = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    expected = (p_full * (p_full.log() - q_full.log())).sum(-1).mean() * T ** 2
    torch.testing.assert_close(kl_div_top_k(columns, pk, student, T), expected, rtol=1e-5, atol=1e-6)


def test_sampled_kl_is_unbiased():
    """Averaged over R draws of K columns, the estimator's value and gradient match the exact KL within 5 standard
    errors derived from their variance (p_c (1 - p_c) / K per column for the gradient)."""
    teacher, student = _logits(n=4, c=7, seed=3)
    p = torch.softmax(teacher / T, -1)
    entropy = -(p * p.log()).sum(-1)
    exact, g_exact = _grad(lambda s: kl_div_loss(teacher, s, T), student)
    k, repeats = 8, 4000
    g = torch.Generator().manual_seed(0)
    values, grads = [], []
    for _ in range(repeats):
        draws = torch.multinomial(p, k, replacement=True, generator=g)
        value, grad = _grad(lambda s, d=draws: kl_div_sampled(d, None, entropy, s, T), student)
        values.append(value)
        grads.append(grad)
    values, grads = torch.stack(values), torch.stack(grads)
    n = teacher.shape[0]
    grad_se = T / n * torch.sqrt(p * (1 - p) / (k * repeats))
    assert ((grads.mean(0) - g_exact).abs() <= 5 * grad_se + 1e-7).all()
    assert abs(float(values.mean() - exact)) <= 5 * float(values.std() / repeats ** 0.5)
    counts = torch.ones(n, k, dtype=torch.long)
    torch.testing.assert_close(kl_div_sampled(draws, counts, entropy, student, T),
                               kl_div_sampled(draws, None, entropy, student, T))


def _build(pipeline_out: Path, teacher: Path, out: Path, align: str, fmt: str = "exact", **extra) -> dict:
    from cache_teacher import CacheParams, build

    params = CacheParams(pipeline_dir=str(pipeline_out), teacher_name=str(teacher), align_logits=align, out=str(out),
                         encoding=fmt, dtype="fp32", device="cpu", **extra)
    return build(params, log=lambda *_: None)


def _run(pipeline_out: Path, teacher: Path, dump: Path, align: str, *extra: str) -> int:
    argv = ["--pipeline_dir", str(pipeline_out), "--teacher_name", str(teacher), "--align_logits", align,
            "--dump_path", str(dump), "--device", "cpu", "--max_steps", "10", "--batch_size", "8",
            "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--warmup_prop", "0", "--log_interval",
            "1", "--checkpoint_interval", "5", "--valid_prop", "0.1", "--n_epoch", "1", *extra]
    return run_train(argv)


def test_length_sorted_windows_put_the_rows_back_in_shard_order():
    """The builder computes each window's sequences in order of length and writes their rows in shard order."""
    import numpy as np

    from cache_teacher import length_sorted_windows, rows_in_order, window_size

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, size=23)
    rows = rng.integers(0, 5, size=23)  # rows per sequence, some with none
    starts = np.concatenate([[0], np.cumsum(rows)])
    written, seen = [], []
    for order, batches in length_sorted_windows(lengths, batch_size=3, window=7):
        done = np.concatenate(batches)
        assert sorted(done.tolist()) == order.tolist() and len(order) <= 7 and all(len(b) <= 3 for b in batches)
        assert (np.diff(lengths[done]) >= 0).all()  # one window's batches go by length
        computed = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in done])  # row ids, computed order
        written.append(computed[rows_in_order(done, rows[done], order)])
        seen += order.tolist()
    assert seen == list(range(23))
    assert np.concatenate(written).tolist() == list(range(int(rows.sum())))
    assert window_size(64, 36, 20.0) == 64 * 64 and window_size(64, 10**6, 20.0) == 64  # bounded by bytes


@pytest.mark.parametrize("align", ["match", "reduce", "reduce_map"])
def test_exact_cache_trains_like_the_online_teacher(tmp_path, golden, align):
    """fp32 `exact` cache vs the teacher in the loop, on the fixed fixture whose teacher is peaked (its KL is far
    from 0, so relative differences measure the teacher's values, not cancellation in a near-zero KL)."""
    pipeline_out, teacher_dir = golden["out"], golden["teacher"]
    cache = tmp_path / "cache"
    _build(pipeline_out, teacher_dir, cache, align)
    assert _run(pipeline_out, teacher_dir, tmp_path / "online", align) == 0
    assert _run(pipeline_out, teacher_dir, tmp_path / "cached", align, "--teacher_cache", str(cache)) == 0
    online = tensorboard_scalars(tmp_path / "online" / "tensorboard" / "run")
    cached = tensorboard_scalars(tmp_path / "cached" / "tensorboard" / "run")
    for tag in ("train/loss", "train/loss_ce", "train/loss_mlm", "valid/loss"):
        for step, value in online[tag].items():
            assert cached[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)
    a, b = load_file(str(tmp_path / "online" / "model.safetensors")), load_file(str(tmp_path / "cached" /
                                                                                   "model.safetensors"))
    for key in a:  # per tensor, relative to its norm: Adam's per-element normalisation turns the rounding of an
        # element with a near-zero gradient into steps of size lr, so single elements are compared too harshly
        if key.endswith("k_lin.bias"):  # zero gradient up to rounding (softmax ignores a per-row constant): noise
            continue
        assert float((b[key] - a[key]).norm()) <= 1e-5 * float(a[key].norm()) + 1e-8, key
    assert "teacher model not loaded" in (tmp_path / "cached" / "train.log").read_text()


@pytest.mark.parametrize("fmt", ["topk", "sample"])
def test_sparse_caches_train_and_say_what_they_approximate(tmp_path, pipeline_out, teacher_dir, fmt):
    cache = tmp_path / "cache"
    _build(pipeline_out, teacher_dir, cache, "match", fmt, k=4)
    header = json.loads((cache / "cache.json").read_text())
    assert header["encoding"] == {"name": fmt, "k": 4, "dtype": "fp32"}
    assert header["bytes_per_row"] == (4 * 1 + 4 if fmt == "sample" else 4 * (1 + 4))
    dump = tmp_path / "dump"
    assert _run(pipeline_out, teacher_dir, dump, "match", "--teacher_cache", str(cache)) == 0
    log = (dump / "train.log").read_text()
    assert f"approximation: the KL reads a {fmt} cache" in log
    scalars = tensorboard_scalars(dump / "tensorboard" / "run")
    assert all(torch.isfinite(torch.tensor(v)) for v in scalars["train/loss_ce"].values())


def test_a_cache_for_another_run_is_a_one_line_error(tmp_path, pipeline_out, teacher_dir, capsys):
    cache = tmp_path / "cache"
    _build(pipeline_out, teacher_dir, cache, "match", "sample", k=4)
    cases = [
        (["--temperature", "3"], "was built for temperature 2.0, this run 3.0"),
        (["--align_logits", "reduce"], "was built for alignment 'match', this run 'reduce'"),
        (["--alpha_ce", "0", "--alpha_mlm", "1", "--alpha_mse", "1"], "--teacher_cache serves the KL term"),
    ]
    for extra, needle in cases:
        argv = ["--pipeline_dir", str(pipeline_out), "--teacher_name", str(teacher_dir), "--align_logits", "match",
                "--teacher_cache", str(cache), "--dump_path", str(tmp_path / "d"), "--device", "cpu", *extra]
        assert run_train(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err
    other_teacher = tmp_path / "teacher2"
    shutil.copytree(teacher_dir, other_teacher)
    weights = load_file(str(other_teacher / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v * 1.01 for k, v in weights.items()}, str(other_teacher / "model.safetensors"),
              metadata={"format": "pt"})
    argv = ["--pipeline_dir", str(pipeline_out), "--teacher_name", str(other_teacher), "--align_logits", "match",
            "--teacher_cache", str(cache), "--dump_path", str(tmp_path / "d"), "--device", "cpu"]
    assert run_train(argv) == 2
    assert "was built for teacher_weights another one than this run's" in capsys.readouterr().err
    columns = cache / "shard_00001" / "columns.npy"
    columns.write_bytes(columns.read_bytes()[:-10])
    argv[3] = str(teacher_dir)
    assert run_train(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: teacher cache file {columns} ") and "rebuild the cache" in err and "\n" not in err
    (cache / "cache.json").unlink()
    assert run_train(argv) == 2
    assert "has no cache.json" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_a_killed_build_resumes_and_equals_a_clean_build(tmp_path, pipeline_out, teacher_dir):
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    _build(pipeline_out, teacher_dir, clean, "reduce", "sample", k=8)
    _build(pipeline_out, teacher_dir, resumed, "reduce", "sample", k=8)
    shutil.rmtree(resumed / "shard_00001")  # the state a kill during the second shard leaves: one shard published,
    (resumed / "cache.json").unlink()  # no header, and the temp directory of the shard it was writing
    (resumed / "shard_00001.tmp-4242").mkdir()
    (resumed / "shard_00001.tmp-4242" / "columns.npy").write_bytes(b"half")
    stats = _build(pipeline_out, teacher_dir, resumed, "reduce", "sample", k=8)
    assert stats["skipped"] == 1 and stats["built"] == 1
    files = sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(resumed) for p in resumed.rglob("*") if p.is_file()
                           if "tmp-4242" not in str(p))
    for rel in files:
        assert (clean / rel).read_bytes() == (resumed / rel).read_bytes(), rel


def test_run_pipeline_builds_the_cache_as_step_11(tmp_path, pipeline_out, teacher_dir, corpus, student_config):
    from run_pipeline import build_parser, run

    out = tmp_path / "out"
    shutil.copytree(pipeline_out, out)
    argv = ["--teacher_name", str(teacher_dir), "--corpus", str(corpus), "--student_vocab_size", "150",
            "--student_config", str(student_config), "--out_dir", str(out), "--max_len", "24", "--n_shards", "2",
            "--cut_len", "8", "--num_workers", "1", "--cache_teacher", "match", "--cache_k", "4"]
    lines: list[str] = []
    manifest = run(build_parser().parse_args(argv), log=lines.append)
    assert manifest["steps"]["cache_teacher"]["number"] == 11
    assert (out / "teacher_cache" / "cache.json").is_file()
    lines.clear()
    run(build_parser().parse_args(argv), log=lines.append)
    assert any("cache_teacher: up to date" in line for line in lines)


def test_cached_run_under_torchrun_with_a_half_precision_teacher_flag(tmp_path, pipeline_out, teacher_dir):
    cache = tmp_path / "cache"
    _build(pipeline_out, teacher_dir, cache, "match", "sample", k=4)
    env = {**os.environ, "N_GPU_NODE": "2", "OMP_NUM_THREADS": "1", "RVKD_NO_TQDM": "1", "PYTHON": sys.executable,
           "CUDA_VISIBLE_DEVICES": ""}
    argv = ["--pipeline_dir", str(pipeline_out), "--teacher_name", str(teacher_dir), "--align_logits", "match",
            "--teacher_cache", str(cache), "--dump_path", str(tmp_path / "ddp"), "--device", "cpu", "--max_steps", "3",
            "--batch_size", "8", "--gradient_accumulation_steps", "1", "--valid_prop", "0.05", "--alpha_mse", "0.1",
            "--teacher_precision", "bf16"]
    proc = subprocess.run([str(ROOT / "train_multi_gpu.sh"), *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and len(set(summary["rank_param_checksums"])) == 1
    assert "teacher model loaded for the hidden-state losses" in (tmp_path / "ddp" / "train.log").read_text()


def test_teacher_precision_bf16_changes_only_the_teacher(tmp_path, pipeline_out, teacher_dir, monkeypatch):
    """A bf16 teacher beside an fp32 student; its Linears are stored in bf16 once, which changes no value: the run
    equals one where autocast casts them at every step."""
    import distiller

    assert _run(pipeline_out, teacher_dir, tmp_path / "fp32", "match") == 0
    assert _run(pipeline_out, teacher_dir, tmp_path / "bf16", "match", "--teacher_precision", "bf16") == 0
    with monkeypatch.context() as m:
        m.setattr(distiller, "store_linears_in", lambda model, precision: 0)
        assert _run(pipeline_out, teacher_dir, tmp_path / "cast", "match", "--teacher_precision", "bf16") == 0
    a = tensorboard_scalars(tmp_path / "fp32" / "tensorboard" / "run")
    b = tensorboard_scalars(tmp_path / "bf16" / "tensorboard" / "run")
    assert b["train/loss_mlm"]["1"] == a["train/loss_mlm"]["1"]  # the student's own loss does not see the teacher
    assert b["train/loss_ce"]["1"] != a["train/loss_ce"]["1"]
    assert b["train/loss_ce"]["1"] == pytest.approx(a["train/loss_ce"]["1"], rel=0.05)
    assert tensorboard_scalars(tmp_path / "cast" / "tensorboard" / "run") == b
    assert "Linear weights and biases stored in bf16 once" in (tmp_path / "bf16" / "train.log").read_text()
    assert "stored in bf16" not in (tmp_path / "cast" / "train.log").read_text()
