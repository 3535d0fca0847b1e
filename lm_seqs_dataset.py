"""`LmSeqsDataset` over memory-mapped shards, and the batch collator.

A dataset holds the shards of one training process (rank), split into train (the first
1 - valid_prop of every shard) and validation (the rest). Batches are gathered by index with
vectorised ragged selection and padded into tensors by `Collator`, which also builds the t2s input:
every teacher token replaced by its student split, with the teacher position each piece came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kdcore.shard_io import Shard, ragged_take, segment_ids


@dataclass
class RawBatch:
    """Flat (ragged) arrays of one batch, in batch order; `cache`: the teacher-cache rows of its sequences
    ({array: [R, w]}, `kdcore.teacher_cache`), when the dataset has a cache."""

    t_ids: np.ndarray
    t_lengths: np.ndarray
    s_ids: np.ndarray
    s_lengths: np.ndarray
    t_match: np.ndarray | None
    s_match: np.ndarray | None
    cache: dict[str, np.ndarray] | None = None


class LmSeqsDataset:
    """The train or validation part of a list of shards; items are addressed by a global index."""

    def __init__(self, shards: list[Shard], valid_prop: float, split: str, cache: list | None = None):
        """cache: one `teacher_cache.CacheShard` per shard (its rows are gathered with the sequences), or None."""
        if split not in ("train", "valid"):
            raise ValueError(f"split must be train or valid, not {split}")
        self.shards, self.cache = shards, cache
        self.ranges = []
        for shard in shards:
            n_valid = math.ceil(valid_prop * len(shard)) if valid_prop > 0 else 0
            cut = len(shard) - n_valid
            self.ranges.append((0, cut) if split == "train" else (cut, len(shard)))
        sizes = [hi - lo for lo, hi in self.ranges]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.has_match = all(shard.match is not None for shard in shards)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        which = np.searchsorted(self.starts, indices, side="right") - 1
        local = indices - self.starts[which] + np.array([lo for lo, _ in self.ranges], dtype=np.int64)[which]
        return which, local

    def lengths(self, side: str) -> np.ndarray:
        """[len(self)] sequence lengths of one side ("teacher" or "student")."""
        return np.concatenate([shard.lengths(side)[lo:hi] for shard, (lo, hi) in zip(self.shards, self.ranges)]
                              or [np.zeros(0, np.int64)])

    def gather(self, indices) -> RawBatch:
        """The sequences at `indices` as flat arrays (grouped by shard, in index order within a shard)."""
        indices = np.asarray(indices, dtype=np.int64)
        which, local = self._locate(indices)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("t", "tl", "s", "sl", "tm", "sm")}
        cached: list[dict[str, np.ndarray]] = []
        for k in np.unique(which):
            shard, sel = self.shards[k], local[which == k]
            if self.cache is not None:
                cached.append(self.cache[k].take(sel))
            for side, ids_key, len_key, match_key in (("teacher", "t", "tl", "tm"), ("student", "s", "sl", "sm")):
                ids, lengths = ragged_take(shard.ids[side], shard.offsets[side], sel)
                parts[ids_key].append(ids)
                parts[len_key].append(lengths)
                if self.has_match:
                    parts[match_key].append(ragged_take(shard.match[side], shard.offsets[side], sel)[0])
        cat = {k: np.concatenate(v) if v else None for k, v in parts.items()}
        cache = {name: np.concatenate([c[name] for c in cached]) for name in cached[0]} if cached else None
        return RawBatch(cat["t"], cat["tl"], cat["s"], cat["sl"], cat["tm"], cat["sm"], cache)


def pad_ragged(flat: np.ndarray, lengths: np.ndarray, pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 [B, max_len] padded with `pad_value`, bool [B, max_len] mask of real positions)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rows = segment_ids(lengths)
    cols = np.arange(len(flat), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    width = int(lengths.max(initial=0))
    out = np.full((len(lengths), width), pad_value, dtype=np.int64)
    mask = np.zeros((len(lengths), width), dtype=bool)
    out[rows, cols] = flat
    mask[rows, cols] = True
    return torch.from_numpy(out), torch.from_numpy(mask)


class Collator:
    """Pads a `RawBatch` into tensors; with a `t2s_padded` map it also builds the t2s input.

    `t2s_padded` is int [V_T, S] padded with `n_student` (= V_S).
    Output keys (B = batch size):
    - `t_ids`, `t_mask`: int64/bool [B, Lt] teacher tokens; `s_ids`, `s_mask`: [B, Ls] student tokens;
    - `t_match`, `s_match`: bool [B, Lt], [B, Ls] matched positions (when the shards have them);
    - `t2s_ids`, `t2s_mask`: int64/bool [B, L2] the teacher tokens' student splits, concatenated;
      `t2s_segment`: int64 [B, L2], for every piece the index of its teacher token among the real teacher
      positions of the batch in row-major order (`t_ids[t_mask]`), -1 at padding;
    - `cache.<array>`: the teacher-cache rows of the batch (R rows, in the row-major order of the teacher
      positions the alignment reads), as `cache_encoding.to_tensors` makes them, when the batch carries them.
    """

    def __init__(self, t_pad_id: int, s_pad_id: int, t2s_padded: np.ndarray | None = None, n_student: int = 0,
                 cache_encoding=None):
        self.t_pad_id, self.s_pad_id = t_pad_id, s_pad_id
        self.t2s_padded, self.n_student = t2s_padded, n_student
        self.cache_encoding = cache_encoding
        if t2s_padded is not None:
            self.n_pieces = (t2s_padded != n_student).sum(axis=1)

    def __call__(self, raw: RawBatch, with_t2s: bool = False) -> dict[str, torch.Tensor]:
        batch = {}
        batch["t_ids"], batch["t_mask"] = pad_ragged(raw.t_ids, raw.t_lengths, self.t_pad_id)
        batch["s_ids"], batch["s_mask"] = pad_ragged(raw.s_ids, raw.s_lengths, self.s_pad_id)
        if raw.t_match is not None:
            batch["t_match"] = pad_ragged(raw.t_match, raw.t_lengths, 0)[0].bool()
            batch["s_match"] = pad_ragged(raw.s_match, raw.s_lengths, 0)[0].bool()
        if with_t2s:
            if self.t2s_padded is None:
                raise ValueError("the collator needs a t2s_padded map to build t2s inputs")
            pieces = self.t2s_padded[raw.t_ids]
            piece_ids = pieces[pieces != self.n_student]
            per_token = self.n_pieces[raw.t_ids]
            token_of_piece = np.repeat(np.arange(len(raw.t_ids), dtype=np.int64), per_token)
            t2s_lengths = np.bincount(segment_ids(raw.t_lengths), weights=per_token,
                                      minlength=len(raw.t_lengths)).astype(np.int64)
            batch["t2s_ids"], batch["t2s_mask"] = pad_ragged(piece_ids, t2s_lengths, self.s_pad_id)
            batch["t2s_segment"] = pad_ragged(token_of_piece, t2s_lengths, -1)[0]
        if raw.cache is not None and self.cache_encoding is not None:
            batch.update({f"cache.{name}": value for name, value in self.cache_encoding.to_tensors(raw.cache).items()})
        return batch
