"""Parity benchmark: the project's trainer (OURS) against a restatement of the HF DistilBERT example's
training step (REFERENCE), same-vocabulary BERT -> DistilBERT distillation on real text, same data.

    .venv/bin/python bench/parity.py [--corpus runs/cache/corpus/ru_sentences.txt] [--precisions fp32[,bf16]]
        [--threads 2] [--rounds 3] [--quick] [--profile_steps 0] [--isolation fork|spawn|none] [--work_dir DIR]
        [--out bench/results/parity.json]

Fixed configuration (`--quick`: a smoke run with tiny models, see `QUICK`):
- corpus: the first 20,000 lines of `--corpus` (default: the corpus of preprocessing/get_corpus.py,
  runs/cache/corpus/ru_sentences.txt or runs/corpus/ru_sentences.txt); a cased WordPiece vocabulary of
  16,000 tokens trained on them (`train_teacher_tok.train_bert_tokenizer`), used by teacher and student;
- teacher: BertForMaskedLM 4 layers, hidden 256, 4 heads, FFN 1024, 512 positions, random init (seed 0);
- student: DistilBERT 2 layers, dim 256, 4 heads, FFN 1024, 512 positions, initialised from teacher layers 0
  and 2 by the pipeline (`--init_strategy select`, DistilBERT's extraction); both implementations start
  from these same weights;
- data: `preprocessing/run_pipeline.py --student_tokenizer TEACHER_DIR --max_len 128 --n_shards 1` on the
  20,000 lines, then the first 4,000 sequences (in corpus order) copied into their own shard set
  (`parity_binarized/`, written with `shard_io`); one epoch of 250 length-grouped batches of 16 (the
  trainer's `GroupedBatchSampler`, seed 0: both implementations train on the very same batches, in the same
  order; checked by comparing the batch indices);
- loss 5.0 * KL (T = 2, every non-pad position, full vocabulary) + 2.0 * MLM (DistilBERT masking: 15% of
  the real tokens drawn with weights count^-0.7, 80% [MASK] / 10% kept / 10% random) + 1.0 * cosine
  (1 - cos between the last hidden states, every non-pad position); AdamW lr 5e-4 (betas 0.9/0.98,
  eps 1e-6, no weight decay, no warm-up, constant), gradient clipping 5.0; fp32 (and bf16 autocast with
  `--precisions fp32,bf16`); torch threads `--threads` (2).

OURS is `train.main([...])` in-process in the worker: `--alpha_ce 5 --alpha_mlm 2 --alpha_cos 1
--temperature 2 --projection_strategy select_by_ids --t_s_layers_ids '{"teacher": [4], "student": [2]}'
--no-train_projections` (with equal widths the projection is a frozen identity, so the term is exactly
DistilBERT's cosine) `--batch_size 16 --gradient_accumulation_steps 1 --max_steps 250 --n_epoch 1
--valid_prop 0 --warmup_prop 0 --log_interval 250`. REFERENCE (`ReferenceDistiller`, written for this
benchmark) restates the HF example's step: teacher (no grad) and student run on the full padded batch and
return full logits [B, L, V] and hidden states; the logits of the non-pad positions are taken with
`masked_select` of the expanded attention mask and `.view(-1, V)`; KLDivLoss(batchmean) of log_softmax(s/T)
against softmax(t/T), times T^2; CrossEntropyLoss(ignore_index=-100) over all [B*L, V] student logits; the
last hidden states masked_select-ed the same way into [N, D] and CosineEmbeddingLoss with target 1; the
padding, masking (DistilBERT's algorithm, its own generator), backward, clipping and AdamW step are its
own code too (fp16 batch rounding and the linear LR schedule of the example are left out: fp32, constant lr).

Measurements on the CPU, each implementation and precision in its own worker process (`--isolation fork`:
forked from this process, which has imported torch but computed nothing, so every worker starts with the
same resident set and a fresh OpenMP pool; `none`: in-process, for the tests, whose RSS readings are then
not meaningful); OURS runs first (it writes the first batch of the objective check):
- time of the training loop only, excluding start-up (loading, data set-up) and everything after the last
  update: OURS = the trainer's own `tokens_per_s` of its training log at update 250 (`Distiller.train`
  measures from its start to that log line, which comes before the final validation, checkpoint and
  export); REFERENCE = wall time from before the first batch is padded to after the last optimizer step;
  both loops include batching, masking, forward, backward, clipping and AdamW;
- real tokens = non-pad tokens of the 250 batches (`[CLS]`/`[SEP]` included), tokens/s = real tokens /
  loop seconds; also padded tokens (B x L) for the padding share;
- rounds (`--rounds R`, default 3; 1 with `--quick`): every round runs OURS then REFERENCE for each
  precision, so slow phases of a shared machine hit both alike; the speed-up of a precision is the median of
  OURS's tokens/s over the rounds divided by the median of REFERENCE's (each round's own ratio is listed
  too); the targets are OURS >= 2x REFERENCE in fp32 and >= 3x in bf16 (`SPEEDUP_TARGETS`);
- peak RSS: the kernel's high-water mark VmHWM at the end of the loop after resetting it through
  /proc/self/clear_refs just before the loop (so: the largest resident set during the loop, including
  the process's libraries and models), and that peak minus the resident set before the loop. glibc's
  default malloc settings are kept (they set the speed), so this counts freed memory the allocator keeps
  too, not only live tensors; it depends on the sequence of allocation sizes as much as on their peak;
- objective check (first round only): before its loop, OURS computes its loss on the first batch in eval mode (no dropout)
  with the trainer's own `_mask` and `_losses`, and stores the masked ids and labels; REFERENCE computes
  its loss on the same batch with those masked ids and labels, also in eval mode. Both do it in the
  training precision and in fp64 (students converted to fp64 and back, losslessly; the teacher loaded afresh in
  fp64, since a bf16 trainer keeps its Linears in bf16; no autocast). Equal
  totals and terms (KL, MLM, cosine; relative difference <= 1e-7 in fp64, <= 1e-4 + 1e-6 in fp32; a bf16
  comparison is recorded, not judged) show that both optimise the same objective. With a random teacher
  the KL term is small (~1e-5: near-uniform teacher outputs), hence the fp64 comparison;
- `--profile_steps K`: afterwards each implementation runs K more steps (fresh worker, same set-up) under
  torch.profiler; the JSON and the report list the operators with the most self CPU time.
The machine's other load is recorded (load average) with the results; on a shared machine rerun.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import shutil
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
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bench._common import (  # noqa: E402
    machine_info,
    markdown_table,
    reset_peak_rss,
    run_isolated,
    run_main,
    status_kib,
    write_report,
)
from kdcore.errors import UserError  # noqa: E402
from kdcore.tokenizer_utils import MAX_LEN  # noqa: E402

IMPLEMENTATIONS = ("ours", "reference")
PRECISIONS = ("fp32", "bf16")
DEFAULT_CORPORA = (ROOT / "runs" / "cache" / "corpus" / "ru_sentences.txt", ROOT / "runs" / "corpus" / "ru_sentences.txt")
SEED = 0
ALPHA_CE, ALPHA_MLM, ALPHA_COS, TEMPERATURE = 5.0, 2.0, 1.0, 2.0
LEARNING_RATE, MAX_GRAD_NORM, ADAM_BETAS, ADAM_EPS = 5e-4, 5.0, (0.9, 0.98), 1e-6
MLM_MASK_PROP, WORD_MASK, WORD_KEEP, WORD_RAND, MLM_SMOOTHING = 0.15, 0.8, 0.1, 0.1, 0.7
SPEEDUP_TARGETS = {"fp32": 2.0, "bf16": 3.0}  # OURS / REFERENCE median tokens/s
LOSS_TOL = {"fp64": (1e-7, 1e-12), "fp32": (1e-4, 1e-6)}  # (rtol, atol) of the loss check
LOSS_NAMES = ("loss", "loss_ce", "loss_mlm", "loss_cos")

FULL = {"lines": 20000, "vocab_size": 16000, "sequences": 4000, "batch_size": 16, "max_len": 128,
        "teacher": {"layers": 4, "hidden": 256, "heads": 4, "ffn": 1024, "positions": MAX_LEN},
        "student": {"layers": 2, "dim": 256, "heads": 4, "ffn": 1024, "positions": MAX_LEN}}
QUICK = {"lines": 1500, "vocab_size": 1000, "sequences": 64, "batch_size": 16, "max_len": 64,
         "teacher": {"layers": 2, "hidden": 64, "heads": 2, "ffn": 256, "positions": MAX_LEN},
         "student": {"layers": 1, "dim": 64, "heads": 2, "ffn": 256, "positions": MAX_LEN}}


class BenchError(Exception):
    """A usage problem: printed as one line, exit code 2."""


# ------------------------------------------------------------------------------------------ set-up


def read_lines(corpus: Path, n: int) -> list[str]:
    """The first `n` lines of `corpus` (fewer if it is shorter), newline removed."""
    lines = []
    with open(corpus, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if len(lines) >= n:
                break
            lines.append(line.rstrip("\n"))
    return lines


def subset_shards(src: Path, dst: Path, n: int) -> int:
    """Copy the first `n` sequences of the one-shard set `src` (match masks included) into a new set `dst`."""
    from kdcore.shard_io import Shard, ShardSetWriter, open_shards, read_index

    index = read_index(src)
    shards = open_shards(src)
    if len(shards) != 1:
        raise BenchError(f"{src} has {len(shards)} shards, expected 1")
    shard = shards[0]
    if len(shard) < n:
        raise BenchError(f"the pipeline kept {len(shard)} sequences, fewer than the {n} needed; use a longer "
                         "corpus or more --lines")
    block = shard.block(0, n)
    with ShardSetWriter(dst, index["teacher_vocab_size"], index["student_vocab_size"],
                        index["fingerprints"]) as shard_set:
        with shard_set.new_shard() as writer:
            writer.add(block)
        shard_set.close({"step": "bench/parity.py subset", "source": str(src), "n_seqs": n})
    if block.t_match is not None:
        Shard(dst / "shard_00000").write_match(block.t_match, block.s_match)
    return len(block)


def setup(cfg: dict) -> dict:
    """Corpus slice, tokenizer, random teacher, pipeline and the training subset; returns paths and stats."""
    from transformers import BertConfig, BertForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(cfg["threads"])
    work, size = Path(cfg["work_dir"]), cfg["size"]
    t0 = time.perf_counter()
    lines = read_lines(Path(cfg["corpus"]), size["lines"])
    corpus = work / "corpus.txt"
    corpus.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    from kdcore.tokenizer_utils import load_tokenizer
    from run_pipeline import build_parser as pipeline_parser
    from run_pipeline import run as run_pipeline
    from train_teacher_tok import train_bert_tokenizer

    teacher_dir = work / "teacher"
    train_bert_tokenizer([str(corpus)], size["vocab_size"], str(teacher_dir), lowercase=False, max_len=MAX_LEN)
    vocab_size = len(load_tokenizer(teacher_dir, "teacher"))
    t = size["teacher"]
    torch.manual_seed(SEED)
    BertForMaskedLM(BertConfig(vocab_size=vocab_size, hidden_size=t["hidden"], num_hidden_layers=t["layers"],
                               num_attention_heads=t["heads"], intermediate_size=t["ffn"],
                               max_position_embeddings=t["positions"])).save_pretrained(str(teacher_dir))
    s = size["student"]
    student_config = work / "student_config.json"
    student_config.write_text(json.dumps({"model_type": "distilbert", "dim": s["dim"], "n_layers": s["layers"],
                                          "n_heads": s["heads"], "hidden_dim": s["ffn"],
                                          "max_position_embeddings": s["positions"]}))
    out = work / "out"
    args = pipeline_parser().parse_args([
        "--teacher_name", str(teacher_dir), "--corpus", str(corpus), "--student_tokenizer", str(teacher_dir),
        "--student_config", str(student_config), "--out_dir", str(out), "--max_len", str(size["max_len"]),
        "--n_shards", "1", "--num_workers", str(cfg["threads"]), "--init_strategy", "select"])
    manifest = run_pipeline(args, log=lambda *_: None)
    n_pipeline = read_json(out / "processed_binarized" / "index.json")["n_seqs"]
    n = subset_shards(out / "processed_binarized", out / "parity_binarized", size["sequences"])
    return {"teacher_dir": str(teacher_dir), "out_dir": str(out), "data_dir": str(out / "parity_binarized"),
            "corpus_lines": len(lines), "vocab_size": vocab_size, "pipeline_sequences": n_pipeline,
            "train_sequences": n, "student_layers_from_teacher":
                manifest["steps"]["init_weights"]["stats"].get("layer_groups"),
            "setup_s": time.perf_counter() - t0}


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------ measuring


def rss_mib(field: str) -> float:
    return (status_kib(field) or 0) / 1024


def start_loop_measure() -> dict:
    """Collect garbage, reset the peak resident set, note the resident set; called just before a timed loop."""
    gc.collect()
    resettable = reset_peak_rss()
    return {"rss_before_mib": rss_mib("VmRSS"), "hwm_resettable": resettable, "t0": time.perf_counter()}


def end_loop_measure(start: dict) -> dict:
    seconds = time.perf_counter() - start["t0"]
    peak = rss_mib("VmHWM")
    out = {"wall_s": seconds, "peak_rss_mib": peak, "rss_before_mib": start["rss_before_mib"],
           "peak_rss_above_start_mib": peak - start["rss_before_mib"],
           "peak_method": "VmHWM after a clear_refs reset before the loop" if start["hwm_resettable"]
           else "VmHWM of the whole process (clear_refs not allowed)"}
    return out


def digest_batches(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(np.asarray(b, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


PROFILE_CATEGORIES = (  # (name, substrings of the operator names), first match wins
    ("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation", "aten::addbmm")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("softmax", ("softmax",)),
    ("masked_select/scatter, indexing", ("masked_", "index", "nonzero", "gather", "scatter")),
    ("copies and fills", ("aten::copy_", "aten::fill_", "aten::zero_", "aten::clone", "aten::cat")),
    ("optimizer", ("_foreach", "Optimizer", "adam")),
)


def profile_table(prof, n: int = 15) -> dict:
    """Self CPU time of a finished torch.profiler run: the top `n` operators and the shares of categories."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    categories: dict[str, float] = {}
    for e in rows:
        name = next((c for c, keys in PROFILE_CATEGORIES if any(k in e.key for k in keys)), "other (mostly elementwise)")
        categories[name] = categories.get(name, 0.0) + e.self_cpu_time_total / total
    return {"total_self_ms": total / 1e3, "categories": categories,
            "top_ops": [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
                         "share": e.self_cpu_time_total / total} for e in rows[:n]]}


