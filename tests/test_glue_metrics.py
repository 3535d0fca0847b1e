"""GLUE metrics against hand-computed values, and the objective's loss terms."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "distil-finetuned-en") not in sys.path:
    sys.path.append(str(ROOT / "distil-finetuned-en"))

from glue_metrics import (  # noqa: E402
    accuracy,
    compute_metrics,
    f1,
    macro_f1,
    matthews_correlation,
    pearson,
    predictions,
    selection_score,
    spearman,
)
from glue_objective import Objective, task_loss  # noqa: E402
from glue_tasks import GLUE_TASKS, TASKS  # noqa: E402

from custom_step import kl_div_loss  # noqa: E402

PREDS = np.array([1, 1, 0, 0, 1])
LABELS = np.array([1, 0, 0, 1, 1])  # TP 2, FP 1, FN 1, TN 1


def test_classification_metrics_by_hand():
    assert accuracy(PREDS, LABELS) == pytest.approx(3 / 5)
    assert f1(PREDS, LABELS) == pytest.approx(2 / 3)  # precision 2/3, recall 2/3
    # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3 * 3 * 2 * 2)
    assert matthews_correlation(PREDS, LABELS) == pytest.approx(1 / 6)
    # classes 0: P 1/2 R 1/2 F 1/2; 1: P 1/2 R 1 F 2/3; 2: P 1 R 1/2 F 2/3
    assert macro_f1(np.array([0, 1, 1, 0, 2]), np.array([0, 1, 0, 2, 2])) == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)
    assert f1(np.zeros(4, int), np.array([0, 1, 0, 1])) == 0.0
    assert matthews_correlation(np.ones(4, int), np.array([0, 1, 0, 1])) == 0.0


def test_correlations_by_hand():
    x, y = np.array([1.0, 2, 3, 4]), np.array([2.0, 4, 5, 9])
    # centred: dx = [-1.5, -.5, .5, 1.5], dy = [-3, -1, 0, 4]; sum dx dy = 11, sum dx^2 = 5, sum dy^2 = 26
    assert pearson(x, y) == pytest.approx(11 / math.sqrt(5 * 26))
    # rank differences [0, -1, 1, 0]: 1 - 6 * 2 / (4 * (16 - 1))
    assert spearman(x, np.array([1.0, 3, 2, 4])) == pytest.approx(0.8)
    assert pearson(np.full(4, 2.5), y) == 0.0 and spearman(np.full(4, 2.5), y) == 0.0


@pytest.mark.parametrize(("task", "names"), [
    ("cola", ["matthews_correlation"]), ("sst2", ["accuracy"]), ("mrpc", ["accuracy", "f1"]),
    ("qqp", ["accuracy", "f1"]), ("stsb", ["pearson", "spearman"]), ("mnli", ["accuracy"]),
    ("qnli", ["accuracy"]), ("rte", ["accuracy"]), ("wnli", ["accuracy"]), ("single_sentence", ["accuracy", "macro_f1"]),
])
def test_each_task_reports_its_official_metrics(task, names):
    spec = TASKS[task]
    logits = np.array([[0.1], [0.9], [2.0], [3.5]]) if spec.regression else np.array([[2.0, 1], [0, 1], [3, 0], [0, 4]])
    labels = np.array([0.0, 1, 2, 3]) if spec.regression else np.array([0, 1, 1, 1])
    values = compute_metrics(spec, predictions(spec, logits), labels)
    assert list(values) == names
    if not spec.regression:
        assert values["accuracy" if "accuracy" in names else names[0]] == pytest.approx(
            0.75 if "accuracy" in names else matthews_correlation(np.array([0, 1, 0, 1]), labels))


def test_selection_score_is_the_glue_score():
    assert selection_score(TASKS["mrpc"], {"accuracy": 0.8, "f1": 0.9}) == pytest.approx(0.85)
    assert selection_score(TASKS["stsb"], {"pearson": 0.5, "spearman": 0.7}) == pytest.approx(0.6)
    assert selection_score(TASKS["single_sentence"], {"accuracy": 0.4, "macro_f1": 0.1}) == pytest.approx(0.4)
    assert len(GLUE_TASKS) == 9


def _out(logits):
    return SimpleNamespace(logits=logits, hidden_states=None)


def test_objective_combines_task_and_kl():
    torch.manual_seed(0)
    s, t = torch.randn(6, 3, requires_grad=True), torch.randn(6, 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    obj = Objective(TASKS["mnli"], alpha_task=0.5, alpha_kl=2.0, temperature=3.0)
    total, parts = obj(_out(s), labels, _out(t))
    ce = torch.nn.functional.cross_entropy(s, labels).detach()
    kl = kl_div_loss(t, s, 3.0).detach()
    assert float(parts["task"]) == pytest.approx(float(ce)) and float(parts["kl"]) == pytest.approx(float(kl))
    assert float(total.detach()) == pytest.approx(0.5 * float(ce) + 2.0 * float(kl), rel=1e-6)
    total.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_kl_matches_a_direct_computation():
    torch.manual_seed(1)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    obj = Objective(TASKS["sst2"], alpha_task=0.0, alpha_kl=1.0, temperature=2.0)
    p_t = torch.softmax(t / 2, -1)
    direct = 4 * (p_t * (p_t.log() - torch.log_softmax(s / 2, -1))).sum(-1).mean()
    assert float(obj.distil_loss(t, s)) == pytest.approx(float(direct), rel=1e-5)


def test_regression_distils_by_mse_and_temperature_can_be_learned():
    s, t = torch.tensor([[1.0], [2.0]], requires_grad=True), torch.tensor([[0.0], [4.0]])
    obj = Objective(TASKS["stsb"], alpha_task=1.0, alpha_kl=1.0)
    _, parts = obj(_out(s), torch.tensor([1.0, 1.0]), _out(t))
    assert float(parts["pred_mse"]) == pytest.approx((1 + 4) / 2)
    assert float(parts["task"]) == pytest.approx(float(task_loss(TASKS["stsb"], s.detach(), torch.tensor([1.0, 1.0]))))
    assert float(parts["task"]) == pytest.approx((0 + 1) / 2)
    learned = Objective(TASKS["sst2"], alpha_task=0.0, alpha_kl=1.0, temperature=4.0, train_temperature=True)
    assert float(learned.temperature.detach()) == pytest.approx(4.0)
    loss, _ = learned(_out(torch.randn(3, 2, requires_grad=True)), torch.tensor([0, 1, 0]), _out(torch.randn(3, 2)))
    loss.backward()
    assert learned.log_temperature.grad is not None and learned.log_temperature.grad != 0
    assert "log_temperature" not in dict(Objective(TASKS["sst2"]).named_parameters())
