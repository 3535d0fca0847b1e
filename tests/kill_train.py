"""Test-only fault injection into a training process: `python tests/kill_train.py FAULT N -- TRAIN_ARGS...` runs
train.py's entry with one fault planted, then behaves as `python train.py TRAIN_ARGS...`.

FAULT (N counts from 1):
- forward: SIGKILL this process inside the N-th loss computation (after the forward, before its backward);
- between_steps: SIGKILL right after the N-th optimizer step;
- checkpoint: SIGKILL in the N-th checkpoint write, after its model file, before the rest (a half-written temp);
- export: SIGKILL in the final export, after its N-th file was moved into --dump_path (a mixed directory);
- rank1_between_steps: as between_steps, in the torchrun process of rank 1 only (a dead rank).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def after_nth(fn, n: int, when=lambda *a, **k: True):
    """`fn` that kills the process after its n-th call for which `when(*args)` holds."""
    calls = 0

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal calls
        out = fn(*args, **kwargs)
        if when(*args, **kwargs):
            calls += 1
            if calls == n:
                die()
        return out

    return wrapper


def plant(fault: str, n: int, train_args: list[str]) -> None:
    import distiller

    if fault == "forward":
        distiller.Distiller._losses = after_nth(distiller.Distiller._losses, n)
    elif fault == "between_steps":
        distiller.Distiller._apply_update = after_nth(distiller.Distiller._apply_update, n)
    elif fault == "rank1_between_steps":
        if os.environ.get("RANK") == "1":
            distiller.Distiller._apply_update = after_nth(distiller.Distiller._apply_update, n)
    elif fault == "checkpoint":
        distiller.save_model = after_nth(distiller.save_model, n)
    elif fault == "export":
        dump = Path(train_args[train_args.index("--dump_path") + 1]).resolve()
        os.replace = after_nth(os.replace, n, lambda src, dst: Path(dst).resolve().parent == dump
                               and Path(src).parent.name.startswith(".export.tmp-"))
    else:
        raise SystemExit(f"unknown fault {fault}")


if __name__ == "__main__":
    fault, n, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: kill_train.py FAULT N -- TRAIN_ARGS..."
    plant(fault, int(n), args)
    sys.argv = [str(ROOT / "train.py"), *args]
    from train import main
    from utils import run_process

    run_process(main)
