"""bench/kl_loss.py --quick, in-process: both implementations run, agree, and are reported."""

from __future__ import annotations

import importlib
import json

import pytest


def test_quick_run(tmp_path):
    bench = importlib.import_module("bench.kl_loss")
    out = tmp_path / "kl_loss.json"
    assert bench.main(["--quick", "--isolation", "none", "--threads", "1", "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["impl"] for r in data["results"]] == ["textbook", "ours"]
    ref, ours = data["results"]
    assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-5) and ours["step_s"] > 0 and ref["step_s"] > 0
    assert "| 64 x 500 | ours |" in data["markdown"]


def test_bad_shapes_are_refused():
    bench = importlib.import_module("bench.kl_loss")
    with pytest.raises(bench.ts.BenchError, match="ROWSxCOLUMNS"):
        bench.parse_shapes("64by500")
