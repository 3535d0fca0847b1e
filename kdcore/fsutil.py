"""Atomic file and directory writes: write under a temp name, then rename into place; failed writes (a full
disk, a file-size limit) as one-line errors; checksummed directory manifests; removal of the temp names a killed
process left behind."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from safetensors import SafetensorError

from kdcore.errors import UserError

MANIFEST = "manifest.json"


DISK_FIX = "free disk space (or raise the file-size limit), then rerun the same command"


@contextmanager
def _temp_file(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temp name next to `path`, renamed onto `path` when the block succeeds and deleted when it fails; a failed
    write is a one-line `UserError` (`writing`)."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}{suffix}")
    try:
        with writing(path, "file", DISK_FIX):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file under a temp name and rename it into place."""
    with _temp_file(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """`atomic_write_text` of indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """`np.save` under a temp name, then rename."""
    with _temp_file(Path(path), ".npy") as tmp:
        np.save(tmp, array, allow_pickle=False)


def publish_dir(tmp: Path, final: Path) -> None:
    """Replace directory `final` by the completed directory `tmp` (old content removed)."""
    if final.exists():
        old = final.with_name(final.name + f".old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


TEMP_NAME = re.compile(r"\.(?:tmp|old)-(\d+)(?:\.npy)?$")
"""The names this module gives temp files and directories: `NAME.tmp-PID`, `NAME.tmp-PID.npy`, `NAME.old-PID`."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_temp(name: str) -> bool:
    """Whether `name` is a temp name of this module whose writer process no longer exists (it was killed)."""
    match = TEMP_NAME.search(name)
    return match is not None and not _pid_alive(int(match.group(1)))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(root: str | os.PathLike) -> list[Path]:
    """Delete every stale temp file or directory under `root` (see `is_stale_temp`); returns what was deleted."""
    removed = []
    for parent, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            if is_stale_temp(name):
                _remove(Path(parent) / name)
                removed.append(Path(parent) / name)
        dirs[:] = [d for d in dirs if not is_stale_temp(d)]
    return sorted(removed)


def remove_stale_siblings(final: str | os.PathLike) -> None:
    """Delete the stale temps of `final` only (`final.tmp-PID...`, `final.old-PID`), leaving other writers' alone."""
    final = Path(final)
    if final.parent.is_dir():
        for path in final.parent.iterdir():
            if TEMP_NAME.sub("", path.name) == final.name and is_stale_temp(path.name):
                _remove(path)


def temp_sibling(final: Path) -> Path:
    """A fresh, empty temp directory next to `final` (same file system, so renaming is atomic)."""
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


@contextmanager
def staged_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory; publish it as `final` when the block succeeds, delete it when it fails."""
    final = Path(final)
    tmp = temp_sibling(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final)


@contextmanager
def writing(path: str | os.PathLike, what: str, fix: str) -> Iterator[None]:
    """Turn a failed write inside the block (OSError such as ENOSPC/EFBIG, torch's and safetensors' write errors)
    into a one-line `UserError` naming `what` and `path`, followed by `fix`."""
    try:
        yield
    except UserError:
        raise
    except (OSError, RuntimeError, SafetensorError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot write {what} {path} ({reason}; a full disk or a file-size limit?); {fix}") from err


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: Path, extra: dict | None = None) -> None:
    """Write `directory/manifest.json` (last): the size and SHA-256 of every other file in it, plus `extra`."""
    files = {item.name: {"bytes": item.stat().st_size, "sha256": sha256_file(item)}
             for item in sorted(directory.iterdir()) if item.is_file() and item.name != MANIFEST}
    atomic_write_json(directory / MANIFEST, {**(extra or {}), "files": files})


def manifest_problem(directory: Path) -> str | None:
    """None when `directory/manifest.json` exists and every file it lists has its size and SHA-256; else what is
    wrong, in a few words."""
    try:
        files = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (incomplete, or written before checksums)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST} ({type(err).__name__})"
    for name, facts in files.items():
        item = directory / name
        if not item.is_file():
            return f"{name} is missing"
        if item.stat().st_size != facts["bytes"] or sha256_file(item) != facts["sha256"]:
            return f"{name} does not match its checksum"
    return None
