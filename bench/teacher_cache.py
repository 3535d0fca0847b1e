"""Benchmark of the teacher-output cache (`kdcore/teacher_cache.py`): the training step with the teacher in the
loop against the same step reading the teacher's side of the KL from a `sample` cache, the cache build's
throughput, and what each encoding stores per row.

    .venv/bin/python bench/teacher_cache.py [--json bench/results/teacher_cache.json] [--sizes real|tiny]
        [--alignments match,reduce,reduce_map] [--precisions fp32,bf16] [--k 16] [--batch_size 4] [--seq_len 128]
        [--steps 3] [--warmup 1] [--threads N] [--device auto|cpu|cuda] [--isolation auto|fork|spawn|none]
        [--reduce_map_mode logsumexp|sum] [--emulated_bf16] [--quick]

Sizes are bench/train_step.py's: `real` (default; teacher BertForMaskedLM 12 layers, hidden 768, 12 heads, FFN
3072, V_T 120000; student DistilBERT 3 layers, dim 264, 12 heads, FFN 792, V_S 30000) and `tiny` (for the
test). Random weights; the synthetic vocabularies, split maps, texts and the trainer's configuration are
train_step's (`prepare_data`), the step is train_step's (`make_distiller` + `train_step`: collate, losses under
autocast, backward, clipping + AdamW; 5 * KL (T 2) + 2 * MLM). Alignments: `match`, `reduce` and `reduce_map`
with the exact `sparse` implementation (scored by the logsumexp of the pieces by default, as train_step).

For every size, precision and alignment, four workers (fork on CPU, spawn on CUDA, as train_step):
- build: the teacher (seeded apart from the student, so that every worker builds the same one) runs the
  builder's encode path of `preprocessing/cache_teacher.py` over every text of the benchmark, in batches of
  `--batch_size`: the plain collator, `step_runner.teacher_forward` at the alignment's rows and columns under
  autocast, `log_softmax(logits / T)` and `Sample(K).encode`; the rows (one per aligned teacher position, per
  text in order, with their offsets) are saved as .npy files. build tok/s = teacher tokens / the time of that
  pass (after one untimed batch);
- online: the trainer's step with the teacher in the loop, alone in its worker;
- cached: the same step with the teacher NOT given to the Distiller (teacher=None, as train.py does when the
  cache serves every loss), alone in its worker: the rows, memory-mapped, form a `CacheShard` of the texts'
  (one) shard, the in-memory dataset's `gather` returns them as `RawBatch.cache`, the `Collator` with
  `cache_encoding` turns them into the batch's `cache.*` tensors and the KL term reads those (`CachedTeacher`);
- paired: both steps in one worker, alternately on the same batches (the first of each pair alternating), so
  that both see the same load on a shared machine; its timings give the table's tokens/s and the speedup.
Online and cached train the same student (same seed) on the same batches; their loss terms on the first batch
before any update (eval mode, same masking seed) are recorded: the cached KL is the sampled estimate of the
online one. tokens/s = student tokens / time of `--steps` timed steps after `--warmup` untimed ones (the
online and cached workers' own timings are in the JSON too); speedup = cached / online tokens/s. Peak RSS (the
online and cached workers, as `train_step.measure_steps` takes it) = the worker's resident set before the
steps + the peak above it during them (CPU: memory phase, glibc mmap threshold 64 KiB, VmHWM reset first),
i.e. the process's peak while training, with the models, optimizer state, data and cache; on CUDA the process's
host VmHWM and the device's `max_memory_allocated` during the steps.
Bytes per row are `Encoding.bytes_per_row()` (what a cache stores per row) at the alignment's column count:
exact fp32 and fp16, top-k K fp16, sample K (the build checks that its arrays hold that much per row).

Targets (at the `real` size, informative elsewhere): cached match >= 5x online match; cached reduce_map >= 10x
online reduce_map; sample K=16 <= 200 bytes per row. bf16 runs only where the device has native bf16
(train_step's `native_bf16`; `--emulated_bf16` forces it).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench.` below, when run as a script
from bench._common import script_setup  # noqa: E402  (imports no torch)

script_setup(__name__)

from bench import train_step as ts  # noqa: E402  (imports torch)
from bench._common import (  # noqa: E402
    machine_info,
    markdown_table,
    reset_peak_rss,
    run_isolated,
    run_main,
    status_kib,
    write_report,
)
from custom_step import IGNORE_INDEX  # noqa: E402
from kdcore.alignments import LogitAlignment  # noqa: E402
from kdcore.step_runner import teacher_forward  # noqa: E402
from kdcore.teacher_cache import CacheShard, Encoding, make_encoding  # noqa: E402
from kdcore.tokenizer_utils import MAX_LEN  # noqa: E402
from kdcore.trainer_core import autocast  # noqa: E402

torch = ts.torch
np = ts.np

ALIGNMENTS = {"match": "match", "reduce": "reduce", "reduce_map": "reduce_map/sparse"}
"""--alignments choices -> train_step configuration."""
SIZE_NAMES = ("real", "tiny")
MODES = ("online", "cached")
SPEEDUP_TARGETS = {"match": 5.0, "reduce_map": 10.0}
"""alignment -> the cached / online tokens/s it should reach (at the real size)."""
SAMPLE_BYTES_TARGET = 200
TARGET_SIZE = "real"
QUICK = {"batch_size": 2, "seq_len": 64, "warmup": 1, "steps": 2}
"""--quick: the real size, small batches, few steps."""
GIB = 2**30


def encodings(k: int) -> dict[str, tuple[str, int, str]]:
    """Encodings whose bytes per row are reported: {label: (name, K, dtype)}."""
    return {"exact_fp32": ("exact", 0, "fp32"), "exact_fp16": ("exact", 0, "fp16"),
            f"topk{k}_fp16": ("topk", k, "fp16"), f"sample{k}": ("sample", k, "fp16")}


def n_columns(kl: LogitAlignment, size: ts.Size) -> int:
    """The teacher columns of the alignment (all of the teacher's vocabulary where it names none)."""
    return kl.teacher_columns.numel() if kl.teacher_columns is not None else size.teacher_vocab


def sample_encoding(kl: LogitAlignment, size: ts.Size, k: int) -> Encoding:
    """The cache's encoding: K draws per row (`Sample`)."""
    return make_encoding("sample", k, "fp16", n_columns(kl, size))


def teacher_model(size: ts.Size, stats: dict, seed: int) -> ts.BertForMaskedLM:
    """The random teacher, seeded apart from the student, so that the build and the online step share it."""
    torch.manual_seed(seed + 1)
    return ts.build_teacher(size, max(MAX_LEN, stats["max_len"]))


def setup(cfg: dict) -> tuple[torch.device, ts.Size, ts.StepData]:
    """Threads, device, size and train_step's data of one configuration (in the worker)."""
    torch.set_num_threads(cfg["threads"])
    size = ts.Size(**cfg["size"])
    torch.manual_seed(cfg["seed"])
    return torch.device(cfg["device"]), size, ts.prepare_data(cfg, size, np.random.default_rng(cfg["seed"]))


def measure_build(cfg: dict) -> dict:
    """Build the `sample` cache rows of every text (cache_teacher.py's encode path), save them under
    cfg["cache_dir"] and time the pass."""
    device, size, data = setup(cfg)
    kl = data.plan.kl.to(device)
    teacher = teacher_model(size, data.stats, cfg["seed"]).to(device).eval()
    teacher.requires_grad_(False)
    encoding = sample_encoding(kl, size, cfg["k"])
    collator = ts.Collator(ts.PAD, ts.PAD)  # as the builder's: no t2s input
    starts = range(0, len(data.pool), cfg["batch_size"])
    chunks = [range(s, min(s + cfg["batch_size"], len(data.pool))) for s in starts]

    def encode(indices: range, generator: torch.Generator) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
        batch = collator(data.pool.gather(indices))
        batch = {key: value.to(device) for key, value in batch.items()}
        labels = torch.full_like(batch["s_ids"], IGNORE_INDEX)
        with autocast(device, cfg["precision"]):
            logits, _ = teacher_forward(teacher, batch, kl, batch["s_ids"], labels)
        log_p = torch.log_softmax(logits.float() / kl.temperature, -1)
        rows = encoding.encode(log_p, generator)
        return rows, kl.positions.teacher_rows(batch).sum(1).cpu().numpy(), int(batch["t_mask"].sum())

    encode(chunks[0], torch.Generator(device=device).manual_seed(cfg["seed"]))  # untimed first batch
    generator = torch.Generator(device=device).manual_seed(cfg["seed"])
    reset_peak_rss()
    parts, counts, tokens, times = [], [], 0, []
    for indices in chunks:
        ts.synchronize(device)
        t0 = time.perf_counter()
        rows, per_text, n_tokens = encode(indices, generator)
        ts.synchronize(device)
        times.append(time.perf_counter() - t0)
        parts.append(rows)
        counts.append(per_text)
        tokens += n_tokens
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
    arrays = {name: np.concatenate([p[name] for p in parts]) for name in encoding.widths()}
    out = Path(cfg["cache_dir"])
    np.save(out / "offsets.npy", offsets, allow_pickle=False)
    for name, array in arrays.items():
        np.save(out / f"{name}.npy", array, allow_pickle=False)
    n_rows = int(offsets[-1])
    build_s = sum(times)
    return {"build_tok_s": tokens / build_s, "build_rows_per_s": n_rows / build_s, "build_s": build_s,
            "teacher_tokens": tokens, "texts": len(data.pool), "cache_rows": n_rows,
            "n_columns": n_columns(kl, size), "stored_bytes_per_row": sum(a.nbytes for a in arrays.values()) / n_rows,
            "peak_rss_gb": (status_kib("VmHWM") or 0) * 1024 / GIB}


def load_cache(directory: Path, encoding: Encoding) -> CacheShard:
    """The saved rows of the texts, memory-mapped (as `TeacherCache.open` reads a shard)."""
    arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False)
              for name in encoding.widths()}
    return CacheShard(np.load(directory / "offsets.npy", allow_pickle=False), arrays)


