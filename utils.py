"""Process-level helpers for training: torchrun/distributed init, device choice, seeding, RNG state,
memory readings, git information and the AdamW constructor of both trainers."""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import psutil
import torch
import torch.distributed as dist

from errors import UserError


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
        return self.world_size > 1


def choose_device(preference: str, local_rank: int = 0) -> torch.device:
    """`auto`: the local GPU when there is one, else the CPU; `cuda` fails clearly without a GPU."""
    if preference not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {preference} must be auto, cpu or cuda")
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is visible; use --device cpu or auto")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and join the process
    group: nccl for GPUs, gloo for CPU processes. Without torchrun: a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_preference, local_rank)
    backend = None
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device, backend)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
