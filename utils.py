"""Process-level helpers for training: torchrun/distributed init and tear-down, device choice, seeding, RNG
state, memory readings, git information and the AdamW constructor of both trainers."""

from __future__ import annotations

import datetime
import gc
import importlib
import logging
import os
import random
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import psutil
import torch
import torch.distributed as dist

from kdcore.errors import UserError, run_cli


@dataclass
class DistInfo:
    """Where this process runs: rank, world size, device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when this process joined a process group (every torchrun launch, even of one process)."""
        return self.backend is not None


def choose_device(preference: str, local_rank: int = 0) -> torch.device:
    """`auto`: the local GPU when there is one, else the CPU; `cuda` fails clearly without a GPU."""
    if preference not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {preference} must be auto, cpu or cuda")
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is visible; use --device cpu or auto")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device_preference: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and join the process
    group: nccl for GPUs, gloo for CPU processes. A torchrun launch joins even with one process (its
    TORCHELASTIC_RUN_ID is set), so that one GPU runs the same nccl, DDP and collective code as many. Without
    torchrun: a single process, no group. A process that joined leaves with `shutdown_distributed` (success)
    and ends with `end_process` (any outcome). A collective that waits `timeout_s` seconds for a peer fails."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_preference, local_rank)
    backend = None
    if world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            # torch 2.13: importing torch._dynamo *after* init_process_group (DistributedDataParallel's constructor
            # does, through torch._dynamo.utils.get_optimize_ddp_mode) adds 10 references to the default group
            # that destroy_process_group never drops (sys.getrefcount of the group after destroy: 12 instead of 2),
            # so ~ProcessGroupGloo, the only code that joins gloo's worker threads, never runs and the threads
            # outlive the interpreter (see shutdown_distributed). Imported first, it takes no such references:
            # 2 live "pt_gloo_runloop" threads after destroy_process_group without this import, 0 with it.
            importlib.import_module("torch._dynamo")

            dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world_size, local_rank, device, backend)


GLOO_WORKER_THREAD = "pt_gloo_runloop"
"""The name torch gives ProcessGroupGloo's worker threads (Linux thread name, /proc/self/task/*/comm)."""


def live_threads(name: str) -> int:
    """Threads of this process named `name` (Linux; 0 where /proc is missing)."""
    tasks = Path("/proc/self/task")
    count = 0
    for task in tasks.iterdir() if tasks.is_dir() else ():
        try:
            count += (task / "comm").read_text().strip() == name
        except OSError:  # the thread ended while we looked
            continue
    return count


def shutdown_distributed(dist_info: DistInfo) -> None:
    """Leave the process group on success: every rank calls this after its last collective and after dropping its
    DistributedDataParallel module.

    Root cause of the abort it prevents ("terminate called without an active exception", SIGABRT, seen in ~1 of 15
    2-process gloo runs; core dump of torch 2.13): a gloo worker thread (ProcessGroupGloo::runLoop) releases the
    work object of a finished collective (here all_gather_object's) a moment after the main thread has returned
    from wait(); the work holds Python-owned tensors, so its destructor takes the GIL; when the main thread has
    already begun interpreter finalization, take_gil ends the thread with a forced unwind through a noexcept
    frame, and std::terminate aborts the process. destroy_process_group does not join gloo's workers; only the
    destructor of ProcessGroupGloo does, when the last reference goes. Hence, in order: a barrier (no rank tears
    down while a peer still communicates), garbage collection (DDP's reference cycles hold the group), destroy,
    and a second collection, after which the workers are joined while the interpreter is fully alive."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.barrier(device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None)
    dist.destroy_process_group()
    gc.collect()


def end_process(code: int) -> NoReturn:
    """Exit a process that may have joined a process group, with `code`.

    Normally `sys.exit`. When the process group is still joined (a rank that failed: a collective tear-down could
    wait forever for peers that are busy elsewhere) or gloo worker threads survived `shutdown_distributed` (a
    torch version that holds the group elsewhere), interpreter finalization is skipped: logs and streams are
    flushed, then `os._exit(code)`. The exit is not collective; torchrun sees the code and stops the peers."""
    if (dist.is_available() and dist.is_initialized()) or live_threads(GLOO_WORKER_THREAD):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def run_process(main: Callable[[list[str] | None], int]) -> NoReturn:
    """The `__main__` of an entry that may join a process group: `run_cli(main)` (a `UserError` is one line and
    code 2), any other exception printed with its traceback and code 1, then `end_process`."""
    try:
        code = run_cli(main)
    except KeyboardInterrupt:
        code = 130
    except Exception:
        traceback.print_exc()
        code = 1
    end_process(code)


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global RNG states of python, numpy and torch (CPU and current CUDA device), for checkpoints.
    Only tensors, ints, strings and nested lists/dicts: loadable with torch.load(weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def memory_mb(device: torch.device) -> dict[str, float]:
    """Resident memory of this process and, on a GPU, the peak allocated memory (MiB)."""
    out = {"rss_mb": psutil.Process().memory_info().rss / 2**20}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


FUSED_ADAMW_DEVICES = ("cpu", "cuda")
"""Device types on which `adamw` uses torch's fused AdamW kernel."""


def adamw(param_groups: Iterable[dict], **options) -> torch.optim.AdamW:
    """`torch.optim.AdamW(param_groups, **options)`, fused (one multi-tensor kernel per device and dtype
    instead of a dozen ops per parameter; the same update) when every parameter is a floating-point tensor
    on a device of `FUSED_ADAMW_DEVICES`, the default implementation otherwise. The fused optimizer takes
    `torch.amp.GradScaler`'s inf checks (a step with inf/NaN gradients is skipped) and loads the state dicts
    of either implementation."""
    groups = list(param_groups)
    fused = all(torch.is_floating_point(p) and p.device.type in FUSED_ADAMW_DEVICES
                for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, fused=True if fused else None, **options)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, keeping the optimizer's own implementation (torch takes every group
    option from the saved groups, `fused` included: a checkpoint of the default AdamW would make a fused
    optimizer the default one again, and a fused checkpoint would force fused onto this run)."""
    groups = [dict(saved) for saved in state["param_groups"]]
    for saved, group in zip(groups, optimizer.param_groups):
        saved["fused"] = group.get("fused")
    optimizer.load_state_dict({**state, "param_groups": groups})


def git_info(path: str | os.PathLike) -> dict:
    """Commit, branch and dirtiness of the repository containing `path` (empty when there is none)."""
    try:
        import git

        repo = git.Repo(path, search_parent_directories=True)
        return {"commit": repo.head.commit.hexsha, "branch": None if repo.head.is_detached else repo.active_branch.name,
                "dirty": repo.is_dirty(untracked_files=False), "path": repo.working_tree_dir}
    except Exception as err:  # git state is informative only; any failure means "unknown"
        return {"error": type(err).__name__}


def param_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, in name order: equal digests mean bitwise-equal weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim ok
    return digest.hexdigest()
