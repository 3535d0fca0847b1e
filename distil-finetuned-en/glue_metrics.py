"""The official GLUE metrics, computed locally with scikit-learn and scipy.

Names as GLUE's: `accuracy`, `f1` (binary, positive class 1: MRPC, QQP), `matthews_correlation` (CoLA),
`pearson` and `spearman` (STS-B), plus `macro_f1` for the generic single-sentence task. A correlation that
is undefined (constant predictions or labels) is reported as 0.0, i.e. no correlation, so that results
stay valid JSON and model selection keeps working.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from glue_tasks import TaskSpec


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def f1(preds: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds, pos_label=1, average="binary", zero_division=0))


def macro_f1(preds: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds, average="macro", zero_division=0))


def matthews_correlation(preds: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, preds))


def _correlation(fn, preds: np.ndarray, labels: np.ndarray) -> float:
    preds, labels = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if len(preds) < 2 or np.ptp(preds) == 0 or np.ptp(labels) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(preds, labels)[0])
    return value if math.isfinite(value) else 0.0


def pearson(preds: np.ndarray, labels: np.ndarray) -> float:
    from scipy.stats import pearsonr

    return _correlation(pearsonr, preds, labels)


def spearman(preds: np.ndarray, labels: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return _correlation(spearmanr, preds, labels)


METRICS = {"accuracy": accuracy, "f1": f1, "macro_f1": macro_f1, "matthews_correlation": matthews_correlation,
           "pearson": pearson, "spearman": spearman}


def predictions(spec: TaskSpec, logits: np.ndarray) -> np.ndarray:
    """Model outputs [N, C] -> predictions: the score (regression, C = 1) or the argmax class."""
    logits = np.asarray(logits)
    return logits[:, 0] if spec.regression else logits.argmax(axis=-1)


def compute_metrics(spec: TaskSpec, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """{metric name: value} for the task's official metrics."""
    return {name: METRICS[name](preds, labels) for name in spec.metrics}


def selection_score(spec: TaskSpec, metrics: dict[str, float]) -> float:
    """The number the best model is chosen on: the mean of the task's selection metrics (its GLUE score:
    accuracy and F1 averaged for MRPC/QQP, Pearson and Spearman for STS-B)."""
    return float(np.mean([metrics[name] for name in spec.selection]))
