"""Test-wide settings (offline hub, deterministic tokenizers) and the session fixtures: a synthetic corpus, a tiny
teacher and one full preprocessing run."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from synthetic import make_teacher, write_corpus, write_student_config


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def corpus(workdir):
    return write_corpus(workdir / "corpus.txt", 1500, seed=0)


@pytest.fixture(scope="session")
def teacher_dir(workdir, corpus):
    return make_teacher(workdir / "teacher", corpus, vocab_size=300)


@pytest.fixture(scope="session")
def student_config(workdir):
    return write_student_config(workdir / "student_config.json")


@pytest.fixture(scope="session")
def pipeline_out(workdir, teacher_dir, corpus, student_config):
    """OUT of run_pipeline.py with a 150-token student vocabulary, max_len 24 and 2 shards."""
    from run_pipeline import build_parser, run

    out = workdir / "out"
    args = build_parser().parse_args([
        "--teacher_name", str(teacher_dir), "--corpus", str(corpus), "--student_vocab_size", "150",
        "--student_config", str(student_config), "--out_dir", str(out), "--max_len", "24", "--n_shards", "2",
        "--cut_len", "8", "--num_workers", "1",
    ])
    run(args, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def same_vocab_out(workdir, teacher_dir, corpus, student_config):
    """OUT of run_pipeline.py with the teacher's own tokenizer for the student (one vocabulary)."""
    from run_pipeline import build_parser, run

    out = workdir / "out_same"
    args = build_parser().parse_args([
        "--teacher_name", str(teacher_dir), "--corpus", str(corpus), "--student_tokenizer", str(teacher_dir),
        "--student_config", str(student_config), "--out_dir", str(out), "--max_len", "24", "--n_shards", "2",
        "--cut_len", "8", "--num_workers", "1", "--init_strategy", "select", "--layers", "0,3",
    ])
    run(args, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def golden(tmp_path_factory):
    """The fixed-vocabulary fixture of `golden_fixture.py` (byte-identical in every run; a peaked teacher)."""
    from golden_fixture import build

    return build(tmp_path_factory.mktemp("golden"))
