"""bench/collect.py gathers every benchmark JSON into one Markdown file."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import collect  # noqa: E402


def test_collect_tables_and_records(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "a_bench.json").write_text(json.dumps({"machine": {"cpu_model": "X"}, "markdown": "| a |\n|---|\n| 1 |"}))
    (results / "b_bench.json").write_text(json.dumps([{"impl": "gather", "time_s": 1.23456, "nested": {"x": 1}},
                                                      {"impl": "my_index", "time_s": 0.5, "nested": {"x": 2}}]))
    out = tmp_path / "RESULTS.md"
    assert collect.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## a_bench" in text and "| 1 |" in text and '"cpu_model": "X"' in text
    assert "## b_bench" in text and "my_index" in text and "1.235" in text and "nested" not in text
    assert "commit" in text.splitlines()[2]


def test_collect_without_results_fails(tmp_path, capsys):
    assert collect.main(["--results", str(tmp_path), "--out", str(tmp_path / "R.md")]) == 2
    assert "run bench/run_all.sh first" in capsys.readouterr().err
