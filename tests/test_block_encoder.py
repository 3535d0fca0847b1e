"""`block_encoder`: the word-cache encoder gives exactly the ids of the Rust batch API, for every tokenizer."""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from block_encoder import BlockEncoder, encode_batch, split_words, word_split_blocker
from common import load_pair
from synthetic import sentence

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# characters that stress the splitting: whitespace of every kind, controls, zero-width and combining marks,
# CJK (padded by the BERT normaliser), accents, punctuation, digits, the special tokens' own text
ODD = ["\t", "\xa0", "\u2009", "\u3000", "\x1c", "\x1f", "\x00", "\x07", "\u200b", "\ufeff", "\u0301", "\u0308",
       "й", "ё", "É", "é", "ß", "ﬁ", "²", "½", "中", "文", "☃", "«", "»", "—", "…", "(", ")", "[", "]", "#", "##",
       "[SEP]", "[MASK]", "[CLS]", "[UNK]", "0", "7", "x" * 120, "  ", "\r", "\ufffd", "𝔘"]


def tricky_texts(n: int, seed: int) -> list[str]:
    """Synthetic Russian sentences with odd characters spliced in, plus edge cases."""
    rng = random.Random(seed)
    texts = ["", " ", "  two  spaces  ", " leading", "trailing ", "[SEP]", "a[SEP]b [MASK]c", "中文字", "\t\xa0"]
    for _ in range(n):
        chars = list(sentence(rng))
        for _ in range(rng.randint(0, 6)):
            chars.insert(rng.randrange(len(chars) + 1), rng.choice(ODD))
        texts.append("".join(chars))
    return texts


def train(model, trainer, normalizer, pre_tokenizer, texts: list[str], template: bool = True) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.train_from_iterator(texts, trainer)
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                                                      ("[SEP]", tok.token_to_id("[SEP]"))])
    tok.decoder = decoders.WordPiece()
    return tok


def wordpiece(normalizer, pre_tokenizer, texts, vocab: int = 300, template: bool = True) -> Tokenizer:
    trainer = trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=SPECIALS)
    return train(models.WordPiece(unk_token="[UNK]"), trainer, normalizer, pre_tokenizer, texts, template)


def corpus_texts(seed: int = 1, n: int = 400) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(n)]


@functools.cache  # built once for the whole module (the encoder never changes a tokenizer)
def qualifying_tokenizers() -> dict[str, Tokenizer]:
    texts = corpus_texts()
    bert = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    bert_pre = pre_tokenizers.BertPreTokenizer()
    toks = {
        "bert_cased": wordpiece(bert, bert_pre, texts),
        "bert_uncased": wordpiece(normalizers.BertNormalizer(lowercase=True), bert_pre, texts),
        "nfkc_lower_whitespace": wordpiece(normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]),
                                           pre_tokenizers.Whitespace(), texts),
        "nfd_strip_sequence": wordpiece(
            normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()]),
            pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                     pre_tokenizers.Digits(individual_digits=True)]), texts),
        "no_template": wordpiece(bert, bert_pre, texts, template=False),
        "bpe": train(models.BPE(unk_token="[UNK]"), trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS),
                     bert, bert_pre, texts),
        "unigram": train(models.Unigram(), trainers.UnigramTrainer(vocab_size=200, special_tokens=SPECIALS,
                                                                   unk_token="[UNK]"), None, bert_pre, texts),
    }
    toks["two_prefix_tokens"] = wordpiece(bert, bert_pre, texts)
    tok = toks["two_prefix_tokens"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] [MASK] $A [SEP]", special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[MASK]", "[SEP]")])
    return toks


@functools.cache
def blocked_tokenizers() -> dict[str, tuple[Tokenizer, str]]:
    texts = corpus_texts()
    bert = normalizers.BertNormalizer(lowercase=False)
    bert_pre = pre_tokenizers.BertPreTokenizer()
    metaspace = wordpiece(None, pre_tokenizers.Metaspace(), texts)
    byte_level = train(models.BPE(), trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
                       None, pre_tokenizers.ByteLevel(), texts)
    replace = wordpiece(normalizers.Sequence([normalizers.Replace(" ", "_"), bert]), bert_pre, texts)
    punct_first = wordpiece(bert, pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), bert_pre]), texts)
    spaced = wordpiece(bert, bert_pre, texts)
    spaced.add_tokens(["кот рыба"])
    truncating = wordpiece(bert, bert_pre, texts)
    truncating.enable_truncation(8)
    return {"metaspace": (metaspace, "whitespace"), "byte_level": (byte_level, "whitespace"),
            "replace_normalizer": (replace, "Replace"), "punctuation_first": (punct_first, "whitespace"),
            "added_token_with_space": (spaced, "added token"), "truncation": (truncating, "truncation")}


