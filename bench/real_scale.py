"""Benchmark of the real pipeline and the trainer's real step at the user's size: a 120K-token teacher
vocabulary, a 12-layer BERT teacher, the paper's 3-layer DistilBERT student with a 30K vocabulary trained by
the pipeline, on the Russian corpus.

    .venv/bin/python bench/real_scale.py [--json bench/results/real_scale.json] [--sizes real|tiny]
        [--device auto|cpu|cuda] [--precision fp32 bf16 fp16] [--configs mlm,match,...] [--corpus FILE]
        [--lines N] [--teacher_lines N] [--max_len 128] [--batch_size 16] [--steps 3] [--warmup 1]
        [--threads N] [--isolation auto|fork|spawn|none] [--reduce_map_mode logsumexp|sum] [--emulated_bf16]
        [--work_dir DIR] [--quick]

Unlike bench/train_step.py (synthetic vocabularies and texts) everything here is made by the project's own
code, per size (`real`: teacher BertForMaskedLM 12 layers, hidden 768, 12 heads, FFN 3072, V_T 120000; student
`recipes/student_config.json`, DistilBERT 3 layers, dim 264, 12 heads, FFN 792, V_S 30000; `tiny`, for the
test: teacher 2 x 64, V_T 300, student 2 x 32, V_S 150):
1. corpus: the first `--lines` lines (real: 30,000; tiny: 1,500) of `--corpus`, by default the demo's corpus
   (runs/cache/corpus/ru_sentences.txt, made by preprocessing/get_corpus.py) at the real size and the tests'
   synthetic corpus (tests/synthetic.py `write_corpus`) at the tiny size;
2. teacher: a cased WordPiece tokenizer of V_T tokens (`train_teacher_tok.train_bert_tokenizer`, min frequency
   1) trained on the first `--teacher_lines` lines of the corpus (default: all of it; a teacher's vocabulary
   comes from more text than the distillation slice; where the text cannot give V_T pieces, the largest
   vocabulary it gives, and the JSON reports the size actually used) and a random-weight BertForMaskedLM of
   the size, saved together as an HF directory (`train_step.build_teacher`);
3. pipeline: `preprocessing/run_pipeline.py` in-process (its `build_parser` and `run`) with
   `--student_vocab_size V_S --student_config ... --n_shards 1 --max_len 128 --force`, in a worker of its own:
   its wall time and the worker's peak RSS (VmHWM, reset first; the process has torch and transformers loaded,
   as a run_pipeline.py process has);
4. the trainer's step, per configuration and precision, in a worker of its own, built as train.py's
   `train_process` builds it: train.py's parser with `--pipeline_dir` (which fills every artifact) and
   `TrainConfig.from_args`, the tokenizers and the shard index (fingerprints checked), `cfg.alignments(...)`
   (the KL alignment and the collator's t2s map), `open_shards` + `LmSeqsDataset` (train split),
   `load_student` (the pipeline's initialised student), `load_teacher`, the MLM masking probabilities from the
   pipeline's student counts, the `Collator`, `build_hidden_losses`, `StudentRunner` and the `Distiller` (by
   its own constructor, `train_step.make_distiller`); the batches are the first of the Distiller's own sampler
   (epoch 0, grouped by size) and one update is `train_step.train_step` (collate, losses under autocast,
   backward, clipping + AdamW; gradient accumulation 1). Every KL configuration trains 5 * KL (T 2) + 2 * MLM
   (train_step's weights).
Configurations (`--configs`): `mlm` (student MLM only, no teacher), `match`, `match/mined` (match positions, the
MinED column map: `--column_map mined`), `reduce`, `reduce_map/sparse` and
`reduce_map/my_index` (`--reduce_map_impl`; pieces combined by logsumexp, `--sum_probs`, as the paper's
reduce-map runs, unless `--reduce_map_mode sum`), and each hidden-state loss on top of match KL: `match+mse`
(`--alpha_mse 0.1`), `match+cos` (`--alpha_cos 0.1`), `match+contrastive` (`--alpha_contrastive 0.1
--n_negative_samples 64`) and `match+hyperbolic` (the same, then `hyperbolic --c 1.0`); `uld` (Universal Logit
Distillation at match positions: every teacher and every student column, sorted probability vectors compared by L1);
`dskd` (dual-space KD: cross-model attention, KL in both output spaces over every column, the projector's
cross-entropy; its projections are trained with the student).

Measurements per configuration (train_step's helpers): the first min(--steps, 4) batches of the sampler each
run once under `FlopCounterMode` (`train_step.count_flops`, with products that have a sparse operand counted
by their stored entries: `train_step.sparse_flop_mapping`); these are the warm-up, with more untimed steps up to
`--warmup`. Then `train_step.measure_steps` runs `--steps` steps cycling over those batches (CPU: a memory
phase, glibc mmap threshold 64 KiB, as from the worker's start, VmHWM reset first, then the timed phase; CUDA:
one phase). Student tokens/s = the batches' student tokens / the time of the timed steps; ms/step = their
median; peak = on CPU the worker's resident set at its peak during the steps (models, optimizer state, data
included: RSS before + the peak above it), on CUDA `torch.cuda.max_memory_allocated` during the steps (the
worker's host peak RSS is in the JSON); step peak = the part above what was resident before the steps;
achieved FLOP/s = the timed steps' FLOP (counted per batch) / their time, against the GEMM peak measured in
the same run (`train_step.gemm_peaks`). bf16 runs only where the device has native bf16
(`train_step.native_bf16`; `--emulated_bf16` forces it).

`--quick`: the real size with batch 8, 2 timed steps (1 warm-up per batch) and shorter GEMM timings; every
configuration and precision still runs, nothing is skipped (about 2 minutes on 2 CPU cores; the default run
about 5). Workers are forked on CPU, spawned on CUDA (`--isolation none`: in-process, for the test; its memory
readings are not meaningful).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
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
from bench.parity import read_lines  # noqa: E402
from kdcore.tokenizer_utils import MAX_LEN  # noqa: E402

torch = ts.torch

SIZES = {"real": ts.SIZES["real"], "tiny": ts.Size(2, 64, 2, 256, 300, 2, 32, 2, 64, 150)}
DEFAULT_LINES = {"real": 30000, "tiny": 1500}
DEMO_CORPUS = ROOT / "runs" / "cache" / "corpus" / "ru_sentences.txt"
STUDENT_RECIPE = ROOT / "recipes" / "student_config.json"
MATCH = ["--align_logits", "match"]
CONTRASTIVE = [*MATCH, "--alpha_contrastive", "0.1", "--n_negative_samples", "64"]
CONFIGS = {
    "mlm": [],
    "match": MATCH,
    "match/mined": [*MATCH, "--column_map", "mined"],
    "reduce": ["--align_logits", "reduce"],
    "reduce_map/sparse": ["--align_logits", "reduce_map", "--reduce_map_impl", "sparse"],
    "reduce_map/my_index": ["--align_logits", "reduce_map", "--reduce_map_impl", "my_index"],
    "match+mse": [*MATCH, "--alpha_mse", "0.1"],
    "match+cos": [*MATCH, "--alpha_cos", "0.1"],
    "match+contrastive": CONTRASTIVE,
    "match+hyperbolic": [*CONTRASTIVE, "hyperbolic", "--c", "1.0"],
    "uld": ["--align_logits", "uld"],
    "dskd": ["--align_logits", "dskd"],
}
"""configuration -> its train.py arguments (after the common ones; `mlm` runs without a teacher)."""
MAX_BATCHES = 4
"""Distinct batches per configuration (the timed steps cycle over them)."""
QUICK = {"batch_size": 8, "steps": 2, "warmup": 1}
MIB = 2**20
EMULATED = "bf16 is emulated on this device (--emulated_bf16 runs it)"


# ------------------------------------------------------------------------------------------ set-up


def write_inputs(cfg: dict) -> dict:
    """The corpus slice, the student config (`recipes/student_config.json` with the size's shape) and the
    text the teacher's tokenizer is trained on, under cfg["work"]; returns the corpus and line counts."""
    work, size = Path(cfg["work"]), ts.Size(**cfg["size"])
    work.mkdir(parents=True, exist_ok=True)
    if cfg["corpus"] is None:
        from tests.synthetic import write_corpus

        corpus = write_corpus(work / "synthetic_corpus.txt", cfg["lines"], seed=cfg["seed"])
    else:
        corpus = Path(cfg["corpus"])
    if not corpus.is_file():
        raise ts.BenchError(f"corpus {corpus} does not exist; build it with `python "
                            f"preprocessing/get_corpus.py --out {DEMO_CORPUS.parent}` or pass --corpus FILE")
    lines = read_lines(corpus, cfg["lines"])
    teacher_lines = read_lines(corpus, cfg["teacher_lines"] or sys.maxsize)
    for name, texts in (("corpus.txt", lines), ("teacher_corpus.txt", teacher_lines)):
        (work / name).write_text("".join(line + "\n" for line in texts), encoding="utf-8")
    config = json.loads(STUDENT_RECIPE.read_text(encoding="utf-8"))
    config.update(n_layers=size.student_layers, dim=size.student_dim, n_heads=size.student_heads,
                  hidden_dim=size.student_ffn)
    (work / "student_config.json").write_text(json.dumps(config), encoding="utf-8")
    return {"corpus": str(corpus), "lines": len(lines), "teacher_tokenizer_lines": len(teacher_lines)}


def build_teacher_dir(cfg: dict) -> dict:
    """Train the teacher's tokenizer and save it with a random BertForMaskedLM of the size (in a worker)."""
    from transformers.utils import logging as hf_logging

    from train_teacher_tok import train_bert_tokenizer

    hf_logging.disable_progress_bar()
    torch.set_num_threads(cfg["threads"])
    work, size = Path(cfg["work"]), ts.Size(**cfg["size"])
    t0 = time.perf_counter()
    stats = train_bert_tokenizer([str(work / "teacher_corpus.txt")], size.teacher_vocab,
                                 str(work / "teacher"), min_frequency=1, force=True)
    tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.manual_seed(cfg["seed"] + 1)
    teacher = ts.build_teacher(dataclasses.replace(size, teacher_vocab=stats["vocab_size"]), MAX_LEN)
    teacher.save_pretrained(str(work / "teacher"))
    return {"teacher_vocab": stats["vocab_size"], "tokenizer_s": tokenizer_s,
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "model_build_and_save_s": time.perf_counter() - t0}


def run_pipeline(cfg: dict) -> dict:
    """preprocessing/run_pipeline.py through its parser and `run` (in a worker): wall time, peak RSS, the
    manifest's per-step seconds and statistics."""
    from run_pipeline import build_parser, run

    torch.set_num_threads(cfg["threads"])
    work = Path(cfg["work"])
    args = build_parser().parse_args([
        "--teacher_name", str(work / "teacher"), "--corpus", str(work / "corpus.txt"),
        "--student_vocab_size", str(cfg["size"]["student_vocab"]),
        "--student_config", str(work / "student_config.json"), "--out_dir", str(work / "pipeline"),
        "--max_len", str(cfg["max_len"]), "--n_shards", "1", "--num_workers", str(cfg["threads"]),
        "--seed", str(cfg["seed"]), "--force"])
    reset_peak_rss()
    t0 = time.perf_counter()
    manifest = run(args, log=lambda *_: None)
    wall = time.perf_counter() - t0
    steps = {name: {"seconds": s["seconds"], "stats": s["stats"]} for name, s in manifest["steps"].items()}
    kept = steps["prepare_lm_seqs"]["stats"]
    return {"wall_s": wall, "peak_rss_mib": (status_kib("VmHWM") or 0) / 1024, "steps": steps,
            "student_vocab": steps["train_reduced_tok"]["stats"]["vocab_size"], "sequences": kept["kept"],
            "teacher_tokens": kept["teacher_tokens"], "student_tokens": kept["student_tokens"]}


def prepare_size(name: str, base: dict, a: argparse.Namespace, isolation: str, work: Path) -> dict:
    """Corpus slice, teacher and pipeline run of one size (the last two in workers)."""
    corpus = a.corpus or (str(DEMO_CORPUS) if name == "real" else None)
    cfg = {**base, "size": dataclasses.asdict(SIZES[name]), "work": str(work), "corpus": corpus,
           "lines": a.lines or DEFAULT_LINES[name], "teacher_lines": a.teacher_lines, "max_len": a.max_len}
    out = {"requested": cfg["size"], "inputs": write_inputs(cfg)}
    for part, fn in (("teacher", build_teacher_dir), ("pipeline", run_pipeline)):
        t0 = time.perf_counter()
        out[part] = run_isolated(fn, cfg, isolation)
        print(f"{name} {part}: {out[part].get('error') or 'done'} ({time.perf_counter() - t0:.1f} s)",
              file=sys.stderr, flush=True)
        if "error" in out[part]:
            return {**out, "error": f"{part}: {out[part]['error']}"}
    return out


# ------------------------------------------------------------------------------------------ the step


def trainer_argv(cfg: dict) -> list[str]:
    """train.py's command line of the configuration (the pipeline directory fills every artifact)."""
    work = Path(cfg["work"])
    argv = ["--pipeline_dir", str(work / "pipeline"), "--dump_path", str(work / "dump"),
            "--precision", cfg["precision"], "--device", torch.device(cfg["device"]).type,
            "--seed", str(cfg["seed"]), "--batch_size", str(cfg["batch_size"]),
            "--gradient_accumulation_steps", "1", "--warmup_prop", "0", "--alpha_mlm", str(ts.ALPHA_MLM)]
    if cfg["config"] != "mlm":
        argv += ["--teacher_name", str(work / "teacher"), "--alpha_ce", str(ts.ALPHA_CE),
                 "--temperature", str(ts.TEMPERATURE)]
    if cfg["config"].startswith("reduce_map") and cfg["reduce_map_mode"] == "logsumexp":
        argv.append("--sum_probs")
    return argv + CONFIGS[cfg["config"]]  # last: the hyperbolic sub-command ends the command line


def build_step(cfg: dict, device: torch.device) -> tuple[ts.Distiller, ts.LmSeqsDataset, dict]:
    """(Distiller, training data, facts) of the configuration: train.py's own factory (`train.build_run`) on the
    configuration's command line, then train_step's `make_distiller` over the training data (single process)."""
    from kdcore.config import TrainConfig
    from kdcore.shard_io import read_index
    from train import build_parser, build_run
    from utils import DistInfo

    tcfg = TrainConfig.from_args(build_parser().parse_args(trainer_argv(cfg)))
    run = build_run(tcfg, DistInfo(rank=0, world_size=1, local_rank=0, device=device, backend=None))
    distiller = ts.make_distiller(tcfg, device, run.runner, run.teacher, run.train_data, run.collator,
                                  run.token_probs, run.special)
    kl, teacher, hidden = run.plan.kl, run.teacher, run.hidden
    facts = {"kl": kl.describe() if kl is not None else None,
             "approximation": kl.approximation() if kl is not None else None,
             "reduce_map_impl": getattr(kl, "impl", None),
             "teacher_vocab": read_index(tcfg.data.binarized_data_folder)["teacher_vocab_size"],
             "student_vocab": len(run.s_tok), "train_sequences": len(run.train_data),
             "student_params": sum(p.numel() for p in run.student.parameters()),
             "teacher_params": sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0,
             "hidden_params": sum(p.numel() for p in hidden.parameters() if p.requires_grad) if hidden else 0,
             "aligner_params": sum(p.numel() for p in run.runner.aligner.parameters()) if run.runner.aligner else 0}
    return distiller, run.train_data, facts


def measure_config(cfg: dict) -> dict:
    """Build one configuration's step from the pipeline's output and measure it (in the calling process)."""
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    t0 = time.perf_counter()
    distiller, data, facts = build_step(cfg, device)
    batches = distiller.sampler.batches(0)[:min(cfg["steps"], MAX_BATCHES)]
    setup_s = time.perf_counter() - t0

    def step(index: int) -> int:
        return ts.train_step(distiller, data, batches[index % len(batches)])

    # the warm-up: each batch once under FlopCounterMode, then untimed steps up to --warmup
    counts = [ts.count_flops(step, index) for index in range(len(batches))]
    flop = [c["flop_per_step"] for c in counts]
    index = len(batches)
    while index < cfg["warmup"]:
        step(index)
        index += 1
    m = ts.measure_steps(step, cfg, device, index)
    times, n = m["times"], len(m["times"])
    timed = [(index + k) % len(batches) for k in range(cfg["steps"])]
    timed_flop = sum(flop[b] for b in timed)
    teacher_tokens = sum(int(data.lengths("teacher")[batches[b]].sum()) for b in timed)
    result = {"tokens_per_s": m["tokens"] / sum(times), "step_s": statistics.median(times),
              "step_s_all": times, "student_tokens_per_step": m["tokens"] / n,
              "teacher_tokens_per_step": teacher_tokens / n, "batches": len(batches), "flop_per_batch": flop,
              "flop_per_step": timed_flop / n, "achieved_flop_per_s": timed_flop / sum(times),
              "flop_by_op_first_batch": counts[0]["flop_by_op"], "step_peak_mib": m["peak"] / MIB,
              "resident_before_mib": m["resident"] / MIB, "peak_method": m["method"], "setup_s": setup_s,
              **facts}
    if device.type == "cuda":
        result.update(peak_mib=torch.cuda.max_memory_allocated(device) / MIB,
                      host_peak_rss_mib=(status_kib("VmHWM") or 0) / 1024)
    else:
        result["peak_mib"] = (m["resident"] + m["peak"]) / MIB
    return result


def run_config(cfg: dict, isolation: str, gemm: dict) -> dict:
    """One configuration in its worker, with its share of the GEMM peak (CPU: freed memory leaves the
    resident set from the worker's start: none is cached when `measure_steps`' memory phase begins)."""
    clean_heap = None
    if torch.device(cfg["device"]).type == "cpu":
        clean_heap = functools.partial(ts.set_malloc, *ts.MALLOC_FOR_MEMORY)
    t0 = time.perf_counter()
    r = run_isolated(measure_config, cfg, isolation, child_setup=clean_heap)
    r["wall_s"] = time.perf_counter() - t0
    if "achieved_flop_per_s" in r:
        r["gemm_peak_fraction"] = r["achieved_flop_per_s"] / gemm[cfg["precision"]]["flop_per_s"]
    brief = (f"error {r['error']}" if "error" in r else f"{r['tokens_per_s']:.0f} tok/s, "
             f"{r['step_s'] * 1e3:.0f} ms/step, peak {r['peak_mib']:.0f} MiB")
    print(f"{cfg['size_name']} {cfg['precision']} {cfg['config']}: {brief} ({r['wall_s']:.1f} s)",
          file=sys.stderr, flush=True)
    return r


# ------------------------------------------------------------------------------------------ report


def table(results: list[dict]) -> str:
    """The Markdown table of the step measurements (one row per size, precision and configuration)."""
    headers = ["size", "prec", "config", "student tok/s", "ms/step", "peak MiB", "step peak MiB",
               "GFLOP/step", "GFLOP/s", "% GEMM peak"]
    rows = []
    for r in results:
        if "error" in r or "skipped" in r:
            text = f"error: {r['error'][:100]}" if "error" in r else f"skipped: {r['skipped'][:80]}"
            rows.append([r["size_name"], r["precision"], r["config"], text, *[""] * (len(headers) - 4)])
            continue
        rows.append([r["size_name"], r["precision"], r["config"], ts.fmt(r["tokens_per_s"], 0),
                     ts.fmt(r["step_s"] * 1e3), ts.fmt(r["peak_mib"], 0), ts.fmt(r["step_peak_mib"], 0),
                     ts.fmt(r["flop_per_step"] / 1e9, 2), ts.fmt(r["achieved_flop_per_s"] / 1e9),
                     ts.fmt(100 * r["gemm_peak_fraction"])])
    return markdown_table(headers, rows, "lll" + "r" * (len(headers) - 3))


def describe_size(name: str, s: dict) -> str:
    """One paragraph per size: what was built and what the pipeline cost."""
    if "error" in s:
        return f"- {name}: set-up failed: {s['error']}"
    size, setup, pipe, inputs = s["requested"], s["teacher"], s["pipeline"], s["inputs"]
    vocab = f"V_T {setup['teacher_vocab']:,}"
    if setup["teacher_vocab"] != size["teacher_vocab"]:
        vocab += f" (of {size['teacher_vocab']:,} requested: all the text gives)"
    return (f"- {name}: {inputs['lines']:,} corpus lines ({Path(inputs['corpus']).name}); teacher "
            f"{size['teacher_layers']}x{size['teacher_hidden']} ({setup['teacher_params'] / 1e6:.1f}M "
            f"parameters), {vocab} (tokenizer trained on {inputs['teacher_tokenizer_lines']:,} lines in "
            f"{setup['tokenizer_s']:.1f} s); student {size['student_layers']}x{size['student_dim']}, V_S "
            f"{pipe['student_vocab']:,}; run_pipeline.py: {pipe['wall_s']:.1f} s, peak RSS "
            f"{pipe['peak_rss_mib']:,.0f} MiB, {pipe['sequences']:,} sequences, {pipe['teacher_tokens']:,} "
            f"teacher / {pipe['student_tokens']:,} student tokens")


def legend(a: argparse.Namespace, results: list[dict], gemm: dict, threads: int, device: torch.device) -> str:
    """What the table's columns mean, with the batches' mean token counts and the GEMM peaks."""
    ok = [r for r in results if "tokens_per_s" in r]
    per_step = ""
    if ok:
        student = statistics.mean(r["student_tokens_per_step"] for r in ok)
        teacher = statistics.mean(r["teacher_tokens_per_step"] for r in ok)
        per_step = f" ({student:.0f} student / {teacher:.0f} teacher tokens per step on average)"
    peaks = ", ".join(f"{p} {g['flop_per_s'] / 1e9:.0f} GFLOP/s" for p, g in gemm.items())
    peak = "max allocated on the device" if device.type == "cuda" else "the worker's peak RSS"
    return (f"batch {a.batch_size} texts: the first min(steps, {MAX_BATCHES}) batches of the trainer's own "
            f"length-grouped sampler, the same for every configuration{per_step}, {a.steps} timed steps; "
            f"{threads} threads on {device}; student tok/s = student tokens per second of the trainer's step "
            "(collate + forward + backward + clipping + AdamW), ms/step = median; peak MiB = "
            f"{peak} during the steps (models, optimizer state and data included), step peak = the part "
            "above what was resident before them; GFLOP counted by FlopCounterMode per batch; % GEMM peak = "
            f"achieved FLOP/s over the best square matmul of the same run ({peaks}); reduce_map scored by "
            f"{a.reduce_map_mode}")


# ------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="real", help="comma-separated, from " + ", ".join(SIZES))
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from " + ", ".join(CONFIGS))
    p.add_argument("--precision", nargs="+", choices=tuple(ts.PRECISIONS), default=["fp32", "bf16"],
                   help="autocast precisions")
    p.add_argument("--corpus", help=f"one text per line (default: {DEMO_CORPUS.relative_to(ROOT)} at the "
                   "real size, the tests' synthetic corpus at the tiny size)")
    p.add_argument("--lines", type=int, help="corpus lines given to the pipeline (default: " + ", ".join(
        f"{k} {v}" for k, v in DEFAULT_LINES.items()) + ")")
    p.add_argument("--teacher_lines", type=int, default=0,
                   help="corpus lines the teacher's tokenizer is trained on (0: all)")
    p.add_argument("--max_len", type=int, default=128, help="run_pipeline.py --max_len")
    p.add_argument("--reduce_map_mode", choices=tuple(ts.MODE_TAGS), default="logsumexp",
                   help="reduce_map scores: logsumexp of the pieces (--sum_probs, the paper's runs) or their "
                   "sum")
    ts.add_step_arguments(p, "configuration", seq_len=False, batch_size=16)
    p.add_argument("--emulated_bf16", action="store_true", help="run bf16 even where the device emulates it")
    p.add_argument("--quick", action="store_true", help="the real size with " + ", ".join(
        f"{k} {v}" for k, v in QUICK.items()) + " and shorter GEMM timings (explicit options win)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work_dir", help="where the corpus slice, teacher and pipeline output go, kept "
                   "afterwards (default: a temporary directory)")
    p.add_argument("--json", "--out", dest="json", help="JSON results",
                   default=str(ROOT / "bench" / "results" / "real_scale.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    if a.quick:
        ts.apply_quick(a, argv, QUICK)
    names = [x for x in a.sizes.split(",") if x]
    configs = [x for x in a.configs.split(",") if x]
    precisions = list(dict.fromkeys(a.precision))
    for what, chosen, allowed in (("sizes", names, SIZES), ("configs", configs, CONFIGS)):
        bad = [x for x in chosen if x not in allowed]
        if bad or not chosen:
            raise ts.BenchError(f"unknown --{what} {bad or chosen}; choose from {', '.join(allowed)}")
    if min(a.steps, a.batch_size, a.max_len) < 1 or (a.lines is not None and a.lines < 1) or a.warmup < 0 \
            or a.teacher_lines < 0:
        raise ts.BenchError("--steps, --batch_size, --max_len and --lines must be at least 1, --warmup and "
                            "--teacher_lines not negative")
    device = ts.choose_device(a.device)
    threads, isolation = ts.workers(a.threads, a.isolation, device)
    print(f"device {device}, {threads} threads, isolation {isolation}", file=sys.stderr, flush=True)
    base = {"device": str(device), "threads": threads, "seed": a.seed, "isolated": isolation != "none"}
    gemm = ts.gemm_peaks(precisions, base, isolation, a.quick)
    emulated = "bf16" in precisions and not ts.native_bf16(device) and not a.emulated_bf16
    sizes, results = {}, []
    with tempfile.TemporaryDirectory(prefix="bench_real_scale_") as tmp:
        root = Path(a.work_dir) if a.work_dir else Path(tmp)
        for name in names:
            sizes[name] = prepare_size(name, base, a, isolation, root / name)
            for precision, config in [(p, c) for p in precisions for c in configs]:
                entry = {"size_name": name, "precision": precision, "config": config}
                if "error" in sizes[name]:
                    results.append({**entry, "error": f"not run: {sizes[name]['error']}"})
                elif precision == "bf16" and emulated:
                    results.append({**entry, "skipped": EMULATED})
                else:
                    cfg = {**base, **entry, "work": str(root / name), "batch_size": a.batch_size,
                           "steps": a.steps, "warmup": a.warmup, "reduce_map_mode": a.reduce_map_mode}
                    results.append({**entry, **run_config(cfg, isolation, gemm)})
    report = ("Sizes:\n" + "\n".join(describe_size(n, s) for n, s in sizes.items()) + "\n\n" + table(results)
              + "\n\n" + legend(a, results, gemm, threads, device))
    cuda_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    summary = {"machine": machine_info(device=str(device), threads=threads, isolation=isolation,
                                       cuda_device=cuda_name),
               "params": {"sizes": names, "configs": configs, "precisions": precisions,
                          "batch_size": a.batch_size, "steps": a.steps, "warmup": a.warmup,
                          "max_len": a.max_len,
                          "reduce_map_mode": a.reduce_map_mode, "alpha_ce": ts.ALPHA_CE,
                          "alpha_mlm": ts.ALPHA_MLM, "temperature": ts.TEMPERATURE, "quick": a.quick},
               "sizes": sizes, "gemm_peak": gemm, "results": results, "markdown": report}
    write_report(a.json, summary, report)
    return 1 if any("error" in r for r in results) or any("error" in s for s in sizes.values()) else 0


if __name__ == "__main__":
    run_main(main, ts.BenchError, ts.UserError)
