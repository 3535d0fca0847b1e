"""Reading GLUE TSV files from disk and turning them into padded tensor batches.

GLUE's TSVs are unquoted (a `"` is an ordinary character), so they are read with `csv.QUOTE_NONE`; a
UTF-8 byte-order mark (MRPC's header has one) is ignored; blank lines are ignored. A row with the wrong
number of fields or a label outside the task's label set is a one-line `UserError` naming the file and the
line; with `bad_rows="skip"` such rows are dropped and counted instead (some public copies of QQP contain a
few rows broken by stray newlines), as long as they are at most `MAX_SKIPPED_FRAC` of the file.
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from glue_tasks import TaskSpec

from kdcore.errors import UserError

DEFAULT_MAX_LENGTH = 128
MAX_SKIPPED_FRAC = 0.01
"""With --bad_rows skip, more malformed rows than this share of a file is still an error."""
TOKENIZE_CHUNK = 4096


@dataclass
class Examples:
    """The examples of one file: texts, labels (int ids, or floats for regression), skipped lines."""

    path: Path
    texts_a: list[str]
    texts_b: list[str] | None
    labels: list[int] | list[float]
    skipped_lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts_a)


@dataclass
class TaskData:
    """Train and dev examples of a task, with its label count and names."""

    spec: TaskSpec
    train: Examples
    dev: dict[str, Examples]
    num_labels: int
    label_names: list[str]


class _BadRow(Exception):
    """A malformed row; the reader adds the file and line."""


def _column_index(spec: TaskSpec, header: list[str] | None, path: Path) -> tuple[list[int], int, int]:
    """Indices of the text columns and the label column, and the expected field count."""
    if header is None:
        return list(spec.text_columns), int(spec.label_column), int(spec.n_fields)
    names = [name.strip() for name in header]
    wanted = [*spec.text_columns, spec.label_column]
    missing = [name for name in wanted if name not in names]
    if missing:
        raise UserError(f"{path}:1: the header has no column {missing[0]!r} (found {names}); expected the "
                        f"{spec.name} file of GLUE's download script with columns {wanted}")
    return [names.index(name) for name in spec.text_columns], names.index(str(spec.label_column)), len(names)


def _parse_label(spec: TaskSpec, value: str) -> int | float:
    value = value.strip()
    if spec.regression:
        try:
            number = float(value)
        except ValueError:
            raise _BadRow(f"label {value!r} is not a number") from None
        if not math.isfinite(number):
            raise _BadRow(f"label {value!r} is not a finite number")
        return number
    if spec.integer_labels:
        if not value.isdigit():
            raise _BadRow(f"label {value!r} is not an integer 0..K-1")
        return int(value)
    if value not in spec.labels:
        raise _BadRow(f"label {value!r} is not one of {list(spec.labels)}")
    return spec.labels.index(value)


def read_split(spec: TaskSpec, path: Path, bad_rows: str = "error") -> Examples:
    """Read one TSV file of `spec`'s task. `bad_rows`: "error" (default) or "skip"."""
    if not path.is_file():
        raise UserError(f"missing file {path}; the {spec.name} folder needs train.tsv and "
                        f"{' and '.join(name for _, name in spec.dev_files)}")
    texts_a: list[str] = []
    texts_b: list[str] | None = [] if spec.is_pair else None
    labels: list = []
    skipped: list[int] = []
    line = 0
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = None
            if spec.has_header:
                header = next(reader, None)
                if header is None:
                    raise UserError(f"{path} is empty; expected a header line and examples")
            text_idx, label_idx, n_fields = _column_index(spec, header, path)
            for row in reader:
                line = reader.line_num
                if not row or row == [""]:
                    continue
                try:
                    if len(row) != n_fields:
                        raise _BadRow(f"{len(row)} tab-separated fields, expected {n_fields}")
                    label = _parse_label(spec, row[label_idx])
                except _BadRow as err:
                    if bad_rows != "skip":
                        raise UserError(f"{path}:{line}: malformed row: {err}; fix the file or pass --bad_rows "
                                        "skip to drop such rows") from None
                    skipped.append(line)
                    continue
                texts_a.append(row[text_idx[0]])
                if texts_b is not None:
                    texts_b.append(row[text_idx[1]])
                labels.append(label)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}:{line + 1}: not UTF-8 text ({err.reason}); GLUE files are UTF-8: convert it (e.g. "
                        f"iconv -f latin1 -t utf-8, or -f utf-16)") from None
    except csv.Error as err:
        raise UserError(f"{path}:{line + 1}: unreadable row ({err}); fix the file") from None
    if not texts_a:
        raise UserError(f"{path} holds no examples{f' ({len(skipped)} malformed rows skipped)' if skipped else ''}")
    if len(skipped) > MAX_SKIPPED_FRAC * (len(texts_a) + len(skipped)):
        raise UserError(f"{path}: {len(skipped)} of {len(texts_a) + len(skipped)} rows are malformed (first at line "
                        f"{skipped[0]}), more than --bad_rows skip tolerates ({MAX_SKIPPED_FRAC:.0%}); is it the "
                        f"right file for {spec.name}?")
    return Examples(path, texts_a, texts_b, labels, skipped)


