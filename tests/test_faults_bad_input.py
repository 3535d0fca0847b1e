"""Bad input, everywhere a user passes a path: one table of faults, one check for all of them.

Every case corrupts one input of one CLI (missing, empty, truncated, wrong-format or wrong-encoding files; teacher
directories without a tokenizer or whose tokenizer does not fit the embeddings; a pipeline built for another
teacher; GLUE TSVs with wrong columns or labels) and expects: exit code 2; stderr one line `error: ...` that names
the file and says how to fix it (no traceback); nothing half-written (the test's files and the session pipeline
are byte-identical afterwards, no temp files left). CLIs with `main(argv)` run in-process through `run_cli`, the
`run_process` entry (train.py as a script) in a subprocess.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "distil-finetuned-en") not in sys.path:
    sys.path.append(str(ROOT / "distil-finetuned-en"))  # appended: its train.py must not shadow the root one

from kdcore.errors import run_cli  # noqa: E402
from test_glue_data import make_tokenizer, one_thread, write_glue_task  # noqa: E402, F401 (one_thread: autouse)

TEMP_NAME = re.compile(r"\.(tmp|old)(-\d+)?(\.|$)")
"""Names of the temp files and directories of kdcore/fsutil.py (`x.tmp-PID`, `x.tmp-PID.npy`, `x.old-PID`)."""

CLIS = {"run_pipeline": "run_pipeline", "train_reduced_tok": "train_reduced_tok",
        "train_teacher_tok": "train_teacher_tok", "teacher_tokens_split": "teacher_tokens_split",
        "encode_shards": "encode_shards", "prepare_lm_seqs": "prepare_lm_seqs",
        "regroup_binarized": "regroup_binarized", "token_counts": "token_counts", "student2teacher": "student2teacher",
        "init_weights": "init_weights", "find_matching_ids": "find_matching_ids", "matched_vocab": "matched_vocab",
        "inspect_shards": "inspect_shards", "cache_teacher": "cache_teacher", "train.py": "train",
        "glue": "glue_cli", "demo": "demo"}
"""CLI name in the table -> the module whose `main(argv)` it runs."""
SCRIPTS = {"train.py (script)": ROOT / "train.py"}
"""CLIs run as a subprocess (their `__main__` path)."""


# --------------------------------------------------------------------------------------------------------------
# Corrupting files
# --------------------------------------------------------------------------------------------------------------


def truncate(path: Path) -> Path:
    """Cut a file in half (a download or a copy that stopped)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def recode(path: Path, encoding: str) -> Path:
    """Re-encode a UTF-8 text file (a corpus saved as UTF-16 or cp1251)."""
    path.write_bytes(path.read_text(encoding="utf-8").encode(encoding))
    return path


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def edit_vocab(teacher: Path, change: Callable[[list[str]], list[str]]) -> Path:
    vocab = (teacher / "vocab.txt").read_text(encoding="utf-8").splitlines()
    (teacher / "vocab.txt").write_text("".join(t + "\n" for t in change(vocab)), encoding="utf-8")
    return teacher


