"""A torchrun worker for tests/test_dist_shutdown.py: joins the process group the way train.py does, then either
shuts down (`ok`: a DDP model, a few synchronised steps, all_gather_object, then the ordered tear-down; prints the
gloo worker threads still alive) or fails on rank 1 while rank 0 waits in a collective (`fail`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from kdcore.errors import UserError
from utils import GLOO_WORKER_THREAD, init_distributed, live_threads, run_process, shutdown_distributed


def steps(rank: int) -> None:
    """Three DDP updates and the all_gather_object whose work object the abort came from."""
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    for _ in range(3):
        model(torch.full((2, 4), float(rank))).sum().backward()
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, rank)


def main(argv: list[str] | None) -> int:
    mode = (argv or sys.argv[1:])[0]
    info = init_distributed("cpu")
    if mode == "fail":
        if info.rank == 1:
            raise UserError("rank 1 failed on purpose")
        dist.barrier()  # never completes: rank 1 is gone
        return 0
    steps(info.rank)
    alive = live_threads(GLOO_WORKER_THREAD)
    shutdown_distributed(info)
    print(f"rank {info.rank}: gloo workers before shutdown {alive}, after {live_threads(GLOO_WORKER_THREAD)}",
          flush=True)
    return 0


if __name__ == "__main__":
    run_process(main)
