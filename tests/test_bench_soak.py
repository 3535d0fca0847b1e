"""bench/soak.py, briefly and in-process: the tiny run trains through train.py's code with validations and
checkpoints (in bf16, which `--precision` sets for student and teacher), is sampled where asked, and keeps its open
file descriptors flat."""

from __future__ import annotations

import json

from bench import soak


def test_brief_soak_samples_and_keeps_fds_flat(tmp_path):
    out = tmp_path / "soak.json"
    rc = soak.main(["--steps", "300", "--every", "50", "--warmup", "50", "--checkpoint_interval", "100",
                    "--precision", "bf16", "--isolation", "none", "--threads", "1", "--json", str(out), "--work_dir", str(tmp_path / "w")])
    data = json.loads(out.read_text())
    assert data["machine"]["torch"] and data["params"]["steps"] == 300 and "error" not in data["setup"]
    assert data["params"]["precision"] == "bf16" and data["markdown"].startswith("300 updates of the tiny match-KL run (bf16")
    samples = data["samples"]
    assert [s["step"] for s in samples] == list(range(50, 301, 50))
    for s in samples:
        assert s["rss_kib"] > 0 and s["peak_rss_kib"] >= s["rss_kib"] and s["fds"] > 0 and s["threads"] > 0
    assert [s["elapsed_s"] for s in samples] == sorted(s["elapsed_s"] for s in samples)
    fds = data["verdicts"]["fds"]
    assert fds["pass"] and fds["base_step"] == 50 and fds["max_after"] == fds["base"]
    rss = data["verdicts"]["rss"]
    assert set(rss) >= {"peak_growth", "rss_growth", "rss_slope_kib_per_1000_updates", "limit", "pass"}
    assert rc == (0 if rss["pass"] else 1)  # the in-process RSS includes pytest's: not judged here
    log = (tmp_path / "w" / "dump" / "train.log").read_text()
    assert "Linear weights and biases stored in bf16" in log  # the teacher ran in bf16
    assert "step 300: valid loss" in log and (tmp_path / "w" / "dump" / "checkpoints" / "300").is_dir()
    assert "| peak RSS (VmHWM) |" in data["markdown"] and "| open fds (max after) |" in data["markdown"]
