"""The teacher->student split and its inverse on hand-made vocabularies."""

from __future__ import annotations

import numpy as np

from kdcore.tokenizer_utils import greedy_split, surface
from student2teacher import invert
from teacher_tokens_split import pad_splits, split_vocabulary

STUDENT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "к", "о", "т", "##к", "##о", "##т", "##ы", "кот",
           "##от", "ко", "##ко", "м", "##м"]
TEACHER = ["[PAD]", "[unused0]", "[unused1]", "<S>", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "кот", "##ы", "коты",
           "##кот", "ток", "ж", "##ж", "котм", "мок", "##ккк"]
SPECIAL = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}


def test_greedy_split_longest_match_first():
    index = {t: i for i, t in enumerate(STUDENT)}
    assert greedy_split("кот", index, "[UNK]") == ["кот"]
    assert greedy_split("коты", index, "[UNK]") == ["кот", "##ы"]
    assert greedy_split("##кот", index, "[UNK]") == ["##ко", "##т"]
    assert greedy_split("ток", index, "[UNK]") == ["т", "##о", "##к"]
    assert greedy_split("ж", index, "[UNK]") == ["[UNK]"]
    assert greedy_split("котж", index, "[UNK]") == ["[UNK]"]


def test_split_vocabulary_properties():
    splits = split_vocabulary(TEACHER, STUDENT, SPECIAL, "[UNK]")
    unk = STUDENT.index("[UNK]")
    for token, split in zip(TEACHER, splits):
        pieces = [STUDENT[i] for i in split]
        if token in SPECIAL:
            assert pieces == [token]
        elif token.startswith("[unused") or token == "<S>":
            assert split == []
        elif unk not in split:
            assert "".join(surface(p) for p in pieces) == surface(token)
            assert all(p.startswith("##") for p in pieces[1:])
            assert pieces[0].startswith("##") == token.startswith("##")
    assert [STUDENT[i] for i in splits[TEACHER.index("ж")]] == ["[UNK]"]
    assert [STUDENT[i] for i in splits[TEACHER.index("котм")]] == ["кот", "##м"]

    padded = pad_splits(splits, len(STUDENT))
    assert padded.shape == (len(TEACHER), max(len(s) for s in splits))
    for row, split in zip(padded, splits):
        assert row[: len(split)].tolist() == split
        assert (row[len(split):] == len(STUDENT)).all()


def _inverse_by_loop(padded, mapped, n_student):
    inv = {u: set() for u in range(n_student)}
    for v in mapped:
        for j, u in enumerate(padded[v]):
            if u != n_student:
                inv[u].add((int(v), j))
    return inv


def test_s2t_is_exact_inverse_below_cap_and_capped_rows_are_members():
    rng = np.random.default_rng(0)
    n_t, n_s, width = 200, 30, 5
    padded = np.full((n_t, width), n_s)
    lengths = rng.integers(0, width + 1, n_t)
    for v, n in enumerate(lengths):
        padded[v, :n] = rng.integers(0, n_s, n)
    mapped = np.flatnonzero(lengths > 0)
    counts = rng.integers(0, 1000, n_t)
    want = _inverse_by_loop(padded, mapped, n_s)

    s2t, idxs, stats = invert(padded, mapped, n_s, cut_len=1000, teacher_counts=counts, seed=0)
    assert stats["capped_student_ids"] == 0
    for u in range(n_s):
        got = {(int(v), int(j)) for v, j in zip(s2t[u], idxs[u]) if v != n_t}
        assert got == want[u]
        assert (s2t[u] == n_t).sum() == s2t.shape[1] - len(want[u])

    cap = 4
    s2t, idxs, stats = invert(padded, mapped, n_s, cut_len=cap, teacher_counts=counts, seed=0)
    assert s2t.shape[1] == cap and stats["capped_student_ids"] == sum(len(w) > cap for w in want.values())
    for u in range(n_s):
        got = [(int(v), int(j)) for v, j in zip(s2t[u], idxs[u]) if v != n_t]
        assert len(got) == min(cap, len(want[u])) and len(set(got)) == len(got)
        assert set(got) <= want[u]
        assert all(padded[v, j] == u for v, j in got)


def test_s2t_cap_prefers_frequent_teacher_tokens():
    n_s, n_t = 2, 101
    padded = np.full((n_t, 1), n_s)
    padded[:100, 0] = 0
    counts = np.zeros(n_t, dtype=np.int64)
    counts[:10] = 100000
    picked = np.zeros(n_t)
    for seed in range(20):
        s2t, _, _ = invert(padded, np.arange(100), n_s, cut_len=10, teacher_counts=counts, seed=seed)
        picked[s2t[0]] += 1
    assert picked[:10].sum() > 0.9 * picked.sum()
