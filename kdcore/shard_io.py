"""The shard format: writer and reader, used by the preprocessing steps and by `lm_seqs_dataset.py`.

A shard set is a directory with `index.json` and shard subdirectories `shard_00000/`, ... Each shard
holds both tokenizations of the same texts as flat token arrays plus offsets:

| file | dtype | shape | meaning |
|---|---|---|---|
| `teacher_ids.npy` | smallest uint for V_T | [T] | teacher tokens of all sequences, `[CLS] ... [SEP]` each |
| `teacher_offsets.npy` | int64 | [n+1] | sequence i is `teacher_ids[off[i]:off[i+1]]` |
| `student_ids.npy`, `student_offsets.npy` | as above | [S], [n+1] | the student's own tokenization |
| `teacher_match.npy`, `student_match.npy` | uint8 | [T], [S] | optional (step 9): 1 where the token is matched |
| `shard.json` | | | format, counts, dtypes, vocabulary sizes, tokenizer fingerprints |

Arrays are `.npy` files read with `allow_pickle=False` and memory-mapped, so memory does not grow with
the corpus. Writers stream blocks to disk and publish a shard only when it is complete (temp name, then
rename), so a killed run never leaves a half-written shard behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdcore.artifacts import read_npy
from kdcore.errors import UserError
from kdcore.fsutil import DISK_FIX, atomic_save_npy, atomic_write_json, publish_dir, temp_sibling, writing
from kdcore.tokenizer_utils import smallest_uint

FORMAT = "rvkd-shard/1"
INDEX = "index.json"
META = "shard.json"
SIDES = ("teacher", "student")
_HEADER_BYTES = 128  # fixed .npy header size, rewritten with the final shape on close


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    header = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)})
    body_len = _HEADER_BYTES - 10
    text = header.ljust(body_len - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + text.encode("latin1")


class NpyStreamWriter:
    """Append 1-D blocks of one dtype to a `.npy` file whose length is unknown in advance."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.count = 0
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._fh.write(b"\0" * _HEADER_BYTES)

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        self._fh.write(block.tobytes())
        self.count += block.size

    def close(self) -> None:
        self._fh.seek(0)
        self._fh.write(_npy_header(self.dtype, self.count))
        self._fh.close()


def ragged_indices(offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int64 positions of the elements of sequences `idx` of a ragged array with `offsets`, in that order; their
    lengths). Vectorised."""
    idx = np.asarray(idx, dtype=np.int64)
    starts = offsets[idx]
    lengths = offsets[idx + 1] - starts
    total = int(lengths.sum())
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift, lengths


def ragged_take(flat: np.ndarray, offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Select sequences `idx` of a ragged array: (their tokens concatenated, their lengths). Vectorised."""
    positions, lengths = ragged_indices(offsets, idx)
    return (flat[positions] if positions.size else flat[:0].copy()), lengths


def segment_ids(lengths: np.ndarray) -> np.ndarray:
    """[sum(lengths)] index of the sequence each token belongs to."""
    return np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)


def offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    """[n+1] int64 offsets of sequences with these lengths."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


@dataclass
class Block:
    """A run of consecutive sequences of one shard, in memory. Match arrays are None before step 9."""

    t_ids: np.ndarray
    t_lengths: np.ndarray
    s_ids: np.ndarray
    s_lengths: np.ndarray
    t_match: np.ndarray | None = None
    s_match: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.t_lengths)


class ShardWriter:
    """Stream sequences into a new shard directory; published atomically by `close()`.

    Use as a context manager: an exception discards the partial shard.
    """

    def __init__(self, directory: str | os.PathLike, teacher_vocab_size: int, student_vocab_size: int,
                 fingerprints: dict[str, str]):
        self.final = Path(directory)
        self.tmp = temp_sibling(self.final)
        self.vocab_sizes = {"teacher": int(teacher_vocab_size), "student": int(student_vocab_size)}
        self.fingerprints = dict(fingerprints)
        self.n_seqs = 0
        self._ids = {s: NpyStreamWriter(self.tmp / f"{s}_ids.npy", smallest_uint(self.vocab_sizes[s] - 1))
                     for s in SIDES}
        self._lengths: dict[str, list[np.ndarray]] = {s: [] for s in SIDES}

    def add(self, block: Block) -> None:
        """Append the sequences of `block` (match arrays are ignored: step 9 writes them)."""
        if len(block.t_lengths) != len(block.s_lengths):
            raise ValueError("teacher and student blocks hold different numbers of sequences")
        for side, ids, lengths in (("teacher", block.t_ids, block.t_lengths), ("student", block.s_ids, block.s_lengths)):
            if ids.size and int(ids.max()) >= self.vocab_sizes[side]:
                raise ValueError(f"{side} token id {int(ids.max())} >= vocabulary size {self.vocab_sizes[side]}")
            if int(lengths.sum()) != ids.size:
                raise ValueError(f"{side} lengths do not add up to the number of tokens")
            with writing(self.final, "shard", DISK_FIX):
                self._ids[side].append(ids)
            self._lengths[side].append(np.asarray(lengths, dtype=np.int64))
        self.n_seqs += len(block.t_lengths)

    def close(self) -> dict:
        """Finish the files, write `shard.json`, publish the directory; returns the metadata. A failed write
        removes the temp directory and is a one-line `UserError`."""
        meta = {"format": FORMAT, "n_seqs": self.n_seqs, "has_match": False, "fingerprints": self.fingerprints}
        try:
            with writing(self.final, "shard", DISK_FIX):
                for side in SIDES:
                    self._ids[side].close()
                    lengths = np.concatenate(self._lengths[side]) if self._lengths[side] else np.zeros(0, np.int64)
                    np.save(self.tmp / f"{side}_offsets.npy", offsets_from_lengths(lengths), allow_pickle=False)
                    meta[f"{side}_vocab_size"] = self.vocab_sizes[side]
                    meta[f"{side}_dtype"] = self._ids[side].dtype.name
                    meta[f"n_{side}_tokens"] = self._ids[side].count
                atomic_write_json(self.tmp / META, meta)
                publish_dir(self.tmp, self.final)
        except BaseException:
            self.abort()
            raise
        return meta

    def abort(self) -> None:
        for writer in self._ids.values():
            if not writer._fh.closed:
                writer._fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(f"corrupt or truncated shard file {path}: {why}; re-run the preprocessing step that "
                     "wrote it with --force")


def _load_npy(path: Path, dtype: np.dtype | None = None) -> np.ndarray:
    if not path.is_file():
        raise _corrupt(path, "file is missing")
    arr = read_npy(path, True, lambda why: _corrupt(path, why))
    if arr.ndim != 1 or (dtype is not None and arr.dtype != dtype):
        raise _corrupt(path, f"expected a 1-D {dtype} array, found {arr.ndim}-D {arr.dtype}")
    return arr


class Shard:
    """Read-only, memory-mapped view of one shard directory, validated on open."""

    def __init__(self, directory: str | os.PathLike, check_ids: bool = True):
        self.dir = Path(directory)
        meta_path = self.dir / META
        if not meta_path.is_file():
            raise _corrupt(meta_path, "file is missing")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _corrupt(meta_path, str(err)) from err
        if self.meta.get("format") != FORMAT:
            raise _corrupt(meta_path, f"format {self.meta.get('format')!r} is not {FORMAT!r}")
        self.n_seqs = int(self.meta["n_seqs"])
        self.ids: dict[str, np.ndarray] = {}
        self.offsets: dict[str, np.ndarray] = {}
        self.match: dict[str, np.ndarray] | None = {} if self.meta.get("has_match") else None
        for side in SIDES:
            ids_path, off_path = self.dir / f"{side}_ids.npy", self.dir / f"{side}_offsets.npy"
            ids = _load_npy(ids_path, np.dtype(self.meta[f"{side}_dtype"]))
            off = _load_npy(off_path, np.dtype(np.int64))
            if len(off) != self.n_seqs + 1 or ids.size != self.meta[f"n_{side}_tokens"]:
                raise _corrupt(ids_path, f"{ids.size} tokens / {len(off) - 1} sequences, shard.json says "
                                         f"{self.meta[f'n_{side}_tokens']} / {self.n_seqs}")
            if off[0] != 0 or off[-1] != ids.size or np.any(np.diff(off) < 0):
                raise _corrupt(off_path, "offsets are not a non-decreasing sequence from 0 to the token count")
            if check_ids and ids.size and int(ids.max()) >= self.meta[f"{side}_vocab_size"]:
                raise _corrupt(ids_path, f"token id {int(ids.max())} >= vocabulary size "
                                         f"{self.meta[f'{side}_vocab_size']}")
            self.ids[side], self.offsets[side] = ids, off
            if self.match is not None:
                match_path = self.dir / f"{side}_match.npy"
                match = _load_npy(match_path, np.dtype(np.uint8))
                if match.size != ids.size:
                    raise _corrupt(match_path, f"{match.size} entries for {ids.size} tokens")
                self.match[side] = match

    def __len__(self) -> int:
        return self.n_seqs

    @property
    def fingerprints(self) -> dict[str, str]:
        return self.meta["fingerprints"]

    def lengths(self, side: str) -> np.ndarray:
        """[n] int64 sequence lengths of one side."""
        return np.diff(self.offsets[side])

    def block(self, start: int, stop: int) -> Block:
        """Sequences start..stop-1 copied into memory."""
        parts = {}
        for side in SIDES:
            off = self.offsets[side]
            lo, hi = int(off[start]), int(off[stop])
            parts[side] = (np.array(self.ids[side][lo:hi]), np.diff(off[start:stop + 1]),
                           None if self.match is None else np.array(self.match[side][lo:hi]))
        (t_ids, t_len, t_m), (s_ids, s_len, s_m) = parts["teacher"], parts["student"]
        return Block(t_ids, t_len, s_ids, s_len, t_m, s_m)

    def blocks(self, block_size: int) -> Iterator[Block]:
        """Consecutive blocks of at most `block_size` sequences."""
        for start in range(0, self.n_seqs, block_size):
            yield self.block(start, min(start + block_size, self.n_seqs))

    def write_match(self, t_match: np.ndarray, s_match: np.ndarray) -> None:
        """Add (or replace) the match masks of this shard atomically and mark it in shard.json."""
        for side, arr in (("teacher", t_match), ("student", s_match)):
            if arr.size != self.ids[side].size:
                raise ValueError(f"{side} match mask has {arr.size} entries for {self.ids[side].size} tokens")
            atomic_save_npy(self.dir / f"{side}_match.npy", np.asarray(arr, dtype=np.uint8))
        self.meta["has_match"] = True
        atomic_write_json(self.dir / META, self.meta)


class ShardSetWriter:
    """Write the shards of a new shard set into a temp directory, then publish it with its index."""

    def __init__(self, directory: str | os.PathLike, teacher_vocab_size: int, student_vocab_size: int,
                 fingerprints: dict[str, str]):
        self.final = Path(directory)
        self.tmp = temp_sibling(self.final)
        self.args = (teacher_vocab_size, student_vocab_size, fingerprints)
        self.shards: list[dict] = []

    def new_shard(self) -> ShardWriter:
        """A writer for the next shard `shard_{k:05d}` of this set (several may be open at once)."""
        writer = ShardWriter(self.tmp / f"shard_{len(self.shards):05d}", *self.args)
        self.shards.append({"name": writer.final.name})
        return writer

    def close(self, extra: dict | None = None) -> dict:
        """Write `index.json` (shard names and counts, `extra` fields) and publish the set."""
        names = [s["name"] for s in self.shards]
        metas = [json.loads((self.tmp / n / META).read_text(encoding="utf-8")) for n in names]
        t_vocab, s_vocab, fingerprints = self.args
        index = {
            "format": FORMAT,
            "shards": [{"name": n, "n_seqs": m["n_seqs"], "n_teacher_tokens": m["n_teacher_tokens"],
                        "n_student_tokens": m["n_student_tokens"]} for n, m in zip(names, metas)],
            "n_seqs": sum(m["n_seqs"] for m in metas),
            "teacher_vocab_size": t_vocab,
            "student_vocab_size": s_vocab,
            "fingerprints": fingerprints,
            **(extra or {}),
        }
        atomic_write_json(self.tmp / INDEX, index)
        publish_dir(self.tmp, self.final)
        return index

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def read_index(directory: str | os.PathLike) -> dict:
    """The `index.json` of a shard set, with a one-line error when it is missing or unreadable."""
    path = Path(directory) / INDEX
    if not Path(directory).is_dir():
        raise UserError(f"shard directory {directory} does not exist; run the preprocessing pipeline first")
    if not path.is_file():
        raise UserError(f"{path} is missing: {directory} is not a complete shard set; re-run the "
                        "preprocessing step that writes it with --force")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _corrupt(path, str(err)) from err
    if index.get("format") != FORMAT:
        raise _corrupt(path, f"format {index.get('format')!r} is not {FORMAT!r}")
    return index


def open_shards(directory: str | os.PathLike, check_ids: bool = True) -> list[Shard]:
    """All shards of a shard set, validated."""
    index = read_index(directory)
    return [Shard(Path(directory) / s["name"], check_ids=check_ids) for s in index["shards"]]
