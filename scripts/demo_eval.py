"""Evaluation of the demo's models: held-out MLM accuracy, size and CPU speed.

Each model is evaluated in its own tokenization: the same held-out sentences, 15% of every sentence's
content tokens (at least one) replaced by `[MASK]` with a fixed seed, accuracy = share of those positions
where the arg-max prediction is the original token. Speed: batch-1 latency and batch-32 throughput on
random full-length sequences, after warm-up, median of several timed runs.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kdcore.model_io import load_student
from kdcore.tokenizer_utils import load_tokenizer


def mask_positions(lengths: np.ndarray, prop: float, rng: np.random.Generator) -> list[np.ndarray]:
    """For sequences of `lengths` (with [CLS] and [SEP]), sorted content positions to mask (>= 1 each)."""
    picks = []
    for n in lengths:
        content = np.arange(1, n - 1)
        k = max(1, round(prop * len(content)))
        picks.append(np.sort(rng.choice(content, size=k, replace=False)))
    return picks


@torch.no_grad()
def mlm_accuracy(model_dir: str | os.PathLike, sentences: list[str], max_len: int = 128, batch_size: int = 64,
                 prop: float = 0.15, seed: int = 0) -> dict:
    """{"mlm_acc", "n_predictions", "n_sentences"} of the HF masked LM in `model_dir` (its own tokenizer)."""
    tok = load_tokenizer(model_dir, "model")
    model = load_student(model_dir, model_dir).eval()
    enc = tok(sentences, truncation=True, max_length=max_len)["input_ids"]
    keep = [i for i, ids in enumerate(enc) if len(ids) >= 3]
    ids_list = [np.asarray(enc[i], dtype=np.int64) for i in keep]
    lengths = np.array([len(x) for x in ids_list])
    picks = mask_positions(lengths, prop, np.random.default_rng(seed))
    correct = total = 0
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = int(lengths[rows].max())
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        for r, k in enumerate(rows):
            ids[r, :lengths[k]] = torch.from_numpy(ids_list[k])
        attention = (torch.arange(width)[None, :] < torch.from_numpy(lengths[rows])[:, None]).long()
        row_idx = torch.from_numpy(np.concatenate([np.full(len(picks[k]), r) for r, k in enumerate(rows)]))
        col_idx = torch.from_numpy(np.concatenate([picks[k] for k in rows]))
        targets = ids[row_idx, col_idx].clone()
        ids[row_idx, col_idx] = tok.mask_token_id
        logits = model(input_ids=ids, attention_mask=attention).logits
        correct += int((logits[row_idx, col_idx].argmax(-1) == targets).sum())
        total += len(targets)
    return {"mlm_acc": correct / max(total, 1), "n_predictions": total, "n_sentences": len(keep)}


def model_size(model_dir: str | os.PathLike) -> dict:
    """Parameters, weight-file size (MB) and vocabulary size of an HF model directory."""
    model = load_student(model_dir, model_dir)
    weights = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    return {"params": sum(p.numel() for p in model.parameters()), "size_mb": weights / 2**20,
            "vocab_size": model.config.vocab_size}


@torch.no_grad()
def speed(model_dir: str | os.PathLike, seq_len: int = 128, batch: int = 32, repeats: int = 10,
          warmup: int = 3) -> dict:
    """CPU latency (ms, batch 1) and throughput (sequences/s, batch `batch`) of the full MLM forward."""
    model = load_student(model_dir, model_dir).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    seq_len = min(seq_len, model.config.max_position_embeddings)

    def timed(b: int, n: int) -> float:
        ids = torch.randint(5, vocab, (b, seq_len), generator=gen)
        for _ in range(warmup):
            model(input_ids=ids)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    latency = timed(1, repeats * 3)
    batch_time = timed(batch, repeats)
    return {"latency_ms": latency * 1000, "throughput_seq_s": batch / batch_time, "seq_len": seq_len,
            "threads": torch.get_num_threads()}
