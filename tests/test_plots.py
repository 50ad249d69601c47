"""plots.py: hand-computed numbers behind the figures, and the PNG files themselves."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from tiny_reranker import calibration, plots
from tiny_reranker.calibration import expected_calibration_error
from tiny_reranker.metrics import roc_auc

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 150_000  # the figures go into the README


def png_size(path: str) -> tuple[int, int]:
    """(width, height) in pixels, read from the IHDR chunk that follows the 8-byte signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def assert_small_png(path: str) -> None:
    width, height = png_size(path)
    assert 200 <= width <= 1000 and 200 <= height <= 600, (path, width, height)
    assert os.path.getsize(path) < MAX_PNG_BYTES, (path, os.path.getsize(path))


def fake_eval(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities that lean towards the true class, so every figure has something to show."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, size=n)
    logits = rng.normal(size=(n, 4))
    logits[np.arange(n), y] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


# ---------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------
def test_row_normalise_rows_sum_to_one_and_empty_row_stays_zero():
    cm = np.array([[3, 1, 0, 0], [0, 0, 0, 0], [1, 1, 2, 0], [0, 0, 0, 5]])
    norm = plots.row_normalise(cm)
    np.testing.assert_allclose(norm.sum(axis=1), [1, 0, 1, 1])
    np.testing.assert_allclose(norm[0], [0.75, 0.25, 0, 0])
    np.testing.assert_allclose(norm[2], [0.25, 0.25, 0.5, 0])


def test_top_class_confidence_and_correctness():
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.1, 0.1, 0.2, 0.6]])
    confidence, correct = plots.top_class(np.array([0, 2, 3]), probs)
    np.testing.assert_allclose(confidence, [0.7, 0.5, 0.6])
    assert correct.tolist() == [True, False, True]


def test_reliability_bins_hand_computed():
    # 4 bins: (0, .25], (.25, .5], (.5, .75], (.75, 1]. 0.5 sits on an edge and belongs to the bin below it.
    confidence = np.array([0.3, 0.3, 0.5, 0.9, 1.0])
    correct = np.array([1, 0, 0, 1, 1])
    accuracy, mean_conf, count = plots.reliability_bins(confidence, correct, n_bins=4)
    assert count.tolist() == [0, 3, 0, 2]
    np.testing.assert_allclose(accuracy[[1, 3]], [1 / 3, 1.0])
    np.testing.assert_allclose(mean_conf[[1, 3]], [1.1 / 3, 0.95])
    assert np.isnan(accuracy[[0, 2]]).all() and np.isnan(mean_conf[[0, 2]]).all()
    assert plots.reliability_bins is calibration.reliability_bins  # the figure draws the bins the ECE uses
    # The same rows as probabilities (argmax = first maximum): ECE = (3 * |1/3 - 1.1/3| + 2 * |1 - 0.95|) / 5
    probs = np.array([[0.3, 0.3, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 0, 0], [0.9, 0.1, 0, 0], [1.0, 0, 0, 0]])
    assert expected_calibration_error(probs, np.array([0, 1, 1, 0, 0]), n_bins=4) == pytest.approx(0.04)


def test_reliability_bins_default_is_fifteen_and_zero_goes_to_first_bin():
    accuracy, _, count = plots.reliability_bins(np.array([0.0, 0.05, 0.99]), np.array([0, 1, 1]))
    assert len(count) == 15
    assert count[0] == 2 and count[14] == 1
    assert accuracy[0] == 0.5


def test_ece_zero_when_calibrated_and_for_no_examples():
    half = np.array([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert expected_calibration_error(half, np.array([0, 1])) == 0.0
    assert expected_calibration_error(np.zeros((0, 4)), np.array([], dtype=int)) == 0.0


def test_roc_points_hand_computed_with_a_tie():
    # Sorted by score: 0.9 P | 0.8 N, 0.8 P (a tie: one step) | 0.1 N
    fpr, tpr = plots.roc_points(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.8, 0.1]))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])


def test_roc_points_area_matches_metrics_roc_auc():
    rng = np.random.default_rng(1)
    positive = rng.random(300) < 0.3
    score = np.round(rng.random(300) + 0.3 * positive, 1)  # rounding makes many ties
    fpr, tpr = plots.roc_points(positive, score)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(roc_auc(positive, score))


