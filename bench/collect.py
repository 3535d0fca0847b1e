"""Collect every benchmark's JSON (bench/results/*.json) into one Markdown file, bench/RESULTS.md.

    .venv/bin/python bench/collect.py [--results bench/results] [--out bench/RESULTS.md]

Each benchmark's own Markdown table is used where its JSON carries one (`markdown`); a JSON list of flat
records becomes a table of their scalar fields. The header gives the date, the machine and the commit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from _common import git_commit, machine_info, markdown_table  # noqa: E402

from kdcore.fsutil import atomic_write_text  # noqa: E402


def section(name: str, data) -> str:
    """One benchmark's part of RESULTS.md."""
    if isinstance(data, dict) and "markdown" in data:
        body = data["markdown"]
        machine = data.get("machine", {})
        note = f"\n\nMachine when measured: {json.dumps(machine, ensure_ascii=False)}" if machine else ""
        return f"## {name}\n\n{body}{note}\n"
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        keys = [k for k in data[0] if all(not isinstance(r.get(k), (dict, list)) for r in data)]
        rows = [[f"{r.get(k):.4g}" if isinstance(r.get(k), float) else r.get(k) for k in keys] for r in data]
        return f"## {name}\n\n{markdown_table(keys, rows)}\n"
    return f"## {name}\n\n```json\n{json.dumps(data, indent=1, ensure_ascii=False)[:4000]}\n```\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    a = p.parse_args(argv)
    files = sorted(Path(a.results).glob("*.json"))
    if not files:
        print(f"error: no benchmark results in {a.results}; run bench/run_all.sh first", file=sys.stderr)
        return 2
    machine = machine_info()
    parts = [f"# Benchmark results\n\nCollected {datetime.date.today().isoformat()} on {machine.get('cpu_model')}, "
             f"{machine.get('cpu_count')} cores, commit {git_commit() or 'unknown'}. Each section was measured by its "
             "own script (see its docstring for the method); timings depend on the load at that moment, which "
             "each section records.\n"]
    parts += [section(f.stem, json.loads(f.read_text(encoding="utf-8"))) for f in files]
    atomic_write_text(a.out, "\n".join(parts))
    print(f"written {a.out} ({len(files)} benchmarks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
