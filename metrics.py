"""Evaluation metrics: pure functions of numpy arrays, plus the readable report.

Labels are ints 0..3 in ``LABELS`` order everywhere in this module.
"""

from __future__ import annotations

import numpy as np

from esci_dataset import LABELS

# ESCI ranking gains for nDCG (Amazon's Shopping Queries paper): exact 1.0, substitute 0.1, complement 0.01.
NDCG_GAINS = {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = len(LABELS)) -> np.ndarray:
    """``cm[t, p]`` counts rows with true class t predicted as p."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def per_class_report(cm: np.ndarray) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per class (0 where undefined, as sklearn's zero_division=0)."""
    tp = np.diag(cm).astype(float)
    predicted, actual = cm.sum(axis=0).astype(float), cm.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(actual[i])}
        for i, label in enumerate(LABELS)
    }


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy, micro-F1 and macro-F1 (macro over classes present in y_true or y_pred)."""
    cm = confusion_matrix(y_true, y_pred)
    report = per_class_report(cm)
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    f1s = np.array([report[label]["f1"] for label in LABELS])
    accuracy = float(np.trace(cm) / cm.sum()) if cm.sum() else 0.0
    # Single-label multiclass: micro precision = micro recall = accuracy.
    return {"accuracy": accuracy, "micro_f1": accuracy, "macro_f1": float(f1s[present].mean()) if present.any() else 0.0}


def majority_baseline(y_true: np.ndarray) -> dict[str, float | str]:
    """Metrics of always predicting the most frequent true class."""
    counts = np.bincount(np.asarray(y_true), minlength=len(LABELS))
    majority = int(counts.argmax())
    metrics = classification_metrics(y_true, np.full_like(np.asarray(y_true), majority))
    return {"label": LABELS[majority], **metrics}


def roc_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties count half). None when one class is absent."""
    positive, score = np.asarray(positive, dtype=bool), np.asarray(score, dtype=float)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=float)
    sorted_scores = score[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def dcg(gains_in_rank_order: np.ndarray, k: int | None = None) -> float:
    g = np.asarray(gains_in_rank_order, dtype=float)[:k]
    return float((g / np.log2(np.arange(2, len(g) + 2))).sum())


def ndcg(gains: np.ndarray, scores: np.ndarray, k: int | None = None) -> float | None:
    """nDCG of ranking items by descending score (stable on ties); None when no item has gain."""
    gains, scores = np.asarray(gains, dtype=float), np.asarray(scores, dtype=float)
    ideal = dcg(np.sort(gains)[::-1], k)
    if ideal == 0.0:
        return None
    return dcg(gains[np.argsort(-scores, kind="mergesort")], k) / ideal


def mean_ndcg(groups: np.ndarray, y_true: np.ndarray, scores: np.ndarray, k: int | None = None) -> tuple[float | None, int]:
    """nDCG per query averaged over queries that have a relevant item. Returns (mean, n_queries used)."""
    gain_of = np.array([NDCG_GAINS[label] for label in LABELS])
    gains = gain_of[np.asarray(y_true)]
    values = []
    _, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="mergesort")
    boundaries = np.flatnonzero(np.diff(inverse[order])) + 1
    for idx in np.split(order, boundaries):
        value = ndcg(gains[idx], scores[idx], k)
        if value is not None:
            values.append(value)
    return (float(np.mean(values)) if values else None), len(values)


def evaluation_report(y_true: np.ndarray, probs: np.ndarray, scores: np.ndarray, groups: np.ndarray | None) -> dict:
    """Everything ``eval.py`` reports, as a JSON-ready dict. ``probs: [N, 4]``."""
    y_true = np.asarray(y_true)
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred)
    report = {
        "n": int(len(y_true)),
        **classification_metrics(y_true, y_pred),
        "majority_baseline": majority_baseline(y_true),
        "per_class": per_class_report(cm),
        "confusion_matrix": {"labels": list(LABELS), "rows_true_cols_pred": cm.tolist()},
        "mean_score_by_true_label": {
            label: (float(scores[y_true == i].mean()) if (y_true == i).any() else None) for i, label in enumerate(LABELS)
        },
        "roc_auc_E_vs_rest": roc_auc(y_true == 0, scores),
        "roc_auc_ES_vs_CI": roc_auc(y_true <= 1, scores),
    }
    if groups is not None:
        report["ndcg"], report["ndcg_queries"] = mean_ndcg(groups, y_true, scores)
        report["ndcg@10"], _ = mean_ndcg(groups, y_true, scores, k=10)
    return report


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_report(report: dict) -> str:
    """The report as readable text tables."""
    base = report["majority_baseline"]
    lines = [
        f"pairs evaluated: {report['n']}",
        "",
        f"{'metric':<14}{'model':>10}{'majority(' + base['label'] + ')':>16}",
    ]
    for key in ("accuracy", "micro_f1", "macro_f1"):
        lines.append(f"{key:<14}{report[key]:>10.4f}{base[key]:>16.4f}")
    lines += ["", f"{'class':<8}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for label, row in report["per_class"].items():
        lines.append(f"{label:<8}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}{row['support']:>10d}")
    lines += ["", "confusion matrix (rows = true, cols = predicted)", "      " + "".join(f"{label:>8}" for label in LABELS)]
    for label, row in zip(LABELS, report["confusion_matrix"]["rows_true_cols_pred"]):
        lines.append(f"{label:<6}" + "".join(f"{v:>8d}" for v in row))
    lines += ["", "mean score by true label: " + "  ".join(
        f"{label}={_fmt(v)}" for label, v in report["mean_score_by_true_label"].items())]
    lines.append(f"ROC-AUC  E vs rest: {_fmt(report['roc_auc_E_vs_rest'])}   E+S vs C+I: {_fmt(report['roc_auc_ES_vs_CI'])}")
    if "ndcg" in report:
        lines.append(f"nDCG (ESCI gains 1/0.1/0.01/0): {_fmt(report['ndcg'])}   nDCG@10: {_fmt(report['ndcg@10'])}"
                     f"   over {report['ndcg_queries']} queries")
    return "\n".join(lines)
