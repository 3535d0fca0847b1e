"""The teacher-output cache (DESIGN.md s.10): the teacher's distribution at the rows and over the columns that a
cross-vocabulary alignment reads, computed once (`preprocessing/cache_teacher.py`) and read by `train.py
--teacher_cache DIR` instead of running the teacher every step.

For match, reduce and reduce_map the teacher reads its own, unmasked tokens, so its outputs are a fixed function
of the corpus. A cache stores, for every binarized shard, one row per teacher position that the alignment reads
(`Positions.teacher_row_flags`: matched positions, or every teacher position), in the shard's token order, each
row a distribution over the alignment's teacher columns at the run's temperature, in one of three encodings:

| encoding | arrays per row | what the KL becomes | bytes per row |
|---|---|---|---|
| `exact` | `log_probs` [C] (fp32, fp16 or bf16) | the exact KL (`custom_step.kl_div_from_log_probs`) | C x 4 / 2 |
| `topk` K | `columns` [K], `probs` [K] (+ the tail mass, implied) | KL over K classes + one tail class (biased) | K x (4 + 2/4) |
| `sample` K | `columns` [K] (K draws with replacement), `entropy` | unbiased estimate of the KL and of its gradient | K x 2/4 + 4 |

`sample` follows "random sampling KD" (Anshumann et al., ACL 2025: sparse logits sampled from the teacher keep
the gradient unbiased, where top-k does not), with the teacher itself as the proposal: every draw weighs 1 / K.

Layout of a cache directory: `cache.json` (the header, written last: format, encoding, temperature, the
alignment's name and columns, fingerprints of the teacher weights and tokenizer and of the shards, one entry per
shard) and one directory per binarized shard (`shard_00000/`: `offsets.npy` int64 [n_seqs + 1] row offsets per
sequence, the encoding's arrays as flat `.npy` files, `rows.json`). A shard directory is published by an atomic
rename, so a killed build leaves complete shards only, and a rerun skips them (their `rows.json` carries the
signature of the build's parameters).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from custom_step import kl_div_from_log_probs, kl_div_sampled, kl_div_top_k
from kdcore.artifacts import read_npy
from kdcore.errors import UserError
from kdcore.shard_io import ragged_indices
from kdcore.tokenizer_utils import smallest_uint

CACHE_FORMAT = "rvkd-teacher-cache/1"
HEADER = "cache.json"
ROWS_META = "rows.json"
DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "bf16": np.dtype(np.uint16)}
"""Storage of probabilities: bf16 is kept as its 16-bit pattern (numpy has no bfloat16)."""


def _to_numpy(values: Tensor, dtype: str) -> np.ndarray:
    values = values.detach().float().cpu()
    if dtype == "bf16":
        return values.to(torch.bfloat16).view(torch.uint16).numpy()
    return values.numpy().astype(DTYPES[dtype])


def _from_numpy(array: np.ndarray, dtype: str) -> Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16).float() if dtype == "bf16" else tensor.float()


class Encoding:
    """How a row of teacher probabilities is stored and how the KL is computed from it; `approximation` says what
    the KL loses (None: exact)."""

    name: ClassVar[str]
    approximation: ClassVar[str | None] = None

    def __init__(self, k: int, dtype: str, n_columns: int):
        self.k, self.dtype, self.n_columns = k, dtype, n_columns

    def describe(self) -> dict:
        return {"name": self.name, "k": self.k, "dtype": self.dtype}

    def widths(self) -> dict[str, tuple[int, np.dtype]]:
        """{array name: (values per row, numpy dtype)}."""
        raise NotImplementedError

    def encode(self, log_p: Tensor, generator: torch.Generator) -> dict[str, np.ndarray]:
        """fp32 [N, C] teacher log-probabilities at T -> {array: [N, width]} numpy arrays."""
        raise NotImplementedError

    def kl(self, rows: dict[str, Tensor], student: Tensor, temperature: float) -> Tensor:
        """The KL term for student scores [N, C] against the stored rows (tensors from `to_tensors`)."""
        raise NotImplementedError

    def to_tensors(self, rows: dict[str, np.ndarray]) -> dict[str, Tensor]:
        """{array: [R, w]} numpy rows of a batch -> the tensors `kl` reads."""
        raise NotImplementedError

    def bytes_per_row(self) -> int:
        return sum(width * dtype.itemsize for width, dtype in self.widths().values())


class Exact(Encoding):
    """Every column's log-probability: the KL is exact (to the storage precision; fp32 gives the online values)."""

    name = "exact"

    def widths(self):
        return {"log_probs": (self.n_columns, DTYPES[self.dtype])}

    def encode(self, log_p, generator):
        return {"log_probs": _to_numpy(log_p.clamp_min(torch.finfo(torch.float16).min), self.dtype)}

    def to_tensors(self, rows):
        return {"log_probs": _from_numpy(rows["log_probs"], self.dtype)}

    def kl(self, rows, student, temperature):
        return kl_div_from_log_probs(rows["log_probs"].to(student.device), student, temperature)


