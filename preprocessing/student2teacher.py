"""Step 7: the inverse of the teacher->student map, for the memory-lean reduce-map backward.

For every student id u, `s2t_padded[u]` lists the teacher ids v (among `t2s_mapped_ids`, the columns
the reduce-map KL reads) whose split contains u, and `s2t_idxs_padded[u]` the slot j with
`t2s_padded[v, j] == u`; padded with V_T and 0. Below `--cut_len` entries per student id the inverse is
exact; above it, `--cut_len` entries are sampled without replacement with probability proportional to the
teacher token's corpus count (+1), as in the paper (frequent pieces then get an approximate gradient).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import _bootstrap  # noqa: F401
from common import timed
from kdcore.artifacts import load_counts, load_t2s_mapped_ids, load_t2s_padded, load_teacher2student
from kdcore.errors import UserError, run_cli
from kdcore.fsutil import atomic_save_npy

OUTPUTS = ("s2t_padded.npy", "s2t_idxs_padded.npy")


def invert(t2s_padded: np.ndarray, mapped_ids: np.ndarray, n_student: int, cut_len: int,
           teacher_counts: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(s2t_padded int32 [V_S, W], s2t_idxs_padded int32 [V_S, W], stats) with W = min(cut_len, max list)."""
    n_teacher = t2s_padded.shape[0]
    sub = t2s_padded[mapped_ids]
    row, slot = np.nonzero(sub != n_student)
    u, v = sub[row, slot], mapped_ids[row]
    order = np.lexsort((slot, v, u))
    u, v, slot = u[order], v[order], slot[order]
    sizes = np.bincount(u, minlength=n_student)
    width = int(max(1, min(cut_len, sizes.max(initial=0))))
    rank = np.arange(len(u)) - (np.cumsum(sizes) - sizes)[u]
    s2t = np.full((n_student, width), n_teacher, dtype=np.int32)
    idxs = np.zeros((n_student, width), dtype=np.int32)
    capped = sizes > width
    fits = ~capped[u]
    s2t[u[fits], rank[fits]] = v[fits]
    idxs[u[fits], rank[fits]] = slot[fits]
    rng = np.random.default_rng(seed)
    starts = np.cumsum(sizes) - sizes
    for student_id in np.flatnonzero(capped):
        lo, hi = starts[student_id], starts[student_id] + sizes[student_id]
        weight = teacher_counts[v[lo:hi]].astype(np.float64) + 1.0
        pick = np.sort(rng.choice(hi - lo, size=width, replace=False, p=weight / weight.sum())) + lo
        s2t[student_id] = v[pick]
        idxs[student_id] = slot[pick]
    stats = {"width": width, "capped_student_ids": int(capped.sum()), "max_list": int(sizes.max(initial=0)),
             "pairs": len(u), "pairs_dropped": int((sizes[capped] - width).sum())}
    return s2t, idxs, stats


@dataclass(frozen=True)
class InverseMapParams:
    """Parameters of `run` (step 7).

    t2s_mapping: path of teacher2student.json from step 2;
    t2s_padded: path of t2s_padded.npy from step 2;
    t2s_mapped_ids: path of t2s_mapped_ids.npy from step 2;
    teacher_counts: path of teacher_counts.npy from step 6;
    out_dir: directory that receives s2t_padded.npy and s2t_idxs_padded.npy;
    cut_len: maximum teacher entries per student id (the width of the inverse map);
    seed: seed of the count-weighted sampling of the capped student ids.
    """

    t2s_mapping: str
    t2s_padded: str
    t2s_mapped_ids: str
    teacher_counts: str
    out_dir: str
    cut_len: int = 30
    seed: int = 42


def run(params: InverseMapParams) -> dict:
    """Write s2t_padded.npy and s2t_idxs_padded.npy into `params.out_dir`; returns statistics."""
    if params.cut_len < 1:
        raise UserError(f"--cut_len {params.cut_len} must be at least 1")
    stats: dict = {}
    with timed(stats):
        meta = load_teacher2student(params.t2s_mapping)
        n_t, n_s = meta["teacher_vocab_size"], meta["student_vocab_size"]
        padded = load_t2s_padded(params.t2s_padded, n_t, n_s)
        mapped = load_t2s_mapped_ids(params.t2s_mapped_ids, n_t)
        counts = load_counts(params.teacher_counts, n_t)
        s2t, idxs, info = invert(padded, mapped, n_s, params.cut_len, counts, params.seed)
        out = Path(params.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(out / OUTPUTS[0], s2t)
        atomic_save_npy(out / OUTPUTS[1], idxs)
        stats.update(info)
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--t2s_mapping", required=True, help="teacher2student.json from step 2")
    p.add_argument("--t2s_padded", required=True, help="t2s_padded.npy from step 2")
    p.add_argument("--t2s_mapped_ids", required=True, help="t2s_mapped_ids.npy from step 2")
    p.add_argument("--teacher_counts", required=True, help="teacher_counts.npy from step 6")
    p.add_argument("--out_dir", required=True, help="where s2t_padded.npy and s2t_idxs_padded.npy go")
    p.add_argument("--cut_len", type=int, default=30, help="maximum teacher entries per student id")
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args(argv)
    params = InverseMapParams(
        t2s_mapping=a.t2s_mapping, t2s_padded=a.t2s_padded, t2s_mapped_ids=a.t2s_mapped_ids,
        teacher_counts=a.teacher_counts, out_dir=a.out_dir, cut_len=a.cut_len, seed=a.seed,
    )
    print(json.dumps(run(params)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
