"""The MinED column map (`--column_map mined`): pipeline step 12 against a brute-force edit distance, the KL against
an independent computation, training, resume, torchrun, export and the teacher cache's columns fingerprint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from test_train import final_weights, run_train, two_process_run

SPECIAL = {"unk": "[UNK]", "pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}


def levenshtein(a: str, b: str) -> int:
    """Unit-cost edit distance by the textbook dynamic programme."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def brute_force(t_vocab: list[str], s_vocab: list[str]) -> list[tuple[int, int]]:
    """(student id, distance) of every teacher token under step 12's rule, pair by pair."""
    specials = set(SPECIAL.values())
    cont = lambda tok: tok.startswith("##") and len(tok) > 2  # noqa: E731
    body = lambda tok: tok[2:] if cont(tok) else tok  # noqa: E731
    out = []
    for tok in t_vocab:
        if tok in specials:
            out.append((s_vocab.index(tok), 0))
            continue
        pool = [u for u, s in enumerate(s_vocab) if s not in specials and cont(s) == cont(tok)]
        pool = pool or [u for u, s in enumerate(s_vocab) if s not in specials]
        out.append(min((levenshtein(body(tok), body(s_vocab[u])), u) for u in pool)[::-1])
    return out


def test_map_equals_brute_force_and_ties_go_to_the_smallest_id():
    from mined_vocab import mined_map

    s_vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "ax", "ay", "##ab", "##b", "кот", "##ов", "abc", "[X]"]
    t_vocab = ["[MASK]", "[PAD]", "ab", "##ab", "##abc", "abc", "котов", "##ов", "##", "[X]", "##z", "[CLS]", "[UNK]",
               "[SEP]", "q" * 40, "ав"]
    ids, dist = mined_map(t_vocab, s_vocab, SPECIAL, SPECIAL, chunk_rows=2)
    assert list(zip(ids.tolist(), dist.tolist())) == brute_force(t_vocab, s_vocab)
    assert (ids[2], dist[2]) == (5, 1)  # "ab": "ax" (5) and "ay" (6) at distance 1, and "abc" (11): the smallest id
    assert (ids[3], ids[6], ids[0]) == (7, 9, 4)  # ##ab -> ##ab, котов -> кот (word-initial only), [MASK] -> [MASK]
    only_initial = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "zz", "b"]
    ids, _ = mined_map(["##b", "b"], only_initial, {}, {})
    assert ids.tolist() == [6, 6]  # no student continuation pieces: compared by the body with the word-initial ones


def test_step_12_equals_brute_force_and_is_skipped_when_up_to_date(tmp_path, pipeline_out, teacher_dir, corpus,
                                                                     student_config):
    from common import load_pair
    from run_pipeline import build_parser, run

    pair = load_pair(str(teacher_dir), str(pipeline_out / "student"))
    data = json.loads((pipeline_out / "mined_vocab.json").read_text(encoding="utf-8"))
    assert list(zip(data["student_ids"], data["distances"])) == brute_force(pair.t_vocab, pair.s_vocab)
    assert data["fingerprints"] == pair.fingerprints
    out = tmp_path / "out"
    shutil.copytree(pipeline_out, out)
    argv = ["--teacher_name", str(teacher_dir), "--corpus", str(corpus), "--student_vocab_size", "150",
            "--student_config", str(student_config), "--out_dir", str(out), "--max_len", "24", "--n_shards", "2",
            "--cut_len", "8", "--num_workers", "1"]
    before = (out / "mined_vocab.json").read_bytes()
    (out / "mined_vocab.json").unlink()
    lines: list[str] = []
    run(build_parser().parse_args(argv), log=lines.append)
    redone = [line for line in lines if "up to date" not in line]
    assert len(redone) == 1 and redone[0].startswith("[12/12] step 12 mined_vocab: ")
    assert (out / "mined_vocab.json").read_bytes() == before
    lines.clear()
    run(build_parser().parse_args(argv), log=lines.append)
    assert len(lines) == 11 and all("up to date" in line for line in lines)


