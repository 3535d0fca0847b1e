"""Ending a torchrun job: the ordered tear-down joins gloo's worker threads, a failing rank ends the job in
bounded time, and many 2-process trainer runs in a row all exit 0 without the abort at exit (issue 18)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train import kd_flags, train_argv

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("dist_probe.py")
ABORT = "terminate called"


def torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "RVKD_NO_TQDM": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_shutdown_joins_the_gloo_workers():
    proc = torchrun(str(PROBE), "ok")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))
    assert len(lines) == 2, proc.stdout
    for line in lines:
        before = int(line.split("before shutdown ")[1].split(",")[0])
        assert before > 0, line  # the threads this test looks for exist while the group is joined
        assert line.endswith("after 0"), line
    assert ABORT not in proc.stderr


def test_a_failing_rank_ends_the_job_promptly():
    start = time.monotonic()
    proc = torchrun(str(PROBE), "fail", timeout=90)
    assert proc.returncode != 0
    assert time.monotonic() - start < 60
    assert "error: rank 1 failed on purpose" in proc.stderr
    assert ABORT not in proc.stderr


N_RUNS = 12
"""Runs of the stress test: a failure rate of 10% shows at least once with probability 1 - 0.9**12 > 0.71, 20%
with 0.93 (the abort it guards against was 3 in 70 runs before the fix; `test_shutdown_joins_the_gloo_workers`
checks its cause deterministically, on every run of the suite)."""
N_PARALLEL = 2
"""Jobs at a time (4 processes on 2 cores: the race needs a busy machine, and it halves the wall time)."""


@pytest.mark.stress
def test_two_process_runs_never_abort_at_exit(tmp_path, pipeline_out, teacher_dir):
    env = {**os.environ, "N_GPU_NODE": "2", "OMP_NUM_THREADS": "1", "RVKD_NO_TQDM": "1",
           "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    flags = kd_flags(pipeline_out, teacher_dir, "match")
    failures, running, started = [], [], 0
    while started < N_RUNS or running:
        while started < N_RUNS and len(running) < N_PARALLEL:
            dump = tmp_path / f"run{started}"
            argv = train_argv(pipeline_out, dump, "--max_steps", "2", "--checkpoint_interval", "2",
                              "--log_interval", "1", *flags)
            proc = subprocess.Popen([str(ROOT / "train_multi_gpu.sh"), *argv], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            running.append((started, dump, proc))
            started += 1
        index, dump, proc = running.pop(0)
        output = proc.communicate(timeout=300)[0]
        if proc.returncode != 0 or ABORT in output or not (dump / "train_summary.json").is_file():
            failures.append(f"run {index}: exit {proc.returncode}\n{output[-1500:]}")
        shutil.rmtree(dump, ignore_errors=True)
    assert not failures, f"{len(failures)}/{N_RUNS} runs failed; first:\n{failures[0]}"
