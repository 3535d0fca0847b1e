"""Evaluation of the demo's models: whole-word masked prediction, held-out MLM accuracy, size and CPU speed.

Whole-word masked prediction compares models whatever their vocabularies: the held-out words are chosen once by
character span (`select_words`), every model masks all the pieces its own tokenizer makes of each word and is
scored on the word's full piece sequence (`whole_word_scores`: pseudo-log-likelihood per word and top-1 word
accuracy). MLM accuracy is per model in its own tokenization: the same held-out sentences, 15% of every
sentence's content tokens (at least one) replaced by `[MASK]` with a fixed seed, accuracy = share of those
positions where the arg-max prediction is the original token. Speed: batch-1 latency and batch-32 throughput on
random full-length sequences, after warm-up, median of several timed runs.
"""

from __future__ import annotations

import os
import random
import re
import statistics
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

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


def masked_batches(ids_list: list[np.ndarray], picks: list[np.ndarray], pad_id: int, mask_id: int,
                   batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """Batches of the sequences `ids_list` (shortest first) with the positions `picks[i]` of sequence i replaced by
    `mask_id`: (input_ids [B, L], attention_mask [B, L], row [M], col [M], targets [M], sample [M]) where the M
    masked positions are (row, col) of the batch, `targets` their original ids and `sample` their index i."""
    lengths = np.array([len(x) for x in ids_list])
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = int(lengths[rows].max())
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for r, k in enumerate(rows):
            ids[r, :lengths[k]] = torch.from_numpy(ids_list[k])
        attention = (torch.arange(width)[None, :] < torch.from_numpy(lengths[rows])[:, None]).long()
        row_idx = torch.from_numpy(np.concatenate([np.full(len(picks[k]), r) for r, k in enumerate(rows)]))
        col_idx = torch.from_numpy(np.concatenate([picks[k] for k in rows]))
        sample = torch.from_numpy(np.concatenate([np.full(len(picks[k]), k) for k in rows]))
        targets = ids[row_idx, col_idx].clone()
        ids[row_idx, col_idx] = mask_id
        yield ids, attention, row_idx, col_idx, targets, sample


@torch.no_grad()
def mlm_accuracy(model_dir: str | os.PathLike, sentences: list[str], max_len: int = 128, batch_size: int = 64,
                 prop: float = 0.15, seed: int = 0) -> dict:
    """{"mlm_acc", "n_predictions", "n_sentences"} of the HF masked LM in `model_dir` (its own tokenizer)."""
    tok = load_tokenizer(model_dir, "model")
    model = load_student(model_dir, model_dir).eval()
    enc = tok(sentences, truncation=True, max_length=max_len)["input_ids"]
    ids_list = [np.asarray(ids, dtype=np.int64) for ids in enc if len(ids) >= 3]
    picks = mask_positions(np.array([len(x) for x in ids_list]), prop, np.random.default_rng(seed))
    correct = total = 0
    for ids, attention, row, col, targets, _ in masked_batches(ids_list, picks, tok.pad_token_id, tok.mask_token_id,
                                                               batch_size):
        logits = model(input_ids=ids, attention_mask=attention).logits
        correct += int((logits[row, col].argmax(-1) == targets).sum())
        total += len(targets)
    return {"mlm_acc": correct / max(total, 1), "n_predictions": total, "n_sentences": len(ids_list)}


def word_spans(sentence: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the words of `sentence`: whitespace-delimited chunks with leading and
    trailing punctuation (Unicode category P*) stripped, kept when what is left is letters only."""
    spans = []
    for chunk in re.finditer(r"\S+", sentence):
        start, end = chunk.span()
        while start < end and unicodedata.category(sentence[start]).startswith("P"):
            start += 1
        while end > start and unicodedata.category(sentence[end - 1]).startswith("P"):
            end -= 1
        if end > start and sentence[start:end].isalpha():
            spans.append((start, end))
    return spans


def select_words(sentences: list[str], max_chars: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """The held-out words, chosen once for every model: (sentence index, start, end), one word (of `word_spans`)
    drawn with `seed` from each sentence of at most `max_chars` characters that has one. A tokenizer never makes
    more tokens than characters (+ [CLS], [SEP]), so `max_chars` = positions - 2 needs no truncation."""
    rng = random.Random(seed)
    words = []
    for i, sentence in enumerate(sentences):
        spans = word_spans(sentence) if len(sentence) <= max_chars else []
        if spans:
            words.append((i, *rng.choice(spans)))
    return words


def word_piece_positions(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Token positions whose character offsets lie in [start, end) (special tokens have empty offsets);
    ValueError when a token straddles the word's boundary or no token covers it."""
    inside = []
    for k, (a, b) in enumerate(offsets):
        if b > a and a < end and b > start:
            if a < start or b > end:
                raise ValueError(f"token {k} (characters [{a}, {b})) straddles the word [{start}, {end})")
            inside.append(k)
    if not inside:
        raise ValueError(f"no token covers the word [{start}, {end})")
    return inside


@torch.no_grad()
def whole_word_scores(model, tok, sentences: list[str], words: list[tuple[int, int, int]],
                      batch_size: int = 32) -> dict:
    """Whole-word masked prediction of the masked LM `model` with its fast tokenizer `tok` on `words`
    ((sentence index, start, end) of `select_words`): each word's pieces (its tokens, found through the
    offsets) are all replaced by [MASK] at once in its sentence. word_pll: mean over words of the sum of the
    log-probabilities (nats) of the word's original pieces; word_acc: share of words whose every piece is the
    arg-max (a word whose pieces include [UNK] counts as wrong); word_pieces: mean pieces per word."""
    enc = tok([sentences[i] for i, _, _ in words], return_offsets_mapping=True)
    limit = model.config.max_position_embeddings
    ids_list, picks = [], []
    for (i, start, end), ids, offsets in zip(words, enc["input_ids"], enc["offset_mapping"]):
        if len(ids) > limit:
            raise ValueError(f"held-out sentence {i} has {len(ids)} tokens, more than the model's {limit} positions")
        ids_list.append(np.asarray(ids, dtype=np.int64))
        picks.append(np.asarray(word_piece_positions(offsets, start, end), dtype=np.int64))
    pll = torch.zeros(len(words), dtype=torch.float64)
    wrong = torch.zeros(len(words), dtype=torch.long)
    for ids, attention, row, col, targets, sample in masked_batches(ids_list, picks, tok.pad_token_id,
                                                                    tok.mask_token_id, batch_size):
        logits = model(input_ids=ids, attention_mask=attention).logits[row, col].float()
        log_p = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
        pll.index_add_(0, sample, log_p.double())
        miss = (logits.argmax(-1) != targets) | (targets == tok.unk_token_id)
        wrong.index_add_(0, sample, miss.long())
    return {"word_acc": float((wrong == 0).double().mean()), "word_pll": float(pll.mean()), "n_words": len(words),
            "word_pieces": float(np.mean([len(p) for p in picks]))}


def whole_word_metrics(model_dir: str | os.PathLike, sentences: list[str], words: list[tuple[int, int, int]]) -> dict:
    """`whole_word_scores` of the HF masked LM in `model_dir` with its own tokenizer."""
    model = load_student(model_dir, model_dir).eval()
    return whole_word_scores(model, load_tokenizer(model_dir, "model"), sentences, words)


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
