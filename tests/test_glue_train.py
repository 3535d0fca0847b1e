"""distil-finetuned-en end to end on tiny synthetic GLUE folders: train_single, distil_teacher, every task's
results.json, the saved best model, the schedule, and one-line CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "distil-finetuned-en") not in sys.path:
    sys.path.append(str(ROOT / "distil-finetuned-en"))

from glue_tasks import GLUE_TASKS, TASKS  # noqa: E402
from glue_trainer import TrainConfig, lr_schedule  # noqa: E402

from kdcore.errors import run_cli  # noqa: E402
from test_glue_data import make_tokenizer, one_thread, write_glue_task  # noqa: E402, F401 (one_thread: autouse)

FAST = ["--batch_size", "16", "--lr", "2e-3", "--device", "cpu", "--seed", "0"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tokenizer, a tiny BERT config dir, a tiny DistilBERT config dir and a GLUE root with SST-2."""
    from transformers import BertConfig, DistilBertConfig

    from kdcore.tokenizer_utils import load_tokenizer

    base = tmp_path_factory.mktemp("glue_train")
    tok = make_tokenizer(base / "tok")
    n_vocab = len(load_tokenizer(tok))
    bert = base / "bert"
    BertConfig(vocab_size=n_vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64).save_pretrained(str(bert))
    student = base / "student"
    DistilBertConfig(vocab_size=n_vocab, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                     max_position_embeddings=64).save_pretrained(str(student))
    glue = base / "glue"
    write_glue_task(glue, "sst2", n_train=160, n_dev=40, seed=5)
    return {"base": base, "tok": tok, "bert": bert, "student": student, "glue": glue}


def cli(args: list[str]) -> int:
    from glue_cli import main

    return run_cli(main, args)


def common(env, task: str, dumps: Path, *extra: str, glue: Path | None = None) -> list[str]:
    return ["--glue_dataset", task, "--glue_dir", str(glue or env["glue"]), "--tokenizer_name", str(env["tok"]),
            "--dumps_dir", str(dumps), *FAST, *extra]


@pytest.fixture(scope="module")
def teacher_run(env):
    """train_single on the separable SST-2: the teacher of the distillation tests."""
    dumps = env["base"] / "teacher"
    argv = [*common(env, "sst2", dumps, "--log_after_n_steps", "10"),
            "train_single", "--model_name", str(env["bert"]), "--n_epochs", "10", "--valid_patience", "4",
            "--lr_drop_patience", "2", "--min_lr", "1e-5"]
    assert cli(argv) == 0
    return dumps


