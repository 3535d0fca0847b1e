"""GLUE fine-tuning and task-specific distillation: `python distil-finetuned-en/train.py --help`.

The folder name has a dash, so it is not a package: this entry point puts its own folder and the
repository root on sys.path, then runs the CLI of `glue_cli.py`.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (str(HERE), str(HERE.parent)):
    if _path not in sys.path:
        sys.path.append(_path)

from glue_cli import main  # noqa: E402

from kdcore.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
