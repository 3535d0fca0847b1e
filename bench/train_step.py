"""Benchmark of one distillation training step: tokens/s, peak memory and achieved FLOP/s per alignment.

    .venv/bin/python bench/train_step.py [--sizes tiny,demo] [--precisions fp32,bf16] [--steps 3] [--warmup 1]
        [--batch_size 4] [--seq_len 128] [--threads N] [--device auto|cpu|cuda] [--quick]
        [--size NAME:key=value,...] [--reduce_map_modes logsumexp,sum] [--out bench/results/train_step.json]

Sizes (`--size` changes or adds one): `tiny` (teacher BERT 2 x 64, V_T 2000; student DistilBERT 2 x 64,
V_S 500), `demo` (teacher BertForMaskedLM 4 layers, hidden 256, 4 heads, FFN 1024, V_T 30000; student
DistilBERT 3 layers, dim 256, 4 heads, FFN 1024, V_S 6000) and `real` (the user's models: teacher BERT 12
layers, hidden 768, 12 heads, FFN 3072, V_T 120000; student DistilBERT 3 layers, dim 264, 12 heads, FFN 792,
V_S 30000; not run by default). Configurations (`--configs`): `mlm` (student MLM only, no teacher), `match`,
`reduce` (matched columns), `reduce_map/gather` (reduce-map with plain autograd indexing), `reduce_map/my_index`
(gather and reduction fused, inverse-map backward);
`reduce_map/sparse` and `reduce_map/my_index_gather` can be added. Reduce-map scores teacher tokens by the
logsumexp of their pieces by default (`--sum_probs`, as the paper's reduce-map runs), `--reduce_map_modes
sum` by the sum. Every KL configuration trains 5 * KL + 2 * MLM (DistilBERT's weights).

The step is the trainer's own, nothing of it is re-implemented: the arguments come from train.py's parser,
`TrainConfig` and its alignment factory build the KL alignment from artifact files, the `Distiller` is built by its own
constructor (on an in-memory stand-in for `LmSeqsDataset`), and one update runs what `Distiller.train` runs
with gradient accumulation 1: `_batch` (the real `Collator` on a `RawBatch`, then the copy to the device),
`_losses` (MLM masking, the teacher's and the student's passes under autocast), backward, the loss check and
`_clip` and `_apply_update` (clipping, AdamW, the step counter and the learning rate).

Synthetic, tokenizer-free data with realistic alignment structures: a random teacher->student split table
(special ids 0..4 map to themselves, 1% `[unused]` placeholders are unmapped, 0.5% of the tokens map to
`[UNK]`; 90% of the student's non-special tokens are teacher tokens too, which split into that one piece;
every other teacher token splits into 2-4 pieces drawn from a Zipf law, so that frequent pieces occur in
thousands of splits and the inverse map is capped), written in the pipeline's formats by the pipeline's own
functions (`teacher_tokens_split.pad_splits`, `student2teacher.invert` with cut_len 30 and Zipf teacher
counts, `matched_vocab.matched_tokens`). Teacher texts are `[CLS]` + seq_len - 2 tokens + `[SEP]`, 70% of
the tokens single-piece; the student's own tokenization keeps a single-piece token (matched on both sides,
as find_matching_ids would mark it) with probability 0.9 and re-splits every other token into 1-5 pieces
(unmatched), so student and t2s sequences are ~1.4x the teacher's, as with real text.

Measurements, each configuration in a fresh worker process (`--isolation fork` on CPU: forked from this
process after torch and transformers are imported but before any computation; `spawn` on CUDA; `none` runs
in-process, for the tests; its memory readings are not meaningful):
- peak memory: on CPU, `--steps` steps after `--warmup` untimed ones, with glibc's mmap threshold at
  64 KiB (freed tensors leave the resident set); the peak resident set during them minus the resident set
  before them (the kernel's high-water mark VmHWM reset through /proc/self/clear_refs first); on CUDA
  `torch.cuda.max_memory_allocated` minus the memory allocated before the timed steps;
- time: then the same `--steps` batches again, timed (collate + forward + backward + optimizer step,
  synchronised at the end of each), on CPU with the allocator keeping freed memory as it does in training
  (mmap threshold 32 MiB: with 64 KiB every large tensor would be faulted in afresh, about 0.5 ms per MB,
  charged to the op that writes it first); tokens/s = student tokens (the trainer's count) / time; the
  table's ms/step is the median. The profile below runs under the same settings;
- FLOP per step: `torch.utils.flop_counter.FlopCounterMode` over the first warm-up step (matrix products
  and attention, forward and backward, teacher included; the CPU flash-attention kernels counted with
  torch's SDPA formulas); achieved FLOP/s = FLOP per step / median step time, against a GEMM peak measured
  in the same run: the best rate of a square `torch.matmul` in the step's dtype (sizes 256, 512, ... and the
  three layouts of a linear layer's products) on the same device and threads;
- matmul share: `torch.profiler` over `--profile_steps` extra steps; the self time of aten::mm / addmm / bmm
  / baddbmm / matmul / linear ("GEMM") and of the attention kernels against the self time of all recorded
  events (each step is wrapped in a `record_function` range whose self time is the Python glue; the sum is
  the profiled wall time within a few percent). On CUDA: kernel time.

Targets, checked at the largest size of the run: reduce-map peak memory with my_index at most half that of
"gather" (a teacher vocabulary >= 30K); the match step spends most of its time (> 50%) in GEMMs.

On a CPU without native bf16 (no AVX512-BF16/AMX) bf16 products are emulated, 10-50x slower than fp32
(see the GEMM peaks per layout in the JSON), so bf16 runs only at the smallest size unless
`--emulated_bf16`. OpenMP threads wait passively (`OMP_WAIT_POLICY=PASSIVE` unless set): on a machine shared
with other processes spinning threads made small ops 10-50x slower; there `--threads 1` is also steadier.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench.` below, when run as a script
from bench._common import script_setup  # noqa: E402  (imports no torch)

script_setup(__name__)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.profiler  # noqa: E402
import torch.utils.flop_counter  # noqa: E402
from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from bench._common import (  # noqa: E402
    machine_info,
    markdown_table,
    reset_peak_rss,
    run_isolated,
    run_main,
    status_kib,
    write_report,
)
from custom_step import mlm_token_probs  # noqa: E402
from distiller import Distiller  # noqa: E402
from kdcore.alignments import AlignmentPlan, required_artifacts  # noqa: E402
from kdcore.alignments import Vocabularies as VocabSizes  # noqa: E402
from kdcore.artifacts import ARTIFACT_FLAGS  # noqa: E402
from kdcore.config import TrainConfig  # noqa: E402
from kdcore.errors import UserError  # noqa: E402
from kdcore.step_runner import StudentRunner  # noqa: E402
from kdcore.teacher_cache import CacheShard  # noqa: E402
from kdcore.tokenizer_utils import MAX_LEN  # noqa: E402
from kdcore.trainer_core import PRECISIONS  # noqa: E402
from lm_seqs_dataset import Collator, LmSeqsDataset, RawBatch  # noqa: E402
from matched_vocab import matched_tokens  # noqa: E402
from student2teacher import invert  # noqa: E402
from teacher_tokens_split import pad_splits  # noqa: E402
from utils import DistInfo, choose_device  # noqa: E402

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in both vocabularies
PAD, UNK, CLS, SEP, MASK = range(5)
CONFIGS = ("mlm", "match", "reduce", "reduce_map/gather", "reduce_map/my_index", "reduce_map/sparse",
           "reduce_map/my_index_gather")
DEFAULT_CONFIGS = CONFIGS[:5]
ALPHA_CE, ALPHA_MLM, TEMPERATURE = 5.0, 2.0, 2.0
SINGLE_PIECE_SHARE = 0.7  # share of teacher tokens in the text whose split is one student token
STUDENT_IN_TEACHER = 0.9  # share of the student's non-special tokens that are teacher tokens too
KEEP_MATCHED = 0.9  # a single-piece teacher token is tokenised the same by the student (a match) this often
MULTI_PIECE_PROBS = {2: 0.6, 3: 0.27, 4: 0.13}
CUT_LEN = 30
MODE_TAGS = {"logsumexp": "lse", "sum": "sum"}
GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm",
                      "aten::_addmm_activation", "aten::matmul", "aten::linear"})
GEMM_LEAF_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm",
                           "aten::_addmm_activation"})
STEP_RANGE = "bench::train_step"
MEMORY_TARGET_VOCAB = 30000


@dataclasses.dataclass(frozen=True)
class Size:
    """Model and vocabulary sizes of one benchmark size."""

    teacher_layers: int
    teacher_hidden: int
    teacher_heads: int
    teacher_ffn: int
    teacher_vocab: int
    student_layers: int
    student_dim: int
    student_heads: int
    student_ffn: int
    student_vocab: int


SIZES = {
    "tiny": Size(2, 64, 2, 256, 2000, 2, 64, 2, 256, 500),
    "demo": Size(4, 256, 4, 1024, 30000, 3, 256, 4, 1024, 6000),
    "real": Size(12, 768, 12, 3072, 120000, 3, 264, 12, 792, 30000),
}


class BenchError(Exception):
    """A usage problem: printed as one line, exit code 2."""


# ------------------------------------------------------------------------------------------ synthetic data


def zipf(n: int, rng: np.random.Generator) -> np.ndarray:
    """Zipf probabilities (exponent 1) over n items in a random rank order."""
    weights = 1.0 / np.arange(1, n + 1)
    return rng.permutation(weights / weights.sum())


@dataclasses.dataclass
class Vocabularies:
    """A synthetic teacher/student vocabulary pair and its split table."""

    t_vocab: list[str]
    s_vocab: list[str]
    splits: list[list[int]]
    single: np.ndarray  # int64 [n1] single-piece (matched) teacher ids
    single_p: np.ndarray  # their probabilities within the single-piece part of the text
    multi: np.ndarray  # int64 [n2] multi-piece teacher ids
    multi_p: np.ndarray
    piece_p: np.ndarray  # [V_S] probabilities of student pieces in re-splits
    teacher_counts: np.ndarray  # int64 [V_T] expected corpus counts


def synthetic_vocabularies(n_teacher: int, n_student: int, rng: np.random.Generator) -> Vocabularies:
    """Teacher and student vocabularies (token strings) and the split of every teacher token."""
    n_special = len(SPECIAL_TOKENS)
    if n_student < 3 * n_special or n_teacher < n_student:
        raise BenchError(f"vocabularies {n_teacher} -> {n_student} are too small; the student needs at least "
                         f"{3 * n_special} tokens and the teacher at least as many as the student")
    n_unused = n_teacher // 100
    s_content = np.arange(n_special, n_student)
    t_content = np.arange(n_special + n_unused, n_teacher)
    n_single = min(int(STUDENT_IN_TEACHER * len(s_content)), len(t_content) // 2)
    single = np.sort(rng.choice(t_content, n_single, replace=False))
    shared_students = rng.choice(s_content, n_single, replace=False)
    s_vocab = list(SPECIAL_TOKENS) + [f"s{u}" for u in s_content]
    t_vocab = list(SPECIAL_TOKENS) + [f"[unused{i}]" for i in range(n_unused)] + [f"t{v}" for v in t_content]
    splits: list[list[int]] = [[i] for i in range(n_special)] + [[] for _ in range(n_unused)]
    splits += [[] for _ in t_content]
    for v, u in zip(single, shared_students):
        t_vocab[v] = s_vocab[u]  # the same string in both vocabularies: a matched token
        splits[v] = [int(u)]
    multi = np.setdiff1d(t_content, single)
    piece_p = np.zeros(n_student)
    piece_p[n_special:] = zipf(len(s_content), rng)
    lengths = rng.choice(list(MULTI_PIECE_PROBS), size=len(multi), p=list(MULTI_PIECE_PROBS.values()))
    pieces = rng.choice(n_student, size=(len(multi), max(MULTI_PIECE_PROBS)), p=piece_p)
    to_unk = rng.random(len(multi)) < 0.005
    for v, k, row, unk in zip(multi, lengths, pieces, to_unk):
        splits[v] = [UNK] if unk else [int(u) for u in row[:k]]
    multi = multi[~to_unk]
    single_p, multi_p = zipf(len(single), rng), zipf(len(multi), rng)
    freq = np.zeros(n_teacher)
    freq[single] = SINGLE_PIECE_SHARE * single_p
    freq[multi] = (1 - SINGLE_PIECE_SHARE) * multi_p
    counts = np.round(freq * 1e8).astype(np.int64)
    return Vocabularies(t_vocab, s_vocab, splits, single, single_p, multi, multi_p, piece_p, counts)


def write_artifacts(voc: Vocabularies, out: Path, seed: int) -> dict[str, str]:
    """The pipeline's map files for the vocabularies (steps 2, 3 and 10 formats); returns their paths."""
    n_teacher, n_student = len(voc.t_vocab), len(voc.s_vocab)
    padded = pad_splits(voc.splits, n_student)
    specials = set(SPECIAL_TOKENS)
    mapped = np.array([v for v, (tok, sp) in enumerate(zip(voc.t_vocab, voc.splits))
                       if sp and tok not in specials and UNK not in sp], dtype=np.int64)
    s2t, idxs, _ = invert(padded, mapped, n_student, CUT_LEN, voc.teacher_counts, seed)
    paths = {name: str(out / name) for name in ("teacher2student.json", "t2s_padded.npy", "t2s_mapped_ids.npy",
                                                "s2t_padded.npy", "s2t_idxs_padded.npy", "matched_vocab.json")}
    (out / "teacher2student.json").write_text(json.dumps({
        "teacher_vocab_size": n_teacher, "student_vocab_size": n_student, "fingerprints": {},
        "splits": voc.splits}))
    np.save(paths["t2s_padded.npy"], padded)
    np.save(paths["t2s_mapped_ids.npy"], mapped)
    np.save(paths["s2t_padded.npy"], s2t)
    np.save(paths["s2t_idxs_padded.npy"], idxs)
    (out / "matched_vocab.json").write_text(json.dumps(matched_tokens(voc.t_vocab, voc.s_vocab, {"[PAD]"})))
    return paths


