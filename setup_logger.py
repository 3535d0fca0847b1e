"""One log file shared by several scripts: `setup_logger(log_file)` appends to it from any process."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s [%(name)s rank%(rank)s] %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logger(name: str = "rvkd", log_file: str | os.PathLike | None = None, rank: int = 0,
                 console: bool | None = None, level: int = logging.INFO) -> logging.Logger:
    """A logger writing to stderr (rank 0 only, unless `console` says otherwise) and, when `log_file` is
    given, appending to that file (every rank; lines carry the rank). Calling it again reconfigures."""
    logger = logging.getLogger(name)
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    for flt in list(logger.filters):
        logger.removeFilter(flt)
    logger.addFilter(_RankFilter(rank))
    formatter = logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    if console if console is not None else rank == 0:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(formatter)
        logger.addHandler(stream)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    return logger
