"""TensorBoard scalars whose write failures stop the run with one line instead of hanging it.

tensorboardX writes events from a daemon thread. When a write fails there (a full disk, a file-size limit) the
thread dies with the error printed, and the training loop then blocks forever in the event queue's `put` once the
queue is full (seen with RLIMIT_FSIZE: the run hangs at its next log lines). `ScalarLog` records the death of
tensorboardX's threads (`threading.excepthook`) and raises a `UserError` at its next call; `flush` surfaces a
failed write of the main thread the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kdcore.errors import UserError
from kdcore.fsutil import writing

_failures: list[BaseException] = []
_previous_hook = threading.excepthook


def _record(args: threading.ExceptHookArgs) -> None:
    """Remember the exception that ended a tensorboardX writer thread (`ScalarLog` reports it in one line);
    report any other thread's exception as before."""
    if args.thread is not None and type(args.thread).__module__.startswith("tensorboardX"):
        _failures.append(args.exc_value)
        return
    _previous_hook(args)


threading.excepthook = _record


class ScalarLog:
    """`add_scalar`, `flush` and `close` of a tensorboardX `SummaryWriter` at `logdir`, failing loudly."""

    FIX = "free disk space, then relaunch the same command with --resume auto"

    def __init__(self, logdir: str | Path, purge_step: int | None = None):
        """`purge_step`: TensorBoard discards this directory's earlier events from that step on (a resumed run
        replaces what the interrupted one logged after its checkpoint)."""
        from tensorboardX import SummaryWriter

        self.logdir = Path(logdir)
        self._seen = len(_failures)
        with writing(self.logdir, "the TensorBoard log", self.FIX):
            self._writer = SummaryWriter(logdir=str(self.logdir), purge_step=purge_step)

    def _failed(self) -> bool:
        return len(_failures) > self._seen

    def _disarm(self) -> None:
        """After a failed write: mark tensorboardX's event writers closed (its private `_closed`), so that neither
        our `close` nor the `atexit` close that tensorboardX registers flushes into the failing file again (that
        would print a traceback at exit) or waits on the dead writer thread."""
        for file_writer in getattr(self._writer, "all_writers", {}).values():
            event_writer = getattr(file_writer, "event_writer", None)
            if event_writer is not None:
                event_writer._closed = True

    def _check(self) -> None:
        if self._failed():
            self._disarm()
            raise UserError(f"cannot write the TensorBoard log {self.logdir} ({_failures[-1]}; a full disk or a "
                            f"file-size limit?); {self.FIX}")

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self._check()
        self._writer.add_scalar(name, value, step)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A write of the main thread: its failure is a one-line error, after which the writers are disarmed."""
        try:
            with writing(self.logdir, "the TensorBoard log", self.FIX):
                yield
        except UserError:
            self._disarm()
            raise

    def flush(self) -> None:
        self._check()
        with self._writing():
            self._writer.flush()

    def close(self) -> None:
        """Flush and close (nothing more after a failed write)."""
        if self._failed():
            self._disarm()
            return
        with self._writing():
            self._writer.close()

    def __enter__(self) -> ScalarLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
