"""Soak test of the trainer: a long run of tiny models through train.py's own code keeps its resident memory and
its open file descriptors flat (a leak per update, validation or checkpoint would show as growth).

    .venv/bin/python bench/soak.py [--json bench/results/soak.json] [--steps 3000] [--every 100] [--warmup 100]
        [--checkpoint_interval 500] [--log_interval 50] [--batch_size 8] [--max_rss_growth 0.05] [--threads N]
        [--precision fp32|bf16|fp16] [--device auto|cpu|cuda] [--isolation auto|fork|spawn|none] [--seed 0]
        [--work_dir DIR]

Method: bench/real_scale.py's `tiny` size is built first (`prepare_size`, in workers: the tests' synthetic
corpus, 1,500 lines; a 300-token teacher tokenizer and a random 2 x 64 BertForMaskedLM; run_pipeline.py to a
150-token 2 x 32 student). Then one worker process trains it the way `train.py` does (`TrainConfig.from_args`,
`init_distributed`, `train_process`, `shutdown_distributed`): match KL + MLM against the teacher (alpha_ce 2,
alpha_mlm 0.5; student and teacher in `--precision`, fp32 by default), `--steps` updates of `--batch_size` texts (no accumulation, as many epochs as that takes), a
training log every `--log_interval` updates (train.log and TensorBoard), validation (10% held out) and a
checkpoint every `--checkpoint_interval` updates and at every epoch end (the last three kept, the best model
exported when validation improves), then the final export. A `Distiller.step_end_hooks` callable samples the
worker every `--every` updates and at the last, after that update's log, validation and checkpoint: VmRSS and
VmHWM (/proc/self/status; the peak is reset when the worker starts), open file descriptors (/proc/self/fd) and
threads (/proc/self/task).

Verdicts (PASS/FAIL; exit 1 on a FAIL or an error):
- rss: the peak resident set at the end (VmHWM) exceeds the peak after the first `--warmup` updates by less
  than `--max_rss_growth` (5%);
- fds: no sample after the first `--warmup` updates holds more open file descriptors than the sample at
  `--warmup`.
The JSON also has every sample, the current-RSS growth over the same span and its least-squares slope over the
samples from `--warmup` on (KiB per 1,000 updates), for a closer look. `--isolation none` trains in this
process (for the test; its RSS includes whatever the process held before).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench.` below, when run as a script
from bench._common import script_setup  # noqa: E402  (imports no torch)

script_setup(__name__)

import numpy as np  # noqa: E402

from bench import real_scale  # noqa: E402  (imports torch)
from bench import train_step as ts  # noqa: E402
from bench._common import (  # noqa: E402
    machine_info,
    markdown_table,
    reset_peak_rss,
    run_isolated,
    run_main,
    status_kib,
    write_report,
)

torch = ts.torch

SIZE = "tiny"


def trainer_argv(cfg: dict) -> list[str]:
    """train.py's command line of the soak run (the pipeline directory fills every artifact)."""
    work = Path(cfg["work"])
    return ["--pipeline_dir", str(work / "pipeline"), "--dump_path", str(work / "dump"), "--force",
            "--teacher_name", str(work / "teacher"), "--align_logits", "match", "--alpha_ce", "2.0",
            "--alpha_mlm", "0.5", "--temperature", "2", "--device", torch.device(cfg["device"]).type,
            "--seed", str(cfg["seed"]), "--batch_size", str(cfg["batch_size"]), "--gradient_accumulation_steps", "1",
            "--max_steps", str(cfg["steps"]), "--n_epoch", "1000000", "--valid_prop", "0.1",
            "--checkpoint_interval", str(cfg["checkpoint_interval"]), "--log_interval", str(cfg["log_interval"]),
            "--precision", cfg["precision"], "--teacher_precision", cfg["precision"]]


def read_sample(step: int, elapsed: float) -> dict:
    """This process now: update `step`, seconds since training began, VmRSS and VmHWM (KiB), open file descriptors
    (the listing's own descriptor excluded) and threads."""
    return {"step": step, "elapsed_s": round(elapsed, 3), "rss_kib": status_kib("VmRSS"),
            "peak_rss_kib": status_kib("VmHWM"), "fds": len(os.listdir("/proc/self/fd")) - 1,
            "threads": len(os.listdir("/proc/self/task"))}


