"""Print examples from a shard set so a user can eyeball the data.

    python preprocessing/inspect_shards.py OUT/processed_binarized --n 5 --json

Each example is one JSON line `{"teacher_tokens": [...], "student_tokens": [...], "teacher_match": [...],
"student_match": [...]}` (match lists are empty before step 9), or, without `--json`, two readable lines
with matched tokens in brackets. The tokenizers come from the pipeline's `manifest.json` next to the
shard set (`--teacher_name`/`--student_name` override it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import _bootstrap  # noqa: F401
from common import load_pair
from kdcore.artifacts import check_fingerprints, read_manifest
from kdcore.errors import UserError, run_cli
from kdcore.shard_io import open_shards, read_index


def tokenizer_dirs(data_dir: Path, teacher: str | None, student: str | None) -> tuple[str, str]:
    """Teacher and student tokenizer directories: the flags, else the manifest of the pipeline output."""
    if teacher and student:
        return teacher, student
    manifest = read_manifest(data_dir.parent)
    if manifest is None:
        raise UserError(f"no manifest.json next to {data_dir}; pass --teacher_name and --student_name")
    return teacher or manifest["params"]["teacher_name"], student or str(data_dir.parent / "student")


def examples(data_dir: str, n: int, seed: int | None, teacher: str | None, student: str | None) -> list[dict]:
    """`n` examples (the first ones, or random ones with `seed`) across all shards."""
    path = Path(data_dir)
    index = read_index(path)
    pair = load_pair(*tokenizer_dirs(path, teacher, student))
    check_fingerprints(index["fingerprints"], pair.fingerprints, data_dir)
    shards = open_shards(path)
    where = [(k, i) for k, shard in enumerate(shards) for i in range(len(shard))]
    if seed is not None:
        picks = np.random.default_rng(seed).choice(len(where), size=min(n, len(where)), replace=False)
        where = [where[p] for p in sorted(picks)]
    out = []
    for k, i in where[:n]:
        block = shards[k].block(i, i + 1)
        out.append({
            "teacher_tokens": [pair.t_vocab[t] for t in block.t_ids],
            "student_tokens": [pair.s_vocab[s] for s in block.s_ids],
            "teacher_match": [] if block.t_match is None else block.t_match.tolist(),
            "student_match": [] if block.s_match is None else block.s_match.tolist(),
        })
    return out


def render(tokens: list[str], match: list[int]) -> str:
    """Tokens joined by spaces, matched ones in brackets."""
    return " ".join(f"[{t}]" if m else t for t, m in zip(tokens, match or [0] * len(tokens)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", help="shard set directory (e.g. OUT/processed_binarized)")
    p.add_argument("--n", type=int, default=5, help="number of examples")
    p.add_argument("--seed", type=int, help="pick random examples with this seed (default: the first ones)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of text")
    p.add_argument("--teacher_name", help="teacher tokenizer directory (default: from manifest.json)")
    p.add_argument("--student_name", help="student tokenizer directory (default: OUT/student)")
    a = p.parse_args(argv)
    for ex in examples(a.data_dir, a.n, a.seed, a.teacher_name, a.student_name):
        if a.json:
            print(json.dumps(ex, ensure_ascii=False))
        else:
            print("T:", render(ex["teacher_tokens"], ex["teacher_match"]))
            print("S:", render(ex["student_tokens"], ex["student_match"]))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