# --------------------------------------------------------------------------------------------------------------
# The inputs of a case, and the command lines around a bad input
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Env:
    """Good inputs (session fixtures, read-only) and a scratch directory for the bad ones."""

    tmp: Path
    corpus: Path
    teacher: Path
    student_config: Path
    pipeline: Path
    glue: dict[str, Path]

    def copy(self, src: Path, name: str) -> Path:
        """A copy of a file or directory in the scratch directory, to corrupt."""
        dst = self.tmp / name
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy(src, dst)
        return dst

    def teacher_copy(self, name: str) -> Path:
        return self.copy(self.teacher, name)

    def other_teacher(self, name: str = "other_teacher") -> Path:
        """The teacher with one vocabulary entry changed: same sizes, another tokenizer."""
        return edit_vocab(self.teacher_copy(name), lambda v: [*v[:-1], "совсемдругой"])

    def pipeline_copy(self, name: str = "pipe") -> Path:
        return self.copy(self.pipeline, name)

    def out(self, name: str = "out") -> Path:
        return self.tmp / name

    # command lines: (argv, the output location)
    def run_pipeline(self, teacher=None, corpus=None, config=None, out=None) -> tuple[list[str], Path]:
        out = out or self.out()
        return ["--teacher_name", str(teacher or self.teacher), "--corpus", str(corpus or self.corpus),
                "--student_vocab_size", "150", "--student_config", str(config or self.student_config),
                "--out_dir", str(out), "--max_len", "24", "--num_workers", "1"], out

    def train_reduced_tok(self, teacher=None, corpus=None, config=None) -> tuple[list[str], Path]:
        out = self.out()
        argv = ["--teacher_name", str(teacher or self.teacher), "--corpus", str(corpus or self.corpus),
                "--vocab_size", "150", "--out", str(out)]
        return argv + (["--student_config", str(config)] if config else []), out

    def pair(self, teacher=None, student=None) -> list[str]:
        return ["--teacher_name", str(teacher or self.teacher), "--student_name",
                str(student or self.pipeline / "student")]

    def encode_shards(self, teacher=None, corpus=None, t2s=None) -> tuple[list[str], Path]:
        out = self.out()
        return [*self.pair(teacher), "--corpus", str(corpus or self.corpus), "--t2s_padded",
                str(t2s or self.pipeline / "t2s_padded.npy"), "--out_dir", str(out), "--num_workers", "1"], out

    def prepare_lm_seqs(self, in_dir=None, t2s=None) -> tuple[list[str], Path]:
        out = self.out()
        return [*self.pair(), "--in_dir", str(in_dir or self.pipeline / "work" / "encoded"), "--t2s_padded",
                str(t2s or self.pipeline / "t2s_padded.npy"), "--out_dir", str(out), "--max_len", "24"], out

    def student2teacher(self, **bad: Path) -> tuple[list[str], Path]:
        files = {"t2s_mapping": "teacher2student.json", "t2s_padded": "t2s_padded.npy",
                 "t2s_mapped_ids": "t2s_mapped_ids.npy", "teacher_counts": "teacher_counts.npy"}
        out = self.out()
        argv = [x for flag, name in files.items() for x in (f"--{flag}", str(bad.get(flag, self.pipeline / name)))]
        return [*argv, "--out_dir", str(out), "--cut_len", "8"], out

    def init_weights(self, teacher=None) -> tuple[list[str], Path]:
        out = self.out()
        return [*self.pair(teacher), "--out", str(out), "--t2s_mapping",
                str(self.pipeline / "teacher2student.json")], out

    def cache_teacher(self, pipeline=None, teacher=None) -> tuple[list[str], Path]:
        out = self.out("cache")
        return ["--pipeline_dir", str(pipeline or self.pipeline), "--teacher_name", str(teacher or self.teacher),
                "--align_logits", "match", "--out", str(out), "--device", "cpu"], out

    def train(self, pipeline=None, teacher=None, *extra: str) -> tuple[list[str], Path]:
        out = self.out("dump")
        return ["--pipeline_dir", str(pipeline or self.pipeline), "--teacher_name", str(teacher or self.teacher),
                "--align_logits", "match", "--dump_path", str(out), "--device", "cpu", "--max_steps", "1",
                *extra], out

    def glue_copy(self) -> Path:
        """A copy of the SST-2 folder (GLUE_DIR/SST-2) to corrupt."""
        return self.copy(self.glue["root"], "glue") / "SST-2"

    def glue_cli(self, glue=None, tokenizer=None, model=None, *extra: str,
                 from_pretrained: bool = False) -> tuple[list[str], Path]:
        out = self.out("dumps")
        return ["--glue_dataset", "sst2", "--glue_dir", str(glue or self.glue["root"]), "--tokenizer_name",
                str(tokenizer or self.glue["tok"]), "--dumps_dir", str(out), "--device", "cpu", *extra,
                "train_single", "--model_name", str(model or self.glue["bert"]),
                *(["--from_pretrained"] if from_pretrained else [])], out

    def demo(self, cache: Path) -> tuple[list[str], Path]:
        out = self.out("demo")
        return ["--quick", "--out", str(out), "--cache_dir", str(cache)], out

    def demo_cache(self) -> Path:
        """A --cache_dir holding a built corpus (get_corpus.py's ru_sentences.txt and topics.tsv)."""
        corpus = self.tmp / "demo_cache" / "corpus"
        corpus.mkdir(parents=True)
        shutil.copy(self.corpus, corpus / "ru_sentences.txt")
        lines = self.corpus.read_text(encoding="utf-8").splitlines()
        write(corpus / "topics.tsv", "text\ttopic\n" + "".join(f"{t}\tтема{i % 3}\n" for i, t in enumerate(lines)))
        return corpus


