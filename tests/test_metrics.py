"""Metrics and calibration against hand-computed values."""

import json

import numpy as np
import pytest

from tiny_reranker.calibration import (
    brier_score,
    calibration_before_after,
    expected_calibration_error,
    fit_temperature,
    nll,
)
from tiny_reranker.metrics import (
    breakdown,
    classification_metrics,
    confusion_matrix,
    esci_tasks,
    evaluation_report,
    majority_baseline,
    mean_ndcg,
    ndcg,
    per_class_report,
    roc_auc,
    task1_ranking_ndcg,
    task2_esci_f1,
    task3_substitute_micro_f1,
    worst_queries,
)
from tiny_reranker.report import format_report
from tiny_reranker.scoring import scores_from_probs, softmax

E, S, C, I = 0, 1, 2, 3


def test_confusion_and_f1_by_hand():
    y_true = np.array([E, E, E, S, S, I])
    y_pred = np.array([E, E, S, S, E, I])
    cm = confusion_matrix(y_true, y_pred)
    assert cm.tolist() == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    rep = per_class_report(y_true, y_pred)
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


def test_ndcg_averages_gains_over_tied_scores():
    # All three tied: each rank position gets the mean gain (1 + 0 + 0.1) / 3.
    gains, scores = np.array([1.0, 0.0, 0.1]), np.full(3, 0.5)
    dcg = 1.1 / 3 * (1.0 + 1.0 / np.log2(3) + 1.0 / np.log2(4))
    idcg = 1.0 + 0.1 / np.log2(3)
    assert ndcg(gains, scores) == pytest.approx(dcg / idcg)


def test_mean_ndcg_does_not_depend_on_row_order_within_tied_scores():
    # One E among three I, all tied. Ranking by row order (the old behaviour) gave 1.0 with E first
    # and 0.5 with E last; averaging over the tie gives the same value for every order.
    groups = np.array(["q"] * 4 + ["r"] * 2)
    y_true = np.array([E, I, I, I, S, I])
    scores = np.array([0.4, 0.4, 0.4, 0.4, 0.9, 0.1])
    expected = (0.25 * (1.0 + 1.0 / np.log2(3) + 0.5 + 1.0 / np.log2(5)) + 1.0) / 2
    value, n = mean_ndcg(groups, y_true, scores)
    assert n == 2 and value == pytest.approx(expected)
    for perm in ([3, 1, 2, 0, 4, 5], [5, 2, 0, 4, 3, 1], [1, 2, 3, 0, 5, 4]):
        assert mean_ndcg(groups[perm], y_true[perm], scores[perm]) == (value, n)


def test_one_item_query_with_a_relevant_item_counts_as_perfect():
    # The rule the old code had: only queries without a relevant item are skipped.
    value, n = mean_ndcg(np.array(["a", "b", "b"]), np.array([E, E, I]), np.array([0.1, 0.2, 0.9]))
    assert n == 2 and value == pytest.approx((1.0 + 1.0 / np.log2(3)) / 2)


def test_worst_queries_lowest_ndcg_first_with_item_counts():
    groups = np.array(["a", "a", "b", "b", "c", "c", "c", "d"])
    y_true = np.array([E, I, I, E, I, I, E, I])
    scores = np.array([0.9, 0.1, 0.9, 0.1, 0.9, 0.8, 0.1, 0.5])
    # a: E first -> 1.0; b: E second -> 1/log2(3); c: E third -> 1/log2(4) = 0.5; d: no relevant item, skipped.
    worst = worst_queries(groups, y_true, scores, k=2)
    assert [(w["query_id"], w["n_items"]) for w in worst] == [("c", 3), ("b", 2)]
    assert [w["ndcg"] for w in worst] == pytest.approx([0.5, 1.0 / np.log2(3)])
    assert [w["query_id"] for w in worst_queries(groups, y_true, scores, k=10)] == ["c", "b", "a"]


