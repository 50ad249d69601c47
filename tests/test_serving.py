"""serving.json: what export.py writes down for vLLM (golden), and the client-side temperature it asks for.

vLLM itself is checked by the opt-in scripts/check_vllm.sh; these tests hold the file's content and math."""

import json
import os

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


# ---------------------------------------------------------------------------
# predict.py --engine vllm: what is refused before any engine starts (the engine itself: scripts/check_vllm.sh)
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seq_cls_export(tiny_model_dir, adapter_dir, tmp_path_factory):
    import export as export_cli

    folder = str(tmp_path_factory.mktemp("vllm_engine") / "seq_cls")
    assert export_cli.main(["--base_model", tiny_model_dir, "--lora_model", adapter_dir, "--output_dir", folder,
                            "--format", "seq_cls"]) == 0
    return folder


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vllm_pairs") / "pairs.parquet"
    demo_model.synthetic_esci(2, items_per_query=3, seed=3)[["query", "item_text"]].to_parquet(path, index=False)
    return str(path)


def test_engine_vllm_refuses_what_it_cannot_serve(seq_cls_export, tiny_model_dir, adapter_dir, pairs_file, tmp_path,
                                                  capsys, monkeypatch):
    import sys

    import predict as predict_cli

    monkeypatch.delenv("TINY_RERANKER_VLLM_PYTHON", raising=False)
    out = str(tmp_path / "out.parquet")
    cases = [
        (["--base_model", seq_cls_export], "needs --vllm_python"),
        (["--base_model", seq_cls_export, "--vllm_python", str(tmp_path / "none")], "file not found"),
        (["--base_model", tiny_model_dir, "--lora_model", adapter_dir, "--vllm_python", sys.executable],
         "serves an export, not an adapter"),
        (["--base_model", tiny_model_dir, "--vllm_python", sys.executable], "has no serving.json"),
    ]
    for argv, must in cases:
        assert predict_cli.main(["--engine", "vllm", *argv, "--input", pairs_file, "--output", out]) == 2, argv
        err = capsys.readouterr().err
        assert must in err and "Traceback" not in err, err
    assert not (tmp_path / "out.parquet").exists()


def test_engine_vllm_that_cannot_start_is_a_clear_error(seq_cls_export, pairs_file, tmp_path, capsys, monkeypatch):
    # This venv has no vLLM: the engine process fails at its import, and predict.py says so, writing nothing.
    import sys
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the engine's temp folder goes

    import predict as predict_cli

    out = tmp_path / "out.parquet"
    assert predict_cli.main(["--engine", "vllm", "--vllm_python", sys.executable, "--base_model", seq_cls_export,
                             "--input", pairs_file, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # one paragraph, the engine's last log lines quoted in it
    assert last.startswith("error: ") and "vLLM engine exited" in last and "No module named 'vllm'" in last
    assert not out.exists() and not (tmp_path / "out.parquet.partial").exists()
    assert not [p for p in os.listdir(tmp_path / "tmp") if p.startswith("tiny-reranker-vllm-")]  # no temp folder left
