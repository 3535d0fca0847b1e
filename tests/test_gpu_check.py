"""scripts/gpu_check.sh rehearsed on the CPU (gloo, the tiny size): every stage the GPU check runs passes, the
JSON holds each run's verdict and numbers, and the package pins it installs come from requirements.txt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "scripts" / "gpu_check.py"


def test_pins_come_from_requirements_and_are_installed_here():
    pins = subprocess.run([sys.executable, str(GPU_CHECK), "--pins"], capture_output=True, text=True, check=True)
    lines = pins.stdout.split()
    requirements = (ROOT / "requirements.txt").read_text().split()
    assert lines and all(line in requirements for line in lines)
    assert any(line.startswith("transformers==") for line in lines) and not any(
        line.startswith("torch==") for line in lines)  # torch stays the machine's own CUDA build
    missing = subprocess.run([sys.executable, str(GPU_CHECK), "--missing_pins"], capture_output=True, text=True,
                             check=True)
    assert missing.stdout == ""  # this venv is the pinned one


def test_bad_arguments_are_one_line_errors(tmp_path):
    for args in (["--alignments", "match,uldx"], ["--corpus", str(tmp_path / "none.txt")], ["--steps", "0"]):
        out = subprocess.run([sys.executable, str(GPU_CHECK), "--device", "cpu", *args], capture_output=True,
                             text=True)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error:"), out.stderr


def test_cpu_rehearsal_passes_every_stage(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--size", "tiny",
                           "--steps", "4", "--batch_size", "4", "--resume_interval", "10", "--jobs", "2",
                           "--bench_configs", "mlm,match", "--alignments", "match,dskd", "--out", str(out),
                           "--work_dir", str(tmp_path / "work")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and set(report["stages"]) == {"environment", "fixtures", "teacher_cache", "training",
                                                      "kill_resume", "benchmark"}
    assert report["environment"]["gpu_packages_at_pin"] and report["environment"]["torch"]
    assert [c["alignment"] for c in report["teacher_cache"]] == ["match"]  # dskd cannot be cached
    runs = {(r["alignment"], r["precision"], r["teacher_cache"]): r for r in report["training"]}
    assert set(runs) == {("match", p, c) for p in ("bf16", "fp16") for c in (False, True)} | {
        ("dskd", p, False) for p in ("bf16", "fp16")}
    for r in runs.values():
        assert r["ok"] and r["global_step"] == 4 and r["tokens_per_s"] > 0 and "loss_ce" in r["losses"], r
    for precision in ("bf16", "fp16"):  # the cache stands in for the teacher: another KL value, the same MLM
        online, cached = runs["match", precision, False], runs["match", precision, True]
        assert online["losses"]["loss_ce"] != cached["losses"]["loss_ce"]
    for run in ("match_bf16_online", "match_fp16_cached", "dskd_fp16_online"):  # 1-process torchrun: a gloo group
        params = json.loads((tmp_path / "work" / "runs" / run / "parameters.json").read_text())
        assert params["world_size"] == 1 and params["optim"]["precision"] == run.rsplit("_", 2)[1]
    kr = report["kill_resume"]
    assert kr["runs"]["killed"]["killed"] and kr["runs"]["killed"]["rc"] != 0
    assert 0 < kr["resumed_from_step"] < kr["steps"] == kr["resumed_global_step"] == 20
    assert kr["bit_identical"] and kr["nondeterminism_max_abs_diff"] == 0.0  # exact on CPU
    bench = report["benchmark"]
    assert {(r["precision"], r["config"]) for r in bench["results"]} == {
        (p, c) for p in ("fp32", "bf16") for c in ("mlm", "match")}
    assert "| alignment | precision | teacher | check |" in proc.stdout