def test_esci_tasks_by_hand():
    y_true = np.array([E, S, S, C, I, E])
    y_pred = np.array([E, S, E, C, C, E])
    # Task 2: 4 of 6 right. F1: E 0.8 (p 2/3, r 1), S 2/3 (p 1, r 1/2), C 2/3 (p 1/2, r 1), I 0.
    assert task2_esci_f1(y_true, y_pred) == pytest.approx({"micro_f1": 4 / 6, "macro_f1": (0.8 + 2 / 3 + 2 / 3) / 4})
    # Task 3: S vs not-S agrees on every row but the S predicted as E.
    assert task3_substitute_micro_f1(y_true, y_pred) == pytest.approx(5 / 6)
    # Task 1: q1 ranks E, S, S (ideal); q2 ranks C, E, I.
    groups = np.array(["q1"] * 3 + ["q2"] * 3)
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.3])
    q2 = (0.01 + 1.0 / np.log2(3)) / (1.0 + 0.01 / np.log2(3))
    assert task1_ranking_ndcg(groups, y_true, scores) == pytest.approx((1.0 + q2) / 2)
    tasks = esci_tasks(y_true, y_pred, scores, groups)
    assert tasks == pytest.approx({"task1_ranking_ndcg": (1.0 + q2) / 2, "task2_esci_micro_f1": 4 / 6,
                                   "task2_esci_macro_f1": (0.8 + 2 / 3 + 2 / 3) / 4,
                                   "task3_substitute_micro_f1": 5 / 6, "task3_majority_micro_f1": 4 / 6})
    assert esci_tasks(y_true, y_pred, scores, None)["task1_ranking_ndcg"] is None


def test_softmax_with_temperature():
    assert softmax(np.array([[0.0, np.log(2.0)]])) == pytest.approx(np.array([[1 / 3, 2 / 3]]))
    assert softmax(np.array([[0.0, 2 * np.log(2.0)]]), temperature=2.0) == pytest.approx(np.array([[1 / 3, 2 / 3]]))
    assert softmax(np.array([[1000.0, 1000.0]])) == pytest.approx(np.array([[0.5, 0.5]]))  # no overflow


def test_expected_calibration_error_by_hand():
    probs = np.array([[0.9, 0.05, 0.03, 0.02],   # conf 0.9, right
                      [0.05, 0.9, 0.03, 0.02],   # conf 0.9, wrong
                      [0.5, 0.2, 0.2, 0.1],      # conf 0.5, right
                      [0.3, 0.25, 0.25, 0.2]])   # conf 0.3, wrong
    y_true = np.array([E, E, E, I])
    # 5 bins: (0.8,1] acc 1/2 conf 0.9 weight 2/4; (0.4,0.6] acc 1 conf 0.5 weight 1/4; (0.2,0.4] acc 0 conf 0.3 weight 1/4.
    assert expected_calibration_error(probs, y_true, n_bins=5) == pytest.approx(0.5 * 0.4 + 0.25 * 0.5 + 0.25 * 0.3)
    # 0.9 and 0.95 share a bin of width 0.2 but not of width 1/15 (edges 0.867, 0.933, 1).
    two = np.array([[0.9, 0.1, 0.0, 0.0], [0.95, 0.05, 0.0, 0.0]])
    assert expected_calibration_error(two, np.array([E, S]), n_bins=5) == pytest.approx(abs(1 - 1.85) / 2)
    assert expected_calibration_error(two, np.array([E, S])) == pytest.approx((0.1 + 0.95) / 2)
    # Bins are (lo, hi], as in Guo et al. 2017: with 2 bins, confidence 0.5 is in the lower one.
    edge = np.array([[0.5, 0.5, 0.0, 0.0], [0.75, 0.25, 0.0, 0.0]])
    assert expected_calibration_error(edge, np.array([E, S]), n_bins=2) == pytest.approx((0.5 + 0.75) / 2)
    # Confidence 0.5 and right half the time: calibrated.
    half = np.array([[0.5, 0.5, 0.0, 0.0], [0.5, 0.3, 0.2, 0.0]])
    assert expected_calibration_error(half, np.array([E, S])) == pytest.approx(0.0)


def test_brier_and_nll_by_hand():
    probs = np.array([[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]])
    y_true = np.array([E, C])
    # row 1: 0.3² + 0.2² + 0.1² = 0.14; row 2: 3·0.25² + 0.75² = 0.75.
    assert brier_score(probs, y_true) == pytest.approx((0.14 + 0.75) / 2)
    assert nll(probs, y_true) == pytest.approx(-(np.log(0.7) + np.log(0.25)) / 2)
    assert brier_score(np.eye(4), np.arange(4)) == 0.0


