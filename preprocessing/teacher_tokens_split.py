"""Step 2: split every teacher vocabulary entry into student tokens (the `teacher2student` map).

For each teacher id: special tokens map to the student token with the same string; `[unused*]`, `<S>`
and similar placeholders are unmapped (empty split); every other entry gets its greedy
longest-match-first split into student pieces (`##` continuation kept), or `[UNK]` when no split exists.

Outputs in `--out_dir`:
- `teacher2student.json`: `{"splits": [[student ids] per teacher id], vocabulary sizes, fingerprints}`;
- `t2s_padded.npy`: int32 [V_T, max_split], the splits padded with V_S;
- `t2s_mapped_ids.npy`: int64 [K], the non-special teacher ids whose split has no `[UNK]` (the teacher
  vocabulary columns that the reduce-map KL compares).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import _bootstrap  # noqa: F401
from common import load_pair, timed
from kdcore.errors import run_cli
from kdcore.fsutil import atomic_save_npy, atomic_write_json
from kdcore.tokenizer_utils import UNMAPPED_PATTERN, greedy_split

OUTPUTS = ("teacher2student.json", "t2s_padded.npy", "t2s_mapped_ids.npy")


def split_vocabulary(t_vocab: list[str], s_vocab: list[str], t_special: set[str], s_unk: str) -> list[list[int]]:
    """Student-id split of every teacher vocabulary entry (empty list = unmapped)."""
    s_index = {tok: i for i, tok in enumerate(s_vocab)}
    splits = []
    for token in t_vocab:
        if token in t_special:
            splits.append([s_index.get(token, s_index[s_unk])])
        elif UNMAPPED_PATTERN.match(token):
            splits.append([])
        else:
            splits.append([s_index[p] for p in greedy_split(token, s_index, s_unk)])
    return splits


def pad_splits(splits: list[list[int]], pad: int) -> np.ndarray:
    """int32 [len(splits), max split length] matrix, padded with `pad`."""
    width = max(1, max(len(s) for s in splits))
    out = np.full((len(splits), width), pad, dtype=np.int32)
    for i, split in enumerate(splits):
        out[i, : len(split)] = split
    return out


def run(teacher_name: str, student_name: str, out_dir: str) -> dict:
    """Compute and write the maps; returns statistics."""
    stats: dict = {}
    with timed(stats):
        pair = load_pair(teacher_name, student_name)
        t_special = set(pair.teacher.all_special_tokens)
        splits = split_vocabulary(pair.t_vocab, pair.s_vocab, t_special, pair.s_special["unk"])
        s_unk = pair.s_unk_id
        padded = pad_splits(splits, len(pair.s_vocab))
        mapped = np.array([i for i, (tok, sp) in enumerate(zip(pair.t_vocab, splits))
                           if sp and tok not in t_special and s_unk not in sp], dtype=np.int64)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "teacher2student.json", {
            "teacher_vocab_size": len(pair.t_vocab), "student_vocab_size": len(pair.s_vocab),
            "fingerprints": pair.fingerprints, "splits": splits,
        })
        atomic_save_npy(out / "t2s_padded.npy", padded)
        atomic_save_npy(out / "t2s_mapped_ids.npy", mapped)
        lengths = np.array([len(s) for s in splits])
        stats.update(
            teacher_vocab_size=len(pair.t_vocab), student_vocab_size=len(pair.s_vocab), mapped=len(mapped),
            unmapped=int((lengths == 0).sum()), to_unk=int(sum(1 for s in splits if s == [s_unk])),
            max_split=int(padded.shape[1]), mean_split=round(float(lengths[mapped].mean()) if len(mapped) else 0.0, 3),
        )
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher_name", required=True, help="teacher directory (tokenizer)")
    p.add_argument("--student_name", required=True, help="student directory (tokenizer from step 1)")
    p.add_argument("--out_dir", required=True, help="where the three map files are written")
    a = p.parse_args(argv)
    print(json.dumps(run(a.teacher_name, a.student_name, a.out_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
