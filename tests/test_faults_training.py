"""Faults in training (issue 15): a run killed anywhere, a full disk while writing checkpoints, the export or the
TensorBoard log, and a dead rank. Each ends in one line and a non-zero exit, leaves every earlier checkpoint
loadable, and the same command with `--resume auto` then ends bit-identical (CPU) to a run that was never hurt."""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdcore.fsutil import TEMP_NAME, manifest_problem
from tests.test_train import kd_flags, run_train, train_argv

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def argv(pipeline_out: Path, teacher_dir: Path, dump: Path, *extra: str) -> list[str]:
    """The one command of these tests: 6 updates, a checkpoint every 2, relaunched as it is after a fault."""
    return [*train_argv(pipeline_out, dump, "--max_steps", str(STEPS), "--checkpoint_interval", "2"),
            *kd_flags(pipeline_out, teacher_dir, "match"), "--resume", "auto", *extra]


def env() -> dict[str, str]:
    """Subprocesses compute with this process's thread count (bit-identical reductions)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(torch.get_num_threads()),
            "RVKD_NO_TQDM": "1", "HF_HUB_OFFLINE": "1"}


def weights(dump: Path) -> dict[str, torch.Tensor]:
    return load_file(str(dump / "model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def temps(dump: Path) -> list[str]:
    return [str(p) for p in dump.rglob("*") if TEMP_NAME.search(p.name)]


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr and lines and lines[-1].startswith("error: "), stderr[-2000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr[-2000:]
    return lines[-1]


@pytest.fixture(scope="module")
def reference(pipeline_out, teacher_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    dump = tmp_path_factory.mktemp("faults") / "reference"
    assert run_train(argv(pipeline_out, teacher_dir, dump)) == 0
    return weights(dump)


@pytest.mark.parametrize(("fault", "n", "resumed_at"), [
    ("forward", 3, 0),        # in update 2's forward: no checkpoint yet, a fresh start
    ("between_steps", 3, 2),  # after update 3: checkpoint 2
    ("checkpoint", 2, 2),     # in checkpoint 4's write: its half-written temp is ignored, then removed
    ("export", 2, STEPS),     # in the final export, two files moved: checkpoint 6, exported again
])
def test_killed_anywhere_the_same_command_resumes_bit_identically(tmp_path, pipeline_out, teacher_dir, reference,
                                                                  fault, n, resumed_at):
    dump = tmp_path / "dump"
    cmd = argv(pipeline_out, teacher_dir, dump)
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_train.py"), fault, str(n), "--", *cmd],
                            env=env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    for ckpt in (dump / "checkpoints").iterdir() if (dump / "checkpoints").exists() else []:
        assert not ckpt.name.isdigit() or manifest_problem(ckpt) is None, ckpt  # a checkpoint's name: complete
    if fault == "checkpoint":
        assert temps(dump / "checkpoints")  # the half-written one, under its temp name
    assert run_train(cmd) == 0  # the very same command
    log = (dump / "train.log").read_text()
    assert (f"resumed at update {resumed_at} " in log) if resumed_at else "no checkpoint in" in log
    assert_same(weights(dump), reference)
    assert json.loads((dump / "train_summary.json").read_text())["global_step"] == STEPS
    assert not temps(dump)


def test_full_disk_at_a_checkpoint(tmp_path, pipeline_out, teacher_dir, reference, monkeypatch, capsys):
    import distiller

    dump = tmp_path / "dump"
    save, calls = distiller.save_model, []

    def failing_save(model, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return save(model, path)

    monkeypatch.setattr(distiller, "save_model", failing_save)
    capsys.readouterr()
    assert run_train(argv(pipeline_out, teacher_dir, dump)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "checkpoint" in line and str(dump / "checkpoints" / "4") in line and "--resume auto" in line
    assert str(dump / "checkpoints" / "2") in line  # the last good one is named
    assert sorted(p.name for p in (dump / "checkpoints").iterdir()) == ["2"] and not temps(dump)
    monkeypatch.setattr(distiller, "save_model", save)
    assert run_train(argv(pipeline_out, teacher_dir, dump)) == 0
    assert_same(weights(dump), reference)


def test_full_disk_in_the_export(tmp_path, pipeline_out, teacher_dir, reference, monkeypatch, capsys):
    import kdcore.tokenizer_utils as tu

    dump = tmp_path / "dump"
    write = tu.write_vocab_txt

    def failing_write(tok, directory):
        if Path(directory).parent == dump:  # the final export, not best/
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(directory) / "vocab.txt"))
        return write(tok, directory)

    monkeypatch.setattr(tu, "write_vocab_txt", failing_write)
    capsys.readouterr()
    assert run_train(argv(pipeline_out, teacher_dir, dump)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "the student export" in line and str(dump) in line and not temps(dump)
    assert not (dump / "model.safetensors").exists()
    monkeypatch.setattr(tu, "write_vocab_txt", write)
    assert run_train(argv(pipeline_out, teacher_dir, dump)) == 0
    assert_same(weights(dump), reference)


def test_file_size_limit_on_the_tensorboard_log_is_one_line_not_a_hang(tmp_path, pipeline_out, teacher_dir):
    """tensorboardX's writer thread dies on EFBIG; without ScalarLog the loop then blocks forever on its queue."""
    dump = tmp_path / "dump"
    cmd = [*train_argv(pipeline_out, dump, "--max_steps", "40", "--checkpoint_interval", "100",
                       "--log_interval", "1", "--alpha_mlm", "1")]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    t0 = time.monotonic()
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), *cmd], env=env(), capture_output=True, text=True,
                         timeout=120, preexec_fn=limit)
    assert out.returncode == 2 and time.monotonic() - t0 < 120
    line = one_error_line(out.stderr)
    assert "cannot write the TensorBoard log" in line and str(dump / "tensorboard") in line
    assert not (dump / "checkpoints").exists() and not temps(dump)


def test_a_dead_rank_ends_the_job_and_the_same_command_resumes(tmp_path, pipeline_out, teacher_dir):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    e = {**env(), "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    ok = subprocess.run([*launch, str(ROOT / "train.py"), *argv(pipeline_out, teacher_dir, full)], env=e,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    dump = tmp_path / "dump"
    cmd = argv(pipeline_out, teacher_dir, dump, "--dist_timeout_s", "60")
    t0 = time.monotonic()
    dead = subprocess.run([*launch, str(ROOT / "tests" / "kill_train.py"), "rank1_between_steps", "3", "--", *cmd],
                          env=e, capture_output=True, text=True, timeout=300)
    assert dead.returncode != 0 and time.monotonic() - t0 < 90, dead.stderr[-3000:]
    again = subprocess.run([*launch, str(ROOT / "train.py"), *cmd], env=e, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed at update 2 " in (dump / "train.log").read_text()
    assert_same(weights(dump), weights(full))