def task_dir(spec: TaskSpec, glue_dir: str | Path) -> Path:
    """The folder holding the task's TSVs: GLUE_DIR/<folder>, or GLUE_DIR itself for single_sentence."""
    root = Path(glue_dir)
    if not root.is_dir():
        raise UserError(f"--glue_dir {root} is not a directory")
    if spec.folder is None:
        return root
    folder = root / spec.folder
    if not folder.is_dir():
        raise UserError(f"GLUE task folder {folder} does not exist; --glue_dir must hold the folders written by "
                        "GLUE's download script (CoLA, SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE, WNLI)")
    return folder


def load_task(spec: TaskSpec, glue_dir: str | Path, bad_rows: str = "error",
              num_labels: int | None = None) -> TaskData:
    """Train and dev examples of the task, with the label count (1 for regression) and names."""
    folder = task_dir(spec, glue_dir)
    train = read_split(spec, folder / "train.tsv", bad_rows)
    dev = {key: read_split(spec, folder / name, bad_rows) for key, name in spec.dev_files}
    if spec.regression:
        count, names = 1, ["score"]
    elif spec.labels is not None:
        count, names = len(spec.labels), list(spec.labels)
    else:
        count = num_labels if num_labels is not None else max(train.labels) + 1
        if count < 2:
            raise UserError(f"{train.path}: single_sentence needs at least 2 labels, found {count}; check the "
                            "labels (integers 0..K-1) or pass --num_labels")
        for split in (train, *dev.values()):
            bad = next((i for i, label in enumerate(split.labels) if label >= count), None)
            if bad is not None:
                raise UserError(f"{split.path}: example {bad + 1} has label {split.labels[bad]}, outside "
                                f"0..{count - 1}; fix the file or raise --num_labels")
        names = [str(i) for i in range(count)]
    if num_labels is not None and num_labels != count:
        raise UserError(f"--num_labels {num_labels} does not fit {spec.name}, which has {count} label(s); "
                        "--num_labels is for the single_sentence task")
    return TaskData(spec, train, dev, count, names)


# ---------------------------------------------------------------------------------------------------------
# Tokenisation and batches
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TokenizerParams:
    """How texts become ids (the --tokenizer_params YAML): `max_length` tokens at most (special tokens
    included; None: DEFAULT_MAX_LENGTH, or less when a model has fewer positions), cut by `truncation`;
    batches padded to the longest sequence or to `max_length`."""

    max_length: int | None = None
    padding: str = "longest"
    truncation: str = "longest_first"


PADDING = {"longest": "longest", "max_length": "max_length", False: "longest", "do_not_pad": "longest"}
TRUNCATION = {"longest_first": "longest_first", "only_first": "only_first", "only_second": "only_second",
              True: "longest_first"}


