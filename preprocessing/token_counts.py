"""Step 6: occurrences of every vocabulary id in the training shards (`teacher_counts.npy`,
`student_counts.npy`, int64 [V]). The student counts drive the MLM masking probabilities; the teacher
counts drive the sampling of the capped inverse map (step 7)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import _bootstrap  # noqa: F401
from common import timed
from kdcore.errors import run_cli
from kdcore.fsutil import atomic_save_npy
from kdcore.shard_io import open_shards, read_index

OUTPUTS = ("teacher_counts.npy", "student_counts.npy")


def count(data_dir: str, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """(teacher counts int64 [V_T], student counts int64 [V_S]) over all shards, `chunk` tokens at a time."""
    index = read_index(data_dir)
    counts = {"teacher": np.zeros(index["teacher_vocab_size"], np.int64),
              "student": np.zeros(index["student_vocab_size"], np.int64)}
    for shard in open_shards(data_dir):
        for side, total in counts.items():
            ids = shard.ids[side]
            for start in range(0, ids.size, chunk):
                total += np.bincount(ids[start:start + chunk], minlength=total.size)
    return counts["teacher"], counts["student"]


def run(data_dir: str, out_dir: str) -> dict:
    """Write both count files into `out_dir`; returns statistics."""
    stats: dict = {}
    with timed(stats):
        teacher, student = count(data_dir)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(out / OUTPUTS[0], teacher)
        atomic_save_npy(out / OUTPUTS[1], student)
        stats.update(teacher_tokens=int(teacher.sum()), student_tokens=int(student.sum()),
                     teacher_ids_seen=int((teacher > 0).sum()), student_ids_seen=int((student > 0).sum()))
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True, help="shard set (processed_binarized)")
    p.add_argument("--out_dir", required=True, help="where teacher_counts.npy and student_counts.npy go")
    a = p.parse_args(argv)
    print(json.dumps(run(a.data_dir, a.out_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
