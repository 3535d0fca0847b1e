"""Train a BERT WordPiece tokenizer from scratch (for pretraining a teacher when none exists).

Cased or uncased BERT normalisation, BERT pre-tokenisation, the special tokens `[PAD] [UNK] [CLS] [SEP]
[MASK]` and `--n_unused` `[unusedK]` placeholders, as in the original BERT vocabularies. Used by the demo
and the tests; a user with a real teacher does not need it.
"""

from __future__ import annotations

import argparse
import json
import sys

import _bootstrap  # noqa: F401
from common import DEFAULT_MAX_BAD_FRAC, check_output, count_chars, train_wordpiece
from kdcore.errors import UserError, run_cli
from kdcore.fsutil import staged_dir
from kdcore.tokenizer_utils import CONT_PREFIX, MAX_LEN, canonical_order, write_vocab_txt

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_bert_tokenizer(corpus: list[str], vocab_size: int, out: str, lowercase: bool = False,
                         n_unused: int = 10, min_frequency: int = 2, max_len: int = MAX_LEN,
                         limit_alphabet: int = 1000, max_bad_frac: float = DEFAULT_MAX_BAD_FRAC,
                         force: bool = False) -> dict:
    """Train and save the tokenizer directory (tokenizer.json, tokenizer_config.json, vocab.txt), the same bytes in
    every run. The alphabet: the `limit_alphabet` most frequent characters of the normalised corpus (ties by
    character)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    out_dir = check_output(out, force)
    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(n_unused)] + SPECIALS[1:]
    if vocab_size <= len(specials):
        raise UserError(f"--vocab_size {vocab_size} must exceed the {len(specials)} special tokens")
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                            lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts, _ = count_chars(corpus, normalizer, max_bad_frac)
    alphabet = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit_alphabet]]
    trained = train_wordpiece(corpus, max_bad_frac, normalizer, pre_tokenizer, "[UNK]", specials, alphabet,
                              vocab_size, min_frequency)
    vocab = {t: i for i, t in enumerate(canonical_order(trained, len(specials)))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix=CONT_PREFIX))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix=CONT_PREFIX)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_len, unk_token="[UNK]",
                                   pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    with staged_dir(out_dir) as tmp:
        fast.save_pretrained(str(tmp))
        write_vocab_txt(fast, tmp)
    return {"vocab_size": len(vocab), "lowercase": lowercase}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", nargs="+", required=True, help="UTF-8 text files, one text per line")
    p.add_argument("--vocab_size", type=int, required=True)
    p.add_argument("--out", required=True, help="output tokenizer directory")
    p.add_argument("--lowercase", action="store_true", help="uncased vocabulary (default: cased)")
    p.add_argument("--n_unused", type=int, default=10, help="number of [unusedK] placeholder tokens")
    p.add_argument("--min_frequency", type=int, default=2)
    p.add_argument("--max_len", type=int, default=MAX_LEN)
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    a = p.parse_args(argv)
    stats = train_bert_tokenizer(a.corpus, a.vocab_size, a.out, a.lowercase, a.n_unused, a.min_frequency,
                                 a.max_len, force=a.force)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
