"""Loading and checking the preprocessing artifacts (maps, counts, matched vocabulary, manifest).

Every loader validates shape, dtype and value range against the vocabulary sizes it is given and turns
a missing or malformed file into a one-line `UserError` that names the file and the fix. Arrays are read
with `allow_pickle=False`; nothing here can execute code from a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdcore.errors import UserError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Artifact:
    """A pipeline output that a trainer flag names: its path in the pipeline directory and the step that makes it."""

    file: str
    step: int
    step_name: str


DATA_FLAGS = {
    "binarized_data_folder": Artifact("processed_binarized", 5, "regroup_binarized"),
    "student_name": Artifact("student", 1, "train_reduced_tok"),
    "student_pretrained_weights": Artifact("student_init", 8, "init_weights"),
    "student_token_counts": Artifact("student_counts.npy", 6, "token_counts"),
}
"""Trainer flags for the data and the student, as `run_pipeline.py` lays them out."""

ARTIFACT_FLAGS = {
    "matching_ids": Artifact("matched_vocab.json", 10, "matched_vocab"),
    "t2s_mapping": Artifact("teacher2student.json", 2, "teacher_tokens_split"),
    "t2s_vocab_padded": Artifact("t2s_padded.npy", 2, "teacher_tokens_split"),
    "t2s_mapped_ids": Artifact("t2s_mapped_ids.npy", 2, "teacher_tokens_split"),
    "s2t_vocab_padded": Artifact("s2t_padded.npy", 7, "student2teacher"),
    "s2t_idxs_padded": Artifact("s2t_idxs_padded.npy", 7, "student2teacher"),
    "mined_vocab": Artifact("mined_vocab.json", 12, "mined_vocab"),
}
"""Trainer flags for the alignment artifacts (each alignment declares which of them it reads)."""


def _fix(path: Path) -> str:
    return f"re-run the preprocessing step that writes {path.name} (run_pipeline.py --force)"


def load_json(path: str | os.PathLike, what: str = "artifact", fix: str | None = None) -> dict:
    """Parse a JSON file; `what` names it and `fix` says what to do in the one-line error (default: re-run the
    preprocessing step that writes it)."""
    path = Path(path)
    fix = fix or _fix(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {fix}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{what} {path} is not valid UTF-8 JSON ({err}); {fix}") from err


NPY_MAGIC = b"\x93NUMPY"


def read_npy(path: Path, mmap: bool, broken: Callable[[str], UserError]) -> np.ndarray:
    """`np.load` without pickle (memory-mapped with `mmap`); a file that is not an `.npy` array, holds objects or is
    cut short raises `broken(why)`, the caller's one-line error for that file."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(NPY_MAGIC))
        if magic != NPY_MAGIC:
            raise broken("it is empty" if not magic else "it is not a .npy array file")
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise broken(str(err).splitlines()[0]) from err


