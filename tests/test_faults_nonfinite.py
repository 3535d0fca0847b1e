"""--on_nonfinite stop|skip: NaN loss terms and inf gradients injected by tests/fault_inject.py into the real
training loop (one process in-process, two under torchrun). With --gradient_accumulation_steps 2 (train_argv),
micro-batches 2u-1 and 2u make update u."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from fault_inject import inject
from kdcore.fsutil import write_manifest
from test_alignment_regression import tensorboard_scalars
from test_glue_data import one_thread  # noqa: F401 (autouse: the in-process runs use one torch thread)
from test_train import kd_flags, run_train, train_argv

INJECT = Path(__file__).with_name("fault_inject.py")
MLM = ["--alpha_mlm", "1.0"]


def summary(dump: Path) -> dict:
    return json.loads((dump / "train_summary.json").read_text())


def one_line_error(capsys) -> str:
    """The run's error: the last line on stderr (the logger writes there too), and no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    return last


def test_stop_names_the_update_the_terms_and_the_last_checkpoint(tmp_path, pipeline_out, teacher_dir, capsys):
    dump = tmp_path / "dump"
    argv = train_argv(pipeline_out, dump, "--max_steps", "6", *kd_flags(pipeline_out, teacher_dir, "match"))
    with inject(nan_at={8}, terms=("loss_ce", "loss_mlm")):
        assert run_train(argv) == 2
    err = one_line_error(capsys)
    assert "NaN/inf in loss_mlm, loss_ce at update 4" in err, err
    assert f"last good checkpoint is {dump / 'checkpoints' / '3'}" in err, err
    assert not (dump / "checkpoints" / "4").exists() and not (dump / "model.safetensors").exists()


