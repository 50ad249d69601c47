"""Metrics against hand-computed values."""

import numpy as np
import pytest

from metrics import (
    classification_metrics,
    confusion_matrix,
    evaluation_report,
    format_report,
    majority_baseline,
    mean_ndcg,
    ndcg,
    per_class_report,
    roc_auc,
)
from reranker import scores_from_probs

E, S, C, I = 0, 1, 2, 3


def test_confusion_and_f1_by_hand():
    y_true = np.array([E, E, E, S, S, I])
    y_pred = np.array([E, E, S, S, E, I])
    cm = confusion_matrix(y_true, y_pred)
    assert cm.tolist() == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    rep = per_class_report(cm)
    # E: precision 2/3, recall 2/3; S: precision 1/2, recall 1/2; I: 1/1.
    assert rep["E"]["f1"] == pytest.approx(2 / 3)
    assert rep["S"]["f1"] == pytest.approx(0.5)
    assert rep["I"]["f1"] == 1.0 and rep["C"]["support"] == 0
    m = classification_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["micro_f1"] == pytest.approx(4 / 6)
    # C never appears in truth or prediction, so it is left out of the macro average.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)


def test_majority_baseline():
    base = majority_baseline(np.array([S, S, E, I, S]))
    assert base["label"] == "S" and base["accuracy"] == pytest.approx(0.6)


def test_roc_auc_by_hand_with_ties():
    # positives 0.9, 0.5; negatives 0.5, 0.1 -> pairs: (0.9>0.5)=1, (0.9>0.1)=1, (0.5=0.5)=0.5, (0.5>0.1)=1 -> 3.5/4
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.5, 0.5, 0.1])) == pytest.approx(0.875)
    assert roc_auc(np.array([1, 1]), np.array([0.2, 0.3])) is None


def test_ndcg_by_hand():
    gains = np.array([0.0, 1.0, 0.1])
    scores = np.array([0.9, 0.5, 0.1])  # ranks gains 0, 1, 0.1
    dcg = 1.0 / np.log2(3) + 0.1 / np.log2(4)
    idcg = 1.0 + 0.1 / np.log2(3)
    assert ndcg(gains, scores) == pytest.approx(dcg / idcg)
    assert ndcg(gains, scores, k=1) == pytest.approx(0.0)
    assert ndcg(np.zeros(3), scores) is None


def test_mean_ndcg_groups_and_skips_queries_without_gain():
    groups = np.array(["a", "a", "b", "b", "c"])
    y_true = np.array([E, I, I, E, I])
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5])
    value, n = mean_ndcg(groups, y_true, scores)
    assert n == 2  # query c has no relevant item
    assert value == pytest.approx((1.0 + 1.0 / np.log2(3)) / 2)


def test_score_formula():
    probs = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0.25, 0.25, 0.25, 0.25]], dtype=float)
    assert scores_from_probs(probs).tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0, 0.5])


def test_evaluation_report_and_text():
    y_true = np.array([E, S, C, I, E])
    probs = np.eye(4)[[E, E, C, I, E]] * 0.7 + 0.075
    report = evaluation_report(y_true, probs, scores_from_probs(probs), np.array([1, 1, 1, 2, 2]))
    assert report["accuracy"] == pytest.approx(0.8)
    assert report["majority_baseline"]["label"] == "E"
    assert report["confusion_matrix"]["rows_true_cols_pred"][1] == [1, 0, 0, 0]
    text = format_report(report)
    assert "accuracy" in text and "confusion matrix" in text and "nDCG" in text
