"""Benchmark of the reduce-map implementations: plain autograd indexing ("gather"), the fused
`my_index.MyIndexReduce` ("my_index"), the gather through `my_index.MyIndex` ("my_index_gather", not run by
default) and the sparse product ("sparse"), for the "sum" and "logsumexp" modes.

For every (V_T, V_S, mode, impl) the script starts a fresh worker subprocess that builds a synthetic
teacher->student split map (V_T x S, split lengths 1..S with a falling distribution, Zipf-distributed
student pieces, ~2% of the teacher rows unmapped) and its inverse map capped at `--cut_len` entries per
student id (as the preprocessing does), then times forward + backward of
`reduce_map_logits(reduced [N, V_S], ..., columns=mapped ids)` followed by a weighted sum.

Peak memory (CPU) is the peak resident set size during forward + backward minus the resident set size
just before it. The worker runs with glibc's `MALLOC_MMAP_THRESHOLD_=65536`, so every allocation above
64 KiB is its own mmap and is returned to the kernel when freed: the resident set then follows the live
tensors instead of the heap's high-water mark. Before each run the kernel's peak counter (`VmHWM` in
/proc/self/status) is reset by writing 5 to /proc/self/clear_refs; the reported peak is the largest
`VmHWM - VmRSS(before)` over the timed runs. The `--warmup` runs (1 by default) are left out of both
time and memory: the first run of a process also pays one-time costs (code pages of the kernels it
touches first, lazy initialisation), reported apart as `first_run_peak_mib`. Where clear_refs cannot be
written, only the first run can be measured, and its peak is reported (method `rss_first_run`). On an
accelerator (`--device`, if torch sees one) the peak is `torch.accelerator.max_memory_allocated` minus the
allocated memory before the run. Time is the median wall time of the timed runs; expect noise of tens of
percent on a shared machine (fewer `--threads` than free cores helps), while the peaks are reproducible
to ~1 MiB.

Usage: .venv/bin/python bench/reduce_map.py [--teacher_vocab 30000] [--rows 256] [--out bench/results/reduce_map.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("gather", "my_index_gather", "my_index", "sparse")
DEFAULT_IMPLS = ("gather", "my_index", "sparse")
MODES = ("sum", "logsumexp")
SPLIT_LENGTH_PROBS = (0.45, 0.3, 0.14, 0.07, 0.03, 0.01)


def synthetic_maps(n_teacher: int, n_student: int, width: int, cut_len: int, seed: int):
    """(t2s_padded [V_T, S], mapped ids [K], s2t_padded [V_S, C], s2t_idxs_padded [V_S, C]) as int64 tensors."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    probs = np.asarray(SPLIT_LENGTH_PROBS[:width]) / sum(SPLIT_LENGTH_PROBS[:width])
    lengths = rng.choice(np.arange(1, width + 1), size=n_teacher, p=probs)
    lengths[rng.random(n_teacher) < 0.02] = 0
    zipf = 1.0 / np.arange(1, n_student + 1)
    pieces = rng.choice(n_student, size=(n_teacher, width), p=zipf / zipf.sum())
    t2s = np.where(np.arange(width)[None, :] < lengths[:, None], pieces, n_student)
    mapped = np.flatnonzero(lengths > 0)
    teacher, slot = np.nonzero(t2s != n_student)
    student = t2s[teacher, slot]
    order = np.lexsort((rng.random(student.size), student))
    student, teacher, slot = student[order], teacher[order], slot[order]
    sizes = np.bincount(student, minlength=n_student)
    rank = np.arange(student.size) - (np.cumsum(sizes) - sizes)[student]
    keep = rank < cut_len
    cap = int(min(cut_len, sizes.max()))
    s2t = np.full((n_student, cap), n_teacher, dtype=np.int64)
    idxs = np.zeros((n_student, cap), dtype=np.int64)
    s2t[student[keep], rank[keep]] = teacher[keep]
    idxs[student[keep], rank[keep]] = slot[keep]
    return tuple(torch.from_numpy(a) for a in (t2s, mapped, s2t, idxs))


