"""Helpers shared by the preprocessing steps: corpus reading, output checks, tokenizer pairs."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import _bootstrap  # noqa: F401
from kdcore.errors import UserError
from kdcore.tokenizer_utils import CONT_PREFIX, fingerprint, load_tokenizer, special_tokens, vocab_list

DEFAULT_MAX_BAD_FRAC = 0.001
WIDE_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00")
"""First bytes of UTF-16 (LE, BE) and UTF-32 BE files with a byte-order mark (UTF-32 LE starts as UTF-16 LE)."""


@dataclass
class CorpusStats:
    """Counts gathered while reading corpus files."""

    files: int = 0
    lines: int = 0
    empty: int = 0
    undecodable: int = 0
    per_file: dict[str, dict[str, int]] = field(default_factory=dict)


def _text_line(raw: bytes) -> str | None:
    """The stripped line, or None when it is not UTF-8 text (undecodable, or NUL bytes: UTF-16 without a BOM)."""
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


def iter_corpus(paths: list[str], block_lines: int = 10000, max_bad_frac: float = DEFAULT_MAX_BAD_FRAC,
                stats: CorpusStats | None = None) -> Iterator[list[str]]:
    """Yield blocks of up to `block_lines` non-empty, stripped UTF-8 lines from the corpus files.

    Undecodable lines (not UTF-8, or holding NUL bytes) are counted and skipped; a file whose undecodable share
    exceeds `max_bad_frac`, a UTF-16/32 file (byte-order mark), a missing file, and a corpus with no text at all
    are `UserError`s. Memory holds one block.
    """
    stats = stats if stats is not None else CorpusStats()
    if not paths:
        raise UserError("no corpus files given; pass --corpus FILE [FILE ...]")
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"corpus file {path} does not exist; check the --corpus paths")
    block: list[str] = []
    for name in paths:
        kept = bad = empty = 0
        with open(name, "rb") as fh:
            if fh.read(2) in WIDE_BOMS:
                raise UserError(f"corpus file {name} is UTF-16 or UTF-32 text (it starts with a byte-order mark); "
                                f"convert it: iconv -f utf-16 -t utf-8 {name} > {name}.utf8")
            fh.seek(0)
            for raw in fh:
                line = _text_line(raw)
                if line is None:
                    bad += 1
                    continue
                if not line:
                    empty += 1
                    continue
                kept += 1
                block.append(line)
                if len(block) >= block_lines:
                    yield block
                    block = []
        total = kept + bad + empty
        if bad and bad > max_bad_frac * total:
            raise UserError(f"corpus file {name} has {bad} of {total} lines that are not valid UTF-8 text; convert "
                            "it (e.g. iconv -f cp1251 -t utf-8; -f utf-16 when it holds NUL bytes) or raise "
                            f"--max_bad_frac (now {max_bad_frac})")
        stats.files += 1
        stats.lines += kept
        stats.empty += empty
        stats.undecodable += bad
        stats.per_file[str(name)] = {"lines": kept, "empty": empty, "undecodable": bad}
    if block:
        yield block
    if stats.lines == 0:
        raise UserError(f"the corpus ({', '.join(paths)}) contains no text; pass non-empty UTF-8 text files")


def count_chars(corpus: list[str], normalizer, max_bad_frac: float) -> tuple[Counter, CorpusStats]:
    """Character counts of the normalised corpus (whitespace excluded)."""
    counts: Counter = Counter()
    stats = CorpusStats()
    for block in iter_corpus(corpus, max_bad_frac=max_bad_frac, stats=stats):
        text = "\n".join(block)
        counts.update(normalizer.normalize_str(text) if normalizer is not None else text)
    for char in [c for c in counts if c.isspace()]:
        del counts[char]
    return counts, stats


def train_wordpiece(corpus: list[str], max_bad_frac: float, normalizer, pre_tokenizer, unk_token: str,
                    specials: list[str], alphabet: list[str], vocab_size: int, min_frequency: int,
                    max_input_chars_per_word: int = 100) -> list[str]:
    """Train a WordPiece vocabulary of `vocab_size` entries with the Rust trainer, the same in every run; returns it
    in the trainer's id order: `specials`, `##c` for every character c of `alphabet`, `alphabet`, then the pieces in
    the order they were learned.

    The trainer picks the most frequent pair and breaks ties by the pairs' ids, and it numbers each `##c` when it
    first meets it while walking the corpus words in hash order, which is random per process; so two runs could
    break a tie differently and learn different pieces. Declaring every `##c` up front (as extra special tokens of
    this throw-away model, after `specials`) fixes all ids before training, hence every tie-break, whatever the
    number of threads."""
    from tokenizers import Tokenizer, models, trainers

    model = Tokenizer(models.WordPiece(unk_token=unk_token, continuing_subword_prefix=CONT_PREFIX,
                                       max_input_chars_per_word=max_input_chars_per_word))
    model.normalizer = normalizer
    model.pre_tokenizer = pre_tokenizer
    declared = list(dict.fromkeys(specials + [CONT_PREFIX + c for c in alphabet]))
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=declared, limit_alphabet=len(alphabet),
        initial_alphabet=alphabet, continuing_subword_prefix=CONT_PREFIX, show_progress=False,
    )
    model.train_from_iterator((line for block in iter_corpus(corpus, max_bad_frac=max_bad_frac) for line in block),
                              trainer=trainer)
    trained = model.get_vocab()
    return sorted(trained, key=trained.__getitem__)


def check_output(path: str | os.PathLike, force: bool, flag: str = "--force") -> Path:
    """Refuse to overwrite an existing output unless `force`; returns the path."""
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"output {path} already exists; pass {flag} to overwrite it or choose another path")
    return path


@dataclass
class TokenizerPair:
    """The teacher and student tokenizers with the tables the steps need."""

    teacher: object
    student: object
    t_vocab: list[str]
    s_vocab: list[str]
    t_special: dict[str, str]
    s_special: dict[str, str]
    fingerprints: dict[str, str]

    @property
    def t_unk_id(self) -> int:
        return self.t_vocab.index(self.t_special["unk"])

    @property
    def s_unk_id(self) -> int:
        return self.s_vocab.index(self.s_special["unk"])


def load_pair(teacher_dir: str, student_dir: str) -> TokenizerPair:
    """Load both tokenizers (one-line errors for missing or broken directories)."""
    teacher = load_tokenizer(teacher_dir, "teacher")
    student = load_tokenizer(student_dir, "student")
    return TokenizerPair(
        teacher=teacher, student=student, t_vocab=vocab_list(teacher), s_vocab=vocab_list(student),
        t_special=special_tokens(teacher), s_special=special_tokens(student),
        fingerprints={"teacher": fingerprint(teacher), "student": fingerprint(student)},
    )


@contextmanager
def timed(stats: dict, key: str = "seconds"):
    """Store the wall time of the block in `stats[key]`."""
    start = time.perf_counter()
    yield
    stats[key] = round(time.perf_counter() - start, 3)
