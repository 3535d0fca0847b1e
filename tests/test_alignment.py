"""Matching positions and chunking of over-long texts, checked against character offsets."""

from __future__ import annotations

import numpy as np
import pytest

from alignment import SideTables, match_masks, same_string_map
from block_encoder import encode_batch as encode_block
from common import load_pair
from kdcore.tokenizer_utils import surface
from prepare_lm_seqs import chunk_sequence

TEXTS = [
    "Кот кот кот, кот! Котами и котами.",
    "Рыба рыбой рыбами на берегу берега.",
    "Снеговик ☃ стоит в ☃☃ городе 2025 года?",
    "Компьютером компьютеру, политикой и образованием.",
    "а а а б б в",
]


@pytest.fixture(scope="module")
def pair(pipeline_out, teacher_dir):
    return load_pair(str(teacher_dir), str(pipeline_out / "student"))


def tables(pair):
    t_tab = SideTables.build(pair.t_vocab, set(pair.teacher.all_special_tokens), pair.t_special["unk"])
    s_tab = SideTables.build(pair.s_vocab, set(pair.student.all_special_tokens), pair.s_special["unk"])
    return t_tab, s_tab


def brute_force_matches(pair, text):
    """Pairs (i, j) of teacher/student positions with equal token strings and equal character spans."""
    t = pair.teacher.backend_tokenizer.encode(text)
    s = pair.student.backend_tokenizer.encode(text)
    unk = pair.t_special["unk"]
    return {(i, j) for i, (tt, to) in enumerate(zip(t.tokens, t.offsets))
            for j, (st, so) in enumerate(zip(s.tokens, s.offsets)) if tt == st and to == so and tt != unk}


def test_match_masks_equal_brute_force(pair):
    t_tab, s_tab = tables(pair)
    t2s_same = same_string_map(pair.t_vocab, pair.s_vocab, {pair.t_special["unk"], pair.t_special["pad"]})
    t_ids, t_len = encode_block(pair.teacher.backend_tokenizer, TEXTS)
    s_ids, s_len = encode_block(pair.student.backend_tokenizer, TEXTS)
    t_match, s_match = match_masks(t_ids, s_ids, t_tab, s_tab, t2s_same)
    t_off = np.concatenate([[0], np.cumsum(t_len)])
    s_off = np.concatenate([[0], np.cumsum(s_len)])
    total = 0
    for k, text in enumerate(TEXTS):
        pairs = brute_force_matches(pair, text)
        assert {i for i, _ in pairs} == set(np.flatnonzero(t_match[t_off[k]:t_off[k + 1]]).tolist())
        assert {j for _, j in pairs} == set(np.flatnonzero(s_match[s_off[k]:s_off[k + 1]]).tolist())
        total += len(pairs)
    assert total > 20  # the texts do contain matches, including repeated tokens
    assert t_match.sum() == s_match.sum() == total


def words(tokens: list[str]) -> list[str]:
    """Reassemble words from WordPiece tokens (continuations glued to the previous piece)."""
    out: list[str] = []
    for tok in tokens:
        if tok.startswith("##") and out:
            out[-1] += surface(tok)
        else:
            out.append(tok)
    return out


def test_chunks_cover_the_same_text(pair, pipeline_out):
    t_tab, s_tab = tables(pair)
    t2s = np.load(pipeline_out / "t2s_padded.npy")
    n_pieces = (t2s != len(pair.s_vocab)).sum(1)
    text = " ".join(TEXTS[:4] * 3)
    t_ids, _ = encode_block(pair.teacher.backend_tokenizer, [text])
    s_ids, _ = encode_block(pair.student.backend_tokenizer, [text])
    max_len = 12
    chunks, dropped = chunk_sequence(t_ids, s_ids, t_tab, s_tab, n_pieces, max_len)
    assert dropped == 0 and len(chunks) > 5
    all_words = []
    for t_chunk, s_chunk in chunks:
        assert len(t_chunk) <= max_len and len(s_chunk) <= max_len and n_pieces[t_chunk].sum() <= max_len
        t_tokens = [pair.t_vocab[i] for i in t_chunk]
        s_tokens = [pair.s_vocab[i] for i in s_chunk]
        assert t_tokens[0] == s_tokens[0] == "[CLS]" and t_tokens[-1] == s_tokens[-1] == "[SEP]"
        t_words, s_words = words(t_tokens[1:-1]), words(s_tokens[1:-1])
        assert len(t_words) == len(s_words)
        for tw, sw in zip(t_words, s_words):
            assert tw == sw or "[UNK]" in (tw, sw)
        all_words += t_words
    assert all_words == words([pair.t_vocab[i] for i in t_ids[1:-1]])


def test_word_longer_than_max_len_is_dropped(pair):
    t_tab, s_tab = tables(pair)
    n_pieces = np.ones(len(pair.t_vocab), dtype=np.int64)
    text = "кот " + "компьютерами" + " кот"
    t_ids, _ = encode_block(pair.teacher.backend_tokenizer, [text])
    s_ids, _ = encode_block(pair.student.backend_tokenizer, [text])
    chunks, dropped = chunk_sequence(t_ids, s_ids, t_tab, s_tab, n_pieces, 5)
    assert dropped == 1
    assert [[pair.t_vocab[i] for i in t] for t, _ in chunks] == [["[CLS]", "кот", "[SEP]"]] * 2

