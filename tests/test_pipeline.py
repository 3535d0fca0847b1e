"""The whole preprocessing pipeline on a synthetic corpus: outputs, invariants, skipping, inspection."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from block_encoder import encode_batch as encode_block
from common import load_pair
from kdcore.shard_io import open_shards, read_index
from kdcore.tokenizer_utils import canonical_order, fingerprint, load_tokenizer, vocab_list

EXPECTED = ["student", "student_init", "processed_binarized", "teacher2student.json", "t2s_padded.npy",
            "t2s_mapped_ids.npy", "s2t_padded.npy", "s2t_idxs_padded.npy", "teacher_counts.npy",
            "student_counts.npy", "matched_vocab.json", "mined_vocab.json", "manifest.json"]


@pytest.fixture(scope="module")
def pair(pipeline_out, teacher_dir):
    return load_pair(str(teacher_dir), str(pipeline_out / "student"))


def test_outputs_exist_and_shards_are_balanced(pipeline_out, pair):
    for name in EXPECTED:
        assert (pipeline_out / name).exists(), name
    index = read_index(pipeline_out / "processed_binarized")
    sizes = [s["n_seqs"] for s in index["shards"]]
    assert len(sizes) == 2 and max(sizes) - min(sizes) <= 1
    assert index["fingerprints"] == pair.fingerprints
    manifest = json.loads((pipeline_out / "manifest.json").read_text())
    assert manifest["fingerprints"] == pair.fingerprints
    assert [manifest["steps"][n]["number"] for n in manifest["steps"]] == [*range(1, 11), 12]  # 11: --cache_teacher
    for shard in open_shards(pipeline_out / "processed_binarized"):
        for side in ("teacher", "student"):
            assert shard.lengths(side).max() <= 24
        assert shard.match is not None


def test_student_tokenizer_keeps_teacher_conventions(pair, pipeline_out):
    s_vocab = pair.s_vocab
    assert len(s_vocab) == 150
    assert s_vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    stats = json.loads((pipeline_out / "student" / "student_tokenizer_stats.json").read_text())
    singles = [t for t in s_vocab if len(t) == 1 and t not in "[]"]
    assert len(singles) == stats["alphabet_size"]
    assert all("##" + c in s_vocab for c in singles)
    spec = lambda tok: json.loads(tok.backend_tokenizer.to_str())  # noqa: E731
    for part in ("normalizer", "pre_tokenizer"):
        assert spec(pair.student)[part] == spec(pair.teacher)[part]
    config = json.loads((pipeline_out / "student" / "config.json").read_text())
    assert config["vocab_size"] == 150 and config["model_type"] == "distilbert"
    assert (pipeline_out / "student" / "vocab.txt").read_text(encoding="utf-8").splitlines() == s_vocab


def test_batch_encoding_equals_per_sentence_loop(pair, corpus):
    lines = corpus.read_text(encoding="utf-8").splitlines()[:200]
    flat, lengths = encode_block(pair.student.backend_tokenizer, lines)
    loop = [pair.student(line)["input_ids"] for line in lines]
    assert lengths.tolist() == [len(x) for x in loop]
    assert flat.tolist() == [i for x in loop for i in x]


def test_counts_equal_direct_count(pipeline_out, pair):
    counts = {"teacher": Counter(), "student": Counter()}
    for shard in open_shards(pipeline_out / "processed_binarized"):
        for side in counts:
            counts[side].update(shard.ids[side].tolist())
    for side, vocab in (("teacher", pair.t_vocab), ("student", pair.s_vocab)):
        saved = np.load(pipeline_out / f"{side}_counts.npy", allow_pickle=False)
        assert saved.shape == (len(vocab),)
        assert {i: int(c) for i, c in enumerate(saved) if c} == dict(counts[side])


def test_t2s_artifacts_agree(pipeline_out, pair):
    data = json.loads((pipeline_out / "teacher2student.json").read_text())
    padded = np.load(pipeline_out / "t2s_padded.npy")
    mapped = np.load(pipeline_out / "t2s_mapped_ids.npy")
    n_s = len(pair.s_vocab)
    for v, split in enumerate(data["splits"]):
        assert padded[v][padded[v] != n_s].tolist() == split
    special = set(pair.teacher.all_special_tokens)
    want = [v for v, s in enumerate(data["splits"])
            if s and pair.t_vocab[v] not in special and pair.s_unk_id not in s]
    assert mapped.tolist() == want
    matched = json.loads((pipeline_out / "matched_vocab.json").read_text())
    for token, (t_id, s_id) in matched.items():
        assert pair.t_vocab[t_id] == token == pair.s_vocab[s_id]
    assert len(matched) == len((set(pair.t_vocab) & set(pair.s_vocab)) - {"[PAD]"})


def test_student_init_is_built_from_teacher(pipeline_out, teacher_dir, pair):
    from transformers import AutoModelForMaskedLM

    teacher = AutoModelForMaskedLM.from_pretrained(str(teacher_dir))
    student = AutoModelForMaskedLM.from_pretrained(str(pipeline_out / "student_init"))
    ts, ss = teacher.state_dict(), student.state_dict()
    dim = student.config.dim
    splits = json.loads((pipeline_out / "teacher2student.json").read_text())["splits"]
    special = set(pair.teacher.all_special_tokens)
    t_emb = ts["bert.embeddings.word_embeddings.weight"]
    checked = 0
    for u in range(len(pair.s_vocab)):
        sources = [v for v, split in enumerate(splits) if u in split and
                   (pair.t_vocab[v] in special or pair.s_unk_id not in split)]
        if not sources:
            continue
        want = torch.stack([t_emb[v, :dim] for v in sources]).mean(0)
        torch.testing.assert_close(ss["distilbert.embeddings.word_embeddings.weight"][u], want)
        want_bias = torch.stack([ts["cls.predictions.bias"][v] for v in sources]).mean(0)
        torch.testing.assert_close(ss["vocab_projector.bias"][u], want_bias)
        checked += 1
    assert checked > 100
    # 4 teacher layers -> 2 student layers: groups (0, 1) and (2, 3)
    for k, group in enumerate([(0, 1), (2, 3)]):
        for t_name, s_name in (("attention.self.query.weight", "attention.q_lin.weight"),
                               ("intermediate.dense.bias", "ffn.lin1.bias"),
                               ("output.LayerNorm.weight", "output_layer_norm.weight")):
            mean = torch.stack([ts[f"bert.encoder.layer.{i}.{t_name}"] for i in group]).mean(0)
            got = ss[f"distilbert.transformer.layer.{k}.{s_name}"]
            torch.testing.assert_close(got, mean[tuple(slice(0, n) for n in got.shape)])
    pos = ts["bert.embeddings.position_embeddings.weight"] + ts["bert.embeddings.token_type_embeddings.weight"][0]
    torch.testing.assert_close(ss["distilbert.embeddings.position_embeddings.weight"], pos[:128, :dim])
    tok = load_tokenizer(pipeline_out / "student_init", "student")
    assert fingerprint(tok) == pair.fingerprints["student"]
    batch = tok(["Кот спит на столе."], return_tensors="pt")
    assert student(**batch).logits.shape == (1, batch["input_ids"].shape[1], len(pair.s_vocab))


def test_rerun_skips_and_force_redoes(pipeline_out, teacher_dir, corpus, student_config):
    from run_pipeline import build_parser, run

    argv = ["--teacher_name", str(teacher_dir), "--corpus", str(corpus), "--student_vocab_size", "150",
            "--student_config", str(student_config), "--out_dir", str(pipeline_out), "--max_len", "24",
            "--n_shards", "2", "--cut_len", "8", "--num_workers", "1"]
    lines: list[str] = []
    before = json.loads((pipeline_out / "manifest.json").read_text())
    run(build_parser().parse_args(argv), log=lines.append)
    assert len(lines) == 11 and all("up to date" in line for line in lines)
    lines.clear()
    run(build_parser().parse_args([*argv, "--cut_len", "5"]), log=lines.append)
    redone = [line.split()[3].rstrip(":") for line in lines if "up to date" not in line]
    assert redone == ["student2teacher"]
    assert np.load(pipeline_out / "s2t_padded.npy").shape[1] <= 5
    lines.clear()
    run(build_parser().parse_args([*argv, "--force"]), log=lines.append)
    assert not any("up to date" in line for line in lines)
    after = json.loads((pipeline_out / "manifest.json").read_text())
    # every step was redone, with the same result: a run id is a hash of the signature and the outputs
    assert {n: s["run_id"] for n, s in after["steps"].items()} == {n: s["run_id"] for n, s in before["steps"].items()}
    assert vocab_list(load_tokenizer(pipeline_out / "student")) == vocab_list(
        load_tokenizer(pipeline_out / "student_init"))


def test_inspect_shards_json(pipeline_out, capsys):
    from inspect_shards import main

    assert main([str(pipeline_out / "processed_binarized"), "--n", "3", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["teacher_tokens"][0] == "[CLS]" and row["student_tokens"][-1] == "[SEP]"
        assert len(row["teacher_match"]) == len(row["teacher_tokens"])
        t = [tok for tok, m in zip(row["teacher_tokens"], row["teacher_match"]) if m]
        s = [tok for tok, m in zip(row["student_tokens"], row["student_match"]) if m]
        assert t == s and len(t) >= 2


def test_canonical_order_does_not_depend_on_the_trainer_order():
    tokens = ["[PAD]", "[UNK]", "кот", "##а", "б", "##ы", "а", "рыба", "##ом", "1"]
    expected = ["[PAD]", "[UNK]", "1", "а", "б", "##а", "##ы", "##ом", "кот", "рыба"]
    rng = random.Random(0)
    for _ in range(5):
        rest = tokens[2:]
        rng.shuffle(rest)
        assert canonical_order(tokens[:2] + rest, 2) == expected


def test_trained_vocabularies_are_saved_in_canonical_order(tmp_path, corpus, pipeline_out):
    """The Rust trainer orders the alphabet and tied pieces by hash order; the saved ids follow a fixed
    order instead (the same vocabulary always gets the same ids)."""
    from train_teacher_tok import train_bert_tokenizer

    train_bert_tokenizer([str(corpus)], 400, str(tmp_path / "t"), n_unused=3, min_frequency=1)
    vocab = (tmp_path / "t" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab[:8] == ["[PAD]", "[unused0]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert vocab == canonical_order(vocab, 8)
    tok = load_tokenizer(tmp_path / "t")
    assert vocab_list(tok) == vocab and tok.mask_token_id == 7
    assert tok("кот [MASK]")["input_ids"][-2:] == [7, 6]
    student = (pipeline_out / "student" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    pieces = [t for t in student if len(t) > 1 and not (t.startswith("##") and len(t) == 3) and t[0] != "["]
    assert pieces == sorted(pieces) and len(pieces) > 20
