"""Evaluation metrics: pure functions of numpy arrays (``report.py`` turns them into eval.py's report).

Labels are ints 0..3 in ``LABELS`` order everywhere in this module. ``probs`` are ``[N, 4]`` rows
that sum to 1; ``scores`` are the ranking scores ``[N]``; ``query_ids`` / ``groups`` are ``[N]``.
Each metric follows scikit-learn's definition, edge cases included (zero_division=0, macro-F1 over
the classes present, ROC-AUC and nDCG with tied scores averaged), and tests check them against
scikit-learn on random inputs. They are numpy of their own because eval.py pays for them: importing
scikit-learn costs ~1.2 s per process, and its per-query ``ndcg_score`` ~1 ms a query, ~20 s on
ESCI's 9k test queries; the grouped nDCG here does all queries in one sort.
"""

from __future__ import annotations

import numpy as np

from esci_dataset import LABELS, NDCG_GAINS
from tiny_reranker.calibration import brier_score, calibration_before_after, expected_calibration_error, nll

_S = LABELS.index("S")


# ---------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------
def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = len(LABELS)) -> np.ndarray:
    """``cm[t, p]`` counts rows with true class t predicted as p (all classes, even absent ones)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with 0 where ``den`` is 0 (sklearn's ``zero_division=0``)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _f1_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per class (precision, recall, F1, support); F1 = 2·TP / (predicted + true), 0 where both are 0."""
    tp, predicted, true = np.diag(cm), cm.sum(axis=0), cm.sum(axis=1)
    return _safe_divide(tp, predicted), _safe_divide(tp, true), _safe_divide(2 * tp, predicted + true), true


def _micro_macro_f1(cm: np.ndarray) -> tuple[float, float]:
    """Micro-F1 and macro-F1 over the classes present in truth or prediction (sklearn without ``labels=``)."""
    _, _, f1, support = _f1_from_confusion(cm)
    present = (support + cm.sum(axis=0)) > 0
    if not present.any():
        return 0.0, 0.0
    tp = np.diag(cm)[present].sum()  # micro: pooled counts; for one label per row it equals accuracy
    micro = float(_safe_divide(2 * tp, cm.sum(axis=0)[present].sum() + support[present].sum()))
    return micro, float(f1[present].mean())


