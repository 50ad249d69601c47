"""Calibration: a temperature fitted on held-out pairs lowers their NLL, it is stored in reranker_config.json,
and every scoring path (Reranker, eval.py, predict.py, both exports) applies the same one."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import eval as eval_cli
import export as export_cli
import predict as predict_cli
from esci_dataset import ESCIDataError
from tiny_reranker import trainer
from tiny_reranker.calibration import TEMPERATURE_RANGE, nll
from tiny_reranker.contract import LABEL_CONFIG_NAME, temperature_from_config
from tiny_reranker.reranker import Reranker
from tiny_reranker.scoring import PROB_COLUMNS, probs_from_logits, softmax

MAX_LENGTH = 256
T = 2.5  # far from 1, so a path that ignores it fails by far more than the tolerance
ATOL = 1e-6  # fp32


def _set_temperature(folder, temperature) -> None:
    path = os.path.join(folder, LABEL_CONFIG_NAME)
    with open(path) as f:
        config = json.load(f)
    config["temperature"] = temperature
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def calibrated_adapter(adapter_dir, tmp_path_factory):
    """The test adapter with T = 2.5 in its reranker_config.json, as train.py --calibrate stores it."""
    folder = str(tmp_path_factory.mktemp("calibrated") / "lora")
    shutil.copytree(adapter_dir, folder)
    _set_temperature(folder, T)
    return folder


@pytest.fixture(scope="module")
def pairs(mixed_pairs):
    return mixed_pairs.copy()


@pytest.fixture(scope="module")
def rr(tiny_model_dir, calibrated_adapter):
    return Reranker.from_pretrained(tiny_model_dir, calibrated_adapter, device="cpu", dtype="fp32", max_length=MAX_LENGTH,
                                    batch_size=4)


@pytest.fixture(scope="module")
def reference(rr, pairs):
    """What the Reranker gives with the stored temperature, and the raw logits behind it."""
    queries, items = pairs["query"].tolist(), pairs["item_text"].tolist()
    return rr.predict_probs(queries, items), rr.predict_logits(queries, items)


# ---------------------------------------------------------------------------
# Fitting and storing
# ---------------------------------------------------------------------------
def test_fitted_temperature_lowers_the_nll_of_pairs_it_was_not_fitted_on():
    """What train.py --calibrate runs, on logits that carry signal but are over-confident (a trained model's are
    checked end to end in test_end_to_end.py; the random test adapter's carry none)."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 400)
    logits = (rng.normal(size=(400, 4)) + 1.5 * np.eye(4)[y]) * 3.0
    fit, held_out = slice(0, 200), slice(200, 400)
    fitted = trainer.fit_held_out_temperature(logits[fit], y[fit])
    assert fitted["nll_after"] < fitted["nll_before"] and fitted["n"] == 200 and "not_stored" not in fitted
    t = fitted["temperature"]
    assert t > 1.5, t  # over-confident logits are softened
    assert nll(softmax(logits[held_out], t), y[held_out]) < nll(softmax(logits[held_out]), y[held_out])


def test_no_temperature_is_stored_from_too_few_pairs_or_from_a_fit_that_ran_off_the_search_range():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    over_confident = (rng.normal(size=(200, 4)) + np.eye(4)[y]) * 4.0  # right ~60% of the time, sure every time
    fitted = trainer.fit_held_out_temperature(over_confident, y)
    assert fitted["temperature"] > 1.0 and "not_stored" not in fitted and fitted["nll_after"] < fitted["nll_before"]

    few = trainer.MIN_CALIBRATION_PAIRS - 1
    too_few = trainer.fit_held_out_temperature(over_confident[:few], y[:few])
    assert too_few["temperature"] is None and f"only {few} held-out pairs" in too_few["not_stored"]

    # Every pair right with a margin: the NLL falls all the way to T -> 0, the bottom of the range.
    separable = trainer.fit_held_out_temperature(np.eye(4)[y] * 5.0, y)
    assert separable["temperature"] is None and "end of the search range" in separable["not_stored"]
    assert separable["fitted_temperature"] == pytest.approx(TEMPERATURE_RANGE[0], rel=0.01)
    # The true class always scored lowest: the NLL falls toward uniform probabilities, T -> the top.
    backwards = trainer.fit_held_out_temperature(-np.eye(4)[y] * 2.0, y)
    assert backwards["temperature"] is None
    assert backwards["fitted_temperature"] == pytest.approx(TEMPERATURE_RANGE[1], rel=0.01)


def test_train_py_stores_no_temperature_from_a_tiny_held_out_split_and_says_why(tiny_model_dir, demo_data, tmp_path,
                                                                              caplog):
    import train as train_cli

    out = str(tmp_path / "lora")
    assert train_cli.main(["--base_model", tiny_model_dir, "--train_file", demo_data[0], "--output_dir", out,
                           "--max_length", "192", "--max_steps", "1", "--eval_ratio", "0.01", "--save_steps", "100",
                           "--per_device_train_batch_size", "4", "--report_to", "none", "--dtype", "fp32"]) == 0
    with open(os.path.join(out, LABEL_CONFIG_NAME)) as f:
        assert json.load(f)["temperature"] is None  # scoring will use the raw logits
    with open(os.path.join(out, "train_metrics.json")) as f:
        calibration = json.load(f)["calibration"]
    assert calibration["temperature"] is None and calibration["n"] < trainer.MIN_CALIBRATION_PAIRS
    assert "no temperature stored: only" in caplog.text and "raise --eval_ratio" in caplog.text


def test_stored_temperature_is_read_and_a_bad_one_is_refused():
    assert temperature_from_config({"temperature": 2}) == 2.0
    assert temperature_from_config({"temperature": None}) is None and temperature_from_config({}) is None
    assert temperature_from_config(None) is None
    assert temperature_from_config({"temperature": 0.01}) == 0.01 and temperature_from_config({"temperature": 100}) == 100
    # 1e-320 passes 0 < T < inf, then overflows every logit to inf; 1e308 makes every probability 0.25
    for bad in (0, -1.0, float("nan"), float("inf"), "2.5", True, 1e-320, 1e308, 0.009, 101.0):
        with pytest.raises(ESCIDataError, match="x.json: temperature must be a positive number"):
            temperature_from_config({"temperature": bad}, "x.json")


@pytest.mark.parametrize("bad", [-1, 1e-320, 1e308])  # 1e-320 once gave null scores labelled E; 1e308 all 0.25
def test_a_bad_stored_temperature_is_a_clear_error_before_scoring(tiny_model_dir, adapter_dir, tmp_path, capsys, bad):
    folder = str(tmp_path / "lora")
    shutil.copytree(adapter_dir, folder)
    _set_temperature(folder, bad)
    (tmp_path / "in.jsonl").write_text('{"query": "q", "item_text": "a"}\n')
    rc = predict_cli.main(["--base_model", tiny_model_dir, "--lora_model", folder, "--input", str(tmp_path / "in.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "temperature must be a positive number" in err and "Traceback" not in err


# ---------------------------------------------------------------------------
# Every path applies the same temperature
# ---------------------------------------------------------------------------
def test_reranker_divides_the_logits_by_the_stored_temperature(rr, reference, pairs, tiny_model_dir, adapter_dir):
    probs, logits = reference
    assert rr.temperature == T
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits).double() / T, -1).numpy(), rtol=0, atol=1e-12)
    raw = Reranker.from_pretrained(tiny_model_dir, adapter_dir, device="cpu", dtype="fp32", max_length=MAX_LENGTH)
    raw_probs = raw.predict_probs(pairs["query"].tolist(), pairs["item_text"].tolist())
    assert raw.temperature == 1.0
    np.testing.assert_allclose(raw_probs, probs_from_logits(logits), rtol=0, atol=ATOL)
    assert np.abs(raw_probs - probs).max() > 1e-2  # T really changed the numbers ...
    assert (raw_probs.argmax(1) == probs.argmax(1)).all()  # ... but never the predicted label


@pytest.fixture(scope="module")
def cli_inputs(tiny_model_dir, calibrated_adapter, pairs, tmp_path_factory):
    """The model flags and the pairs as a parquet file, for eval.py and predict.py."""
    data = tmp_path_factory.mktemp("cli") / "pairs.parquet"
    pairs.to_parquet(data, index=False)
    return ["--base_model", tiny_model_dir, "--lora_model", calibrated_adapter, "--dtype", "fp32",
            "--max_length", str(MAX_LENGTH), "--batch_size", "4"], str(data)


def test_eval_applies_it_and_reports_it(cli_inputs, reference, tmp_path, capsys):
    model, data = cli_inputs
    assert eval_cli.main([*model, "--eval_file", data, "--save_scores_path", str(tmp_path / "eval.parquet"),
                          "--metrics_path", str(tmp_path / "m.json"), "--no_plots"]) == 0
    np.testing.assert_allclose(pd.read_parquet(tmp_path / "eval.parquet")[list(PROB_COLUMNS)], reference[0], rtol=0,
                               atol=ATOL)
    with open(tmp_path / "m.json") as f:
        report = json.load(f)
    assert report["temperature"]["value"] == T and report["temperature"]["applied"]
    assert report["calibration"]["temperature"] == T and report["calibration"]["ndcg_before"] is not None
    capsys.readouterr()


def test_predict_applies_it_and_no_temperature_scores_raw(cli_inputs, reference, tmp_path, capsys):
    (model, data), (probs, logits) = cli_inputs, reference
    assert predict_cli.main([*model, "--input", data, "--output", str(tmp_path / "pred.parquet")]) == 0
    np.testing.assert_allclose(pd.read_parquet(tmp_path / "pred.parquet")[list(PROB_COLUMNS)], probs, rtol=0, atol=ATOL)

    assert predict_cli.main([*model, "--input", data, "--output", str(tmp_path / "raw.parquet"), "--no_temperature"]) == 0
    raw = pd.read_parquet(tmp_path / "raw.parquet")[list(PROB_COLUMNS)].to_numpy()
    np.testing.assert_allclose(raw, probs_from_logits(logits), rtol=0, atol=ATOL)
    capsys.readouterr()


@pytest.fixture(scope="module")
def exports(tiny_model_dir, calibrated_adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrated_exports")
    out = {}
    for fmt in export_cli.FORMATS:
        out[fmt] = str(root / fmt)
        assert export_cli.main(["--base_model", tiny_model_dir, "--lora_model", calibrated_adapter,
                                "--output_dir", out[fmt], "--format", fmt]) == 0
    return out


@torch.no_grad()
def test_seq_cls_export_folds_the_temperature_into_its_head(exports, rr, pairs, reference):
    from transformers import AutoModelForSequenceClassification

    folder = exports["seq_cls"]
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ids = rr.encode(pairs["query"], pairs["item_text"])
    probs = np.stack([torch.softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1).numpy() for seq in ids])
    np.testing.assert_allclose(probs, reference[0], rtol=0, atol=ATOL)  # plain softmax: T is in the weights
    with open(os.path.join(folder, export_cli.PROMPT_FILE)) as f:
        spec = json.load(f)
    with open(os.path.join(folder, LABEL_CONFIG_NAME)) as f:
        config = json.load(f)
    assert spec["temperature"] == 1.0 and spec["temperature_folded_into_score_weight"] == T
    assert config["temperature"] is None and config["temperature_folded_into_score_weight"] == T  # never applied twice


def test_merged_export_stores_the_temperature_and_our_loader_applies_it(exports, pairs, reference):
    folder = exports["merged"]
    with open(os.path.join(folder, export_cli.PROMPT_FILE)) as f:
        assert json.load(f)["temperature"] == T  # for clients: softmax(label logits / temperature)
    merged = Reranker.from_pretrained(folder, device="cpu", dtype="fp32", max_length=MAX_LENGTH)
    assert merged.temperature == T
    np.testing.assert_allclose(merged.predict_probs(pairs["query"].tolist(), pairs["item_text"].tolist()), reference[0],
                               rtol=0, atol=ATOL)


@torch.no_grad()
def test_merged_export_served_as_serving_json_says_gives_our_probabilities(exports, rr, pairs, reference):
    # What vLLM does with serving.json's hf_overrides (classifier_from_token, no_post_processing): the output
    # embedding's rows of the named tokens, read at the last position, softmax; the client then applies
    # client_temperature. Done here in plain transformers, so a wrong token spelling or temperature fails on CPU.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny_reranker.serving import SERVING_FILE, calibrated

    folder = exports["merged"]
    with open(os.path.join(folder, SERVING_FILE)) as f:
        spec = json.load(f)
    tok = AutoTokenizer.from_pretrained(folder)
    rows = tok.convert_tokens_to_ids(spec["hf_overrides"]["classifier_from_token"])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    head = model.get_output_embeddings().weight[rows]  # [4, H]
    served = []
    for seq in rr.encode(pairs["query"], pairs["item_text"]):
        hidden = model.model(input_ids=torch.tensor([seq])).last_hidden_state[0, -1]
        served.append(calibrated(torch.softmax(hidden @ head.T, -1).double().tolist(), spec["client_temperature"]))
    assert spec["client_temperature"] == T
    np.testing.assert_allclose(served, reference[0], rtol=0, atol=ATOL)
    with open(os.path.join(exports["seq_cls"], SERVING_FILE)) as f:
        seq_cls = json.load(f)
    assert seq_cls["hf_overrides"] is None and seq_cls["client_temperature"] == 1.0  # folded: never applied twice


def _readme_block(after: str) -> str:
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        text = f.read()
    block = text[text.index(after):]
    block = block[block.index("```python") + len("```python"):]
    return block[:block.index("```")]


def test_readme_plain_transformers_snippets_give_calibrated_probabilities(exports, rr, tmp_path):
    # The README's code as written, in a fresh process without peft or this repo, from a folder where its
    # paths (export/seq_cls, export/merged) are these T = 2.5 exports: both must give our probabilities.
    import subprocess
    import sys

    code = _readme_block("With plain transformers, no peft and no code from this repo")
    seq_cls, merged = code.split("\n# merged:")
    probe = ("\nimport json as _json\nprint(_json.dumps({'probs': probs.tolist(), 'score': score.tolist(), "
             "'query': query, 'items': items}))\n")
    (tmp_path / "export").mkdir()
    for fmt in export_cli.FORMATS:
        os.symlink(exports[fmt], tmp_path / "export" / fmt)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    program = seq_cls + probe + "\n# merged:" + merged + probe + "\nimport sys; assert 'peft' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.strip().splitlines()[-2:]]
    expected = rr.predict_probs([results[0]["query"]] * len(results[0]["items"]), results[0]["items"])
    for result in results:
        np.testing.assert_allclose(result["probs"], expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(result["score"], (expected @ [3.0, 2.0, 1.0, 0.0]) / 3, rtol=0, atol=1e-5)