def test_projected_kl_equals_an_independent_computation(pipeline_out, teacher_dir):
    """match + mined on a real batch: the trainer's KL (teacher_forward, StudentRunner, combine_losses) against one
    computed from the two models' full logits and mined_vocab.json, in float64."""
    from transformers import AutoModelForMaskedLM

    from custom_step import IGNORE_INDEX
    from kdcore.alignments import AlignmentConfig, Vocabularies, build_alignments
    from kdcore.shard_io import open_shards
    from kdcore.step_runner import StudentRunner, combine_losses, teacher_forward
    from lm_seqs_dataset import Collator, LmSeqsDataset

    data = json.loads((pipeline_out / "mined_vocab.json").read_text(encoding="utf-8"))
    cfg = AlignmentConfig(logits="match", column_map="mined", mined_vocab=str(pipeline_out / "mined_vocab.json"))
    plan = build_alignments(cfg, 2.0, kl=True, hidden=False, shared_vocab=False,
                            vocab=Vocabularies(data["teacher_vocab_size"], data["student_vocab_size"],
                                               data["fingerprints"]))
    teacher = AutoModelForMaskedLM.from_pretrained(str(teacher_dir)).eval()
    student = AutoModelForMaskedLM.from_pretrained(str(pipeline_out / "student_init")).eval()
    dataset = LmSeqsDataset(open_shards(pipeline_out / "processed_binarized"), 0.0, "train")
    batch = Collator(0, 0)(dataset.gather(range(6)))
    labels = torch.full_like(batch["s_ids"], IGNORE_INDEX)
    with torch.no_grad():
        t_logits, _ = teacher_forward(teacher, batch, plan.kl)
        out = StudentRunner(student, mlm=False, kl=plan.kl)(batch, batch["s_ids"], labels)
        _, losses = combine_losses(out, t_logits, plan.kl, {"ce": 1.0})
        t_full = teacher(input_ids=batch["t_ids"], attention_mask=batch["t_mask"]).logits[batch["t_match"]].double()
        s_full = student(input_ids=batch["s_ids"], attention_mask=batch["s_mask"]).logits[batch["s_match"]].double()
    regular = [v for v in range(data["teacher_vocab_size"]) if v not in data["special_teacher_ids"]]
    image = sorted({data["student_ids"][v] for v in regular})
    p_t = torch.softmax(t_full[:, regular] / 2.0, -1)
    projected = torch.zeros(len(t_full), data["student_vocab_size"], dtype=torch.float64)
    for k, v in enumerate(regular):
        projected[:, data["student_ids"][v]] += p_t[:, k]
    p, log_q = projected[:, image], torch.log_softmax(s_full[:, image] / 2.0, -1)
    want = 4.0 * (p * (p.log() - log_q)).sum(-1).mean()
    assert len(t_full) > 20 and p.shape[1] == plan.kl.student_columns.numel() < data["student_vocab_size"]
    torch.testing.assert_close(losses["loss_ce"].double(), want, rtol=1e-5, atol=1e-6)


def mined_argv(pipeline_out: Path, teacher: Path, dump: Path, align: str, *extra: str) -> list[str]:
    return ["--pipeline_dir", str(pipeline_out), "--teacher_name", str(teacher), "--align_logits", align,
            "--column_map", "mined", "--dump_path", str(dump), "--device", "cpu", "--batch_size", "8",
            "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--warmup_prop", "0", "--log_interval",
            "2", "--checkpoint_interval", "2", "--valid_prop", "0.1", "--n_epoch", "1", *extra]


