"""Step 12: the MinED column map (Wan et al., 2024, "Knowledge Fusion of Large Language Models"): every teacher
token mapped to the student token at minimum edit distance, `mined_vocab.json`, the columns that `--column_map
mined` compares in the match and reduce KL.

The rule, per teacher token t (ids are vocabulary indices):
- a special token ([UNK] [PAD] [CLS] [SEP] [MASK]) maps to the student's special token of the same role
  (distance 0);
- a continuation piece `##x` is compared with the student's continuation pieces `##y` by the Levenshtein
  distance between x and y (unit insert, delete and substitute costs, on Unicode characters); every other token
  with the student's word-initial (non-special, non-`##`) tokens by the distance between the whole strings; when
  the student has no token of t's kind, t is compared (by its body, without `##`) with the other kind;
- ties go to the smallest student id.
So a token present in both vocabularies maps to itself at distance 0 (the exact-string matches of step 10).

`mined_vocab.json` = {"format", "rule", "fingerprints": {"teacher", "student"} (tokenizer fingerprints),
"teacher_vocab_size", "student_vocab_size", "special_teacher_ids": [the teacher ids of the special roles],
"student_ids": [V_T] (the student id of every teacher id), "distances": [V_T]}, compact JSON.

The distances are computed in bulk by `rapidfuzz.process.cdist` (C++, `--workers` threads), in blocks of
`--chunk_rows` teacher tokens (memory: chunk_rows x candidates x 2 bytes), after the exact matches are taken
from a dictionary.

    python preprocessing/mined_vocab.py --teacher_name TEACHER --student_name OUT/student --out OUT/mined_vocab.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import numpy as np

import _bootstrap  # noqa: F401
from common import load_pair, timed
from kdcore.errors import UserError, run_cli
from kdcore.fsutil import atomic_write_text
from kdcore.tokenizer_utils import CONT_PREFIX

FORMAT = "rvkd-mined-vocab/1"
RULE = ("specials by role; ##x against ##y and word-initial against word-initial (the other kind when the student "
        "has none), Levenshtein on the strings without ##; ties to the smallest student id")


@dataclass(frozen=True)
class MinedParams:
    """Parameters of `run` (step 12).

    teacher_name, student_name: tokenizer directories; out: the output JSON path; chunk_rows: teacher tokens per
    block of distances (memory: chunk_rows x student candidates x 2 bytes); workers: rapidfuzz threads (-1: all
    cores)."""

    teacher_name: str
    student_name: str
    out: str
    chunk_rows: int = 2048
    workers: int = 1


def _is_continuation(token: str) -> bool:
    return token.startswith(CONT_PREFIX) and len(token) > len(CONT_PREFIX)


def _body(token: str) -> str:
    """The token without its continuation prefix."""
    return token[len(CONT_PREFIX):] if _is_continuation(token) else token


def nearest(queries: list[str], candidates: list[str], chunk_rows: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """(int64 [Q] index into `candidates` at minimum Levenshtein distance, ties to the smallest index; int64 [Q] that
    distance) for every query string. Blocks of `chunk_rows` queries bound the memory."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    best = np.zeros(len(queries), dtype=np.int64)
    dist = np.zeros(len(queries), dtype=np.int64)
    for start in range(0, len(queries), chunk_rows):
        block = cdist(queries[start:start + chunk_rows], candidates, scorer=Levenshtein.distance, dtype=np.uint16,
                      workers=workers)
        best[start:start + len(block)] = block.argmin(axis=1)  # argmin: the first (smallest index) of the ties
        dist[start:start + len(block)] = block[np.arange(len(block)), best[start:start + len(block)]]
    return best, dist


def mined_map(t_vocab: list[str], s_vocab: list[str], t_special: dict[str, str], s_special: dict[str, str],
              chunk_rows: int = 2048, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(student id int64 [V_T], distance int64 [V_T]) of every teacher token under the module's rule; special token
    dicts: role -> token string."""
    s_index = {tok: i for i, tok in enumerate(s_vocab)}
    student_ids = np.zeros(len(t_vocab), dtype=np.int64)
    distances = np.zeros(len(t_vocab), dtype=np.int64)
    t_index = {tok: i for i, tok in enumerate(t_vocab)}
    for role, token in t_special.items():
        student_ids[t_index[token]] = s_index[s_special[role]]
    specials = {t_index[tok] for tok in t_special.values()}
    s_specials = set(s_special.values())
    kinds: dict[bool, list[int]] = {True: [], False: []}
    for u, tok in enumerate(s_vocab):
        if tok not in s_specials:
            kinds[_is_continuation(tok)].append(u)
    pending: dict[bool, list[int]] = {True: [], False: []}
    for v, tok in enumerate(t_vocab):
        if v in specials:
            continue
        if tok in s_index and s_index[tok] not in s_specials:
            student_ids[v] = s_index[tok]  # distance 0, and no other student token is at 0
        else:
            pending[_is_continuation(tok)].append(v)
    for cont, rows in pending.items():
        pool = kinds[cont] or kinds[not cont]
        if not rows or not pool:
            continue
        best, dist = nearest([_body(t_vocab[v]) for v in rows], [_body(s_vocab[u]) for u in pool], chunk_rows,
                             workers)
        student_ids[rows] = np.asarray(pool, dtype=np.int64)[best]
        distances[rows] = dist
    return student_ids, distances


def run(params: MinedParams) -> dict:
    """Write `mined_vocab.json`; returns statistics (seconds, mean distance, exact share, distinct student ids)."""
    if params.chunk_rows < 1:
        raise UserError(f"--chunk_rows {params.chunk_rows} must be at least 1")
    stats: dict = {}
    with timed(stats):
        pair = load_pair(params.teacher_name, params.student_name)
        student_ids, distances = mined_map(pair.t_vocab, pair.s_vocab, pair.t_special, pair.s_special,
                                           params.chunk_rows, params.workers)
        special_ids = sorted(pair.t_vocab.index(tok) for tok in pair.t_special.values())
        data = {"format": FORMAT, "rule": RULE, "fingerprints": pair.fingerprints,
                "teacher_vocab_size": len(pair.t_vocab), "student_vocab_size": len(pair.s_vocab),
                "special_teacher_ids": special_ids, "student_ids": student_ids.tolist(),
                "distances": distances.tolist()}
        atomic_write_text(params.out, json.dumps(data, ensure_ascii=False) + "\n")
        regular = np.ones(len(pair.t_vocab), dtype=bool)
        regular[special_ids] = False
        stats.update(mean_distance=round(float(distances[regular].mean()), 4),
                     exact_share=round(float((distances[regular] == 0).mean()), 4),
                     student_columns=int(np.unique(student_ids[regular]).size))
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher_name", required=True, help="teacher directory (tokenizer)")
    p.add_argument("--student_name", required=True, help="student directory (tokenizer)")
    p.add_argument("--out", required=True, help="output JSON path (mined_vocab.json)")
    p.add_argument("--chunk_rows", type=int, default=2048, help="teacher tokens per block of distances")
    p.add_argument("--workers", type=int, default=1, help="threads of the distance computation (-1: all cores)")
    a = p.parse_args(argv)
    print(json.dumps(run(MinedParams(a.teacher_name, a.student_name, a.out, a.chunk_rows, a.workers))))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
