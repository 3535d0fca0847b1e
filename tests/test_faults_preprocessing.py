"""Kill anywhere in preprocessing: a run_pipeline.py (with the teacher cache as step 11) SIGKILLed during each of its
steps, and a cache_teacher.py SIGKILLed during its build, rerun with the same command, end byte-identical to a clean
run with no temp file left; two clean runs of the WordPiece trainers are byte-identical. (The chain below also
proves every step reproducible: each one is redone in another process than the clean run's and must give the same
bytes.)

Compared: every file under OUT, byte for byte, except the timings of manifest.json (`seconds_total`, and every
step's `seconds` and `stats.seconds`), which are dropped before comparing the rest of it. All runs write to the
same OUT path (the manifest records it) and are moved aside afterwards.

The kills form one chain to keep the module fast: run k is killed during step k (`tests/kill_at_step.py`, right after
the step's first rename, so part of its outputs exist and its manifest entry does not), so run k + 1 must skip steps
1..k-1, redo step k in full and is then killed during step k + 1; the last run is the plain command and finishes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "kill_at_step.py"
CACHE_ARGS = ["--cache_teacher", "reduce", "--cache_format", "sample", "--cache_k", "4", "--cache_batch_size", "512"]
LOG_LINE = re.compile(r"^\[\d+/\d+\] step \d+ (\w+): (.*)$")
SKIPPED = "up to date, skipped"
TEMP_NAME = re.compile(r"\.(?:tmp|old)-\d+")


def _env(kill_at: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KILL_AT"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               RVKD_NO_TQDM="1")
    if kill_at:
        env["KILL_AT"] = kill_at
    return env


def _run(script: str, argv: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    """The plain script (`preprocessing/SCRIPT.py ARGV`), or with KILL_AT the kill helper around it."""
    cmd = [sys.executable, str(HELPER), script, *argv] if kill_at else \
        [sys.executable, str(ROOT / "preprocessing" / f"{script}.py"), *argv]
    return subprocess.run(cmd, env=_env(kill_at), capture_output=True, text=True, timeout=300)


def _steps_logged(stdout: str) -> dict[str, str]:
    """{step name: "skipped" or "done"} from run_pipeline.py's log."""
    found = (LOG_LINE.match(line) for line in stdout.splitlines())
    return {m.group(1): "skipped" if m.group(2) == SKIPPED else "done" for m in found if m}


def _without_timings(manifest: dict) -> dict:
    manifest = {k: v for k, v in manifest.items() if k != "seconds_total"}
    manifest["steps"] = {name: {**{k: v for k, v in step.items() if k != "seconds"},
                                "stats": {k: v for k, v in step["stats"].items() if k != "seconds"}}
                         for name, step in manifest["steps"].items()}
    return manifest