def _sampled_labels(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One label per row drawn from that row's distribution."""
    return (rng.random(len(probs))[:, None] > probs.cumsum(axis=1)).sum(axis=1)


def test_fit_temperature_recovers_over_confidence_and_leaves_calibrated_logits_alone():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, size=(4000, 4))
    y_true = _sampled_labels(softmax(logits), rng)  # softmax(logits) is the true distribution: T = 1
    assert fit_temperature(logits, y_true) == pytest.approx(1.0, abs=0.1)
    sharp = 3.0 * logits  # three times over-confident
    t = fit_temperature(sharp, y_true)
    assert t == pytest.approx(3.0, rel=0.1)
    assert nll(softmax(sharp, t), y_true) < nll(softmax(sharp), y_true) - 0.1
    # Log-probabilities are valid logits.
    assert fit_temperature(np.log(softmax(sharp)), y_true) == pytest.approx(t, rel=1e-3)


def test_calibration_before_after_by_hand():
    probs = np.array([[0.8, 0.1, 0.05, 0.05]])
    c = calibration_before_after(probs, np.array([E]), temperature=2.0)
    # T = 2 on log-probs: p ∝ sqrt(p).
    root = np.sqrt(probs[0])
    assert c["temperature"] == 2.0
    assert c["nll_before"] == pytest.approx(-np.log(0.8))
    assert c["nll_after"] == pytest.approx(-np.log(root[0] / root.sum()))
    assert c["ece_before"] == pytest.approx(0.2) and c["ece_after"] == pytest.approx(1 - root[0] / root.sum())


def _report(**kwargs) -> dict:
    y_true = np.array([E, S, C, I, E])
    probs = np.eye(4)[[E, E, C, I, E]] * 0.7 + 0.075
    return evaluation_report(y_true, probs, scores_from_probs(probs), np.array([1, 1, 1, 2, 2]), **kwargs)


def test_evaluation_report_new_sections_are_json_ready():
    report = _report(temperature=0.5)
    # Right rows have confidence 0.775; 4 of 5 right, all in one bin: |0.8 - 0.775|.
    assert report["ece"] == pytest.approx(0.025)
    assert report["esci_tasks"]["task2_esci_micro_f1"] == pytest.approx(0.8)
    assert report["esci_tasks"]["task3_substitute_micro_f1"] == pytest.approx(0.8)  # the one S was predicted E
    # Query 1: E and S rows got identical probabilities (a tie), C ranks third; query 2 is ranked ideally.
    q1 = (0.55 * (1 + 1 / np.log2(3)) + 0.01 / 2) / (1 + 0.1 / np.log2(3) + 0.01 / 2)
    assert report["esci_tasks"]["task1_ranking_ndcg"] == pytest.approx((q1 + 1.0) / 2) == report["ndcg"]
    assert report["calibration"]["temperature"] == 0.5
    assert report["calibration"]["ece_before"] == report["ece"]
    assert report["worst_queries"][0]["query_id"] == 1  # int query ids stay ints
    json.dumps(report)  # numpy scalars would raise here
    assert "calibration" not in _report()


def test_format_report_header_tasks_calibration_and_worst_queries():
    text = format_report(_report(temperature=0.5), adapter="outputs/lora")
    assert text.startswith("model: adapter outputs/lora\n")
    assert "E = exact, S = substitute, C = complement, I = irrelevant" in text
    assert "score = (3·P(E) + 2·P(S) + 1·P(C)) / 3" in text
    for name in ("task 1 query-product ranking", "task 2 E/S/C/I classification", "task 3 substitute identification"):
        assert name in text
    assert "ECE 0.0250" in text and "Brier" in text and "T=0.500" in text
    assert "worst queries by nDCG" in text


def test_format_report_says_which_adapter():
    report = _report()
    assert "zero-shot (no adapter loaded)" in format_report(report, adapter=None)
    assert "adapter not recorded" in format_report(report)
    # eval.py stores its arguments under "config"; the header reads the adapter from there.
    assert "zero-shot (no adapter loaded)" in format_report({**report, "config": {"lora_model": None}})
    assert "model: adapter out/a" in format_report({**report, "config": {"lora_model": "out/a"}})
    assert "model: adapter out/b" in format_report({**report, "adapter": "out/b", "config": {"lora_model": "out/a"}})


