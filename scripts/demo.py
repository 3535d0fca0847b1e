"""The main job: which distillation method to use, answered end to end on real Russian text, on a CPU.

    ./demo.sh [--quick] [--out runs/demo]      (or: .venv/bin/python scripts/demo.py ...)

Every method of `METHODS` trains the same student (same initialisation, data, seed and number of updates); the
report compares them with the teacher on a vocabulary-independent metric (whole-word masked prediction) and on a
downstream task with a verdict per method (topic classification over several fine-tuning seeds, a paired bootstrap
interval of the difference to the MLM-only baseline).

Stages (each prints one line with its elapsed time; its commands' output goes to OUT/logs/<stage>.log):
 1. corpus         Russian sentences and topic-labelled fortunes from Debian packages (get_corpus.py), split into
                   training text, the students' share of it, and held-out sentences;
 2. teacher        a teacher WordPiece tokenizer and a BERT pretrained with train.py (MLM only, uniform masking as
                   in BERT, bf16); cached under --cache_dir by configuration, so a second run reuses it;
 3. pipeline       run_pipeline.py on the students' text with a 4x smaller student vocabulary; the student
                   initialised from the teacher, and a random initialisation of the same student;
 4. teacher_cache  one teacher-output cache (cache_teacher.py, `sample` encoding, K = 16) per method that a cache
                   can serve, each built once;
 5. train_<run>    one stage per student (`runs()`): ./train_multi_gpu.sh with 2 CPU processes, the method's flags;
                   the cacheable methods read their cache, and `CACHE_CHECK` also runs with the teacher online;
 6. evaluate       whole-word masked prediction, held-out MLM accuracy, parameters, size, CPU latency/throughput;
 7. topics         topic classification of fortunes-ru texts with distil-finetuned-en/ (every model fine-tuned the
                   same way once per seed; seed i has the same data order for every model), dev accuracy;
 8. report         OUT/report.md, OUT/report.json, OUT/losses.png, OUT/comparison.png.
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
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from kdcore.errors import UserError, run_cli  # noqa: E402
from kdcore.fsutil import atomic_write_json, atomic_write_text  # noqa: E402


@dataclass
class Setup:
    """Sizes and budgets of one demo mode (sentences, tokens, updates, seeds)."""

    train_sentences: int
    student_sentences: int
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
    teacher_precision: str = "bf16"
    batch_size: int = 32
    max_len: int = 128
    n_topics: int = 6
    topic_epochs: int = 2
    topic_seeds: int = 5
    topic_max_per_class: int = 600
    speed_repeats: int = 10
    topic_max_len: int = 64


MODES = {
    "quick": Setup(train_sentences=12000, student_sentences=3000, heldout_sentences=400, teacher_vocab=3000,
                   teacher_layers=2, teacher_hidden=128, teacher_heads=2, teacher_steps=150, student_vocab=800,
                   student_layers=2, student_dim=64, student_heads=2, student_ffn=256, kd_steps=80, topic_epochs=1,
                   topic_seeds=2, topic_max_per_class=120, speed_repeats=3, topic_max_len=64),
    "full": Setup(train_sentences=0, student_sentences=8000, heldout_sentences=3000, teacher_vocab=16000,
                  teacher_layers=4, teacher_hidden=256, teacher_heads=4, teacher_steps=6000, student_vocab=4000,
                  student_layers=3, student_dim=64, student_heads=4, student_ffn=256, kd_steps=500,
                  topic_max_per_class=500),
}


@dataclass(frozen=True)
class Method:
    """One student recipe of the comparison. `align`: its alignment flags, read by train.py and, for a method a
    teacher cache can serve (`cacheable`), by cache_teacher.py; `kd`: distilled (KL at T = 2, weight 2.0, plus the
    MLM loss at 0.5) or MLM only (weight 1.0); `init`: the student's initial weights, "teacher" (the pipeline's
    init_weights.py) or "random" (same config)."""

    label: str
    align: tuple[str, ...] = ()
    kd: bool = True
    cacheable: bool = False
    init: str = "teacher"


METHODS: dict[str, Method] = {
    "baseline": Method("MLM only (baseline)", kd=False),
    "random_init": Method("MLM only, random init", kd=False, init="random"),
    "match": Method("match", ("--align_logits", "match"), cacheable=True),
    "reduce": Method("reduce", ("--align_logits", "reduce"), cacheable=True),
    "reduce_map": Method("reduce_map", ("--align_logits", "reduce_map"), cacheable=True),
    "match_mined": Method("match, MinED columns", ("--align_logits", "match", "--column_map", "mined"),
                          cacheable=True),
    "uld": Method("ULD", ("--align_logits", "uld")),
    "dskd": Method("DSKD", ("--align_logits", "dskd")),
}
CACHE_CHECK = "match"
"""The cacheable method that also runs with the teacher online (`match_online`): the teacher cache's effect."""
KD_FLAGS = ("--alpha_ce", "2.0", "--alpha_mlm", "0.5", "--temperature", "2")


