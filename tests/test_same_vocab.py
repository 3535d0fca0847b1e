"""Same-vocabulary distillation: the pipeline with --student_tokenizer, layer selection, plain KL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kdcore.shard_io import open_shards
from test_train import run_train, train_argv


def test_pipeline_with_the_teachers_tokenizer_gives_identity_artifacts(same_vocab_out, teacher_dir):
    from kdcore.tokenizer_utils import UNMAPPED_PATTERN, load_tokenizer, vocab_list

    out = same_vocab_out
    vocab = vocab_list(load_tokenizer(teacher_dir))
    assert vocab_list(load_tokenizer(out / "student")) == vocab
    t2s = np.load(out / "t2s_padded.npy", allow_pickle=False)
    used = np.array([not UNMAPPED_PATTERN.match(tok) for tok in vocab])
    assert np.array_equal(t2s[used, 0], np.arange(len(vocab))[used])
    assert (t2s[used, 1:] == len(vocab)).all()
    mapped = np.load(out / "t2s_mapped_ids.npy", allow_pickle=False)
    specials = set(load_tokenizer(teacher_dir).all_special_ids)
    assert set(mapped.tolist()) == set(np.flatnonzero(used).tolist()) - specials
    for shard in open_shards(out / "processed_binarized"):
        assert np.array_equal(shard.ids["teacher"], shard.ids["student"])
        assert shard.match["teacher"].all() and shard.match["student"].all()
    matched = json.loads((out / "matched_vocab.json").read_text())
    assert matched == {tok: [i, i] for i, tok in enumerate(vocab) if tok != "[PAD]"}
    stats = json.loads((out / "manifest.json").read_text())["steps"]["init_weights"]["stats"]
    assert stats["layer_groups"] == [[0], [3]]


def test_select_copies_the_chosen_layers(same_vocab_out, teacher_dir):
    teacher = load_file(str(teacher_dir / "model.safetensors"))
    student = load_file(str(same_vocab_out / "student_init" / "model.safetensors"))
    for k, t_layer in enumerate((0, 3)):
        t_w = teacher[f"bert.encoder.layer.{t_layer}.attention.self.query.weight"]
        s_w = student[f"distilbert.transformer.layer.{k}.attention.q_lin.weight"]
        assert torch.equal(s_w, t_w[: s_w.shape[0], : s_w.shape[1]])
    word = teacher["bert.embeddings.word_embeddings.weight"]
    s_word = student["distilbert.embeddings.word_embeddings.weight"]
    assert torch.equal(s_word, word[:, : s_word.shape[1]])


def test_select_rejects_bad_layers(tmp_path, teacher_dir, same_vocab_out, capsys):
    from init_weights import main
    from kdcore.errors import run_cli

    argv = ["--teacher_name", str(teacher_dir), "--student_name", str(same_vocab_out / "student"), "--out",
            str(tmp_path / "init"), "--init_strategy", "select", "--layers"]
    assert run_cli(main, [*argv, "0,9"]) == 2
    assert "distinct teacher layers" in capsys.readouterr().err
    assert not (tmp_path / "init").exists()


def shared_flags(out, teacher, *extra: str) -> list[str]:
    return ["--teacher_name", str(teacher), "--alpha_ce", "5.0", "--alpha_mlm", "2.0", "--temperature", "2", *extra]


@pytest.mark.parametrize("restrict", [False, True])
def test_shared_vocabulary_training(tmp_path, same_vocab_out, teacher_dir, restrict):
    dump = tmp_path / "dump"
    extra = ["--restrict_ce_to_mask"] if restrict else []
    argv = train_argv(same_vocab_out, dump, "--max_steps", "3", "--freeze_pos_embs",
                      *shared_flags(same_vocab_out, teacher_dir, *extra))
    assert run_train(argv) == 0
    params = json.loads((dump / "parameters.json").read_text())
    assert params["shared_vocab"] is True
    assert "KL: shared" in (dump / "train.log").read_text()
    init = load_file(str(same_vocab_out / "student_init" / "model.safetensors"))
    trained = load_file(str(dump / "model.safetensors"))
    pos = "distilbert.embeddings.position_embeddings.weight"
    assert torch.equal(init[pos], trained[pos])
    assert not torch.equal(init["distilbert.transformer.layer.0.ffn.lin1.weight"],
                           trained["distilbert.transformer.layer.0.ffn.lin1.weight"])


def test_shared_step_equals_dense_reference(same_vocab_out, teacher_dir):
    """KL over every non-pad position (or the MLM targets) and MLM, against full-logit computations."""
    from custom_step import IGNORE_INDEX
    from kdcore.alignments import AlignmentConfig, Shared, Vocabularies
    from kdcore.model_io import load_student, load_teacher
    from kdcore.step_runner import StudentRunner, combine_losses, teacher_forward

    torch.manual_seed(0)
    student = load_student(same_vocab_out / "student", same_vocab_out / "student_init").eval()
    teacher = load_teacher(teacher_dir).eval()
    ids = torch.randint(5, 200, (3, 7))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 5:] = False
    ids[~mask] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 1], labels[2, 3], labels[1, 0] = 11, 12, 13
    batch = {"s_ids": ids, "s_mask": mask, "t_ids": ids, "t_mask": mask}
    for restrict in (False, True):
        plan = Shared.build(AlignmentConfig(restrict_ce_to_mask=restrict), 2.0, Vocabularies(0, 0, {}))
        runner = StudentRunner(student, mlm=True, kl=plan)
        out = runner(batch, ids, labels)
        t_logits, _ = teacher_forward(teacher, batch, plan, ids, labels, reads_student_ids=True)
        total, losses = combine_losses(out, t_logits, plan, {"ce": 5.0, "mlm": 2.0})
        with torch.no_grad():
            s_full = student(input_ids=ids, attention_mask=mask.long()).logits
            t_full = teacher(input_ids=ids, attention_mask=mask.long()).logits
        rows = labels != IGNORE_INDEX if restrict else mask
        kl = F.kl_div(F.log_softmax(s_full[rows] / 2, -1), F.log_softmax(t_full[rows] / 2, -1), log_target=True,
                      reduction="batchmean") * 4
        mlm = F.cross_entropy(s_full.view(-1, s_full.shape[-1]), labels.view(-1), ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(losses["loss_ce"], kl, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(losses["loss_mlm"], mlm, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(total, 5 * kl + 2 * mlm, rtol=1e-4, atol=1e-5)


def test_shared_vocabulary_bad_flags(tmp_path, same_vocab_out, pipeline_out, teacher_dir, capsys):
    dump = tmp_path / "dump"
    argv = train_argv(same_vocab_out, dump, "--max_steps", "1", "--freeze_token_type_embds",
                      *shared_flags(same_vocab_out, teacher_dir))
    assert run_train(argv) == 2
    assert "token_type_embeddings" in capsys.readouterr().err
    argv = train_argv(pipeline_out, dump, "--max_steps", "1", "--restrict_ce_to_mask", "--matching_ids",
                      str(pipeline_out / "matched_vocab.json"), *shared_flags(pipeline_out, teacher_dir))
    assert run_train(argv) == 2
    assert "--restrict_ce_to_mask needs" in capsys.readouterr().err
    assert not dump.exists()


def test_init_weights_fine_tuning_mode(tmp_path, same_vocab_out, teacher_dir):
    """A fine-tuned BertForSequenceClassification teacher gives a DistilBERT classifier student."""
    import shutil

    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    from init_weights import InitParams, run

    fine_tuned = tmp_path / "fine_tuned"
    shutil.copytree(teacher_dir, fine_tuned)
    (fine_tuned / "model.safetensors").unlink()
    torch.manual_seed(1)
    teacher = BertForSequenceClassification.from_pretrained(str(teacher_dir), num_labels=3)
    teacher.save_pretrained(str(fine_tuned))
    stats = run(InitParams(str(fine_tuned), str(same_vocab_out / "student"), str(tmp_path / "init"),
                           strategy="select"))
    assert stats["mode"] == "fine-tuning"
    student = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "init"))
    assert student.config.num_labels == 3 and type(student).__name__ == "DistilBertForSequenceClassification"
    t = teacher.state_dict()
    d = student.config.dim
    assert torch.equal(student.pre_classifier.weight, t["bert.pooler.dense.weight"][:d, :d])
    assert torch.equal(student.classifier.weight, t["classifier.weight"][:, :d])
    assert torch.equal(student.distilbert.embeddings.word_embeddings.weight, t["bert.embeddings.word_embeddings.weight"][:, :d])
