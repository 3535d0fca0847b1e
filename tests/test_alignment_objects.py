"""`kdcore.alignments` (the registry, explicit choices, stray artifact flags, the my_index approximation) and
`--pipeline_dir` (train.py and the GLUE CLI)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from kdcore import alignments
from kdcore.alignments import ALIGNMENTS, AlignmentConfig, dropped_pair_share, register, selectable_alignments
from test_train import kd_flags, run_train, train_argv

ROOT = Path(__file__).resolve().parents[1]


def test_registry_drives_the_command_line():
    from train import build_parser

    assert selectable_alignments() == ("match", "reduce", "reduce_map", "uld", "dskd")
    assert "shared" in ALIGNMENTS and not ALIGNMENTS["shared"].selectable
    action = next(a for a in build_parser()._actions if a.dest == "align_logits")
    assert tuple(action.choices) == selectable_alignments()

    @register
    class Probe(alignments.Match):
        name = "probe"

    try:
        assert "probe" in selectable_alignments()
        needed = alignments.required_artifacts(AlignmentConfig(logits="probe"), kl=True, hidden=False,
                                               shared_vocab=False)
        assert needed == {"matching_ids": "--align_logits probe"}
    finally:
        del ALIGNMENTS["probe"]


def test_mode_names_are_compared_only_in_the_alignment_module():
    """No product code outside kdcore/alignments.py branches on an alignment's name."""
    pattern = re.compile(r"""(==|!=|\bin\b)\s*\(?\s*["'](match|reduce|reduce_map|shared|uld|dskd)["']""")
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", ".gpu_site", "tests", "bench", "runs") or rel == Path("kdcore/alignments.py"):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, offenders


