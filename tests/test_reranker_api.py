"""The Reranker API: same numbers as the eval path, input order kept, and defined edge cases."""

import os

import numpy as np
import pandas as pd
import pytest

from esci_dataset import LABELS, ESCIDataError, ESCIMultiClassRerankDataset
from tests.helpers import score_token_ids
from tiny_reranker.reranker import Reranker
from tiny_reranker.scoring import (
    PROB_COLUMNS,
    expected_gains,
    prediction_columns,
    prediction_records,
    rank_results,
    scores_from_probs,
)

MAX_LENGTH = 256  # the demo items fit; the long-text test goes past it on purpose
BATCH = 4


@pytest.fixture(scope="module")
def rr(tiny_model_dir, adapter_dir):
    return Reranker.from_pretrained(tiny_model_dir, adapter_dir, device="cpu", dtype="fp32", max_length=MAX_LENGTH, batch_size=BATCH)


@pytest.fixture(scope="module")
def pairs_df(mixed_pairs):
    return mixed_pairs.copy()


@pytest.fixture(scope="module")
def predictions(rr, pairs_df):
    return rr.predict(zip(pairs_df["query"], pairs_df["item_text"]))


def _probs(preds):
    return np.array([[p[c] for c in PROB_COLUMNS] for p in preds])


# ---------------------------------------------------------------------------
# One scoring path
# ---------------------------------------------------------------------------
def test_predict_equals_the_dataset_scoring_path_eval_uses(rr, pairs_df, predictions):
    ds = ESCIMultiClassRerankDataset(pairs_df, rr.tokenizer, MAX_LENGTH)
    token_ids = [ids.tolist() for ids in ds.input_ids]
    expected = score_token_ids(rr.model, token_ids, rr.tokenizer.pad_token_id, BATCH,
                               prefix_ids=rr.prefix_ids, max_batch_tokens=rr.max_batch_tokens)
    assert np.array_equal(_probs(predictions), expected)  # bit-identical, not just close
    full_prompts = score_token_ids(rr.model, token_ids, rr.tokenizer.pad_token_id, BATCH)
    assert abs(full_prompts - expected).max() < 1e-5  # prefix-KV reuse changes nothing (fp32)
    assert np.array_equal([p["score"] for p in predictions], scores_from_probs(expected))
    assert [p["pred_label"] for p in predictions] == [LABELS[i] for i in expected.argmax(1)]
    assert set(predictions[0]) == {*PROB_COLUMNS, "score", "pred_label"}


def test_eval_py_saved_scores_equal_predict(rr, tiny_model_dir, adapter_dir, pairs_df, predictions, tmp_path):
    import eval as eval_cli

    data, scores = tmp_path / "eval.parquet", tmp_path / "scores.parquet"
    pairs_df.to_parquet(data, index=False)
    rc = eval_cli.main(["--base_model", tiny_model_dir, "--lora_model", adapter_dir, "--dtype", "fp32", "--eval_file", str(data),
                        "--max_length", str(MAX_LENGTH), "--batch_size", str(BATCH), "--save_scores_path", str(scores),
                        "--metrics_path", str(tmp_path / "metrics.json")])
    assert rc == 0
    saved = pd.read_parquet(scores)
    assert np.array_equal(saved[list(PROB_COLUMNS)].to_numpy(), _probs(predictions))
    assert np.array_equal(saved["score"].to_numpy(), [p["score"] for p in predictions])


def test_output_keeps_input_order_whatever_the_batching(rr, pairs_df, predictions):
    pairs = list(zip(pairs_df["query"], pairs_df["item_text"]))
    reversed_preds = rr.predict(pairs[::-1])[::-1]
    np.testing.assert_allclose(_probs(reversed_preds), _probs(predictions), rtol=0, atol=1e-6)
    one_by_one = Reranker(rr.model, rr.tokenizer, MAX_LENGTH, batch_size=1).predict(pairs[:4])
    np.testing.assert_allclose(_probs(one_by_one), _probs(predictions[:4]), rtol=0, atol=1e-6)


