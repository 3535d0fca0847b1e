"""Step 9: mark, in every training shard, the teacher and student positions that hold the same token
string over the same span of the text (`teacher_match.npy`, `student_match.npy`, uint8, 1 = matched).

Matching is exact and complete: a pair is matched iff both tokens are in the same word, start at the same
character of it and have the same string (so they cover the same characters); `[UNK]` never matches.
The same token occurring twice in a text is matched at each of its own positions only.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import _bootstrap  # noqa: F401
from alignment import SideTables, match_masks, same_string_map
from common import load_pair, timed
from kdcore.artifacts import check_fingerprints
from kdcore.errors import run_cli
from kdcore.shard_io import open_shards, read_index


def run(teacher_name: str, student_name: str, data_dir: str, block_size: int = 50000) -> dict:
    """Add match masks to every shard of `data_dir`; returns statistics."""
    stats: dict = {}
    with timed(stats):
        pair = load_pair(teacher_name, student_name)
        check_fingerprints(read_index(data_dir)["fingerprints"], pair.fingerprints, data_dir)
        t_tab = SideTables.build(pair.t_vocab, set(pair.teacher.all_special_tokens), pair.t_special["unk"])
        s_tab = SideTables.build(pair.s_vocab, set(pair.student.all_special_tokens), pair.s_special["unk"])
        t2s_same = same_string_map(pair.t_vocab, pair.s_vocab, {pair.t_special["unk"], pair.t_special["pad"]})
        matched = t_total = s_total = 0
        for shard in open_shards(data_dir):
            t_parts, s_parts = [], []
            for block in shard.blocks(block_size):
                t_m, s_m = match_masks(block.t_ids, block.s_ids, t_tab, s_tab, t2s_same)
                t_parts.append(t_m)
                s_parts.append(s_m)
            t_match = np.concatenate(t_parts) if t_parts else np.zeros(0, np.uint8)
            s_match = np.concatenate(s_parts) if s_parts else np.zeros(0, np.uint8)
            shard.write_match(t_match, s_match)
            matched += int(t_match.sum())
            t_total += t_match.size
            s_total += s_match.size
        stats.update(matched_pairs=matched, teacher_coverage=round(matched / max(t_total, 1), 4),
                     student_coverage=round(matched / max(s_total, 1), 4))
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher_name", required=True, help="teacher directory (tokenizer)")
    p.add_argument("--student_name", required=True, help="student directory (tokenizer)")
    p.add_argument("--data_dir", required=True, help="shard set (processed_binarized), updated in place")
    a = p.parse_args(argv)
    print(json.dumps(run(a.teacher_name, a.student_name, a.data_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
