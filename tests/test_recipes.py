"""recipes/: every one of the paper's six pretraining recipes trains (SMOKE=1: a few steps on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("baseline", "reduce_map_kl_mlm", "match_mse_kl_mlm", "match_contrastive_kl_mlm",
           "reduce_contrastive_kl_mlm", "match_contrastive_kl_mlm_hyperbolic")


def _env(pipeline_out: Path, teacher: Path, out: Path, **env: str) -> dict[str, str]:
    return {**os.environ, "SMOKE": "1", "PIPE": str(pipeline_out), "TEACHER": str(teacher), "OUT": str(out),
            "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "RVKD_NO_TQDM": "1", "CUDA_VISIBLE_DEVICES": "", **env}


def smoke(recipe: str, pipeline_out: Path, teacher: Path, out: Path, *extra: str, **env: str):
    return subprocess.run(["bash", str(ROOT / "recipes" / f"{recipe}.sh"), *extra],
                          env=_env(pipeline_out, teacher, out, **env), capture_output=True, text=True, timeout=300)


def test_every_recipe_trains(tmp_path, pipeline_out, teacher_dir):
    """All six, two at a time (their time is mostly process start-up)."""
    procs, pending = {}, list(RECIPES)
    while pending or procs:
        while pending and len(procs) < 2:
            recipe = pending.pop(0)
            procs[recipe] = subprocess.Popen(["bash", str(ROOT / "recipes" / f"{recipe}.sh")], text=True,
                                             env=_env(pipeline_out, teacher_dir, tmp_path / recipe),
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        recipe = next(iter(procs))
        output = procs.pop(recipe).communicate(timeout=300)[0]
        out = tmp_path / recipe
        assert (out / "train_summary.json").is_file(), (recipe, output[-3000:])
        assert json.loads((out / "train_summary.json").read_text())["global_step"] == 2
        params = json.loads((out / "parameters.json").read_text())
        losses = params["losses"]
        if recipe == "baseline":
            assert params["data"]["teacher_name"] is None and losses["alpha_ce"] == 0
        else:
            assert (losses["alpha_ce"], losses["alpha_mlm"], losses["temperature"]) == (2.0, 0.5, 2.0)
            expected = "reduce_map" if recipe.startswith("reduce_map") else "match"
            assert params["alignment"]["logits"] == expected, recipe
        assert params["optim"]["learning_rate"] == 5e-4 and params["optim"]["warmup_prop"] == 0.05
        assert params["loop"]["n_epoch"] == 1 and params["data"]["batch_size"] == 4  # SMOKE's


def test_recipes_pass_arguments_through_and_read_a_teacher_cache(tmp_path, pipeline_out, teacher_dir):
    from cache_teacher import CacheParams, build

    cache = tmp_path / "cache"
    build(CacheParams(pipeline_dir=str(pipeline_out), teacher_name=str(teacher_dir), align_logits="reduce_map",
                      out=str(cache), encoding="sample", k=4, device="cpu"), log=lambda *_: None)
    out = tmp_path / "out"
    proc = smoke("reduce_map_kl_mlm", pipeline_out, teacher_dir, out, "--seed", "7", TEACHER_CACHE=str(cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    params = json.loads((out / "parameters.json").read_text())
    assert params["data"]["teacher_cache"] == str(cache) and params["loop"]["seed"] == 7
    summary = json.loads((out / "train_summary.json").read_text())
    proc = smoke("reduce_map_kl_mlm", pipeline_out, teacher_dir, out, "--seed", "7", TEACHER_CACHE=str(cache))
    assert proc.returncode == 0, proc.stderr[-3000:]  # relaunched: --resume auto, the run had ended
    assert "resumed at update 2 " in (out / "train.log").read_text()
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == summary["global_step"] == 2
    proc = smoke("match_mse_kl_mlm", pipeline_out, teacher_dir, out, PIPE="")
    assert proc.returncode != 0 and "set PIPE" in proc.stderr
