"""Vectorised word/character alignment of the two tokenizations (used by steps 4 and 9).

Teacher and student share the normaliser and the pre-tokeniser, so they cut a text into the same words;
a word starts at every token that is not a `##` continuation (special tokens are words of their own).
Inside a word, a token covers the characters [offset, offset + len(surface)) where offset is the summed
surface length of the word's earlier pieces. `[UNK]` always covers its whole word, as WordPiece emits it
for words it cannot split. Two tokens cover the same span of text iff they are in the same word (same
word index: the sequences have equal word counts) and have the same offset and the same surface string.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdcore.tokenizer_utils import token_tables

KEY_SHIFT = 1 << 24  # offsets inside a word stay far below this


@dataclass
class SideTables:
    """Per-vocabulary lookup tables of one side."""

    length: np.ndarray  # int32 [V] surface length in characters
    starts: np.ndarray  # bool [V] token starts a word
    special: np.ndarray  # bool [V] token is a special token
    unk_id: int

    @classmethod
    def build(cls, vocab: list[str], special_tokens: set[str], unk_token: str) -> SideTables:
        length, starts = token_tables(vocab, special_tokens)
        special = np.array([t in special_tokens for t in vocab], dtype=bool)
        return cls(length, starts, special, vocab.index(unk_token))


def word_index(ids: np.ndarray, tables: SideTables) -> np.ndarray:
    """int64 [T]: running word number of every token over the whole flat array."""
    return np.cumsum(tables.starts[ids], dtype=np.int64) - 1


def word_counts(ids: np.ndarray, lengths: np.ndarray, tables: SideTables) -> np.ndarray:
    """int64 [n]: number of words in every sequence."""
    seg = np.repeat(np.arange(len(lengths)), lengths)
    return np.bincount(seg, weights=tables.starts[ids], minlength=len(lengths)).astype(np.int64)


def offset_in_word(ids: np.ndarray, tables: SideTables) -> np.ndarray:
    """int64 [T]: character offset of every token inside its word."""
    lens = tables.length[ids].astype(np.int64)
    before = np.cumsum(lens) - lens
    words = word_index(ids, tables)
    word_start = before[tables.starts[ids]]
    return before - word_start[words]


def same_string_map(t_vocab: list[str], s_vocab: list[str], exclude: set[str]) -> np.ndarray:
    """int64 [V_T]: the student id of the identical token string, or -1 (also -1 for `exclude`)."""
    s_index = {tok: i for i, tok in enumerate(s_vocab)}
    return np.array([-1 if tok in exclude else s_index.get(tok, -1) for tok in t_vocab], dtype=np.int64)


def match_masks(t_ids: np.ndarray, s_ids: np.ndarray, t_tables: SideTables, s_tables: SideTables,
                t2s_same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 masks [T], [S]: 1 where a teacher and a student token hold the same string over the same span.

    The flat arrays must cover whole sequences with equal word counts on both sides (step 4 guarantees it).
    """
    t_key = word_index(t_ids, t_tables) * KEY_SHIFT + offset_in_word(t_ids, t_tables)
    s_key = word_index(s_ids, s_tables) * KEY_SHIFT + offset_in_word(s_ids, s_tables)
    _, ti, si = np.intersect1d(t_key, s_key, assume_unique=True, return_indices=True)
    same = t2s_same[t_ids[ti]] == s_ids[si]
    t_match = np.zeros(len(t_ids), dtype=np.uint8)
    s_match = np.zeros(len(s_ids), dtype=np.uint8)
    t_match[ti[same]] = 1
    s_match[si[same]] = 1
    return t_match, s_match

