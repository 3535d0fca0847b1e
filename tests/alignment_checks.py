"""End-to-end checks shared by the tests of the alignments that need no artifacts beyond the shards (uld, dskd):
two torchrun processes agree, a resumed run equals an uninterrupted one, misuse is a one-line error, and the
teacher-cache builder refuses an alignment it cannot serve."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_train import final_weights, run_train, train_argv, two_process_run


def check_torchrun_agrees(pipeline_out: Path, dump: Path, flags: list[str]) -> None:
    """2 CPU processes launched by ./train_multi_gpu.sh (torchrun, gloo) train 2 updates and end with the same
    weights."""
    two_process_run(train_argv(pipeline_out, dump, "--max_steps", "2", *flags), steps=2)


def check_resume_is_exact(pipeline_out: Path, tmp_path: Path, flags: list[str]) -> tuple[Path, Path]:
    """3 updates in one run equal 2 updates, then `--resume auto` to 3 (exported weights); returns both dumps."""
    flags = [*flags, "--checkpoint_interval", "2", "--valid_prop", "0"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_train(train_argv(pipeline_out, full, "--max_steps", "3", *flags)) == 0
    assert run_train(train_argv(pipeline_out, part, "--max_steps", "2", *flags)) == 0
    assert run_train(train_argv(pipeline_out, part, "--max_steps", "3", "--resume", "auto", *flags)) == 0
    a, b = final_weights(full), final_weights(part)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    return full, part


def check_one_line_error(pipeline_out: Path, dump: Path, teacher_dir: Path, extra: list[str], needle: str,
                         capsys) -> None:
    """train.py with `extra` ("{out}" = the pipeline dir) exits 2 with one line holding `needle`, writing nothing."""
    argv = train_argv(pipeline_out, dump, "--max_steps", "1", "--teacher_name", str(teacher_dir), "--alpha_ce", "1",
                      *[x.format(out=pipeline_out) for x in extra])
    assert run_train(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err
    assert not dump.exists()


def check_cache_teacher_refuses(name: str, capsys) -> None:
    """cache_teacher.py offers no `--align_logits name` and its builder refuses it in one line."""
    import cache_teacher
    from kdcore.errors import UserError

    with pytest.raises(SystemExit):
        cache_teacher.build_parser().parse_args(["--pipeline_dir", "p", "--teacher_name", "t", "--align_logits",
                                                 name, "--out", "o"])
    assert f"invalid choice: '{name}'" in capsys.readouterr().err
    with pytest.raises(UserError, match=f"{name} cannot be cached"):
        cache_teacher.build(cache_teacher.CacheParams("p", "t", name, "o"))
