"""train.py with the hidden-state losses, the hyperbolic sub-command and delta.py, end to end on tiny models
(teacher 4 layers / 48 wide, student 2 layers / 32 wide)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import kd_flags, run_train, train_argv

# two updates of one micro-batch, a tiny validation split, one validation at the end
FAST = ["--gradient_accumulation_steps", "1", "--valid_prop", "0.005", "--checkpoint_interval", "100"]


def _configs(out: Path, teacher: Path) -> dict[str, list[str]]:
    return {
        "match_mse_cos_contrastive": [
            *kd_flags(out, teacher, "match"), "--alpha_mse", "0.1", "--alpha_cos", "0.1", "--alpha_contrastive", "0.1",
            "--projection_strategy", "skip", "--n_negative_samples", "4", "--negative_sampling_strategy",
            "teacher_and_student", "--use_mismatched_ids", "--from_one_sample", "--add_neg_size_constant"],
        "reduce_hiddens_with_reduce_kl": [
            *kd_flags(out, teacher, "reduce"), "--align_hiddens", "reduce", "--alpha_mse", "0.1",
            "--alpha_contrastive", "0.1", "--projection_strategy", "weighted_average_by_layers", "--project_to",
            "intermediate", "--intermediate_dim", "16", "--average_hiddens"],
        "mlm_and_pool_and_project": [
            "--teacher_name", str(teacher), "--alpha_ce", "0", "--alpha_mlm", "1", "--alpha_contrastive", "0.1",
            "--projection_strategy", "pool_and_project", "--project_to", "student", "--negative_sampling_strategy",
            "teacher"],
    }


@pytest.mark.parametrize("name", ["match_mse_cos_contrastive", "reduce_hiddens_with_reduce_kl",
                                  "mlm_and_pool_and_project"])
def test_hidden_losses_train(tmp_path, pipeline_out, teacher_dir, name):
    dump = tmp_path / "dump"
    argv = train_argv(pipeline_out, dump, "--max_steps", "2", *FAST, *_configs(pipeline_out, teacher_dir)[name])
    assert run_train(argv) == 0
    summary = json.loads((dump / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and torch.isfinite(torch.tensor(summary["history"][-1]["valid_loss"]))
    log = (dump / "train.log").read_text()
    step_line = next(line for line in log.splitlines() if "step 2: loss=" in line)
    for term in ("mse", "cos", "contrastive"):
        if f"--alpha_{term}" in argv:
            value = float(re.search(rf"loss_{term}=(\S+)", step_line).group(1))
            assert value == value and abs(value) < 1e6, (term, step_line)
    checkpoint = load_file(str(dump / "checkpoints" / "2" / "model.safetensors"))
    assert any(k.startswith("hidden.projections.") for k in checkpoint)
    exported = load_file(str(dump / "model.safetensors"))
    assert not any(k.startswith("hidden.") for k in exported)  # the HF student stays a plain student


def _hyperbolic(out: Path, teacher: Path) -> list[str]:
    return [*kd_flags(out, teacher, "match"), "--alpha_contrastive", "0.5", "--n_negative_samples", "4",
            "--projection_strategy", "last", "hyperbolic", "--init_c", "precompute_from_teacher",
            "--n_samples_to_precompute_c", "60", "--n_components", "8", "--n_tries", "2", "--adjust_c",
            "train_exp_map_student", "--use_hyperbolic_projections"]


def test_hyperbolic_resume_restores_the_curvature(tmp_path, pipeline_out, teacher_dir):
    flags = _hyperbolic(pipeline_out, teacher_dir)
    fast = [*FAST, "--checkpoint_interval", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_train(train_argv(pipeline_out, full, "--max_steps", "3", *fast, *flags)) == 0
    assert run_train(train_argv(pipeline_out, part, "--max_steps", "2", *fast, *flags)) == 0
    assert run_train(train_argv(pipeline_out, part, "--max_steps", "3", *fast, "--load_from_checkpoint",
                                str(part / "checkpoints" / "2"), *flags)) == 0
    log = (full / "train.log").read_text()
    precomputed = float(re.search(r"curvature c = (\S+) from 60 teacher logits vectors", log).group(1))
    c_full = json.loads((full / "train_summary.json").read_text())["curvature"]
    c_part = json.loads((part / "train_summary.json").read_text())["curvature"]
    assert c_full == pytest.approx(c_part, rel=1e-6)
    assert c_full != pytest.approx(precomputed, rel=1e-6)  # trained through the student's exp map
    assert c_full == pytest.approx(precomputed, rel=0.2)
    # the resumed run took c from the checkpoint, it did not estimate it again
    resumed_log = (part / "train.log").read_text().split("resumed at update 2")[1]
    assert "curvature c =" not in resumed_log
    ckpt = load_file(str(part / "checkpoints" / "2" / "model.safetensors"))
    assert "hidden.hyperbolic.distance.log_c" in ckpt
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def _small_shard_set(src: Path, dst: Path, n: int) -> Path:
    """The first n sequences of src's first shard (with their match masks) as a one-shard set."""
    from kdcore.shard_io import ShardSetWriter, open_shards, read_index

    index = read_index(src)
    block = open_shards(src)[0].block(0, n)
    writer = ShardSetWriter(dst, index["teacher_vocab_size"], index["student_vocab_size"], index["fingerprints"])
    with writer.new_shard() as shard:
        shard.add(block)
    writer.close()
    open_shards(dst)[0].write_match(block.t_match, block.s_match)
    return dst


