"""Step 3: encode every text with both tokenizers into a shard set.

Texts are read in blocks and encoded by `block_encoder.BlockEncoder`: the Rust `tokenizers` batch API
(`--num_workers` threads) encodes each distinct word once, numpy assembles the texts; each side gets
`[CLS] ... [SEP]`. A text is kept only if its teacher->student re-tokenisation (each teacher
token replaced by its student split) is at least as long as the teacher sequence, i.e. no teacher token
in it is unmapped. Over-long texts are kept here and split by step 4 (`prepare_lm_seqs.py`) at a word
boundary shared by both sides, so every chunk then fits `--max_len` on the teacher, student and t2s side.
Memory holds one block; shards roll over every `--seqs_per_shard` sequences.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

import _bootstrap  # noqa: F401
from block_encoder import BlockEncoder
from common import DEFAULT_MAX_BAD_FRAC, CorpusStats, check_output, iter_corpus, load_pair, timed
from kdcore.artifacts import load_t2s_padded
from kdcore.errors import run_cli
from kdcore.shard_io import Block, ShardSetWriter, segment_ids


def t2s_lengths(t_ids: np.ndarray, t_lengths: np.ndarray, n_pieces: np.ndarray) -> np.ndarray:
    """[n] length of each teacher sequence after replacing every token by its student split."""
    return np.bincount(segment_ids(t_lengths), weights=n_pieces[t_ids], minlength=len(t_lengths)).astype(np.int64)


def keep_mask(t_ids: np.ndarray, t_lengths: np.ndarray, n_pieces: np.ndarray) -> np.ndarray:
    """[n] bool: texts whose t2s sequence is at least as long as the teacher sequence."""
    return t2s_lengths(t_ids, t_lengths, n_pieces) >= t_lengths


def select(block: Block, keep: np.ndarray) -> Block:
    """The sequences of `block` where `keep` is true."""
    t_tok, s_tok = np.repeat(keep, block.t_lengths), np.repeat(keep, block.s_lengths)
    return Block(block.t_ids[t_tok], block.t_lengths[keep], block.s_ids[s_tok], block.s_lengths[keep])


@dataclass(frozen=True)
class EncodeParams:
    """Parameters of `run` (step 3).

    teacher_name: teacher directory (tokenizer);
    student_name: student directory (tokenizer from step 1);
    corpus: UTF-8 text files, one text per line;
    t2s_padded: path of t2s_padded.npy from step 2;
    out_dir: output shard set directory;
    block_lines: texts encoded per batch (lines held in memory at once);
    seqs_per_shard: sequences per shard before the next one starts;
    num_workers: encoder threads;
    max_bad_frac: largest tolerated share (0..1) of undecodable lines per corpus file;
    force: overwrite an existing output.
    """

    teacher_name: str
    student_name: str
    corpus: list[str]
    t2s_padded: str
    out_dir: str
    block_lines: int = 10000
    seqs_per_shard: int = 1_000_000
    num_workers: int = 2
    max_bad_frac: float = DEFAULT_MAX_BAD_FRAC
    force: bool = False


def run(params: EncodeParams) -> dict:
    """Encode the corpus into the shard set `params.out_dir`; returns statistics."""
    if params.num_workers > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        os.environ.setdefault("RAYON_NUM_THREADS", str(params.num_workers))
    check_output(params.out_dir, params.force)
    stats: dict = {}
    with timed(stats):
        pair = load_pair(params.teacher_name, params.student_name)
        n_t, n_s = len(pair.t_vocab), len(pair.s_vocab)
        n_pieces = (load_t2s_padded(params.t2s_padded, n_t, n_s) != n_s).sum(axis=1)
        encoder = BlockEncoder([pair.teacher.backend_tokenizer, pair.student.backend_tokenizer])
        corpus_stats = CorpusStats()
        kept = dropped = t_tokens = s_tokens = 0
        with ShardSetWriter(params.out_dir, n_t, n_s, pair.fingerprints) as shard_set:
            writer, in_shard = None, 0
            for texts in iter_corpus(params.corpus, params.block_lines, params.max_bad_frac, corpus_stats):
                (t_ids, t_len), (s_ids, s_len) = encoder.encode(texts)
                keep = keep_mask(t_ids, t_len, n_pieces)
                block = select(Block(t_ids, t_len, s_ids, s_len), keep)
                dropped += int((~keep).sum())
                start = 0
                while start < len(block):
                    if writer is None:
                        writer, in_shard = shard_set.new_shard(), 0
                    take = min(len(block) - start, params.seqs_per_shard - in_shard)
                    part = select(block, (np.arange(len(block)) >= start) & (np.arange(len(block)) < start + take))
                    writer.add(part)
                    in_shard += take
                    start += take
                    if in_shard == params.seqs_per_shard:
                        writer.close()
                        writer = None
                kept += len(block)
                t_tokens += int(block.t_lengths.sum())
                s_tokens += int(block.s_lengths.sum())
            if writer is not None:
                writer.close()
            stats.update(texts=corpus_stats.lines, kept=kept, dropped_unmapped_teacher_token=dropped,
                         undecodable_lines=corpus_stats.undecodable, teacher_tokens=t_tokens,
                         student_tokens=s_tokens, shards=len(shard_set.shards),
                         word_cache=dict(zip(("teacher", "student"), encoder.uses_word_cache)))
            shard_set.close({"step": "encode_shards", "stats": stats})
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher_name", required=True, help="teacher directory (tokenizer)")
    p.add_argument("--student_name", required=True, help="student directory (tokenizer from step 1)")
    p.add_argument("--corpus", nargs="+", required=True, help="UTF-8 text files, one text per line")
    p.add_argument("--t2s_padded", required=True, help="t2s_padded.npy from step 2")
    p.add_argument("--out_dir", required=True, help="output shard set directory")
    p.add_argument("--block_lines", type=int, default=10000, help="texts encoded per batch")
    p.add_argument("--seqs_per_shard", type=int, default=1_000_000)
    p.add_argument("--num_workers", type=int, default=2, help="encoder threads")
    p.add_argument("--max_bad_frac", type=float, default=DEFAULT_MAX_BAD_FRAC)
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    a = p.parse_args(argv)
    params = EncodeParams(
        teacher_name=a.teacher_name, student_name=a.student_name, corpus=a.corpus, t2s_padded=a.t2s_padded,
        out_dir=a.out_dir, block_lines=a.block_lines, seqs_per_shard=a.seqs_per_shard,
        num_workers=a.num_workers, max_bad_frac=a.max_bad_frac, force=a.force,
    )
    stats = run(params)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
