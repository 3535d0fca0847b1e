"""A synthetic pipeline output that is byte-for-byte the same in every run: the teacher's and the student's
vocabularies are read from `tests/golden/` instead of trained (so that they depend neither on the WordPiece trainer
nor on the version of the `tokenizers` library), the corpus, the teacher's weights and every later pipeline step
are deterministic. The teacher's weights are drawn wide (std 0.5) so that its distributions are peaked and the
distillation terms move the student measurably."""

from __future__ import annotations

from pathlib import Path

from synthetic import make_teacher, write_corpus, write_student_config, write_vocab_tokenizer

GOLDEN = Path(__file__).with_name("golden")


def build(root: Path) -> dict[str, Path]:
    """{"teacher", "out" (different vocabularies), "out_same" (one vocabulary)} under `root`."""
    from run_pipeline import build_parser, run

    root.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(root / "corpus.txt", 1500, seed=0)
    teacher = make_teacher(root / "teacher", corpus, vocab_file=GOLDEN / "teacher_vocab.txt", init_range=0.5)
    student_tok = write_vocab_tokenizer(root / "student_tok", (GOLDEN / "student_vocab.txt").read_text("utf-8"))
    config = write_student_config(root / "student_config.json")
    common = ["--teacher_name", str(teacher), "--corpus", str(corpus), "--student_config", str(config),
              "--max_len", "24", "--n_shards", "2", "--cut_len", "8", "--num_workers", "1"]
    run(build_parser().parse_args([*common, "--student_tokenizer", str(student_tok), "--out_dir", str(root / "out")]),
        log=lambda *_: None)
    run(build_parser().parse_args([*common, "--student_tokenizer", str(teacher), "--out_dir", str(root / "out_same"),
                                   "--init_strategy", "select", "--layers", "0,3"]), log=lambda *_: None)
    return {"teacher": teacher, "out": root / "out", "out_same": root / "out_same"}
