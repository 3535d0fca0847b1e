"""Step 10: the tokens present in both vocabularies, `matched_vocab.json` = `{token: [teacher_id,
student_id]}` (the logit columns compared by the match and reduce KL). Padding is left out."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _bootstrap  # noqa: F401
from common import load_pair, timed
from kdcore.errors import run_cli
from kdcore.fsutil import atomic_write_json


def matched_tokens(t_vocab: list[str], s_vocab: list[str], exclude: set[str]) -> dict[str, list[int]]:
    """`{token: [teacher_id, student_id]}` in teacher id order."""
    s_index = {tok: i for i, tok in enumerate(s_vocab)}
    return {tok: [i, s_index[tok]] for i, tok in enumerate(t_vocab) if tok in s_index and tok not in exclude}


def run(teacher_name: str, student_name: str, out: str) -> dict:
    """Write the matched vocabulary JSON; returns statistics."""
    stats: dict = {}
    with timed(stats):
        pair = load_pair(teacher_name, student_name)
        matched = matched_tokens(pair.t_vocab, pair.s_vocab, {pair.t_special["pad"]})
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, matched)
        stats.update(matched=len(matched), student_vocab_share=round(len(matched) / len(pair.s_vocab), 4),
                     teacher_vocab_share=round(len(matched) / len(pair.t_vocab), 4))
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher_name", required=True, help="teacher directory (tokenizer)")
    p.add_argument("--student_name", required=True, help="student directory (tokenizer)")
    p.add_argument("--out", required=True, help="output JSON path (matched_vocab.json)")
    a = p.parse_args(argv)
    print(json.dumps(run(a.teacher_name, a.student_name, a.out)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