def load_npy(path: str | os.PathLike, ndim: int, kind: str, mmap: bool = False) -> np.ndarray:
    """Load an `.npy` artifact without pickle, checking its rank and dtype kind ('i', 'u', 'f', 'b', 'iu')."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"artifact {path} does not exist; {_fix(path)}")
    arr = read_npy(path, mmap, lambda why: UserError(f"artifact {path} is corrupt or truncated ({why}); {_fix(path)}"))
    if arr.ndim != ndim or arr.dtype.kind not in kind:
        raise UserError(f"artifact {path} holds a {arr.ndim}-D {arr.dtype} array, expected {ndim}-D of kind "
                        f"{kind!r}; {_fix(path)}")
    return arr


def _check_range(arr: np.ndarray, path: Path, low: int, high: int) -> None:
    if arr.size and (int(arr.min()) < low or int(arr.max()) > high):
        raise UserError(f"artifact {path} has values outside [{low}, {high}]: it belongs to other vocabularies; "
                        f"{_fix(path)}")


def load_t2s_padded(path: str | os.PathLike, teacher_vocab_size: int, student_vocab_size: int) -> np.ndarray:
    """int64 [V_T, max_split] student ids padded with V_S."""
    path = Path(path)
    arr = load_npy(path, 2, "iu")
    if arr.shape[0] != teacher_vocab_size:
        raise UserError(f"artifact {path} has {arr.shape[0]} rows for a teacher vocabulary of {teacher_vocab_size}; "
                        f"{_fix(path)}")
    _check_range(arr, path, 0, student_vocab_size)
    return arr.astype(np.int64)


def load_t2s_mapped_ids(path: str | os.PathLike, teacher_vocab_size: int) -> np.ndarray:
    """int64 [K] teacher ids with a full student split."""
    path = Path(path)
    arr = load_npy(path, 1, "iu")
    _check_range(arr, path, 0, teacher_vocab_size - 1)
    return arr.astype(np.int64)


def load_s2t(padded_path: str | os.PathLike, idxs_path: str | os.PathLike, teacher_vocab_size: int,
             student_vocab_size: int, max_split: int) -> tuple[np.ndarray, np.ndarray]:
    """(s2t_padded int64 [V_S, cut] padded with V_T, s2t_idxs_padded int64 [V_S, cut] slot numbers)."""
    padded_path, idxs_path = Path(padded_path), Path(idxs_path)
    padded = load_npy(padded_path, 2, "iu")
    idxs = load_npy(idxs_path, 2, "iu")
    if padded.shape != idxs.shape or padded.shape[0] != student_vocab_size:
        raise UserError(f"artifacts {padded_path} {padded.shape} and {idxs_path} {idxs.shape} do not fit a student "
                        f"vocabulary of {student_vocab_size}; {_fix(padded_path)}")
    _check_range(padded, padded_path, 0, teacher_vocab_size)
    _check_range(idxs, idxs_path, 0, max_split - 1)
    return padded.astype(np.int64), idxs.astype(np.int64)


def load_counts(path: str | os.PathLike, vocab_size: int) -> np.ndarray:
    """int64 [V] token occurrence counts."""
    path = Path(path)
    arr = load_npy(path, 1, "iu")
    if arr.shape[0] != vocab_size:
        raise UserError(f"artifact {path} has {arr.shape[0]} counts for a vocabulary of {vocab_size}; {_fix(path)}")
    _check_range(arr, path, 0, np.iinfo(np.int64).max)
    return arr.astype(np.int64)


def load_matched_vocab(path: str | os.PathLike, teacher_vocab_size: int,
                       student_vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(teacher ids int64 [K], student ids int64 [K]) of the tokens present in both vocabularies."""
    path = Path(path)
    data = load_json(path, "matched vocabulary")
    try:
        pairs = np.array(sorted(data.values()), dtype=np.int64).reshape(-1, 2)
    except (TypeError, ValueError) as err:
        raise UserError(f"matched vocabulary {path} must map tokens to [teacher_id, student_id]; {_fix(path)}") from err
    _check_range(pairs[:, 0], path, 0, teacher_vocab_size - 1)
    _check_range(pairs[:, 1], path, 0, student_vocab_size - 1)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def load_mined_vocab(path: str | os.PathLike, teacher_vocab_size: int, student_vocab_size: int,
                     fingerprints: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """(student id int64 [V_T] of every teacher id, special bool [V_T]) from step 12's `mined_vocab.json` (the MinED
    column map), checked against the vocabulary sizes and the tokenizer fingerprints."""
    path = Path(path)
    data = load_json(path, "mined column map")
    try:
        ids = np.asarray(data["student_ids"], dtype=np.int64)
        special = np.asarray(data["special_teacher_ids"], dtype=np.int64)
        found = dict(data["fingerprints"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"mined column map {path} lacks student_ids, special_teacher_ids or fingerprints; "
                        f"{_fix(path)}") from err
    check_fingerprints(found, fingerprints, path)
    if ids.shape != (teacher_vocab_size,):
        raise UserError(f"mined column map {path} maps {ids.size} teacher ids, the teacher vocabulary has "
                        f"{teacher_vocab_size}; {_fix(path)}")
    _check_range(ids, path, 0, student_vocab_size - 1)
    _check_range(special, path, 0, teacher_vocab_size - 1)
    flags = np.zeros(teacher_vocab_size, dtype=bool)
    flags[special] = True
    return ids, flags


def load_teacher2student(path: str | os.PathLike) -> dict:
    """The `teacher2student.json` map: splits, vocabulary sizes, fingerprints."""
    path = Path(path)
    data = load_json(path, "teacher->student map")
    if not isinstance(data.get("splits"), list) or len(data["splits"]) != data.get("teacher_vocab_size"):
        raise UserError(f"teacher->student map {path} has no split per teacher token; {_fix(path)}")
    return data


def load_t2s_input(path: str | os.PathLike, teacher_vocab_size: int, student_vocab_size: int,
                   fingerprints: dict[str, str]) -> np.ndarray:
    """int64 [V_T, S] splits of every teacher token (pad = V_S) from `teacher2student.json`: the collator's t2s
    input (the student's pass over the teacher's tokens re-expressed by their pieces)."""
    meta = load_teacher2student(path)
    check_fingerprints(meta["fingerprints"], fingerprints, path)
    if (meta["teacher_vocab_size"], meta["student_vocab_size"]) != (teacher_vocab_size, student_vocab_size):
        raise UserError(f"{path} maps {meta['teacher_vocab_size']} -> {meta['student_vocab_size']} tokens, the "
                        f"tokenizers have {teacher_vocab_size} -> {student_vocab_size}; rebuild it with the pipeline")
    width = max(1, max(len(s) for s in meta["splits"]))
    t2s_input = np.full((teacher_vocab_size, width), student_vocab_size, dtype=np.int64)
    for v, split in enumerate(meta["splits"]):
        t2s_input[v, :len(split)] = split
    return t2s_input


def check_fingerprints(found: dict[str, str], expected: dict[str, str], source: str | os.PathLike) -> None:
    """Raise when artifacts in `source` were built from other tokenizers than the ones given."""
    for side in ("teacher", "student"):
        if side in expected and found.get(side) != expected[side]:
            raise UserError(f"{source} was built with a different {side} tokenizer than the one given; rebuild it "
                            f"(run_pipeline.py --force or a new --out_dir) or pass the matching --{side}_name")


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The pipeline's `manifest.json` in `out_dir`, or None when there is none yet."""
    path = Path(out_dir) / MANIFEST
    return load_json(path, "manifest") if path.is_file() else None


class PipelineDir:
    """A `run_pipeline.py --out_dir` as a source of trainer inputs (`--pipeline_dir`): `path(flag)` is the file that
    fills a data or artifact flag, once the step that makes it has finished (its `manifest.json` says so)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        manifest = read_manifest(self.root) if self.root.is_dir() else None
        if manifest is None:
            raise UserError(f"--pipeline_dir {self.root} has no {MANIFEST}; pass the --out_dir of run_pipeline.py")
        self.done = set(manifest.get("steps", {}))

    def path(self, flag: str) -> str:
        """The path for `--flag` (a key of DATA_FLAGS or ARTIFACT_FLAGS); a one-line error naming the step that makes
        it when the pipeline has not made it."""
        artifact = DATA_FLAGS.get(flag) or ARTIFACT_FLAGS[flag]
        path = self.root / artifact.file
        if artifact.step_name not in self.done or not path.exists():
            raise UserError(f"--pipeline_dir {self.root} lacks {artifact.file} (--{flag}); it is made by pipeline "
                            f"step {artifact.step} ({artifact.step_name}.py): run run_pipeline.py on it again")
        return str(path)
