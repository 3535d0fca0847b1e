"""Small synthetic Russian-like corpora and tiny models for the tests (no hub, no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path

STEMS = ["рыб", "кот", "дом", "стол", "книг", "окн", "лес", "город", "друг", "работ", "школ", "вод", "мир",
         "сол", "нож", "берег", "поезд", "учител", "програм", "компьютер", "любов", "политик", "образован"]
ENDINGS = ["а", "у", "ой", "ы", "е", "ами", "ах", "", "ом", "и"]
SMALL = ["и", "в", "на", "с", "по", "не", "что", "как", "это", "очень", "тоже", "где", "когда"]
PUNCT = [".", "!", "?", ","]


def sentence(rng: random.Random) -> str:
    """One sentence of 4..14 words with some capitals, digits and punctuation."""
    words = []
    for _ in range(rng.randint(4, 14)):
        if rng.random() < 0.3:
            words.append(rng.choice(SMALL))
        else:
            words.append(rng.choice(STEMS) + rng.choice(ENDINGS))
        if rng.random() < 0.05:
            words.append(str(rng.randint(1, 2025)))
        if rng.random() < 0.08:
            words[-1] += rng.choice(PUNCT[3:])
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice(PUNCT[:3])


def write_corpus(path: Path, n_lines: int, seed: int = 0) -> Path:
    """Write `n_lines` synthetic sentences, one per line."""
    rng = random.Random(seed)
    path.write_text("".join(sentence(rng) + "\n" for _ in range(n_lines)), encoding="utf-8")
    return path


def write_student_config(path: Path, dim: int = 32, n_layers: int = 2, heads: int = 2, hidden: int = 64,
                         max_pos: int = 128) -> Path:
    """A tiny DistilBERT config JSON."""
    path.write_text(json.dumps({"model_type": "distilbert", "dim": dim, "n_layers": n_layers, "n_heads": heads,
                                "hidden_dim": hidden, "max_position_embeddings": max_pos, "vocab_size": 10}))
    return path


def write_vocab_tokenizer(directory: Path, vocab: str) -> Path:
    """A vocab.txt-only cased BERT tokenizer directory (as older transformers saved them)."""
    directory.mkdir(parents=True)
    (directory / "vocab.txt").write_text(vocab, encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False,
                                                                  "tokenizer_class": "BertTokenizer"}))
    return directory


def make_teacher(directory: Path, corpus: Path, vocab_size: int = 300, layers: int = 4, hidden: int = 48,
                 seed: int = 0, vocab_file: Path | None = None, init_range: float = 0.02) -> Path:
    """A vocab.txt-only BERT tokenizer plus a random tiny BertForMaskedLM. The vocabulary is trained on `corpus`
    (the same in every run: `common.train_wordpiece`), or read from `vocab_file` for a fixture that does not depend
    on the trainer (nor on the version of the `tokenizers` library). `init_range`:
    the std of the random weights (larger: peakier output distributions)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from train_teacher_tok import train_bert_tokenizer

    if vocab_file is None:
        tok_dir = directory.parent / (directory.name + "_tok")
        train_bert_tokenizer([str(corpus)], vocab_size, str(tok_dir), n_unused=5, max_len=128, min_frequency=1)
        vocab_file = tok_dir / "vocab.txt"
    vocab = vocab_file.read_text(encoding="utf-8")
    write_vocab_tokenizer(directory, vocab)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab.splitlines()), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=128,
                        initializer_range=init_range)
    BertForMaskedLM(config).save_pretrained(str(directory))
    return directory