@pytest.mark.parametrize(("extra", "needle"), [
    (["--align_logits", "match", "--t2s_vocab_padded", "{out}/t2s_padded.npy"], "--t2s_vocab_padded is not read by "
                                                                                "--align_logits match"),
    (["--align_logits", "reduce", "--t2s_vocab_padded", "{out}/t2s_padded.npy"], "--t2s_vocab_padded"),
    (["--align_logits", "match", "--sum_probs"], "--sum_probs only applies to --align_logits reduce_map"),
    (["--align_logits", "match", "--reduce_map_impl", "my_index"], "--reduce_map_impl only applies"),
    (["--align_logits", "reduce_map"], "--align_logits reduce_map reads --t2s_mapping"),
])
def test_stray_and_missing_artifact_flags_are_one_line_errors(tmp_path, pipeline_out, teacher_dir, capsys, extra,
                                                              needle):
    dump = tmp_path / "dump"
    flags = ["--teacher_name", str(teacher_dir), "--alpha_ce", "1", "--alpha_mlm", "1"]
    if "reduce_map" not in extra:
        flags += ["--matching_ids", str(pipeline_out / "matched_vocab.json")]
    if "reduce" in extra:
        flags += ["--t2s_mapping", str(pipeline_out / "teacher2student.json")]
    argv = train_argv(pipeline_out, dump, "--max_steps", "1", *flags,
                      *[x.format(out=pipeline_out) for x in extra])
    assert run_train(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err
    assert not dump.exists()


def test_stray_flag_exits_2_from_the_command_line(tmp_path, pipeline_out, teacher_dir):
    import subprocess
    import sys

    argv = [sys.executable, str(ROOT / "train.py"), "--pipeline_dir", str(pipeline_out), "--teacher_name",
            str(teacher_dir), "--alpha_ce", "1", "--align_logits", "match", "--t2s_vocab_padded",
            str(pipeline_out / "t2s_padded.npy"), "--dump_path", str(tmp_path / "d"), "--device", "cpu"]
    proc = subprocess.run(argv, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --t2s_vocab_padded is not read by --align_logits match")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("align", ["match", "reduce", "reduce_map"])
def test_pipeline_dir_fills_every_artifact(tmp_path, pipeline_out, teacher_dir, align):
    dump = tmp_path / "dump"
    argv = ["--pipeline_dir", str(pipeline_out), "--teacher_name", str(teacher_dir), "--alpha_ce", "2",
            "--alpha_mlm", "0.5", "--align_logits", align, "--dump_path", str(dump), "--device", "cpu",
            "--max_steps", "2", "--batch_size", "8", "--gradient_accumulation_steps", "1", "--valid_prop", "0.05"]
    assert run_train(argv) == 0
    params = json.loads((dump / "parameters.json").read_text())
    assert params["data"]["binarized_data_folder"] == str(pipeline_out / "processed_binarized")
    assert params["data"]["student_pretrained_weights"] == str(pipeline_out / "student_init")
    assert params["data"]["student_token_counts"] == str(pipeline_out / "student_counts.npy")
    filled = {flag for flag in alignments.ARTIFACT_FLAGS if params["alignment"][flag]}
    expected = {"match": {"matching_ids"}, "reduce": {"matching_ids", "t2s_mapping"},
                "reduce_map": {"t2s_mapping", "t2s_vocab_padded", "t2s_mapped_ids"}}[align]
    assert filled == expected
    assert json.loads((dump / "train_summary.json").read_text())["global_step"] == 2


def test_four_flags_distil_with_the_papers_weights(tmp_path, pipeline_out, teacher_dir):
    """`train.py --pipeline_dir P --teacher_name T --align_logits match --dump_path D` and nothing else."""
    dump = tmp_path / "dump"
    argv = ["--pipeline_dir", str(pipeline_out), "--teacher_name", str(teacher_dir), "--align_logits", "match",
            "--dump_path", str(dump)]
    assert run_train(argv) == 0
    params = json.loads((dump / "parameters.json").read_text())
    assert (params["losses"]["alpha_ce"], params["losses"]["alpha_mlm"], params["losses"]["temperature"]) == (2.0, 0.5,
                                                                                                              2.0)
    summary = json.loads((dump / "train_summary.json").read_text())
    assert summary["global_step"] > 0 and len(summary["history"]) >= 3  # a validation after every epoch
    assert (dump / "model.safetensors").is_file()


def test_pipeline_dir_my_index_logs_its_approximation_once(tmp_path, pipeline_out, teacher_dir):
    dump = tmp_path / "dump"
    argv = ["--pipeline_dir", str(pipeline_out), "--teacher_name", str(teacher_dir), "--alpha_ce", "1",
            "--align_logits", "reduce_map", "--reduce_map_impl", "my_index", "--dump_path", str(dump), "--device",
            "cpu", "--max_steps", "1", "--batch_size", "8", "--gradient_accumulation_steps", "1", "--valid_prop", "0"]
    assert run_train(argv) == 0
    params = json.loads((dump / "parameters.json").read_text())
    assert params["alignment"]["s2t_vocab_padded"] == str(pipeline_out / "s2t_padded.npy")
    log = (dump / "train.log").read_text()
    assert log.count("approximation: --reduce_map_impl my_index with a capped inverse map drops") == 1
    assert "partial-sum gradient" in log


def test_explicit_flags_override_the_pipeline_dir(tmp_path, pipeline_out, teacher_dir):
    other = tmp_path / "other_matched.json"
    shutil.copy(pipeline_out / "matched_vocab.json", other)
    dump = tmp_path / "dump"
    argv = ["--pipeline_dir", str(pipeline_out), "--teacher_name", str(teacher_dir), "--alpha_ce", "1",
            "--matching_ids", str(other), "--dump_path", str(dump), "--device", "cpu", "--max_steps", "1",
            "--batch_size", "8", "--gradient_accumulation_steps", "1", "--valid_prop", "0"]
    assert run_train(argv) == 0
    assert json.loads((dump / "parameters.json").read_text())["alignment"]["matching_ids"] == str(other)


def test_pipeline_dir_names_the_step_that_makes_a_missing_artifact(tmp_path, pipeline_out, teacher_dir, capsys):
    pipe = tmp_path / "pipe"
    shutil.copytree(pipeline_out, pipe)
    (pipe / "matched_vocab.json").unlink()
    base = ["--teacher_name", str(teacher_dir), "--alpha_ce", "1", "--dump_path", str(tmp_path / "d"), "--device",
            "cpu"]
    assert run_train(["--pipeline_dir", str(pipe), *base]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --pipeline_dir {pipe} lacks matched_vocab.json (--matching_ids); it is made by pipeline "
                   "step 10 (matched_vocab.py): run run_pipeline.py on it again")
    manifest = json.loads((pipe / "manifest.json").read_text())
    del manifest["steps"]["student2teacher"]
    (pipe / "manifest.json").write_text(json.dumps(manifest))
    argv = ["--pipeline_dir", str(pipe), *base, "--align_logits", "reduce_map", "--reduce_map_impl", "my_index"]
    assert run_train(argv) == 2
    assert "it is made by pipeline step 7 (student2teacher.py)" in capsys.readouterr().err
    assert run_train(["--pipeline_dir", str(tmp_path), *base]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_glue_cli_fills_the_tokenizer_and_student_from_a_pipeline_dir(tmp_path, pipeline_out, capsys):
    import sys

    sys.path.insert(0, str(ROOT / "distil-finetuned-en"))
    from glue_args import build_parser, validate_args

    from kdcore.errors import UserError

    glue = tmp_path / "glue"
    glue.mkdir()
    common = ["--glue_dataset", "sst2", "--glue_dir", str(glue), "--dumps_dir", str(tmp_path / "d")]
    a = build_parser().parse_args([*common, "--pipeline_dir", str(pipeline_out), "distil_teacher", "--teacher_name",
                                   str(tmp_path / "t")])
    validate_args(a)
    assert a.tokenizer_name == a.student_name == str(pipeline_out / "student")
    a = build_parser().parse_args([*common, "--pipeline_dir", str(pipeline_out), "--tokenizer_name", "mine",
                                   "train_single", "--model_name", "m"])
    validate_args(a)
    assert a.tokenizer_name == "mine"
    with pytest.raises(UserError, match="--tokenizer_name is required"):
        validate_args(build_parser().parse_args([*common, "train_single", "--model_name", "m"]))


def test_dropped_pair_share_against_brute_force():
    rng = np.random.default_rng(0)
    n_teacher, n_student, width, cut = 40, 12, 3, 2
    t2s = np.full((n_teacher, width), n_student)
    for v in range(n_teacher):
        k = rng.integers(1, width + 1)
        t2s[v, :k] = rng.integers(0, n_student, k)
    mapped = np.arange(0, n_teacher, 2)
    s2t = np.full((n_student, cut), n_teacher)
    for u in range(n_student):
        holders = sorted({v for v in range(n_teacher) if u in t2s[v]})
        listed = rng.permutation(holders)[:cut]
        s2t[u, :len(listed)] = listed
    pairs = {(v, u) for v in mapped for u in t2s[v] if u != n_student}
    kept = {(v, u) for (v, u) in pairs if v in s2t[u]}
    assert dropped_pair_share(t2s, mapped, s2t, n_teacher, n_student) == pytest.approx(1 - len(kept) / len(pairs))
    assert 0 < dropped_pair_share(t2s, mapped, s2t, n_teacher, n_student) < 1
    full = np.full((n_student, n_teacher), n_teacher)
    for u in range(n_student):
        holders = [v for v in range(n_teacher) if u in t2s[v]]
        full[u, :len(holders)] = holders
    assert dropped_pair_share(t2s, mapped, full, n_teacher, n_student) == 0.0


def test_kd_flags_still_cover_every_alignment(pipeline_out, teacher_dir):
    """The flags the other tests use name each selectable alignment explicitly."""
    for name in selectable_alignments():
        assert name in kd_flags(pipeline_out, teacher_dir, name)
