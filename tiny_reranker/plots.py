"""Evaluation and training plots as small PNGs (a few tens of KB each, sized for the README).

Pure functions: arrays in, files out, the written paths returned. Labels are ints
0..3 in ``LABELS`` order and ``probs`` is ``[N, 4]`` in that order, as everywhere.

Figures are built with ``matplotlib.figure.Figure`` and never through pyplot: no
global figure registry to leak, and no GUI backend is ever touched, so this runs
headless (CI, ssh to a GPU box) and does not switch the backend of a notebook
that imports it. ``savefig`` on such a figure renders with Agg.
"""

from __future__ import annotations

import numbers
import os
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from esci_dataset import LABEL_TEXT, LABELS
from tiny_reranker.calibration import ECE_BINS, expected_calibration_error, reliability_bins
from tiny_reranker.io import atomic_write
from tiny_reranker.metrics import confusion_matrix, roc_auc
from tiny_reranker.scoring import scores_from_probs

DPI = 100  # 4.5 x 3.6 in at 100 dpi -> 450 x 360 px: readable in a README, tens of KB as PNG
PANEL = (4.5, 3.6)
# One colour per label in every figure, so E is the same green in the histogram and the legend.
LABEL_COLORS = {"E": "tab:green", "S": "tab:blue", "C": "tab:orange", "I": "tab:gray"}


# ---------------------------------------------------------------------------
# Pure helpers: the numbers behind the pictures (unit-tested)
# ---------------------------------------------------------------------------
def row_normalise(cm: np.ndarray) -> np.ndarray:
    """Each row of ``cm`` divided by its sum (the recall view); a row with no examples stays 0."""
    cm = np.asarray(cm, dtype=float)
    totals = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)


def top_class(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct): the top-class probability ``[N]`` and whether the argmax is the true label ``[N]``."""
    probs = np.asarray(probs, dtype=float)
    return probs.max(axis=1), probs.argmax(axis=1) == np.asarray(y_true)


def roc_points(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) from (0, 0) to (1, 1), one point per distinct score.

    Tied scores move both rates in one step, so the trapezoid area under these points
    equals ``metrics.roc_auc`` (ties count half). Callers check both classes are present.
    """
    positive, score = np.asarray(positive, dtype=bool), np.asarray(score, dtype=float)
    order = np.argsort(-score, kind="mergesort")
    score, positive = score[order], positive[order]
    # The last index of each run of equal scores: thresholds between distinct values.
    ends = np.r_[np.flatnonzero(np.diff(score) != 0), len(score) - 1]
    tp = np.cumsum(positive)[ends]
    fp = np.cumsum(~positive)[ends]
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


# Held-out metrics train.py logs at each evaluation (trainer.held_out_metrics), all in [0, 1].
HELD_OUT_METRICS = ("eval_accuracy", "eval_macro_f1", "eval_ndcg")
# Each held-out metric's chance line, as train.py logs it beside the metric: the majority class, random order.
CHANCE_LINES = {"eval_accuracy": ("eval_majority_accuracy", "majority class"),
                "eval_ndcg": ("eval_ndcg_random", "nDCG of a random order")}