def test_held_out_metrics_rank_each_query_by_the_score_of_its_logits():
    """train.py's periodic eval: accuracy beside the majority class, and ESCI task 1 nDCG per held-out query."""
    from transformers import EvalPrediction

    from tiny_reranker.trainer import held_out_metrics

    groups = np.array([7, 7, 9, 9, 11])
    labels = np.array([E, I, S, C, I])
    logits = np.array([[0.0, 0.0, 0.0, 3.0],   # query 7: its E item looks irrelevant,
                       [3.0, 0.0, 0.0, 0.0],   #          its I item looks exact: E ends up at rank 2
                       [0.0, 3.0, 0.0, 0.0],   # query 9: S above C, the ideal order
                       [0.0, 0.0, 3.0, 0.0],
                       [0.0, 0.0, 0.0, 3.0]])  # query 11: no relevant item, so no nDCG
    metrics = held_out_metrics(groups)(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics["ndcg"] == pytest.approx((1.0 / np.log2(3) + 1.0) / 2)
    assert metrics["accuracy"] == pytest.approx(3 / 5) and metrics["majority_accuracy"] == pytest.approx(2 / 5)
    no_gain = held_out_metrics(groups[[4]])(EvalPrediction(predictions=logits[[4]], label_ids=labels[[4]]))
    assert "ndcg" not in no_gain  # undefined, not a made-up 0 or 1
    with pytest.raises(RuntimeError, match="for 4 pairs, but the split has 5"):
        held_out_metrics(groups)(EvalPrediction(predictions=logits[:4], label_ids=labels[:4]))


def test_breakdown_gives_each_slice_its_own_metrics_by_hand():
    by = np.array(["us", "us", "us", "us", "jp", "jp"])
    groups = np.array([1, 1, 2, 2, 3, 3])
    y_true = np.array([E, I, E, S, I, I])
    y_pred = np.array([E, I, S, S, I, E])
    scores = np.array([0.9, 0.1, 0.2, 0.8, 0.3, 0.6])  # query 2 ranks its S above its E
    out = breakdown(by, y_true, y_pred, scores, groups)
    assert list(out) == ["jp", "us"]
    assert out["us"]["n"] == 4 and out["us"]["accuracy"] == pytest.approx(3 / 4)
    assert out["us"]["majority_accuracy"] == pytest.approx(2 / 4)
    idcg = 1.0 + 0.1 / np.log2(3)
    assert out["us"]["ndcg"] == pytest.approx((1.0 + (0.1 + 1.0 / np.log2(3)) / idcg) / 2)
    assert out["jp"]["accuracy"] == pytest.approx(1 / 2) and out["jp"]["ndcg"] is None  # only I items: undefined
    assert breakdown(by, y_true, y_pred, scores, None)["us"]["ndcg"] is None


def test_random_order_ndcg_is_the_exact_expectation_over_permutations():
    """Hand-computed: gains [1, 0] over two ranks give E[DCG] = (1 + 1/log2(3)) / 2 and IDCG 1. A 3-item query
    [E, S, I] agrees with the mean over all six orders; queries without a relevant item are left out, as in nDCG."""
    from itertools import permutations

    from tiny_reranker.metrics import random_order_ndcg

    assert random_order_ndcg(np.array([0, 0]), np.array([E, I])) == pytest.approx((1 + 1 / np.log2(3)) / 2)
    y = np.array([E, S, I])
    exhaustive = np.mean([ndcg(np.array([1.0, 0.1, 0.0]), -np.array(order, dtype=float))
                          for order in permutations(range(3))])
    groups = np.array([7, 7, 7, 8, 8])  # query 8 has only I items: undefined, skipped
    assert random_order_ndcg(groups, np.r_[y, [I, I]]) == pytest.approx(exhaustive)
    assert random_order_ndcg(groups[:3], y, k=1) == pytest.approx((1.0 + 0.1 + 0.0) / 3 / 1.0)


def test_random_order_ndcg_matches_a_monte_carlo_estimate_on_esci_like_queries():
    """30 queries of 5-25 items with ESCI's label mix: the exact expectation equals the mean nDCG of 3,000 random
    orders (standard error ~0.0005), for nDCG and nDCG@10."""
    from tiny_reranker.metrics import mean_ndcg, random_order_ndcg

    rng = np.random.default_rng(0)
    sizes = rng.integers(5, 26, 30)
    groups = np.repeat(np.arange(30), sizes)
    y_true = rng.choice([E, S, C, I], size=len(groups), p=[0.65, 0.22, 0.03, 0.10])
    for k in (None, 10):
        draws = [mean_ndcg(groups, y_true, rng.random(len(groups)), k=k)[0] for _ in range(3000)]
        assert random_order_ndcg(groups, y_true, k=k) == pytest.approx(np.mean(draws), abs=0.002)
        assert np.std(draws) > 0.005  # orders differ: the estimate is a real average, not one value