def synthetic_sequence(voc: Vocabularies, n_teacher_tokens: int, rng: np.random.Generator):
    """(teacher ids, student ids, teacher match, student match) of one synthetic text."""
    n = n_teacher_tokens - 2
    is_single = rng.random(n) < SINGLE_PIECE_SHARE
    t_ids = np.where(is_single, rng.choice(voc.single, n, p=voc.single_p), rng.choice(voc.multi, n, p=voc.multi_p))
    keep = is_single & (rng.random(n) < KEEP_MATCHED)
    n_pieces = np.where(keep, 1, np.array([len(voc.splits[v]) for v in t_ids]) + rng.choice([-1, 0, 1], n))
    n_pieces = np.clip(n_pieces, 1, None)
    random_pieces = rng.choice(len(voc.s_vocab), int(n_pieces.sum()), p=voc.piece_p)
    s_ids, s_match, start = [CLS], [1], 0
    for v, kept, k in zip(t_ids, keep, n_pieces):
        s_ids += [voc.splits[v][0]] if kept else random_pieces[start:start + k].tolist()
        s_match += [1] if kept else [0] * k
        start += k
    t_full = np.concatenate([[CLS], t_ids, [SEP]])
    t_match = np.concatenate([[1], keep.astype(np.uint8), [1]])
    return t_full, np.array([*s_ids, SEP]), t_match, np.array([*s_match, 1])


