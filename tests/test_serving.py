"""serving.json: what export.py writes down for vLLM (golden), and the client-side temperature it asks for.

vLLM itself is checked by the opt-in scripts/check_vllm.sh; these tests hold the file's content and math."""

import json

import numpy as np
import pytest

from esci_dataset import label_token_ids
from tiny_reranker import demo_model
from tiny_reranker.modeling import load_tokenizer
from tiny_reranker.scoring import softmax
from tiny_reranker.serving import calibrated, serving_spec, vllm_hf_overrides

VOCAB_SPELLINGS = ["Ġexact", "Ġsubstitute", "Ġcomplement", "Ġirrelevant"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(demo_model.qwen3_tokenizer_dir())


def test_label_tokens_are_spelled_as_the_vocabulary_spells_them(tokenizer):
    # vLLM's classifier_from_token looks tokens up in the vocabulary: only this spelling finds our four rows.
    ids = label_token_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(ids) == VOCAB_SPELLINGS
    assert tokenizer.convert_tokens_to_ids(VOCAB_SPELLINGS) == ids
    assert tokenizer.convert_tokens_to_ids(" exact") in (None, tokenizer.unk_token_id)  # the label word: no token
    assert tokenizer.convert_tokens_to_ids("exact") != ids[0]  # without the space: another token, silently


def test_merged_serving_spec_golden():
    spec = serving_spec("merged", "export/merged", "Qwen3ForCausalLM", VOCAB_SPELLINGS, 0.5)
    assert spec["hf_overrides"] == {"architectures": ["Qwen3ForSequenceClassification"],
                                    "classifier_from_token": VOCAB_SPELLINGS, "method": "no_post_processing"}
    assert spec["runner"] == "pooling" and spec["client_temperature"] == 0.5
    assert spec["server"] == (
        "python -m vllm.entrypoints.openai.api_server --model export/merged --runner pooling --hf-overrides "
        "'{\"architectures\":[\"Qwen3ForSequenceClassification\"],\"classifier_from_token\":[\"Ġexact\","
        "\"Ġsubstitute\",\"Ġcomplement\",\"Ġirrelevant\"],\"method\":\"no_post_processing\"}'")
    assert "softmax(log(probs) / client_temperature)" in spec["outputs"]
    assert spec["python"].startswith("from vllm import LLM; llm = LLM(model='export/merged', runner='pooling', "
                                     "hf_overrides={'architectures': ['Qwen3ForSequenceClassification'],")
    json.dumps(spec)  # a JSON file


def test_seq_cls_serving_spec_golden():
    spec = serving_spec("seq_cls", "export/seq_cls", "Qwen3ForSequenceClassification", VOCAB_SPELLINGS, None)
    assert spec["hf_overrides"] is None and spec["client_temperature"] == 1.0
    assert spec["server"] == "python -m vllm.entrypoints.openai.api_server --model export/seq_cls --runner pooling"
    assert "temperature" not in spec["outputs"]
    assert vllm_hf_overrides("LlamaForCausalLM", VOCAB_SPELLINGS)["architectures"] == ["LlamaForSequenceClassification"]


def test_client_temperature_turns_raw_probs_into_calibrated_ones():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(50, 4))
    for t in (0.39, 1.0, 2.5):
        got = np.array([calibrated(p.tolist(), t) for p in softmax(logits)])
        np.testing.assert_allclose(got, softmax(logits, t), rtol=0, atol=1e-12)
    assert calibrated([1.0, 0.0, 0.0, 0.0], 0.5) == [1.0, 0.0, 0.0, 0.0]  # an underflowed 0 stays 0