@pytest.mark.parametrize("align", ["match", "reduce"])
def test_mined_trains_resumes_exactly_and_exports_a_plain_student(tmp_path, pipeline_out, teacher_dir, align):
    from transformers import AutoModelForMaskedLM

    full, part = tmp_path / "full", tmp_path / "part"
    assert run_train(mined_argv(pipeline_out, teacher_dir, full, align, "--max_steps", "4")) == 0
    assert run_train(mined_argv(pipeline_out, teacher_dir, part, align, "--max_steps", "2")) == 0
    assert run_train(mined_argv(pipeline_out, teacher_dir, part, align, "--max_steps", "4", "--resume", "auto")) == 0
    a, b = final_weights(full), final_weights(part)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    log = (full / "train.log").read_text(encoding="utf-8")
    assert "student columns (--column_map mined)" in log
    summary = json.loads((full / "train_summary.json").read_text())
    assert summary["global_step"] == 4 and all(torch.isfinite(torch.tensor(h["valid_loss"]))
                                               for h in summary["history"])
    model = AutoModelForMaskedLM.from_pretrained(str(full))
    assert model.config.vocab_size == 150 and type(model).__name__ == "DistilBertForMaskedLM"


def test_torchrun_two_cpu_processes_agree_with_mined_columns(tmp_path, pipeline_out, teacher_dir):
    two_process_run(mined_argv(pipeline_out, teacher_dir, tmp_path / "ddp", "reduce", "--max_steps", "3"), steps=3)


def test_caches_are_refused_across_column_maps(tmp_path, pipeline_out, teacher_dir, capsys):
    from cache_teacher import CacheParams, build

    for column_map in ("exact", "mined"):
        build(CacheParams(pipeline_dir=str(pipeline_out), teacher_name=str(teacher_dir), align_logits="match",
                          out=str(tmp_path / column_map), encoding="sample", k=4, device="cpu",
                          column_map=column_map), log=lambda *_: None)
    exact_argv = mined_argv(pipeline_out, teacher_dir, tmp_path / "d", "match", "--max_steps", "2")
    exact_argv.remove("mined")
    exact_argv.remove("--column_map")
    cases = [(mined_argv(pipeline_out, teacher_dir, tmp_path / "d", "match", "--max_steps", "2",
                         "--teacher_cache", str(tmp_path / "exact")), "was built for columns another one"),
             ([*exact_argv, "--teacher_cache", str(tmp_path / "mined")], "was built for columns another one")]
    for argv, needle in cases:
        assert run_train(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err
    header = json.loads((tmp_path / "mined" / "cache.json").read_text())
    mined = json.loads((pipeline_out / "mined_vocab.json").read_text())
    regular = [s for v, s in enumerate(mined["student_ids"]) if v not in mined["special_teacher_ids"]]
    assert header["alignment"]["n_columns"] == len(set(regular))  # rows over the projected (student) columns


def test_bad_column_map_uses_are_one_line_errors(tmp_path, pipeline_out, teacher_dir, capsys):
    lacking = tmp_path / "lacking"
    shutil.copytree(pipeline_out, lacking)
    manifest = json.loads((lacking / "manifest.json").read_text())
    del manifest["steps"]["mined_vocab"]
    (lacking / "manifest.json").write_text(json.dumps(manifest))
    dump = tmp_path / "d"
    cases = [
        (mined_argv(pipeline_out, teacher_dir, dump, "reduce_map"), "--column_map mined only applies to the KL of "
         "--align_logits match / reduce"),
        ([*mined_argv(pipeline_out, teacher_dir, dump, "match"), "--matching_ids",
          str(pipeline_out / "matched_vocab.json")], "--matching_ids is not read by --align_logits match --column_map "
         "mined"),
        (mined_argv(lacking, teacher_dir, dump, "match"), "lacks mined_vocab.json (--mined_vocab); it is made by "
         "pipeline step 12 (mined_vocab.py)"),
        (["--pipeline_dir", str(pipeline_out), "--dump_path", str(dump), "--alpha_mlm", "1", "--column_map", "mined"],
         "not to a run without KL"),
    ]
    for argv, needle in cases:
        assert run_train(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err
    assert not dump.exists()