class TopK(Encoding):
    """The K largest probabilities and their columns; the rest of the mass is one tail class (biased)."""

    name = "topk"
    approximation = "the K largest probabilities and one tail class: a biased KL"

    def widths(self):
        return {"columns": (self.k, np.dtype(smallest_uint(self.n_columns))), "probs": (self.k, DTYPES[self.dtype])}

    def encode(self, log_p, generator):
        values, columns = log_p.topk(self.k, dim=-1)
        return {"columns": columns.cpu().numpy().astype(self.widths()["columns"][1]),
                "probs": _to_numpy(values.exp(), self.dtype)}

    def to_tensors(self, rows):
        return {"columns": torch.from_numpy(rows["columns"].astype(np.int64)),
                "probs": _from_numpy(rows["probs"], self.dtype)}

    def kl(self, rows, student, temperature):
        return kl_div_top_k(rows["columns"].to(student.device), rows["probs"].to(student.device), student,
                            temperature)


class Sample(Encoding):
    """K draws with replacement from the teacher distribution and its entropy: an unbiased KL estimate."""

    name = "sample"
    approximation = "K draws from the teacher distribution: an unbiased estimate of the KL and its gradient"

    def widths(self):
        return {"columns": (self.k, np.dtype(smallest_uint(self.n_columns))), "entropy": (1, np.dtype(np.float32))}

    def encode(self, log_p, generator):
        draws = torch.multinomial(log_p.exp(), self.k, replacement=True, generator=generator)
        entropy = -(log_p.exp() * log_p).sum(-1, keepdim=True)
        return {"columns": draws.cpu().numpy().astype(self.widths()["columns"][1]),
                "entropy": entropy.float().cpu().numpy()}

    def to_tensors(self, rows):
        return {"columns": torch.from_numpy(rows["columns"].astype(np.int64)),
                "entropy": torch.from_numpy(np.ascontiguousarray(rows["entropy"][:, 0]))}

    def kl(self, rows, student, temperature):
        return kl_div_sampled(rows["columns"].to(student.device), None, rows["entropy"].to(student.device), student,
                              temperature)


ENCODINGS: dict[str, type[Encoding]] = {cls.name: cls for cls in (Exact, TopK, Sample)}


