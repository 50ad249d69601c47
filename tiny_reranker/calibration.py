"""Calibration: whether the four class probabilities mean what they say, and one temperature that fixes them.

Pure functions of numpy arrays: ``probs`` are ``[N, C]`` rows that sum to 1, ``logits`` ``[N, C]``,
``y_true`` ints ``[N]``. The ECE and the reliability diagram (plots.py) share :func:`reliability_bins`;
train.py fits the temperature on held-out pairs, eval.py reports ECE/Brier/NLL before and after it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from tiny_reranker.scoring import softmax

ECE_BINS = 15  # Guo et al. 2017's choice; the most common in papers, so our ECE is comparable
_EPS = 1e-12  # clip before log: fp16/bf16 softmax can underflow to exactly 0


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of ``confidence`` over [0, 1]: (accuracy, mean confidence, count), each ``[n_bins]``.

    Bins are right-closed, ``(lo, hi]`` as in Guo et al. 2017, with 0 going to the first bin.
    Empty bins have count 0 and NaN accuracy and confidence. The ECE and the reliability
    diagram (plots.py) both use these bins.
    """
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty bins become NaN on purpose
        accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / count
        mean_conf = np.bincount(idx, weights=confidence, minlength=n_bins) / count
    return accuracy, mean_conf, count


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of the top-class probability: the count-weighted mean over :func:`reliability_bins` of
    |accuracy - mean confidence|. 0 for no rows."""
    probs, y_true = np.asarray(probs, dtype=float), np.asarray(y_true)
    if len(y_true) == 0:
        return 0.0
    accuracy, mean_conf, count = reliability_bins(probs.max(axis=1), probs.argmax(axis=1) == y_true, n_bins)
    filled = count > 0
    return float((count[filled] * np.abs(accuracy[filled] - mean_conf[filled])).sum() / len(y_true))


def brier_score(probs: np.ndarray, y_true: np.ndarray) -> float:
    """Multiclass Brier: mean over rows of sum over classes of (p - onehot)^2. 0 is perfect, 2 the worst."""
    probs = np.asarray(probs, dtype=float)
    onehot = np.eye(probs.shape[1])[np.asarray(y_true)]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def nll(probs: np.ndarray, y_true: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (natural log)."""
    probs = np.asarray(probs, dtype=float)
    p_true = probs[np.arange(len(probs)), np.asarray(y_true)]
    return float(-np.log(np.clip(p_true, _EPS, None)).mean())


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The single T > 0 that minimises the NLL of ``softmax(logits / T)``.

    Log-probabilities work as logits (softmax ignores a per-row shift): pass ``np.log(probs)``.
    Fit on held-out rows, not the rows you then report on, or the "after" numbers flatter.
    """
    logits = np.asarray(logits, dtype=float)
    # Search log T: T stays positive and the NLL is better conditioned. T in TEMPERATURE_RANGE is ample.
    # The NLL is convex in 1/T, so it has one minimum over log T and a golden-section search finds it
    # (scipy's minimize_scalar would too, but scipy is not a runtime dependency; tests hold ours to it).
    log_t = _golden_section_minimum(lambda log_t: nll(softmax(logits, np.exp(log_t)), y_true),
                                    *np.log(TEMPERATURE_RANGE), tol=1e-6)
    return float(np.exp(log_t))


TEMPERATURE_RANGE = (0.01, 100.0)  # where fit_temperature searches


def at_search_bound(temperature: float) -> bool:
    """Whether a fitted T sits on an end of :data:`TEMPERATURE_RANGE` (within 1%): the NLL kept falling
    out of the range, so the data support no finite T. That happens when every row is classified
    correctly (T -> 0 sharpens them all) or the logits carry no signal (T -> infinity)."""
    low, high = TEMPERATURE_RANGE
    return temperature <= low * 1.01 or temperature >= high / 1.01


_INV_PHI = (np.sqrt(5.0) - 1.0) / 2.0


def _golden_section_minimum(f: Callable[[float], float], low: float, high: float, tol: float) -> float:
    """The x in [low, high] that minimises a unimodal ``f``, to within ``tol`` (a boundary if f is monotone)."""
    a, b = low, high
    c, d = b - _INV_PHI * (b - a), a + _INV_PHI * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:  # the minimum lies in [a, d]
            b, d, fd = d, c, fc
            c = b - _INV_PHI * (b - a)
            fc = f(c)
        else:  # ... in [c, b]
            a, c, fc = c, d, fd
            d = a + _INV_PHI * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def temperature_scaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / T)``: the probabilities a temperature-scaled model would give."""
    return softmax(np.log(np.clip(np.asarray(probs, dtype=float), _EPS, None)), temperature)


def calibration_before_after(probs: np.ndarray, y_true: np.ndarray, temperature: float) -> dict[str, float]:
    """ECE, Brier and NLL before and after scaling ``probs`` by ``temperature``."""
    after = temperature_scaled(probs, temperature)
    out = {"temperature": float(temperature)}
    for name, fn in (("ece", expected_calibration_error), ("brier", brier_score), ("nll", nll)):
        out[f"{name}_before"], out[f"{name}_after"] = fn(probs, y_true), fn(after, y_true)
    return out