class SequencePool:
    """An in-memory stand-in for `LmSeqsDataset` (the two methods the Distiller reads): `lengths(side)` and
    `gather(indices)` -> RawBatch (flat arrays in the shards' dtypes) over a fixed list of synthetic texts, one
    shard; with `cache` (the texts' teacher-cache rows, a `CacheShard`) the batches carry their rows, as
    `LmSeqsDataset` gives them with a teacher cache."""

    def __init__(self, seqs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                 cache: CacheShard | None = None):
        self.seqs, self.cache = seqs, cache
        self._lengths = {side: np.array([len(q[k]) for q in seqs], dtype=np.int64)
                         for k, side in enumerate(("teacher", "student"))}

    def __len__(self) -> int:
        return len(self.seqs)

    def lengths(self, side: str) -> np.ndarray:
        return self._lengths[side]

    def gather(self, indices) -> RawBatch:
        seqs = [self.seqs[int(i)] for i in indices]
        t, s, tm, sm = (np.concatenate([q[k] for q in seqs]) for k in range(4))
        cache = self.cache.take(np.asarray(indices, dtype=np.int64)) if self.cache is not None else None
        return RawBatch(t.astype(np.int32), np.array([len(q[0]) for q in seqs]), s.astype(np.int32),
                        np.array([len(q[1]) for q in seqs]), tm.astype(np.uint8), sm.astype(np.uint8), cache)


def synthetic_pool(voc: Vocabularies, n_batches: int, batch_size: int, seq_len: int,
                   rng: np.random.Generator) -> tuple[SequencePool, list[list[int]]]:
    """`n_batches` x `batch_size` texts of `seq_len` teacher tokens, and the indices of each batch."""
    pool = SequencePool([synthetic_sequence(voc, seq_len, rng) for _ in range(n_batches * batch_size)])
    return pool, [list(range(i * batch_size, (i + 1) * batch_size)) for i in range(n_batches)]


# ------------------------------------------------------------------------------------------ the step


def trainer_config(precision: str, config: str, paths: dict[str, str], seed: int, batch_size: int, device: str,
                   sum_probs: bool = False, extra: list[str] | None = None) -> TrainConfig:
    """The trainer's typed configuration for the configuration: train.py's own parser (so every option the
    Distiller reads has its default) and `TrainConfig.from_namespace` (the directories it names are never opened).
    `reduce_map/<impl>` may name any implementation of `custom_step.REDUCE_MAP_IMPLS` (the command line offers
    the exact ones only). `extra`: more train.py arguments."""
    import dataclasses

    from train import build_parser

    align, _, impl = config.partition("/")
    argv = ["--dump_path", paths["dir"], "--binarized_data_folder", paths["dir"], "--student_name", paths["dir"],
            "--precision", precision, "--device", device, "--seed", str(seed), "--batch_size", str(batch_size),
            "--gradient_accumulation_steps", "1", "--warmup_prop", "0", "--alpha_mlm", str(ALPHA_MLM)]
    kl = config != "mlm"
    if kl:
        argv += ["--alpha_ce", str(ALPHA_CE), "--temperature", str(TEMPERATURE), "--align_logits", align]
        argv += ["--sum_probs"] if sum_probs else []
    cfg = TrainConfig.from_namespace(build_parser().parse_args([*argv, *(extra or [])]))
    alignment = dataclasses.replace(cfg.alignment, reduce_map_impl=impl or "sparse")
    needed = required_artifacts(alignment, kl, cfg.losses.hidden, False)  # the files the alignments read
    alignment = dataclasses.replace(alignment, **{flag: paths[ARTIFACT_FLAGS[flag].file] for flag in needed})
    return dataclasses.replace(cfg, alignment=alignment)