def test_skip_drops_exactly_the_poisoned_updates_and_survives_resume(tmp_path, pipeline_out, capsys):
    flags = [*MLM, "--max_steps", "4", "--log_interval", "1", "--warmup_prop", "0.5"]
    clean, dump = tmp_path / "clean", tmp_path / "dump"
    assert run_train(train_argv(pipeline_out, clean, *flags)) == 0
    skip = [*flags, "--on_nonfinite", "skip", "--max_nonfinite_skips", "2"]
    with inject(nan_at={3, 8}):  # updates 2 (micro-batches 3-4) and, after update 2 = micro-batches 5-6, 3 (7-8)
        assert run_train(train_argv(pipeline_out, dump, *skip)) == 0  # never 2 skips in a row
    state = summary(dump)
    assert state["global_step"] == 4 and state["nonfinite_skipped"] == 2
    log = (dump / "train.log").read_text()
    assert "update 2: NaN/inf in loss_mlm; update skipped (1 in a row, 1 in the run)" in log
    assert "update 3: NaN/inf in loss_mlm; update skipped (1 in a row, 2 in the run)" in log
    scalars = tensorboard_scalars(dump / "tensorboard" / "run")
    assert scalars["train/nonfinite_skipped"]["4"] == 2
    # the schedule did not advance on the skipped updates: the same learning rate at every applied update
    assert scalars["train/lr"] == tensorboard_scalars(clean / "tensorboard" / "run")["train/lr"]
    optimizer = torch.load(dump / "checkpoints" / "4" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {4.0}  # AdamW stepped 4 times, not 6
    assert all(torch.isfinite(w).all() for w in load_file(str(dump / "model.safetensors")).values())
    # the count survives a resume, and a checkpoint written before the field existed still loads (count 0)
    ckpt = dump / "checkpoints" / "3"
    assert json.loads((ckpt / "state.json").read_text())["nonfinite_skipped"] == 2
    resume = ["--max_steps", "5", "--load_from_checkpoint", str(ckpt)]
    assert run_train(train_argv(pipeline_out, dump, *skip, *resume)) == 0
    assert summary(dump)["global_step"] == 5 and summary(dump)["nonfinite_skipped"] == 2
    blob = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    old = json.loads(blob["state"])
    del old["nonfinite_skipped"]
    torch.save({**blob, "state": json.dumps(old)}, ckpt / "trainer_state.pt")
    write_manifest(ckpt, {"global_step": old["global_step"]})  # as that checkpoint's writer would have
    assert run_train(train_argv(pipeline_out, dump, *skip, *resume)) == 0
    assert summary(dump)["global_step"] == 5 and summary(dump)["nonfinite_skipped"] == 0


def test_consecutive_skips_stop_the_run(tmp_path, pipeline_out, capsys):
    dump = tmp_path / "dump"
    argv = train_argv(pipeline_out, dump, *MLM, "--max_steps", "6", "--on_nonfinite", "skip",
                      "--max_nonfinite_skips", "3")
    with inject(nan_at=set(range(3, 9))):  # updates 2, 2, 2: three tries in a row
        assert run_train(argv) == 2
    err = one_line_error(capsys)
    assert ("3 consecutive updates skipped (--max_nonfinite_skips 3), the last for NaN/inf in loss_mlm at update 2"
            in err), err
    assert "last good checkpoint is (none yet)" in err
    assert (dump / "train.log").read_text().count("update skipped") == 3


def test_nonfinite_gradient_is_caught_in_fp32(tmp_path, pipeline_out, capsys):
    dump = tmp_path / "dump"
    with inject(inf_grad_at={3}):
        assert run_train(train_argv(pipeline_out, dump, *MLM, "--max_steps", "4")) == 2
    assert "NaN/inf in gradient norm at update 2" in one_line_error(capsys)
    skip = tmp_path / "skip"
    with inject(inf_grad_at={3}):
        assert run_train(train_argv(pipeline_out, skip, *MLM, "--max_steps", "4", "--on_nonfinite", "skip")) == 0
    assert summary(skip)["nonfinite_skipped"] == 1
    assert "update 2: NaN/inf in gradient norm; update skipped" in (skip / "train.log").read_text()


def test_fp16_inf_gradients_are_left_to_the_grad_scaler(tmp_path, pipeline_out, capsys):
    flags = [*MLM, "--max_steps", "4", "--precision", "fp16", "--checkpoint_interval", "4"]
    clean, dump = tmp_path / "clean", tmp_path / "dump"
    assert run_train(train_argv(pipeline_out, clean, *flags)) == 0
    with inject(inf_grad_at={3}):
        assert run_train(train_argv(pipeline_out, dump, *flags)) == 0
    assert summary(dump)["global_step"] == 4 and summary(dump)["nonfinite_skipped"] == 0
    assert "NaN/inf" not in (dump / "train.log").read_text()
    scale = {d: torch.load(d / "checkpoints" / "4" / "trainer_state.pt", weights_only=True)["grad_scaler"]["scale"]
             for d in (clean, dump)}
    assert 0 < scale[dump] <= scale[clean] / 2  # the scaler skipped the step and backed off
    # a NaN loss in fp16 is still this policy's event
    with inject(nan_at={3}):
        assert run_train(train_argv(pipeline_out, tmp_path / "nan", *flags)) == 2
    assert "NaN/inf in loss_mlm at update 2" in one_line_error(capsys)


def test_torchrun_ranks_stop_together_when_one_rank_sees_nan(tmp_path, pipeline_out):
    dump = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "RVKD_NO_TQDM": "1"}
    argv = train_argv(pipeline_out, dump, *MLM, "--max_steps", "6")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(INJECT), "--nan_at", "5", "--ranks", "1", "--", *argv], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and time.monotonic() - start < 60
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, proc.stderr[-3000:]  # each rank decided to stop, none waits for the other
    assert all("NaN/inf in loss_mlm at update 3" in line for line in errors), errors
    assert proc.stderr.count("exitcode  : 2") == 2  # torchrun's summary: both ranks ended with the UserError code
    # the one traceback is the launcher's own (ChildFailedError), none comes from a rank
    assert proc.stderr.count("Traceback") == proc.stderr.count("ChildFailedError:") == 1, proc.stderr[-3000:]


def test_max_nonfinite_skips_must_be_positive(tmp_path, pipeline_out, capsys):
    argv = train_argv(pipeline_out, tmp_path / "dump", *MLM, "--on_nonfinite", "skip", "--max_nonfinite_skips", "0")
    assert run_train(argv) == 2
    assert one_line_error(capsys) == "error: --max_nonfinite_skips must be at least 1"
    assert not (tmp_path / "dump").exists()