def first_losses(distiller: ts.Distiller, pool: ts.SequencePool, indices: list[int], seed: int) -> dict[str, float]:
    """The loss terms of one batch (eval mode, a fixed masking seed), without a gradient."""
    distiller.runner.eval()
    with torch.no_grad():
        batch = distiller._batch(pool, indices)
        _, losses = distiller._losses(batch, torch.Generator().manual_seed(seed))
    return {name: float(value) for name, value in losses.items()}


def make_run(cfg: dict, size: ts.Size, data: ts.StepData, device: torch.device,
             mode: str) -> tuple[ts.Distiller, ts.SequencePool]:
    """(Distiller, dataset) of the trainer's step with the teacher in the loop (`mode` "online") or reading the
    cache saved under cfg["cache_dir"] ("cached", no teacher); the student is the same in both."""
    kl = data.plan.kl
    torch.manual_seed(cfg["seed"])
    student = ts.build_student(size, max(MAX_LEN, data.stats["max_len"]))
    pool, collator, teacher = data.pool, data.collator, None
    if mode == "cached":
        encoding = sample_encoding(kl, size, cfg["k"])
        pool = ts.SequencePool(pool.seqs, load_cache(Path(cfg["cache_dir"]), encoding))
        collator = ts.Collator(ts.PAD, ts.PAD, data.plan.t2s_input, size.student_vocab, encoding)
    else:
        teacher = teacher_model(size, data.stats, cfg["seed"])
    runner = ts.StudentRunner(student, mlm=data.tcfg.losses.alpha_mlm > 0, kl=kl)
    return ts.make_distiller(data.tcfg, device, runner, teacher, pool, collator, data.token_probs), pool