def soak(cfg: dict) -> dict:
    """Train the soak run in this process (a worker), sampling it every cfg["every"] updates and at the last:
    {"samples": [...], "peak_reset": whether VmHWM could be reset, "train_s": wall time of the training}."""
    os.environ.setdefault("RVKD_NO_TQDM", "1")
    torch.set_num_threads(cfg["threads"])
    from kdcore.config import TrainConfig
    from train import build_parser, train_process
    from utils import init_distributed, shutdown_distributed

    argv = trainer_argv(cfg)
    tcfg = TrainConfig.from_args(build_parser().parse_args(argv))
    samples: list[dict] = []
    peak_reset = reset_peak_rss()
    started = time.perf_counter()

    def sample(distiller) -> None:
        step = distiller.state.global_step
        if step % cfg["every"] == 0 or step == cfg["steps"]:
            samples.append(read_sample(step, time.perf_counter() - started))

    dist_info = init_distributed(tcfg.loop.device)
    train_process(tcfg, dist_info, argv, step_end_hooks=[sample])
    shutdown_distributed(dist_info)
    return {"samples": samples, "peak_reset": peak_reset, "train_s": time.perf_counter() - started}


def verdicts(samples: list[dict], warmup: int, max_rss_growth: float) -> dict:
    """The rss and fds criteria over the samples from update `warmup` on (see the module docstring)."""
    after = [s for s in samples if s["step"] >= warmup]
    base, end = after[0], after[-1]
    peak_growth = (end["peak_rss_kib"] - base["peak_rss_kib"]) / base["peak_rss_kib"]
    steps = np.array([s["step"] for s in after], dtype=np.float64)
    rss = np.array([s["rss_kib"] for s in after], dtype=np.float64)
    slope = float(np.polyfit(steps, rss, 1)[0]) * 1000 if len(after) > 1 else 0.0
    max_fds = max(s["fds"] for s in after)
    return {
        "rss": {"base_step": base["step"], "end_step": end["step"], "peak_base_mib": base["peak_rss_kib"] / 1024,
                "peak_end_mib": end["peak_rss_kib"] / 1024, "peak_growth": peak_growth, "limit": max_rss_growth,
                "rss_base_mib": base["rss_kib"] / 1024, "rss_end_mib": end["rss_kib"] / 1024,
                "rss_growth": (end["rss_kib"] - base["rss_kib"]) / base["rss_kib"],
                "rss_slope_kib_per_1000_updates": slope, "pass": peak_growth < max_rss_growth},
        "fds": {"base_step": base["step"], "base": base["fds"], "max_after": max_fds, "end": end["fds"],
                "pass": max_fds <= base["fds"]},
    }


