"""Tokenizer loading, fingerprints and WordPiece helpers shared by preprocessing and training.

Teacher and student tokenizers are HF tokenizer directories (a `tokenizer.json`, or a `vocab.txt` from
older transformers versions). The Rust `tokenizers.Tokenizer` behind them (`backend_tokenizer`) is the
single source of truth for the vocabulary, the normalisation and the pre-tokenisation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from kdcore.errors import UserError

CONT_PREFIX = "##"
MAX_LEN = 512
"""The longest sequence a BERT-base model reads (its 512 position embeddings): the default `model_max_length` of
the tokenizers and the default `--max_len` of the pipeline."""
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
# Teacher vocabulary entries that never come out of text and get no student split ([unused12], <S>, </T>).
UNMAPPED_PATTERN = re.compile(r"^(\[unused\d+\]|</?[A-Za-z]+>)$")


SAVE_TOKENIZER = "save the tokenizer there again with tokenizer.save_pretrained()"
JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")
"""The JSON files of a tokenizer directory that `AutoTokenizer` reads (config.json: to find the tokenizer class)."""


def check_tokenizer_files(path: Path, role: str) -> None:
    """One-line errors naming the file for a tokenizer directory whose JSON files are truncated or not JSON, or
    whose `vocab.txt` is not UTF-8 (what `AutoTokenizer` reports without naming the file)."""
    for name in JSON_FILES:
        file = path / name
        if not file.is_file():
            continue
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            fix = "restore it (model.save_pretrained())" if name == "config.json" else SAVE_TOKENIZER
            raise UserError(f"{role} file {file} is not valid UTF-8 JSON (truncated or another format: {err}); "
                            f"{fix}") from err
    vocab = path / "vocab.txt"
    if vocab.is_file():
        try:
            vocab.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{role} vocabulary {vocab} is not UTF-8 text ({err.reason} at byte {err.start}); convert "
                            f"it (iconv -t utf-8) or {SAVE_TOKENIZER}") from err


def load_tokenizer(path: str | os.PathLike, role: str = "tokenizer"):
    """Load a fast HF tokenizer from a directory; `role` names it in errors (e.g. "teacher").

    Returns a `transformers.PreTrainedTokenizerFast` (or subclass) whose backend has no truncation
    and no padding configured.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{role} directory {path} does not exist; pass an HF tokenizer/model directory")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"{role} directory {path} has no tokenizer (tokenizer.json or vocab.txt); "
            "save the tokenizer there with tokenizer.save_pretrained()"
        )
    check_tokenizer_files(path, role)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # the tokenizers library raises plain Exceptions for files it cannot use
        raise UserError(f"cannot load the {role} tokenizer from {path}: {str(err).splitlines()[0]}; {SAVE_TOKENIZER}") \
            from err
    if not getattr(tok, "is_fast", False):
        raise UserError(f"the {role} tokenizer in {path} is not a fast tokenizer; add its tokenizer.json")
    backend = tok.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    return tok


def vocab_list(tok) -> list[str]:
    """The vocabulary as a list indexed by token id (added tokens included)."""
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for token, idx in vocab.items():
        if idx >= len(tokens):
            raise UserError(f"tokenizer {tok.name_or_path} has non-contiguous token ids (id {idx})")
        tokens[idx] = token
    return tokens


def special_tokens(tok) -> dict[str, str]:
    """Role -> token string for the special tokens the project needs (unk, pad, cls, sep, mask)."""
    roles = {}
    for role in ("unk", "pad", "cls", "sep", "mask"):
        token = getattr(tok, f"{role}_token", None)
        if token is None:
            raise UserError(f"tokenizer {tok.name_or_path} has no {role} token; BERT-style tokenizers need all of "
                            "[UNK] [PAD] [CLS] [SEP] [MASK]")
        roles[role] = str(token)
    return roles


def special_ids(tok) -> list[int]:
    """Sorted ids of every special token of the tokenizer."""
    return sorted({int(i) for i in tok.all_special_ids})


def _backend_json(tok) -> dict:
    return json.loads(tok.backend_tokenizer.to_str())


