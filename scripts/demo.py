"""The main job: the paper's pipeline end to end on real Russian text, on a CPU, with a report.

    ./demo.sh [--quick] [--out runs/demo]      (or: .venv/bin/python scripts/demo.py ...)

Stages (each prints one line with its elapsed time; its commands' output goes to OUT/logs/<stage>.log):
 1. corpus      Russian sentences and topic-labelled fortunes from Debian packages (get_corpus.py), split
                into training text and held-out sentences;
 2. teacher     a teacher WordPiece tokenizer and a small BERT pretrained with train.py (MLM only, uniform
                masking as in BERT); cached
                under --cache_dir by configuration, so a second run reuses it;
 3. pipeline    run_pipeline.py with a reduced student vocabulary; the student initialised from the teacher;
 4. distil      ./train_multi_gpu.sh (2 CPU processes): KL (T=2, alpha 2.0, match alignment) + MLM 0.5;
 5. teacher_cache  the teacher-output cache of that alignment (cache_teacher.py, `sample` encoding, K = 16),
                its build time against one epoch of the online distillation;
 6. distil_cached  the same distillation (seed, data, updates) reading the cache instead of the teacher;
 7. baseline    the same student, initialisation, data and number of updates, MLM only;
 8. evaluate    held-out MLM accuracy, parameters, size on disk, CPU latency and throughput;
 9. topics      topic classification of fortunes-ru texts with distil-finetuned-en/ (each model fine-tuned
                the same way, once per seed: 3 in full mode), dev accuracy: mean and spread over the seeds;
10. report      OUT/report.md, OUT/report.json, OUT/losses.png, OUT/comparison.png.
A failing stage stops the demo with the stage's name and its log file.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from kdcore.errors import UserError, run_cli  # noqa: E402
from kdcore.fsutil import atomic_write_json, atomic_write_text  # noqa: E402


@dataclass
class Setup:
    """Sizes and budgets of one demo mode."""

    train_sentences: int
    heldout_sentences: int
    teacher_vocab: int
    teacher_layers: int
    teacher_hidden: int
    teacher_heads: int
    teacher_steps: int
    student_vocab: int
    student_layers: int
    student_dim: int
    student_heads: int
    student_ffn: int
    kd_steps: int
    batch_size: int = 32
    max_len: int = 128
    n_topics: int = 6
    topic_epochs: int = 3
    topic_seeds: int = 3
    topic_max_per_class: int = 600
    speed_repeats: int = 10
    topic_max_len: int = 128
    kd_flags: list[str] = field(default_factory=lambda: [
        "--alpha_ce", "2.0", "--alpha_mlm", "0.5", "--temperature", "2", "--align_logits", "match"])


MODES = {
    "quick": Setup(train_sentences=12000, heldout_sentences=400, teacher_vocab=3000, teacher_layers=2,
                   teacher_hidden=128, teacher_heads=2, teacher_steps=150, student_vocab=800, student_layers=2,
                   student_dim=64, student_heads=2, student_ffn=256, kd_steps=80, topic_epochs=1,
                   topic_seeds=1, topic_max_per_class=120, speed_repeats=3, topic_max_len=64),
    "full": Setup(train_sentences=0, heldout_sentences=2000, teacher_vocab=16000, teacher_layers=3,
                  teacher_hidden=192, teacher_heads=4, teacher_steps=5000, student_vocab=4000, student_layers=2,
                  student_dim=64, student_heads=4, student_ffn=256, kd_steps=1200),
}


class StageFailed(Exception):
    def __init__(self, stage: str, log: Path, detail: str):
        super().__init__(f"demo failed at stage '{stage}': {detail}; see {log}")


class Demo:
    """Runs the stages; every external command's output goes to the current stage's log."""

    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.mode = "quick" if a.quick else "full"
        self.setup = MODES[self.mode]
        self.out = Path(a.out).resolve()
        self.cache = Path(a.cache_dir).resolve()
        self.logs = self.out / "logs"
        self.stage = ""
        self.stage_seconds: dict[str, float] = {}
        self.py = sys.executable
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": str(ROOT), "RVKD_NO_TQDM": "1", "CUDA_VISIBLE_DEVICES": "",
                    "OMP_NUM_THREADS": str(a.threads)}

    # ----- plumbing -------------------------------------------------------------------------------------
    @property
    def log(self) -> Path:
        return self.logs / f"{self.stage}.log"

    def sh(self, *cmd: str | Path, env: dict | None = None) -> None:
        """Run a command, appending its output to the stage log; a failure stops the demo."""
        cmd = [str(c) for c in cmd]
        with self.log.open("a", encoding="utf-8") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.run(cmd, cwd=ROOT, env={**self.env, **(env or {})}, stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise StageFailed(self.stage, self.log, f"`{Path(cmd[1]).name if len(cmd) > 1 else cmd[0]}` exited with "
                                                    f"{proc.returncode}")

    def run_stage(self, name: str, fn) -> None:
        self.stage = name
        start = time.perf_counter()
        print(f"[demo] {name} ...", flush=True)
        try:
            fn()
        except StageFailed:
            raise
        except Exception as err:  # any failure inside a stage is reported with the stage and its log
            with self.log.open("a", encoding="utf-8") as fh:
                fh.write(f"{type(err).__name__}: {err}\n")
            raise StageFailed(name, self.log, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") \
                from err
        seconds = time.perf_counter() - start
        self.stage_seconds[name] = round(seconds, 1)
        print(f"[demo] {name} done in {seconds:.0f} s", flush=True)

    # ----- stages ---------------------------------------------------------------------------------------
    def corpus(self) -> None:
        corpus_dir = self.cache / "corpus"
        if not (corpus_dir / "ru_sentences.txt").is_file() or not (corpus_dir / "topics.tsv").is_file():
            self.sh(self.py, ROOT / "preprocessing" / "get_corpus.py", "--out", corpus_dir)
        lines = (corpus_dir / "ru_sentences.txt").read_text(encoding="utf-8").splitlines()
        s = self.setup
        heldout = lines[::max(1, len(lines) // s.heldout_sentences)][:s.heldout_sentences]
        held = set(heldout)
        train = [line for line in lines if line not in held]
        if s.train_sentences:
            train = train[::max(1, len(train) // s.train_sentences)][:s.train_sentences]
        data = self.out / "data"
        data.mkdir(parents=True, exist_ok=True)
        atomic_write_text(data / "train.txt", "\n".join(train) + "\n")
        atomic_write_text(data / "heldout.txt", "\n".join(heldout) + "\n")
        self.write_topic_task(corpus_dir / "topics.tsv", data / "topics")
        self.facts["corpus"] = {"train_sentences": len(train), "heldout_sentences": len(heldout),
                                "train_chars": sum(map(len, train))}

    def write_topic_task(self, tsv: Path, out: Path) -> None:
        """The `n_topics` most frequent topics, balanced to at most `topic_max_per_class` texts each, split
        80/20 into train.tsv/dev.tsv in the single-sentence GLUE layout (sentence<TAB>label, header)."""
        import random

        rows: dict[str, list[str]] = {}
        for line in tsv.read_text(encoding="utf-8").splitlines()[1:]:
            text, _, topic = line.rpartition("\t")
            rows.setdefault(topic, []).append(text.replace("\t", " "))
        s = self.setup
        topics = sorted(rows, key=lambda t: (-len(rows[t]), t))[:s.n_topics]
        rng = random.Random(0)
        train, dev = [], []
        for label, topic in enumerate(topics):
            texts = sorted(set(rows[topic]))
            rng.shuffle(texts)
            texts = texts[:s.topic_max_per_class]
            cut = int(0.8 * len(texts))
            train += [(t, label) for t in texts[:cut]]
            dev += [(t, label) for t in texts[cut:]]
        rng.shuffle(train)
        out.mkdir(parents=True, exist_ok=True)
        for name, part in (("train.tsv", train), ("dev.tsv", dev)):
            atomic_write_text(out / name, "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in part))
        atomic_write_json(out / "labels.json", topics)
        self.facts["topics"] = {"labels": topics, "train": len(train), "dev": len(dev)}

    def teacher_key(self) -> str:
        s = self.setup
        corpus = self.out / "data" / "train.txt"
        payload = {"corpus": hashlib.sha256(corpus.read_bytes()).hexdigest(), "vocab": s.teacher_vocab,
                   "layers": s.teacher_layers, "hidden": s.teacher_hidden, "heads": s.teacher_heads,
                   "steps": s.teacher_steps, "batch": s.batch_size, "max_len": s.max_len, "version": 3}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def teacher(self) -> None:
        s = self.setup
        cached = self.cache / f"teacher-{self.teacher_key()}"
        self.teacher_dir = self.out / "teacher"
        if not (cached / "model.safetensors").is_file():
            work = self.out / "teacher_work"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            self.sh(self.py, ROOT / "preprocessing" / "train_teacher_tok.py", "--corpus", self.out / "data" / "train.txt",
                    "--vocab_size", s.teacher_vocab, "--out", work / "tokenizer", "--max_len", s.max_len)
            config = {"model_type": "bert", "hidden_size": s.teacher_hidden, "num_hidden_layers": s.teacher_layers,
                      "num_attention_heads": s.teacher_heads, "intermediate_size": 4 * s.teacher_hidden,
                      "max_position_embeddings": s.max_len, "vocab_size": s.teacher_vocab}
            atomic_write_json(work / "teacher_config.json", config)
            self.sh(self.py, "-c", _RANDOM_TEACHER, work / "tokenizer", work / "teacher_config.json", work / "random")
            self.sh(self.py, ROOT / "preprocessing" / "run_pipeline.py", "--teacher_name", work / "random",
                    "--corpus", self.out / "data" / "train.txt", "--student_tokenizer", work / "random",
                    "--student_config", work / "teacher_config.json", "--out_dir", work / "data",
                    "--max_len", s.max_len, "--n_shards", 1)
            self.sh(self.py, ROOT / "train.py", "--dump_path", work / "trained", "--force",
                    "--binarized_data_folder", work / "data" / "processed_binarized",
                    "--student_name", work / "data" / "student", "--student_pretrained_weights", work / "random",
                    "--student_token_counts", work / "data" / "student_counts.npy", "--alpha_mlm", "1.0",
                    "--mlm_smoothing", "0",
                    "--batch_size", s.batch_size, "--gradient_accumulation_steps", 1, "--learning_rate", "5e-4",
                    "--warmup_prop", "0.1", "--max_steps", s.teacher_steps, "--n_epoch", 100,
                    "--valid_prop", "0.01", "--checkpoint_interval", max(50, s.teacher_steps // 5),
                    "--log_interval", 25, "--precision", self.a.precision)
            trained = work / "trained"
            shutil.rmtree(trained / "checkpoints", ignore_errors=True)
            tmp = cached.with_name(cached.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(trained, tmp)
            cached.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, cached)
            shutil.rmtree(work)
        shutil.rmtree(self.teacher_dir, ignore_errors=True)
        shutil.copytree(cached, self.teacher_dir, ignore=shutil.ignore_patterns("tensorboard"))

    def pipeline(self) -> None:
        s = self.setup
        config = {"model_type": "distilbert", "dim": s.student_dim, "n_layers": s.student_layers,
                  "n_heads": s.student_heads, "hidden_dim": s.student_ffn, "max_position_embeddings": s.max_len}
        atomic_write_json(self.out / "student_config.json", config)
        self.sh(self.py, ROOT / "preprocessing" / "run_pipeline.py", "--teacher_name", self.teacher_dir,
                "--corpus", self.out / "data" / "train.txt", "--student_vocab_size", s.student_vocab,
                "--student_config", self.out / "student_config.json", "--out_dir", self.out / "pipeline",
                "--max_len", s.max_len, "--n_shards", 2)

    def _train_student(self, dump: Path, flags: list[str]) -> None:
        s = self.setup
        self.sh(ROOT / "train_multi_gpu.sh", "--dump_path", dump, "--force", "--pipeline_dir", self.out / "pipeline",
                "--batch_size", s.batch_size // 2, "--gradient_accumulation_steps", 1, "--learning_rate", "1e-3",
                "--warmup_prop", "0.05", "--max_steps", s.kd_steps, "--n_epoch", 100, "--valid_prop", "0.01",
                "--checkpoint_interval", max(50, s.kd_steps // 4), "--log_interval", 20,
                "--precision", self.a.precision, *flags,
                env={"N_GPU_NODE": "2", "OMP_NUM_THREADS": str(max(1, self.a.threads // 2)), "PYTHON": self.py})

    def distil(self) -> None:
        self._train_student(self.out / "student_kd", ["--teacher_name", self.teacher_dir, *self.setup.kd_flags])

    def teacher_cache(self) -> None:
        """The teacher-output cache of the distillation's alignment (`sample` encoding, K = 16) over the whole
        pipeline output, timed against one epoch of the online distillation."""
        start = time.perf_counter()
        self.sh(self.py, ROOT / "preprocessing" / "cache_teacher.py", "--pipeline_dir", self.out / "pipeline",
                "--teacher_name", self.teacher_dir, "--align_logits", "match", "--temperature", "2", "--format",
                "sample", "--k", 16, "--out", self.out / "teacher_cache", "--device", "cpu",
                "--precision", self.a.precision)
        build = time.perf_counter() - start
        summary = json.loads((self.out / "student_kd" / "train_summary.json").read_text(encoding="utf-8"))
        epoch = summary["train_seconds"] / max(summary["global_step"], 1) * summary["steps_per_epoch"]
        header = json.loads((self.out / "teacher_cache" / "cache.json").read_text(encoding="utf-8"))
        self.facts["teacher_cache"] = {"build_seconds": round(build, 1), "online_epoch_seconds": round(epoch, 1),
                                       "rows": sum(s["n_rows"] for s in header["shards"]),
                                       "bytes_per_row": header["bytes_per_row"], "encoding": header["encoding"]}

    def distil_cached(self) -> None:
        """The same distillation as `distil` (same seed, data and updates), the teacher read from the cache."""
        self._train_student(self.out / "student_kd_cached", ["--teacher_name", self.teacher_dir, *self.setup.kd_flags,
                                                             "--teacher_cache", self.out / "teacher_cache"])

    def baseline(self) -> None:
        self._train_student(self.out / "student_baseline", ["--alpha_mlm", "1.0"])

    def evaluate(self) -> None:
        from demo_eval import mlm_accuracy, model_size, speed

        heldout = (self.out / "data" / "heldout.txt").read_text(encoding="utf-8").splitlines()
        for name, path in self.model_dirs().items():
            result = {**model_size(path), **mlm_accuracy(path, heldout, max_len=self.setup.max_len),
                      **speed(path, seq_len=128, repeats=self.setup.speed_repeats)}
            self.models.setdefault(name, {}).update(result)
            with self.log.open("a", encoding="utf-8") as fh:
                fh.write(f"{name}: {json.dumps(result)}\n")

    def topics(self) -> None:
        """Fine-tune every model the same way on the topic task (single_sentence format), once per seed of
        `topic_seeds`; dev accuracy: mean, standard deviation over the seeds, and each seed's value."""
        s, task = self.setup, self.out / "data" / "topics"
        params = self.out / "data" / "topic_tokenizer.yaml"
        atomic_write_text(params, f"max_length: {s.topic_max_len}\n")
        for name, path in self.model_dirs().items():
            accs = []
            for seed in range(s.topic_seeds):
                dumps = self.out / "topics" / name / f"seed{seed}"
                self.sh(self.py, ROOT / "distil-finetuned-en" / "train.py", "--glue_dataset", "single_sentence",
                        "--glue_dir", task, "--num_labels", len(self.facts["topics"]["labels"]), "--tokenizer_name",
                        path, "--tokenizer_params", params, "--dumps_dir", dumps, "--force", "--batch_size", 32,
                        "--lr", "2e-4", "--seed", seed, "train_single", "--model_name", path, "--from_pretrained",
                        "--n_epochs", s.topic_epochs, "--warmup_prop", "0.1")
                accs.append(json.loads((dumps / "results.json").read_text(encoding="utf-8"))["dev"]["accuracy"])
            self.models.setdefault(name, {}).update(
                topic_acc=statistics.fmean(accs), topic_acc_std=statistics.pstdev(accs), topic_acc_seeds=accs)

    def report(self) -> None:
        from demo_report import read_scalars, write_report

        curves = {"student (distilled)": read_scalars(self.out / "student_kd" / "tensorboard"),
                  "student (distilled, teacher cache)": read_scalars(self.out / "student_kd_cached" / "tensorboard"),
                  "student (MLM only)": read_scalars(self.out / "student_baseline" / "tensorboard")}
        context = {"mode": self.mode, "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                   "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                   "threads": self.a.threads, "total_minutes": (time.perf_counter() - self.t0) / 60,
                   "setup": asdict(self.setup), "facts": self.facts, "stage_seconds": self.stage_seconds}
        self.result = write_report(self.out, self.models, curves, context)

    def model_dirs(self) -> dict[str, Path]:
        return {"teacher": self.teacher_dir, "student_kd": self.out / "student_kd",
                "student_kd_cached": self.out / "student_kd_cached", "student_baseline": self.out / "student_baseline"}

    def check_cache(self) -> None:
        """The corpus that an earlier run left in --cache_dir (reused as it is) must be usable, before anything is
        written: UTF-8 `ru_sentences.txt` with more sentences than are held out, `topics.tsv` of `text<TAB>topic`."""
        corpus_dir = self.cache / "corpus"
        for name in ("ru_sentences.txt", "topics.tsv"):
            path = corpus_dir / name
            if not path.is_file():
                continue
            fix = f"delete it (the demo then rebuilds {corpus_dir} with get_corpus.py)"
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as err:
                raise UserError(f"cached corpus file {path} is not UTF-8 text ({err.reason}); {fix}") from err
            if name == "topics.tsv":
                bad = next((k for k, line in enumerate(lines) if "\t" not in line), None)
                if not lines or lines[0] != "text\ttopic" or bad is not None:
                    where = "it is empty" if not lines else f"line {1 if bad is None else bad + 1} is not text<TAB>topic"
                    raise UserError(f"cached corpus file {path} is not a topics table ({where}); {fix}")
            elif sum(1 for line in lines if line.strip()) <= self.setup.heldout_sentences:
                raise UserError(f"cached corpus file {path} has {len(lines)} lines, not more than the "
                                f"{self.setup.heldout_sentences} held-out sentences; {fix}")

    def run(self) -> dict:
        self.t0 = time.perf_counter()
        self.facts: dict = {}
        self.models: dict[str, dict] = {}
        self.check_cache()
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        for log in self.logs.glob("*.log"):
            log.unlink()
        for name in ("corpus", "teacher", "pipeline", "distil", "teacher_cache", "distil_cached", "baseline",
                     "evaluate", "topics", "report"):
            self.run_stage(name, getattr(self, name))
        return self.result


