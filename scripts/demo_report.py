"""The demo's report: `report.json`, `report.md` and PNG plots (loss curves from the TensorBoard event files;
metric bars with error bars). Every student's topic accuracy is compared with the baseline's by a paired
bootstrap interval over the fine-tuning seeds (`demo_stats`), which gives its verdict."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from demo_stats import MIN_SEEDS, N_RESAMPLES, paired_bootstrap_ci, verdict
from kdcore.fsutil import atomic_write_json, atomic_write_text

BASELINE = "student_baseline"
METRICS = ("params", "size_mb", "vocab_size", "latency_ms", "throughput_seq_s", "mlm_acc", "word_acc", "word_pll",
           "topic_acc", "topic_acc_std", "topic_acc_seeds")
WORD_METRIC = ("Whole-word masked prediction: the held-out words are chosen once, the same (sentence, word) pairs for "
               "every model whatever its tokenizer (one word per held-out sentence of at most max_len - 2 "
               "characters, drawn with a fixed seed among its whitespace-delimited, punctuation-stripped, "
               "letters-only words, by character span). Each model tokenizes the sentence with its own fast "
               "tokenizer, finds the word's pieces through the character offsets and masks all of them at once. "
               "word PLL = mean over words of the sum of the log-probabilities (nats) of the word's original pieces; "
               "word acc = share of words whose every piece is the arg-max (a word with an [UNK] piece is wrong). "
               "A model that cuts words into more pieces has more factors in the sum, and the number of [MASK]s "
               "tells it the piece count: the PLL ranks models with the same tokenizer exactly and the others "
               "roughly; word acc is comparable across vocabularies.")


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


def compare(method: list[float], baseline: list[float]) -> dict:
    """topic_diff (mean paired difference), topic_diff_ci (paired bootstrap 95% interval, None with fewer than two
    seeds) and verdict of `method`'s per-seed accuracies against `baseline`'s (same seeds, same order)."""
    n = min(len(method), len(baseline))
    if len(method) != len(baseline) or n == 0:
        raise ValueError(f"topic accuracies of {len(method)} and {len(baseline)} seeds are not paired")
    ci = list(paired_bootstrap_ci(method, baseline)) if n >= 2 else None
    return {"topic_diff": sum(m - b for m, b in zip(method, baseline)) / n, "topic_diff_ci": ci,
            "verdict": verdict(ci, n)}


def summarise(models: dict[str, dict], minutes: float) -> dict:
    """report.json's numbers: `models` ({"teacher": ..., "student_<run>": ...}, the METRICS of each) with, for every
    student, topic_diff, topic_diff_ci and verdict against `student_baseline` (the baseline itself: the
    reference); compression and speed-up of the (common) student against the teacher; total minutes."""
    report = {name: {m: r.get(m) for m in METRICS} for name, r in models.items()}
    base = report[BASELINE]
    for name, r in report.items():
        if name == BASELINE:
            r.update(topic_diff=0.0, topic_diff_ci=[0.0, 0.0], verdict="reference")
        elif name.startswith("student_"):
            r.update(compare(r["topic_acc_seeds"], base["topic_acc_seeds"]))
    teacher = report["teacher"]
    return {"models": report, "compression": teacher["params"] / base["params"],
            "speedup": base["throughput_seq_s"] / teacher["throughput_seq_s"], "minutes": minutes}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_losses(curves: dict[str, dict[str, list[tuple[int, float]]]],
                 teacher_curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Teacher pretraining loss; every student's MLM loss and its whole objective, against the update."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    points = teacher_curves.get("train/loss_mlm", [])
    axes[0].plot([s for s, _ in points], [v for _, v in points], color="black")
    for name, scalars in curves.items():
        for ax, tag in zip(axes[1:], ("train/loss_mlm", "train/loss")):
            points = scalars.get(tag, [])
            ax.plot([s for s, _ in points], [v for _, v in points], label=name)
    for ax, title in zip(axes, ("teacher pretraining: MLM loss", "students: MLM loss (training)",
                                "students: whole objective (2.0 KD + 0.5 MLM, or MLM)")):
        ax.set_title(title)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:
        axes[2].legend(*axes[1].get_legend_handles_labels(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_bars(report: dict, labels: dict[str, str], path: Path) -> None:
    """One panel per metric, a bar per model; topic accuracy with its seed standard deviation, the difference to
    the baseline with its bootstrap interval."""
    plt = _pyplot()
    models = report["models"]
    names = list(labels)
    students = [n for n in names if n.startswith("student_")]
    panels = [("word_acc", "whole-word accuracy", names), ("word_pll", "whole-word PLL (nats/word)", names),
              ("mlm_acc", "MLM accuracy (own tokenization)", names),
              ("topic_acc", "topic accuracy (mean ± std over seeds)", names),
              ("topic_diff", "topic acc. - baseline (95% bootstrap CI)", students)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 5.5))
    for ax, (metric, title, rows) in zip(axes, panels):
        values = [models[n].get(metric) or 0.0 for n in rows]
        if metric == "topic_acc":
            errors = [models[n].get("topic_acc_std") or 0.0 for n in rows]
        elif metric == "topic_diff":
            cis = [models[n].get("topic_diff_ci") or [v, v] for n, v in zip(rows, values)]
            errors = [[v - lo for v, (lo, _) in zip(values, cis)], [hi - v for v, (_, hi) in zip(values, cis)]]
            ax.axhline(0.0, color="black", linewidth=0.8)
        else:
            errors = None
        colours = ["#555555" if n == "teacher" else "#4c72b0" if n == BASELINE else "#55a868" for n in rows]
        ax.bar(range(len(rows)), values, color=colours, yerr=errors, capsize=3)
        ax.set_xticks(range(len(rows)), [labels[n] for n in rows], rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
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


def _diff(r: dict) -> str:
    """The mean topic difference to the baseline with its interval."""
    if "topic_diff" not in r:
        return "-"
    ci = r.get("topic_diff_ci")
    return f"{r['topic_diff']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def table(report: dict, labels: dict[str, str]) -> list[str]:
    """The Markdown table: one row per model of `labels`, in its order."""
    n_seeds = len(report["models"][BASELINE].get("topic_acc_seeds") or [])
    rows = [f"| model | params | size (MB) | vocab | latency (ms, bs 1) | throughput (seq/s, bs 32) | word acc | "
            f"word PLL | MLM acc | topic acc ({n_seeds} seeds) | topic vs baseline [95% CI] | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, label in labels.items():
        r = report["models"][name]
        rows.append(f"| {label} | {_fmt(r['params'])} | {_fmt(r['size_mb'], 2)} | {_fmt(r['vocab_size'])} | "
                    f"{_fmt(r['latency_ms'], 1)} | {_fmt(r['throughput_seq_s'], 1)} | {_fmt(r['word_acc'])} | "
                    f"{_fmt(r['word_pll'], 2)} | {_fmt(r['mlm_acc'])} | {_topic(r)} | {_diff(r)} | "
                    f"{r.get('verdict', '-')} |")
    return rows


def findings(report: dict, labels: dict[str, str], context: dict) -> list[str]:
    """The answer in words: which methods beat the baseline on the topic task, on whole-word accuracy, and what
    the teacher cache changed."""
    models = report["models"]
    base = models[BASELINE]
    students = [n for n in labels if n.startswith("student_") and n != BASELINE]
    groups: dict[str, list[str]] = {}
    for name in students:
        groups.setdefault(models[name]["verdict"].split(" (")[0], []).append(labels[name])
    n_seeds = len(base.get("topic_acc_seeds") or [])
    lines = [f"- compression (teacher / student parameters): **{report['compression']:.1f}x**; speed-up (student / "
             f"teacher throughput): **{report['speedup']:.1f}x**"]
    for word in ("better", "no difference at 95%", "worse", "not measured"):
        if word in groups:
            lines.append(f"- topic accuracy vs the baseline, **{word}**: {', '.join(groups[word])}")
    if n_seeds < MIN_SEEDS:
        lines.append(f"- **the topic verdicts are weak**: {n_seeds} fine-tuning seed(s), fewer than {MIN_SEEDS}"
                     + (" (one seed measures no spread: not measured)" if n_seeds < 2 else ""))
    above = [labels[n] for n in students if models[n]["word_acc"] > base["word_acc"]]
    lines.append(f"- whole-word accuracy above the baseline's {base['word_acc']:.3f} "
                 f"({context.get('facts', {}).get('heldout_words', '?')} held-out words, one evaluation, no "
                 f"interval): {', '.join(above) or 'none'}; the teacher: {models['teacher']['word_acc']:.3f}")
    facts = context.get("facts", {})
    online = next((n for n in students if n.endswith("_online")), None)
    if online:
        cached = online[:-len("_online")]
        seconds = facts.get("train_seconds", {})
        build = facts.get("teacher_cache", {}).get(cached[len("student_"):], {})
        check = compare(models[cached]["topic_acc_seeds"], models[online]["topic_acc_seeds"])
        lines.append(f"- teacher cache ({labels[cached]} vs {labels[online]}): training "
                     f"{seconds.get(cached[len('student_'):], 0):.0f} s vs {seconds.get(online[len('student_'):], 0):.0f}"
                     f" s, cache built once in {build.get('build_seconds', 0):.0f} s ({build.get('rows', 0):,} rows, "
                     f"{build.get('bytes_per_row', 0)} bytes per row); whole-word accuracy "
                     f"{models[cached]['word_acc']:.3f} vs {models[online]['word_acc']:.3f}; topic accuracy "
                     f"{_topic(models[cached])} vs {_topic(models[online])} (cached - online: {_diff(check)}, "
                     f"{check['verdict']})")
    return lines


def markdown(report: dict, labels: dict[str, str], context: dict) -> str:
    """The report as Markdown (findings, the table, definitions, setup, stage times; the PNGs are linked)."""
    n_seeds = len(report["models"][BASELINE].get("topic_acc_seeds") or [])
    lines = ["# Demo report: which reduced-vocabulary distillation method works", "",
             f"Mode: `{context.get('mode')}`; finished {context.get('finished')}; total time "
             f"{report['minutes']:.1f} min on {context.get('machine')}.", "",
             *findings(report, labels, context), "", *table(report, labels), "",
             "## Definitions", "",
             f"- {WORD_METRIC}",
             "- MLM acc: each model in its own tokenization (the students share theirs), the same held-out "
             "sentences, 15% of content tokens masked with a fixed seed; not comparable between the teacher and the "
             "students.",
             f"- Topic acc: fine-tuned on the fortunes-ru topic task (`distil-finetuned-en/`), dev accuracy, "
             f"{n_seeds} seed(s); seed i gives every model the same data order and head initialisation. "
             f"Difference to the baseline: mean of the per-seed differences, 95% interval of a paired percentile "
             f"bootstrap over the seeds ({N_RESAMPLES:,} resamples, fixed generator seed). Verdict: better (interval "
             f"above 0), worse (below 0), else no difference at 95%; with fewer than {MIN_SEEDS} seeds the verdict is "
             "marked weak, with one seed it is not measured.",
             f"- Speed: CPU, {context.get('threads')} threads, sequence length 128, median of repeated runs. Every "
             "student is the same network; their speeds differ by measurement noise.",
             "- Every student: same config, same initialisation (the teacher-based one, except random init), same "
             "data, seed and number of updates; methods marked 'teacher cache' read the teacher's outputs from a "
             "cache built once (`sample` encoding, K = 16), ULD and DSKD run with the teacher online (no cache can "
             "serve them).", "",
             "## Setup", "", "```json",
             json.dumps({"setup": context.get("setup", {}), "methods": context.get("methods", {})}, indent=1,
                        ensure_ascii=False), "```", "",
             "## Stages", "", "| stage | minutes |", "|---|---|",
             *[f"| {k} | {v / 60:.1f} |" for k, v in context.get("stage_seconds", {}).items()], "",
             "## Plots", "", "![losses](losses.png)", "", "![comparison](comparison.png)", ""]
    return "\n".join(lines)


def write_report(out: str | os.PathLike, models: dict[str, dict], labels: dict[str, str], curves: dict[str, dict],
                 teacher_curves: dict[str, list], context: dict) -> dict:
    """Write report.json, report.md, losses.png and comparison.png into `out`; returns report.json's content.
    `labels`: report key -> row label, in row order; `curves`: row label -> TensorBoard scalars of a student."""
    out = Path(out)
    report = summarise(models, context.get("total_minutes", 0.0))
    report["context"] = context
    _plot_losses(curves, teacher_curves, out / "losses.png")
    _plot_bars(report, labels, out / "comparison.png")
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(report, labels, context))
    return report