def test_rank_sorts_by_score_and_matches_predict(rr, pairs_df, predictions):
    query, items = pairs_df["query"][0], pairs_df["item_text"][:5].tolist()
    ranked = rr.rank(query, items)
    assert sorted(r["index"] for r in ranked) == list(range(5))
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    for r in ranked:
        assert r["item"] == items[r["index"]]
        assert r["score"] == pytest.approx(predictions[r["index"]]["score"], abs=1e-6)
    assert rr.rank(query, items, top_k=2) == ranked[:2]
    assert rr.rank(query, items, top_k=0) == []
    with pytest.raises(ValueError):
        rr.rank(query, items, top_k=-1)


def test_rank_results_ties_keep_input_order():
    preds = [{"score": s} for s in (0.5, 0.9, 0.5, 0.1)]
    assert [r["index"] for r in rank_results(list("abcd"), preds)] == [1, 0, 2, 3]


def test_expected_gain_hand_computed_and_it_can_rank_otherwise_than_the_score():
    either, substitute = [0.5, 0.0, 0.0, 0.5], [0.1, 0.9, 0.0, 0.0]
    np.testing.assert_allclose(expected_gains(np.array([either, substitute, [0, 0, 1.0, 0]])), [0.5, 0.19, 0.01])
    np.testing.assert_allclose(scores_from_probs(np.array([either, substitute])), [0.5, 0.7])
    preds = prediction_records(np.array([either, substitute]), rank_by="expected_gain")
    assert [r["index"] for r in rank_results(["a", "b"], preds)] == [1, 0]
    assert [r["index"] for r in rank_results(["a", "b"], preds, rank_by="expected_gain")] == [0, 1]
    with pytest.raises(ValueError, match="rank_by"):
        rank_results(["a"], preds[:1], rank_by="gain")


def test_rank_by_expected_gain_in_the_api(rr, pairs_df):
    query, items = pairs_df["query"][0], pairs_df["item_text"][:6].tolist()
    ranked = rr.rank(query, items, rank_by="expected_gain")
    gains = [r["expected_gain"] for r in ranked]
    assert gains == sorted(gains, reverse=True) and sorted(r["index"] for r in ranked) == list(range(6))
    probs = rr.predict_probs([query] * len(items), items)
    np.testing.assert_allclose(sorted(gains, reverse=True), sorted(expected_gains(probs), reverse=True), atol=1e-12)
    assert "expected_gain" in rr.predict([(query, items[0])], rank_by="expected_gain")[0]
    with pytest.raises(ValueError, match="rank_by"):
        rr.rank(query, items, rank_by="ndcg")


def test_prediction_columns_hand_computed():
    cols = prediction_columns(np.array([[1.0, 0, 0, 0], [0, 0, 0, 1.0], [0.25, 0.25, 0.25, 0.25], [0, 0.5, 0.5, 0]]))
    np.testing.assert_allclose(cols["score"], [1.0, 0.0, 0.5, 0.5])  # (3E + 2S + C) / 3
    assert list(cols["pred_label"]) == ["E", "I", "E", "S"]  # argmax; a tie goes to the first label
    assert prediction_columns(np.zeros((0, 4)))["score"].shape == (0,)


# ---------------------------------------------------------------------------
# Edge cases, as documented in the Reranker docstring
# ---------------------------------------------------------------------------
def test_empty_inputs_return_empty_results(rr):
    assert rr.predict([]) == []
    assert rr.rank("usb charger", []) == []
    assert rr.predict_probs([], []).shape == (0, len(LABELS))