def measure_train(cfg: dict) -> dict:
    """One mode's step (cfg["mode"]) alone in its worker: peak memory (and its own timing), the first batch's
    losses."""
    device, size, data = setup(cfg)
    distiller, pool = make_run(cfg, size, data, device, cfg["mode"])
    losses = first_losses(distiller, pool, data.batches[0], cfg["seed"])

    def step(index: int) -> int:
        return ts.train_step(distiller, pool, data.batches[index % len(data.batches)])

    for index in range(cfg["warmup"]):
        step(index)
    m = ts.measure_steps(step, cfg, device, cfg["warmup"])
    result = {"tok_s": m["tokens"] / sum(m["times"]), "step_s": statistics.median(m["times"]),
              "step_s_all": m["times"], "student_tokens_per_step": m["tokens"] / len(m["times"]),
              "step_peak_mib": m["peak"] / 2**20, "peak_method": m["method"], "first_batch_losses": losses,
              "teacher_in_loop": distiller.teacher is not None, **data.stats}
    if device.type == "cuda":
        result.update(peak_rss_gb=(status_kib("VmHWM") or 0) * 1024 / GIB,
                      peak_device_gb=torch.cuda.max_memory_allocated(device) / GIB)
    else:
        result.update(peak_rss_gb=(m["resident"] + m["peak"]) / GIB, rss_before_gb=m["resident"] / GIB)
    return result


