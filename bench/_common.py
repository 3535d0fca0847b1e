"""Small helpers shared by the benchmarks: machine description, peak-RSS readings, Markdown tables, JSON output,
the report at the end of a run and the script entry point.

Nothing here imports torch at module level; `machine_info` reads library versions lazily.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def script_environment() -> None:
    """The environment of a benchmark run as a script, set before torch loads (values already set win): offline
    Hugging Face hub, a fork-safe `torch.cuda.is_available()`, and OpenMP threads that sleep instead of spinning
    at barriers (on a CPU shared with other processes, spinning threads that wait for a descheduled peer made
    small ops 10-50x slower; read when torch loads libgomp)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def script_setup(module_name: str) -> None:
    """The start of every benchmark script, called with its `__name__` once the repository root is on sys.path:
    the repository's modules (root, preprocessing/) go before bench/'s own (bench/preprocessing.py would shadow
    the package), and run as a script (or a spawned worker of one) its environment is set before torch loads
    (`script_environment`); imported, the environment is left as it is."""
    root = Path(__file__).resolve().parents[1]
    for path in (str(root / "preprocessing"), str(root)):
        while path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
    if module_name in ("__main__", "__mp_main__"):
        script_environment()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() where /proc is missing)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: str | os.PathLike = ROOT) -> str | None:
    """HEAD of the repository at `root` (None outside a repository or without git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(**extra) -> dict:
    """CPU model and counts, platform, Python and library versions, git commit, load average and UTC date."""
    info = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(), "python": platform.python_version()}
    for lib in ("torch", "transformers", "numpy"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            info[lib] = None
    info.update(git_commit=git_commit(), load_average=load_average(),
                date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    info.update(extra)
    return info


def status_kib(field: str) -> int | None:
    """A `VmXXX:` field of /proc/self/status in KiB (None where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """A Markdown table; `align` has one character per column, "l" or "r" (default: first left, others right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write `obj` as indented JSON (UTF-8) under a temporary name, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_report(path: str | os.PathLike, summary: dict, report: str) -> Path:
    """Write `summary` as JSON to `path` (`write_json`), then print the Markdown `report` and where it went."""
    out = write_json(path, summary)
    print(report)
    print(f"\nwritten to {out}")
    return out


def _isolated_child(fn: Callable[[dict], dict], cfg: dict, conn, child_setup: Callable[[], object] | None) -> None:
    try:
        if child_setup is not None:
            child_setup()
        conn.send({"ok": fn(cfg)})
    except BaseException as err:  # report everything to the parent, which records the error
        conn.send({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})
    finally:
        conn.close()


def run_isolated(fn: Callable[[dict], dict], cfg: dict, isolation: str,
                 child_setup: Callable[[], object] | None = None) -> dict:
    """fn(cfg) in a fresh process (`isolation` fork or spawn; `child_setup()` runs there first), or in this one
    ("none", leaving torch's thread count as it was); errors become {"error": ..., "traceback": ...}.
    `fn` must be a module-level function (spawn pickles it by name)."""
    if isolation == "none":
        import torch

        threads = torch.get_num_threads()
        try:
            return fn(cfg)
        except Exception as err:  # keep going with the other configurations
            return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        finally:
            torch.set_num_threads(threads)
    ctx = multiprocessing.get_context(isolation)
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_isolated_child, args=(fn, cfg, child, child_setup))
    proc.start()
    child.close()
    try:
        message = parent.recv()
    except EOFError:
        message = None
    proc.join()
    if message is None:
        return {"error": f"worker died with exit code {proc.exitcode} (out of memory?)"}
    return message.get("ok", message)


def run_main(main: Callable[[], int], *errors: type[Exception]) -> None:
    """Exit with `main()`'s code; one of `errors` (problems the user can fix) is one line on stderr, exit code 2."""
    try:
        sys.exit(main())
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