HISTORY = [
    {"loss": 1.40, "grad_norm": 3.0, "learning_rate": 1e-4, "epoch": 0.1, "step": 10},
    {"loss": 1.10, "grad_norm": 2.0, "learning_rate": 9e-5, "epoch": 0.2, "step": 20},
    {"eval_loss": 1.05, "eval_accuracy": 0.55, "eval_macro_f1": 0.40, "eval_runtime": 1.0, "epoch": 0.2, "step": 20},
    {"loss": 0.90, "epoch": 0.3, "step": 30},
    {"loss": float("nan"), "epoch": 0.35, "step": 35},
    {"eval_loss": 0.95, "eval_accuracy": 0.62, "eval_macro_f1": 0.48, "epoch": 0.4, "step": 40},
    {"train_runtime": 12.0, "train_loss": 1.13, "epoch": 0.4, "step": 40},
]


def test_training_series_reads_trainer_logs_and_skips_summary_and_nan():
    series = plots.training_series(HISTORY)
    assert set(series) == {"loss", "eval_loss", "eval_accuracy", "eval_macro_f1"}
    steps, values = series["loss"]
    assert steps.tolist() == [10, 20, 30]
    np.testing.assert_allclose(values, [1.40, 1.10, 0.90])
    assert series["eval_macro_f1"][0].tolist() == [20, 40]
    np.testing.assert_allclose(series["eval_accuracy"][1], [0.55, 0.62])


def test_training_curves_draw_the_majority_class_and_random_order_lines():
    history = [{**e, "eval_majority_accuracy": 0.47, "eval_ndcg": 0.9 + e["step"] / 1000, "eval_ndcg_random": 0.77}
               if "eval_loss" in e else e for e in HISTORY]
    fig = plots.training_figure(history)
    metric_panel = fig.axes[1]
    levels = {line.get_label().split(":")[0]: set(np.asarray(line.get_ydata(), float).round(3).tolist())
              for line in metric_panel.get_lines()}
    assert levels["majority class"] == {0.47} and levels["nDCG of a random order"] == {0.77}
    assert levels["held-out accuracy"] == {0.55, 0.62}
    assert "majority class" not in {line.get_label() for line in fig.axes[0].get_lines()}  # not on the loss panel


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------
def test_plot_training_writes_a_small_png(tmp_path):
    out = plots.plot_training(HISTORY, str(tmp_path / "sub" / "training.png"))
    assert out == str(tmp_path / "sub" / "training.png")
    assert_small_png(out)


def test_plot_training_without_eval_logs_still_plots(tmp_path):
    out = plots.plot_training([e for e in HISTORY if "eval_loss" not in e], str(tmp_path / "t.png"))
    assert_small_png(out)


@pytest.mark.parametrize("history", [[], [{"train_runtime": 3.0, "train_loss": 1.2, "epoch": 1.0, "step": 5}]])
def test_plot_training_returns_none_and_writes_nothing_when_nothing_to_plot(tmp_path, history):
    assert plots.plot_training(history, str(tmp_path / "training.png")) is None
    assert os.listdir(tmp_path) == []


def test_plot_eval_writes_four_small_pngs(tmp_path):
    y, probs = fake_eval()
    calibrated = np.sqrt(probs) / np.sqrt(probs).sum(axis=1, keepdims=True)  # a softer copy, as T > 1 gives
    paths = plots.plot_eval(y, probs, str(tmp_path / "figs"), prefix="test_", calibrated_probs=calibrated)
    names = ["test_confusion_matrix.png", "test_score_distribution.png", "test_roc.png", "test_reliability.png"]
    assert [os.path.basename(p) for p in paths] == names
    assert sorted(os.listdir(tmp_path / "figs")) == sorted(names)  # no stray temp files
    for path in paths:
        assert_small_png(path)


def test_plot_eval_survives_a_missing_class(tmp_path):
    # Only I rows: both ROC curves are undefined and must be skipped, not crash.
    _, probs = fake_eval(n=20)
    paths = plots.plot_eval(np.full(20, 3), probs, str(tmp_path))
    assert len(paths) == 4
    for path in paths:
        assert_small_png(path)


def test_plot_eval_empty_input_writes_nothing(tmp_path):
    assert plots.plot_eval(np.array([], dtype=int), np.zeros((0, 4)), str(tmp_path / "figs")) == []
    assert not (tmp_path / "figs").exists()


def test_plot_eval_rejects_mismatched_shapes(tmp_path):
    y, probs = fake_eval(n=10)
    with pytest.raises(ValueError, match="probs must be"):
        plots.plot_eval(y[:9], probs, str(tmp_path))
    with pytest.raises(ValueError, match="calibrated_probs"):
        plots.plot_eval(y, probs, str(tmp_path), calibrated_probs=probs[:, :3])
