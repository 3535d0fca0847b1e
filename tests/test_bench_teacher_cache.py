"""bench/teacher_cache.py at the tiny size, in-process: every alignment builds its sample cache, trains online and
from the cache (without the teacher), and reports positive, consistent numbers and the targets."""

from __future__ import annotations

import json
import math

from bench import teacher_cache as bench


def test_tiny_run_reports_every_alignment(tmp_path):
    out = tmp_path / "teacher_cache.json"
    rc = bench.main(["--sizes", "tiny", "--precisions", "fp32", "--isolation", "none", "--threads", "1",
                     "--device", "cpu", "--batch_size", "2", "--seq_len", "16", "--steps", "1", "--warmup", "1",
                     "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["machine"]["torch"] and data["params"]["k"] == 16
    results = data["results"]
    assert [r["alignment"] for r in results] == ["match", "reduce", "reduce_map"]
    for r in results:
        assert "error" not in r, r
        assert r["size_name"] == "tiny" and r["precision"] == "fp32"
        for key in ("online_tok_s", "cached_tok_s", "speedup", "build_tok_s"):
            assert r[key] > 0 and math.isfinite(r[key]), (key, r)
        assert r["speedup"] == r["cached_tok_s"] / r["online_tok_s"]
        # the headline rates come from the worker that alternates both steps; each step also ran alone
        assert (r["online_tok_s"], r["cached_tok_s"]) == (r["paired"]["online"]["tok_s"], r["paired"]["cached"]["tok_s"])
        assert r["online"]["tok_s"] > 0 and r["cached"]["tok_s"] > 0
        assert set(r["peak_rss_gb"]) == {"online", "cached"} and min(r["peak_rss_gb"].values()) > 0
        assert set(r["bytes_per_row"]) == {"exact_fp32", "exact_fp16", "topk16_fp16", "sample16"}
        n_columns = r["build"]["n_columns"]
        assert r["bytes_per_row"]["exact_fp32"] == 4 * n_columns == 2 * r["bytes_per_row"]["exact_fp16"]
        # the build stored what the encoding says a row takes, one row per aligned teacher position
        assert r["build"]["stored_bytes_per_row"] == r["bytes_per_row"]["sample16"]
        assert r["build"]["cache_rows"] > 0 and r["build"]["teacher_tokens"] > 0
        assert r["online"]["teacher_in_loop"] and not r["cached"]["teacher_in_loop"]
        assert r["online"]["student_tokens_per_step"] == r["cached"]["student_tokens_per_step"]
        online, cached = r["online"]["first_batch_losses"], r["cached"]["first_batch_losses"]
        assert set(online) == set(cached) == {"loss_ce", "loss_mlm"}
        assert online["loss_mlm"] == cached["loss_mlm"]  # same student, batch and masks; only the KL's side differs
        assert all(math.isfinite(v) for v in (*online.values(), *cached.values()))
    by = {r["alignment"]: r for r in results}
    assert by["match"]["build"]["cache_rows"] < by["reduce"]["build"]["cache_rows"]  # matched vs every position
    assert by["reduce_map"]["build"]["n_columns"] > by["reduce"]["build"]["n_columns"]
    targets = {(t["target"], t["alignment"]) for t in data["targets"]}
    assert {a for _, a in targets} == {"match", "reduce", "reduce_map"} and len(targets) == 5
    assert all(not t["applies"] for t in data["targets"])  # the targets are for the real size
    assert "| tiny | fp32 | match |" in data["markdown"] and "Targets:" in data["markdown"]
