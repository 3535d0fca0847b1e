"""Step 1: train the student's reduced WordPiece vocabulary on the corpus.

The student tokenizer keeps the teacher's special tokens, normaliser and pre-tokeniser, so teacher and
student split text into the same words. Every character of the student alphabet (the corpus characters
that cover `--char_coverage` of all character occurrences) is in the vocabulary both as `c` and `##c`,
so a teacher token made of those characters always splits into student pieces without `[UNK]`.

Output: an HF tokenizer directory (`tokenizer.json`, `tokenizer_config.json`, `vocab.txt`) and, with
`--student_config`, the student's `config.json` with `vocab_size` set from the trained vocabulary.

`adopt` is the alternative for a student with a given tokenizer (`run_pipeline.py --student_tokenizer`, e.g.
the teacher's own for same-vocabulary distillation): it checks that the tokenizer splits text into the
teacher's words and writes it (and the config) in the same form instead of training one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import _bootstrap  # noqa: F401
from common import DEFAULT_MAX_BAD_FRAC, check_output, count_chars, train_wordpiece
from kdcore.errors import UserError, run_cli
from kdcore.fsutil import atomic_write_json, staged_dir
from kdcore.tokenizer_utils import (
    CONT_PREFIX,
    MAX_LEN,
    load_tokenizer,
    special_tokens,
    vocab_list,
    wordpiece_settings,
    write_vocab_txt,
)


def alphabet_at_coverage(char_counts: Counter, coverage: float) -> list[str]:
    """The most frequent characters whose occurrences add up to at least `coverage` of all (ties by char)."""
    ranked = sorted(char_counts.items(), key=lambda kv: (-kv[1], kv[0]))
    total = sum(char_counts.values())
    alphabet, seen = [], 0
    for char, count in ranked:
        if seen >= coverage * total:
            break
        alphabet.append(char)
        seen += count
    return alphabet


def final_vocab(specials: list[str], alphabet: list[str], learned: list[str], size: int) -> list[str]:
    """specials + alphabet (`c` and `##c`) + the first learned pieces in training order, up to `size` entries
    (the pieces sorted by string, so that the ids follow a fixed order)."""
    base = list(dict.fromkeys(specials + alphabet + [CONT_PREFIX + c for c in alphabet]))
    if size < len(base):
        raise UserError(f"--vocab_size {size} is too small: the special tokens and the {len(alphabet)}-character "
                        f"alphabet need {len(base)} entries; raise --vocab_size or lower --char_coverage")
    taken = set(base)
    rest = [t for t in learned if t not in taken]
    return base + sorted(rest[: size - len(base)])


def build_student_tokenizer(teacher, vocab: list[str], max_len: int):
    """A fast tokenizer with the teacher's normaliser/pre-tokeniser/decoder and the new WordPiece vocab."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(teacher.backend_tokenizer.to_str())
    roles = special_tokens(teacher)
    index = {tok: i for i, tok in enumerate(vocab)}
    specials = [t for t in vocab_list(teacher) if t in set(teacher.all_special_tokens)]
    spec["model"]["vocab"] = index
    spec["added_tokens"] = [
        {"id": index[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True} for t in specials
    ]
    spec["post_processor"] = None
    spec["truncation"] = None
    spec["padding"] = None
    backend = Tokenizer.from_str(json.dumps(spec))
    cls, sep = roles["cls"], roles["sep"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, index[cls]), (sep, index[sep])],
    )
    extra = [t for t in specials if t not in roles.values()]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=max_len, additional_special_tokens=extra or None,
        **{f"{role}_token": tok for role, tok in roles.items()},
    )


def read_student_config(path: str, max_len: int):
    """Load a DistilBERT/BERT config JSON (vocab_size and pad_token_id are set later)."""
    from transformers import CONFIG_MAPPING

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read the student config {path}: {err}; pass a DistilBERT config JSON") from err
    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UserError(f"student config {path} has no known model_type ({model_type!r}); use e.g. \"distilbert\"")
    config = CONFIG_MAPPING[model_type](**{k: v for k, v in data.items() if k != "model_type"})
    if getattr(config, "max_position_embeddings", max_len) < max_len:
        raise UserError(f"student config {path}: max_position_embeddings {config.max_position_embeddings} < "
                        f"--max_len {max_len}; raise it or lower --max_len")
    return config


@dataclass(frozen=True)
class ReducedTokParams:
    """Parameters of `train` (step 1).

    teacher_name: teacher directory (HF BertForMaskedLM + tokenizer);
    corpus: UTF-8 text files, one text per line;
    vocab_size: student vocabulary size (entries, special tokens and alphabet included);
    out: output tokenizer directory;
    char_coverage: share (0, 1] of the corpus character occurrences the student alphabet covers;
    min_frequency: minimum pair frequency (occurrences) for a WordPiece merge;
    student_config_path: DistilBERT/BERT config JSON written with the new vocab_size, or None for no config;
    max_len: maximum sequence length in tokens (the tokenizer's model_max_length);
    max_bad_frac: largest tolerated share (0..1) of undecodable lines per corpus file;
    force: overwrite an existing output.
    """

    teacher_name: str
    corpus: list[str]
    vocab_size: int
    out: str
    char_coverage: float = 0.9995
    min_frequency: int = 2
    student_config_path: str | None = None
    max_len: int = MAX_LEN
    max_bad_frac: float = DEFAULT_MAX_BAD_FRAC
    force: bool = False