def worker(cfg: dict) -> dict:
    """Measure one configuration in this (fresh) process."""
    import torch

    sys.path.insert(0, str(ROOT))
    from bench._common import reset_peak_rss, status_kib
    from custom_step import reduce_map_logits

    def rss_kib(field: str) -> int:
        """A `VmXXX:` field of /proc/self/status in KiB; an error where it cannot be read."""
        value = status_kib(field)
        if value is None:
            raise RuntimeError(f"{field} not in /proc/self/status")
        return value

    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    accel = device.type != "cpu"
    t2s, mapped, s2t, idxs = (t.to(device) for t in synthetic_maps(cfg["n_teacher"], cfg["n_student"],
                                                                    cfg["width"], cfg["cut_len"], cfg["seed"]))
    gen = torch.Generator().manual_seed(cfg["seed"])
    reduced = torch.randn(cfg["rows"], cfg["n_student"], generator=gen).to(device).requires_grad_()
    weight = torch.randn(cfg["rows"], mapped.numel(), generator=gen).to(device)

    def step() -> None:
        z = reduce_map_logits(reduced, t2s, cfg["mode"], mapped, cfg["impl"], s2t_padded=s2t,
                              s2t_idxs_padded=idxs)
        (z * weight).sum().backward()
        reduced.grad = None

    times, peaks = [], []
    resettable = accel or reset_peak_rss()
    for run in range(cfg["warmup"] + cfg["reps"]):
        if accel:
            torch.accelerator.synchronize()
            torch.accelerator.reset_peak_memory_stats()
            before = torch.accelerator.memory_allocated()
        else:
            resettable = resettable and reset_peak_rss()
            before = rss_kib("VmRSS") * 1024
        start = time.perf_counter()
        step()
        if accel:
            torch.accelerator.synchronize()
        elapsed = time.perf_counter() - start
        peak = torch.accelerator.max_memory_allocated() if accel else rss_kib("VmHWM") * 1024
        peaks.append((peak - before) / 2**20 if resettable or run == 0 else None)
        if run >= cfg["warmup"]:
            times.append(elapsed)
    counted = [p for p in peaks[cfg["warmup"]:] if p is not None] if resettable else peaks[:1]
    return {**cfg, "time_s": statistics.median(times), "peak_mib": max(counted), "first_run_peak_mib": peaks[0],
            "peak_method": "accelerator" if accel else ("rss_hwm_reset" if resettable else "rss_first_run"),
            "inverse_width": s2t.shape[1]}


def run_config(cfg: dict) -> dict:
    """Run `worker(cfg)` in a fresh interpreter with mmap-backed large allocations."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "OMP_NUM_THREADS": str(cfg["threads"])}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        return {**cfg, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    """Fixed-width table: one line per (V_T, V_S, mode), time and peak of each implementation, and the
    ratios my_index / gather of both."""
    impls = [i for i in IMPLS if any(r["impl"] == i for r in results)]
    head = f"{'V_T':>7} {'V_S':>6} {'mode':>9} | " + " | ".join(f"{i:>21}" for i in impls) + \
        " | my_index/gather"
    sub = " " * 25 + "| " + " | ".join(f"{'time s':>9} {'peak MiB':>11}" for _ in impls) + \
        f" | {'time':>6} {'peak':>6}"
    lines = [head, sub, "-" * len(sub)]
    keyed = {(r["n_teacher"], r["n_student"], r["mode"], r["impl"]): r for r in results}
    for n_t, n_s, mode in dict.fromkeys((r["n_teacher"], r["n_student"], r["mode"]) for r in results):
        cells, ok = [], {}
        for impl in impls:
            r = keyed.get((n_t, n_s, mode, impl))
            if r is None or "error" in r:
                cells.append(f"{'error' if r else '-':>21}")
                continue
            ok[impl] = r
            cells.append(f"{r['time_s']:>9.3f} {r['peak_mib']:>11.1f}")
        ratios = [ok["my_index"][key] / ok["gather"][key] if {"my_index", "gather"} <= ok.keys() else float("nan")
                  for key in ("time_s", "peak_mib")]
        lines.append(f"{n_t:>7} {n_s:>6} {mode:>9} | " + " | ".join(cells) +
                     f" | {ratios[0]:>6.2f} {ratios[1]:>6.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher_vocab", type=int, nargs="+", default=[30000, 120000])
    p.add_argument("--student_vocab", type=int, nargs="+", default=[5000, 30000])
    p.add_argument("--rows", type=int, default=256, help="N, aligned rows per step")
    p.add_argument("--width", type=int, default=6, help="S, max split length")
    p.add_argument("--cut_len", type=int, default=30, help="cap of the inverse map per student id")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--impls", nargs="+", default=list(DEFAULT_IMPLS), choices=IMPLS)
    p.add_argument("--warmup", type=int, default=1, help="runs first that count for neither time nor memory")
    p.add_argument("--reps", type=int, default=3, help="timed (and measured) runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="torch device string")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "reduce_map.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.reps < 1 or a.warmup < 0:
        p.error("--reps must be at least 1 and --warmup at least 0")
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    results = []
    for n_t in a.teacher_vocab:
        for n_s in a.student_vocab:
            for mode in a.modes:
                for impl in a.impls:
                    cfg = {"n_teacher": n_t, "n_student": n_s, "mode": mode, "impl": impl, "rows": a.rows,
                           "width": a.width, "cut_len": a.cut_len, "warmup": a.warmup, "reps": a.reps, "threads": a.threads,
                           "device": a.device, "seed": a.seed}
                    results.append(run_config(cfg))
                    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(table(results))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
