"""Bad input: one-line errors naming the file and the fix, exit code 2, nothing half-written."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from kdcore.errors import run_cli


def call(main, argv, capsys):
    rc = run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def pipeline_argv(teacher, corpus, config, out, *extra):
    return ["--teacher_name", str(teacher), "--corpus", *map(str, corpus), "--student_vocab_size", "150",
            "--student_config", str(config), "--out_dir", str(out), "--max_len", "24", "--num_workers", "1", *extra]


def test_missing_and_empty_corpus(tmp_path, teacher_dir, student_config, capsys):
    from run_pipeline import main

    rc, err = call(main, pipeline_argv(teacher_dir, [tmp_path / "nope.txt"], student_config, tmp_path / "o"), capsys)
    assert rc == 2 and "nope.txt" in err and "\n" not in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    rc, err = call(main, pipeline_argv(teacher_dir, [empty], student_config, tmp_path / "o"), capsys)
    assert rc == 2 and "empty.txt" in err and "no text" in err
    assert not (tmp_path / "o").exists()


def test_undecodable_lines_are_skipped_then_refused(tmp_path, teacher_dir, corpus, capsys):
    from train_reduced_tok import main

    text = corpus.read_bytes()
    few = tmp_path / "few.txt"
    few.write_bytes(text + b"\xff\xfe broken line\n")
    rc, _ = call(main, ["--teacher_name", str(teacher_dir), "--corpus", str(few), "--vocab_size", "150",
                        "--out", str(tmp_path / "tok")], capsys)
    assert rc == 0
    stats = (tmp_path / "tok" / "student_tokenizer_stats.json").read_text()
    assert '"undecodable_lines": 1' in stats
    many = tmp_path / "many.txt"
    many.write_bytes(text[:2000] + b"\n" + b"\xcf\xf0\xe8\xe2\xe5\xf2 cp1251\n" * 50)
    rc, err = call(main, ["--teacher_name", str(teacher_dir), "--corpus", str(many), "--vocab_size", "150",
                          "--out", str(tmp_path / "tok2")], capsys)
    assert rc == 2 and "many.txt" in err and "iconv" in err
    assert not (tmp_path / "tok2").exists()


def test_teacher_without_tokenizer_or_head(tmp_path, teacher_dir, pipeline_out, capsys):
    from init_weights import main as init_main
    from train_reduced_tok import main as tok_main

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(teacher_dir / "config.json", bare)
    rc, err = call(tok_main, ["--teacher_name", str(bare), "--corpus", "x", "--vocab_size", "100", "--out",
                              str(tmp_path / "t")], capsys)
    assert rc == 2 and str(bare) in err and "tokenizer" in err

    from transformers import BertConfig, BertModel

    headless = tmp_path / "headless"
    BertModel(BertConfig.from_pretrained(str(teacher_dir))).save_pretrained(str(headless))
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(teacher_dir / name, headless)
    rc, err = call(init_main, ["--teacher_name", str(headless), "--student_name", str(pipeline_out / "student"),
                               "--out", str(tmp_path / "init"), "--t2s_mapping",
                               str(pipeline_out / "teacher2student.json")], capsys)
    assert rc == 2 and "MLM head" in err and str(headless) in err
    assert not (tmp_path / "init").exists()


def test_vocab_size_too_small(tmp_path, teacher_dir, corpus, capsys):
    from train_reduced_tok import main

    rc, err = call(main, ["--teacher_name", str(teacher_dir), "--corpus", str(corpus), "--vocab_size", "20",
                          "--out", str(tmp_path / "tok")], capsys)
    assert rc == 2 and "--vocab_size 20 is too small" in err
    assert not (tmp_path / "tok").exists()


def test_corrupt_shard_via_cli(tmp_path, pipeline_out, capsys):
    from token_counts import main

    data = tmp_path / "data"
    shutil.copytree(pipeline_out / "processed_binarized", data)
    ids = data / "shard_00001" / "teacher_ids.npy"
    ids.write_bytes(ids.read_bytes()[:-10])
    rc, err = call(main, ["--data_dir", str(data), "--out_dir", str(tmp_path / "counts")], capsys)
    assert rc == 2 and "teacher_ids.npy" in err and "truncated" in err
    assert not (tmp_path / "counts").exists()


def test_existing_outputs(tmp_path, teacher_dir, corpus, student_config, pipeline_out, capsys):
    from regroup_binarized import main as regroup_main
    from run_pipeline import main as pipeline_main

    rc, err = call(regroup_main, ["--in_dir", str(pipeline_out / "work" / "filtered"), "--out_dir",
                                  str(pipeline_out / "processed_binarized")], capsys)
    assert rc == 2 and "already exists" in err and "--force" in err

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    rc, err = call(pipeline_main, pipeline_argv(teacher_dir, [corpus], student_config, foreign), capsys)
    assert rc == 2 and "not a pipeline output" in err

    other_teacher = tmp_path / "other_teacher"
    shutil.copytree(teacher_dir, other_teacher)
    vocab = (other_teacher / "vocab.txt").read_text(encoding="utf-8").splitlines()
    vocab[-1] = "совсемдругой"
    (other_teacher / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    before = (pipeline_out / "manifest.json").read_text()
    rc, err = call(pipeline_main, pipeline_argv(other_teacher, [corpus], student_config, pipeline_out), capsys)
    assert rc == 2 and "another teacher tokenizer" in err
    assert (pipeline_out / "manifest.json").read_text() == before


def test_training_artifact_loaders_refuse_mismatches(tmp_path, pipeline_out):
    from kdcore.artifacts import load_counts, load_t2s_padded
    from kdcore.errors import UserError

    with pytest.raises(UserError, match=r"teacher_counts\.npy has 300 counts for a vocabulary of 301"):
        load_counts(pipeline_out / "teacher_counts.npy", 301)
    bad = tmp_path / "t2s_padded.npy"
    np.save(bad, np.full((300, 3), 999))
    with pytest.raises(UserError, match="outside"):
        load_t2s_padded(bad, 300, 150)
    pickled = tmp_path / "obj.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="corrupt"):
        load_counts(pickled, 1)
