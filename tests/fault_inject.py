"""Test-only fault injection into train.py's training loop (no user flag): NaN loss terms or +inf gradients at
chosen micro-batches of chosen processes.

    python tests/fault_inject.py [--nan_at 3,4] [--terms loss_ce,loss_mlm] [--inf_grad_at 5] [--ranks 1] -- TRAIN_ARGS
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fault_inject.py ... -- TRAIN_ARGS

Micro-batches are this process's training calls of `Distiller._losses`, counted from 1 (with
--gradient_accumulation_steps k, update u holds micro-batches (u-1)k+1 .. uk). At a `--nan_at` micro-batch the
`--terms` become NaN, and so do the total loss and every gradient; at an `--inf_grad_at` one the loss stays finite
and the gradient reaching it becomes +inf. In-process: `with inject(nan_at={3}, terms=("loss_ce",)): main(argv)`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


@contextmanager
def inject(nan_at: Collection[int] = (), terms: Collection[str] = ("loss_mlm",), inf_grad_at: Collection[int] = (),
           ranks: Collection[int] | None = None) -> Iterator[None]:
    """Patch `Distiller._losses` for the duration: faults at the given micro-batches (1-based) of `ranks` (None:
    every rank). A term that the run does not compute is a KeyError."""
    from distiller import Distiller

    original = Distiller._losses
    calls = 0

    def losses(self, batch, generator):
        nonlocal calls
        total, parts = original(self, batch, generator)
        calls += 1
        if ranks is not None and self.dist.rank not in ranks:
            return total, parts
        if calls in nan_at:
            nan = torch.tensor(float("nan"), device=total.device)
            parts = {**parts, **{term: parts[term] * nan for term in terms}}
            total = total * nan
        if calls in inf_grad_at:
            total.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        return total, parts

    Distiller._losses = losses
    try:
        yield
    finally:
        Distiller._losses = original


def numbers(text: str) -> set[int]:
    return {int(x) for x in text.split(",") if x}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nan_at", type=numbers, default=set())
    p.add_argument("--terms", default="loss_mlm")
    p.add_argument("--inf_grad_at", type=numbers, default=set())
    p.add_argument("--ranks", type=numbers)
    a = p.parse_args(argv[:split])
    from train import main as train_main

    with inject(a.nan_at, a.terms.split(","), a.inf_grad_at, a.ranks):
        return train_main(argv[split + 1:])


if __name__ == "__main__":
    from utils import run_process

    run_process(main)