def report(samples: list[dict], v: dict, a: argparse.Namespace) -> str:
    """Markdown: the samples, then one row per criterion."""
    mib = 1 / 1024
    rows = [[s["step"], ts.fmt(s["elapsed_s"]), ts.fmt(s["rss_kib"] * mib), ts.fmt(s["peak_rss_kib"] * mib),
             s["fds"], s["threads"]] for s in samples]
    table = markdown_table(["update", "s", "RSS MiB", "peak RSS MiB", "open fds", "threads"], rows)
    r, f = v["rss"], v["fds"]
    criteria = markdown_table(["criterion", f"at update {r['base_step']}", f"at update {r['end_step']}", "growth",
                               "limit", "verdict"], [
        ["peak RSS (VmHWM)", f"{r['peak_base_mib']:.1f} MiB", f"{r['peak_end_mib']:.1f} MiB",
         f"{100 * r['peak_growth']:+.2f}%", f"< {100 * r['limit']:g}%", "PASS" if r["pass"] else "FAIL"],
        ["open fds (max after)", f["base"], f["max_after"], f"{f['max_after'] - f['base']:+d}", "<= +0",
         "PASS" if f["pass"] else "FAIL"]], "lrrrrl")
    return (f"{a.steps} updates of the tiny match-KL run ({a.precision}, batch {a.batch_size}, validation + checkpoint every "
            f"{a.checkpoint_interval} updates and at every epoch end, log every {a.log_interval}), sampled every "
            f"{a.every} updates:\n\n{table}\n\n{criteria}\n\ncurrent RSS {r['rss_base_mib']:.1f} -> "
            f"{r['rss_end_mib']:.1f} MiB ({100 * r['rss_growth']:+.2f}%), least-squares slope "
            f"{r['rss_slope_kib_per_1000_updates']:+.0f} KiB per 1,000 updates from update {r['base_step']} on")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="updates of the soak run")
    p.add_argument("--every", type=int, default=100, help="updates between samples")
    p.add_argument("--warmup", type=int, default=100,
                   help="updates before the baseline sample (a multiple of --every)")
    p.add_argument("--checkpoint_interval", type=int, default=500, help="updates between validations/checkpoints")
    p.add_argument("--log_interval", type=int, default=50, help="updates between training logs")
    p.add_argument("--batch_size", type=int, default=8, help="texts per update")
    p.add_argument("--max_rss_growth", type=float, default=0.05,
                   help="largest relative growth of the peak RSS after the warm-up that passes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs available)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="the run's --precision and --teacher_precision")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--isolation", choices=("auto", "fork", "spawn", "none"), default="auto",
                   help="worker process of the set-up and the run (auto: fork on CPU, spawn on CUDA; none: "
                   "in-process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work_dir", help="where the corpus, teacher, pipeline output and dump go, kept afterwards "
                   "(default: a temporary directory)")
    p.add_argument("--json", "--out", dest="json", help="JSON results",
                   default=str(ROOT / "bench" / "results" / "soak.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if min(a.every, a.warmup, a.checkpoint_interval, a.log_interval, a.batch_size) < 1 or a.warmup % a.every \
            or a.steps < a.warmup + a.every:
        raise ts.BenchError("--every, --warmup, --checkpoint_interval, --log_interval and --batch_size must be at "
                            "least 1, --warmup a multiple of --every and --steps at least --warmup + --every")
    device = ts.choose_device(a.device)
    threads, isolation = ts.workers(a.threads, a.isolation, device)
    print(f"device {device}, {threads} threads, isolation {isolation}", file=sys.stderr, flush=True)
    base = {"device": str(device), "threads": threads, "seed": a.seed}
    setup_args = argparse.Namespace(corpus=None, lines=None, teacher_lines=0, max_len=128)
    with tempfile.TemporaryDirectory(prefix="bench_soak_") as tmp:
        work = Path(a.work_dir) if a.work_dir else Path(tmp)
        setup = real_scale.prepare_size(SIZE, base, setup_args, isolation, work)
        run = {"error": f"not run: {setup['error']}"} if "error" in setup else run_isolated(soak, {
            **base, "work": str(work), "steps": a.steps, "every": a.every, "batch_size": a.batch_size,
            "checkpoint_interval": a.checkpoint_interval, "log_interval": a.log_interval,
            "precision": a.precision}, isolation)
    summary = {"machine": machine_info(device=str(device), threads=threads, isolation=isolation),
               "params": {k: v for k, v in vars(a).items() if k not in ("json", "work_dir")}, "setup": setup}
    if "error" in run:
        text = f"soak run failed: {run['error']}"
        write_report(a.json, {**summary, "error": run["error"], "traceback": run.get("traceback"),
                              "markdown": text}, text)
        return 1
    v = verdicts(run["samples"], a.warmup, a.max_rss_growth)
    text = report(run["samples"], v, a)
    write_report(a.json, {**summary, "samples": run["samples"], "peak_reset": run["peak_reset"],
                          "train_s": run["train_s"], "verdicts": v, "markdown": text}, text)
    return 0 if all(c["pass"] for c in v.values()) else 1


if __name__ == "__main__":
    run_main(main, ts.BenchError, ts.UserError)
