"""Non-finite label logits (NaN weights in a diverged adapter, or a dtype that overflowed) are refused by every
scoring path with one message naming the rows, never turned into NaN scores or an arbitrary label; a training
run that diverges to NaN weights says so and saves no adapter.

The broken model is real: the tiny Qwen3 with NaN in the embedding of one word, so only the prompts that
contain that word go NaN, and the rows named in the error can be checked.
"""

import os
import shutil

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file, save_file

import eval as eval_cli
import export as export_cli
import predict as predict_cli
import train as train_cli
from esci_dataset import ESCIDataError
from tiny_reranker import demo_model, distributed
from tiny_reranker.reranker import Reranker
from tiny_reranker.scoring import probs_from_logits

POISON = " velvet"  # one token with the real Qwen3 tokenizer; only the pairs that contain it go NaN
PAIRS = pd.DataFrame({
    "query": ["usb cable", "desk lamp", "usb cable", "desk lamp", "desk lamp"],
    "item_text": ["Title: braided USB-C cable", "Title: velvet shade desk lamp", "Title: HDMI adapter",
                  "Title: LED desk lamp", "Title: lamp with a velvet shade"],
    "esci_label": ["E", "E", "I", "E", "S"],
})
BAD_ROWS = [1, 4]


@pytest.fixture(scope="module")
def poisoned_model(tiny_model_dir, qwen3_tokenizer, tmp_path_factory) -> str:
    token_ids = qwen3_tokenizer(POISON, add_special_tokens=False)["input_ids"]
    assert len(token_ids) == 1
    folder = str(tmp_path_factory.mktemp("poisoned") / "model")
    shutil.copytree(tiny_model_dir, folder)
    path = os.path.join(folder, "model.safetensors")
    weights = load_file(path)
    weights["model.embed_tokens.weight"][token_ids[0]] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("pairs") / "pairs.parquet")
    PAIRS.to_parquet(path, index=False)
    return path


@pytest.fixture(scope="module")
def nan_adapter(adapter_dir, tmp_path_factory) -> str:
    """The test adapter with one NaN in a LoRA weight, as a run that diverged before saving leaves it."""
    folder = str(tmp_path_factory.mktemp("nan_adapter") / "lora")
    shutil.copytree(adapter_dir, folder)
    path = os.path.join(folder, "adapter_model.safetensors")
    weights = load_file(path)
    name = sorted(k for k in weights if "lora_B" in k)[0]
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})
    return folder


def _flags(model: str) -> list[str]:
    return ["--base_model", model, "--dtype", "fp32", "--max_length", "128", "--batch_size", "2"]


def test_probs_from_logits_names_the_non_finite_rows():
    logits = np.zeros((8, 4), dtype=np.float32)
    logits[2, 1], logits[6, 3] = np.nan, np.inf
    with pytest.raises(ESCIDataError, match=r"for 2 of 8 pairs \(0-based input rows 2, 6\)"):
        probs_from_logits(logits)
    np.testing.assert_allclose(probs_from_logits(np.zeros((2, 4))), 0.25)
    assert probs_from_logits(np.zeros((0, 4))).shape == (0, 4)


def test_the_api_refuses_the_broken_rows_and_scores_the_rest_alike(poisoned_model, tiny_model_dir):
    broken = Reranker.from_pretrained(poisoned_model, device="cpu", dtype="fp32", max_length=128)
    logits = broken.predict_logits(PAIRS["query"].tolist(), PAIRS["item_text"].tolist())
    assert np.flatnonzero(~np.isfinite(logits).all(axis=1)).tolist() == BAD_ROWS  # the poison reaches only them
    with pytest.raises(ESCIDataError, match=r"2 of 5 pairs \(0-based input rows 1, 4\)"):
        broken.predict(list(zip(PAIRS["query"], PAIRS["item_text"])))
    good = Reranker.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32", max_length=128)
    keep = [0, 2, 3]
    np.testing.assert_allclose(logits[keep], good.predict_logits(PAIRS["query"][keep].tolist(),
                                                                 PAIRS["item_text"][keep].tolist()), atol=1e-5)


