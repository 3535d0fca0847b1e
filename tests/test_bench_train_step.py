"""bench/train_step.py --quick, in-process on the tiny size: every configuration runs the trainer's step and
reports a positive, finite throughput."""

from __future__ import annotations

import json
import math

from bench import train_step as bench


def test_quick_run_covers_every_configuration(tmp_path):
    out = tmp_path / "train_step.json"
    rc = bench.main(["--quick", "--isolation", "none", "--threads", "1", "--steps", "1", "--device", "cpu",
                     "--batch_size", "2", "--seq_len", "16", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    results = data["results"]
    expected = {(p, c) for p in ("fp32", "bf16") for c in bench.DEFAULT_CONFIGS}
    assert {(r["precision"], r["config"]) for r in results} == expected
    for r in results:
        assert r["size_name"] == "tiny" and "error" not in r and "skipped" not in r, r
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"]), r
        assert r["flop_per_step"] > 0 and r["achieved_flop_per_s"] > 0
        assert 0 < r["profile"]["gemm_share"] <= 1
    by = {(r["precision"], r["config"]): r for r in results}
    # the KL configurations run the teacher and more student passes than MLM alone
    assert by["fp32", "reduce"]["flop_per_step"] > by["fp32", "match"]["flop_per_step"] > \
        by["fp32", "mlm"]["flop_per_step"]
    assert by["fp32", "reduce_map/my_index"]["reduce_map_impl"] == "my_index"
    assert by["fp32", "reduce_map/gather"]["reduce_map_impl"] == "gather"
    assert set(data["gemm_peak"]) == {"fp32", "bf16"} and data["machine"]["torch"]
    assert "| tiny | fp32 | match |" in data["markdown"]