def make_distiller(cfg: TrainConfig, device: torch.device, runner: StudentRunner, teacher,
                   pool: SequencePool | LmSeqsDataset, collator: Collator, token_probs: torch.Tensor | None,
                   special: dict[str, int] | None = None) -> Distiller:
    """The trainer's `Distiller`, built by its own constructor on `pool` (the training and the validation
    data; single process). `special`: the student's special-token ids (default: the synthetic ones)."""
    special = special or {"pad": PAD, "unk": UNK, "cls": CLS, "sep": SEP, "mask": MASK}
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device, backend=None)
    return Distiller(cfg, info, runner, teacher, pool, pool, collator, token_probs, special, None,
                     logging.getLogger("bench.train_step"))


def train_step(distiller: Distiller, pool: SequencePool | LmSeqsDataset, indices) -> int:
    """One update as `Distiller.train` does it (gradient accumulation 1): collate and copy the batch, losses
    under autocast, backward, the finiteness check, clipping + AdamW. Returns the batch's student tokens."""
    distiller.runner.train()
    batch = distiller._batch(pool, indices)
    total, _ = distiller._losses(batch, distiller.generator)
    distiller.scaler.scale(total).backward()
    if not math.isfinite(float(total.detach())):
        raise RuntimeError("the loss is not finite")
    distiller._clip()
    distiller._apply_update()
    return int(pool.lengths("student")[indices].sum())


def build_teacher(size: Size, max_positions: int) -> BertForMaskedLM:
    """A random teacher BertForMaskedLM of `size`, fp32."""
    hf_logging.set_verbosity_error()
    return BertForMaskedLM(BertConfig(
        vocab_size=size.teacher_vocab, hidden_size=size.teacher_hidden, num_hidden_layers=size.teacher_layers,
        num_attention_heads=size.teacher_heads, intermediate_size=size.teacher_ffn,
        max_position_embeddings=max_positions, pad_token_id=PAD))


def build_student(size: Size, max_positions: int) -> DistilBertForMaskedLM:
    """A random student DistilBertForMaskedLM of `size`, fp32."""
    hf_logging.set_verbosity_error()
    return DistilBertForMaskedLM(DistilBertConfig(
        vocab_size=size.student_vocab, dim=size.student_dim, n_layers=size.student_layers,
        n_heads=size.student_heads, hidden_dim=size.student_ffn, max_position_embeddings=max_positions,
        pad_token_id=PAD))


def build_models(size: Size, max_positions: int, with_teacher: bool):
    """(random teacher BertForMaskedLM or None, random student DistilBertForMaskedLM), fp32, built in that order."""
    teacher = build_teacher(size, max_positions) if with_teacher else None
    return teacher, build_student(size, max_positions)


# ------------------------------------------------------------------------------------------ measurements


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_flop_mapping() -> dict:
    """FlopCounterMode formulas for the CPU flash-attention kernels, which torch does not register."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    mapping = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", forward),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", backward)):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            mapping[op] = fn
    return mapping


def profile_shares(distiller: Distiller, pool: SequencePool, batches: list[list[int]], n_steps: int,
                   start: int) -> dict:
    """Share of the step's time in matrix products, from torch.profiler over `n_steps` steps."""
    from torch.profiler import ProfilerActivity, profile, record_function

    device = distiller.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(n_steps):
            with record_function(STEP_RANGE):
                train_step(distiller, pool, batches[(start + i) % len(batches)])
            synchronize(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    if device.type == "cuda":
        # kernel time: GEMM ops carry their kernels' time inclusively; the total is the sum over kernels
        total = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        gemm = sum(e.device_time_total for e in events if e.key in GEMM_LEAF_OPS)
        attention = sum(e.device_time_total for e in events if e.key.startswith("aten::_scaled_dot_product_"))
        basis = "device kernel time"
        top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:12]
        top_ops = [{"op": e.key, "self_ms": e.self_device_time_total / 1e3 / n_steps} for e in top]
    else:
        total = sum(e.self_cpu_time_total for e in events)
        gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
        attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key
                        or "flash_attention" in e.key)
        basis = "self CPU time of all recorded events"
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        top_ops = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3 / n_steps, "calls": e.count // n_steps}
                   for e in top]
    total_s, gemm_s, attention_s = total / 1e6, gemm / 1e6, attention / 1e6
    # host-side phases (CPU time, inclusive): the backward's autograd nodes run one after the other, the
    # optimizer is one range, and the step range's own time is Python between ops
    backward = sum(e.cpu_time_total for e in events if e.key.startswith("autograd::engine::evaluate_function"))
    optimizer = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step#"))
    glue = sum(e.self_cpu_time_total for e in events if e.key == STEP_RANGE)
    phases = {"backward_s": backward / 1e6, "optimizer_step_s": optimizer / 1e6, "python_glue_s": glue / 1e6}
    phases["data_forward_and_clipping_s"] = wall - sum(phases.values())
    return {"steps": n_steps, "wall_s": wall, "basis": basis, "total_s": total_s, "gemm_s": gemm_s,
            "attention_s": attention_s, "gemm_share": gemm_s / total_s if total_s else math.nan,
            "matmul_share": (gemm_s + attention_s) / total_s if total_s else math.nan,
            "gemm_share_of_wall": gemm_s / wall, "matmul_share_of_wall": (gemm_s + attention_s) / wall,
            "python_glue_share": glue / 1e6 / wall, "phases_s": phases, "top_ops": top_ops}


MALLOC_FOR_MEMORY = (64 << 10, 0)
"""glibc mmap and trim thresholds for the memory phase: tensors above 64 KiB get their own mapping and freed
memory leaves the resident set at once, so the resident set follows the live tensors."""
MALLOC_FOR_SPEED = (32 << 20, 64 << 20)
"""... and for the timed phase: glibc's largest dynamic mmap threshold (where its default settles after a few
large frees) and twice that as trim threshold, so freed memory is reused as in training instead of being
returned and faulted in again (which would charge page faults to whichever op first writes a tensor)."""


def workers(threads: int | None, isolation: str, device: torch.device) -> tuple[int, str]:
    """(torch threads, worker isolation) from --threads and --isolation: by default the CPUs this process may
    use, and fork on CPU / spawn on CUDA; fork with CUDA is refused (a forked child cannot use the parent's
    CUDA state)."""
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    isolation = isolation if isolation != "auto" else ("spawn" if device.type == "cuda" else "fork")
    if isolation == "fork" and device.type == "cuda":
        raise BenchError("--isolation fork cannot be used with CUDA (a forked child cannot use the parent's CUDA "
                         "state); use --isolation spawn or auto")
    return threads, isolation


