"""bench/parity.py --quick, in-process on a synthetic corpus: both implementations train on the same batches,
report a positive, finite throughput, and compute the same loss on the same first batch (the same objective); the
speed-up compares the medians of interleaved rounds."""

from __future__ import annotations

import importlib
import json
import math
import statistics

import pytest

from synthetic import write_corpus


def test_quick_run(tmp_path):
    bench = importlib.import_module("bench.parity")
    corpus = write_corpus(tmp_path / "corpus.txt", 1500, seed=1)
    out = tmp_path / "parity.json"
    rc = bench.main(["--quick", "--corpus", str(corpus), "--isolation", "none", "--threads", "1", "--rounds", "2",
                     "--work_dir", str(tmp_path / "work"), "--out", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0, data["markdown"]
    assert [(r["round"], r["implementation"]) for r in data["results"]] == [
        (1, "ours"), (1, "reference"), (2, "ours"), (2, "reference")]
    results = {r["implementation"]: r for r in data["results"] if r["round"] == 1}
    for r in data["results"]:
        assert "error" not in r, r
        for key in ("steps", "real_tokens", "padded_tokens", "seconds", "tokens_per_s", "peak_rss_mib",
                    "peak_rss_above_start_mib", "mean_losses", "batches_digest"):
            assert key in r, (key, r)
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"]), r
        assert r["steps"] == data["params"]["steps"] == 4 and r["precision"] == "fp32"
        assert all(math.isfinite(v) for v in r["mean_losses"].values())
    for r in data["results"]:  # the objective is checked in the first round only
        assert bool(r.get("first_batch_losses")) == bool(r.get("first_batch_losses_fp64")) == (r["round"] == 1)
    speed = {impl: [r["tokens_per_s"] for r in data["results"] if r["implementation"] == impl]
             for impl in ("ours", "reference")}
    assert data["speedup_rounds"]["fp32"] == pytest.approx([o / f for o, f in zip(speed["ours"], speed["reference"])])
    assert data["speedup"]["fp32"] == pytest.approx(statistics.median(speed["ours"]) / statistics.median(speed["reference"]))
    assert data["same_batches"] is True
    assert results["ours"]["real_tokens"] == results["reference"]["real_tokens"] > 0
    check = data["loss_check"]["fp32"]
    assert check["ok"], check
    for precision, rel_tol in (("fp64", 1e-7), ("fp32", 1e-4)):
        ours, ref = check[precision]["ours"], check[precision]["reference"]
        for name in ("loss", "loss_ce", "loss_mlm", "loss_cos"):
            assert ours[name] > 0, (precision, name)
            assert math.isclose(ours[name], ref[name], rel_tol=rel_tol, abs_tol=1e-6 if precision == "fp32" else 0), \
                (precision, name, ours[name], ref[name])
    assert data["speedup"]["fp32"] > 0 and "| OURS | fp32 |" in data["markdown"]
    assert data["setup"]["train_sequences"] == 64