def runs() -> dict[str, tuple[str, bool]]:
    """Student run name -> (method, reads the teacher cache), in report order: every method (from its cache when
    it has one), then the online twin of `CACHE_CHECK`."""
    table = {name: (name, m.cacheable) for name, m in METHODS.items()}
    table[f"{CACHE_CHECK}_online"] = (CACHE_CHECK, False)
    return table


def spread(lines: list[str], n: int) -> list[str]:
    """`n` lines evenly spaced over `lines` (all of them when there are fewer)."""
    return lines[::max(1, len(lines) // n)][:n]


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
        heldout = spread(lines, s.heldout_sentences)
        held = set(heldout)
        train = [line for line in lines if line not in held]
        if s.train_sentences:
            train = spread(train, s.train_sentences)
        data = self.out / "data"
        data.mkdir(parents=True, exist_ok=True)
        atomic_write_text(data / "train.txt", "\n".join(train) + "\n")
        atomic_write_text(data / "heldout.txt", "\n".join(heldout) + "\n")
        student = spread(train, s.student_sentences)
        atomic_write_text(data / "student.txt", "\n".join(student) + "\n")
        self.write_topic_task(corpus_dir / "topics.tsv", data / "topics")
        self.facts["corpus"] = {"train_sentences": len(train), "student_sentences": len(student),
                                "heldout_sentences": len(heldout), "train_chars": sum(map(len, train))}

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
                   "steps": s.teacher_steps, "batch": s.batch_size, "max_len": s.max_len,
                   "precision": s.teacher_precision, "version": 4}
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
            self.sh(self.py, "-c", _RANDOM_MODEL, work / "tokenizer", work / "teacher_config.json", work / "random")
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
                    "--log_interval", 25, "--precision", s.teacher_precision)
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
        pipe = self.out / "pipeline"
        self.sh(self.py, ROOT / "preprocessing" / "run_pipeline.py", "--teacher_name", self.teacher_dir,
                "--corpus", self.out / "data" / "student.txt", "--student_vocab_size", s.student_vocab,
                "--student_config", self.out / "student_config.json", "--out_dir", pipe,
                "--max_len", s.max_len, "--n_shards", 2)
        shutil.rmtree(self.out / "student_random", ignore_errors=True)
        self.sh(self.py, "-c", _RANDOM_MODEL, pipe / "student", pipe / "student" / "config.json",
                self.out / "student_random")

    def teacher_cache(self) -> None:
        """One teacher-output cache (`sample` encoding, K = 16) per cacheable method, over the whole pipeline
        output; build time and size of each."""
        self.facts["teacher_cache"] = {}
        for name, method in METHODS.items():
            if not method.cacheable:
                continue
            cache = self.out / "teacher_cache" / name
            shutil.rmtree(cache, ignore_errors=True)  # a cache of an earlier run's pipeline
            start = time.perf_counter()
            self.sh(self.py, ROOT / "preprocessing" / "cache_teacher.py", "--pipeline_dir", self.out / "pipeline",
                    "--teacher_name", self.teacher_dir, *method.align, "--temperature", "2", "--format", "sample",
                    "--k", 16, "--out", cache, "--device", "cpu", "--precision", self.setup.teacher_precision)
            header = json.loads((cache / "cache.json").read_text(encoding="utf-8"))
            self.facts["teacher_cache"][name] = {
                "build_seconds": round(time.perf_counter() - start, 1), "rows": sum(s["n_rows"] for s in header["shards"]),
                "bytes_per_row": header["bytes_per_row"], "encoding": header["encoding"]}

    def train_flags(self, run: str) -> list[str | Path]:
        """train.py flags of a student run (beyond the recipe shared by all, see `train`)."""
        method_name, cached = runs()[run]
        method = METHODS[method_name]
        flags: list[str | Path] = []
        if method.init == "random":
            flags += ["--student_pretrained_weights", self.out / "student_random"]
        if not method.kd:
            return [*flags, "--alpha_mlm", "1.0"]
        flags += ["--teacher_name", self.teacher_dir, *KD_FLAGS, *method.align,
                  "--teacher_precision", self.setup.teacher_precision]
        return [*flags, "--teacher_cache", self.out / "teacher_cache" / method_name] if cached else flags

    def train(self, run: str) -> None:
        """One student: the same recipe, seed, data and number of updates for every run, plus its flags."""
        s = self.setup
        dump = self.out / f"student_{run}"
        self.sh(ROOT / "train_multi_gpu.sh", "--dump_path", dump, "--force", "--pipeline_dir", self.out / "pipeline",
                "--batch_size", s.batch_size // 2, "--gradient_accumulation_steps", 1, "--learning_rate", "1e-3",
                "--warmup_prop", "0.05", "--max_steps", s.kd_steps, "--n_epoch", 100, "--valid_prop", "0.01",
                "--checkpoint_interval", max(50, s.kd_steps // 4), "--log_interval", 20,
                "--precision", self.a.precision, *self.train_flags(run),
                env={"N_GPU_NODE": "2", "OMP_NUM_THREADS": str(max(1, self.a.threads // 2)), "PYTHON": self.py})
        summary = json.loads((dump / "train_summary.json").read_text(encoding="utf-8"))
        self.facts.setdefault("train_seconds", {})[run] = round(summary["train_seconds"], 1)
        self.facts.setdefault("epochs", {})[run] = round(summary["global_step"] / summary["steps_per_epoch"], 2)

    def evaluate(self) -> None:
        from demo_eval import mlm_accuracy, model_size, select_words, speed, whole_word_metrics

        heldout = (self.out / "data" / "heldout.txt").read_text(encoding="utf-8").splitlines()
        words = select_words(heldout, max_chars=self.setup.max_len - 2, seed=0)
        atomic_write_json(self.out / "data" / "heldout_words.json",
                          [{"sentence": i, "start": a, "end": b, "word": heldout[i][a:b]} for i, a, b in words])
        self.facts["heldout_words"] = len(words)
        for name, path in self.model_dirs().items():
            result = {**model_size(path), **mlm_accuracy(path, heldout, max_len=self.setup.max_len),
                      **whole_word_metrics(path, heldout, words),
                      **speed(path, seq_len=128, repeats=self.setup.speed_repeats)}
            self.models.setdefault(name, {}).update(result)
            with self.log.open("a", encoding="utf-8") as fh:
                fh.write(f"{name}: {json.dumps(result)}\n")

    def topics(self) -> None:
        """Fine-tune every model the same way on the topic task (single_sentence format), once per seed of
        `topic_seeds` (all seeds of a model in one process, scripts/demo_topics.py); dev accuracy: mean, standard
        deviation over the seeds, and each seed's value."""
        s, task = self.setup, self.out / "data" / "topics"
        params = self.out / "data" / "topic_tokenizer.yaml"
        atomic_write_text(params, f"max_length: {s.topic_max_len}\n")
        for name, path in self.model_dirs().items():
            dumps = [self.out / "topics" / name / f"seed{seed}" for seed in range(s.topic_seeds)]
            argvs = [[str(v) for v in (
                "--glue_dataset", "single_sentence", "--glue_dir", task, "--num_labels",
                len(self.facts["topics"]["labels"]), "--tokenizer_name", path, "--tokenizer_params", params,
                "--dumps_dir", dump, "--force", "--batch_size", 32, "--lr", "2e-4", "--precision", "bf16", "--seed", seed,
                "train_single",
                "--model_name", path, "--from_pretrained", "--n_epochs", s.topic_epochs, "--warmup_prop", "0.1")]
                for seed, dump in enumerate(dumps)]
            argv_file = self.out / "topics" / name / "argv.json"
            argv_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(argv_file, argvs)
            self.sh(self.py, ROOT / "scripts" / "demo_topics.py", argv_file)
            accs = [json.loads((d / "results.json").read_text(encoding="utf-8"))["dev"]["accuracy"] for d in dumps]
            self.models.setdefault(name, {}).update(
                topic_acc=statistics.fmean(accs), topic_acc_std=statistics.pstdev(accs), topic_acc_seeds=accs)

    def report(self) -> None:
        from demo_report import read_scalars, write_report

        curves = {self.labels()[f"student_{run}"]: read_scalars(self.out / f"student_{run}" / "tensorboard")
                  for run in runs()}
        teacher_curves = read_scalars(self.cache / f"teacher-{self.teacher_key()}" / "tensorboard")
        context = {"mode": self.mode, "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                   "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                   "threads": self.a.threads, "total_minutes": (time.perf_counter() - self.t0) / 60,
                   "setup": asdict(self.setup), "facts": self.facts, "stage_seconds": self.stage_seconds,
                   "methods": {name: {"label": m.label, "train_flags": [*(KD_FLAGS if m.kd else ()), *m.align],
                                      "cacheable": m.cacheable, "init": m.init} for name, m in METHODS.items()}}
        self.result = write_report(self.out, self.models, self.labels(), curves, teacher_curves, context)

    def labels(self) -> dict[str, str]:
        """Report key -> row label, in report order (teacher, then every student run)."""
        s = self.setup
        labels = {"teacher": f"teacher (BERT {s.teacher_layers} x {s.teacher_hidden})"}
        for run, (method, cached) in runs().items():
            via = " (teacher cache)" if cached else " (teacher online)" if METHODS[method].kd else ""
            labels[f"student_{run}"] = METHODS[method].label + via
        return labels

    def model_dirs(self) -> dict[str, Path]:
        """Report key -> HF model directory: the teacher and every student run."""
        return {"teacher": self.teacher_dir, **{f"student_{run}": self.out / f"student_{run}" for run in runs()}}

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
        for name in ("corpus", "teacher", "pipeline", "teacher_cache"):
            self.run_stage(name, getattr(self, name))
        for run in runs():
            self.run_stage(f"train_{run}", lambda run=run: self.train(run))
        for name in ("evaluate", "topics", "report"):
            self.run_stage(name, getattr(self, name))
        return self.result


_RANDOM_MODEL = """
import json, shutil, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForMaskedLM
tok, config, out = map(Path, sys.argv[1:4])
torch.manual_seed(0)
shutil.copytree(tok, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
data = json.loads(config.read_text())
model = AutoModelForMaskedLM.from_config(AutoConfig.for_model(data.pop("model_type"), **data))
model.save_pretrained(str(out))
"""
"""`python -c _RANDOM_MODEL TOKENIZER_DIR CONFIG_JSON OUT`: OUT = the tokenizer and a masked LM of the config with
random weights (seed 0)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and budgets (under 10 minutes on 2 cores)")
    p.add_argument("--out", default="runs/demo", help="output directory (report.md, report.json, models, logs)")
    p.add_argument("--cache_dir", default="runs/cache", help="corpus and pretrained teachers, reused across runs")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8), help="CPU threads")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="the students' training precision (the teacher's forward is always bf16)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    demo = Demo(a)
    try:
        result = demo.run()
    except StageFailed as err:
        raise UserError(str(err)) from err
    models = result["models"]
    print(f"[demo] compression {result['compression']:.1f}x, speed-up {result['speedup']:.1f}x; whole-word accuracy "
          f"teacher {models['teacher']['word_acc']:.3f}, baseline {models['student_baseline']['word_acc']:.3f}")
    for name, r in models.items():
        if name.startswith("student_") and name != "student_baseline":
            print(f"[demo] {name}: word acc {r['word_acc']:.3f}, topic acc {r['topic_acc']:.3f} vs baseline: "
                  f"{r['verdict']}")
    print(f"[demo] report: {demo.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
