"""Test helper: run run_pipeline.py or cache_teacher.py and SIGKILL this process in the middle of one step.

    KILL_AT=STEP[:N] python tests/kill_at_step.py {run_pipeline,cache_teacher} ARGS...

The process kills itself right after the N-th (default 1) rename (`os.replace`: a finished temp file or directory
published, inside a temp directory or into place) made while step STEP runs: a step name of run_pipeline.py, or
`cache_teacher` for the whole of cache_teacher.py. So the step has written part of its outputs and not its manifest
entry. Without KILL_AT this is the plain script. Only the tests use it; it is no option of the product.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "preprocessing"), str(ROOT)]


class Killer:
    """Counts the renames made while armed and SIGKILLs the process at the N-th."""

    def __init__(self, n: int):
        self.left = n
        self.armed = False
        self._replace = os.replace
        os.replace = self.replace

    def replace(self, src, dst, **kwargs) -> None:
        self._replace(src, dst, **kwargs)
        if self.armed:
            self.left -= 1
            if self.left == 0:
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)

    def during(self, fn: Callable) -> Callable:
        """`fn` with the killer armed while it runs."""
        def wrapped(*args, **kwargs):
            self.armed = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.armed = False
        return wrapped


def main() -> int:
    script, argv = sys.argv[1], sys.argv[2:]
    target, _, n = os.environ.get("KILL_AT", "").partition(":")
    killer = Killer(int(n or 1)) if target else None
    if script == "run_pipeline":
        import run_pipeline
        from kdcore.errors import run_cli

        for step in run_pipeline.STEPS:
            if killer is not None and step.name == target:
                step.run = killer.during(step.run)
        return run_cli(run_pipeline.main, argv)
    if script == "cache_teacher":
        import cache_teacher
        from utils import run_process

        main_fn = killer.during(cache_teacher.main) if killer is not None and target == "cache_teacher" \
            else cache_teacher.main
        return run_process(lambda _: main_fn(argv))
    raise SystemExit(f"unknown script {script}; use run_pipeline or cache_teacher")


if __name__ == "__main__":
    sys.exit(main())
