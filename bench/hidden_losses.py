"""Benchmark of the hidden-state losses: time and peak memory of one training step with each hidden loss
(MSE, cosine, contrastive, hyperbolic contrastive) on top of the KL step, against the KL-only step.

    .venv/bin/python bench/hidden_losses.py [--sizes demo] [--configs kl,kl+mse,...] [--precision fp32]
        [--batch_size 4] [--seq_len 128] [--steps 3] [--warmup 1] [--threads N] [--device auto|cpu|cuda]
        [--isolation auto|fork|spawn|none] [--quick] [--out bench/results/hidden_losses.json]

The step is the trainer's own, built as `bench/train_step.py` builds it (same synthetic vocabularies,
split maps and texts, same sizes: `demo` = teacher BERT 4 x 256, V_T 30000 -> student DistilBERT 3 x 256,
V_S 6000; `tiny` = 2 x 64, V_T 2000 -> 2 x 64, V_S 500): train.py's parser, `TrainConfig` and its alignment factory, then
`trainer_core.build_hidden_losses` for the hidden-state module, the `StudentRunner` and the `Distiller`; one update
= collate, teacher pass (with hidden states when a hidden loss is on), student passes and losses under
autocast, backward, clipping + AdamW. Every configuration trains 5 * match KL (T 2) + 2 * MLM, as
bench/train_step.py; the hidden-state terms use the settings of the paper's scripts:
- `kl`: the KL-only baseline;
- `kl+mse`: MSE 0.1, match, average of all layers, trainable projection student -> teacher;
- `kl+cos`: cosine 0.1, otherwise as kl+mse;
- `kl+contrastive`: contrastive 0.1, 64 student negatives per positive;
- `kl+contrastive_all`: contrastive 0.1 with every other row as a negative;
- `kl+hyperbolic`: hyperbolic contrastive 0.1, 32 negatives, c = 1 (fixed), teacher -> student HypLinear;
- `kl+mse/reduce`: MSE 0.1 with reduce alignment (a second student pass on the t2s input).
Measurements (each configuration in a fresh worker: fork on CPU, spawn on CUDA), as `train_step.measure_steps`
takes them after `--warmup` untimed steps: peak memory = on CPU the peak resident set during `--steps` steps
minus the resident set before them (glibc mmap threshold 64 KiB, VmHWM reset through /proc/self/clear_refs),
on CUDA `max_memory_allocated` minus the memory allocated before them; then the median wall time of the same
`--steps` batches, timed with the allocator keeping freed memory (mmap threshold 32 MiB) as in training. The
table gives both and their ratio to the `kl` row.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT / "preprocessing"), str(ROOT)):  # the repository's modules before bench/'s
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)

from bench import train_step as ts  # noqa: E402  (sets the environment of the bench workers, imports torch)
from bench._common import (  # noqa: E402
    machine_info,
    markdown_table,
    run_isolated,
    run_main,
    write_report,
)
from kdcore.tokenizer_utils import MAX_LEN  # noqa: E402

torch = ts.torch
np = ts.np

CONFIGS = {
    "kl": [],
    "kl+mse": ["--alpha_mse", "0.1"],
    "kl+cos": ["--alpha_cos", "0.1"],
    "kl+contrastive": ["--alpha_contrastive", "0.1", "--n_negative_samples", "64"],
    "kl+contrastive_all": ["--alpha_contrastive", "0.1", "--n_negative_samples", "-1"],
    "kl+hyperbolic": ["--alpha_contrastive", "0.1", "--n_negative_samples", "32", "--project_to", "student",
                      "hyperbolic", "--c", "1.0", "--use_hyperbolic_projections"],
    "kl+mse/reduce": ["--alpha_mse", "0.1", "--align_hiddens", "reduce"],
}
"""train.py arguments of each configuration (added to the match-KL step)."""
DEFAULT_CONFIGS = ("kl", "kl+mse", "kl+cos", "kl+contrastive", "kl+hyperbolic", "kl+mse/reduce")


def measure(cfg: dict) -> dict:
    """Build the data, models and step of one configuration and time it (in the calling process)."""
    from kdcore.trainer_core import build_hidden_losses

    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    size = ts.Size(**cfg["size"])
    rng = np.random.default_rng(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    voc = ts.synthetic_vocabularies(size.teacher_vocab, size.student_vocab, rng)
    pool, batches = ts.synthetic_pool(voc, max(1, min(cfg["warmup"] + cfg["steps"], 4)), cfg["batch_size"],
                                      cfg["seq_len"], rng)
    with tempfile.TemporaryDirectory(prefix="bench_hidden_") as tmp:
        paths = {"dir": tmp, **ts.write_artifacts(voc, Path(tmp), cfg["seed"])}
        tcfg = ts.trainer_config(cfg["precision"], "match", paths, cfg["seed"], cfg["batch_size"], cfg["device"],
                                 extra=CONFIGS[cfg["config"]])
        plan = tcfg.alignments(ts.VocabSizes(size.teacher_vocab, size.student_vocab, {}))
    counts = np.bincount(np.concatenate([q[1] for q in pool.seqs]), minlength=size.student_vocab)
    token_probs = ts.mlm_token_probs(counts, tcfg.mlm.smoothing, list(range(len(ts.SPECIAL_TOKENS))))
    collator = ts.Collator(ts.PAD, ts.PAD, plan.t2s_input, size.student_vocab)
    stats = ts.pool_stats(collator, pool, batches)
    teacher, student = ts.build_models(size, max(MAX_LEN, stats["max_len"]), True)
    hidden = None
    if tcfg.hidden is not None:
        hidden = build_hidden_losses(tcfg.hidden, plan.hidden, teacher.config, student.config)
    runner = ts.StudentRunner(student, mlm=True, kl=plan.kl, hidden=hidden)
    distiller = ts.make_distiller(tcfg, device, runner, teacher, pool, collator, token_probs)

    def step(index: int) -> int:
        return ts.train_step(distiller, pool, batches[index % len(batches)])

    for index in range(cfg["warmup"]):
        step(index)
    m = ts.measure_steps(step, cfg, device, cfg["warmup"])
    with torch.no_grad():  # the loss terms of one more batch, for the record
        batch = distiller._batch(pool, batches[0])
        _, losses = distiller._losses(batch, distiller.generator)
    return {"step_s": statistics.median(m["times"]), "step_s_all": m["times"], "peak_mib": m["peak"] / 2**20,
            "peak_method": m["method"],
            "hidden_parameters": sum(p.numel() for p in hidden.parameters()) if hidden is not None else 0,
            "aligned_rows_per_batch": stats.get("matched_tokens"), "losses": {k: float(v) for k, v in losses.items()},
            **{k: v for k, v in stats.items() if k != "max_len"}}


def _ratio(r: dict, b: dict | None, key: str) -> str:
    return f"{r[key] / b[key]:.2f}x" if b and b[key] > 0 else "-"


def table(results: list[dict]) -> str:
    base = {(r["size_name"], r["precision"]): r for r in results if r["config"] == "kl" and "error" not in r}
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["size_name"], r["precision"], r["config"], "error", r["error"][:60], "", "", ""])
            continue
        b = base.get((r["size_name"], r["precision"]))
        terms = " ".join(f"{k[5:]}={v:.3g}" for k, v in r["losses"].items() if k not in ("loss_mlm", "loss_ce"))
        rows.append([r["size_name"], r["precision"], r["config"], f"{r['step_s'] * 1e3:.0f}", _ratio(r, b, "step_s"),
                     f"{r['peak_mib']:.0f}", _ratio(r, b, "peak_mib"), terms or "-"])
    return markdown_table(["size", "precision", "config", "ms/step", "time vs kl", "peak MiB", "peak vs kl",
                           "hidden loss values"], rows, "lllrrrrl")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="demo", help="comma-separated, from " + ", ".join(ts.SIZES))
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated, from " + ", ".join(CONFIGS))
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    ts.add_step_arguments(p, "configuration")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny size, batch 2 x 32 tokens, 1 + 1 steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "hidden_losses.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.quick:
        a.sizes, a.batch_size, a.seq_len, a.steps, a.warmup = "tiny", 2, 32, 1, 1
    names = [s for s in a.sizes.split(",") if s]
    configs = [c for c in a.configs.split(",") if c]
    bad = [s for s in names if s not in ts.SIZES] + [c for c in configs if c not in CONFIGS]
    if bad or not names or not configs:
        raise ts.BenchError(f"unknown sizes/configs {bad}; sizes: {', '.join(ts.SIZES)}; configs: {', '.join(CONFIGS)}")
    device = ts.choose_device(a.device)
    threads, isolation = ts.workers(a.threads, a.isolation, device)
    results = []
    for name in names:
        for config in configs:
            cfg = {"size_name": name, "size": dataclasses.asdict(ts.SIZES[name]), "config": config,
                   "precision": a.precision, "batch_size": a.batch_size, "seq_len": a.seq_len, "steps": a.steps,
                   "warmup": a.warmup, "device": str(device), "threads": threads, "seed": a.seed,
                   "isolated": isolation != "none"}
            t0 = time.perf_counter()
            measured = run_isolated(measure, cfg, isolation)
            r = {**cfg, **measured, "wall_s": time.perf_counter() - t0}
            results.append(r)
            brief = f"error {r['error']}" if "error" in r else \
                f"{r['step_s'] * 1e3:.0f} ms/step, peak {r['peak_mib']:.0f} MiB"
            print(f"{name} {a.precision} {config}: {brief} ({r['wall_s']:.1f} s)", file=sys.stderr, flush=True)
    report = table(results)
    summary = {"machine": machine_info(device=str(device), threads=threads, isolation=isolation,
                                       cuda_device=torch.cuda.get_device_name(device) if device.type == "cuda"
                                       else None),
               "params": {"sizes": {n: dataclasses.asdict(ts.SIZES[n]) for n in names}, "configs": configs,
                          "config_flags": {c: CONFIGS[c] for c in configs}, "precision": a.precision,
                          "batch_size": a.batch_size, "seq_len": a.seq_len, "steps": a.steps, "warmup": a.warmup,
                          "alpha_ce": ts.ALPHA_CE, "alpha_mlm": ts.ALPHA_MLM, "quick": a.quick},
               "results": results, "markdown": report}
    write_report(a.out, summary, report)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    run_main(main, ts.BenchError, ts.UserError)
