"""Adapters carry their prompt: every scoring path rebuilds it from reranker_config.json."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

import eval as eval_cli
from esci_dataset import DEFAULT_TEMPLATE, V2_TEMPLATE, PromptEncoder, build_template
from tests.helpers import score_token_ids
from tiny_reranker.contract import LABEL_CONFIG_NAME
from tiny_reranker.reranker import Reranker

QUERIES = ["usb c charger", "tent", "red running shoes"]
ITEMS = ["Title: Anker 65W USB-C Charger Brand: Anker", "Title: garden hose", "Title: Nike running shoe, red"]
LONG_INSTRUCTION = ("Given a shopping query and a product listing from a large online store, decide whether the "
                    "product is exactly what was asked for, a substitute, a complement, or irrelevant")


def _adapter_with_config(adapter_dir, tmp_path, edit):
    folder = str(tmp_path / "adapter")
    shutil.copytree(adapter_dir, folder)
    path = os.path.join(folder, LABEL_CONFIG_NAME)
    with open(path) as f:
        config = json.load(f)
    edit(config)
    with open(path, "w") as f:
        json.dump(config, f)
    return folder


def _explicit_probs(rr, template):
    """Score with a PromptEncoder built from ``template`` directly, bypassing any stored config."""
    enc = PromptEncoder(rr.tokenizer, 512, template)
    return score_token_ids(rr.model, enc.encode_batch(QUERIES, ITEMS), rr.tokenizer.pad_token_id)


def _load(tiny_model_dir, folder):
    return Reranker.from_pretrained(tiny_model_dir, folder, device="cpu", dtype="fp32", max_length=512)


def test_adapter_is_scored_with_its_own_longer_template(tiny_model_dir, adapter_dir, tmp_path):
    longer = build_template(LONG_INSTRUCTION)
    folder = _adapter_with_config(adapter_dir, tmp_path, lambda c: c.update(prompt_template=longer.to_dict(),
                                                                            instruction=LONG_INSTRUCTION))
    rr = _load(tiny_model_dir, folder)
    assert rr.encoder.template == longer and rr.encoder.fixed_len > PromptEncoder(rr.tokenizer).fixed_len
    probs = rr.predict_probs(QUERIES, ITEMS)
    np.testing.assert_allclose(probs, _explicit_probs(rr, longer), atol=1e-6, rtol=0)
    assert np.abs(probs - _explicit_probs(rr, DEFAULT_TEMPLATE)).max() > 1e-4  # the template really matters


def test_old_adapter_without_stored_template_scores_with_its_v2_prompt(tiny_model_dir, adapter_dir, tmp_path):
    def as_written_by_v2(config):
        config["prompt_version"] = "esci-4way-v2"
        del config["prompt_template"], config["instruction"]

    folder = _adapter_with_config(adapter_dir, tmp_path, as_written_by_v2)
    rr = _load(tiny_model_dir, folder)
    assert rr.encoder.template == V2_TEMPLATE and rr.encoder.fixed_len == 118
    np.testing.assert_allclose(rr.predict_probs(QUERIES, ITEMS), _explicit_probs(rr, V2_TEMPLATE), atol=1e-6, rtol=0)


@pytest.mark.parametrize("edit,message", [
    (lambda c: (c.update(prompt_version="esci-4way-v1"), c.pop("prompt_template")), "prompt_version 'esci-4way-v1'"),
    (lambda c: c.update(label_token_ids=[1, 2, 3, 4]), "label_token_ids is [1, 2, 3, 4]"),
    (lambda c: c.update(prompt_template={"head": "x"}), "prompt_template"),
])
def test_eval_refuses_an_adapter_with_another_prompt_or_labels(tiny_model_dir, adapter_dir, tmp_path, capsys, edit, message):
    folder = _adapter_with_config(adapter_dir, tmp_path, edit)
    data = tmp_path / "d.parquet"
    pd.DataFrame({"query": QUERIES, "item_text": ITEMS, "esci_label": ["E", "I", "S"]}).to_parquet(data)
    rc = eval_cli.main(["--base_model", tiny_model_dir, "--lora_model", folder, "--eval_file", str(data),
                        "--metrics_path", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