# --------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input of one CLI.

    cli: a key of CLIS or SCRIPTS; fault: makes the bad input and returns the path that the message must name;
    command: (env, bad path) -> (argv, the CLI's output location); hint: text of the fix the message must give."""

    id: str
    cli: str
    fault: Callable[[Env], Path]
    command: Callable[[Env, Path], tuple[list[str], Path]]
    hint: str


def _headless_teacher(e: Env) -> Path:
    """A BertModel (no MLM head) with the teacher's tokenizer."""
    from transformers import BertConfig, BertModel

    path = e.tmp / "headless"
    BertModel(BertConfig.from_pretrained(str(e.teacher))).save_pretrained(str(path))
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(e.teacher / name, path)
    return path


def _no_tokenizer(e: Env, name: str) -> Path:
    path = e.teacher_copy(name)
    for tok_file in ("vocab.txt", "tokenizer_config.json"):
        (path / tok_file).unlink()
    return path


def _shard_file(e: Env, name: str, corrupt: Callable[[Path], Path]) -> Path:
    data = e.copy(e.pipeline / "processed_binarized", "data")
    return corrupt(data / "shard_00001" / name)


def _pipeline_file(e: Env, name: str, corrupt: Callable[[Path], Path]) -> Path:
    return corrupt(e.pipeline_copy() / name)


def _tsv(e: Env, name: str, text: str | bytes) -> Path:
    return write(e.glue_copy() / name, text)


SST2_HEAD = "sentence\tlabel\n"

CASES = [
    # ---- run_pipeline.py: corpus, teacher, student config, OUT
    Case("pipeline-corpus-missing", "run_pipeline", lambda e: e.tmp / "nope.txt",
         lambda e, bad: e.run_pipeline(corpus=bad), "check the --corpus paths"),
    Case("pipeline-corpus-empty", "run_pipeline", lambda e: write(e.tmp / "blank.txt", "\n\n   \n"),
         lambda e, bad: e.run_pipeline(corpus=bad), "pass non-empty UTF-8 text files"),
    Case("pipeline-corpus-cp1251", "run_pipeline", lambda e: recode(e.copy(e.corpus, "cp1251.txt"), "cp1251"),
         lambda e, bad: e.run_pipeline(corpus=bad), "iconv -f cp1251 -t utf-8"),
    Case("pipeline-corpus-utf16", "run_pipeline", lambda e: recode(e.copy(e.corpus, "utf16.txt"), "utf-16"),
         lambda e, bad: e.run_pipeline(corpus=bad), "iconv -f utf-16 -t utf-8"),
    Case("pipeline-corpus-utf16-no-bom", "run_pipeline",
         lambda e: recode(e.copy(e.corpus, "utf16le.txt"), "utf-16-le"),
         lambda e, bad: e.run_pipeline(corpus=bad), "iconv"),
    Case("pipeline-teacher-missing", "run_pipeline", lambda e: e.tmp / "no_teacher",
         lambda e, bad: e.run_pipeline(teacher=bad), "pass an HF tokenizer/model directory"),
    Case("pipeline-teacher-without-tokenizer", "run_pipeline", lambda e: _no_tokenizer(e, "tokless"),
         lambda e, bad: e.run_pipeline(teacher=bad), "save the tokenizer there"),
    Case("pipeline-teacher-vocab-utf16", "run_pipeline",
         lambda e: recode(e.teacher_copy("teacher16") / "vocab.txt", "utf-16"),
         lambda e, bad: e.run_pipeline(teacher=bad.parent), "iconv -t utf-8"),
    Case("pipeline-teacher-vocab-exceeds-embeddings", "run_pipeline",
         lambda e: edit_vocab(e.teacher_copy("bigvocab"), lambda v: [*v, "лишний1", "лишний2"]),
         lambda e, bad: e.run_pipeline(teacher=bad), "do not belong together"),
    Case("pipeline-teacher-vocab-below-embeddings", "run_pipeline",
         lambda e: edit_vocab(e.teacher_copy("smallvocab"), lambda v: v[:-3]),
         lambda e, bad: e.run_pipeline(teacher=bad), "do not belong together"),
    Case("pipeline-teacher-weights-truncated", "run_pipeline",
         lambda e: truncate(e.teacher_copy("cut_teacher") / "model.safetensors"),
         lambda e, bad: e.run_pipeline(teacher=bad.parent), "save the teacher again"),
    Case("pipeline-teacher-weights-are-text", "run_pipeline",
         lambda e: write(e.teacher_copy("text_teacher") / "model.safetensors", "not a model\n"),
         lambda e, bad: e.run_pipeline(teacher=bad.parent), "save the teacher again"),
    Case("pipeline-teacher-config-truncated", "run_pipeline",
         lambda e: truncate(e.teacher_copy("cfg_teacher") / "config.json"),
         lambda e, bad: e.run_pipeline(teacher=bad.parent), "model.save_pretrained()"),
    Case("pipeline-student-config-missing", "run_pipeline", lambda e: e.tmp / "no_config.json",
         lambda e, bad: e.run_pipeline(config=bad), "pass a DistilBERT config JSON"),
    Case("pipeline-student-config-truncated", "run_pipeline",
         lambda e: truncate(e.copy(e.student_config, "half_config.json")),
         lambda e, bad: e.run_pipeline(config=bad), "pass a DistilBERT config JSON"),
    Case("pipeline-out-not-a-pipeline", "run_pipeline", lambda e: write(e.tmp / "mine" / "notes.txt", "mine").parent,
         lambda e, bad: e.run_pipeline(out=bad), "choose a new --out_dir or pass --force"),
    Case("pipeline-out-of-another-teacher", "run_pipeline", lambda e: e.pipeline_copy("foreign_pipe"),
         lambda e, bad: e.run_pipeline(teacher=e.other_teacher(), out=bad), "choose a new --out_dir"),
    Case("pipeline-manifest-truncated", "run_pipeline",
         lambda e: _pipeline_file(e, "manifest.json", truncate),
         lambda e, bad: e.run_pipeline(out=bad.parent), "run_pipeline.py --force"),
    # ---- the step scripts
    Case("reduced-tok-corpus-cp1251", "train_reduced_tok",
         lambda e: write(e.tmp / "many.txt", e.corpus.read_bytes()[:2000] + b"\n"
                         + "Привет cp1251\n".encode("cp1251") * 50),
         lambda e, bad: e.train_reduced_tok(corpus=bad), "iconv"),
    Case("reduced-tok-teacher-tokenizer-json-truncated", "train_reduced_tok",
         lambda e: truncate(_fast_tokenizer_dir(e, "json_teacher") / "tokenizer.json"),
         lambda e, bad: e.train_reduced_tok(teacher=bad.parent), "tokenizer.save_pretrained()"),
    Case("reduced-tok-student-config-utf16", "train_reduced_tok",
         lambda e: recode(e.copy(e.student_config, "config16.json"), "utf-16"),
         lambda e, bad: e.train_reduced_tok(config=bad), "pass a DistilBERT config JSON"),
    Case("teacher-tok-corpus-empty", "train_teacher_tok", lambda e: empty(e.tmp / "nothing.txt"),
         lambda e, bad: (["--corpus", str(bad), "--vocab_size", "100", "--out", str(e.out())], e.out()),
         "pass non-empty UTF-8 text files"),
    Case("split-student-without-tokenizer", "teacher_tokens_split",
         lambda e: write(e.tmp / "bare_student" / "config.json", "{}").parent,
         lambda e, bad: ([*e.pair(student=bad), "--out_dir", str(e.out())], e.out()), "save the tokenizer there"),
    Case("encode-t2s-truncated", "encode_shards", lambda e: truncate(e.copy(e.pipeline / "t2s_padded.npy", "t2s.npy")),
         lambda e, bad: e.encode_shards(t2s=bad), "run_pipeline.py --force"),
    Case("encode-t2s-is-json", "encode_shards", lambda e: e.copy(e.pipeline / "teacher2student.json", "t2s_json.npy"),
         lambda e, bad: e.encode_shards(t2s=bad), "not a .npy"),
    Case("encode-t2s-of-other-vocabularies", "encode_shards",
         lambda e: _npy(e.tmp / "t2s_other.npy", np.zeros((10, 3), np.int32)),
         lambda e, bad: e.encode_shards(t2s=bad), "run_pipeline.py --force"),
    Case("encode-corpus-utf16", "encode_shards", lambda e: recode(e.copy(e.corpus, "enc16.txt"), "utf-16"),
         lambda e, bad: e.encode_shards(corpus=bad), "iconv -f utf-16"),
    Case("prepare-index-empty", "prepare_lm_seqs",
         lambda e: empty(e.copy(e.pipeline / "work" / "encoded", "encoded") / "index.json"),
         lambda e, bad: e.prepare_lm_seqs(in_dir=bad.parent), "re-run the preprocessing step"),
    Case("regroup-input-missing", "regroup_binarized", lambda e: e.tmp / "no_shards",
         lambda e, bad: (["--in_dir", str(bad), "--out_dir", str(e.out())], e.out()), "run the preprocessing pipeline"),
    Case("regroup-output-exists", "regroup_binarized", lambda e: e.pipeline_copy() / "processed_binarized",
         lambda e, bad: (["--in_dir", str(bad.parent / "work" / "filtered"), "--out_dir", str(bad)], bad),
         "pass --force"),
    Case("counts-shard-truncated", "token_counts", lambda e: _shard_file(e, "teacher_ids.npy", truncate),
         lambda e, bad: (["--data_dir", str(bad.parent.parent), "--out_dir", str(e.out())], e.out()),
         "re-run the preprocessing step"),
    Case("counts-shard-json-not-json", "token_counts",
         lambda e: _shard_file(e, "shard.json", lambda p: write(p, "shard\n")),
         lambda e, bad: (["--data_dir", str(bad.parent.parent), "--out_dir", str(e.out())], e.out()),
         "re-run the preprocessing step"),
    Case("s2t-counts-pickled", "student2teacher",
         lambda e: _npy(e.tmp / "pickled_counts.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True),
         lambda e, bad: e.student2teacher(teacher_counts=bad), "run_pipeline.py --force"),
    Case("s2t-counts-of-other-vocabulary", "student2teacher",
         lambda e: _npy(e.tmp / "counts301.npy", np.ones(301, np.int64)),
         lambda e, bad: e.student2teacher(teacher_counts=bad), "run_pipeline.py --force"),
    Case("s2t-mapping-truncated", "student2teacher",
         lambda e: truncate(e.copy(e.pipeline / "teacher2student.json", "t2s_cut.json")),
         lambda e, bad: e.student2teacher(t2s_mapping=bad), "run_pipeline.py --force"),
    Case("init-teacher-headless", "init_weights", _headless_teacher,
         lambda e, bad: e.init_weights(teacher=bad), "save the teacher with its MLM head"),
    Case("init-teacher-weights-truncated", "init_weights",
         lambda e: truncate(e.teacher_copy("init_cut") / "model.safetensors"),
         lambda e, bad: e.init_weights(teacher=bad.parent), "save the teacher again"),
    Case("init-teacher-vocab-exceeds-embeddings", "init_weights",
         lambda e: edit_vocab(e.teacher_copy("init_big"), lambda v: [*v, "лишний"]),
         lambda e, bad: e.init_weights(teacher=bad), "do not belong together"),
    Case("match-data-of-another-teacher", "find_matching_ids", lambda e: e.copy(e.pipeline / "processed_binarized",
                                                                                 "other_data"),
         lambda e, bad: ([*e.pair(teacher=e.other_teacher()), "--data_dir", str(bad)], bad), "rebuild it"),
    Case("match-shard-truncated", "find_matching_ids", lambda e: _shard_file(e, "student_ids.npy", truncate),
         lambda e, bad: ([*e.pair(), "--data_dir", str(bad.parent.parent)], bad.parent.parent),
         "re-run the preprocessing step"),
    Case("matched-vocab-student-tokenizer-truncated", "matched_vocab",
         lambda e: truncate(e.copy(e.pipeline / "student", "cut_student") / "tokenizer.json"),
         lambda e, bad: ([*e.pair(student=bad.parent), "--out", str(e.out("m.json"))], e.out("m.json")),
         "tokenizer.save_pretrained()"),
    Case("inspect-shards-missing", "inspect_shards", lambda e: e.tmp / "no_data",
         lambda e, bad: ([str(bad)], bad), "run the preprocessing pipeline"),
    # ---- cache_teacher.py
    Case("cache-pipeline-of-another-teacher", "cache_teacher", lambda e: e.pipeline_copy("cache_pipe"),
         lambda e, bad: e.cache_teacher(pipeline=bad, teacher=e.other_teacher()), "--teacher_name"),
    Case("cache-pipeline-without-manifest", "cache_teacher", lambda e: _pipeline_file(e, "manifest.json", _unlink),
         lambda e, bad: e.cache_teacher(pipeline=bad.parent), "pass the --out_dir of run_pipeline.py"),
    Case("cache-teacher-weights-truncated", "cache_teacher",
         lambda e: truncate(e.teacher_copy("cache_cut") / "model.safetensors"),
         lambda e, bad: e.cache_teacher(teacher=bad.parent), "save the teacher again"),
    Case("cache-teacher-vocab-differs", "cache_teacher",
         lambda e: edit_vocab(e.teacher_copy("cache_big"), lambda v: [*v, "лишний"]),
         lambda e, bad: e.cache_teacher(teacher=bad), "do not belong together"),
    # ---- train.py
    Case("train-pipeline-of-another-teacher", "train.py", lambda e: e.pipeline_copy("train_pipe"),
         lambda e, bad: e.train(bad, e.other_teacher()), "--teacher_name"),
    Case("train-pipeline-without-manifest", "train.py", lambda e: _pipeline_file(e, "manifest.json", _unlink),
         lambda e, bad: e.train(pipeline=bad.parent), "pass the --out_dir of run_pipeline.py"),
    Case("train-counts-truncated", "train.py", lambda e: _pipeline_file(e, "student_counts.npy", truncate),
         lambda e, bad: e.train(pipeline=bad.parent), "run_pipeline.py --force"),
    Case("train-matched-vocab-truncated", "train.py", lambda e: _pipeline_file(e, "matched_vocab.json", truncate),
         lambda e, bad: e.train(pipeline=bad.parent), "run_pipeline.py --force"),
    Case("train-teacher-weights-truncated", "train.py",
         lambda e: truncate(e.teacher_copy("train_cut") / "model.safetensors"),
         lambda e, bad: e.train(None, bad.parent), "save the teacher again"),
    Case("train-student-weights-are-text", "train.py", lambda e: write(e.tmp / "weights.safetensors", "text\n"),
         lambda e, bad: e.train(None, None, "--student_pretrained_weights", str(bad)), "a .safetensors file"),
    Case("train-script-pipeline-of-another-teacher", "train.py (script)", lambda e: e.pipeline_copy("script_pipe"),
         lambda e, bad: e.train(bad, e.other_teacher()), "--teacher_name"),
    # ---- GLUE (distil-finetuned-en/train.py)
    Case("glue-train-tsv-wrong-columns", "glue", lambda e: _tsv(e, "train.tsv", "text\tlabel\nfine\t1\n"),
         lambda e, bad: e.glue_cli(glue=bad.parent.parent), "expected the sst2 file"),
    Case("glue-train-tsv-unknown-label", "glue",
         lambda e: _tsv(e, "train.tsv", SST2_HEAD + "a great movie\t1\nan awful plot\tpositive\n"),
         lambda e, bad: e.glue_cli(glue=bad.parent.parent), "--bad_rows skip"),
    Case("glue-train-tsv-too-many-columns", "glue",
         lambda e: _tsv(e, "train.tsv", SST2_HEAD + "a great movie\t1\tcomment\n"),
         lambda e, bad: e.glue_cli(glue=bad.parent.parent), "fix the file"),
    Case("glue-train-tsv-truncated", "glue",
         lambda e: write(e.glue_copy() / "train.tsv", SST2_HEAD + "a great movie\t1\nan awful pl"),
         lambda e, bad: e.glue_cli(glue=bad.parent.parent), "fix the file"),
    Case("glue-train-tsv-empty", "glue", lambda e: empty(e.glue_copy() / "train.tsv"),
         lambda e, bad: e.glue_cli(glue=bad.parent.parent), "expected a header line"),
    Case("glue-train-tsv-utf16", "glue", lambda e: recode(e.glue_copy() / "train.tsv", "utf-16"),
         lambda e, bad: e.glue_cli(glue=bad.parent.parent), "iconv"),
    Case("glue-dev-tsv-latin1", "glue",
         lambda e: write(e.glue_copy() / "dev.tsv", (SST2_HEAD + "un café noir\t1\n").encode("latin-1")),
         lambda e, bad: e.glue_cli(glue=bad.parent.parent), "iconv"),
    Case("glue-dev-tsv-missing", "glue", lambda e: _unlink(e.glue_copy() / "dev.tsv"),
         lambda e, bad: e.glue_cli(glue=bad.parent.parent), "needs train.tsv and dev.tsv"),
    Case("glue-tokenizer-params-not-yaml", "glue", lambda e: write(e.tmp / "params.yaml", "max_length: [1\n"),
         lambda e, bad: e.glue_cli(None, None, None, "--tokenizer_params", str(bad)), "YAML"),
    Case("glue-tokenizer-missing", "glue", lambda e: e.tmp / "no_tok",
         lambda e, bad: e.glue_cli(tokenizer=bad), "pass an HF tokenizer/model directory"),
    Case("glue-tokenizer-exceeds-model-vocab", "glue", lambda e: e.glue["small_bert"],
         lambda e, bad: e.glue_cli(model=bad), "use the tokenizer the model was trained with"),
    Case("glue-model-weights-truncated", "glue",
         lambda e: truncate(e.copy(e.glue["trained_bert"], "cut_bert") / "model.safetensors"),
         lambda e, bad: e.glue_cli(model=bad.parent, from_pretrained=True), "save the model again"),
    # ---- the demo (scripts/demo.py, run by demo.sh): its --cache_dir holds the corpus it reuses
    Case("demo-cached-corpus-empty", "demo", lambda e: empty(e.demo_cache() / "ru_sentences.txt"),
         lambda e, bad: e.demo(bad.parent.parent), "delete it"),
    Case("demo-cached-corpus-cp1251", "demo", lambda e: recode(e.demo_cache() / "ru_sentences.txt", "cp1251"),
         lambda e, bad: e.demo(bad.parent.parent), "delete it"),
    Case("demo-cached-topics-wrong-columns", "demo",
         lambda e: write(e.demo_cache() / "topics.tsv", "sentence\nодин\nдва\n"),
         lambda e, bad: e.demo(bad.parent.parent), "delete it"),
]


def _npy(path: Path, array: np.ndarray, allow_pickle: bool = False) -> Path:
    np.save(path, array, allow_pickle=allow_pickle)
    return path


def _unlink(path: Path) -> Path:
    path.unlink()
    return path


def _fast_tokenizer_dir(e: Env, name: str) -> Path:
    """The teacher saved with its tokenizer.json (the format of current transformers)."""
    from kdcore.tokenizer_utils import load_tokenizer

    path = e.teacher_copy(name)
    load_tokenizer(e.teacher).save_pretrained(str(path))
    return path


# --------------------------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------------------------


def tree(path: Path) -> dict[str, str]:
    """{relative path: sha256 of the content, or "dir"} of everything under `path`."""
    if not path.exists():
        return {}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def glue_env(tmp_path_factory) -> dict[str, Path]:
    """A GLUE_DIR with SST-2, its tokenizer, a BERT config that fits it, one that is too small, trained weights."""
    from transformers import BertConfig, BertForSequenceClassification

    from kdcore.tokenizer_utils import load_tokenizer

    base = tmp_path_factory.mktemp("glue_bad")
    tok = make_tokenizer(base / "tok")
    n_vocab = len(load_tokenizer(tok))
    sizes = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
             "max_position_embeddings": 64}
    bert, small = base / "bert", base / "small_bert"
    BertConfig(vocab_size=n_vocab, **sizes).save_pretrained(str(bert))
    BertConfig(vocab_size=10, **sizes).save_pretrained(str(small))
    trained = base / "trained_bert"
    BertForSequenceClassification(BertConfig(vocab_size=n_vocab, **sizes)).save_pretrained(str(trained))
    root = base / "glue"
    write_glue_task(root, "sst2", n_train=12, n_dev=6)
    return {"root": root, "tok": tok, "bert": bert, "small_bert": small, "trained_bert": trained}


def run_case(case: Case, argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of the case's CLI."""
    if case.cli in SCRIPTS:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run([sys.executable, str(SCRIPTS[case.cli]), *argv], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stderr
    main = importlib.import_module(CLIS[case.cli]).main
    capsys.readouterr()
    code = run_cli(main, argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, corpus, teacher_dir, student_config, pipeline_out, glue_env, capsys):
    e = Env(tmp_path / "case", corpus, teacher_dir, student_config, pipeline_out, glue_env)
    e.tmp.mkdir()
    bad = case.fault(e)
    argv, out = case.command(e, bad)
    before, pipeline_before = tree(e.tmp), tree(pipeline_out)
    code, err = run_case(case, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert line.startswith("error: "), line
    assert bad.name in line, f"the message does not name {bad.name}: {line}"
    assert case.hint in line, f"the message lacks the fix {case.hint!r}: {line}"
    assert tree(e.tmp) == before, f"{case.cli} changed files under {e.tmp} (output {out})"
    assert tree(pipeline_out) == pipeline_before
    assert not [p for p in e.tmp.rglob("*") if TEMP_NAME.search(p.name)]


def test_a_few_undecodable_lines_are_skipped_and_counted(tmp_path, teacher_dir, corpus, capsys):
    """Below --max_bad_frac, undecodable corpus lines are skipped, counted in the step's statistics, not an error."""
    from train_reduced_tok import main

    few = write(tmp_path / "few.txt", corpus.read_bytes() + b"\xff\xfe broken line\n")
    assert run_cli(main, ["--teacher_name", str(teacher_dir), "--corpus", str(few), "--vocab_size", "150",
                          "--out", str(tmp_path / "tok")]) == 0
    stats = json.loads((tmp_path / "tok" / "student_tokenizer_stats.json").read_text(encoding="utf-8"))
    assert stats["undecodable_lines"] == 1


def test_artifact_loaders_refuse_mismatches(tmp_path, pipeline_out):
    """The loaders train.py and the steps share: sizes, value ranges, pickled arrays."""
    from kdcore.artifacts import load_counts, load_t2s_padded
    from kdcore.errors import UserError

    with pytest.raises(UserError, match=r"teacher_counts\.npy has 300 counts for a vocabulary of 301"):
        load_counts(pipeline_out / "teacher_counts.npy", 301)
    bad = _npy(tmp_path / "t2s_padded.npy", np.full((300, 3), 999))
    with pytest.raises(UserError, match="outside"):
        load_t2s_padded(bad, 300, 150)


def test_a_vocabulary_too_small_for_the_alphabet(tmp_path, teacher_dir, corpus, capsys):
    """A bad flag, not a bad file: one line that says how large the vocabulary must be, nothing written."""
    from train_reduced_tok import main

    assert run_cli(main, ["--teacher_name", str(teacher_dir), "--corpus", str(corpus), "--vocab_size", "20",
                          "--out", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --vocab_size 20 is too small") and "raise --vocab_size" in err and "\n" not in err
    assert not (tmp_path / "tok").exists()