@pytest.mark.parametrize("side,extra", [("student", ()), ("teacher", ("--teacher_precision", "bf16"))])
def test_hyperbolic_recompute_after_every_epoch(tmp_path, pipeline_out, teacher_dir, side, extra):
    """Also from a bf16 teacher, whose Linears the trainer stores in bf16: it runs in its own precision here too."""
    dump = tmp_path / "dump"
    data = _small_shard_set(pipeline_out / "processed_binarized", tmp_path / "small" / "processed_binarized", 40)
    flags = [*kd_flags(pipeline_out, teacher_dir, "match"), "--alpha_contrastive", "0.1", "--n_negative_samples",
             "3", *extra, "hyperbolic", "--init_c", f"precompute_from_{side}", "--n_samples_to_precompute_c", "40",
             "--n_components", "6", "--n_tries", "1", "--adjust_c", "recompute_after_epoch", "--no-riemannian"]
    # 30 training sequences in one batch: one update per epoch; the run stops at the last update of epoch 3
    argv = train_argv(pipeline_out, dump, "--n_epoch", "3", "--batch_size", "32", "--gradient_accumulation_steps",
                      "1", "--valid_prop", "0.25", "--checkpoint_interval", "100", "--binarized_data_folder",
                      str(data), *flags)
    assert run_train(argv) == 0
    log = (dump / "train.log").read_text()
    values = re.findall(rf"curvature c = (\S+) from 40 {side} logits vectors[^\n]*?(?:after epoch (\d))?\n", log)
    assert [epoch for _, epoch in values] == ["", "1", "2"]
    summary = json.loads((dump / "train_summary.json").read_text())
    assert summary["global_step"] == 3
    assert summary["curvature"] == pytest.approx(float(values[-1][0]), rel=1e-5)


def test_flat_and_trailing_subcommand_parsing(pipeline_out):
    from train import build_parser

    base = train_argv(pipeline_out, Path("/nonexistent"))
    flat = build_parser().parse_args([*base, "--alpha_mlm", "1"])
    assert flat.hidden_distil_type is None and flat.c == 1.0 and flat.riemannian and flat.init_c is None
    hyp = build_parser().parse_args([*base, "--alpha_contrastive", "0.1", "hyperbolic", "--c", "2.5",
                                     "--no-riemannian", "--adjust_c", "train_exp_map_teacher"])
    assert hyp.hidden_distil_type == "hyperbolic" and hyp.c == 2.5 and not hyp.riemannian
    assert hyp.adjust_c == "train_exp_map_teacher" and hyp.alpha_contrastive == 0.1 and hyp.use_bias