def set_malloc(mmap_threshold: int, trim_threshold: int) -> bool:
    """glibc: allocations above `mmap_threshold` bytes get their own mmap; the heap top is returned to the
    system above `trim_threshold` bytes. False where glibc is missing or refuses."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)) and bool(libc.mallopt(m_trim_threshold, trim_threshold))


def sparse_flop_mapping() -> dict:
    """FlopCounterMode formulas for products with a sparse operand (reduce_map's `sparse` implementation):
    2 x the stored entries x the dense operand's other dimension, where torch counts the backward's `aten.mm`
    as dense and the forward's `aten._sparse_addmm` not at all."""

    def mm(a, b, *args, out_val=None, **kwargs) -> int:
        if a.layout != torch.strided:
            return 2 * a._nnz() * b.shape[1]
        if b.layout != torch.strided:
            return 2 * b._nnz() * a.shape[0]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]

    def sparse_addmm(bias, a, b, *args, out_val=None, **kwargs) -> int:
        return 2 * a._nnz() * b.shape[1]

    for formula in (mm, sparse_addmm):
        formula._get_raw = True  # called with the tensors, not their shapes
    return {torch.ops.aten.mm: mm, torch.ops.aten._sparse_addmm: sparse_addmm}


def count_flops(step, index: int) -> dict:
    """Run `step(index)` under `FlopCounterMode` (the CPU flash-attention kernels counted with torch's SDPA
    formulas, products with a sparse operand by their stored entries): {"flop_per_step": total, "flop_by_op":
    {op: FLOP}}."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping={**attention_flop_mapping(), **sparse_flop_mapping()})
    with counter:
        step(index)
    return {"flop_per_step": counter.get_total_flops(),
            "flop_by_op": {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}}


def measure_steps(step, cfg: dict, device: torch.device, start: int) -> dict:
    """Peak memory and time of `cfg["steps"]` steps `step(start + k)` (each returns its token count).

    CPU in a worker process (`cfg["isolated"]`): a memory phase under `MALLOC_FOR_MEMORY` (peak = VmHWM
    after - VmRSS before, the high-water mark reset first) and then a timed phase over the same batches under
    `MALLOC_FOR_SPEED`. CUDA: one phase (`max_memory_allocated` - allocated before). In-process (tests): one
    phase with the process's malloc settings. Returns step times, tokens, peak bytes and how they were read."""
    synchronize(device)
    steps = range(start, start + cfg["steps"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        method = "cuda max_memory_allocated - allocated before"
    else:
        two_phases = cfg["isolated"] and set_malloc(*MALLOC_FOR_MEMORY)
        if cfg["isolated"]:  # in-process (tests) the collection is slow and the memory reading approximate anyway
            gc.collect()
        resettable = reset_peak_rss()
        before = (status_kib("VmRSS") or 0) * 1024
        method = "VmHWM - VmRSS before" + ("" if resettable else " (VmHWM not resettable: includes set-up)")
        if two_phases:
            for index in steps:
                step(index)
            peak = (status_kib("VmHWM") or 0) * 1024 - before
            set_malloc(*MALLOC_FOR_SPEED)
            method += ", memory phase (mmap threshold 64 KiB) before the timed phase (32 MiB)"
    times, tokens = [], 0
    for index in steps:
        t0 = time.perf_counter()
        tokens += step(index)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak, resident = torch.cuda.max_memory_allocated(device) - before, torch.cuda.memory_allocated(device)
    else:
        resident = before
        if not two_phases:
            peak = (status_kib("VmHWM") or 0) * 1024 - before
    return {"times": times, "tokens": tokens, "peak": peak, "resident": resident, "method": method}


def measure_config(cfg: dict) -> dict:
    """Build the data, models and step of one configuration and measure it (in the calling process)."""
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    size = Size(**cfg["size"])
    rng = np.random.default_rng(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    t_setup = time.perf_counter()
    data = prepare_data(cfg, size, rng)
    pool, batches, tcfg, collator, stats = data.pool, data.batches, data.tcfg, data.collator, data.stats
    kl = data.plan.kl
    token_probs = data.token_probs
    teacher, student = build_models(size, max(MAX_LEN, stats["max_len"]), kl is not None)
    runner = StudentRunner(student, mlm=tcfg.losses.alpha_mlm > 0, kl=kl)
    distiller = make_distiller(tcfg, device, runner, teacher, pool, collator, token_probs)
    setup_s = time.perf_counter() - t_setup

    def step(i: int) -> int:
        return train_step(distiller, pool, batches[i % len(batches)])

    index, flop = 0, {}
    if cfg["flops"]:  # the first warm-up step (an extra one with --warmup 0) counts the FLOP
        flop = count_flops(step, index)
        index += 1
    while index < cfg["warmup"]:
        step(index)
        index += 1
    m = measure_steps(step, cfg, device, index)
    index += cfg["steps"]
    times, tokens = m["times"], m["tokens"]
    step_s = statistics.median(times)
    result = {"tokens_per_s": tokens / sum(times), "step_s": step_s, "step_s_all": times,
              "student_tokens_per_step": tokens / len(times), "peak_mib": m["peak"] / 2**20,
              "resident_before_mib": m["resident"] / 2**20, "peak_method": m["method"], "setup_s": setup_s,
              "reduce_map_impl": getattr(kl, "impl", None), **stats, **flop}
    result["teacher_tokens_per_s"] = stats["teacher_tokens"] / stats["student_tokens"] * result["tokens_per_s"]
    if flop:
        result["achieved_flop_per_s"] = flop["flop_per_step"] / step_s
    if cfg["profile_steps"] > 0:
        result["profile"] = profile_shares(distiller, pool, batches, cfg["profile_steps"], index)
    return result


@dataclasses.dataclass
class StepData:
    """The synthetic texts and batches of one configuration, its trainer configuration and alignment plan, the
    MLM masking probabilities, the collator (t2s input where the alignment reads it) and `pool_stats`."""

    pool: SequencePool
    batches: list[list[int]]
    tcfg: TrainConfig
    plan: AlignmentPlan
    token_probs: torch.Tensor
    collator: Collator
    stats: dict


def prepare_data(cfg: dict, size: Size, rng: np.random.Generator) -> StepData:
    """Vocabularies, texts (min(warmup + steps, 4) batches), map files and trainer configuration of `cfg`
    (keys precision, config, reduce_map_mode, seed, batch_size, seq_len, warmup, steps, device)."""
    voc = synthetic_vocabularies(size.teacher_vocab, size.student_vocab, rng)
    n_batches = max(1, min(cfg["warmup"] + cfg["steps"], 4))
    pool, batches = synthetic_pool(voc, n_batches, cfg["batch_size"], cfg["seq_len"], rng)
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        paths = {"dir": tmp, **write_artifacts(voc, Path(tmp), cfg["seed"])}
        tcfg = trainer_config(cfg["precision"], cfg["config"], paths, cfg["seed"], cfg["batch_size"], cfg["device"],
                              cfg["reduce_map_mode"] == "logsumexp")
        plan = tcfg.alignments(VocabSizes(size.teacher_vocab, size.student_vocab, {}))
    counts = np.bincount(np.concatenate([q[1] for q in pool.seqs]), minlength=size.student_vocab)
    token_probs = mlm_token_probs(counts, tcfg.mlm.smoothing, list(range(len(SPECIAL_TOKENS))))
    collator = Collator(PAD, PAD, plan.t2s_input, size.student_vocab)
    return StepData(pool, batches, tcfg, plan, token_probs, collator, pool_stats(collator, pool, batches))


def pool_stats(collator: Collator, pool: SequencePool, batches: list[list[int]]) -> dict:
    """Mean tokens per batch (teacher, student, matched, t2s when the collator builds it) and the longest
    sequence on any side."""
    raws = [pool.gather(b) for b in batches]
    t2s = [collator(raw, with_t2s=True)["t2s_mask"].sum(1) for raw in raws] if collator.t2s_padded is not None \
        else []
    n = len(raws)
    longest = max(max(int(raw.t_lengths.max()), int(raw.s_lengths.max())) for raw in raws)
    out = {"teacher_tokens": sum(int(raw.t_lengths.sum()) for raw in raws) / n,
           "student_tokens": sum(int(raw.s_lengths.sum()) for raw in raws) / n,
           "matched_tokens": sum(int(raw.t_match.sum()) for raw in raws) / n,
           "max_len": max(longest, max((int(x.max()) for x in t2s), default=0))}
    if t2s:
        out["t2s_tokens"] = sum(int(x.sum()) for x in t2s) / n
    return out


GEMM_LAYOUTS = {"nn": lambda a, b: torch.matmul(a, b), "nt": lambda a, b: torch.matmul(a, b.t()),
                "tn": lambda a, b: torch.matmul(a.t(), b)}
"""The three operand layouts of a linear layer's GEMMs (forward x W^T, grad_input g W, grad_weight g^T x)."""


def measure_gemm(cfg: dict) -> dict:
    """Best FLOP/s of a square torch.matmul per precision, over the sizes 256, 512, ... and the three
    layouts, on the device and threads of the run. A size is big enough once one product takes
    `gemm_min_s`; a layout stops growing before one product would take more than `gemm_max_s`."""
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    out = {}
    for precision in cfg["precisions"]:
        dtype, per_layout = dtypes[precision], {}
        for layout, fn in GEMM_LAYOUTS.items():
            best, n, prev = (0.0, 0), 256, None
            while n <= cfg["gemm_max_n"] and (prev is None or prev * 8 <= cfg["gemm_max_s"]):
                a = torch.randn(n, n, device=device).to(dtype)
                b = torch.randn(n, n, device=device).to(dtype)
                fn(a, b)
                synchronize(device)
                times = []
                while len(times) < 3 or (sum(times) < cfg["gemm_budget_s"] and len(times) < 50):
                    t0 = time.perf_counter()
                    fn(a, b)
                    synchronize(device)
                    times.append(time.perf_counter() - t0)
                rate = 2 * n**3 / min(times)
                best = max(best, (rate, n))
                prev = min(times)
                if prev >= cfg["gemm_min_s"]:
                    break
                n *= 2
            per_layout[layout] = {"flop_per_s": best[0], "n": best[1]}
        top = max(per_layout, key=lambda k: per_layout[k]["flop_per_s"])
        out[precision] = {"flop_per_s": per_layout[top]["flop_per_s"], "n": per_layout[top]["n"], "layout": top,
                          "layouts": per_layout}
    return out


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively: on CUDA when torch says so, on CPU with AVX512-BF16 or AMX
    (elsewhere oneDNN/MKL emulate them, 10-50x slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ------------------------------------------------------------------------------------------ isolation


# ------------------------------------------------------------------------------------------ report


def fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def table(results: list[dict]) -> str:
    headers = ["size", "prec", "config", "tokens/s", "ms/step", "peak MiB", "GFLOP/step", "GFLOP/s",
               "% GEMM peak", "GEMM share", "GEMM+attn share"]
    rows = []
    for r in results:
        if "error" in r or "skipped" in r:
            text = f"error: {r['error'][:80]}" if "error" in r else "skipped: bf16 emulated on this CPU"
            rows.append([r["size_name"], r["precision"], r["label"], text, *[""] * 7])
            continue
        prof = r.get("profile") or {}
        rows.append([r["size_name"], r["precision"], r["label"], fmt(r["tokens_per_s"], 0),
                     fmt(r["step_s"] * 1e3), fmt(r["peak_mib"]), fmt(r.get("flop_per_step", math.nan) / 1e9, 2),
                     fmt(r.get("achieved_flop_per_s", math.nan) / 1e9), fmt(100 * r.get("gemm_peak_fraction", math.nan)),
                     fmt(100 * prof.get("gemm_share", math.nan), 0) + "%" if prof else "-",
                     fmt(100 * prof.get("matmul_share", math.nan), 0) + "%" if prof else "-"])
    return markdown_table(headers, rows, "lll" + "r" * 8)


def check_targets(results: list[dict], target_size: str) -> list[dict]:
    """The two targets at `target_size`, per precision (and reduce-map mode)."""
    ok = [r for r in results if "error" not in r and "skipped" not in r and r["size_name"] == target_size]
    checks = []
    for precision in dict.fromkeys(r["precision"] for r in ok):
        by = {(r["config"], r["reduce_map_mode"]): r for r in ok if r["precision"] == precision}
        for mode in dict.fromkeys(m for _, m in by if m is not None):
            gather, lean = by.get(("reduce_map/gather", mode)), by.get(("reduce_map/my_index", mode))
            if not (gather and lean):
                continue
            vocab = gather["size"]["teacher_vocab"]
            ratio = lean["peak_mib"] / gather["peak_mib"] if gather["peak_mib"] > 0 else math.nan
            checks.append({"target": "reduce-map peak memory: my_index <= 0.5 x gather", "size": target_size,
                           "precision": precision, "reduce_map_mode": mode, "teacher_vocab": vocab,
                           "my_index_mib": lean["peak_mib"], "gather_mib": gather["peak_mib"], "ratio": ratio,
                           "applies": vocab >= MEMORY_TARGET_VOCAB, "met": ratio <= 0.5})
        match = by.get(("match", None))
        if match and match.get("profile"):
            p = match["profile"]
            checks.append({"target": "match step: most time in matrix multiplications", "size": target_size,
                           "precision": precision, "gemm_share": p["gemm_share"], "matmul_share": p["matmul_share"],
                           "gemm_share_of_wall": p["gemm_share_of_wall"], "python_glue_share": p["python_glue_share"],
                           "applies": target_size != "tiny", "met": p["gemm_share"] > 0.5})
    return checks


def describe_checks(checks: list[dict]) -> str:
    lines = []
    for c in checks:
        verdict = ("PASS" if c["met"] else "FAIL") + ("" if c["applies"] else " (informative: the target is for "
                                                      "the demo size" + (", V_T >= 30K)" if "ratio" in c else ")"))
        if "ratio" in c:
            lines.append(f"- {c['target']} ({c['size']}, {c['precision']}, {c['reduce_map_mode']}, "
                         f"V_T {c['teacher_vocab']}): "
                         f"{c['my_index_mib']:.0f} / {c['gather_mib']:.0f} MiB = {c['ratio']:.2f}: {verdict}")
        else:
            lines.append(f"- {c['target']} ({c['size']}, {c['precision']}): GEMM ops {100 * c['gemm_share']:.0f}% of "
                         f"op time ({100 * c['gemm_share_of_wall']:.0f}% of wall), GEMM + attention "
                         f"{100 * c['matmul_share']:.0f}%, Python glue between ops {100 * c['python_glue_share']:.0f}%: "
                         f"{verdict}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def size_cost(size: Size) -> int:
    """Rough parameter count of teacher + student (orders sizes)."""
    return (size.teacher_vocab * size.teacher_hidden + 12 * size.teacher_layers * size.teacher_hidden ** 2
            + size.student_vocab * size.student_dim + 12 * size.student_layers * size.student_dim ** 2)


def validate_size(name: str, size: Size) -> None:
    """One-line errors for sizes the synthetic data or the models cannot have."""
    n_special = len(SPECIAL_TOKENS)
    if size.student_vocab < 3 * n_special or size.teacher_vocab < size.student_vocab:
        raise BenchError(f"size {name}: vocabularies {size.teacher_vocab} -> {size.student_vocab} do not work; the "
                         f"student needs at least {3 * n_special} tokens and the teacher at least as many")
    for side, dim, heads in (("teacher", size.teacher_hidden, size.teacher_heads),
                             ("student", size.student_dim, size.student_heads)):
        if dim % heads:
            raise BenchError(f"size {name}: the {side} width {dim} is not a multiple of its {heads} heads")


def parse_size(spec: str, sizes: dict[str, Size]) -> tuple[str, Size]:
    """`NAME:key=value,...`: a new size (from demo's values) or changes to an existing one."""
    name, _, body = spec.partition(":")
    if not name or not body:
        raise BenchError(f"--size {spec!r}: expected NAME:key=value[,key=value...]")
    fields = {f.name for f in dataclasses.fields(Size)}
    changes = {}
    for item in body.split(","):
        key, _, value = item.partition("=")
        if key not in fields or not value.isdigit() or int(value) < 1:
            raise BenchError(f"--size {spec!r}: {item!r} is not key=positive integer with key one of "
                             f"{', '.join(sorted(fields))}")
        changes[key] = int(value)
    return name, dataclasses.replace(sizes.get(name, SIZES["demo"]), **changes)


def add_step_arguments(p: argparse.ArgumentParser, unit: str, seq_len: bool = True,
                       batch_size: int = 4) -> None:
    """The options of a benchmark that times the trainer's step: data shape (`--seq_len` where the benchmark
    makes its texts), steps, threads, device and the worker process per `unit` (e.g. "configuration")."""
    p.add_argument("--batch_size", type=int, default=batch_size,
                   help="texts per batch (the paper trains with 4 per GPU)")
    if seq_len:
        p.add_argument("--seq_len", type=int, default=128,
                       help="teacher tokens per text ([CLS] and [SEP] included)")
    p.add_argument("--steps", type=int, default=3, help=f"timed steps per {unit} (steady state: after the warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs available)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--isolation", choices=("auto", "fork", "spawn", "none"), default="auto",
                   help=f"worker process per {unit} (auto: fork on CPU, spawn on CUDA; none: in-process)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="tiny,demo", help="comma-separated sizes: " + ", ".join(
        f"{k} ({v.teacher_layers}x{v.teacher_hidden} V_T {v.teacher_vocab} -> {v.student_layers}x{v.student_dim} "
        f"V_S {v.student_vocab})" for k, v in SIZES.items()))
    p.add_argument("--size", action="append", default=[], metavar="NAME:key=value,...",
                   help="define or change a size, e.g. demo:teacher_vocab=120000,student_vocab=5000 (keys: the "
                        "fields teacher_layers/hidden/heads/ffn/vocab and student_layers/dim/heads/ffn/vocab)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated, from " + ", ".join(CONFIGS))
    p.add_argument("--reduce_map_modes", default="logsumexp",
                   help="reduce-map scores, comma-separated: logsumexp (--sum_probs, the paper's reduce-map runs) "
                        "and/or sum")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated autocast precisions: fp32, bf16, fp16")
    add_step_arguments(p, "configuration")
    p.add_argument("--profile_steps", type=int, default=1, help="extra steps under torch.profiler (0: none)")
    p.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True,
                   help="count FLOP per step with FlopCounterMode (one extra step, the first warm-up step)")
    p.add_argument("--emulated_bf16", action="store_true",
                   help="run bf16 at every size even on a CPU that emulates it (by default only the smallest size)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny size, batch 4 x 32 tokens, 1 warm-up + 2 timed steps, 1 profiled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_step.json"), help="JSON results")
    return p


def apply_quick(a: argparse.Namespace, argv: list[str], values: dict) -> None:
    """Set the `--quick` values in `a`, except those of options given on the command line `argv`."""
    given = {arg.split("=")[0] for arg in argv}
    for key, value in values.items():
        if f"--{key}" not in given:
            setattr(a, key, value)


def gemm_peaks(precisions: list[str], base: dict, isolation: str, quick: bool) -> dict:
    """The GEMM peak of every precision (`measure_gemm` in a worker of its own, malloc set for speed) on the
    device and threads of `base`; shorter timings with `quick`. Prints each peak; a failure: `BenchError`."""
    cpu = torch.device(base["device"]).type == "cpu"
    scale = 0.1 if quick else 1.0  # shorter GEMM timings for the smoke run
    limits = {"gemm_min_s": (0.05 if cpu else 0.002) * scale, "gemm_max_s": (0.5 if cpu else 0.05) * scale,
              "gemm_max_n": 4096 if cpu else 16384, "gemm_budget_s": (0.2 if cpu else 0.05) * scale}
    gemm = run_isolated(measure_gemm, {**base, "precisions": precisions, **limits}, isolation,
                        child_setup=functools.partial(set_malloc, *MALLOC_FOR_SPEED))
    if "error" in gemm:
        raise BenchError(f"GEMM peak measurement failed: {gemm['error']}")
    for precision, g in gemm.items():
        print(f"GEMM peak {precision}: {g['flop_per_s'] / 1e9:.1f} GFLOP/s (n={g['n']}, {g['layout']}; "
              + ", ".join(f"{k} {v['flop_per_s'] / 1e9:.1f}" for k, v in g["layouts"].items()) + ")",
              file=sys.stderr, flush=True)
    return gemm


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = build_parser()
    a = p.parse_args(argv)
    if a.quick:
        apply_quick(a, argv, {"sizes": "tiny", "batch_size": 4, "seq_len": 32, "warmup": 1, "steps": 2,
                              "profile_steps": 1})
    sizes = dict(SIZES)
    for spec in a.size:
        name, size = parse_size(spec, sizes)
        sizes[name] = size
    names = [s for s in a.sizes.split(",") if s]
    configs = [c for c in a.configs.split(",") if c]
    precisions = [x for x in a.precisions.split(",") if x]
    modes = [x for x in a.reduce_map_modes.split(",") if x]
    for what, chosen, allowed in (("size", names, sizes), ("config", configs, CONFIGS),
                                  ("precision", precisions, PRECISIONS), ("reduce_map_mode", modes, MODE_TAGS)):
        bad = [x for x in chosen if x not in allowed]
        if bad or not chosen:
            raise BenchError(f"unknown --{what}s {bad or chosen}; choose from {', '.join(allowed)}")
    for name in names:
        validate_size(name, sizes[name])
    for flag in ("steps", "batch_size"):
        if getattr(a, flag) < 1:
            raise BenchError(f"--{flag} must be at least 1")
    if a.seq_len < 3 or a.warmup < 0 or a.profile_steps < 0:
        raise BenchError("--seq_len must be at least 3, --warmup and --profile_steps not negative")
    device = choose_device(a.device)
    threads, isolation = workers(a.threads, a.isolation, device)
    base = {"device": str(device), "threads": threads, "seed": a.seed, "isolated": isolation != "none"}
    print(f"device {device}, {threads} threads, isolation {isolation}", file=sys.stderr, flush=True)

    gemm = gemm_peaks(precisions, base, isolation, a.quick)
    emulated = "bf16" in precisions and not native_bf16(device) and not a.emulated_bf16
    smallest = min(names, key=lambda n: size_cost(sizes[n]))
    results = []
    for name in names:
        for precision in precisions:
            if precision == "bf16" and emulated and name != smallest:
                reason = ("bf16 matrix products are emulated on this CPU (no AVX512-BF16/AMX), many times slower "
                          "than fp32; bf16 runs at the smallest size only (--emulated_bf16: at every size)")
                results.append({"size_name": name, "size": dataclasses.asdict(sizes[name]), "precision": precision,
                                "label": "(all)", "config": None, "reduce_map_mode": None, "skipped": reason})
                print(f"{name} {precision}: skipped: {reason}", file=sys.stderr, flush=True)
                continue
            for config, mode in [(c, m) for c in configs for m in (modes if c.startswith("reduce_map") else [None])]:
                label = config if mode is None else config.replace("reduce_map", f"reduce_map[{MODE_TAGS[mode]}]")
                cfg = {**base, "size_name": name, "size": dataclasses.asdict(sizes[name]), "precision": precision,
                       "config": config, "reduce_map_mode": mode, "label": label, "batch_size": a.batch_size,
                       "seq_len": a.seq_len, "steps": a.steps, "warmup": a.warmup, "profile_steps": a.profile_steps,
                       "flops": a.flops}
                t0 = time.perf_counter()
                measured = run_isolated(measure_config, cfg, isolation)
                r = {**cfg, **measured, "wall_s": time.perf_counter() - t0}
                if "achieved_flop_per_s" in r:
                    r["gemm_peak_fraction"] = r["achieved_flop_per_s"] / gemm[precision]["flop_per_s"]
                results.append(r)
                brief = (f"error {r['error']}" if "error" in r else
                         f"{r['tokens_per_s']:.0f} tok/s, {r['step_s'] * 1e3:.0f} ms/step, peak {r['peak_mib']:.0f} MiB")
                print(f"{name} {precision} {label}: {brief} ({r['wall_s']:.1f} s)", file=sys.stderr, flush=True)
    target_size = max(names, key=lambda n: size_cost(sizes[n]))
    checks = check_targets(results, target_size)
    legend = (f"batch {a.batch_size} x {a.seq_len} teacher tokens, {threads} threads on {device}; tokens/s = student "
              "tokens per second, median ms/step over the timed steps (collate + forward + backward + AdamW), peak "
              "MiB = peak memory of the same steps above what was resident before them (CPU: measured in a phase of "
              "its own with freed memory returned at once, see the module docstring), GFLOP/s against the "
              "GEMM peak of the same run, GEMM share = time in aten::mm/addmm/bmm/matmul/linear (+ attention) "
              "over the profiled step")
    report = (table(results) + "\n\n" + legend + "\n\nTargets:\n"
              + (describe_checks(checks) or "- (not measured in this run)"))
    summary = {"machine": machine_info(device=str(device), threads=threads, isolation=isolation,
                                       omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                                       cuda_device=torch.cuda.get_device_name(device) if device.type == "cuda"
                                       else None),
               "params": {"sizes": {n: dataclasses.asdict(sizes[n]) for n in names}, "configs": configs,
                          "precisions": precisions, "batch_size": a.batch_size, "seq_len": a.seq_len,
                          "steps": a.steps, "warmup": a.warmup, "profile_steps": a.profile_steps,
                          "alpha_ce": ALPHA_CE, "alpha_mlm": ALPHA_MLM, "temperature": TEMPERATURE,
                          "cut_len": CUT_LEN, "quick": a.quick},
               "gemm_peak": gemm, "results": results, "targets": checks, "markdown": report}
    write_report(a.out, summary, report)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    run_main(main, BenchError, UserError)