def load_tokenizer_params(path: str | Path | None) -> TokenizerParams:
    """Parse the YAML file (keys max_length, padding, truncation, add_special_tokens); None: defaults."""
    params = TokenizerParams()
    if path is None:
        return params
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read --tokenizer_params {path}: {str(err).splitlines()[0]}; pass a YAML mapping "
                        "(max_length, padding, truncation)") from None
    if not isinstance(data, dict):
        raise UserError(f"--tokenizer_params {path} must be a YAML mapping (max_length, padding, truncation)")
    unknown = sorted(set(data) - {"max_length", "padding", "truncation", "add_special_tokens"})
    if unknown:
        raise UserError(f"--tokenizer_params {path}: unknown key(s) {unknown}; allowed: max_length, padding, "
                        "truncation, add_special_tokens")
    if data.get("add_special_tokens", True) is not True:
        raise UserError(f"--tokenizer_params {path}: add_special_tokens must be true ([CLS] ... [SEP] is needed)")
    if "max_length" in data:
        if not isinstance(data["max_length"], int) or isinstance(data["max_length"], bool) or data["max_length"] < 4:
            raise UserError(f"--tokenizer_params {path}: max_length must be an integer >= 4")
        params.max_length = data["max_length"]
    for key, table in (("padding", PADDING), ("truncation", TRUNCATION)):
        if key in data:
            if data[key] not in table:
                raise UserError(f"--tokenizer_params {path}: {key} {data[key]!r} must be one of "
                                f"{[k for k in table if isinstance(k, str)]}")
            setattr(params, key, table[data[key]])
    return params


class EncodedSplit(torch.utils.data.Dataset):
    """Token ids of one split stored flat (int32 ids, int8 segment ids, int64 offsets) with the labels.
    Item i is `(input_ids, token_type_ids, label)` as numpy arrays."""

    def __init__(self, ids: np.ndarray, types: np.ndarray, offsets: np.ndarray, labels: np.ndarray):
        self.ids, self.types, self.offsets, self.labels = ids, types, offsets, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.ids[lo:hi], self.types[lo:hi], self.labels[i]

    def subset(self, n: int) -> EncodedSplit:
        """The first `n` examples (all when n <= 0 or n >= len)."""
        if n <= 0 or n >= len(self):
            return self
        end = self.offsets[n]
        return EncodedSplit(self.ids[:end], self.types[:end], self.offsets[:n + 1], self.labels[:n])


def encode(examples: Examples, tokenizer, params: TokenizerParams, regression: bool) -> EncodedSplit:
    """Tokenise every example ([CLS] a [SEP] (b [SEP])), truncated to `params.max_length`."""
    if examples.texts_b is None and params.truncation == "only_second":
        raise UserError("--tokenizer_params truncation only_second needs a sentence-pair task; use longest_first")
    ids_parts, type_parts, lengths = [], [], []
    for start in range(0, len(examples), TOKENIZE_CHUNK):
        end = start + TOKENIZE_CHUNK
        pair = examples.texts_b[start:end] if examples.texts_b is not None else None
        enc = tokenizer(examples.texts_a[start:end], pair, truncation=params.truncation,
                        max_length=params.max_length or DEFAULT_MAX_LENGTH,
                        padding=False, add_special_tokens=True, return_token_type_ids=True,
                        return_attention_mask=False)
        ids_parts.append(np.fromiter(itertools.chain.from_iterable(enc["input_ids"]), dtype=np.int32))
        type_parts.append(np.fromiter(itertools.chain.from_iterable(enc["token_type_ids"]), dtype=np.int8))
        lengths.extend(len(seq) for seq in enc["input_ids"])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    labels = np.asarray(examples.labels, dtype=np.float32 if regression else np.int64)
    return EncodedSplit(np.concatenate(ids_parts), np.concatenate(type_parts), offsets, labels)


class Collator:
    """Items -> a batch dict: input_ids, token_type_ids, attention_mask (int64 [B, L]) and labels ([B],
    int64 or float32). L is the longest item, or `pad_to` when given (padding: max_length)."""

    def __init__(self, pad_id: int, pad_to: int | None = None):
        self.pad_id, self.pad_to = pad_id, pad_to

    def __call__(self, items) -> dict[str, torch.Tensor]:
        length = self.pad_to or max(len(ids) for ids, _, _ in items)
        ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        types = torch.zeros((len(items), length), dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, (item_ids, item_types, _) in enumerate(items):
            n = len(item_ids)
            ids[row, :n] = torch.from_numpy(item_ids.astype(np.int64))
            types[row, :n] = torch.from_numpy(item_types.astype(np.int64))
            mask[row, :n] = 1
        labels = torch.from_numpy(np.asarray([label for _, _, label in items]))
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels}