def test_hidden_bad_flags(tmp_path, pipeline_out, teacher_dir, capsys):
    dump = tmp_path / "dump"
    base = train_argv(pipeline_out, dump, "--max_steps", "1", *FAST)
    teacher = ["--teacher_name", str(teacher_dir), "--alpha_ce", "0", "--alpha_mlm", "1"]
    cases = [
        ([*base, "--alpha_mlm", "1", "--alpha_mse", "0.1"], "need a teacher"),
        ([*base, *teacher, "--alpha_mse", "1", "hyperbolic"], "set --alpha_contrastive"),
        ([*base, *teacher, "--alpha_mse", "1", "--projection_strategy", "select_by_ids"], "--t_s_layers_ids"),
        ([*base, *teacher, "--alpha_mse", "1", "--projection_strategy", "select_by_ids", "--t_s_layers_ids",
          '{"teacher": 9, "student": 1}'], "out of range"),
        ([*base, *teacher, "--alpha_mse", "1", "--align_hiddens", "reduce"], "--t2s_mapping"),
        ([*base, *teacher, "--alpha_cos", "1", "--project_to", "intermediate"], "--intermediate_dim"),
        ([*base, *teacher, "--alpha_contrastive", "1", "--use_mismatched_ids", "--align_hiddens", "reduce",
          "--t2s_mapping", str(pipeline_out / "teacher2student.json")], "--use_mismatched_ids"),
        ([*base, *teacher, "--alpha_contrastive", "1", "--n_negative_samples", "0"], "--n_negative_samples"),
    ]
    for argv, needle in cases:
        assert run_train(argv) == 2, needle
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert needle in err, err
        assert not dump.exists()


def test_delta_cli_and_library_agree(tmp_path, pipeline_out, teacher_dir, capsys):
    import delta
    from hyptorch.delta import POINCARE_DELTA_REL
    from kdcore.model_io import load_teacher
    from kdcore.shard_io import open_shards
    from lm_seqs_dataset import Collator, LmSeqsDataset

    data = pipeline_out / "processed_binarized"
    out = tmp_path / "c.json"
    argv = ["--model", str(teacher_dir), "--binarized_data_folder", str(data), "--side", "teacher", "--n_samples",
            "80", "--n_components", "10", "--n_tries", "2", "--seed", "3", "--device", "cpu", "--out", str(out)]
    assert delta.main(argv) == 0
    result = json.loads(out.read_text())
    assert result == json.loads(capsys.readouterr().out)
    assert result["n_vectors"] == 80 and result["n_components"] == 10 and len(result["delta_rel"]) == 2
    per_try = [(POINCARE_DELTA_REL / d) ** 2 for d in result["delta_rel"]]
    assert result["c_per_try"] == pytest.approx(per_try)
    assert result["c"] == pytest.approx(sum(per_try) / 2)
    valid = LmSeqsDataset(open_shards(data), 0.1, "valid")
    c, _ = delta.model_curvature(load_teacher(teacher_dir), valid, Collator(0, 0), "teacher", 80, 10, 2, seed=3)
    assert c == pytest.approx(result["c"], rel=1e-9)
    # the student side reads the student tokens; a teacher on the student side is refused
    student = ["--model", str(pipeline_out / "student_init"), "--side", "student", *argv[2:4], *argv[6:-2]]
    assert delta.main(student) == 0
    from kdcore.errors import UserError

    with pytest.raises(UserError, match="vocabulary"):
        delta.main([*argv[:5], "student", *argv[6:]])


def test_validation_with_contrastive_negatives_is_deterministic(tmp_path, pipeline_out, teacher_dir, monkeypatch):
    """Validation draws its contrastive negatives from its own seeded generator: the same value in every pass,
    whatever the training RNG did before, and the training RNG is left where it was."""
    import distiller

    seen: list[tuple[float, float, bool]] = []
    original = distiller.Distiller.train

    def train_twice(self):
        first = self.validate()
        torch.rand(1000)  # the training RNG moves on
        state = torch.get_rng_state()
        second = self.validate()
        seen.append((first, second, torch.equal(state, torch.get_rng_state())))
        return original(self)

    monkeypatch.setattr(distiller.Distiller, "train", train_twice)
    argv = train_argv(pipeline_out, tmp_path / "dump", "--max_steps", "1", *FAST,
                      *kd_flags(pipeline_out, teacher_dir, "match"), "--alpha_contrastive", "1",
                      "--n_negative_samples", "2")
    assert run_train(argv) == 0
    (first, second, untouched), = seen
    assert first == second and untouched
