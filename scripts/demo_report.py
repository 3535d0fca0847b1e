"""The demo's report: `report.json`, `report.md` and PNG plots (loss curves from the TensorBoard event
files, accuracy and speed/size bars)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from kdcore.fsutil import atomic_write_json, atomic_write_text

MODELS = ("teacher", "student_kd", "student_kd_cached", "student_baseline")
LABELS = {"teacher": "teacher", "student_kd": "student (distilled)",
          "student_kd_cached": "student (distilled, teacher cache)", "student_baseline": "student (MLM only)"}
METRICS = ("params", "size_mb", "vocab_size", "latency_ms", "throughput_seq_s", "mlm_acc", "topic_acc",
           "topic_acc_std", "topic_acc_seeds")


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every TensorBoard event file under `logdir` (TFRecord framing:
    length, length crc, Event protobuf, data crc), sorted by step."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            start, end = pos + 12, pos + 12 + length
            if end + 4 > len(data):
                break
            event = Event.FromString(data[start:end])
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
            pos = end + 4
    return {tag: sorted(points) for tag, points in scalars.items()}


def summarise(models: dict[str, dict]) -> dict:
    """report.json: the per-model metrics plus compression and speed-up of the distilled student."""
    report = {name: {m: models[name].get(m) for m in METRICS} for name in MODELS}
    teacher, student = report["teacher"], report["student_kd"]
    report["compression"] = teacher["params"] / student["params"]
    report["speedup"] = student["throughput_seq_s"] / teacher["throughput_seq_s"]
    return report


def _plot_losses(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, scalars in curves.items():
        for ax, tag in zip(axes, ("train/loss_mlm", "valid/loss")):
            points = scalars.get(tag, [])
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], label=name, marker="." if len(points) < 30 else None)
    axes[0].set_title("student MLM loss (training)")
    axes[1].set_title("validation loss (each run's own objective)")
    for ax in axes:
        ax.set_xlabel("update")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_bars(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mlm_acc", "held-out MLM accuracy"), ("topic_acc", "topic accuracy"),
              ("params", "parameters"), ("throughput_seq_s", "throughput (seq/s, batch 32)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.8))
    colours = ["#4c72b0", "#55a868", "#8172b2", "#c44e52"]
    for ax, (metric, title) in zip(axes, panels):
        values = [report[m][metric] or 0 for m in MODELS]
        errors = [report[m].get(f"{metric}_std") or 0 for m in MODELS]
        ax.bar(range(len(MODELS)), values, color=colours, yerr=errors if any(errors) else None, capsize=4)
        ax.set_xticks(range(len(MODELS)), [LABELS[m].replace(" (", "\n(") for m in MODELS], fontsize=8)
        ax.set_title(title)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _topic(r: dict) -> str:
    """Mean topic accuracy, with ± the standard deviation over the seeds when there were several."""
    seeds = r.get("topic_acc_seeds") or []
    return _fmt(r["topic_acc"]) + (f" ± {r['topic_acc_std']:.3f}" if len(seeds) > 1 else "")


def topic_verdict(kd: dict, base: dict) -> str:
    """'better' / 'not better' for the distilled student's topic accuracy; a difference no larger than the
    larger seed standard deviation of the two is called 'within the seed spread'."""
    if kd.get("topic_acc") is None or base.get("topic_acc") is None:
        return "not measured"
    spread = max(kd.get("topic_acc_std") or 0.0, base.get("topic_acc_std") or 0.0)
    diff = kd["topic_acc"] - base["topic_acc"]
    if spread > 0 and abs(diff) <= spread:
        return f"within the seed spread of {spread:.3f}"
    return "better" if diff > 0 else "not better"


def markdown(report: dict, context: dict) -> str:
    """The report as Markdown (tables; the PNGs are linked)."""
    rows = ["| model | params | size (MB) | vocab | latency (ms, bs 1) | throughput (seq/s, bs 32) | MLM acc | "
            "topic acc |", "|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        r = report[name]
        rows.append(f"| {LABELS[name]} | {_fmt(r['params'])} | {_fmt(r['size_mb'], 2)} | {_fmt(r['vocab_size'])} | "
                    f"{_fmt(r['latency_ms'], 1)} | {_fmt(r['throughput_seq_s'], 1)} | {_fmt(r['mlm_acc'])} | "
                    f"{_topic(r)} |")
    kd, base, cached = report["student_kd"], report["student_baseline"], report["student_kd_cached"]
    verdict = [
        f"- compression (teacher / student parameters): **{report['compression']:.1f}x**; speed-up (student / "
        f"teacher throughput): **{report['speedup']:.1f}x**",
        f"- distilled vs baseline student: MLM accuracy {kd['mlm_acc']:.3f} vs {base['mlm_acc']:.3f} "
        f"({'better' if kd['mlm_acc'] > base['mlm_acc'] else 'not better'}), topic accuracy "
        f"{_topic(kd)} vs {_topic(base)} ({topic_verdict(kd, base)})",
        f"- distilled from the teacher cache (same seed, data and updates) vs with the teacher in the loop: MLM "
        f"accuracy {cached['mlm_acc']:.3f} vs {kd['mlm_acc']:.3f}, topic accuracy {_topic(cached)} vs {_topic(kd)} "
        f"({topic_verdict(cached, kd)})",
    ]
    cache = context.get("facts", {}).get("teacher_cache")
    if cache:
        verdict.append(f"- teacher cache ({cache['encoding']['name']}, K = {cache['encoding']['k']}): "
                       f"{cache['rows']:,} rows, {cache['bytes_per_row']} bytes per row, built in "
                       f"{cache['build_seconds']:.0f} s vs {cache['online_epoch_seconds']:.0f} s for one epoch of "
                       "the online distillation")
    lines = ["# Demo report: reduced-vocabulary distillation on Russian text", "",
             f"Mode: `{context.get('mode')}`; finished {context.get('finished')}; total time "
             f"{context.get('total_minutes', 0):.1f} min on {context.get('machine')}.", "",
             *verdict, "", *rows, "",
             "MLM accuracy: each model in its own tokenization (the students share theirs), same held-out "
             "sentences, 15% of content tokens masked with a fixed seed. Topic accuracy: fine-tuned on the "
             "fortunes-ru topic task (`distil-finetuned-en/`), dev split; mean ± standard deviation over the "
             "fine-tuning seeds when there are several. Speed: CPU, "
             f"{context.get('threads')} threads, sequence length 128.", "",
             "## Setup", "", "```json", json.dumps(context.get("setup", {}), indent=1, ensure_ascii=False), "```", "",
             "## Stages", "", "| stage | minutes |", "|---|---|",
             *[f"| {k} | {v / 60:.1f} |" for k, v in context.get("stage_seconds", {}).items()], "",
             "## Plots", "", "![losses](losses.png)", "", "![comparison](comparison.png)", ""]
    return "\n".join(lines)


def write_report(out: str | os.PathLike, models: dict[str, dict], curves: dict[str, dict], context: dict) -> dict:
    """Write report.json, report.md, losses.png and comparison.png into `out`; returns report.json."""
    out = Path(out)
    report = summarise(models)
    report["context"] = context
    _plot_losses(curves, out / "losses.png")
    _plot_bars(report, out / "comparison.png")
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(report, context))
    return report
