"""Benchmark of the KL loss: `custom_step.kl_div_loss` (one autograd function) against the textbook composition
log_softmax(t / T) -> clamp -> log_softmax(s / T) -> F.kl_div(log_target=True) with autograd.

    .venv/bin/python bench/kl_loss.py [--shapes 330x5399,2000x16000] [--temperature 2] [--steps 5]
        [--threads N] [--device auto] [--out bench/results/kl_loss.json]

Each (shape, implementation) runs in a fresh worker (fork on CPU, spawn on CUDA) on the same random fp32
logits (teacher and student [N, C], a few teacher columns at -inf as a t2s map leaves them): one warm-up
forward + backward, then `train_step.measure_steps`: peak memory of `--steps` forward + backward passes over
what was resident before them (CPU: glibc mmap threshold 64 KiB, VmHWM reset; CUDA: max_memory_allocated),
then their median time with the allocator keeping freed memory as in training. The default shapes are the
demo's match step (330 matched rows x 5,399 matched columns) and a larger one (2,000 x 16,000). Each worker
also returns the loss and the gradient's norm; the run fails when the two implementations disagree (relative
1e-5).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT / "preprocessing"), str(ROOT)):  # the repository's modules before bench/'s
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)

from bench import train_step as ts  # noqa: E402  (sets the environment of the bench workers, imports torch)
from bench._common import machine_info, markdown_table, run_isolated, run_main, write_report  # noqa: E402
from custom_step import kl_div_loss  # noqa: E402

torch = ts.torch
F = torch.nn.functional

IMPLS = ("textbook", "ours")
AGREEMENT = 1e-5


def textbook_kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 / N * sum KL(softmax(t / T) || softmax(s / T)), composed of torch ops (teacher [N, C], student [N, C])."""
    log_p = F.log_softmax(teacher.detach() / temperature, dim=-1).clamp_min(torch.finfo(teacher.dtype).min)
    log_q = F.log_softmax(student / temperature, dim=-1)
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True) * (temperature ** 2 / student.shape[0])


def logits(rows: int, cols: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random fp32 teacher and student logits [rows, cols]; 1% of the teacher's columns at -inf."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(rows, cols, generator=gen) * 3
    teacher[:, torch.rand(cols, generator=gen) < 0.01] = -torch.inf
    student = torch.randn(rows, cols, generator=gen) * 3
    return teacher.to(device), student.to(device)


def measure(cfg: dict) -> dict:
    """Time and peak memory of forward + backward of one implementation (in the calling process)."""
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    teacher, student = logits(cfg["rows"], cfg["cols"], cfg["seed"], device)
    student.requires_grad_(True)
    fn = kl_div_loss if cfg["impl"] == "ours" else textbook_kl
    values = {}

    def step(_: int) -> int:
        student.grad = None
        loss = fn(teacher, student, cfg["temperature"])
        loss.backward()
        values.update(loss=loss.item(), grad_norm=student.grad.norm().item())
        return cfg["rows"]

    step(0)
    m = ts.measure_steps(step, cfg, device, 1)
    return {"step_s": statistics.median(m["times"]), "step_s_all": m["times"], "peak_mib": m["peak"] / 2**20,
            "peak_method": m["method"], **values}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", default="330x5399,2000x16000", help="comma-separated ROWSxCOLUMNS")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=5, help="measured forward + backward passes")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the CPUs this process may use)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--isolation", choices=("auto", "fork", "spawn", "none"), default="auto",
                   help="worker per measurement (auto: fork on CPU, spawn on CUDA; none: in-process, for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: one small shape, 2 steps")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "kl_loss.json"))
    return p


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(x) for x in item.split("x")) for item in text.split(",") if item]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ts.BenchError(f"--shapes {text!r}: expected comma-separated ROWSxCOLUMNS, e.g. 330x5399")
    return shapes


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.quick:
        a.shapes, a.steps = "64x500", 2
    shapes = parse_shapes(a.shapes)
    device = ts.choose_device(a.device)
    threads, isolation = ts.workers(a.threads, a.isolation, device)
    results, rows = [], []
    for n_rows, n_cols in shapes:
        by_impl = {}
        for impl in IMPLS:
            cfg = {"rows": n_rows, "cols": n_cols, "impl": impl, "temperature": a.temperature, "steps": a.steps,
                   "device": str(device), "threads": threads, "seed": a.seed, "isolated": isolation != "none"}
            t0 = time.perf_counter()
            r = {**cfg, **run_isolated(measure, cfg, isolation), "wall_s": time.perf_counter() - t0}
            if "error" in r:
                raise ts.BenchError(f"{impl} at {n_rows}x{n_cols} failed: {r['error']}")
            by_impl[impl] = r
            results.append(r)
            print(f"{n_rows}x{n_cols} {impl}: {r['step_s'] * 1e3:.1f} ms, peak {r['peak_mib']:.1f} MiB",
                  file=sys.stderr, flush=True)
        ref, ours = by_impl["textbook"], by_impl["ours"]
        for key in ("loss", "grad_norm"):
            if abs(ours[key] - ref[key]) > AGREEMENT * max(abs(ref[key]), 1e-12):
                raise ts.BenchError(f"{key} differs at {n_rows}x{n_cols}: ours {ours[key]} vs textbook {ref[key]}")
        for r in (ref, ours):
            rows.append([f"{n_rows} x {n_cols}", r["impl"], f"{r['step_s'] * 1e3:.1f}", f"{r['peak_mib']:.1f}",
                         f"{ref['step_s'] / r['step_s']:.2f}x", f"{r['peak_mib'] / max(ref['peak_mib'], 1e-9):.2f}x"])
    report = markdown_table(["logits [N, C]", "implementation", "ms fwd+bwd", "peak MiB", "speed vs textbook",
                             "memory vs textbook"], rows, "llrrrr")
    report += (f"\n\nfp32, T = {a.temperature}, median of {a.steps} passes, {threads} threads on {device}; loss and "
               f"gradient norm agree to {AGREEMENT:g} (relative)")
    summary = {"machine": machine_info(device=str(device), threads=threads, isolation=isolation),
               "params": {"shapes": shapes, "temperature": a.temperature, "steps": a.steps, "quick": a.quick},
               "results": results, "markdown": report}
    write_report(a.out, summary, report)
    return 0


if __name__ == "__main__":
    run_main(main, ts.BenchError)