def per_class_report(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per class; 0 where undefined (zero_division=0)."""
    p, r, f, support = _f1_from_confusion(confusion_matrix(y_true, y_pred))
    return {
        label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
        for i, label in enumerate(LABELS)
    }


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy, micro-F1 and macro-F1 (macro over classes present in y_true or y_pred)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:  # an empty eval split is not an error here
        return {"accuracy": 0.0, "micro_f1": 0.0, "macro_f1": 0.0}
    # Single-label multiclass: micro-F1 equals accuracy; computed anyway so the name means what it says.
    # Macro-F1 leaves out a class absent from both truth and prediction: it would add a meaningless 0.
    micro, macro = _micro_macro_f1(confusion_matrix(y_true, y_pred))
    return {"accuracy": float((y_true == y_pred).mean()), "micro_f1": micro, "macro_f1": macro}


def majority_baseline(y_true: np.ndarray) -> dict[str, float | str]:
    """Metrics of always predicting the most frequent true class."""
    counts = np.bincount(np.asarray(y_true), minlength=len(LABELS))
    majority = int(counts.argmax())
    metrics = classification_metrics(y_true, np.full_like(np.asarray(y_true), majority))
    return {"label": LABELS[majority], **metrics}


def _finite(values: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if not np.isfinite(values).all():
        raise ValueError(f"{what} contain {int((~np.isfinite(values)).sum())} non-finite value(s) (NaN or inf)")
    return values


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` ascending; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sizes = np.diff(np.r_[starts, len(values)])
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(starts + (sizes + 1) / 2.0, sizes)
    return ranks


def roc_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half). None when one class is absent.

    Mann-Whitney form: the share of (positive, negative) pairs the score orders right.
    """
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return None
    ranks = _average_ranks(_finite(score, "scores"))
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ---------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------
def _grouped_ndcg(group: np.ndarray, gains: np.ndarray, scores: np.ndarray, k: int | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per group ``0..G-1``: (nDCG, item count); nDCG is NaN where no item has gain.

    Items rank by descending score within their group; tied scores share the mean of their gains
    over the ranks they span (sklearn's ``ndcg_score(ignore_ties=False)``), so the value never
    depends on row order. Discount ``1 / log2(rank + 2)``, 0 from rank ``k`` on. One sort for all groups.
    """
    n_groups = int(group.max()) + 1
    # Ties are ordered by gain, so even the floating-point sums do not depend on row order.
    order = np.lexsort((gains, -scores, group))
    g, s, q = gains[order], scores[order], group[order]
    starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
    sizes = np.diff(np.r_[starts, len(q)])
    rank = np.arange(len(q)) - np.repeat(starts, sizes)
    discount = 1.0 / (np.log(rank + 2) / np.log(2))
    if k is not None:
        discount[rank >= k] = 0.0
    tie = np.cumsum(np.r_[True, (q[1:] != q[:-1]) | (s[1:] != s[:-1])]) - 1
    tie_gain = np.bincount(tie, weights=g) / np.bincount(tie)
    dcg = np.bincount(q, weights=tie_gain[tie] * discount, minlength=n_groups)
    # The ideal ranking: gains descending, laid out over the same ranks (the groups keep their rows).
    ideal = gains[np.lexsort((-gains, group))]
    idcg = np.bincount(q, weights=ideal * discount, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(idcg > 0, dcg / idcg, np.nan), np.bincount(q, minlength=n_groups)


def ndcg(gains: np.ndarray, scores: np.ndarray, k: int | None = None) -> float | None:
    """nDCG of ranking items by descending score; None when no item has gain.

    Tied scores share the average of their gains (sklearn's ``ignore_ties=False``), so the
    value never depends on the order the rows arrived in. One item with gain is a perfect 1.0.
    """
    gains, scores = np.asarray(gains, dtype=float), _finite(scores, "scores")
    if not (gains > 0).any():
        return None
    value, _ = _grouped_ndcg(np.zeros(len(gains), dtype=np.int64), gains, scores, k)
    return float(value[0])


def per_query_ndcg(query_ids: np.ndarray, y_true: np.ndarray, scores: np.ndarray,
                   k: int | None = None) -> list[dict]:
    """``[{query_id, ndcg, n_items}]`` with ESCI gains, for queries that have a relevant item.

    Queries with no E/S/C item are skipped (their nDCG is undefined); a one-item query with a
    relevant item scores 1.0. Ordered by query id as a string.
    """
    gain_of = np.array([NDCG_GAINS[label] for label in LABELS])
    gains, scores = gain_of[np.asarray(y_true, dtype=np.int64)], _finite(scores, "scores")
    ids = np.asarray(query_ids)
    if len(ids) == 0:
        return []
    # Group on the string form so int and str ids (query_id vs query text) work alike.
    _, first, inverse = np.unique(ids.astype(str), return_index=True, return_inverse=True)
    values, n_items = _grouped_ndcg(inverse.reshape(-1), gains, scores, k)
    return [{"query_id": qid, "ndcg": float(value), "n_items": int(n)}  # tolist(): plain Python ids, JSON-ready
            for qid, value, n in zip(ids[first].tolist(), values, n_items) if not np.isnan(value)]


def mean_ndcg(groups: np.ndarray, y_true: np.ndarray, scores: np.ndarray, k: int | None = None) -> tuple[float | None, int]:
    """nDCG per query averaged over queries that have a relevant item. Returns (mean, n_queries used)."""
    return _mean_of(per_query_ndcg(groups, y_true, scores, k))


def random_order_ndcg(groups: np.ndarray, y_true: np.ndarray, k: int | None = None) -> float | None:
    """The chance line for :func:`mean_ndcg`: the expected nDCG of ranking each query's items in random order, over
    the same queries. Exact, not sampled: with every score tied, each rank gets the mean gain of the query's items,
    which is a random permutation's expected DCG. On ESCI it is high (~0.94 on real US slices: many E items), so
    an nDCG means little without it."""
    return mean_ndcg(groups, y_true, np.zeros(len(np.asarray(y_true))), k)[0]


def _mean_of(rows: list[dict]) -> tuple[float | None, int]:
    return (float(np.mean([row["ndcg"] for row in rows])) if rows else None), len(rows)


def _lowest(rows: list[dict], k: int) -> list[dict]:
    return sorted(rows, key=lambda row: row["ndcg"])[:k]  # stable: equal nDCG keeps query-id order


def worst_queries(query_ids: np.ndarray, y_true: np.ndarray, scores: np.ndarray, k: int = 5) -> list[dict]:
    """The ``k`` queries with the lowest nDCG, lowest first: ``[{query_id, ndcg, n_items}]``."""
    return _lowest(per_query_ndcg(query_ids, y_true, scores), k)


# ---------------------------------------------------------------------------
# The three ESCI benchmark tasks (KDD Cup 2022, Shopping Queries dataset)
# ---------------------------------------------------------------------------
def task1_ranking_ndcg(query_ids: np.ndarray, y_true: np.ndarray, scores: np.ndarray) -> float | None:
    """Task 1, query-product ranking: mean per-query nDCG, gains E 1 / S 0.1 / C 0.01 / I 0."""
    return mean_ndcg(query_ids, y_true, scores)[0]


def task2_esci_f1(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Task 2, 4-class E/S/C/I classification: ``{micro_f1, macro_f1}`` (the cup ranked by micro)."""
    m = classification_metrics(y_true, y_pred)
    return {"micro_f1": m["micro_f1"], "macro_f1": m["macro_f1"]}


def task3_substitute_micro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Task 3, substitute identification: S vs not-S from the 4-class prediction, micro-F1 over both classes.

    On two classes micro-F1 equals accuracy, so compare it with the always-not-S baseline.
    """
    is_s_true, is_s_pred = np.asarray(y_true) == _S, np.asarray(y_pred) == _S
    return _micro_macro_f1(confusion_matrix(is_s_true, is_s_pred, n_classes=2))[0]


def esci_tasks(y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray, query_ids: np.ndarray | None) -> dict:
    """All three tasks under the keys the report uses; task 1 is None without query ids."""
    task2 = task2_esci_f1(y_true, y_pred)
    s_share = float((np.asarray(y_true) == _S).mean()) if len(y_true) else 0.0
    return {
        "task1_ranking_ndcg": None if query_ids is None else task1_ranking_ndcg(query_ids, y_true, scores),
        "task2_esci_micro_f1": task2["micro_f1"],
        "task2_esci_macro_f1": task2["macro_f1"],
        "task3_substitute_micro_f1": task3_substitute_micro_f1(y_true, y_pred),
        "task3_majority_micro_f1": max(s_share, 1.0 - s_share),
    }


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
def evaluation_report(y_true: np.ndarray, probs: np.ndarray, scores: np.ndarray, groups: np.ndarray | None,
                      *, temperature: float | None = None, n_worst: int = 5) -> dict:
    """Everything ``eval.py`` reports, as a JSON-ready dict. ``probs: [N, 4]``.

    ``temperature`` (fitted elsewhere, e.g. ``fit_temperature`` on a dev split) adds a
    ``calibration`` block with ECE/Brier/NLL before and after scaling.
    """
    y_true, probs, scores = np.asarray(y_true), np.asarray(probs, dtype=float), np.asarray(scores, dtype=float)
    y_pred = probs.argmax(axis=1)
    report = {
        "n": int(len(y_true)),
        **classification_metrics(y_true, y_pred),
        "majority_baseline": majority_baseline(y_true),
        "per_class": per_class_report(y_true, y_pred),
        "confusion_matrix": {"labels": list(LABELS), "rows_true_cols_pred": confusion_matrix(y_true, y_pred).tolist()},
        "mean_score_by_true_label": {
            label: (float(scores[y_true == i].mean()) if (y_true == i).any() else None) for i, label in enumerate(LABELS)
        },
        "roc_auc_E_vs_rest": roc_auc(y_true == 0, scores),
        "roc_auc_ES_vs_CI": roc_auc(y_true <= 1, scores),
        "esci_tasks": esci_tasks(y_true, y_pred, scores, None),  # task 1 is filled in below
        "ece": expected_calibration_error(probs, y_true),
        "brier": brier_score(probs, y_true),
        "nll": nll(probs, y_true),
    }
    if temperature is not None:
        report["calibration"] = calibration_before_after(probs, y_true, temperature)
    if groups is not None:
        # One pass over the queries serves nDCG, task 1 and the worst queries (sklearn costs ~1 ms a query).
        rows = per_query_ndcg(groups, y_true, scores)
        report["ndcg"], report["ndcg_queries"] = _mean_of(rows)
        report["esci_tasks"]["task1_ranking_ndcg"] = report["ndcg"]
        report["ndcg@10"], _ = mean_ndcg(groups, y_true, scores, k=10)
        report["ndcg_random"] = random_order_ndcg(groups, y_true)  # the chance line beside every nDCG
        report["ndcg@10_random"] = random_order_ndcg(groups, y_true, k=10)
        report["queries"] = int(len(np.unique(np.asarray(groups).astype(str))))
        report["worst_queries"] = _lowest(rows, n_worst)
    return report


def breakdown(by: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray,
              groups: np.ndarray | None) -> dict[str, dict]:
    """The headline metrics per value of ``by`` (e.g. ``product_locale``), keyed by the value as a string, sorted:
    ``{n, accuracy, macro_f1, majority_accuracy, ndcg, ndcg_random}``. ``ndcg`` (ESCI task 1 on the slice's rows) is None
    without query groups or when no query of the slice has a relevant item."""
    by, y_true, y_pred = np.asarray(by).astype(str), np.asarray(y_true), np.asarray(y_pred)
    scores = np.asarray(scores, dtype=float)
    out = {}
    for value in sorted(set(by.tolist())):
        rows = by == value
        m = classification_metrics(y_true[rows], y_pred[rows])
        out[value] = {"n": int(rows.sum()), "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                      "majority_accuracy": majority_baseline(y_true[rows])["accuracy"],
                      "ndcg": None if groups is None else mean_ndcg(np.asarray(groups)[rows], y_true[rows], scores[rows])[0],
                      "ndcg_random": None if groups is None else random_order_ndcg(np.asarray(groups)[rows], y_true[rows])}
    return out