def train(params: ReducedTokParams) -> dict:
    """Train and save the student tokenizer (and config); the same bytes in every run; returns statistics."""
    out_dir = check_output(params.out, params.force)
    teacher = load_tokenizer(params.teacher_name, "teacher")
    wp = wordpiece_settings(teacher)
    backend = teacher.backend_tokenizer
    if not 0 < params.char_coverage <= 1:
        raise UserError(f"--char_coverage {params.char_coverage} must be in (0, 1]")
    counts, corpus_stats = count_chars(params.corpus, backend.normalizer, params.max_bad_frac)
    alphabet = alphabet_at_coverage(counts, params.char_coverage)
    specials = [t for t in vocab_list(teacher) if t in set(teacher.all_special_tokens)]
    # fail early when the size cannot hold the alphabet
    final_vocab(specials, alphabet, [], params.vocab_size)
    config = (read_student_config(params.student_config_path, params.max_len)
              if params.student_config_path else None)

    learned = train_wordpiece(params.corpus, params.max_bad_frac, backend.normalizer, backend.pre_tokenizer,
                              wp["unk_token"], specials, alphabet, params.vocab_size, params.min_frequency,
                              wp["max_input_chars_per_word"])
    vocab = final_vocab(specials, alphabet, learned, params.vocab_size)

    student = build_student_tokenizer(teacher, vocab, params.max_len)
    stats = {
        "vocab_size": len(vocab), "requested_vocab_size": params.vocab_size, "alphabet_size": len(alphabet),
        "char_coverage": params.char_coverage, "distinct_chars": len(counts),
        "corpus_lines": corpus_stats.lines, "undecodable_lines": corpus_stats.undecodable,
    }
    return publish_student(out_dir, student, config, stats)


def publish_student(out_dir: Path, student, config, stats: dict) -> dict:
    """Write the student tokenizer, vocab.txt, the config (vocab_size and pad id set from the tokenizer) and
    `student_tokenizer_stats.json` to `out_dir` atomically; returns `stats`."""
    vocab = vocab_list(student)
    with staged_dir(out_dir) as tmp:
        student.save_pretrained(str(tmp))
        write_vocab_txt(student, tmp)
        if config is not None:
            config.vocab_size = len(vocab)
            config.pad_token_id = vocab.index(special_tokens(student)["pad"])
            config.save_pretrained(str(tmp))
        atomic_write_json(tmp / "student_tokenizer_stats.json", stats)
    return stats


def _check_compatible(student, teacher, path: str) -> None:
    """The alignment needs WordPiece pieces and the same words and special tokens on both sides."""
    wordpiece_settings(student)
    s_spec, t_spec = (json.loads(t.backend_tokenizer.to_str()) for t in (student, teacher))
    for part in ("normalizer", "pre_tokenizer"):
        if s_spec.get(part) != t_spec.get(part):
            raise UserError(f"--student_tokenizer {path} has another {part} than the teacher's; teacher and student "
                            "must split text into the same words")
    if special_tokens(student) != special_tokens(teacher):
        raise UserError(f"--student_tokenizer {path} has other special tokens ({special_tokens(student)}) than the "
                        f"teacher ({special_tokens(teacher)})")


def adopt(teacher_name: str, tokenizer_dir: str, out: str, student_config_path: str | None = None,
          max_len: int = MAX_LEN, force: bool = False) -> dict:
    """Write the given student tokenizer (and config) to `out` as `train` would; returns statistics."""
    out_dir = check_output(out, force)
    teacher = load_tokenizer(teacher_name, "teacher")
    student = load_tokenizer(tokenizer_dir, "student")
    _check_compatible(student, teacher, tokenizer_dir)
    config = read_student_config(student_config_path, max_len) if student_config_path else None
    student.model_max_length = max_len
    vocab = vocab_list(student)
    stats = {"vocab_size": len(vocab), "adopted_from": str(tokenizer_dir),
             "same_as_teacher": vocab == vocab_list(teacher)}
    return publish_student(out_dir, student, config, stats)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher_name", required=True, help="teacher directory (HF BertForMaskedLM + tokenizer)")
    p.add_argument("--corpus", nargs="+", required=True, help="UTF-8 text files, one text per line")
    p.add_argument("--vocab_size", type=int, required=True, help="student vocabulary size")
    p.add_argument("--out", required=True, help="output tokenizer directory")
    p.add_argument("--char_coverage", type=float, default=0.9995, help="share of character occurrences to keep")
    p.add_argument("--min_frequency", type=int, default=2, help="minimum pair frequency for a merge")
    p.add_argument("--student_config", help="DistilBERT config JSON; written with the new vocab_size")
    p.add_argument("--max_len", type=int, default=MAX_LEN, help="maximum sequence length (model_max_length)")
    p.add_argument("--max_bad_frac", type=float, default=DEFAULT_MAX_BAD_FRAC,
                   help="largest tolerated share of undecodable lines per corpus file")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    params = ReducedTokParams(
        teacher_name=a.teacher_name, corpus=a.corpus, vocab_size=a.vocab_size, out=a.out,
        char_coverage=a.char_coverage, min_frequency=a.min_frequency, student_config_path=a.student_config,
        max_len=a.max_len, max_bad_frac=a.max_bad_frac, force=a.force,
    )
    stats = train(params)
    print(json.dumps(stats, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