def training_series(log_history: Sequence[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{key: (steps, values)}`` for ``loss`` (training) and ``eval_loss`` / ``eval_accuracy`` / ``eval_macro_f1`` /
    ``eval_ndcg``.

    Reads a HF Trainer ``state.log_history``. The end-of-run summary carries
    ``train_loss`` rather than ``loss``, so it is skipped by construction; entries
    without a step or with a non-finite value are skipped too. Keys with no points are left out.
    """
    series = {}
    for key in ("loss", "eval_loss", *HELD_OUT_METRICS, *(chance for chance, _ in CHANCE_LINES.values())):
        points = [(entry["step"], entry[key]) for entry in log_history
                  if "step" in entry and isinstance(entry.get(key), numbers.Real) and np.isfinite(entry[key])]
        if points:
            steps, values = zip(*points)
            series[key] = (np.asarray(steps), np.asarray(values, dtype=float))
    return series


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------
def _save(fig: Figure, path: str) -> str:
    # format= because atomic_write's temp name has no .png for matplotlib to read.
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path


def _confusion_figure(y_true: np.ndarray, y_pred: np.ndarray) -> Figure:
    cm = confusion_matrix(y_true, y_pred)
    fig = Figure(figsize=(8.0, PANEL[1]), layout="constrained")  # two square heatmaps: narrower than 2 panels
    panels = ((cm, "counts", "d"), (row_normalise(cm), "row-normalised (recall)", ".2f"))
    for ax, (values, title, fmt) in zip(fig.subplots(1, 2), panels):
        ax.imshow(values, cmap="Blues", vmin=0)
        # Dark cells get white text: the threshold is half the panel's maximum.
        threshold = values.max() / 2 if values.max() > 0 else 1
        for t in range(len(LABELS)):
            for p in range(len(LABELS)):
                ax.text(p, t, format(values[t, p], fmt), ha="center", va="center", fontsize=8,
                        color="white" if values[t, p] > threshold else "black")
        ax.set(xticks=range(len(LABELS)), yticks=range(len(LABELS)), xticklabels=LABELS, yticklabels=LABELS,
               xlabel="predicted", ylabel="true", title=title)
    fig.suptitle(f"confusion matrix (n={len(y_true)})")
    return fig


def _score_distribution_figure(y_true: np.ndarray, scores: np.ndarray, which: str = "raw logits") -> Figure:
    fig = Figure(figsize=PANEL, layout="constrained")
    ax = fig.subplots()
    bins = np.linspace(0.0, 1.0, 31)
    for i, label in enumerate(LABELS):
        s = scores[y_true == i]
        if len(s):
            # density=True: classes of very different sizes stay comparable in shape.
            ax.hist(s, bins=bins, density=True, histtype="step", linewidth=1.5, color=LABEL_COLORS[label],
                    label=f"{label} {LABEL_TEXT[label]} (n={len(s)})")
    ax.set(xlim=(0, 1), xlabel="score = (3·P(E) + 2·P(S) + P(C)) / 3", ylabel="density",
           title=f"score by true label ({which})")
    ax.legend(fontsize=7)
    return fig


def _roc_figure(y_true: np.ndarray, probs: np.ndarray, scores: np.ndarray, which: str = "raw logits") -> Figure:
    fig = Figure(figsize=PANEL, layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="lightgray", linewidth=1, label="chance")
    curves = (("E vs rest, P(E)", y_true == 0, probs[:, 0], "tab:green"),
              ("E+S vs C+I, score", y_true <= 1, scores, "tab:blue"))
    skipped = []
    for name, positive, score, color in curves:
        auc = roc_auc(positive, score)
        if auc is None:  # one class absent: no curve exists
            skipped.append(name.split(",")[0])
            continue
        fpr, tpr = roc_points(positive, score)
        ax.plot(fpr, tpr, color=color, linewidth=1.5, label=f"{name} (AUC {auc:.3f})")
    title = f"ROC ({which})"
    if skipped:
        title += f"\nskipped, one class absent: {', '.join(skipped)}"
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(title, fontsize=9 if skipped else None)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def _reliability_figure(y_true: np.ndarray, probs: np.ndarray, calibrated_probs: np.ndarray | None) -> Figure:
    fig = Figure(figsize=(PANEL[0], PANEL[1] * 1.25), layout="constrained")
    ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    ax.plot([0, 1], [0, 1], linestyle="--", color="lightgray", linewidth=1, label="perfect calibration")
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    series = [("raw logits", probs, "tab:blue")]
    if calibrated_probs is not None:
        series.append(("after temperature", calibrated_probs, "tab:red"))
    eces = []
    for name, p, color in series:
        accuracy, mean_conf, count = reliability_bins(*top_class(y_true, p))  # the bins the ECE uses
        ece = expected_calibration_error(p, y_true)
        eces.append(f"{ece:.3f}")
        filled = count > 0
        # Accuracy is drawn at each bin's mean confidence, so the gap to the diagonal is the bin's error.
        ax.plot(mean_conf[filled], accuracy[filled], marker="o", markersize=3, color=color,
                label=f"{name} (ECE {ece:.3f})")
        ax_count.stairs(count, edges, color=color, fill=len(series) == 1, alpha=0.6)
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy",
           title=f"reliability of top-class probability\nECE {' -> '.join(eces)} ({ECE_BINS} bins)")
    ax.legend(fontsize=7, loc="upper left")
    ax_count.set(xlabel="confidence (top-class probability)", ylabel="count")
    return fig


def _check_eval_inputs(y_true: np.ndarray, probs: np.ndarray, what: str = "probs") -> None:
    if probs.ndim != 2 or probs.shape != (len(y_true), len(LABELS)):
        raise ValueError(f"{what} must be [N, {len(LABELS)}] with N = len(y_true) = {len(y_true)}; got {probs.shape}")


def plot_eval(y_true: np.ndarray, probs: np.ndarray, out_dir: str, prefix: str = "eval_",
              calibrated_probs: np.ndarray | None = None, use_calibrated: bool = False) -> list[str]:
    """Write four PNGs into ``out_dir`` and return their paths; ``[]`` (nothing written) when N = 0.

    ``y_true: [N]`` ints 0..3; ``probs`` (the raw logits' softmax) and optional ``calibrated_probs`` (after the
    temperature): ``[N, 4]`` in ``LABELS`` order. ``use_calibrated``: the confusion matrix, score histogram and
    ROC show ``calibrated_probs``, as the report does when it applies the temperature; each title says which.
    The reliability diagram shows both. Files: ``{prefix}confusion_matrix.png``, ``{prefix}score_distribution.png``,
    ``{prefix}roc.png``, ``{prefix}reliability.png``.
    """
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    if len(y_true) == 0:
        return []
    _check_eval_inputs(y_true, probs)
    if calibrated_probs is not None:
        calibrated_probs = np.asarray(calibrated_probs, dtype=np.float64)
        _check_eval_inputs(y_true, calibrated_probs, "calibrated_probs")
    shown = calibrated_probs if use_calibrated and calibrated_probs is not None else probs
    which = "temperature applied" if shown is calibrated_probs else "raw logits"  # the report's probabilities
    scores = scores_from_probs(shown)
    os.makedirs(out_dir, exist_ok=True)
    figures = {
        "confusion_matrix": _confusion_figure(y_true, shown.argmax(axis=1)),
        "score_distribution": _score_distribution_figure(y_true, scores, which),
        "roc": _roc_figure(y_true, shown, scores, which),
        "reliability": _reliability_figure(y_true, probs, calibrated_probs),
    }
    return [_save(fig, os.path.join(out_dir, f"{prefix}{name}.png")) for name, fig in figures.items()]


def plot_training(log_history: Sequence[dict], out_path: str) -> str | None:
    """Training loss, and held-out loss / accuracy / macro-F1 / nDCG beside their chance lines, over steps, as one
    PNG at ``out_path``.

    ``log_history`` is a HF Trainer ``state.log_history``. Returns ``out_path``, or
    None (nothing written) when it holds no loss or eval metric to plot.
    """
    fig = training_figure(log_history)
    if fig is None:
        return None
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    return _save(fig, out_path)


def training_figure(log_history: Sequence[dict]) -> Figure | None:
    """The figure :func:`plot_training` saves (None when there is nothing to plot)."""
    series = training_series(log_history)
    if not any(key in series for key in ("loss", "eval_loss", *HELD_OUT_METRICS)):
        return None
    metric_keys = [key for key in HELD_OUT_METRICS if key in series]
    has_loss = "loss" in series or "eval_loss" in series
    n_panels = int(has_loss) + int(bool(metric_keys))
    fig = Figure(figsize=(PANEL[0] * n_panels, PANEL[1]), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(1, n_panels)))
    style = {"loss": ("training loss", "tab:blue", None), "eval_loss": ("held-out loss", "tab:red", "o"),
             "eval_accuracy": ("held-out accuracy", "tab:green", "o"),
             "eval_macro_f1": ("held-out macro-F1", "tab:purple", "o"),
             "eval_ndcg": ("held-out nDCG (ESCI task 1)", "tab:orange", "o")}
    panels = []
    if has_loss:
        panels.append(([k for k in ("loss", "eval_loss") if k in series], "cross-entropy", "loss"))
    if metric_keys:
        panels.append((metric_keys, "held-out metric", "held-out accuracy / macro-F1 / nDCG"))
    for ax, (keys, ylabel, title) in zip(axes, panels):
        for key in keys:
            label, color, marker = style[key]
            steps, values = series[key]
            ax.plot(steps, values, color=color, marker=marker, markersize=3, linewidth=1.2, label=label)
            chance_key, chance_label = CHANCE_LINES.get(key, (None, None))
            if chance_key in series:  # the same held-out split every time: one level
                ax.axhline(series[chance_key][1][-1], color=color, linestyle="--", linewidth=1,
                           label=f"{chance_label}: {series[chance_key][1][-1]:.3f}")
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.set_xlim(left=0)  # both panels on the run's step axis, even with one evaluation at the end
        if keys is metric_keys:
            ax.set_ylim(0, 1)  # the full range, so a small wobble does not look like a trend
        # Trained metrics sit near the top of [0, 1]: keep the legend off them.
        ax.legend(fontsize=7, loc="lower right" if keys is metric_keys else "best")
    return fig
