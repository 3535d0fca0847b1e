"""Step 5: re-balance a shard set into N equal shards (N = number of training processes).

Sequence i of the input (in order over all input shards) goes to shard i mod N, so shard sizes differ
by at most one sequence and every shard mixes all sources. Memory holds one block.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import _bootstrap  # noqa: F401
from common import check_output, timed
from encode_shards import select
from kdcore.errors import UserError, run_cli
from kdcore.shard_io import ShardSetWriter, open_shards, read_index


def run(in_dir: str, out_dir: str, n_shards: int, block_size: int = 50000, force: bool = False) -> dict:
    """Write the regrouped shard set; returns statistics."""
    if n_shards < 1:
        raise UserError(f"--n_shards {n_shards} must be at least 1")
    check_output(out_dir, force)
    stats: dict = {}
    with timed(stats):
        index = read_index(in_dir)
        if index["n_seqs"] < n_shards:
            raise UserError(f"{in_dir} holds {index['n_seqs']} sequences, fewer than --n_shards {n_shards}; use a "
                            "bigger corpus or fewer shards")
        with ShardSetWriter(out_dir, index["teacher_vocab_size"], index["student_vocab_size"],
                            index["fingerprints"]) as shard_set:
            writers = [shard_set.new_shard() for _ in range(n_shards)]
            seen = 0
            try:
                for shard in open_shards(in_dir):
                    for block in shard.blocks(block_size):
                        target = (seen + np.arange(len(block))) % n_shards
                        for k, writer in enumerate(writers):
                            writer.add(select(block, target == k))
                        seen += len(block)
            except BaseException:
                for writer in writers:
                    writer.abort()
                raise
            sizes = [w.close()["n_seqs"] for w in writers]
            stats.update(n_shards=n_shards, sequences=seen, shard_sizes=sizes)
            shard_set.close({"step": "regroup_binarized", "stats": stats})
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--in_dir", required=True, help="shard set from step 4")
    p.add_argument("--out_dir", required=True, help="output shard set (processed_binarized)")
    p.add_argument("--n_shards", type=int, default=1, help="number of training processes")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    a = p.parse_args(argv)
    print(json.dumps(run(a.in_dir, a.out_dir, a.n_shards, force=a.force)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
