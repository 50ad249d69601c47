"""From four label logits to what users rank by: the one softmax, the score, and the output columns.

Pure numpy; every scoring path (eval.py, predict.py, the :class:`~tiny_reranker.reranker.Reranker` API,
train.py's held-out metrics and calibration) ends here, so a temperature is applied the same way
everywhere and the same pair gets the same numbers wherever it is scored::

    P = softmax(logits / T)                       # [N, 4], LABELS order, float64
    score = (3·P(E) + 2·P(S) + 1·P(C)) / 3        # in [0, 1], the default ranking
    expected_gain = P(E) + 0.1·P(S) + 0.01·P(C)   # in [0, 1], ranking by ESCI's nDCG gains (rank_by="expected_gain")
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from esci_dataset import LABELS, NDCG_GAINS, RANK_BY, SCORE_WEIGHTS, ESCIDataError

PROB_COLUMNS = tuple(f"p_{label}" for label in LABELS)
OUTPUT_COLUMNS = (*PROB_COLUMNS, "score", "pred_label")  # the predict.py output contract


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row softmax of ``logits / temperature`` in float64; ``logits: [..., C]``. No checks (see
    :func:`probs_from_logits`), so the calibration search can call it thousands of times."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)  # exp never overflows
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


_SHOW_BAD_ROWS = 5  # rows named in the non-finite-logits error


def probs_from_logits(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` over the last axis, in float64. ``logits: [N, 4]`` -> ``[N, 4]``.

    Every scoring path ends here, so a temperature is applied the same way everywhere, and
    non-finite logits are refused here (ESCIDataError): their probabilities would be NaN, and the
    label and rank taken from them arbitrary.
    """
    logits = np.asarray(logits)
    bad = np.flatnonzero(~np.isfinite(logits).all(axis=-1))
    if len(bad):
        rows = ", ".join(map(str, bad[:_SHOW_BAD_ROWS].tolist())) + (", ..." if len(bad) > _SHOW_BAD_ROWS else "")
        raise ESCIDataError(
            f"the model gave non-finite label logits (NaN or inf) for {len(bad)} of {len(logits)} pairs "
            f"(0-based input rows {rows}); no scores were produced. Its weights hold NaN or inf (e.g. an adapter "
            f"saved after training diverged), or the dtype overflowed: check the adapter, or try --dtype fp32.")
    return softmax(logits, temperature)


def scores_from_probs(probs) -> np.ndarray:
    """Ranking score in [0, 1]: ``(3·P(E) + 2·P(S) + 1·P(C) + 0·P(I)) / 3``. ``probs: [..., 4]`` -> ``[...]``.

    The one score function: numpy in, float64 out (torch tensors are converted).
    """
    weights = np.array([SCORE_WEIGHTS[label] for label in LABELS], dtype=np.float64)
    probs = probs.detach().cpu().numpy() if hasattr(probs, "detach") else np.asarray(probs)
    return probs.astype(np.float64) @ weights / weights.max()


def expected_gains(probs) -> np.ndarray:
    """Expected ESCI nDCG gain in [0, 1]: ``P(E) + 0.1·P(S) + 0.01·P(C)``. ``probs: [..., 4]`` -> ``[...]``.

    Sorting a query's items by it maximises the expected DCG under ESCI's gains (DCG is linear in the gains
    and its discounts decrease), when the probabilities are calibrated. The default score weights S and C
    far more (3:2:1), as a shop that values substitutes and complements would.
    """
    gains = np.array([NDCG_GAINS[label] for label in LABELS], dtype=np.float64)
    probs = probs.detach().cpu().numpy() if hasattr(probs, "detach") else np.asarray(probs)
    return probs.astype(np.float64) @ gains


def check_rank_by(rank_by: str) -> str:
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {', '.join(RANK_BY)}, got {rank_by!r}")
    return rank_by


def prediction_columns(probs: np.ndarray, rank_by: str = "score") -> dict[str, np.ndarray]:
    """``probs [N, 4]`` -> columns ``p_E, p_S, p_C, p_I, score, pred_label`` (the predict.py output contract);
    with ``rank_by="expected_gain"`` also ``expected_gain``, after ``score``."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, len(LABELS))
    columns = {col: probs[:, j] for j, col in enumerate(PROB_COLUMNS)}
    columns["score"] = scores_from_probs(probs)
    if check_rank_by(rank_by) == "expected_gain":
        columns["expected_gain"] = expected_gains(probs)
    columns["pred_label"] = np.asarray(LABELS, dtype=object)[probs.argmax(axis=1)]
    return columns


def prediction_records(probs: np.ndarray, rank_by: str = "score") -> list[dict]:
    """``probs [N, 4]`` -> N dicts ``{p_E, p_S, p_C, p_I, score, pred_label}`` of plain Python types (and
    ``expected_gain`` with ``rank_by="expected_gain"``)."""
    columns = prediction_columns(probs, rank_by)
    return [{name: (str(values[i]) if name == "pred_label" else float(values[i])) for name, values in columns.items()}
            for i in range(len(probs))]


def rank_results(items: Sequence[str], preds: Sequence[dict], top_k: int | None = None,
                 rank_by: str = "score") -> list[dict]:
    """``[{index, item, **pred}]`` by descending ``pred[rank_by]``; ties keep input order (stable sort)."""
    check_rank_by(rank_by)
    results = [{"index": i, "item": item, **pred} for i, (item, pred) in enumerate(zip(items, preds))]
    results.sort(key=lambda r: -r[rank_by])
    return results[:top_k] if top_k is not None else results
