"""bench/hidden_losses.py --quick, in-process on the tiny size: every configuration runs the trainer's step with
its hidden-state loss and reports a time, a memory reading and finite loss values."""

from __future__ import annotations

import importlib
import json
import math


def test_quick_run(tmp_path):
    bench = importlib.import_module("bench.hidden_losses")
    out = tmp_path / "hidden_losses.json"
    configs = ["kl", "kl+mse", "kl+contrastive", "kl+hyperbolic", "kl+mse/reduce"]
    rc = bench.main(["--quick", "--isolation", "none", "--threads", "1", "--device", "cpu", "--configs",
                     ",".join(configs), "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    by = {r["config"]: r for r in data["results"]}
    assert list(by) == configs
    for r in by.values():
        assert "error" not in r, r
        assert r["step_s"] > 0 and all(math.isfinite(v) for v in r["losses"].values()), r
    assert set(by["kl"]["losses"]) == {"loss_ce", "loss_mlm"} and by["kl"]["hidden_parameters"] == 0
    assert "loss_mse" in by["kl+mse"]["losses"] and "loss_contrastive" in by["kl+hyperbolic"]["losses"]
    assert by["kl+mse/reduce"]["t2s_tokens"] > 0  # the reduce alignment builds the t2s input
    assert "| tiny | fp32 | kl+hyperbolic |" in data["markdown"]