_RANDOM_TEACHER = """
import sys, shutil, torch
from pathlib import Path
from transformers import BertConfig, BertForMaskedLM
tok, config, out = map(Path, sys.argv[1:4])
torch.manual_seed(0)
shutil.copytree(tok, out)
data = __import__("json").loads(config.read_text())
data.pop("model_type")
BertForMaskedLM(BertConfig(**data)).save_pretrained(str(out))
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and budgets (under 10 minutes on 2 cores)")
    p.add_argument("--out", default="runs/demo", help="output directory (report.md, report.json, models, logs)")
    p.add_argument("--cache_dir", default="runs/cache", help="corpus and pretrained teachers, reused across runs")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8), help="CPU threads")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="training precision")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    demo = Demo(a)
    try:
        result = demo.run()
    except StageFailed as err:
        raise UserError(str(err)) from err
    from demo_report import topic_verdict

    kd, base = result["student_kd"], result["student_baseline"]
    print(f"[demo] compression {result['compression']:.1f}x, speed-up {result['speedup']:.1f}x; MLM accuracy "
          f"distilled {kd['mlm_acc']:.3f} vs baseline {base['mlm_acc']:.3f}; topic accuracy "
          f"{kd['topic_acc']:.3f} vs {base['topic_acc']:.3f} ({topic_verdict(kd, base)})")
    print(f"[demo] report: {demo.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
