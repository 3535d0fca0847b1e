"""The `dskd` alignment (`kdcore/dual_space.py`): the cross-model attention and the alignment of both sequences
against direct per-position computations, where each term's gradient goes, and `train.py --align_logits dskd` end
to end (checkpointed projections kept out of the export, torchrun, exact resume, refused teacher cache)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

from alignment_checks import (
    check_cache_teacher_refuses,
    check_one_line_error,
    check_resume_is_exact,
    check_torchrun_agrees,
)
from kdcore.dual_space import EXTRA_TERMS, DualSpace, cross_model_attention, token_pairs
from test_train import final_weights, kd_flags, run_train


def direct_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, key_mask: np.ndarray) -> np.ndarray:
    """Per sequence and per query: weights exp(q.k / sqrt(D)) over the real keys only, normalised; sum of w v."""
    out = np.zeros((q.shape[0], q.shape[1], v.shape[2]))
    for b in range(q.shape[0]):
        real = np.flatnonzero(key_mask[b])
        for i in range(q.shape[1]):
            scores = np.array([q[b, i] @ k[b, j] / np.sqrt(q.shape[2]) for j in real])
            w = np.exp(scores - scores.max())
            out[b, i] = (w / w.sum()) @ v[b, real]
    return out


def test_cross_model_attention_equals_a_direct_computation():
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(2, 4, 6)), rng.normal(size=(2, 5, 6)), rng.normal(size=(2, 5, 3))
    key_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)
    got = cross_model_attention(*(torch.from_numpy(x) for x in (q, k, v, key_mask)))
    np.testing.assert_allclose(got.numpy(), direct_attention(q, k, v, key_mask), rtol=1e-5, atol=1e-6)
    # padding keys take no weight whatever their values
    v_noisy = v.copy()
    v_noisy[0, 3:] = 1e6
    again = cross_model_attention(*(torch.from_numpy(x) for x in (q, k, v_noisy, key_mask)))
    torch.testing.assert_close(again, got)


def test_token_pairs_by_hand():
    emb = torch.tensor([[[1.0], [2.0], [3.0], [9.0]], [[4.0], [5.0], [6.0], [7.0]]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    pairs = token_pairs(emb, mask)
    assert pairs[..., 0].tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]]
    assert pairs[..., 1].tolist() == [[2, 3, 0, 0], [5, 6, 7, 0]]


def tiny_models(seed: int = 0):
    torch.manual_seed(seed)
    teacher = BertForMaskedLM(BertConfig(vocab_size=23, hidden_size=12, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=16, max_position_embeddings=16)).eval()
    student = DistilBertForMaskedLM(DistilBertConfig(vocab_size=11, dim=8, n_layers=1, n_heads=2, hidden_dim=16,
                                                     max_position_embeddings=16))
    teacher.requires_grad_(False)
    return teacher, student


def tiny_batch():
    s_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    t_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    return {"s_ids": torch.randint(0, 11, (2, 5), generator=g) * s_mask,
            "t_ids": torch.randint(0, 23, (2, 6), generator=g) * t_mask, "s_mask": s_mask, "t_mask": t_mask}


def test_align_equals_a_direct_computation():
    teacher, _ = tiny_models()
    module = DualSpace(teacher, 8, 12)
    batch = tiny_batch()
    torch.manual_seed(3)
    s_hidden, t_hidden = torch.randn(2, 5, 8), torch.randn(2, 6, 12)
    s_emb, t_emb = torch.randn(2, 5, 8), torch.randn(2, 6, 12)
    t2s, s2t = module.align(s_hidden, t_hidden, s_emb, t_emb, batch["s_mask"], batch["t_mask"])
    with torch.no_grad():
        for b in range(2):
            s_real, t_real = int(batch["s_mask"][b].sum()), int(batch["t_mask"][b].sum())
            q = np.stack([module.query(torch.cat([s_emb[b, i], s_emb[b, i + 1] if i + 1 < s_real
                                                  else torch.zeros(8)])).numpy() for i in range(5)])
            k = []
            for j in range(6):
                pair = torch.cat([t_emb[b, j], t_emb[b, j + 1] if j + 1 < t_real else torch.zeros(12)])
                if j >= t_real:
                    pair = torch.zeros(24)
                k.append(((pair - pair.mean()) / torch.sqrt(pair.var(unbiased=False) + 1e-5)).numpy())
            k = np.stack(k)
            v_t = module.t2s(t_hidden[b]).numpy()
            v_s = module.s2t(s_hidden[b]).numpy()
            want_t2s = direct_attention(q[None], k[None], v_t[None], batch["t_mask"][b:b + 1].numpy())[0]
            want_s2t = direct_attention(k[None], q[None], v_s[None], batch["s_mask"][b:b + 1].numpy())[0]
            np.testing.assert_allclose(t2s[b, :s_real].numpy(), want_t2s[:s_real], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(s2t[b, :t_real].numpy(), want_s2t[:t_real], rtol=1e-4, atol=1e-5)


def grads_of(term: str, student, module, teacher, batch) -> dict[str, bool]:
    """Which parameter groups get a non-zero gradient from one term alone."""
    for p in [*student.parameters(), *module.parameters()]:
        p.grad = None
    s_hidden = student.distilbert(input_ids=batch["s_ids"], attention_mask=batch["s_mask"]).last_hidden_state
    with torch.no_grad():
        t_out = teacher.bert(input_ids=batch["t_ids"], attention_mask=batch["t_mask"])
        t_logits = teacher.cls(t_out.last_hidden_state[batch["t_mask"]])
    out = module(student, s_hidden, t_out.last_hidden_state, batch, 2.0)
    if term == "loss_ce":
        from custom_step import kl_div_loss

        kl_div_loss(t_logits, out["kl_student"], 2.0).backward()
    else:
        out[term].backward()

    def nonzero(params):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    head = [*student.vocab_transform.parameters(), *student.vocab_layer_norm.parameters(),
            student.vocab_projector.bias]
    return {"student_head": nonzero(head), "student_body": nonzero(student.distilbert.transformer.parameters()),
            "query": nonzero(module.query.parameters()), "t2s": nonzero(module.t2s.parameters()),
            "s2t": nonzero(module.s2t.parameters()),
            "teacher": any(p.grad is not None for p in teacher.parameters())}


def test_each_term_trains_what_it_should():
    teacher, student = tiny_models()
    module = DualSpace(teacher, 8, 12)
    batch = tiny_batch()
    assert set(module(student, torch.randn(2, 5, 8), torch.randn(2, 6, 12), batch, 2.0)) == {"kl_student",
                                                                                            *EXTRA_TERMS}
    # the projected teacher's cross-entropy trains the attention and the teacher->student projection only
    assert grads_of("loss_projector_ce", student, module, teacher, batch) == {
        "student_head": False, "student_body": False, "query": True, "t2s": True, "s2t": False, "teacher": False}
    # the student-space KL trains the student only (the projected teacher is its fixed target)
    assert grads_of("loss_kl_student_space", student, module, teacher, batch) == {
        "student_head": True, "student_body": True, "query": False, "t2s": False, "s2t": False, "teacher": False}
    # the teacher-space KL reaches the student through the student->teacher projection and the attention
    assert grads_of("loss_ce", student, module, teacher, batch) == {
        "student_head": False, "student_body": True, "query": True, "t2s": False, "s2t": True, "teacher": False}


def test_train_py_trains_dskd_checkpoints_projections_and_exports_a_plain_student(tmp_path, pipeline_out,
                                                                                  teacher_dir):
    from transformers import AutoModelForMaskedLM

    dump = tmp_path / "dump"
    argv = ["--pipeline_dir", str(pipeline_out), "--teacher_name", str(teacher_dir), "--align_logits", "dskd",
            "--dump_path", str(dump), "--device", "cpu", "--max_steps", "2", "--batch_size", "8",
            "--gradient_accumulation_steps", "1", "--valid_prop", "0.05", "--n_epoch", "1", "--log_interval", "1",
            "--aligner_lr_scale", "10", "--warmup_prop", "0"]
    assert run_train(argv) == 0
    params = json.loads((dump / "parameters.json").read_text())
    assert not any(value for flag, value in params["alignment"].items() if flag in (
        "matching_ids", "t2s_mapping", "t2s_vocab_padded", "t2s_mapped_ids", "mined_vocab"))
    summary = json.loads((dump / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and all(np.isfinite(h["valid_loss"]) for h in summary["history"])
    log = (dump / "train.log").read_text()
    assert "KL: dskd (dual-space KD" in log
    assert all(f"{term}=" in log for term in ("loss_ce", *EXTRA_TERMS))
    checkpoint = load_file(str(dump / "checkpoints" / "2" / "model.safetensors"))
    assert {"aligner.query.weight", "aligner.t2s.weight", "aligner.s2t.weight"} <= set(checkpoint)
    assert not any(key.startswith("teacher") or ".bert." in key for key in checkpoint)
    # the projections learn at 10x the student's rate (their own optimizer groups, kept by the schedule)
    groups = torch.load(dump / "checkpoints" / "2" / "optimizer.pt", weights_only=True)["param_groups"]
    rates = {g["lr_scale"]: g["lr"] for g in groups}
    assert set(rates) == {1.0, 10.0} and rates[10.0] == pytest.approx(10 * rates[1.0])
    assert sum(len(g["params"]) for g in groups if g["lr_scale"] == 10.0) == 6  # 3 linear maps, weight + bias
    exported = final_weights(dump)
    assert not any("aligner" in key for key in exported)
    model = AutoModelForMaskedLM.from_pretrained(str(dump))
    assert model.config.vocab_size == json.loads((pipeline_out / "student" / "config.json").read_text())["vocab_size"]


@pytest.mark.parametrize("precision,stored", [("fp32", False), ("bf16", True)])
def test_a_bf16_teacher_keeps_fp32_linears_unless_the_student_runs_in_bf16_too(tmp_path, pipeline_out, teacher_dir,
                                                                              precision, stored):
    """The aligner runs the teacher's head under the student's autocast, so the teacher's Linears are stored in
    bf16 only when that autocast is bf16 too."""
    dump = tmp_path / "dump"
    argv = ["--pipeline_dir", str(pipeline_out), "--teacher_name", str(teacher_dir), "--align_logits", "dskd",
            "--dump_path", str(dump), "--device", "cpu", "--max_steps", "2", "--batch_size", "8",
            "--gradient_accumulation_steps", "1", "--valid_prop", "0.05", "--n_epoch", "1", "--log_interval", "1",
            "--precision", precision, "--teacher_precision", "bf16"]
    assert run_train(argv) == 0
    summary = json.loads((dump / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and all(np.isfinite(h["valid_loss"]) for h in summary["history"])
    assert ("Linear weights and biases stored in bf16" in (dump / "train.log").read_text()) == stored


def test_resume_equals_uninterrupted(tmp_path, pipeline_out, teacher_dir):
    full, part = check_resume_is_exact(pipeline_out, tmp_path, kd_flags(pipeline_out, teacher_dir, "dskd"))
    ca = load_file(str(full / "checkpoints" / "3" / "model.safetensors"))
    cb = load_file(str(part / "checkpoints" / "3" / "model.safetensors"))
    aligner = [key for key in ca if key.startswith("aligner.")]
    assert aligner
    for key in aligner:
        torch.testing.assert_close(ca[key], cb[key], rtol=0, atol=1e-6, msg=key)


def test_torchrun_two_cpu_processes_agree(tmp_path, pipeline_out, teacher_dir):
    check_torchrun_agrees(pipeline_out, tmp_path / "ddp", kd_flags(pipeline_out, teacher_dir, "dskd"))


@pytest.mark.parametrize(("extra", "needle"), [
    (["--align_logits", "dskd", "--matching_ids", "{out}/matched_vocab.json"],
     "--matching_ids is not read by --align_logits dskd"),
    (["--align_logits", "dskd", "--teacher_cache", "{out}/teacher_cache"],
     "--teacher_cache cannot serve --align_logits dskd"),
    (["--align_logits", "uld", "--aligner_lr_scale", "3"],
     "--aligner_lr_scale only applies to alignments with trainable parts (--align_logits dskd"),
    (["--align_logits", "dskd", "--aligner_lr_scale", "0"], "--aligner_lr_scale 0.0 must be positive"),
])
def test_bad_flags_are_one_line_errors(tmp_path, pipeline_out, teacher_dir, capsys, extra, needle):
    check_one_line_error(pipeline_out, tmp_path / "dump", teacher_dir, extra, needle, capsys)


def test_cache_teacher_refuses_dskd(capsys):
    check_cache_teacher_refuses("dskd", capsys)
