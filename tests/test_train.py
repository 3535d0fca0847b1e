"""train.py / Distiller end to end on the pipeline's output with tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdcore.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]


def train_argv(out: Path, dump: Path, *extra: str) -> list[str]:
    return ["--dump_path", str(dump), "--binarized_data_folder", str(out / "processed_binarized"),
            "--student_name", str(out / "student"), "--student_pretrained_weights", str(out / "student_init"),
            "--student_token_counts", str(out / "student_counts.npy"), "--batch_size", "8",
            "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--warmup_prop", "0",
            "--log_interval", "2", "--checkpoint_interval", "3", "--valid_prop", "0.1", "--n_epoch", "1",
            "--device", "cpu", *extra]


def kd_flags(out: Path, teacher: Path, align: str) -> list[str]:
    flags = ["--teacher_name", str(teacher), "--alpha_ce", "2.0", "--alpha_mlm", "0.5", "--temperature", "2"]
    if align == "match":
        return [*flags, "--align_logits", "match", "--matching_ids", str(out / "matched_vocab.json")]
    if align == "reduce":
        return [*flags, "--align_logits", "reduce", "--t2s_mapping", str(out / "teacher2student.json"),
                "--matching_ids", str(out / "matched_vocab.json")]
    if align in ("uld", "dskd"):
        return [*flags, "--align_logits", align]
    if align == "uld_reduce":
        return [*flags, "--align_logits", "uld", "--uld_positions", "reduce", "--t2s_mapping",
                str(out / "teacher2student.json")]
    flags += ["--align_logits", "reduce_map", "--t2s_mapping", str(out / "teacher2student.json"),
              "--t2s_vocab_padded", str(out / "t2s_padded.npy"), "--t2s_mapped_ids", str(out / "t2s_mapped_ids.npy")]
    if align == "reduce_map_my_index":
        flags += ["--reduce_map_impl", "my_index", "--s2t_vocab_padded", str(out / "s2t_padded.npy"),
                  "--s2t_idxs_padded", str(out / "s2t_idxs_padded.npy"), "--sum_probs"]
    return flags


def run_train(argv: list[str]) -> int:
    from train import main

    os.environ["RVKD_NO_TQDM"] = "1"
    return run_cli(main, argv)


def two_process_run(argv: list[str], steps: int) -> subprocess.CompletedProcess:
    """train.py `argv` under ./train_multi_gpu.sh with 2 CPU processes (gloo); asserts that it exits 0 after
    `steps` updates with the same weights on both ranks; returns the finished process."""
    env = {**os.environ, "N_GPU_NODE": "2", "OMP_NUM_THREADS": "1", "RVKD_NO_TQDM": "1",
           "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([str(ROOT / "train_multi_gpu.sh"), *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dump = Path(argv[argv.index("--dump_path") + 1])
    summary = json.loads((dump / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == steps
    checksums = summary["rank_param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    return proc


def final_weights(dump: Path) -> dict[str, torch.Tensor]:
    return load_file(str(dump / "model.safetensors"))


@pytest.mark.parametrize("align", ["mlm_only", "match", "reduce", "reduce_map", "reduce_map_my_index"])
def test_each_alignment_trains(tmp_path, pipeline_out, teacher_dir, align):
    extra = ["--alpha_mlm", "1.0"] if align == "mlm_only" else kd_flags(pipeline_out, teacher_dir, align)
    dump = tmp_path / "dump"
    assert run_train(train_argv(pipeline_out, dump, "--max_steps", "4", *extra)) == 0
    summary = json.loads((dump / "train_summary.json").read_text())
    assert summary["global_step"] == 4
    assert all(torch.isfinite(torch.tensor(h["valid_loss"])) for h in summary["history"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "parameters.json",
                 "train.log"):
        assert (dump / name).is_file(), name
    assert (dump / "best" / "model.safetensors").is_file()
    assert list((dump / "tensorboard" / "run").iterdir())
    init = load_file(str(pipeline_out / "student_init" / "model.safetensors"))
    trained = final_weights(dump)
    assert any(not torch.equal(init[k], trained[k]) for k in init)


def test_exported_student_predicts_like_the_trained_module(tmp_path, pipeline_out):
    from transformers import AutoModelForMaskedLM

    from kdcore.model_io import load_student
    from kdcore.step_runner import StudentRunner

    dump = tmp_path / "dump"
    assert run_train(train_argv(pipeline_out, dump, "--max_steps", "3", "--alpha_mlm", "1.0")) == 0
    exported = AutoModelForMaskedLM.from_pretrained(str(dump)).eval()
    runner = StudentRunner(load_student(pipeline_out / "student"), mlm=True, kl=None)
    from safetensors.torch import load_model

    load_model(runner, str(dump / "checkpoints" / "3" / "model.safetensors"))
    runner.eval()
    ids = torch.tensor([[2, 40, 41, 42, 3], [2, 50, 60, 3, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids, attention_mask=mask).logits,
                                   runner.student(input_ids=ids, attention_mask=mask).logits)


def test_resume_equals_uninterrupted(tmp_path, pipeline_out, teacher_dir):
    flags = [*kd_flags(pipeline_out, teacher_dir, "match"), "--checkpoint_interval", "3"]
    full = tmp_path / "full"
    assert run_train(train_argv(pipeline_out, full, "--max_steps", "6", *flags)) == 0
    part = tmp_path / "part"
    assert run_train(train_argv(pipeline_out, part, "--max_steps", "3", *flags)) == 0
    assert run_train(train_argv(pipeline_out, part, "--max_steps", "6", "--load_from_checkpoint",
                                str(part / "checkpoints" / "3"), *flags)) == 0
    a, b = final_weights(full), final_weights(part)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert json.loads((part / "train_summary.json").read_text())["global_step"] == 6
    # killed during the final export: resuming from the last checkpoint trains no further, exports the same student
    before = final_weights(full)
    (full / "model.safetensors").unlink()
    assert run_train(train_argv(pipeline_out, full, "--max_steps", "6", "--load_from_checkpoint", str(full),
                                *flags)) == 0
    assert json.loads((full / "train_summary.json").read_text())["global_step"] == 6
    after = final_weights(full)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_after_patience_ran_out_does_not_train_on(tmp_path, pipeline_out):
    """A run that stopped on validation patience, resumed from its last checkpoint, stays stopped."""
    dump = tmp_path / "dump"
    flags = ["--alpha_mlm", "1.0", "--checkpoint_interval", "1", "--valid_epochs_patience", "1",
             "--learning_rate", "5e-2", "--max_steps", "40"]
    assert run_train(train_argv(pipeline_out, dump, *flags)) == 0
    step = json.loads((dump / "train_summary.json").read_text())["global_step"]
    assert step < 40  # patience stopped it
    assert run_train(train_argv(pipeline_out, dump, *flags, "--load_from_checkpoint", str(dump))) == 0
    assert json.loads((dump / "train_summary.json").read_text())["global_step"] == step


def test_torchrun_two_cpu_processes_agree(tmp_path, pipeline_out, teacher_dir):
    dump = tmp_path / "ddp"
    proc = two_process_run(train_argv(pipeline_out, dump, "--max_steps", "3",
                                      *kd_flags(pipeline_out, teacher_dir, "match")), steps=3)
    log = (dump / "train.log").read_text()
    assert "2 process(es)" in log
    for bar in ("Loading weights", "Writing model shards", "it/s]"):  # no per-load progress bars in the logs
        assert bar not in proc.stderr and bar not in proc.stdout and bar not in log, bar


def test_bad_inputs(tmp_path, pipeline_out, teacher_dir, capsys):
    dump = tmp_path / "dump"
    base = train_argv(pipeline_out, dump, "--max_steps", "2")
    cases = [
        ([*base, "--alpha_mlm", "0"], "sum to zero"),
        ([*base, "--alpha_ce", "1", "--teacher_name", str(teacher_dir), "--align_logits", "match"], "--matching_ids"),
        ([*base, "--alpha_ce", "1", "--teacher_name", str(teacher_dir), "--matching_ids",
          str(tmp_path / "missing.json")], "missing.json"),
        ([*train_argv(pipeline_out, dump, "--student_name", str(teacher_dir)), "--alpha_mlm", "1"], "different student"),
    ]
    for argv, needle in cases:
        assert run_train(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err
        assert not dump.exists(), f"a failed start left {dump} behind"
    (dump / "keep.txt").parent.mkdir(parents=True, exist_ok=True)
    (dump / "keep.txt").write_text("x")
    assert run_train([*base, "--alpha_mlm", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
    inside = [*train_argv(pipeline_out, pipeline_out, "--max_steps", "1"), "--alpha_mlm", "1", "--force"]
    assert run_train(inside) == 2
    assert "inside --dump_path" in capsys.readouterr().err and (pipeline_out / "manifest.json").is_file()
    assert run_train([*base, "--alpha_mlm", "1", "--force"]) == 0
    assert not (dump / "keep.txt").exists() and (dump / "model.safetensors").is_file()


def test_nan_loss_stops_with_last_checkpoint(tmp_path, pipeline_out, capsys):
    dump = tmp_path / "dump"
    argv = train_argv(pipeline_out, dump, "--max_steps", "30", "--alpha_mlm", "1", "--learning_rate", "1e20",
                      "--checkpoint_interval", "1", "--max_grad_norm", "1e38")
    assert run_train(argv) == 2
    err = capsys.readouterr().err
    assert "NaN" in err and "checkpoints" in err
    assert (dump / "checkpoints" / "1" / "model.safetensors").is_file()


def test_teacher_without_mlm_head_is_refused(tmp_path, pipeline_out, teacher_dir, capsys):
    import shutil

    from transformers import BertModel

    headless = tmp_path / "headless"
    shutil.copytree(teacher_dir, headless)
    (headless / "model.safetensors").unlink()
    BertModel.from_pretrained(str(teacher_dir)).save_pretrained(str(headless))
    capsys.readouterr()
    dump = tmp_path / "dump"
    argv = train_argv(pipeline_out, dump, "--max_steps", "1", *kd_flags(pipeline_out, headless, "match"))
    assert run_train(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "MLM head" in err and "\n" not in err, err
    assert not dump.exists()


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path, pipeline_out, capsys):
    dump = tmp_path / "dump"
    argv = [*train_argv(pipeline_out, dump, "--max_steps", "3"), "--alpha_mlm", "1"]
    assert run_train(argv) == 0
    ckpt = dump / "checkpoints" / "3"
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    capsys.readouterr()
    assert run_train([*argv, "--max_steps", "4", "--load_from_checkpoint", str(ckpt)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: cannot resume from checkpoint") and str(ckpt) in last, last


def test_ranks_read_disjoint_shards():
    from kdcore.errors import UserError
    from train import assign_shards

    shards = list(range(6))
    parts = [assign_shards(shards, rank, 3) for rank in range(3)]
    assert sorted(x for part in parts for x in part) == shards and all(len(p) == 2 for p in parts)
    with pytest.raises(UserError, match="regroup"):
        assign_shards(shards, 0, 4)


def test_no_validation_data_still_checkpoints(tmp_path, pipeline_out):
    dump = tmp_path / "dump"
    assert run_train([*train_argv(pipeline_out, dump, "--max_steps", "3"), "--alpha_mlm", "1", "--valid_prop", "0"]) == 0
    log = (dump / "train.log").read_text()
    assert "no validation data" in log and "valid loss nan" not in log
    assert (dump / "checkpoints" / "3" / "model.safetensors").is_file() and (dump / "model.safetensors").is_file()


def test_exported_student_has_a_model_card_and_fills_masks(tmp_path, pipeline_out, teacher_dir):
    from transformers import pipeline

    dump = tmp_path / "dump"
    assert run_train(train_argv(pipeline_out, dump, "--max_steps", "2", *kd_flags(pipeline_out, teacher_dir,
                                                                                  "match"))) == 0
    card = (dump / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: fill-mask\n")
    assert f"| teacher | {teacher_dir} |" in card and "| alignment of the KL term | match (match rows," in card
    assert "| loss weights | ce 2, mlm 0.5 (temperature 2) |" in card and "| updates | 2 |" in card
    assert "loss_ce " in card and "--align_logits match" in card and "27,318" in card
    assert (dump / "best" / "README.md").is_file()
    fill = pipeline("fill-mask", model=str(dump))
    predictions = fill(f"Кот {fill.tokenizer.mask_token} дом.")
    assert len(predictions) == 5 and all("token_str" in p for p in predictions)


def test_fp16_resume_restores_the_grad_scaler(tmp_path, pipeline_out, teacher_dir):
    """--precision fp16 on the CPU (autocast fp16 + GradScaler): a resumed run ends with the weights and the scaler
    state of an uninterrupted one."""
    flags = [*kd_flags(pipeline_out, teacher_dir, "match"), "--precision", "fp16", "--checkpoint_interval", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_train(train_argv(pipeline_out, full, "--max_steps", "4", *flags)) == 0
    assert run_train(train_argv(pipeline_out, part, "--max_steps", "2", *flags)) == 0
    assert run_train(train_argv(pipeline_out, part, "--max_steps", "4", "--load_from_checkpoint",
                                str(part / "checkpoints" / "2"), *flags)) == 0
    a, b = final_weights(full), final_weights(part)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    scalers = [torch.load(d / "checkpoints" / "4" / "trainer_state.pt", weights_only=True)["grad_scaler"]
               for d in (full, part)]
    assert scalers[0] == scalers[1] and scalers[0]["scale"] > 0