def _snapshot(root: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `root`, manifest.json without its timings."""
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    if "manifest.json" in files:
        files["manifest.json"] = json.dumps(_without_timings(json.loads(files["manifest.json"])), indent=1).encode()
    return files


def _temps(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if TEMP_NAME.search(p.name))


def _assert_same(got: Path, want: Path) -> None:
    a, b = _snapshot(got), _snapshot(want)
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_dir, corpus, student_config) -> dict:
    """{"root", "argv" (every run's arguments, OUT = root/out), "clean" (a clean run's OUT, moved aside)}."""
    root = tmp_path_factory.mktemp("kills")
    argv = ["--teacher_name", str(teacher_dir), "--corpus", str(corpus), "--student_vocab_size", "150",
            "--student_config", str(student_config), "--out_dir", str(root / "out"), "--max_len", "24",
            "--n_shards", "2", "--cut_len", "8", "--num_workers", "1", *CACHE_ARGS]
    proc = _run("run_pipeline", argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (root / "out").rename(root / "clean")
    return {"root": root, "argv": argv, "clean": root / "clean"}


@pytest.mark.parametrize("script", ["train_reduced_tok", "train_teacher_tok"])
def test_two_clean_runs_of_a_wordpiece_trainer_are_byte_identical(tmp_path, corpus, teacher_dir, script):
    """Step 1 (and the teacher tokenizer of the demo) in two processes. Before the trainer was made deterministic,
    six runs at these sizes gave three different student vocabularies and four different teacher ones."""
    args = {"train_reduced_tok": ["--teacher_name", str(teacher_dir), "--vocab_size", "400"],
            "train_teacher_tok": ["--vocab_size", "300", "--min_frequency", "1"]}[script]
    for name in ("a", "b"):
        proc = _run(script, ["--corpus", str(corpus), *args, "--out", str(tmp_path / name)])
        assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same(tmp_path / "a", tmp_path / "b")


def test_kill_during_each_step_then_the_same_command_ends_as_a_clean_run(runs):
    from run_pipeline import STEPS

    names = [step.name for step in STEPS]
    out, argv = runs["root"] / "out", runs["argv"]
    left: list[str] = []
    killed_with_temps = []
    for k, name in enumerate([*names, None]):
        proc = _run("run_pipeline", argv, kill_at=name)
        assert proc.returncode == (-9 if name else 0), (name, proc.returncode, proc.stderr[-3000:])
        redone = {names[k - 1]: "done"} if k else {}
        assert _steps_logged(proc.stdout) == {**dict.fromkeys(names[:max(k - 1, 0)], "skipped"), **redone}, name
        assert ("removed" in proc.stdout) == bool(left) and not any((out / p).exists() for p in left), name
        left = _temps(out)
        if left:
            killed_with_temps.append(name)
    assert len(killed_with_temps) >= 5, killed_with_temps  # the kills left temp files (and the reruns removed them)
    assert left == []
    _assert_same(out, runs["clean"])


def test_kill_during_the_cache_build_then_the_same_command_ends_as_a_clean_build(runs, teacher_dir):
    cache = runs["root"] / "cache"
    argv = ["--pipeline_dir", str(runs["clean"]), "--teacher_name", str(teacher_dir), "--align_logits", "reduce",
            "--format", "sample", "--k", "4", "--batch_size", "512", "--out", str(cache)]
    proc = _run("cache_teacher", argv, kill_at="cache_teacher:3")  # shard 0 published, shard 1 complete in its temp
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (cache / "shard_00000").is_dir() and not (cache / "cache.json").exists()
    assert len(_temps(cache)) == 1
    proc = _run("cache_teacher", argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.splitlines()[-1])
    assert stats["skipped"] == 1 and stats["built"] == 1
    assert _temps(cache) == []
    _assert_same(cache, runs["clean"] / "teacher_cache")
    shutil.rmtree(cache)


def test_a_full_disk_while_writing_shards_is_one_line_and_the_same_command_then_finishes(tmp_path, teacher_dir,
                                                                                         corpus, student_config):
    """RLIMIT_FSIZE (20 KB: the tokenizer and maps fit, a shard's ids do not) makes step 3's writes fail."""
    import resource

    argv = ["--teacher_name", str(teacher_dir), "--corpus", str(corpus), "--student_vocab_size", "150",
            "--student_config", str(student_config), "--out_dir", str(tmp_path / "out"), "--max_len", "24",
            "--n_shards", "2", "--num_workers", "1"]
    cmd = [sys.executable, str(ROOT / "preprocessing" / "run_pipeline.py"), *argv]
    full = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)))
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    line = full.stderr.strip()
    assert "\n" not in line and line.startswith("error: cannot write shard ") and "free disk space" in line, line
    assert not _temps(tmp_path / "out")
    done = _steps_logged(full.stdout)
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    logged = _steps_logged(again.stdout)
    assert done and all(logged[step] == "skipped" for step in done), (done, logged)
    assert not _temps(tmp_path / "out")