def make_encoding(name: str, k: int, dtype: str, n_columns: int) -> Encoding:
    """An encoding by name, checked (one-line errors)."""
    if name not in ENCODINGS:
        raise UserError(f"--format {name} is not one of {', '.join(ENCODINGS)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    if name != "exact" and not 1 <= k <= (n_columns if name == "topk" else 2**16):
        raise UserError(f"--k {k} must be in [1, {n_columns if name == 'topk' else 2**16}] for --format {name}")
    return ENCODINGS[name](k if name != "exact" else n_columns, dtype, n_columns)


# ---------------------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------------------


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def teacher_weights_fingerprint(teacher_dir: str | os.PathLike) -> str:
    """sha256 of the teacher's config and weight files."""
    root = Path(teacher_dir)
    files = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    if not files:
        raise UserError(f"teacher {root} has no weights (config.json, *.safetensors or *.bin)")
    return _sha256_files(files)


def shards_fingerprint(data_dir: str | os.PathLike) -> str:
    """sha256 of a shard set's `index.json` and every shard's `shard.json` (sizes, dtypes, match masks)."""
    root = Path(data_dir)
    return _sha256_files([root / "index.json", *sorted(root.glob("shard_*/shard.json"))])


def columns_fingerprint(columns: Tensor | None, n_columns: int) -> str:
    """sha256 of an alignment's teacher columns (all columns: of their count)."""
    data = b"all:%d" % n_columns if columns is None else columns.cpu().numpy().astype(np.int64).tobytes()
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


def _broken(path: Path, why: str) -> UserError:
    return UserError(f"teacher cache file {path} {why}; rebuild the cache with preprocessing/cache_teacher.py")


@dataclass
class CacheShard:
    """The cached rows of one binarized shard, memory-mapped."""

    offsets: np.ndarray
    arrays: dict[str, np.ndarray]

    def take(self, local: np.ndarray) -> dict[str, np.ndarray]:
        """The rows of sequences `local` (indices within the shard), concatenated in that order: {array: [R, w]}."""
        rows, _ = ragged_indices(self.offsets, local)
        return {name: np.asarray(array[rows]) for name, array in self.arrays.items()}


class TeacherCache:
    """A built cache, opened and checked (`open`), and the encoding that turns its rows into the KL term."""

    def __init__(self, root: Path, header: dict, encoding: Encoding, shards: dict[str, CacheShard]):
        self.root, self.header, self.encoding, self.shards = root, header, encoding, shards

    @classmethod
    def open(cls, directory: str | os.PathLike) -> TeacherCache:
        root = Path(directory)
        path = root / HEADER
        if not path.is_file():
            raise UserError(f"--teacher_cache {root} has no {HEADER} (a cache build that did not finish, or not a "
                            "cache); run preprocessing/cache_teacher.py again with the same arguments to complete it")
        try:
            header = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _broken(path, f"is not valid JSON ({err})") from err
        if header.get("format") != CACHE_FORMAT:
            raise _broken(path, f"has format {header.get('format')!r}, expected {CACHE_FORMAT!r}")
        enc = header["encoding"]
        encoding = ENCODINGS[enc["name"]](enc["k"], enc["dtype"], header["alignment"]["n_columns"])
        shards = {}
        for entry in header["shards"]:
            sdir = root / entry["name"]
            offsets = _load(sdir / "offsets.npy")
            if offsets.ndim != 1 or len(offsets) != entry["n_seqs"] + 1 or int(offsets[-1]) != entry["n_rows"]:
                raise _broken(sdir / "offsets.npy", f"does not hold {entry['n_seqs']} sequences of "
                                                    f"{entry['n_rows']} rows")
            arrays = {}
            for name, (width, dtype) in encoding.widths().items():
                flat = _load(sdir / f"{name}.npy")
                if flat.dtype != dtype or flat.size != entry["n_rows"] * width:
                    raise _broken(sdir / f"{name}.npy", f"holds {flat.size} {flat.dtype} values, expected "
                                                        f"{entry['n_rows']} x {width} {dtype}")
                arrays[name] = flat.reshape(entry["n_rows"], width)
            shards[entry["name"]] = CacheShard(offsets, arrays)
        return cls(root, header, encoding, shards)

    def check(self, expected: dict[str, object]) -> None:
        """A one-line error naming the first of `expected` ({field: value}; fields: "alignment", "columns",
        "temperature", "teacher_tokenizer", "teacher_weights", "shards") that the cache was not built for."""
        found = {"alignment": self.header["alignment"]["name"], "columns": self.header["alignment"]["columns_sha256"],
                 "temperature": self.header["temperature"], **self.header["fingerprints"]}
        for field, value in expected.items():
            if found[field] != value:
                shown = (f"{found[field]!r}, this run {value!r}" if field in ("alignment", "temperature")
                         else "another one than this run's")
                raise UserError(f"--teacher_cache {self.root} was built for {field} {shown}; rebuild it with "
                                f"cache_teacher.py for this run's {field}")

    def check_rows(self, shard, flags: np.ndarray) -> CacheShard:
        """The cache rows of a binarized `shard`, checked against the alignment's row flags (bool [teacher tokens]):
        one row per flagged position, sequence by sequence."""
        name = shard.dir.name
        if name not in self.shards:
            raise UserError(f"--teacher_cache {self.root} has no rows for shard {name}; rebuild the cache for "
                            f"{shard.dir.parent}")
        cached = self.shards[name]
        offsets = shard.offsets["teacher"]
        per_seq = np.add.reduceat(flags.astype(np.int64), offsets[:-1]) if len(flags) else np.zeros(0, np.int64)
        per_seq[offsets[:-1] == offsets[1:]] = 0
        if len(cached.offsets) != len(offsets) or not np.array_equal(np.diff(cached.offsets), per_seq):
            raise UserError(f"--teacher_cache {self.root}: the rows of {name} do not match the shard's aligned "
                            "positions; rebuild the cache for these shards")
        return cached


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise _broken(path, "is missing")
    return read_npy(path, True, lambda why: _broken(path, f"is corrupt or truncated ({why})"))


@dataclass
class CachedTeacher:
    """The teacher's side of a batch's KL term, read from a cache: `kl(student_scores, temperature)`."""

    encoding: Encoding
    rows: dict[str, Tensor]

    @property
    def n_rows(self) -> int:
        return next(iter(self.rows.values())).shape[0]

    def kl(self, student: Tensor, temperature: float) -> Tensor:
        return self.encoding.kl(self.rows, student, temperature)
