"""bench/real_scale.py --quick at the tiny size, in-process: the teacher and the pipeline are built, and every
configuration and precision runs the trainer's step on the pipeline's shards with positive, consistent
numbers."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from bench import real_scale as bench


def test_quick_tiny_run_covers_every_configuration(tmp_path):
    out = tmp_path / "real_scale.json"
    rc = bench.main(["--quick", "--sizes", "tiny", "--isolation", "none", "--threads", "1", "--device", "cpu",
                     "--precision", "fp32", "bf16", "--emulated_bf16", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["machine"]["torch"] and data["params"]["quick"] and data["params"]["batch_size"] == 8
    size = data["sizes"]["tiny"]
    assert size["requested"] == dataclasses.asdict(bench.SIZES["tiny"])
    assert size["inputs"]["lines"] == bench.DEFAULT_LINES["tiny"]
    assert 0 < size["teacher"]["teacher_vocab"] <= size["requested"]["teacher_vocab"]
    pipeline = size["pipeline"]
    assert pipeline["wall_s"] > 0 and pipeline["peak_rss_mib"] > 0 and pipeline["sequences"] > 0
    assert 0 < pipeline["student_vocab"] <= size["requested"]["student_vocab"]
    assert {"train_reduced_tok", "encode_shards", "init_weights", "matched_vocab", "mined_vocab"} <= set(
        pipeline["steps"])
    assert set(data["gemm_peak"]) == {"fp32", "bf16"}

    results = data["results"]
    expected = {(p, c) for p in ("fp32", "bf16") for c in bench.CONFIGS}
    assert {(r["precision"], r["config"]) for r in results} == expected
    for r in results:
        assert r["size_name"] == "tiny" and "error" not in r and "skipped" not in r, r
        times = r["step_s_all"]
        assert len(times) == 2 and min(times) > 0 and r["batches"] == 2
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"])
        assert r["tokens_per_s"] == pytest.approx(r["student_tokens_per_step"] * len(times) / sum(times))
        assert r["flop_per_step"] > 0 and min(r["flop_per_batch"]) > 0
        assert r["achieved_flop_per_s"] == pytest.approx(r["flop_per_step"] * len(times) / sum(times))
        assert r["gemm_peak_fraction"] == pytest.approx(
            r["achieved_flop_per_s"] / data["gemm_peak"][r["precision"]]["flop_per_s"])
        assert r["peak_mib"] > 0
        assert r["peak_mib"] == pytest.approx(r["resident_before_mib"] + r["step_peak_mib"])
        assert r["teacher_vocab"] == size["teacher"]["teacher_vocab"]
        assert r["student_vocab"] == pipeline["student_vocab"]
        assert (r["teacher_params"] > 0) == (r["config"] != "mlm")
        assert (r["hidden_params"] > 0) == (r["config"].startswith("match+"))
        assert (r["aligner_params"] > 0) == (r["config"] == "dskd")
    by = {(r["precision"], r["config"]): r for r in results}
    # every configuration trains on the same batches of the trainer's sampler
    assert len({r["student_tokens_per_step"] for r in results}) == 1
    # the teacher, the student's t2s pass and the projections add matrix products
    flop = {config: by["fp32", config]["flop_per_step"] for config in bench.CONFIGS}
    assert flop["reduce"] > flop["match"] > flop["mlm"] and flop["match+mse"] > flop["match"]
    # uld: the match rows over every teacher and student column
    assert flop["uld"] > flop["match"] and by["fp32", "uld"]["kl"].startswith("uld (match rows, all teacher")
    # dskd: the teacher head over every teacher column at every teacher row, plus the student's at every student row
    assert flop["dskd"] > flop["uld"] and by["fp32", "dskd"]["kl"].startswith("dskd (dual-space KD")
    assert flop["match/mined"] > flop["match"]  # the teacher's head over every column, not the matched ones
    assert by["fp32", "reduce_map/my_index"]["reduce_map_impl"] == "my_index"
    assert by["fp32", "reduce_map/sparse"]["reduce_map_impl"] == "sparse"
    assert "| tiny | fp32 | match |" in data["markdown"] and "run_pipeline.py" in data["markdown"]
