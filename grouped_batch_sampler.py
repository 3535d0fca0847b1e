"""Length-grouped, reproducible and resumable batch sampler.

Batches hold sequences of similar length (less padding work) yet come in a random order. An epoch's order
depends only on (seed, epoch), and the sampler's position is part of its state, so a run restored from a
checkpoint continues with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class GroupedBatchSampler:
    """Yields int64 index arrays of at most `batch_size` items.

    lengths: [n] sequence lengths (tokens). With `group_by_size`, indices are shuffled, then stably sorted by
    length bin (`length // bin_width`), cut into consecutive batches, and the batches are shuffled; without it
    the shuffled indices are cut directly. `num_batches` caps the batches per epoch (used to give every
    process the same count); `drop_last` drops a final short batch.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, *, bin_width: int = 4, group_by_size: bool = True,
                 seed: int = 0, drop_last: bool = False, num_batches: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if bin_width < 1:
            raise ValueError(f"bin_width must be >= 1, got {bin_width}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.bin_width, self.group_by_size = batch_size, bin_width, group_by_size
        self.seed, self.drop_last = seed, drop_last
        n = len(self.lengths)
        full = n // batch_size if drop_last else -(-n // batch_size)
        if num_batches is not None and not 0 <= num_batches <= full:
            raise ValueError(f"num_batches {num_batches} is outside [0, {full}]")
        self.n_batches = full if num_batches is None else num_batches
        self.epoch, self.batches_done = 0, 0

    def __len__(self) -> int:
        return self.n_batches

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its first batch."""
        self.epoch, self.batches_done = epoch, 0

    def batches(self, epoch: int) -> list[np.ndarray]:
        """Every batch of `epoch`, in order (a pure function of seed, epoch and the lengths)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        if self.group_by_size:
            order = order[np.argsort(self.lengths[order] // self.bin_width, kind="stable")]
        cuts = np.arange(self.batch_size, len(order), self.batch_size)
        chunks = np.split(order, cuts) if len(order) else []
        if self.drop_last and chunks and len(chunks[-1]) < self.batch_size:
            chunks = chunks[:-1]
        if self.group_by_size:
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        return chunks[: self.n_batches]

    def __iter__(self) -> Iterator[np.ndarray]:
        chunks = self.batches(self.epoch)
        while self.batches_done < len(chunks):
            batch = chunks[self.batches_done]
            self.batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not 0 <= int(state["batches_done"]) <= self.n_batches:
            raise ValueError(f"sampler state {state} does not fit {self.n_batches} batches per epoch: the data "
                             "changed since the checkpoint")
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
