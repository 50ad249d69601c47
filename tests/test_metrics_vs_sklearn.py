"""Our numpy metrics against scikit-learn's (a dev-only dependency) on random inputs with ties and absent classes.

metrics.py and calibration.py do not import scikit-learn (1.2 s per process, and ~1 ms a query for nDCG); these tests
hold its definitions to scikit-learn's, edge cases included.
"""

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from sklearn import metrics as skm

from esci_dataset import LABELS, NDCG_GAINS
from tiny_reranker.calibration import fit_temperature, nll
from tiny_reranker.metrics import (
    classification_metrics,
    confusion_matrix,
    per_class_report,
    per_query_ndcg,
    roc_auc,
    task3_substitute_micro_f1,
)
from tiny_reranker.scoring import softmax

SEEDS = range(40)


def _labels(rng, n):
    """Random labels from a random subset of the four classes, so some classes are absent."""
    present = rng.choice(4, size=rng.integers(1, 5), replace=False)
    return rng.choice(present, size=n)


@pytest.mark.parametrize("seed", SEEDS)
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    y_true, y_pred = _labels(rng, n), _labels(rng, n)
    labels = list(range(4))
    assert confusion_matrix(y_true, y_pred).tolist() == skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    p, r, f, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    ours = per_class_report(y_true, y_pred)
    for i, label in enumerate(LABELS):
        assert [ours[label][key] for key in ("precision", "recall", "f1")] == pytest.approx([p[i], r[i], f[i]], abs=1e-12)
        assert ours[label]["support"] == support[i]
    m = classification_metrics(y_true, y_pred)
    assert m["micro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="micro", zero_division=0), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-12)
    assert task3_substitute_micro_f1(y_true, y_pred) == pytest.approx(
        skm.f1_score(y_true == 1, y_pred == 1, average="micro", zero_division=0), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_roc_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 80))
    positive = rng.random(n) < rng.uniform(0.1, 0.9)
    positive[:2] = [True, False]  # both classes present
    score = np.round(rng.random(n), int(rng.integers(0, 3)))  # 0-2 decimals: many ties
    assert roc_auc(positive, score) == pytest.approx(skm.roc_auc_score(positive, score), abs=1e-12)


def _sklearn_per_query(groups, y_true, scores, k):
    gain_of = np.array([NDCG_GAINS[label] for label in LABELS])
    out = {}
    for g in np.unique(groups):
        idx = groups == g
        gains = gain_of[y_true[idx]]
        if not (gains > 0).any():
            continue
        # sklearn refuses a single document; one relevant item is ranked perfectly.
        out[g] = 1.0 if idx.sum() == 1 else skm.ndcg_score(gains[None], scores[idx][None], k=k, ignore_ties=False)
    return out


@pytest.mark.parametrize("k", [None, 1, 3, 10])
@pytest.mark.parametrize("seed", range(10))
def test_per_query_ndcg_matches_sklearn_with_ties(seed, k):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    groups = rng.integers(0, max(1, n // 8), size=n)  # groups of ~8 items, some of one item
    y_true = _labels(rng, n)
    scores = np.round(rng.random(n), int(rng.integers(0, 3)))
    ours = {row["query_id"]: row["ndcg"] for row in per_query_ndcg(groups, y_true, scores, k)}
    expected = _sklearn_per_query(groups, y_true, scores, k)
    assert ours.keys() == expected.keys()
    for g, value in expected.items():
        assert ours[g] == pytest.approx(value, abs=1e-12), g


def test_per_query_ndcg_is_bit_identical_under_any_row_order():
    rng = np.random.default_rng(7)
    n = 500
    groups, y_true = rng.integers(0, 40, size=n), rng.integers(0, 4, size=n)
    scores = np.round(rng.random(n), 1)  # ties everywhere
    expected = per_query_ndcg(groups, y_true, scores)
    for _ in range(5):
        perm = rng.permutation(n)
        assert per_query_ndcg(groups[perm], y_true[perm], scores[perm]) == expected


def test_non_finite_scores_are_refused_like_sklearn():
    with pytest.raises(ValueError, match="non-finite"):
        roc_auc(np.array([1, 0]), np.array([np.nan, 0.1]))
    with pytest.raises(ValueError, match="non-finite"):
        per_query_ndcg(np.array([0, 0]), np.array([0, 3]), np.array([np.inf, 0.1]))


@pytest.mark.parametrize("seed", range(5))
def test_fit_temperature_matches_scipy_bounded_minimizer(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 4, size=400)
    logits = rng.normal(size=(400, 4)) + 2.0 * np.eye(4)[y_true]
    logits *= rng.choice([0.2, 1.0, 5.0])  # under-, roughly and over-confident
    f = lambda log_t: nll(softmax(logits, np.exp(log_t)), y_true)  # noqa: E731
    ref = minimize_scalar(f, bounds=(np.log(0.01), np.log(100.0)), method="bounded", options={"xatol": 1e-6})
    t = fit_temperature(logits, y_true)
    assert np.log(t) == pytest.approx(ref.x, abs=1e-4)
    assert f(np.log(t)) <= ref.fun + 1e-9
