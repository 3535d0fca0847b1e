"""The GLUE recipes in distil-finetuned-en/scripts/: generated consistently, valid bash, and runnable as they
are once the paths are set (a tiny teacher fine-tuned and distilled through the scripts themselves)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "distil-finetuned-en" / "scripts"
sys.path.append(str(SCRIPTS))

from make_scripts import RECIPES, TASKS, scripts  # noqa: E402

from test_glue_data import make_tokenizer, one_thread, write_glue_task  # noqa: E402, F401 (one_thread: autouse)


def test_every_task_has_every_recipe_as_generated():
    expected = scripts()
    assert len(expected) == 9 * len(RECIPES) and set(TASKS) == {p.parent.name for p in expected}
    for path, text in expected.items():
        assert path.read_text(encoding="utf-8") == text, f"{path} differs: rerun scripts/make_scripts.py"
        assert os.access(path, os.X_OK)
    on_disk = {p for p in SCRIPTS.glob("*/*.sh")}
    assert on_disk == set(expected)


def test_scripts_are_valid_bash():
    for path in [SCRIPTS / "common.sh", *sorted(SCRIPTS.glob("*/*.sh"))]:
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"


def _recorder(tmp_path: Path) -> Path:
    """A stand-in PYTHON that writes its arguments to $ARGV_OUT as JSON (no interpreter start-up cost of
    torch and transformers per script)."""
    stub = tmp_path / "python"
    stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "open(os.environ['ARGV_OUT'], 'w').write(json.dumps(sys.argv[1:]))\n")
    stub.chmod(0o755)
    return stub


def test_recipes_run_as_they_are(tmp_path):
    """train_teacher.sh, then distil_kl.sh and distil_kl_hyperbolic.sh on a tiny RTE, configured through the
    environment only: the command lines the scripts build are run in-process."""
    import torch
    from glue_cli import main
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig

    from kdcore.errors import run_cli
    from kdcore.tokenizer_utils import load_tokenizer

    tok = make_tokenizer(tmp_path / "tok")
    n_vocab = len(load_tokenizer(tok))
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=n_vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(tmp_path / "bert"))
    DistilBertConfig(vocab_size=n_vocab, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                     max_position_embeddings=64).save_pretrained(str(tmp_path / "student"))
    write_glue_task(tmp_path / "glue", "rte", n_train=16, n_dev=8)
    env = {"PATH": os.environ["PATH"], "PYTHON": str(_recorder(tmp_path)), "ARGV_OUT": str(tmp_path / "argv.json"),
           "GLUE_DIR": str(tmp_path / "glue"), "TEACHER_INIT": str(tmp_path / "bert"), "TOKENIZER": str(tok),
           "STUDENT_CONFIG": str(tmp_path / "student"), "DUMPS_ROOT": str(tmp_path / "dumps"), "DEVICE": "cpu",
           "GLOBAL_ARGS": "--max_steps 2 --batch_size 8"}
    for recipe in ("train_teacher", "distil_kl", "distil_kl_hyperbolic"):
        proc = subprocess.run(["bash", str(SCRIPTS / "rte" / f"{recipe}.sh"), "--n_epochs", "1"], env=env,
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        argv = json.loads((tmp_path / "argv.json").read_text())
        assert Path(argv[0]).resolve() == ROOT / "distil-finetuned-en" / "train.py"
        assert run_cli(main, argv[1:]) == 0
    teacher = json.loads((tmp_path / "dumps" / "rte" / "teacher" / "results.json").read_text())
    student = json.loads((tmp_path / "dumps" / "rte" / "distil_kl" / "results.json").read_text())
    assert teacher["params"]["from_pretrained"] and teacher["params"]["lr"] == 2e-5
    assert teacher["params"]["tokenizer_params"]["max_length"] == 64 and teacher["global_step"] == 2
    assert student["params"]["temperature"] == 5 and student["params"]["n_epochs"] == 1
    assert set(student["dev"]) == {"accuracy"} and "student starts from random weights" in proc.stderr
    hyperbolic = json.loads((tmp_path / "dumps" / "rte" / "distil_kl_hyperbolic" / "results.json").read_text())
    assert hyperbolic["params"]["use_hyperbolic_projections"] and hyperbolic["initial_curvature"] > 0


@pytest.mark.parametrize("variant", ["distil_kl_mse", "distil_kl_hyperbolic"])
def test_hidden_recipes_build_valid_command_lines(tmp_path, variant):
    """The hidden-state recipes' flags parse (checked with a stand-in PYTHON that runs only the parser)."""
    stub = tmp_path / "python"
    stub.write_text(f"#!{sys.executable}\nimport sys\nsys.path[:0] = [{str(ROOT)!r}, "
                    f"{str(ROOT / 'distil-finetuned-en')!r}]\nfrom glue_args import build_parser\n"
                    "a = build_parser().parse_args(sys.argv[2:])\nprint(a.command, a.alpha_mse, a.alpha_contrastive, "
                    "a.hidden_distil_type, a.n_epochs)\n")
    stub.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "PYTHON": str(stub), "DUMPS_ROOT": str(tmp_path / "d")}
    proc = subprocess.run(["bash", str(SCRIPTS / "mnli" / f"{variant}.sh"), "--n_epochs", "2"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    expected = {"distil_kl_mse": "distil_teacher 0.1 0.0 None 2",
                "distil_kl_hyperbolic": "distil_teacher 0.0 0.1 hyperbolic 2"}[variant]
    assert proc.stdout.strip() == expected