# ------------------------------------------------------------------------------------------ OURS


def ours_argv(cfg: dict, dump: Path) -> list[str]:
    """train.py's command line for the configuration (see the module docstring)."""
    paths, size = cfg["paths"], cfg["size"]
    out = Path(paths["out_dir"])
    layers = json.dumps({"teacher": [size["teacher"]["layers"]], "student": [size["student"]["layers"]]})
    return ["--dump_path", str(dump), "--force", "--binarized_data_folder", paths["data_dir"],
            "--student_name", str(out / "student"), "--student_pretrained_weights", str(out / "student_init"),
            "--student_token_counts", str(out / "student_counts.npy"), "--teacher_name", paths["teacher_dir"],
            "--alpha_ce", str(ALPHA_CE), "--alpha_mlm", str(ALPHA_MLM), "--alpha_cos", str(ALPHA_COS),
            "--temperature", str(TEMPERATURE), "--projection_strategy", "select_by_ids",
            "--t_s_layers_ids", layers, "--no-train_projections",
            "--mlm_mask_prop", str(MLM_MASK_PROP), "--word_mask", str(WORD_MASK), "--word_keep", str(WORD_KEEP),
            "--word_rand", str(WORD_RAND), "--mlm_smoothing", str(MLM_SMOOTHING),
            "--batch_size", str(size["batch_size"]), "--gradient_accumulation_steps", "1",
            "--learning_rate", str(LEARNING_RATE), "--adam_epsilon", str(ADAM_EPS), "--weight_decay", "0",
            "--max_grad_norm", str(MAX_GRAD_NORM), "--warmup_prop", "0", "--n_epoch", "1",
            "--max_steps", str(cfg["steps"]), "--valid_prop", "0", "--log_interval", str(cfg["steps"]),
            "--checkpoint_interval", str(cfg["steps"]), "--seed", str(SEED), "--device", "cpu",
            "--precision", cfg["precision"]]


