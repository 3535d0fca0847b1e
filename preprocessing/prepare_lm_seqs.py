"""Step 4: filter the encoded sequences and split over-long ones so both sides cover the same text.

Drop reasons (counted in the statistics):
- `word_mismatch`: teacher and student cut the text into different numbers of words (their normalisers
  or pre-tokenisers differ), so nothing can be aligned;
- `special_only`: nothing but special tokens;
- `too_short`: fewer than `--min_len` content tokens (non-special, `[UNK]` included) on either side;
- `mostly_unk`: more than `--max_unk_prop` of the content tokens are `[UNK]` on either side (the real
  `[UNK]` id of each side);
- `word_too_long`: a single word longer than `--max_len - 2` tokens (dropped from its text).
A text longer than `--max_len` on the teacher side, the student side or the t2s side (teacher tokens
replaced by their student splits) is cut into chunks at word boundaries shared by both sides; each chunk
is wrapped in `[CLS] ... [SEP]` and fits `--max_len` on all three sides.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import numpy as np

import _bootstrap  # noqa: F401
from alignment import SideTables, word_counts
from common import check_output, load_pair, timed
from encode_shards import select, t2s_lengths
from kdcore.artifacts import check_fingerprints, load_t2s_padded
from kdcore.errors import UserError, run_cli
from kdcore.shard_io import Block, ShardSetWriter, open_shards, read_index, segment_ids
from kdcore.tokenizer_utils import MAX_LEN

REASONS = ("keep", "word_mismatch", "special_only", "too_short", "mostly_unk")


def word_mismatch(block: Block, t_tab: SideTables, s_tab: SideTables) -> np.ndarray:
    """bool [n]: the two sides have different numbers of words."""
    return word_counts(block.t_ids, block.t_lengths, t_tab) != word_counts(block.s_ids, block.s_lengths, s_tab)


def filter_codes(block: Block, t_tab: SideTables, s_tab: SideTables, min_len: int, max_unk_prop: float) -> np.ndarray:
    """int8 [n]: index into REASONS for every sequence of the block (0 = keep)."""
    codes = np.zeros(len(block), dtype=np.int8)
    codes[word_mismatch(block, t_tab, s_tab)] = 1
    for ids, lengths, tab in ((block.t_ids, block.t_lengths, t_tab), (block.s_ids, block.s_lengths, s_tab)):
        seg = segment_ids(lengths)
        is_unk = ids == tab.unk_id
        content = np.bincount(seg, weights=~tab.special[ids] | is_unk, minlength=len(lengths))
        unk = np.bincount(seg, weights=is_unk, minlength=len(lengths))
        for code, bad in ((2, content == 0), (3, content < min_len), (4, unk > max_unk_prop * content)):
            codes[(codes == 0) & bad] = code
    return codes


def chunk_sequence(t_seq: np.ndarray, s_seq: np.ndarray, t_tab: SideTables, s_tab: SideTables,
                   n_pieces: np.ndarray, max_len: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """Cut one `[CLS] ... [SEP]` text pair at shared word boundaries into chunks that fit `max_len` on the
    teacher, student and t2s sides. Returns (chunks, number of words dropped for being too long alone).
    The loop runs once per chunk, not per token."""
    t_in, s_in = t_seq[1:-1], s_seq[1:-1]
    t_bounds = np.append(np.flatnonzero(t_tab.starts[t_in]), len(t_in))
    s_bounds = np.append(np.flatnonzero(s_tab.starts[s_in]), len(s_in))
    t2s_before = np.concatenate([[0], np.cumsum(n_pieces[t_in])])
    cuts = (t_bounds, s_bounds, t2s_before[t_bounds])
    limit = max_len - 2
    chunks, dropped, w0, n_words = [], 0, 0, len(t_bounds) - 1
    while w0 < n_words:
        w1 = min(int(np.searchsorted(c, c[w0] + limit, side="right")) - 1 for c in cuts)
        if w1 <= w0:
            dropped += 1
            w0 += 1
            continue
        chunks.append((np.concatenate([t_seq[:1], t_in[t_bounds[w0]:t_bounds[w1]], t_seq[-1:]]),
                       np.concatenate([s_seq[:1], s_in[s_bounds[w0]:s_bounds[w1]], s_seq[-1:]])))
        w0 = w1
    return chunks, dropped


def split_long(block: Block, long: np.ndarray, t_tab: SideTables, s_tab: SideTables, n_pieces: np.ndarray,
               max_len: int) -> tuple[Block, int, int]:
    """Chunks of the sequences flagged `long` as a new block; also (#texts split, #words dropped)."""
    t_off = np.concatenate([[0], np.cumsum(block.t_lengths)])
    s_off = np.concatenate([[0], np.cumsum(block.s_lengths)])
    pieces, dropped = [], 0
    for i in np.flatnonzero(long):
        chunks, n_drop = chunk_sequence(block.t_ids[t_off[i]:t_off[i + 1]], block.s_ids[s_off[i]:s_off[i + 1]],
                                        t_tab, s_tab, n_pieces, max_len)
        pieces.extend(chunks)
        dropped += n_drop
    if not pieces:
        empty = np.zeros(0, dtype=np.int64)
        return Block(block.t_ids[:0], empty, block.s_ids[:0], empty), int(long.sum()), dropped
    t_parts, s_parts = zip(*pieces)
    return (Block(np.concatenate(t_parts), np.array([len(p) for p in t_parts], dtype=np.int64),
                  np.concatenate(s_parts), np.array([len(p) for p in s_parts], dtype=np.int64)),
            int(long.sum()), dropped)


def check_wrapped(block: Block, pair) -> None:
    """Every sequence must start with [CLS] and end with [SEP] on both sides."""
    for ids, lengths, tok, side in ((block.t_ids, block.t_lengths, pair.teacher, "teacher"),
                                    (block.s_ids, block.s_lengths, pair.student, "student")):
        ends = np.cumsum(lengths)
        if np.any(ids[ends - lengths] != tok.cls_token_id) or np.any(ids[ends - 1] != tok.sep_token_id):
            raise UserError(f"{side} sequences in the input shards are not wrapped in [CLS] ... [SEP]; re-encode "
                            "them with encode_shards.py")


@dataclass(frozen=True)
class FilterParams:
    """Parameters of `run` (step 4).

    teacher_name: teacher directory (tokenizer);
    student_name: student directory (tokenizer);
    in_dir: shard set from step 3;
    t2s_padded: path of t2s_padded.npy from step 2;
    out_dir: output shard set directory;
    max_len: maximum tokens per sequence on every side ([CLS] and [SEP] included);
    min_len: minimum content tokens per sequence on either side;
    max_unk_prop: largest tolerated share (0..1) of [UNK] among the content tokens on either side;
    block_size: sequences read from an input shard at a time;
    force: overwrite an existing output.
    """

    teacher_name: str
    student_name: str
    in_dir: str
    t2s_padded: str
    out_dir: str
    max_len: int = MAX_LEN
    min_len: int = 3
    max_unk_prop: float = 0.5
    block_size: int = 50000
    force: bool = False


def run(params: FilterParams) -> dict:
    """Filter/split the shard set `params.in_dir` into `params.out_dir`; returns statistics."""
    max_len = params.max_len
    if max_len < 3:
        raise UserError(f"--max_len {max_len} must be at least 3 ([CLS] token [SEP])")
    check_output(params.out_dir, params.force)
    stats: dict = {}
    with timed(stats):
        pair = load_pair(params.teacher_name, params.student_name)
        check_fingerprints(read_index(params.in_dir)["fingerprints"], pair.fingerprints, params.in_dir)
        n_t, n_s = len(pair.t_vocab), len(pair.s_vocab)
        n_pieces = (load_t2s_padded(params.t2s_padded, n_t, n_s) != n_s).sum(axis=1)
        t_tab = SideTables.build(pair.t_vocab, set(pair.teacher.all_special_tokens), pair.t_special["unk"])
        s_tab = SideTables.build(pair.s_vocab, set(pair.student.all_special_tokens), pair.s_special["unk"])
        counts = dict.fromkeys(REASONS, 0)
        seqs_in = split_texts = words_dropped = t_tokens = s_tokens = 0
        with ShardSetWriter(params.out_dir, n_t, n_s, pair.fingerprints) as shard_set:
            for shard in open_shards(params.in_dir):
                with shard_set.new_shard() as writer:
                    for block in shard.blocks(params.block_size):
                        check_wrapped(block, pair)
                        seqs_in += len(block)
                        mismatch = word_mismatch(block, t_tab, s_tab)
                        counts["word_mismatch"] += int(mismatch.sum())
                        long = ~mismatch & ((block.t_lengths > max_len) | (block.s_lengths > max_len)
                                            | (t2s_lengths(block.t_ids, block.t_lengths, n_pieces) > max_len))
                        chunks, n_split, n_drop = split_long(block, long, t_tab, s_tab, n_pieces, max_len)
                        split_texts += n_split
                        words_dropped += n_drop
                        for part in (select(block, ~mismatch & ~long), chunks):
                            codes = filter_codes(part, t_tab, s_tab, params.min_len, params.max_unk_prop)
                            for code, reason in enumerate(REASONS):
                                counts[reason] += int((codes == code).sum())
                            kept = select(part, codes == 0)
                            writer.add(kept)
                            t_tokens += int(kept.t_lengths.sum())
                            s_tokens += int(kept.s_lengths.sum())
            stats.update(sequences_in=seqs_in, kept=counts.pop("keep"), dropped=counts, split_texts=split_texts,
                         word_too_long=words_dropped, teacher_tokens=t_tokens, student_tokens=s_tokens)
            shard_set.close({"step": "prepare_lm_seqs", "stats": stats})
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher_name", required=True, help="teacher directory (tokenizer)")
    p.add_argument("--student_name", required=True, help="student directory (tokenizer)")
    p.add_argument("--in_dir", required=True, help="shard set from step 3")
    p.add_argument("--t2s_padded", required=True, help="t2s_padded.npy from step 2")
    p.add_argument("--out_dir", required=True, help="output shard set")
    p.add_argument("--max_len", type=int, default=MAX_LEN, help="maximum tokens per sequence on every side")
    p.add_argument("--min_len", type=int, default=3, help="minimum content tokens per sequence")
    p.add_argument("--max_unk_prop", type=float, default=0.5, help="largest tolerated share of [UNK]")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    a = p.parse_args(argv)
    params = FilterParams(
        teacher_name=a.teacher_name, student_name=a.student_name, in_dir=a.in_dir, t2s_padded=a.t2s_padded,
        out_dir=a.out_dir, max_len=a.max_len, min_len=a.min_len, max_unk_prop=a.max_unk_prop, force=a.force,
    )
    stats = run(params)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
