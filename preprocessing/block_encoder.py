"""Encode blocks of texts with Rust tokenizers, reusing the encoding of every space-separated word.

`BlockEncoder([teacher_backend, student_backend]).encode(texts)` returns, for each tokenizer, exactly the
ids of `backend.encode_batch(texts, add_special_tokens=True)`, flattened, with the per-text lengths.

Natural text repeats its words: the ~107,000 sentences of the demo corpus have ~1.5M words but only ~170,000
distinct ones. When a tokenizer provably tokenises a text as the concatenation of its space-separated words
(`word_split_blocker` returns None), each distinct word is encoded once (chunks of words joined by a
special token, one Rust batch call, so the per-call cost is paid per chunk rather than per word) and
cached, up to `max_words` words (the cache is then emptied; ~220 bytes per word for a teacher + student
pair, so memory stays below ~70 MiB however large the corpus); a text's ids are then gathered from the cache
with numpy. The tokenizers share the splitting and the word table. A tokenizer that does not qualify
encodes every text with `encode_batch_fast`. Per line of text this is a few microseconds of Python and
numpy plus the Rust cost of the words not seen before.

Why splitting at U+0020 is exact for the accepted tokenizers: the accepted normalisers act on each
character on its own (U+0020 stays U+0020 and nothing composes across it), the pre-tokenizer's first
stage splits at whitespace and drops it, so no pre-token ever spans a space, and the model, the added
tokens (none contains whitespace) and the later pre-tokenizer stages act on one pre-token at a time.
The post-processor must be a plain template, whose special ids are taken from the tokenizer itself.
"""

from __future__ import annotations

import itertools
import json

import numpy as np

