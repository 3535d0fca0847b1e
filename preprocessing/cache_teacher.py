"""Step 11 (optional): the teacher-output cache (`kdcore/teacher_cache.py`): run the teacher once over every
binarized shard and store its distribution at the rows and over the columns that an alignment reads, so that
`train.py --teacher_cache DIR` distils for many epochs without the teacher in the loop.

    python preprocessing/cache_teacher.py --pipeline_dir OUT --teacher_name TEACHER \\
        --align_logits {match,reduce,reduce_map} [--column_map exact|mined] --temperature 2 --format {exact,topk,sample} [--k 16] --out DIR \\
        [--dtype fp16] [--precision fp32|bf16|fp16] [--device auto|cpu|cuda] [--batch_size 64] [--seed 42]

The teacher reads each window of up to `WINDOW_BATCHES` batches (fewer for large rows, see `window_size`) in
order of sequence length, so that a batch pads only to nearly its own lengths, and the rows are written in shard
order.

Under torchrun (`torchrun --nproc_per_node N preprocessing/cache_teacher.py ...`) every process builds the shards
rank, rank + N, ...; rank 0 writes the header once all are done. A shard is published whole (temp directory, then
rename) and a rerun with the same arguments skips the shards already built and deletes the temp files of the killed
process, so a killed build resumes where it stopped and ends byte-identical to a clean build (`sample` draws from a
generator seeded per shard).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import _bootstrap  # noqa: F401
from common import timed
from kdcore.alignments import (
    ALIGNMENTS,
    COLUMN_MAPS,
    AlignmentConfig,
    Vocabularies,
    cacheable_alignments,
    check_artifact_flags,
    required_artifacts,
)
from kdcore.artifacts import PipelineDir, check_fingerprints, read_manifest
from kdcore.errors import UserError
from kdcore.fsutil import atomic_write_json, remove_stale_siblings, staged_dir
from kdcore.shard_io import NpyStreamWriter, open_shards, read_index
from kdcore.teacher_cache import (
    CACHE_FORMAT,
    DTYPES,
    ENCODINGS,
    HEADER,
    ROWS_META,
    columns_fingerprint,
    make_encoding,
    shards_fingerprint,
    teacher_weights_fingerprint,
)


@dataclass(frozen=True)
class CacheParams:
    """What to cache and how.

    pipeline_dir: a run_pipeline.py --out_dir (shards and the alignment's artifacts); teacher_name: the teacher
    directory; align_logits: the alignment whose rows and columns are cached; column_map: its `--column_map`
    (match and reduce; `mined` caches the teacher distribution projected onto the mapped student ids); temperature: T of the stored
    distributions; encoding: `exact`, `topk` or `sample`; k: values kept per row (topk, sample); dtype: storage of
    probabilities (exact, topk); out: the cache directory; precision: autocast of the teacher forward; device:
    auto, cpu or cuda; batch_size: sequences per teacher forward; seed: seed of the `sample` draws."""

    pipeline_dir: str
    teacher_name: str
    align_logits: str
    out: str
    temperature: float = 2.0
    encoding: str = "sample"
    k: int = 16
    dtype: str = "fp16"
    precision: str = "fp32"
    device: str = "auto"
    batch_size: int = 64
    seed: int = 42
    column_map: str = "exact"


WINDOW_BYTES = 256 * 2**20
"""Cached values held in memory per window of `length_sorted_windows` (bounds the windows of the large encodings)."""
WINDOW_BATCHES = 64
"""Largest window, in batches: sorting over more sequences than this barely reduces the padding further."""


def window_size(batch_size: int, bytes_per_row: int, rows_per_seq: float) -> int:
    """Sequences per window: WINDOW_BATCHES batches, fewer when their cached values would exceed WINDOW_BYTES
    (at least one batch)."""
    fits = int(WINDOW_BYTES // max(1.0, bytes_per_row * max(rows_per_seq, 1.0)))
    return max(batch_size, min(WINDOW_BATCHES * batch_size, fits))


def length_sorted_windows(lengths: np.ndarray, batch_size: int, window: int):
    """Yields (indices of the window [W] in shard order, batches: lists of at most `batch_size` of them in order of
    length) for consecutive windows of `window` sequences, so that a batch pads to nearly its own lengths while the
    output is still written in shard order. lengths: int [N] (the teacher side's)."""
    for start in range(0, len(lengths), window):
        order = np.arange(start, min(start + window, len(lengths)))
        by_length = order[np.argsort(lengths[order], kind="stable")]
        yield order, [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]


def rows_in_order(done: np.ndarray, counts: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Row indices that put rows computed sequence by sequence in the order `done` [W] (each sequence `counts` [W]
    consecutive rows) back into the order `order` [W] (the same sequences, sorted ascending)."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    position = np.empty(len(done), dtype=np.int64)
    position[np.searchsorted(order, done)] = np.arange(len(done))  # position[j] = where order[j] was computed
    first, n = starts[position], counts[position].astype(np.int64)
    return np.repeat(first - np.concatenate([[0], np.cumsum(n)[:-1]]), n) + np.arange(int(n.sum()))


def _signature(header: dict) -> str:
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


def build(params: CacheParams, log=print) -> dict:
    """Build (or complete) the cache `params.out`; returns statistics (of this process)."""
    import torch

    from custom_step import IGNORE_INDEX
    from kdcore.model_io import check_teacher, load_teacher
    from kdcore.step_runner import teacher_forward
    from kdcore.tokenizer_utils import fingerprint, load_tokenizer, vocab_list
    from kdcore.trainer_core import autocast, store_linears_in
    from lm_seqs_dataset import Collator, LmSeqsDataset
    from utils import init_distributed, shutdown_distributed

    if params.temperature <= 0 or params.batch_size < 1:
        raise UserError("--temperature must be positive and --batch_size at least 1")
    uncacheable = ALIGNMENTS[params.align_logits].uncacheable
    if uncacheable:
        raise UserError(f"--align_logits {params.align_logits} cannot be cached: {uncacheable}")
    pipe = PipelineDir(params.pipeline_dir)
    data_dir = pipe.path("binarized_data_folder")
    cfg = AlignmentConfig(logits=params.align_logits, column_map=params.column_map)
    cfg = AlignmentConfig(logits=params.align_logits, column_map=params.column_map, **{
        flag: pipe.path(flag) for flag in required_artifacts(cfg, kl=True, hidden=False, shared_vocab=False)})
    check_artifact_flags(cfg, kl=True, hidden=False, shared_vocab=False)
    t_tok = load_tokenizer(params.teacher_name, "teacher")
    check_teacher(params.teacher_name, len(vocab_list(t_tok)))
    s_tok = load_tokenizer(pipe.path("student_name"), "student")
    fingerprints = {"teacher": fingerprint(t_tok), "student": fingerprint(s_tok)}
    index = read_index(data_dir)
    check_fingerprints(index["fingerprints"], fingerprints, data_dir)
    check_fingerprints((read_manifest(pipe.root) or {}).get("fingerprints", {}), fingerprints, pipe.root)
    alignment = ALIGNMENTS[params.align_logits].build(cfg, params.temperature, Vocabularies(
        index["teacher_vocab_size"], index["student_vocab_size"], fingerprints))
    n_columns = alignment.n_compared(index["teacher_vocab_size"])
    encoding = make_encoding(params.encoding, params.k, params.dtype, n_columns)
    shards = open_shards(data_dir)
    header = {"format": CACHE_FORMAT, "encoding": encoding.describe(), "temperature": params.temperature,
              "alignment": {"name": alignment.name, "n_columns": n_columns,
                            "columns_sha256": columns_fingerprint(alignment.columns_key(), n_columns)},
              "fingerprints": {"teacher_tokenizer": fingerprints["teacher"],
                               "teacher_weights": teacher_weights_fingerprint(params.teacher_name),
                               "shards": shards_fingerprint(data_dir)},
              "precision": params.precision, "seed": params.seed}
    signature = _signature(header)
    flags = {shard.dir.name: alignment.positions.teacher_row_flags(shard) for shard in shards}
    out = Path(params.out)
    out.mkdir(parents=True, exist_ok=True)
    dist_info = init_distributed(params.device)
    stats: dict = {"built": 0, "skipped": 0, "rows": 0, "tokens": 0}
    with timed(stats):
        teacher = None
        for k in range(dist_info.rank, len(shards), dist_info.world_size):
            shard = shards[k]
            final = out / shard.dir.name
            if _complete(final, signature):
                stats["skipped"] += 1
                continue
            if teacher is None:
                teacher = load_teacher(params.teacher_name).to(dist_info.device).eval()
                teacher.requires_grad_(False)
                store_linears_in(teacher, params.precision)  # the forward below runs under that autocast only
                on_device = alignment.to(dist_info.device)
            data = LmSeqsDataset([shard], 0.0, "train")
            collator = Collator(t_tok.pad_token_id, s_tok.pad_token_id)
            generator = torch.Generator(device=dist_info.device).manual_seed(params.seed * 100003 + k)
            row_counts = []
            remove_stale_siblings(final)  # the temp directory a killed build left (this process owns the shard)
            with staged_dir(final) as tmp:
                writers = {name: NpyStreamWriter(tmp / f"{name}.npy", dtype)
                           for name, (_, dtype) in encoding.widths().items()}
                window = window_size(params.batch_size, encoding.bytes_per_row(),
                                     float(flags[shard.dir.name].sum()) / max(1, len(data)))
                for order, batches in length_sorted_windows(data.lengths("teacher"), params.batch_size, window):
                    parts: dict[str, list[np.ndarray]] = {name: [] for name in writers}
                    counts = []
                    for indices in batches:
                        batch = collator(data.gather(indices))
                        batch = {key: value.to(dist_info.device) for key, value in batch.items()}
                        labels = torch.full_like(batch["s_ids"], IGNORE_INDEX)
                        with autocast(dist_info.device, params.precision):
                            logits, _ = teacher_forward(teacher, batch, on_device, batch["s_ids"], labels)
                        log_p = torch.log_softmax(logits.float() / params.temperature, -1)
                        for name, values in encoding.encode(log_p, generator).items():
                            parts[name].append(values)
                        counts.append(alignment.positions.teacher_rows(batch).sum(1).cpu().numpy())
                        stats["tokens"] += int(batch["t_mask"].sum())
                    done, counts_done = np.concatenate(batches), np.concatenate(counts)
                    take = rows_in_order(done, counts_done, order)
                    for name, values in parts.items():
                        writers[name].append(np.concatenate(values)[take].reshape(-1))
                    row_counts.append(counts_done[np.argsort(done)])  # per sequence, in shard order
                for writer in writers.values():
                    writer.close()
                counts = np.concatenate(row_counts) if row_counts else np.zeros(0, np.int64)
                offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
                np.save(tmp / "offsets.npy", offsets, allow_pickle=False)
                expected = int(flags[shard.dir.name].sum())
                if int(offsets[-1]) != expected:
                    raise UserError(f"{shard.dir}: {int(offsets[-1])} teacher rows cached, the alignment reads "
                                    f"{expected}; the shard and its match masks disagree (re-run the pipeline)")
                atomic_write_json(tmp / ROWS_META, {"signature": signature, "n_seqs": len(data),
                                                    "n_rows": int(offsets[-1])})
            stats["built"] += 1
            stats["rows"] += int(offsets[-1])
            log(f"cache {shard.dir.name}: {int(offsets[-1])} rows")
        if dist_info.distributed:
            import torch.distributed as dist

            dist.barrier()
        if dist_info.is_master:
            entries = []
            for shard in shards:
                final = out / shard.dir.name
                if not _complete(final, signature):
                    raise UserError(f"cache shard {final} is missing or from another build; run cache_teacher.py "
                                    "again with the same arguments")
                meta = json.loads((final / ROWS_META).read_text(encoding="utf-8"))
                entries.append({"name": shard.dir.name, "n_seqs": meta["n_seqs"], "n_rows": meta["n_rows"]})
            remove_stale_siblings(out / HEADER)
            atomic_write_json(out / HEADER, {**header, "signature": signature, "shards": entries,
                                             "bytes_per_row": encoding.bytes_per_row()})
    shutdown_distributed(dist_info)
    return stats


def _complete(final: Path, signature: str) -> bool:
    """Whether `final` is a published shard directory of the build with `signature`."""
    meta = final / ROWS_META
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("signature") == signature
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def add_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The cache options (with `prefix` for run_pipeline.py's --cache_* flags)."""
    p.add_argument(f"--{prefix}temperature", type=float, default=2.0, help="temperature of the stored distributions")
    p.add_argument(f"--{prefix}format", choices=tuple(ENCODINGS), default="sample",
                   help="exact (every column), topk (K largest + tail, biased) or sample (K draws, unbiased)")
    p.add_argument(f"--{prefix}k", type=int, default=16, help="values per row of topk and sample")
    p.add_argument(f"--{prefix}dtype", choices=tuple(DTYPES), default="fp16", help="storage of probabilities")
    p.add_argument(f"--{prefix}precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast precision of the teacher forward")
    p.add_argument(f"--{prefix}batch_size", type=int, default=64, help="sequences per teacher forward")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pipeline_dir", required=True, help="run_pipeline.py --out_dir")
    p.add_argument("--teacher_name", required=True, help="teacher directory (BertForMaskedLM + tokenizer)")
    p.add_argument("--align_logits", choices=cacheable_alignments(), required=True,
                   help="the alignment whose rows and columns are cached")
    p.add_argument("--column_map", choices=COLUMN_MAPS, default="exact",
                   help="the --column_map of match and reduce (mined: the MinED projection, pipeline step 12)")
    p.add_argument("--out", required=True, help="cache directory")
    add_arguments(p)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=42, help="seed of the sample draws")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    params = CacheParams(pipeline_dir=a.pipeline_dir, teacher_name=a.teacher_name, align_logits=a.align_logits,
                         out=a.out, temperature=a.temperature, encoding=a.format, k=a.k, dtype=a.dtype,
                         precision=a.precision, device=a.device, batch_size=a.batch_size, seed=a.seed,
                         column_map=a.column_map)
    print(json.dumps(build(params)))
    return 0


if __name__ == "__main__":
    from utils import run_process

    run_process(main)
