"""GLUE TSV reading (all nine tasks in GLUE's exact file formats), errors, tokenisation and batches.

Also home of the synthetic GLUE writers used by the other test_glue_* files: tiny, easily separable tasks
(the label is given away by a keyword) written exactly as GLUE's download script writes them.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "distil-finetuned-en") not in sys.path:
    sys.path.append(str(ROOT / "distil-finetuned-en"))  # appended: its train.py must not shadow the root one

from glue_data import (  # noqa: E402
    Collator,
    TokenizerParams,
    encode,
    load_task,
    load_tokenizer_params,
    read_split,
)
from glue_tasks import GLUE_TASKS, TASKS  # noqa: E402

from kdcore.errors import UserError  # noqa: E402

FILLERS = ["the", "a", "cat", "dog", "movie", "plot", "actor", "story", "day", "night", "city", "house", "river",
           "tree", "book", "music", "road", "car", "friend", "window", "table", "garden", "train", "song"]
KEYWORDS = {2: ["awful", "great"], 3: ["yes", "maybe", "never"], 4: ["love", "politics", "school", "computers"]}
HEADERS = {
    "sst2": ["sentence", "label"],
    "mrpc": ["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
    "qqp": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
    "stsb": ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
    "qnli": ["index", "question", "sentence", "label"],
    "rte": ["index", "sentence1", "sentence2", "label"],
    "wnli": ["index", "sentence1", "sentence2", "label"],
    "single_sentence": ["sentence", "label"],
}
MNLI_HEAD = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
             "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]


def _words(rng: random.Random, n_min: int = 3, n_max: int = 7) -> list[str]:
    return [rng.choice(FILLERS) for _ in range(rng.randint(n_min, n_max))]


def _sentence(rng: random.Random, keyword: str | None = None) -> str:
    words = _words(rng)
    if keyword is not None:
        words.insert(rng.randint(0, len(words)), keyword)
    return " ".join(words)


def _row(task: str, i: int, label: int, rng: random.Random, dev_extra: bool) -> list[str]:
    """One GLUE row of `task` whose label `label` is given away by a keyword (in the second sentence for
    pairs). STS-B: the score is label (0..5) and sentence2 holds that many copies of `great`."""
    if task == "cola":
        return ["gj04", str(label), "" if label else "*", _sentence(rng, KEYWORDS[2][label])]
    if task in ("sst2", "single_sentence"):
        n = 4 if task == "single_sentence" else 2
        return [_sentence(rng, KEYWORDS[n][label]) + " ", str(label)]
    if task == "stsb":
        s2 = " ".join(_words(rng, 2, 4) + ["great"] * label)
        return [str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", _sentence(rng), s2,
                f"{label:.3f}"]
    if task == "mnli":
        gold = TASKS["mnli"].labels[label]
        s1, s2 = _sentence(rng), _sentence(rng, KEYWORDS[3][label]) + ' "quoted'
        parse = "( ( " + s1 + " ) )"
        labels = [gold] * (5 if dev_extra else 1)
        return [str(i), str(1000 + i), f"{1000 + i}e", "fiction", parse, parse, "(ROOT " + parse + ")",
                "(ROOT " + parse + ")", s1, s2, *labels, gold]
    s1, s2 = _sentence(rng), _sentence(rng, KEYWORDS[2][label])
    if task == "mrpc":
        return [str(label), str(100 + i), str(200 + i), s1, s2]
    if task == "qqp":
        return [str(i), str(2 * i), str(2 * i + 1), s1 + "?", s2 + "?", str(label)]
    if task in ("qnli", "rte"):
        return [str(i), s1, s2, TASKS[task].labels[label]]
    return [str(i), s1, s2, str(label)]  # wnli


def _n_classes(task: str) -> int:
    return {"mnli": 3, "stsb": 6, "single_sentence": 4}.get(task, 2)


def write_split(path: Path, task: str, n: int, seed: int, dev_extra: bool = False) -> list[int]:
    """Write one TSV of `task` with n rows (balanced labels); returns the labels written (ids)."""
    rng = random.Random(seed)
    labels = [i % _n_classes(task) for i in range(n)]
    rng.shuffle(labels)
    lines = []
    if task == "mnli":
        lines.append(MNLI_HEAD + ([f"label{k}" for k in range(1, 6)] if dev_extra else ["label1"]) + ["gold_label"])
    elif task != "cola":
        lines.append(HEADERS[task])
    lines += [_row(task, i, label, rng, dev_extra) for i, label in enumerate(labels)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(fields) + "\n" for fields in lines), encoding="utf-8")
    return labels


def write_glue_task(root: Path, task: str, n_train: int = 40, n_dev: int = 20, seed: int = 0) -> Path:
    """The task's folder in GLUE's layout (root itself for single_sentence); returns the folder."""
    spec = TASKS[task]
    folder = root / spec.folder if spec.folder else root
    write_split(folder / "train.tsv", task, n_train, seed)
    for k, (_, name) in enumerate(spec.dev_files):
        write_split(folder / name, task, n_dev, seed + 1 + k, dev_extra=True)
    return folder


def write_glue(root: Path, n_train: int = 40, n_dev: int = 20) -> Path:
    for task in GLUE_TASKS:
        write_glue_task(root, task, n_train, n_dev)
    return root


def make_tokenizer(directory: Path) -> Path:
    """A lowercase BERT WordPiece tokenizer trained on the synthetic vocabulary."""
    from train_teacher_tok import train_bert_tokenizer

    corpus = directory.parent / (directory.name + "_corpus.txt")
    rng = random.Random(0)
    words = FILLERS + [w for ws in KEYWORDS.values() for w in ws] + ["quoted", "?", '"', "(", ")", "root"]
    corpus.write_text("".join(" ".join(rng.choice(words) for _ in range(12)) + "\n" for _ in range(400)),
                      encoding="utf-8")
    train_bert_tokenizer([str(corpus)], 120, str(directory), lowercase=True, n_unused=2, max_len=64, min_frequency=1)
    return directory


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they lose a lot."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def glue_root(tmp_path_factory):
    return write_glue(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="module")
def glue_tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("gtok") / "tok")


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_reads_every_task_with_labels_as_written(tmp_path, task):
    spec = TASKS[task]
    folder = write_glue_task(tmp_path, task, n_train=30, n_dev=12, seed=3)
    data = load_task(spec, tmp_path)
    expected = write_split(tmp_path / "again.tsv", task, 30, 3)  # same seed: same labels
    if spec.regression:
        assert data.train.labels == [float(x) for x in expected]
        assert data.num_labels == 1
    else:
        assert data.train.labels == expected
        assert data.num_labels == len(spec.labels) and data.label_names == list(spec.labels)
    assert list(data.dev) == [key for key, _ in spec.dev_files]
    assert all(len(split) == 12 for split in data.dev.values())
    assert (data.train.texts_b is not None) == spec.is_pair
    assert data.train.path == folder / "train.tsv"
    # the keyword that gives the label away is in the text the reader picked
    text = data.train.texts_b[0] if spec.is_pair else data.train.texts_a[0]
    if task == "stsb":
        assert text.split().count("great") == int(data.train.labels[0])
    elif task == "mnli":
        assert KEYWORDS[3][data.train.labels[0]] in text.split() and text.endswith('"quoted')
    else:
        assert KEYWORDS[2][data.train.labels[0]] in text.split()


def test_mnli_labels_and_dev_splits(tmp_path):
    write_glue_task(tmp_path, "mnli", 6, 6)
    data = load_task(TASKS["mnli"], tmp_path)
    assert data.label_names == ["entailment", "neutral", "contradiction"]
    assert set(data.dev) == {"dev_matched", "dev_mismatched"}
    assert data.dev["dev_matched"].path.name == "dev_matched.tsv"


def test_mrpc_bom_and_quotes_are_plain_text(tmp_path):
    folder = write_glue_task(tmp_path, "mrpc", 4, 4)
    rows = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String", '1\t1\t2\t"He said\tit "twice',
            "0\t3\t4\tA b .\tC d ."]
    (folder / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = load_task(TASKS["mrpc"], tmp_path)
    assert data.train.texts_a == ['"He said', "A b ."] and data.train.texts_b == ['it "twice', "C d ."]
    assert data.train.labels == [1, 0]


def test_single_sentence_infers_or_checks_the_label_count(tmp_path):
    write_glue_task(tmp_path, "single_sentence", 16, 8)
    spec = TASKS["single_sentence"]
    data = load_task(spec, tmp_path)
    assert data.num_labels == 4 and data.label_names == ["0", "1", "2", "3"]
    assert load_task(spec, tmp_path, num_labels=6).num_labels == 6
    with pytest.raises(UserError, match=r"train.tsv: example \d+ has label 3, outside 0..2"):
        load_task(spec, tmp_path, num_labels=3)
    with pytest.raises(UserError, match="--num_labels 3 does not fit sst2"):
        write_glue_task(tmp_path, "sst2", 4, 4)
        load_task(TASKS["sst2"], tmp_path, num_labels=3)


def _corrupt(path: Path, line_no: int, text: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[line_no - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize(("task", "bad", "message"), [
    ("qqp", "5\t10\t11\tonly three fields?", r"QQP/train.tsv:7: malformed row: 4 tab-separated fields, expected 6"),
    ("cola", "gj04\t1\tno sentence", r"CoLA/train.tsv:7: malformed row: 3 tab-separated fields, expected 4"),
    ("rte", "6\ta\tb\tmaybe", r"RTE/train.tsv:7: malformed row: label 'maybe' is not one of"),
    ("stsb", "\t".join(["1"] * 9 + ["high"]), r"STS-B/train.tsv:7: malformed row: label 'high' is not a number"),
    ("mnli", "\t".join(["x"] * 11 + ["unknown"]), r"MNLI/train.tsv:7: malformed row: label 'unknown' is not one of"),
])
def test_malformed_row_names_file_and_line(tmp_path, task, bad, message):
    folder = write_glue_task(tmp_path, task, 10, 4)
    _corrupt(folder / "train.tsv", 7, bad)
    with pytest.raises(UserError, match=message) as err:
        load_task(TASKS[task], tmp_path)
    assert "\n" not in str(err.value) and "--bad_rows skip" in str(err.value)


def test_bad_rows_skip_counts_and_limits(tmp_path):
    folder = write_glue_task(tmp_path, "qqp", 200, 4)
    _corrupt(folder / "train.tsv", 50, "broken\trow")
    data = load_task(TASKS["qqp"], tmp_path, bad_rows="skip")
    assert data.train.skipped_lines == [50] and len(data.train) == 199
    for line in (60, 70, 80):
        _corrupt(folder / "train.tsv", line, "broken")
    with pytest.raises(UserError, match=r"4 of 200 rows are malformed \(first at line 50\)"):
        load_task(TASKS["qqp"], tmp_path, bad_rows="skip")


def test_header_without_expected_column(tmp_path):
    folder = write_glue_task(tmp_path, "stsb", 4, 4)
    _corrupt(folder / "dev.tsv", 1, "index\tsentence1\tsentence2\tlabel")
    with pytest.raises(UserError, match=r"STS-B/dev.tsv:1: the header has no column 'score'"):
        load_task(TASKS["stsb"], tmp_path)


def test_missing_file_and_folder_are_named(tmp_path):
    folder = write_glue_task(tmp_path, "mnli", 4, 4)
    (folder / "dev_mismatched.tsv").unlink()
    with pytest.raises(UserError, match=r"missing file .*MNLI/dev_mismatched.tsv"):
        load_task(TASKS["mnli"], tmp_path)
    with pytest.raises(UserError, match=r"GLUE task folder .*SST-2 does not exist"):
        load_task(TASKS["sst2"], tmp_path)
    with pytest.raises(UserError, match="is not a directory"):
        load_task(TASKS["sst2"], tmp_path / "nowhere")


def test_empty_and_non_utf8_files(tmp_path):
    folder = write_glue_task(tmp_path, "sst2", 4, 4)
    (folder / "dev.tsv").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match=r"dev\.tsv is empty"):
        read_split(TASKS["sst2"], folder / "dev.tsv")
    (folder / "dev.tsv").write_bytes(b"sentence\tlabel\nok\t1\nbad \xff\xfe\t0\n")
    with pytest.raises(UserError, match="not UTF-8"):
        read_split(TASKS["sst2"], folder / "dev.tsv")
    (folder / "dev.tsv").write_text("sentence\tlabel\n", encoding="utf-8")
    with pytest.raises(UserError, match="holds no examples"):
        read_split(TASKS["sst2"], folder / "dev.tsv")


def test_tokenizer_params_yaml(tmp_path):
    assert load_tokenizer_params(None) == TokenizerParams()
    good = tmp_path / "tok.yaml"
    good.write_text('add_special_tokens: True\npadding: "max_length"\nmax_length: 64\ntruncation: "longest_first"\n')
    assert load_tokenizer_params(good) == TokenizerParams(64, "max_length", "longest_first")
    for text, message in [("max_len: 3\n", "unknown key"), ("padding: sideways\n", "padding 'sideways' must be"),
                          ("max_length: two\n", "max_length must be an integer"), ("- 1\n", "YAML mapping"),
                          ("add_special_tokens: false\n", "add_special_tokens must be true")]:
        good.write_text(text)
        with pytest.raises(UserError, match=message):
            load_tokenizer_params(good)


def test_encode_and_collate_pairs(tmp_path, glue_tok):
    from kdcore.tokenizer_utils import load_tokenizer

    tok = load_tokenizer(glue_tok)
    write_glue_task(tmp_path, "rte", 8, 4)
    data = load_task(TASKS["rte"], tmp_path)
    enc = encode(data.train, tok, TokenizerParams(max_length=9), regression=False)
    assert len(enc) == 8 and enc.labels.dtype == np.int64
    ids, types, label = enc[0]
    expected = tok(data.train.texts_a[0], data.train.texts_b[0], truncation=True, max_length=9,
                   return_token_type_ids=True)
    assert ids.tolist() == expected["input_ids"] and types.tolist() == expected["token_type_ids"]
    assert len(ids) <= 9 and types[-1] == 1 and label == data.train.labels[0]
    batch = Collator(tok.pad_token_id)([enc[i] for i in range(4)])
    length = max(len(enc[i][0]) for i in range(4))
    assert batch["input_ids"].shape == (4, length) and batch["labels"].tolist() == data.train.labels[:4]
    assert batch["attention_mask"].sum(1).tolist() == [len(enc[i][0]) for i in range(4)]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()
    assert Collator(tok.pad_token_id, pad_to=9)([enc[0]])["input_ids"].shape == (1, 9)
    with pytest.raises(UserError, match="only_second needs a sentence-pair task"):
        write_glue_task(tmp_path, "sst2", 4, 4)
        encode(load_task(TASKS["sst2"], tmp_path).train, tok, TokenizerParams(truncation="only_second"), False)