def wordpiece_settings(tok) -> dict:
    """The WordPiece model's settings: unk token, continuation prefix, max chars per word."""
    model = _backend_json(tok)["model"]
    if model.get("type") != "WordPiece":
        raise UserError(f"tokenizer {tok.name_or_path} is a {model.get('type')} model; a WordPiece (BERT) "
                        "tokenizer is required")
    return {
        "unk_token": model["unk_token"],
        "continuing_subword_prefix": model.get("continuing_subword_prefix", CONT_PREFIX),
        "max_input_chars_per_word": model.get("max_input_chars_per_word", 100),
    }


def fingerprint(tok) -> str:
    """sha256 over everything that decides token ids: vocabulary, model settings, normaliser,
    pre-tokeniser and special tokens. Two tokenizers with equal fingerprints encode text identically."""
    spec = _backend_json(tok)
    model = dict(spec["model"])
    model["vocab"] = vocab_list(tok)
    payload = {
        "model": model,
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
        "added": sorted((a["id"], a["content"], a.get("special", False)) for a in spec.get("added_tokens", [])),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def canonical_order(tokens: list[str], n_fixed: int) -> list[str]:
    """A run-independent id order for a trained WordPiece vocabulary: the first `n_fixed` tokens (the
    specials) as given, then single characters, then `##` + one character, then the other pieces, each
    group sorted by string. The Rust trainer orders the alphabet and pieces of equal count by hash order,
    which changes from run to run; WordPiece encoding does not depend on the ids' order."""
    def group(token: str) -> int:
        if len(token) == 1:
            return 0
        return 1 if is_continuation(token) and len(token) == len(CONT_PREFIX) + 1 else 2
    return tokens[:n_fixed] + sorted(tokens[n_fixed:], key=lambda t: (group(t), t))


def is_continuation(token: str) -> bool:
    """True for a WordPiece continuation piece such as `##ка` (the bare string `##` is not one)."""
    return token.startswith(CONT_PREFIX) and len(token) > len(CONT_PREFIX)


def surface(token: str) -> str:
    """The characters a piece covers in the (normalised) text: `##ка` -> `ка`, `мир` -> `мир`."""
    return token[len(CONT_PREFIX):] if is_continuation(token) else token


def greedy_split(token: str, vocab: dict[str, int], unk_token: str) -> list[str]:
    """Longest-match-first WordPiece split of one teacher vocabulary entry into student pieces.

    A word-initial teacher token gives a word-initial first piece and `##` pieces after it; a teacher
    continuation token (`##...`) gives only `##` pieces. Any failure gives `[unk_token]`, as WordPiece does.
    """
    cont = is_continuation(token)
    text = surface(token)
    pieces: list[str] = []
    start = 0
    while start < len(text):
        end = len(text)
        found = None
        while end > start:
            piece = text[start:end]
            if start > 0 or cont:
                piece = CONT_PREFIX + piece
            if piece in vocab:
                found = piece
                break
            end -= 1
        if found is None:
            return [unk_token]
        pieces.append(found)
        start = end
    return pieces if pieces else [unk_token]


def token_tables(tokens: list[str], special: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-id tables for vectorised alignment: (surface length in characters int32[V],
    starts-a-word bool[V]). Special tokens start a word; continuation pieces do not."""
    lengths = np.fromiter((len(surface(t)) for t in tokens), dtype=np.int32, count=len(tokens))
    starts = np.fromiter((t in special or not is_continuation(t) for t in tokens), dtype=bool, count=len(tokens))
    return lengths, starts


def smallest_uint(max_value: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds 0..max_value."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def write_vocab_txt(tok, directory: str | os.PathLike) -> None:
    """Write `vocab.txt` (one token per line, in id order) so older tools can read the vocabulary."""
    path = Path(directory) / "vocab.txt"
    tmp = path.with_suffix(".txt.tmp")
    tmp.write_text("".join(t + "\n" for t in vocab_list(tok)), encoding="utf-8")
    os.replace(tmp, path)