CHAR_LOCAL_NORMALIZERS = frozenset({"BertNormalizer", "Lowercase", "NFD", "NFKD", "NFC", "NFKC", "StripAccents"})
WHITESPACE_SPLITTERS = frozenset({"BertPreTokenizer", "Whitespace", "WhitespaceSplit"})
WITHIN_PRETOKEN_SPLITTERS = WHITESPACE_SPLITTERS | {"Punctuation", "Digits"}
PER_PRETOKEN_MODELS = frozenset({"WordPiece", "WordLevel", "BPE", "Unigram"})
TEMPLATE_PROCESSORS = frozenset({"BertProcessing", "RobertaProcessing", "TemplateProcessing"})
WHITESPACE = frozenset(" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                       + "".join(map(chr, range(0x2000, 0x200B))))


def _members(spec: dict | None) -> list[dict]:
    """The components of a normaliser / pre-tokenizer spec, with `Sequence`s flattened."""
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        parts = spec.get("normalizers", spec.get("pretokenizers", []))
        return [m for part in parts for m in _members(part)]
    return [spec]


def word_split_blocker(backend) -> str | None:
    """None when `backend` tokenises every text as the concatenation of its space-separated words
    (see the module docstring); otherwise the reason why not, for logs and tests."""
    spec = json.loads(backend.to_str())
    if spec.get("truncation") or spec.get("padding"):
        return "truncation or padding is configured"
    for norm in _members(spec.get("normalizer")):
        if norm.get("type") not in CHAR_LOCAL_NORMALIZERS:
            return f"normalizer {norm.get('type')} is not known to act on single characters"
    pre = _members(spec.get("pre_tokenizer"))
    if not pre or pre[0].get("type") not in WHITESPACE_SPLITTERS:
        return "the pre-tokenizer does not start by splitting at whitespace"
    if any(p.get("type") not in WITHIN_PRETOKEN_SPLITTERS for p in pre):
        return "a pre-tokenizer stage may act across whitespace"
    model = spec.get("model") or {}
    if model.get("type") not in PER_PRETOKEN_MODELS or model.get("dropout"):
        return f"model {model.get('type')} (dropout {model.get('dropout')}) is not deterministic per pre-token"
    if any(WHITESPACE.intersection(tok.get("content", "")) for tok in spec.get("added_tokens") or []):
        return "an added token contains whitespace"
    post = spec.get("post_processor")
    if post is not None and post.get("type") not in TEMPLATE_PROCESSORS:
        return f"post-processor {post.get('type')} is not a plain template"
    return None


def encode_batch(backend, texts: list[str], add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 ids, int64 lengths) of `texts`, one Rust batch call."""
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    ids = [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def template_ids(backend) -> tuple[np.ndarray, np.ndarray]:
    """(prefix, suffix) int64 ids that the post-processor puts around a single text."""
    specials = backend.encode("", add_special_tokens=True).ids
    for probe in ("a", "0", "."):
        body = backend.encode(probe, add_special_tokens=False).ids
        full = backend.encode(probe, add_special_tokens=True).ids
        cuts = [p for p in range(len(specials) + 1)
                if full[p:p + len(body)] == body and full[:p] + full[p + len(body):] == specials]
        if len(cuts) == 1 and body:
            return np.array(specials[:cuts[0]], dtype=np.int64), np.array(specials[cuts[0]:], dtype=np.int64)
    raise ValueError("cannot place the text inside the tokenizer's special-token template")


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n): int64 [lengths.sum()]."""
    total = int(lengths.sum())
    out_start = np.cumsum(lengths) - lengths
    return np.repeat(starts - out_start, lengths) + np.arange(total, dtype=np.int64)


def split_words(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """(the words of all texts in order, int64 [len(texts)] words per text); words are split at U+0020.

    When no text holds a newline, the texts are split in one call: each text but the last then ends with
    a "\\n" word (counted in its words), which every accepted tokenizer drops as whitespace."""
    joined = "\n".join(texts)
    if joined.count("\n") != len(texts) - 1:
        per_text = [text.split(" ") for text in texts]
        return (list(itertools.chain.from_iterable(per_text)),
                np.fromiter(map(len, per_text), dtype=np.int64, count=len(texts)))
    n_words = np.fromiter(map(str.count, texts, itertools.repeat(" ")), dtype=np.int64, count=len(texts)) + 2
    n_words[-1] -= 1
    return joined.replace("\n", " \n ").split(" "), n_words


class WordCache:
    """Ids of the words of one tokenizer, indexed by the word codes of a `BlockEncoder`."""

    def __init__(self, backend, chunk_words: int = 500):
        self.backend = backend
        self.chunk_words = chunk_words
        self.prefix, self.suffix = template_ids(backend)
        self.separator = self._separator()
        self.starts = self.lengths = self.ids = np.zeros(0, dtype=np.int64)

    def _separator(self) -> tuple[str, int] | None:
        """A special added token that splits a chunk of words (its string and id), or None."""
        special = [self.backend.id_to_token(int(i)) for i in [*self.suffix, *self.prefix]]
        for token in special:
            ids = self.backend.encode(f"a {token} a", add_special_tokens=False).ids
            if ids.count(self.backend.token_to_id(token)) == 1:
                return token, self.backend.token_to_id(token)
        return None

    def clear(self) -> None:
        self.starts = self.lengths = self.ids = np.zeros(0, dtype=np.int64)

    def extend(self, words: list[str]) -> None:
        """Encode `words` (without special tokens) and append them as the next codes."""
        if self.separator is None:
            ids, lengths = encode_batch(self.backend, words, add_special_tokens=False)
        else:
            ids, lengths = self._encode_chunked(words)
        self.starts = np.concatenate([self.starts, len(self.ids) + np.cumsum(lengths) - lengths])
        self.lengths = np.concatenate([self.lengths, lengths])
        self.ids = np.concatenate([self.ids, ids])

    def _encode_chunked(self, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(flat ids, per-word lengths) of `words`, encoded as chunks of words joined by the separator (one
        Rust batch call); a chunk where a word holds the separator itself is encoded word by word."""
        token, sep = self.separator
        chunks = [words[i:i + self.chunk_words] for i in range(0, len(words), self.chunk_words)]
        joined, chunk_len = encode_batch(self.backend, [f" {token} ".join(chunk) for chunk in chunks], False)
        parts = []
        for chunk, ids in zip(chunks, np.split(joined, np.cumsum(chunk_len)[:-1])):
            cuts = np.flatnonzero(ids == sep)
            if len(cuts) == len(chunk) - 1:
                parts.append((np.delete(ids, cuts), np.diff(np.concatenate([[-1], cuts, [len(ids)]])) - 1))
            else:
                parts.append(encode_batch(self.backend, chunk, add_special_tokens=False))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def frame(self, codes: np.ndarray, n_words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(flat ids, lengths) of texts made of the words `codes` ([sum(n_words)]), template around each."""
        word_len = self.lengths[codes]
        body = self.ids[_ranges(self.starts[codes], word_len)]
        text_of_word = np.repeat(np.arange(len(n_words), dtype=np.int64), n_words)
        body_len = np.bincount(text_of_word, weights=word_len, minlength=len(n_words)).astype(np.int64)
        n_pre, n_suf = len(self.prefix), len(self.suffix)
        lengths = body_len + n_pre + n_suf
        start = np.cumsum(lengths) - lengths
        flat = np.empty(int(lengths.sum()), dtype=np.int64)
        flat[_ranges(start + n_pre, body_len)] = body
        for k, token in enumerate(self.prefix):
            flat[start + k] = token
        for k, token in enumerate(self.suffix):
            flat[start + n_pre + body_len + k] = token
        return flat, lengths


class BlockEncoder:
    """Encodes blocks of texts with several tokenizers (`tokenizers.Tokenizer`s) that share one word table."""

    def __init__(self, backends, max_words: int = 300_000):
        self.backends = list(backends)
        self.max_words = max_words
        self.caches = [WordCache(b) if word_split_blocker(b) is None else None for b in self.backends]
        self._index: dict[str, int] = {}

    @property
    def uses_word_cache(self) -> list[bool]:
        return [cache is not None for cache in self.caches]

    @property
    def cached_words(self) -> int:
        return len(self._index)

    def encode(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per tokenizer: (flat int64 ids, int64 [len(texts)] lengths) of `texts` with special tokens."""
        out: list = [None if cache else encode_batch(b, texts) for b, cache in zip(self.backends, self.caches)]
        if any(self.caches):
            codes, n_words = self._codes(texts)
            for k, cache in enumerate(self.caches):
                if cache is not None:
                    out[k] = cache.frame(codes, n_words)
        return out

    def _codes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(int64 code of every word of `texts`, words per text); new words are encoded into every cache."""
        words, n_words = split_words(texts)
        codes = np.fromiter(map(self._index.get, words, itertools.repeat(-1)), dtype=np.int64, count=len(words))
        missing = np.flatnonzero(codes < 0).tolist()
        if not missing:
            return codes, n_words
        new = list(dict.fromkeys(map(words.__getitem__, missing)))
        if len(self._index) + len(new) > self.max_words:
            self._index.clear()
            for cache in filter(None, self.caches):
                cache.clear()
            missing, new = range(len(words)), list(dict.fromkeys(words))
        self._index.update(zip(new, range(len(self._index), len(self._index) + len(new))))
        for cache in filter(None, self.caches):
            cache.extend(new)
        codes[missing] = np.fromiter(map(self._index.__getitem__, map(words.__getitem__, missing)),
                                     dtype=np.int64, count=len(missing))
        return codes, n_words