def test_train_single_learns_and_saves_the_best_model(env, teacher_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    results = json.loads((teacher_run / "results.json").read_text())
    assert results["task"] == "sst2" and set(results["dev"]) == {"accuracy"}
    assert results["dev"]["accuracy"] >= 0.9, results["history"]
    assert results["train"]["accuracy"] >= 0.9
    assert results["best_step"] > 0 and results["params"]["command"] == "train_single"
    if results["stopped_early"]:  # 4 validations (every 10 updates) without a new best
        assert results["global_step"] == results["best_step"] + 40
    assert results["selection"] == {"split": "dev", "metrics": ["accuracy"], "score": results["dev"]["accuracy"]}
    best = next(h for h in results["history"] if h["step"] == results["best_step"])
    assert best["dev"] == results["dev"]
    # the saved model is the best one: reopened, it scores exactly what results.json says
    model = AutoModelForSequenceClassification.from_pretrained(str(teacher_run / "best_model")).eval()
    tok = AutoTokenizer.from_pretrained(str(teacher_run / "best_model"))
    assert model.config.id2label == {0: "0", 1: "1"}
    lines = (env["glue"] / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    texts, labels = zip(*(line.split("\t") for line in lines), strict=True)
    with torch.no_grad():
        enc = tok(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        preds = model(**enc).logits.argmax(-1)
    assert (preds == torch.tensor([int(x) for x in labels])).float().mean().item() == pytest.approx(
        results["dev"]["accuracy"])
    assert list((teacher_run / "tensorboard").glob("events.out.tfevents.*"))
    assert "update" in (teacher_run / "train.log").read_text()


def test_distil_teacher_kl_beats_chance(env, teacher_run):
    dumps = env["base"] / "distil"
    argv = [*common(env, "sst2", dumps, "--alpha_task", "0.5", "--lr", "5e-3"),
            "distil_teacher", "--teacher_name", str(teacher_run / "best_model"), "--student_name", str(env["student"]),
            "--alpha_kl", "1.0", "--temperature", "2", "--train_temperature", "--n_epochs", "5", "--warmup_prop", "0.1"]
    assert cli(argv) == 0
    results = json.loads((dumps / "results.json").read_text())
    assert results["teacher"]["dev"]["accuracy"] >= 0.9
    assert results["dev"]["accuracy"] >= 0.75, results["history"]
    assert results["model"]["model_type"] == "distilbert" and results["model"]["learned_temperature"] > 0
    assert results["params"]["alpha_kl"] == 1.0
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(str(dumps / "best_model"))
    assert student.config.model_type == "distilbert" and student.config.num_labels == 2


def test_student_weights_from_a_state_dict_file(env, teacher_run, tmp_path):
    """--student_weights accepts a state-dict file (init_weights.py's output) and starts from it."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(str(env["student"]))
    torch.manual_seed(7)
    init = AutoModelForSequenceClassification.from_config(config)
    save_file({k: v.contiguous() for k, v in init.state_dict().items()}, str(tmp_path / "init.safetensors"))
    argv = [*common(env, "sst2", tmp_path / "d", "--max_steps", "1", "--lr", "1e-9"),
            "distil_teacher", "--teacher_name", str(teacher_run / "best_model"), "--student_name", str(env["student"]),
            "--student_weights", str(tmp_path / "init.safetensors")]
    assert cli(argv) == 0
    saved = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "d" / "best_model"))
    emb = "distilbert.embeddings.word_embeddings.weight"
    assert torch.allclose(saved.state_dict()[emb], init.state_dict()[emb], atol=1e-6)


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_every_task_writes_glue_results(env, tmp_path, task):
    spec = TASKS[task]
    write_glue_task(tmp_path / "glue", task, n_train=24, n_dev=10)
    dumps = tmp_path / "run"
    argv = [*common(env, task, dumps, "--max_steps", "2", "--train_eval_examples", "8", glue=tmp_path / "glue"),
            "train_single", "--model_name", str(env["bert"])]
    assert cli(argv) == 0
    results = json.loads((dumps / "results.json").read_text())
    dev_keys = [key for key, _ in spec.dev_files]
    assert {"task", "train", "best_step", "params", *dev_keys} <= set(results)
    assert "dev" not in results if task == "mnli" else "dev_matched" not in results
    for key in ["train", *dev_keys]:
        assert list(results[key]) == list(spec.metrics)
    assert results["data"]["n_train_eval"] == 8 and results["global_step"] == 2
    config = json.loads((dumps / "best_model" / "config.json").read_text())
    assert len(config["id2label"]) == (1 if spec.regression else len(spec.labels))
    assert config["problem_type"] == ("regression" if spec.regression else "single_label_classification")


def test_stsb_distillation_uses_prediction_mse(env, tmp_path):
    glue = tmp_path / "glue"
    write_glue_task(glue, "stsb", n_train=24, n_dev=10)
    teacher = tmp_path / "t"
    assert cli([*common(env, "stsb", teacher, "--max_steps", "2", glue=glue),
                "train_single", "--model_name", str(env["bert"])]) == 0
    dumps = tmp_path / "s"
    assert cli([*common(env, "stsb", dumps, "--max_steps", "3", "--log_after_n_steps", "1", glue=glue),
                "distil_teacher", "--teacher_name", str(teacher / "best_model"),
                  "--student_name", str(env["student"])]) == 0
    results = json.loads((dumps / "results.json").read_text())
    assert set(results["dev"]) == {"pearson", "spearman"} and len(results["history"]) == 3
    events = b"".join(p.read_bytes() for p in (dumps / "tensorboard").glob("events.out.tfevents.*"))
    assert b"train/pred_mse" in events and b"train/kl" not in events


def test_single_sentence_task_with_four_labels(env, tmp_path):
    data = tmp_path / "topics"
    write_glue_task(data, "single_sentence", n_train=48, n_dev=16)
    dumps = tmp_path / "run"
    assert cli([*common(env, "single_sentence", dumps, "--max_steps", "2", "--num_labels", "4", glue=data),
                "train_single", "--model_name", str(env["bert"])]) == 0
    results = json.loads((dumps / "results.json").read_text())
    assert set(results["dev"]) == {"accuracy", "macro_f1"} and results["data"]["num_labels"] == 4
    assert json.loads((dumps / "best_model" / "config.json").read_text())["id2label"] == {str(i): str(i)
                                                                                          for i in range(4)}


def test_from_pretrained_keeps_the_encoder_and_adds_a_head(env, tmp_path):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForMaskedLM

    mlm_dir = tmp_path / "mlm"
    torch.manual_seed(3)
    mlm = BertForMaskedLM(BertConfig.from_pretrained(str(env["bert"])))
    mlm.save_pretrained(str(mlm_dir))
    dumps = tmp_path / "run"
    assert cli([*common(env, "sst2", dumps, "--max_steps", "1", "--lr", "1e-9"),
                "train_single", "--model_name", str(mlm_dir), "--from_pretrained"]) == 0
    tuned = AutoModelForSequenceClassification.from_pretrained(str(dumps / "best_model"))
    key = "bert.encoder.layer.1.output.dense.weight"
    assert torch.allclose(tuned.state_dict()[key], mlm.state_dict()[key], atol=1e-6)
    assert "head initialised fresh" in (dumps / "train.log").read_text()


def test_early_stopping_and_lr_drops(env, tmp_path):
    """With a learning rate too small to change anything, the dev score never improves after the first
    validation: patience 3 stops after update 4; the lr is divided after every 2 bad validations."""
    dumps = tmp_path / "run"
    assert cli([*common(env, "sst2", dumps, "--lr", "1e-12", "--log_after_n_steps", "1", "--no-log_after_epoch"),
                "train_single", "--model_name", str(env["bert"]), "--n_epochs", "5", "--valid_patience", "3",
                "--lr_drop_patience", "2", "--lr_drop_div", "4"]) == 0
    results = json.loads((dumps / "results.json").read_text())
    assert results["stopped_early"] and results["global_step"] == 4 and results["best_step"] == 1
    assert [h["lr"] for h in results["history"]] == pytest.approx([1e-12, 1e-12, 1e-12, 0.25e-12])


def test_lr_schedule():
    """GLUE's options on the trainer core's schedule: warm-up, drops after 2 validations without a new best score
    (never below min_lr), linear decay."""
    plateau = lr_schedule(TrainConfig(lr=1.0, warmup_prop=0.2, lr_drop_patience=2, lr_drop_div=2.0, min_lr=0.3), 10)
    assert [plateau.lr(s) for s in range(3)] == pytest.approx([0.5, 1.0, 1.0])
    drops = [plateau.on_validation(score) for score in (0.5, 0.6, 0.6, 0.5, 0.6, 0.6, 0.6, 0.6)]
    assert drops == [False, False, False, True, False, True, False, False]  # 1 -> 0.5 -> 0.3 (floor), then no more
    assert plateau.lr(5) == pytest.approx(0.3)
    linear = lr_schedule(TrainConfig(lr=1.0, schedule="linear", warmup_prop=0.2), 10)
    assert [linear.lr(s) for s in (0, 1, 2, 6, 9)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.125])


def _error(capsys, argv: list[str]) -> str:
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_cli_errors_are_one_line(env, teacher_run, tmp_path, capsys):
    single = ["train_single", "--model_name", str(env["bert"])]
    distil = ["distil_teacher", "--teacher_name", str(teacher_run / "best_model"), "--student_name", str(env["student"])]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "--force" in _error(capsys, common(env, "sst2", tmp_path / "full") + single)
    assert "GLUE task folder" in _error(capsys, common(env, "sst2", tmp_path / "d", glue=tmp_path / "full") + single)
    bad = tmp_path / "bad"
    write_glue_task(bad, "sst2", 10, 4)
    (bad / "SST-2" / "dev.tsv").unlink()
    assert "SST-2/dev.tsv" in _error(capsys, common(env, "sst2", tmp_path / "d", glue=bad) + single)
    write_glue_task(bad, "sst2", 10, 4)
    lines = (bad / "SST-2" / "train.tsv").read_text().splitlines()
    (bad / "SST-2" / "train.tsv").write_text("\n".join([*lines[:4], "no label here", *lines[4:]]) + "\n")
    assert "SST-2/train.tsv:5: malformed row" in _error(capsys, common(env, "sst2", tmp_path / "d", glue=bad) + single)
    assert "--alpha_contrastive > 0" in _error(capsys, common(env, "sst2", tmp_path / "d") + distil + ["hyperbolic"])
    assert "--alpha_task must be positive" in _error(capsys, common(env, "sst2", tmp_path / "d", "--alpha_task", "0")
                                                     + single)
    mnli = tmp_path / "mnli"
    write_glue_task(mnli, "mnli", 6, 3)
    assert "no trained classifier for 3 label(s)" in _error(capsys, common(env, "mnli", tmp_path / "d", glue=mnli)
                                                            + distil)
    from train_teacher_tok import train_bert_tokenizer

    (tmp_path / "corpus.txt").write_text("other words entirely , cased Text here .\n" * 30, encoding="utf-8")
    train_bert_tokenizer([str(tmp_path / "corpus.txt")], 60, str(tmp_path / "other_tok"), n_unused=2, max_len=64,
                         min_frequency=1)
    other = common(env, "sst2", tmp_path / "d")
    other[other.index("--tokenizer_name") + 1] = str(tmp_path / "other_tok")
    assert "holds a different tokenizer than --tokenizer_name" in _error(capsys, [*other, *distil])
    assert not (tmp_path / "d").exists()  # nothing written before the inputs are known to be good


@pytest.mark.parametrize("extra", [
    ["--alpha_mse", "0.1", "--alpha_cos", "0.1"],
    ["--alpha_contrastive", "0.1", "--n_negative_samples", "4", "--projection_strategy", "skip"],
    ["--alpha_contrastive", "0.1", "--projection_strategy", "pool_and_project", "--project_to", "student"],
    ["--alpha_contrastive", "0.1", "--project_to", "student", "hyperbolic", "--init_c", "precompute_from_teacher",
     "--n_samples_to_precompute_c", "64", "--n_components", "8", "--adjust_c", "recompute_after_epoch",
     "--use_hyperbolic_projections"],
], ids=["mse_cos", "contrastive", "pool_and_project", "hyperbolic"])
def test_distil_with_hidden_state_losses(env, teacher_run, tmp_path, extra):
    dumps = tmp_path / "run"
    argv = [*common(env, "sst2", dumps, "--batch_size", "32", "--log_after_n_steps", "3"),
            "distil_teacher", "--teacher_name", str(teacher_run / "best_model"), "--student_name", str(env["student"]),
            "--n_epochs", "2", *extra]  # the hyperbolic sub-command comes last
    assert cli(argv) == 0
    results = json.loads((dumps / "results.json").read_text())
    assert results["global_step"] == 10 and results["dev"]["accuracy"] >= 0.0
    events = b"".join(p.read_bytes() for p in (dumps / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("mse", "cos", "contrastive"):
        assert (f"train/{name}".encode() in events) == (f"--alpha_{name}" in extra)
    if "hyperbolic" in extra:
        log = (dumps / "train.log").read_text()
        assert log.count("curvature c = ") == 2  # before training and after epoch 1 (not after the last)
        assert results["initial_curvature"] > 0 and results["model"]["curvature"] > 0 and b"train/c" in events


def test_hidden_mse_term_by_hand():
    """average_by_layers with equal widths: the projection starts as the identity, so the MSE term is the
    mean over real positions of ||mean of student states - mean of teacher states||^2."""
    from types import SimpleNamespace

    from glue_args import build_parser
    from hidden_terms import build_hidden_terms

    a = build_parser().parse_args(["--glue_dataset", "sst2", "--glue_dir", ".", "--tokenizer_name", ".",
                                   "--dumps_dir", "x", "distil_teacher", "--teacher_name", ".", "--student_name",
                                   ".", "--alpha_mse", "0.5"])
    terms = build_hidden_terms(a, SimpleNamespace(num_hidden_layers=3, hidden_size=8),
                               SimpleNamespace(num_hidden_layers=1, hidden_size=8), n_train=10)
    assert terms.alphas == {"mse": 0.5}
    torch.manual_seed(0)
    teacher = tuple(torch.randn(2, 5, 8) for _ in range(4))
    student = tuple(torch.randn(2, 5, 8) for _ in range(2))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    diff = (torch.stack(student).mean(0) - torch.stack(teacher).mean(0))[mask.bool()]
    assert float(terms(teacher, student, mask)["mse"].detach()) == pytest.approx(float(diff.pow(2).sum(-1).mean()), rel=1e-5)


def test_cli_choices_match_the_shared_modules():
    import glue_args

    import custom_step
    from kdcore import hidden_projection

    assert glue_args.PROJECTION_STRATEGIES == hidden_projection.PROJECTION_STRATEGIES
    assert glue_args.ADJUST_C == hidden_projection.ADJUST_C
    assert glue_args.NEGATIVE_SAMPLING == custom_step.NEGATIVE_SAMPLING


def test_entry_point_runs_as_a_script(env, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "distil-finetuned-en" / "train.py"), "--glue_dataset", "sst2",
                           "--glue_dir", str(tmp_path / "none"), "--tokenizer_name", str(env["tok"]), "--dumps_dir",
                           str(tmp_path / "d"), "train_single", "--model_name", str(env["bert"])],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: --glue_dir {tmp_path / 'none'} is not a directory"