def measure_paired(cfg: dict) -> dict:
    """Online and cached steps alternately in one worker, on the same batches (each timed step of one mode next
    to one of the other, the first of a pair alternating), so that both see the same load: tokens/s of each."""
    device, size, data = setup(cfg)
    runs = {mode: make_run(cfg, size, data, device, mode) for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    tokens = dict.fromkeys(MODES, 0)
    for index in range(cfg["warmup"] + cfg["steps"]):
        batch = data.batches[index % len(data.batches)]
        for mode in (MODES if index % 2 == 0 else MODES[::-1]):
            distiller, pool = runs[mode]
            t0 = time.perf_counter()
            n = ts.train_step(distiller, pool, batch)
            ts.synchronize(device)
            if index >= cfg["warmup"]:
                times[mode].append(time.perf_counter() - t0)
                tokens[mode] += n
    return {mode: {"tok_s": tokens[mode] / sum(times[mode]), "step_s": statistics.median(times[mode]),
                   "step_s_all": times[mode]} for mode in MODES}


def run_alignment(cfg: dict, isolation: str, cache_dir: Path) -> dict:
    """Build, online and cached workers of one configuration, combined into one result."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = {key: cfg[key] for key in ("size_name", "size", "precision", "alignment", "label", "config",
                                       "reduce_map_mode")}
    parts = {}
    speed = functools.partial(ts.set_malloc, *ts.MALLOC_FOR_SPEED)  # the paired worker is timed only
    for part, fn in (("build", measure_build), ("online", measure_train), ("cached", measure_train),
                     ("paired", measure_paired)):
        if part in ("cached", "paired") and "error" in parts["build"]:
            parts[part] = {"error": "not run: the cache build failed"}
            continue
        t0 = time.perf_counter()
        parts[part] = {**run_isolated(fn, {**cfg, "mode": part, "cache_dir": str(cache_dir)}, isolation,
                                      child_setup=speed if part == "paired" else None),
                       "wall_s": time.perf_counter() - t0}
        p = parts[part]
        brief = (f"error {p['error']}" if "error" in p else f"{p['build_tok_s']:.0f} teacher tok/s" if part == "build"
                 else " vs ".join(f"{mode} {p[mode]['tok_s']:.0f}" for mode in MODES) + " tok/s" if part == "paired"
                 else f"{p['tok_s']:.0f} tok/s alone, peak RSS {p['peak_rss_gb']:.2f} GiB")
        print(f"{cfg['size_name']} {cfg['precision']} {cfg['label']} {part}: {brief} ({p['wall_s']:.1f} s)",
              file=sys.stderr, flush=True)
    entry.update(parts)
    errors = [f"{part}: {p['error']}" for part, p in parts.items() if "error" in p]
    if errors:
        return {**entry, "error": "; ".join(errors)}
    build, paired = parts["build"], parts["paired"]
    bytes_per_row = {label: make_encoding(name, k, dtype, build["n_columns"]).bytes_per_row()
                     for label, (name, k, dtype) in encodings(cfg["k"]).items()}
    return {**entry, "online_tok_s": paired["online"]["tok_s"], "cached_tok_s": paired["cached"]["tok_s"],
            "speedup": paired["cached"]["tok_s"] / paired["online"]["tok_s"], "build_tok_s": build["build_tok_s"],
            "bytes_per_row": bytes_per_row,
            "peak_rss_gb": {mode: parts[mode]["peak_rss_gb"] for mode in MODES}}


# ------------------------------------------------------------------------------------------ report


def check_targets(results: list[dict], k: int) -> list[dict]:
    """The speed-up targets per precision and the bytes-per-row target per alignment."""
    checks, seen = [], set()
    for r in results:
        if "skipped" in r:
            continue
        applies = r["size_name"] == TARGET_SIZE
        if r["alignment"] in SPEEDUP_TARGETS:
            goal = SPEEDUP_TARGETS[r["alignment"]]
            speedup = r.get("speedup")  # None: the configuration failed, the target is not met
            checks.append({"target": f"cached {r['alignment']} >= {goal:g}x online tokens/s", "size": r["size_name"],
                           "precision": r["precision"], "alignment": r["alignment"], "value": speedup,
                           "threshold": goal, "applies": applies, "met": speedup is not None and speedup >= goal,
                           **({"error": r["error"]} if "error" in r else {})})
        if "error" in r:
            continue
        sample = r["bytes_per_row"][f"sample{k}"]
        if (r["size_name"], r["alignment"]) not in seen:
            seen.add((r["size_name"], r["alignment"]))
            checks.append({"target": f"sample K={k} <= {SAMPLE_BYTES_TARGET} bytes per row", "size": r["size_name"],
                           "precision": None, "alignment": r["alignment"], "value": sample,
                           "threshold": SAMPLE_BYTES_TARGET, "applies": applies, "met": sample <= SAMPLE_BYTES_TARGET})
    return checks


def describe_checks(checks: list[dict]) -> str:
    lines = []
    for c in checks:
        verdict = ("PASS" if c["met"] else "FAIL") + ("" if c["applies"] else
                                                      f" (informative: the target is for the {TARGET_SIZE} size)")
        where = ", ".join(x for x in (c["size"], c["precision"], c["alignment"]) if x)
        if "error" in c:
            value = f"not measured ({c['error'][:120]})"
        else:
            value = f"{c['value']:.2f}x" if "x online" in c["target"] else f"{c['value']} bytes"
        lines.append(f"- {c['target']} ({where}): {value}: {verdict}")
    return "\n".join(lines)


def _num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def table(results: list[dict], k: int) -> str:
    labels = list(encodings(k))
    headers = ["size", "prec", "alignment", "online tok/s", "cached tok/s", "speedup", "online peak RSS GiB",
               "cached peak RSS GiB", "build tok/s", "KL online / cached", *[f"B/row {x}" for x in labels]]
    rows = []
    for r in results:
        if "error" in r or "skipped" in r:
            text = f"error: {r['error'][:100]}" if "error" in r else f"skipped: {r['skipped'][:60]}"
            rows.append([r["size_name"], r["precision"], r["label"], text, *[""] * (len(headers) - 4)])
            continue
        kl = (r["online"]["first_batch_losses"]["loss_ce"], r["cached"]["first_batch_losses"]["loss_ce"])
        rows.append([r["size_name"], r["precision"], r["label"], _num(r["online_tok_s"]), _num(r["cached_tok_s"]),
                     f"{r['speedup']:.2f}x", _num(r["peak_rss_gb"]["online"], 2), _num(r["peak_rss_gb"]["cached"], 2),
                     _num(r["build_tok_s"]), f"{kl[0]:.4f} / {kl[1]:.4f}",
                     *[_num(r["bytes_per_row"][x]) for x in labels]])
    return markdown_table(headers, rows, "lll" + "r" * (len(headers) - 3))


# ------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="real", help="comma-separated, from " + ", ".join(SIZE_NAMES))
    p.add_argument("--alignments", default=",".join(ALIGNMENTS), help="comma-separated, from " + ", ".join(ALIGNMENTS))
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated autocast precisions: fp32, bf16")
    p.add_argument("--k", type=int, default=16, help="draws per row of the sample cache (and K of top-k's row size)")
    p.add_argument("--reduce_map_mode", choices=tuple(ts.MODE_TAGS), default="logsumexp",
                   help="reduce_map scores: logsumexp of the pieces (--sum_probs, the paper's runs) or their sum")
    ts.add_step_arguments(p, "measurement")
    p.add_argument("--emulated_bf16", action="store_true", help="run bf16 even where the device emulates it")
    p.add_argument("--quick", action="store_true",
                   help="the real size with " + ", ".join(f"{k} {v}" for k, v in QUICK.items()) +
                        " (explicit options win)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", "--out", dest="json", default=str(ROOT / "bench" / "results" / "teacher_cache.json"),
                   help="JSON results")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    if a.quick:
        given = {arg.split("=")[0] for arg in argv}
        for key, value in QUICK.items():
            if f"--{key}" not in given:
                setattr(a, key, value)
    names = [x for x in a.sizes.split(",") if x]
    alignments = [x for x in a.alignments.split(",") if x]
    precisions = [x for x in a.precisions.split(",") if x]
    for what, chosen, allowed in (("sizes", names, SIZE_NAMES), ("alignments", alignments, ALIGNMENTS),
                                  ("precisions", precisions, ("fp32", "bf16"))):
        bad = [x for x in chosen if x not in allowed]
        if bad or not chosen:
            raise ts.BenchError(f"unknown --{what} {bad or chosen}; choose from {', '.join(allowed)}")
    if min(a.steps, a.batch_size, a.k) < 1 or a.warmup < 0 or a.seq_len < 3:
        raise ts.BenchError("--steps, --batch_size and --k must be at least 1, --warmup not negative, --seq_len >= 3")
    device = ts.choose_device(a.device)
    threads, isolation = ts.workers(a.threads, a.isolation, device)
    print(f"device {device}, {threads} threads, isolation {isolation}", file=sys.stderr, flush=True)
    emulated = "bf16" in precisions and not ts.native_bf16(device) and not a.emulated_bf16
    base = {"device": str(device), "threads": threads, "seed": a.seed, "isolated": isolation != "none", "k": a.k,
            "batch_size": a.batch_size, "seq_len": a.seq_len, "steps": a.steps, "warmup": a.warmup}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_teacher_cache_") as tmp:
        for name in names:
            for precision in precisions:
                for alignment in alignments:
                    mode = a.reduce_map_mode if alignment == "reduce_map" else None
                    label = f"reduce_map[{ts.MODE_TAGS[mode]}]/sparse" if mode else alignment
                    cfg = {**base, "size_name": name, "size": dataclasses.asdict(ts.SIZES[name]),
                           "precision": precision, "alignment": alignment, "label": label,
                           "config": ALIGNMENTS[alignment], "reduce_map_mode": mode}
                    if precision == "bf16" and emulated:
                        results.append({key: cfg[key] for key in ("size_name", "size", "precision", "alignment",
                                                                  "label")}
                                       | {"skipped": "bf16 is emulated on this device (--emulated_bf16 runs it)"})
                        continue
                    results.append(run_alignment(cfg, isolation, Path(tmp) / f"{name}_{precision}_{alignment}"))
    checks = check_targets(results, a.k)
    legend = (f"batch {a.batch_size} x {a.seq_len} teacher tokens, {a.warmup} untimed + {a.steps} timed steps, "
              f"{threads} threads on {device}; tokens/s = student tokens per second of the trainer's step "
              "(collate + forward + backward + AdamW), online = teacher in the loop, cached = KL from a sample "
              f"K={a.k} cache, no teacher, both timed alternately in one worker; speedup = cached / online; peak "
              "RSS = the resident set of a worker running that step alone, at its peak during the steps (models, "
              "optimizer state, data and cache included); build tok/s = teacher "
              "tokens per second of the cache build (teacher forward at the alignment's rows and columns + "
              "log_softmax + sample encode); KL = the KL term on the first batch before any update (cached: the "
              "sampled estimate); B/row = bytes per cached row (`Encoding.bytes_per_row()`) at the alignment's "
              "teacher columns")
    report = table(results, a.k) + "\n\n" + legend + "\n\nTargets:\n" + (describe_checks(checks) or "- (none measured)")
    summary = {"machine": machine_info(device=str(device), threads=threads, isolation=isolation,
                                       cuda_device=torch.cuda.get_device_name(device) if device.type == "cuda"
                                       else None),
               "params": {"sizes": {n: dataclasses.asdict(ts.SIZES[n]) for n in names}, "alignments": alignments,
                          "precisions": precisions, "k": a.k, "batch_size": a.batch_size, "seq_len": a.seq_len,
                          "steps": a.steps, "warmup": a.warmup, "reduce_map_mode": a.reduce_map_mode,
                          "alpha_ce": ts.ALPHA_CE, "alpha_mlm": ts.ALPHA_MLM, "temperature": ts.TEMPERATURE,
                          "quick": a.quick},
               "results": results, "targets": checks, "markdown": report}
    write_report(a.json, summary, report)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    run_main(main, ts.BenchError, ts.UserError)