@pytest.mark.parametrize("cli", ["eval", "predict"])
def test_the_clis_exit_2_with_the_rows_and_write_nothing(cli, poisoned_model, pairs_file, tmp_path, capsys):
    out = tmp_path / "out.parquet"
    if cli == "eval":
        rc = eval_cli.main([*_flags(poisoned_model), "--eval_file", pairs_file, "--save_scores_path", str(out),
                            "--metrics_path", str(tmp_path / "m.json"), "--no_plots"])
    else:
        rc = predict_cli.main([*_flags(poisoned_model), "--input", pairs_file, "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and poisoned_model in line[0] and "non-finite label logits" in line[0]
    assert "2 of 5 pairs (0-based input rows 1, 4)" in line[0]
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("cli", ["eval", "predict"])
def test_a_rank_whose_rows_went_nan_still_reaches_the_gather(cli, poisoned_model, tmp_path, monkeypatch):
    # Under torchrun, a rank that refused on its own would leave the others waiting in the gather (up to
    # distributed.GATHER_TIMEOUT). Rank 1 of 2 takes rows 1 and 3, so it holds the NaN row 1: it must hand its
    # logits over as they are, and the refusal come from rank 0, which sees every row.
    data = tmp_path / "pairs.parquet"
    PAIRS.iloc[[0, 1, 2, 3]].to_parquet(data, index=False)
    handed_over = []
    monkeypatch.setattr(distributed, "start", lambda: distributed.Shard(rank=1, world_size=2))
    monkeypatch.setattr(distributed.Shard, "gather", lambda self, part, n: handed_over.append(part))
    monkeypatch.setattr(distributed.Shard, "broadcast", lambda self, value: 0)  # rank 0's word: no chunk done yet
    if cli == "eval":
        rc = eval_cli.main([*_flags(poisoned_model), "--eval_file", str(data), "--metrics_path", str(tmp_path / "m.json")])
    else:
        rc = predict_cli.main([*_flags(poisoned_model), "--input", str(data), "--output", str(tmp_path / "out.parquet")])
    assert rc == 0 and len(handed_over) == 1  # not the main rank: nothing to write
    assert np.isnan(handed_over[0][0]).all() and np.isfinite(handed_over[0][1]).all()  # rows 1 (NaN) and 3


def test_train_refuses_to_save_an_adapter_that_went_nan(poisoned_model, tmp_path, capsys):
    df = demo_model.synthetic_esci(6, items_per_query=4, seed=3)
    df.loc[df.index[::3], "item_text"] += POISON  # a third of the rows: the first steps already meet one
    data, out = tmp_path / "train.parquet", tmp_path / "run"
    df.to_parquet(data, index=False)
    rc = train_cli.main(["--base_model", poisoned_model, "--train_file", str(data), "--output_dir", str(out),
                         "--max_length", "128", "--per_device_train_batch_size", "4", "--max_steps", "3",
                         "--eval_ratio", "0", "--save_steps", "100", "--report_to", "none", "--dtype", "fp32"])
    err = capsys.readouterr().err
    assert rc == 2
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "training diverged" in line[0] and "after step 3" in line[0] and "lora_" in line[0]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "reranker_config.json").exists()


@pytest.mark.parametrize("cli", ["eval", "predict", "export"])
def test_an_adapter_with_nan_weights_is_refused_when_it_loads(cli, tiny_model_dir, nan_adapter, pairs_file, tmp_path,
                                                              capsys):
    model = [*_flags(tiny_model_dir), "--lora_model", nan_adapter]
    if cli == "eval":
        rc = eval_cli.main([*model, "--eval_file", pairs_file, "--metrics_path", str(tmp_path / "m.json")])
    elif cli == "predict":
        rc = predict_cli.main([*model, "--input", pairs_file, "--output", str(tmp_path / "out.parquet")])
    else:
        rc = export_cli.main(["--base_model", tiny_model_dir, "--lora_model", nan_adapter, "--format", "merged",
                              "--output_dir", str(tmp_path / "export")])
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and "Traceback" not in err and len(line) == 1
    assert nan_adapter in line[0] and "1 adapter tensor(s) hold NaN or inf" in line[0] and "lora_B" in line[0]
    assert os.listdir(tmp_path) == []


def test_the_api_refuses_an_adapter_with_nan_weights(tiny_model_dir, nan_adapter):
    with pytest.raises(ESCIDataError, match="1 adapter tensor.s. hold NaN or inf"):
        Reranker.from_pretrained(tiny_model_dir, nan_adapter, device="cpu", dtype="fp32")
