"""The GLUE tasks as data: where each task's files live, which columns hold the texts and the label,
the label set, and the official metrics.

Files and columns follow the folders written by GLUE's download script (`download_glue_data.py`):

| task | folder | header | text columns | label column | labels |
|---|---|---|---|---|---|
| cola | CoLA | none (4 fields) | field 3 (sentence) | field 1 | 0, 1 |
| sst2 | SST-2 | sentence label | sentence | label | 0, 1 |
| mrpc | MRPC | Quality #1 ID #2 ID #1 String #2 String | #1 String, #2 String | Quality | 0, 1 |
| qqp | QQP | id qid1 qid2 question1 question2 is_duplicate | question1, question2 | is_duplicate | 0, 1 |
| stsb | STS-B | index genre filename year old_index source1 source2 sentence1 sentence2 score | sentence1, sentence2 | score | float 0..5 (regression) |
| mnli | MNLI | index promptID pairID genre ... sentence1 sentence2 label1 [... label5] gold_label | sentence1, sentence2 | gold_label | entailment, neutral, contradiction |
| qnli | QNLI | index question sentence label | question, sentence | label | entailment, not_entailment |
| rte | RTE | index sentence1 sentence2 label | sentence1, sentence2 | label | entailment, not_entailment |
| wnli | WNLI | index sentence1 sentence2 label | sentence1, sentence2 | label | 0, 1 |

Label ids are the positions in `labels` (the order of the GLUE `datasets` release: MNLI entailment=0,
neutral=1, contradiction=2). Dev files: `dev.tsv`, and for MNLI `dev_matched.tsv` and `dev_mismatched.tsv`.

`single_sentence` is not a GLUE task: a generic single-sentence classification task in SST-2's format
(header `sentence<TAB>label`, integer labels 0..K-1) whose `train.tsv` and `dev.tsv` lie directly in
`--glue_dir` (there is no standard folder name); K comes from `--num_labels` or the largest training label.
It reports accuracy and macro-F1.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    """One task: files, columns, labels and metrics.

    `text_columns` / `label_column` are header names, or field indices when the file has no header.
    `labels` is None for regression (STS-B) and for integer labels 0..K-1 (single_sentence).
    `dev_files` maps the results key ("dev", or MNLI's "dev_matched"/"dev_mismatched") to the file name;
    the first entry is the split on which the best model is chosen. `selection` lists the metrics
    averaged into that choice (the task's GLUE score).
    """

    name: str
    folder: str | None
    text_columns: tuple[str, ...] | tuple[int, ...]
    label_column: str | int
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    selection: tuple[str, ...]
    n_fields: int | None = None
    dev_files: tuple[tuple[str, str], ...] = (("dev", "dev.tsv"),)
    regression: bool = False
    integer_labels: bool = False

    @property
    def has_header(self) -> bool:
        return self.n_fields is None

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def primary_dev(self) -> str:
        return self.dev_files[0][0]


BINARY = ("0", "1")
NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec("cola", "CoLA", (3,), 1, BINARY, ("matthews_correlation",), ("matthews_correlation",), n_fields=4),
    TaskSpec("sst2", "SST-2", ("sentence",), "label", BINARY, ("accuracy",), ("accuracy",)),
    TaskSpec("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", BINARY, ("accuracy", "f1"), ("accuracy", "f1")),
    TaskSpec("qqp", "QQP", ("question1", "question2"), "is_duplicate", BINARY, ("accuracy", "f1"),
             ("accuracy", "f1")),
    TaskSpec("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman"),
             ("pearson", "spearman"), regression=True),
    TaskSpec("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
             ("accuracy",), ("accuracy",),
             dev_files=(("dev_matched", "dev_matched.tsv"), ("dev_mismatched", "dev_mismatched.tsv"))),
    TaskSpec("qnli", "QNLI", ("question", "sentence"), "label", NLI2, ("accuracy",), ("accuracy",)),
    TaskSpec("rte", "RTE", ("sentence1", "sentence2"), "label", NLI2, ("accuracy",), ("accuracy",)),
    TaskSpec("wnli", "WNLI", ("sentence1", "sentence2"), "label", BINARY, ("accuracy",), ("accuracy",)),
    TaskSpec("single_sentence", None, ("sentence",), "label", None, ("accuracy", "macro_f1"), ("accuracy",),
             integer_labels=True),
]}

GLUE_TASKS = tuple(name for name in TASKS if TASKS[name].folder is not None)
"""The nine GLUE tasks (the CLI also accepts `single_sentence`)."""