def test_empty_strings_are_scored_as_given(rr):
    ids = rr.encode([""], [""])[0]
    assert len(ids) == rr.encoder.fixed_len + 2  # each empty slot is just its leading space
    preds = rr.predict([("", ""), ("usb charger", "   ")])
    assert len(preds) == 2
    for p in preds:
        assert sum(p[c] for c in PROB_COLUMNS) == pytest.approx(1.0)
        assert 0.0 <= p["score"] <= 1.0


def test_non_text_and_misaligned_inputs_raise(rr):
    with pytest.raises(TypeError, match=r"items\[1\]"):
        rr.predict([("q", "a"), ("q", None)])
    with pytest.raises(TypeError, match="pair"):
        rr.predict([("q", "a", "b")])
    with pytest.raises(TypeError, match="list of strings"):
        rr.rank("q", "one string")
    with pytest.raises(ValueError, match="aligned"):
        rr.predict_probs(["q"], ["a", "b"])
    with pytest.raises(TypeError, match="query must be a str, got NoneType"):  # it blamed queries[0]
        rr.rank(None, ["a"])
    with pytest.raises(TypeError, match="top_k must be an int or None, got float"):
        rr.rank("q", ["a", "b"], top_k=1.5)
    with pytest.raises(TypeError, match="queries must be a list of strings, not one string"):  # it scored "a", "b"
        rr.predict_probs("ab", "cd")


def test_very_long_item_is_truncated_keeping_the_suffix(rr):
    item = "Title: Acme laptop Brand: Acme " + "very long spec sheet " * 3000
    ids, ids_longer = rr.encode(["acme laptop"] * 2, [item, item + " and even more text at the end"])
    assert len(ids) == MAX_LENGTH and ids == ids_longer
    assert ids[-len(rr.encoder.tail_ids):] == rr.encoder.tail_ids  # the answer position is intact
    long_query = rr.encode(["acme " * 5000], ["x"])[0]
    assert len(long_query) == MAX_LENGTH and long_query[-len(rr.encoder.tail_ids):] == rr.encoder.tail_ids
    a, b = rr.predict([("acme laptop", item), ("acme laptop", item + " and even more text at the end")])
    assert a == b


def test_missing_folders_raise_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(ESCIDataError, match="lora_model .*folder not found"):
        Reranker.from_pretrained(tiny_model_dir, str(tmp_path / "absent"))
    with pytest.raises(ESCIDataError, match="adapter_config.json"):
        Reranker.from_pretrained(tiny_model_dir, str(tmp_path))
    with pytest.raises(ESCIDataError, match="base_model .*folder not found"):
        Reranker.from_pretrained(os.path.join(str(tmp_path), "absent", "model"))


def test_loaded_adapter_is_merged_and_scores_as_the_unmerged_peft_model(tiny_model_dir, adapter_dir, pairs_df):
    """load_reranker merges the LoRA (in fp32) for speed; the probabilities must stay the unmerged adapter's."""
    import torch
    from peft import PeftModel

    from esci_dataset import PromptEncoder, label_token_ids
    from tiny_reranker.modeling import attach_label_head, load_base_model, load_reranker, load_tokenizer

    merged, tokenizer = load_reranker(tiny_model_dir, adapter_dir, torch.float32, device="cpu")
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    reference = PeftModel.from_pretrained(load_base_model(tiny_model_dir), adapter_dir).eval()
    attach_label_head(reference.get_base_model(), label_token_ids(load_tokenizer(adapter_dir)))
    ids = PromptEncoder(tokenizer, MAX_LENGTH).encode_batch(pairs_df["query"].tolist()[:16], pairs_df["item_text"].tolist()[:16])
    ours = score_token_ids(merged, ids, tokenizer.pad_token_id, batch_size=BATCH)
    theirs = score_token_ids(reference, ids, tokenizer.pad_token_id, batch_size=BATCH)
    assert np.abs(ours - theirs).max() < 1e-5 and (ours.argmax(1) == theirs.argmax(1)).all()
    assert np.abs(theirs - theirs.mean(0)).max() > 1e-3  # the adapter changes scores per pair: the check can fail