def run_ours(cfg: dict) -> dict:
    """Run train.main in this process; instrument (never change) the Distiller to read the loop's numbers."""
    import distiller as distiller_mod
    import train
    from kdcore.model_io import load_teacher

    torch.set_num_threads(cfg["threads"])
    cls = distiller_mod.Distiller
    orig_train, orig_log, orig_batch = cls.train, cls._log_train, cls._batch
    rec: dict = {"batches": [], "padded": 0}
    profile = cfg.get("profile_steps", 0) > 0

    def first_batch_check(self) -> None:
        """OURS's loss on the first batch with the masking of the first update (a cloned generator), eval
        mode: in the training precision, and in fp64 (the student converted to fp64 and back, which is lossless,
        and a fresh fp64 copy of the teacher; no autocast) where rounding cannot hide a difference."""
        first = self.sampler.batches(self.sampler.epoch)[0]
        batch = orig_batch(self, self.train_data, first)
        state = self.generator.get_state()
        masked, labels = self._mask(batch, torch.Generator().set_state(state))
        self.runner.eval()
        with torch.no_grad():
            rec["check"] = loss_values(*self._losses(batch, torch.Generator().set_state(state)))
            precision, self.precision = self.precision, "fp32"
            teacher, self.teacher = self.teacher, load_teacher(cfg["paths"]["teacher_dir"]).double().eval()
            self.runner.double()  # (the trainer may keep the teacher's Linears in bf16: a fresh fp64 copy here)
            try:
                rec["check_fp64"] = loss_values(*self._losses(batch, torch.Generator().set_state(state)))
            finally:
                self.runner.float()
                self.teacher, self.precision = teacher, precision
        self.runner.train()
        np.savez(cfg["check_file"], s_ids=batch["s_ids"].cpu().numpy(), s_mask=batch["s_mask"].cpu().numpy(),
                 masked=masked.cpu().numpy(), labels=labels.cpu().numpy(), indices=np.asarray(first))

    def train_wrapper(self):
        if cfg["check"]:
            first_batch_check(self)
        rec["start"] = start_loop_measure()
        if profile:  # from here to the log line of the last update (not the final checkpoint and export)
            rec["profiler"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            rec["profiler"].__enter__()
        try:
            return orig_train(self)
        finally:
            if "profiler" in rec and "profile" not in rec:
                rec["profiler"].__exit__(None, None, None)

    def batch_wrapper(self, data, indices):
        batch = orig_batch(self, data, indices)
        if data is self.train_data:
            rec["batches"].append(indices)
            rec["padded"] += batch["s_mask"].numel()
        return batch

    def log_wrapper(self, sums, n_steps, grad_norm, tokens_per_s):
        if self.state.global_step == cfg["steps"] and "end" not in rec:
            rec["end"] = end_loop_measure(rec["start"])
            rec["trainer_tokens_per_s"] = tokens_per_s
            rec["mean_losses"] = {k: v / n_steps for k, v in sums.items()}
            if "profiler" in rec:
                rec["profiler"].__exit__(None, None, None)
                rec["profile"] = profile_table(rec["profiler"])
        return orig_log(self, sums, n_steps, grad_norm, tokens_per_s)

    cls.train, cls._log_train, cls._batch = train_wrapper, log_wrapper, batch_wrapper
    dump = Path(cfg["work_dir"]) / f"ours_{cfg['precision']}{'_profile' if profile else ''}"
    tqdm_env = os.environ.get("RVKD_NO_TQDM")
    os.environ["RVKD_NO_TQDM"] = "1"  # no progress bar in the timed loop
    try:
        rc = train.main(ours_argv(cfg, dump))
    finally:
        cls.train, cls._log_train, cls._batch = orig_train, orig_log, orig_batch
        if tqdm_env is None:
            os.environ.pop("RVKD_NO_TQDM")
        else:
            os.environ["RVKD_NO_TQDM"] = tqdm_env
    if rc != 0 or "end" not in rec:
        raise BenchError(f"train.main returned {rc} without logging update {cfg['steps']}")
    data = [np.asarray(b) for b in rec["batches"]]
    lengths = np.diff(np.load(Path(cfg["paths"]["data_dir"]) / "shard_00000" / "student_offsets.npy"))
    tokens = int(sum(int(lengths[b].sum()) for b in data))
    seconds = tokens / rec["trainer_tokens_per_s"]
    result = {"steps": len(data), "real_tokens": tokens, "padded_tokens": rec["padded"], "seconds": seconds,
              "tokens_per_s": rec["trainer_tokens_per_s"], "time_source": "trainer log (tokens_per_s at the last "
              "update)", **rec["end"], "batches_digest": digest_batches(data),
              "mean_losses": rec["mean_losses"], "first_batch_losses": rec.get("check"),
              "first_batch_losses_fp64": rec.get("check_fp64")}
    result["wrapper_wall_s"] = result.pop("wall_s")  # cross-check: start of Distiller.train to the log line
    if profile:
        result["profile"] = rec["profile"]
    return result


# ------------------------------------------------------------------------------------------ REFERENCE


class ReferenceDistiller:
    """The HF DistilBERT example's training step, restated (see the module docstring).

    The teacher (BertForMaskedLM) and the student (DistilBertForMaskedLM) both see the full padded batch;
    every loss reads full [B, L, V] logits through a masked_select of the expanded attention mask.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, token_probs: torch.Tensor, pad_id: int,
                 mask_id: int, vocab_size: int, device: torch.device, amp_dtype: torch.dtype | None):
        self.student, self.teacher = student.to(device), teacher.to(device)
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.token_probs = token_probs.to(device)
        self.pad_id, self.mask_id, self.vocab_size, self.device = pad_id, mask_id, vocab_size, device
        self.amp_dtype = amp_dtype
        self.kl_loss = nn.KLDivLoss(reduction="batchmean")
        self.mlm_loss = nn.CrossEntropyLoss(ignore_index=-100)
        self.cos_loss = nn.CosineEmbeddingLoss(reduction="mean")
        self.action_probs = torch.tensor([WORD_MASK, WORD_KEEP, WORD_RAND], device=device)
        no_decay = ("bias", "LayerNorm.weight")
        params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in params if not any(k in n for k in no_decay)], "weight_decay": 0.0},
                  {"params": [p for n, p in params if any(k in n for k in no_decay)], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=ADAM_BETAS, eps=ADAM_EPS)

    def pad(self, seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad to the longest sequence: (ids int64 [B, L], lengths int64 [B])."""
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        ids = np.full((len(seqs), int(lengths.max())), self.pad_id, dtype=np.int64)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = seq
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(lengths).to(self.device)

    def mask_tokens(self, ids: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator):
        """DistilBERT's MLM masking: ceil(15% of the real tokens) positions drawn without replacement with
        weights count^-0.7 (0 for special tokens and padding); each becomes [MASK] (80%), stays (10%) or a
        uniformly random id (10%). Returns (input ids, labels with -100 off the targets)."""
        flat = ids.view(-1)
        weights = self.token_probs[flat]
        n_targets = math.ceil(MLM_MASK_PROP * int(lengths.sum()))
        picked = torch.multinomial(weights / weights.sum(), n_targets, replacement=False, generator=generator)
        is_target = torch.zeros_like(flat, dtype=torch.bool)
        is_target[picked] = True
        is_target &= flat != self.pad_id
        originals = flat[is_target]
        action = torch.multinomial(self.action_probs, originals.numel(), replacement=True, generator=generator)
        random_ids = torch.randint(self.vocab_size, originals.shape, generator=generator, device=ids.device)
        new_ids = torch.where(action == 0, torch.full_like(originals, self.mask_id),
                              torch.where(action == 1, originals, random_ids))
        inputs = flat.masked_scatter(is_target, new_ids).view_as(ids)
        labels = torch.where(is_target, flat, torch.full_like(flat, -100)).view_as(ids)
        return inputs, labels

    def losses(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        """(total, {loss_ce, loss_mlm, loss_cos}) of one batch."""
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        with autocast:
            with torch.no_grad():
                t_out = self.teacher(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            s_out = self.student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            s_logits, t_logits = s_out.logits, t_out.logits
            vocab = s_logits.size(-1)
            keep = attention_mask.bool().unsqueeze(-1).expand_as(s_logits)
            s_kept = torch.masked_select(s_logits, keep).view(-1, vocab)
            t_kept = torch.masked_select(t_logits, keep).view(-1, vocab)
            loss_ce = self.kl_loss(F.log_softmax(s_kept / TEMPERATURE, dim=-1),
                                   F.softmax(t_kept / TEMPERATURE, dim=-1)) * TEMPERATURE ** 2
            loss_mlm = self.mlm_loss(s_logits.view(-1, vocab), labels.view(-1))
            s_hidden, t_hidden = s_out.hidden_states[-1], t_out.hidden_states[-1]
            dim = s_hidden.size(-1)
            keep_h = attention_mask.bool().unsqueeze(-1).expand_as(s_hidden)
            s_rows = torch.masked_select(s_hidden, keep_h).view(-1, dim)
            t_rows = torch.masked_select(t_hidden, keep_h).view(-1, dim)
            loss_cos = self.cos_loss(s_rows, t_rows, s_rows.new_ones(s_rows.size(0)))
            total = ALPHA_CE * loss_ce + ALPHA_MLM * loss_mlm + ALPHA_COS * loss_cos
        return total, {"loss_ce": loss_ce, "loss_mlm": loss_mlm, "loss_cos": loss_cos}

    def step(self, seqs: list[np.ndarray], generator: torch.Generator) -> tuple[int, int, dict[str, float]]:
        """One update on one batch; returns (real tokens, padded tokens, loss values)."""
        ids, lengths = self.pad(seqs)
        attention_mask = torch.arange(ids.size(1), device=self.device)[None, :] < lengths[:, None]
        inputs, labels = self.mask_tokens(ids, lengths, generator)
        total, losses = self.losses(inputs, attention_mask, labels)
        if torch.isnan(total).any():
            raise BenchError("REFERENCE: NaN loss")
        total.backward()
        nn.utils.clip_grad_norm_(self.student.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad()
        values = {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in losses.items()}}
        return int(lengths.sum()), ids.numel(), values


def run_reference(cfg: dict) -> dict:
    """Load the same teacher, student initialisation and sequences, then train REFERENCE on the same batches."""
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    from grouped_batch_sampler import GroupedBatchSampler
    from kdcore.shard_io import open_shards
    from kdcore.tokenizer_utils import load_tokenizer

    hf_logging.disable_progress_bar()
    torch.set_num_threads(cfg["threads"])
    device = torch.device("cpu")
    torch.manual_seed(SEED)
    paths, size = cfg["paths"], cfg["size"]
    out = Path(paths["out_dir"])
    tok = load_tokenizer(out / "student", "student")
    shard = open_shards(paths["data_dir"])[0]
    offsets, ids = shard.offsets["student"], np.asarray(shard.ids["student"], dtype=np.int64)
    seqs = [ids[offsets[i]:offsets[i + 1]] for i in range(len(shard))]  # in memory, as the HF example
    lengths = np.diff(offsets)
    batches = GroupedBatchSampler(lengths, size["batch_size"], group_by_size=True, seed=SEED).batches(0)
    batches = batches[:cfg["steps"]]
    counts = np.load(out / "student_counts.npy", allow_pickle=False).astype(np.float64)
    probs = np.maximum(counts, 1.0) ** -MLM_SMOOTHING
    probs[tok.all_special_ids] = 0.0
    teacher = AutoModelForMaskedLM.from_pretrained(paths["teacher_dir"])
    student = AutoModelForMaskedLM.from_pretrained(str(out / "student_init"))
    amp = {"fp32": None, "bf16": torch.bfloat16}[cfg["precision"]]
    ref = ReferenceDistiller(student, teacher, torch.from_numpy(probs).float(), tok.pad_token_id,
                             tok.mask_token_id, len(tok), device, amp)
    result: dict = {"batches_digest": digest_batches(batches)}
    profile = cfg.get("profile_steps", 0) > 0
    if cfg["check"] and Path(cfg["check_file"]).is_file():
        result.update(reference_check(ref, seqs, cfg["check_file"]))
    generator = torch.Generator(device=device).manual_seed(SEED)
    student.train()
    sums: dict[str, float] = {}
    tokens = padded = 0
    start = start_loop_measure()
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None
    if prof is not None:
        prof.__enter__()
    for indices in batches:
        real, pad, values = ref.step([seqs[i] for i in indices], generator)
        tokens, padded = tokens + real, padded + pad
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
    if prof is not None:
        prof.__exit__(None, None, None)
    end = end_loop_measure(start)
    seconds = end.pop("wall_s")
    result.update({"steps": len(batches), "real_tokens": tokens, "padded_tokens": padded, "seconds": seconds,
                   "tokens_per_s": tokens / seconds, "time_source": "wall time of the loop", **end,
                   "mean_losses": {k: v / len(batches) for k, v in sums.items()}})
    if prof is not None:
        result["profile"] = profile_table(prof)
    return result


def reference_check(ref: ReferenceDistiller, seqs: list[np.ndarray], check_file: str) -> dict:
    """REFERENCE's loss on OURS's first batch with OURS's masked ids and labels, eval mode, no gradient: in
    the training precision and in fp64 (as `run_ours` computes them)."""
    saved = np.load(check_file)
    ids, lengths = ref.pad([seqs[i] for i in saved["indices"]])
    if not np.array_equal(ids.cpu().numpy(), saved["s_ids"]):
        raise BenchError("REFERENCE pads the first batch differently from the trainer")
    attention_mask = torch.arange(ids.size(1), device=ref.device)[None, :] < lengths[:, None]
    masked = torch.from_numpy(saved["masked"]).to(ref.device)
    labels = torch.from_numpy(saved["labels"]).to(ref.device)
    ref.student.eval()
    out = {}
    with torch.no_grad():
        out["first_batch_losses"] = loss_values(*ref.losses(masked, attention_mask, labels))
        amp, ref.amp_dtype = ref.amp_dtype, None
        ref.student.double(), ref.teacher.double()
        try:
            out["first_batch_losses_fp64"] = loss_values(*ref.losses(masked, attention_mask, labels))
        finally:
            ref.student.float(), ref.teacher.float()
            ref.amp_dtype = amp
    ref.student.train()
    return out


def loss_values(total: torch.Tensor, losses: dict[str, torch.Tensor]) -> dict[str, float]:
    return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in losses.items()}}


# ------------------------------------------------------------------------------------------ isolation


# ------------------------------------------------------------------------------------------ report


def loss_check(ours: dict, ref: dict, precision: str) -> dict:
    """Every term and the total agree, |ours - reference| <= rtol * |ours| + atol: in fp64 (tight) and in
    fp32 (rounding). A bf16 run's own comparison is recorded but not judged: bf16 rounds the near-zero KL of
    a random teacher by more than its value."""
    out: dict = {"ok": True}
    for key, name in (("first_batch_losses_fp64", "fp64"), ("first_batch_losses", precision)):
        a, b = ours.get(key), ref.get(key)
        if not a or not b:
            return {"ok": False, "why": f"a first-batch loss ({name}) is missing"}
        rtol, atol = LOSS_TOL.get(name, (None, None))
        diff = {k: abs(a[k] - b[k]) for k in LOSS_NAMES}
        rel = {k: diff[k] / max(abs(a[k]), 1e-30) for k in LOSS_NAMES}
        ok = None if rtol is None else all(diff[k] <= rtol * abs(a[k]) + atol for k in LOSS_NAMES)
        out[name] = {"ours": a, "reference": b, "abs_diff": diff, "rel_diff": rel, "max_rel_diff": max(rel.values()),
                     "rtol": rtol, "atol": atol, "ok": ok}
        out["ok"] = out["ok"] and ok is not False
    return out


def fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def build_report(results: list[dict], summary: dict) -> str:
    headers = ["implementation", "precision", "round", "steps", "real tokens", "seconds", "tokens/s", "peak RSS MiB",
               "peak - start MiB", "mean loss"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["implementation"], r["precision"], r["round"], "error", r["error"][:60], *["-"] * 5])
            continue
        rows.append([r["implementation"].upper(), r["precision"], r["round"], r["steps"], f"{r['real_tokens']:,}",
                     fmt(r["seconds"], 2), fmt(r["tokens_per_s"]), fmt(r["peak_rss_mib"]),
                     fmt(r["peak_rss_above_start_mib"]), fmt(r["mean_losses"].get("loss"), 3)])
    params = summary["params"]
    s, t = params["size"]["student"], params["size"]["teacher"]
    lines = [markdown_table(headers, rows), "",
             f"Same-vocabulary distillation, V = {summary['setup'].get('vocab_size')} (cased WordPiece on the first "
             f"{summary['setup'].get('corpus_lines'):,} corpus lines); teacher BERT {t['layers']} x {t['hidden']} "
             f"(FFN {t['ffn']}), student DistilBERT {s['layers']} x {s['dim']} (FFN {s['ffn']}); "
             f"{params['sequences']:,} sequences (max_len {params['size']['max_len']}), batch {params['batch_size']}, "
             f"{params['steps']} steps, length-grouped, {params['threads']} threads on {params['device']}, "
             f"{params['rounds']} interleaved round(s); loss "
             f"{ALPHA_CE} KL (T {TEMPERATURE}) + {ALPHA_MLM} MLM + {ALPHA_COS} cos. tokens/s = real (non-pad) tokens "
             "per second of the training loop (start-up excluded); speed-up = median OURS / median REFERENCE tokens/s "
             "over the rounds; peak RSS = "
             "VmHWM during the loop (reset before it); mean loss = mean total training loss over the steps "
             "(the two runs mask differently, so they differ a little)."]
    for precision, check in summary["loss_check"].items():
        if "why" in check:
            lines.append(f"- first-batch objective ({precision} run): not checked ({check['why']})")
            continue
        for name in ("fp64", precision):
            c = check[name]
            terms = ", ".join(f"{label} {c['ours'][k]:.6g} / {c['reference'][k]:.6g}"
                              for label, k in (("KL", "loss_ce"), ("MLM", "loss_mlm"), ("cos", "loss_cos")))
            lines.append(f"- first-batch objective in {name} ({precision} run), OURS / REFERENCE: total "
                         f"{c['ours']['loss']:.8g} / {c['reference']['loss']:.8g} ({terms}); largest relative "
                         f"difference {c['max_rel_diff']:.1e} " + (
                             "(not judged: bf16 rounding)" if c["ok"] is None else
                             f"({'ok' if c['ok'] else 'FAILED'}: tolerance {c['rtol']:g} relative + {c['atol']:g})"))
    lines.append(f"- same batches in both implementations: {summary['same_batches']}")
    for precision, sp in summary["speedup"].items():
        target = SPEEDUP_TARGETS[precision]
        verdict = ("not judged: --quick is a smoke run of tiny models" if params["quick"] else
                   "met" if sp >= target else "NOT met")
        med = summary["tokens_per_s_median"][precision]
        per_round = ", ".join(f"{x:.2f}x" for x in summary["speedup_rounds"][precision])
        lines.append(f"- speed-up ({precision}): median OURS {fmt(med['ours'])} / median REFERENCE "
                     f"{fmt(med['reference'])} tokens/s = {sp:.2f}x (per round: {per_round}); target >= {target}x: "
                     f"{verdict}")
    for r in results:
        prof = r.get("profile")
        if prof and "categories" in prof:
            cats = ", ".join(f"{k} {v * 100:.0f}%" for k, v in sorted(prof["categories"].items(), key=lambda kv: -kv[1]))
            top = ", ".join(f"{p['op']} {p['share'] * 100:.0f}%" for p in prof["top_ops"][:8])
            lines.append(f"- profile {r['implementation'].upper()} {r['precision']} ({prof['steps']} steps, "
                         f"{prof['total_self_ms'] / prof['steps']:.0f} ms of self CPU time per step): {cats}; top "
                         f"operators: {top}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus", help="one text per line (default: runs/cache/corpus/ru_sentences.txt, else "
                                    "runs/corpus/ru_sentences.txt, from preprocessing/get_corpus.py)")
    p.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every worker")
    p.add_argument("--isolation", choices=("fork", "spawn", "none"), default="fork",
                   help="worker process per run (fork: from this process, which computes nothing; none: "
                        "in-process, for the tests)")
    p.add_argument("--rounds", type=int, help="interleaved rounds of every run; the speed-up compares medians "
                                              "(default: 3, 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny models, 1,500 lines, 64 sequences, 4 steps")
    p.add_argument("--profile_steps", type=int, default=0,
                   help="afterwards, profile this many steps of each implementation (torch.profiler)")
    p.add_argument("--work_dir", help="keep the set-up (tokenizer, teacher, pipeline output, dumps) here "
                                      "(default: a temporary directory, removed at the end)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "parity.json"), help="JSON results")
    return p


RUNNERS = {"ours": run_ours, "reference": run_reference}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    precisions = [x for x in a.precisions.split(",") if x]
    bad = [x for x in precisions if x not in PRECISIONS]
    if bad or not precisions:
        raise BenchError(f"unknown --precisions {bad or precisions}; choose from {', '.join(PRECISIONS)}")
    if a.threads < 1 or a.profile_steps < 0:
        raise BenchError("--threads must be at least 1 and --profile_steps not negative")
    corpus = Path(a.corpus) if a.corpus else next((c for c in DEFAULT_CORPORA if c.is_file()), None)
    if corpus is None or not corpus.is_file():
        raise BenchError(f"corpus {corpus or DEFAULT_CORPORA[0]} not found; build it with "
                         "`python preprocessing/get_corpus.py --out runs/cache/corpus` or pass --corpus")
    isolation = a.isolation
    rounds = a.rounds if a.rounds is not None else 1 if a.quick else 3
    if rounds < 1:
        raise BenchError(f"--rounds {rounds} must be at least 1")
    size = QUICK if a.quick else FULL
    steps = math.ceil(size["sequences"] / size["batch_size"])
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="bench_parity_"))
    if a.work_dir and work.exists() and any(work.iterdir()):
        raise BenchError(f"--work_dir {work} is not empty; pass a new or empty directory")
    work.mkdir(parents=True, exist_ok=True)
    base = {"work_dir": str(work), "threads": a.threads, "size": size, "steps": steps}
    try:
        t0 = time.perf_counter()
        print(f"set-up in {work} ({corpus}, {isolation} workers, {a.threads} threads)", file=sys.stderr, flush=True)
        paths = run_isolated(setup, {**base, "corpus": str(corpus)}, isolation)
        if "error" in paths:
            raise BenchError(f"set-up failed: {paths['error']}\n{paths.get('traceback', '')}")
        print(f"set-up done in {time.perf_counter() - t0:.1f} s: {paths['train_sequences']} of "
              f"{paths['pipeline_sequences']} sequences, V = {paths['vocab_size']}", file=sys.stderr, flush=True)
        results = []
        for round_ in range(rounds):
            for precision in precisions:
                check_file = str(work / f"first_batch_{precision}.npz")
                for impl in IMPLEMENTATIONS:
                    cfg = {**base, "paths": paths, "precision": precision, "check_file": check_file,
                           "check": round_ == 0}
                    r = run_isolated(RUNNERS[impl], cfg, isolation)
                    r = {"implementation": impl, "precision": precision, "round": round_ + 1, **r}
                    results.append(r)
                    brief = (f"error {r['error']}" if "error" in r else f"{r['tokens_per_s']:.0f} tokens/s, "
                             f"{r['seconds']:.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB")
                    print(f"round {round_ + 1}/{rounds} {impl} {precision}: {brief}", file=sys.stderr, flush=True)
                    if "traceback" in r:
                        print(r["traceback"], file=sys.stderr, flush=True)
        for precision in precisions if a.profile_steps else ():
            for impl in IMPLEMENTATIONS:
                cfg = {**base, "paths": paths, "precision": precision, "check": False,
                       "check_file": str(work / f"first_batch_{precision}.npz"),
                       "steps": min(a.profile_steps, steps), "profile_steps": a.profile_steps}
                r = run_isolated(RUNNERS[impl], cfg, isolation)
                first = next(x for x in results if x["implementation"] == impl and x["precision"] == precision)
                first["profile"] = {**r["profile"], "steps": r["steps"]} if "profile" in r else {"error": r.get("error")}
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    speedup, speedup_rounds, medians, checks, same = {}, {}, {}, {}, True
    for precision in precisions:
        runs = {impl: [r for r in results if r["implementation"] == impl and r["precision"] == precision]
                for impl in IMPLEMENTATIONS}
        if any("error" in r for impl_runs in runs.values() for r in impl_runs):
            checks[precision] = {"ok": False, "why": "a run failed"}
            same = False
            continue
        medians[precision] = {impl: statistics.median(r["tokens_per_s"] for r in impl_runs)
                              for impl, impl_runs in runs.items()}
        speedup[precision] = medians[precision]["ours"] / medians[precision]["reference"]
        speedup_rounds[precision] = [o["tokens_per_s"] / f["tokens_per_s"] for o, f in zip(runs["ours"], runs["reference"])]
        checks[precision] = loss_check(runs["ours"][0], runs["reference"][0], precision)
        same = same and all(o["batches_digest"] == f["batches_digest"] and o["real_tokens"] == f["real_tokens"]
                            for o, f in zip(runs["ours"], runs["reference"]))
    params = {"quick": a.quick, "size": size, "sequences": size["sequences"], "batch_size": size["batch_size"],
              "steps": steps, "rounds": rounds, "threads": a.threads, "device": "cpu", "precisions": precisions,
              "isolation": isolation, "corpus": str(corpus), "alpha_ce": ALPHA_CE, "alpha_mlm": ALPHA_MLM,
              "alpha_cos": ALPHA_COS, "temperature": TEMPERATURE, "learning_rate": LEARNING_RATE,
              "max_grad_norm": MAX_GRAD_NORM, "seed": SEED}
    summary = {"machine": machine_info(threads=a.threads, device="cpu", isolation=isolation,
                                       omp_wait_policy=os.environ.get("OMP_WAIT_POLICY")),
               "params": params, "setup": {k: v for k, v in paths.items() if not k.endswith("_dir")},
               "results": results, "tokens_per_s_median": medians, "speedup": speedup,
               "speedup_rounds": speedup_rounds, "loss_check": checks, "same_batches": same,
               "target": {"speedup_min": {p: SPEEDUP_TARGETS[p] for p in precisions},
                          "met": None if a.quick else bool(speedup) and all(
                              speedup.get(p, 0.0) >= SPEEDUP_TARGETS[p] for p in precisions)}}
    summary["markdown"] = build_report(results, summary)
    write_report(a.out, summary, summary["markdown"])
    ok = all("error" not in r for r in results) and same and all(c.get("ok") for c in checks.values())
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(main, BenchError, UserError)
