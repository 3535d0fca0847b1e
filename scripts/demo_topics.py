"""Several `distil-finetuned-en/train.py` runs in one process (the demo's topic fine-tuning, one run per seed):
one interpreter and library start-up instead of one per run.

    python scripts/demo_topics.py ARGV_JSON      (a JSON list of train.py command lines, each a list of strings)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "distil-finetuned-en"), str(ROOT)]

from glue_cli import main as glue_main  # noqa: E402

from kdcore.errors import UserError, run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run every command line of the JSON file named by `argv[0]` in order; the first failure stops."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise UserError("usage: demo_topics.py ARGV_JSON (a JSON list of distil-finetuned-en/train.py argument lists)")
    for command in json.loads(Path(args[0]).read_text(encoding="utf-8")):
        glue_main(command)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