def assert_same(encoder: BlockEncoder, backends: list[Tokenizer], texts: list[str]) -> None:
    for backend, (flat, lengths) in zip(backends, encoder.encode(texts)):
        ref_flat, ref_lengths = encode_batch(backend, texts)
        assert lengths.tolist() == ref_lengths.tolist()
        assert flat.tolist() == ref_flat.tolist()


@pytest.mark.parametrize("name", list(qualifying_tokenizers()))
def test_word_cache_equals_batch_encoding(name):
    backend = qualifying_tokenizers()[name]
    assert word_split_blocker(backend) is None
    encoder = BlockEncoder([backend])
    assert encoder.uses_word_cache == [True]
    for seed in range(3):  # later blocks reuse the words cached by earlier ones
        assert_same(encoder, [backend], tricky_texts(300, seed))
    assert encoder.cached_words > 100


@pytest.mark.parametrize("name", list(blocked_tokenizers()))
def test_unsafe_tokenizers_fall_back_to_batch_encoding(name):
    backend, reason = blocked_tokenizers()[name]
    assert reason in word_split_blocker(backend)
    encoder = BlockEncoder([backend])
    assert encoder.uses_word_cache == [False]
    assert_same(encoder, [backend], tricky_texts(100, 0))


def test_shared_word_table_for_mixed_tokenizers():
    good = qualifying_tokenizers()["bert_uncased"]
    bad, _ = blocked_tokenizers()["metaspace"]
    encoder = BlockEncoder([good, bad])
    assert encoder.uses_word_cache == [True, False]
    assert_same(encoder, [good, bad], tricky_texts(200, 5))


def test_cache_is_emptied_at_its_bound():
    backend = qualifying_tokenizers()["bert_cased"]
    encoder = BlockEncoder([backend], max_words=60)
    for seed in range(4):
        texts = tricky_texts(20, seed)
        assert_same(encoder, [backend], texts)
        assert encoder.cached_words <= max(60, len(set(split_words(texts)[0])))


def test_separator_inside_words_and_tiny_chunks():
    backend = qualifying_tokenizers()["bert_cased"]
    encoder = BlockEncoder([backend])
    encoder.caches[0].chunk_words = 3  # many chunks, some holding "[SEP]" inside a word
    texts = ["кот[SEP]рыба [SEP] дом", "[SEP][SEP]", "a [SEP]b c", "один два три четыре пять шесть семь"]
    assert_same(encoder, [backend], texts)


def test_split_words_with_and_without_newlines():
    words, n_words = split_words(["a b", "", "c  d"])
    assert n_words.sum() == len(words)
    assert [w for w in words if w != "\n"] == ["a", "b", "", "c", "", "d"]
    words, n_words = split_words(["a\nb c", "d"])  # a newline inside a text: split text by text
    assert words == ["a\nb", "c", "d"] and n_words.tolist() == [2, 1]
    words, n_words = split_words([])
    assert words == [] and n_words.tolist() == []


def test_empty_block():
    backend = qualifying_tokenizers()["bert_cased"]
    (flat, lengths), = BlockEncoder([backend]).encode([])
    assert flat.size == 0 and lengths.size == 0


def test_pipeline_tokenizers_use_the_word_cache(pipeline_out, teacher_dir, corpus):
    pair = load_pair(str(teacher_dir), str(pipeline_out / "student"))
    backends = [pair.teacher.backend_tokenizer, pair.student.backend_tokenizer]
    encoder = BlockEncoder(backends)
    assert encoder.uses_word_cache == [True, True]
    lines = corpus.read_text(encoding="utf-8").splitlines()
    for start in range(0, len(lines), 500):
        assert_same(encoder, backends, lines[start:start + 500])
    assert_same(encoder, backends, tricky_texts(200, 9))
    expected = [np.array(tok(lines[0])["input_ids"]) for tok in (pair.teacher, pair.student)]
    assert all(np.array_equal(ids, exp) for (ids, _), exp in zip(encoder.encode(lines[:1]), expected))
