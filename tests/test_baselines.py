"""eval.py --baseline qwen3-reranker: Qwen3-Reranker's published prompt and P(yes), checked against the model card's
recipe written out here (full-vocabulary logits, no code of ours), on the tiny model."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import eval as eval_cli
from esci_dataset import LABEL_TO_ID, QWEN3_RERANKER_INSTRUCT, QWEN3_RERANKER_SYSTEM, build_template
from tiny_reranker.baselines import qwen3_reranker_p_yes, ranking_metrics, yes_no_token_ids
from tiny_reranker.modeling import load_base_model, load_tokenizer

# Qwen3-Reranker's model card, verbatim.
PUBLISHED_PREFIX = ('<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the '
                    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n')
PUBLISHED_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def published_p_yes(model_dir: str, queries, items) -> np.ndarray:
    tok = load_tokenizer(model_dir)
    model = load_base_model(model_dir).eval()
    no, yes = tok.convert_tokens_to_ids("no"), tok.convert_tokens_to_ids("yes")
    out = []
    for q, d in zip(queries, items):
        text = PUBLISHED_PREFIX + f"<Instruct>: {QWEN3_RERANKER_INSTRUCT}\n<Query>: {q}\n<Document>: {d}" + PUBLISHED_SUFFIX
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            logits = model(**ids).logits[0, -1]
        out.append(torch.log_softmax(logits[[no, yes]].double(), -1).exp()[1].item())
    return np.array(out)


def test_the_template_renders_the_published_prompt():
    template = build_template(QWEN3_RERANKER_INSTRUCT, QWEN3_RERANKER_SYSTEM)
    assert template.render("usb c", "Anker charger") == (
        PUBLISHED_PREFIX + f"<Instruct>: {QWEN3_RERANKER_INSTRUCT}\n<Query>: usb c\n<Document>: Anker charger" + PUBLISHED_SUFFIX)


def test_yes_and_no_are_single_vocabulary_tokens(qwen3_tokenizer):
    no, yes = yes_no_token_ids(qwen3_tokenizer)
    assert qwen3_tokenizer.decode([no]) == "no" and qwen3_tokenizer.decode([yes]) == "yes"


def test_p_yes_equals_the_model_cards_recipe(tiny_model_dir, mixed_pairs):
    queries, items = mixed_pairs["query"].tolist()[:12], mixed_pairs["item_text"].tolist()[:12]
    ours = qwen3_reranker_p_yes(tiny_model_dir, queries, items, torch.float32, "cpu", max_length=1024, batch_size=5)
    reference = published_p_yes(tiny_model_dir, queries, items)
    assert np.abs(ours - reference).max() < 1e-5
    assert reference.std() > 1e-4  # the pairs get different scores: the comparison can fail


def test_eval_reports_the_baseline_beside_the_adapter(tiny_model_dir, adapter_dir, demo_data, tmp_path, capsys):
    test = pd.read_parquet(demo_data[1]).head(48)
    test.to_parquet(tmp_path / "test.parquet")
    metrics = tmp_path / "m.json"
    rc = eval_cli.main(["--base_model", tiny_model_dir, "--lora_model", adapter_dir, "--eval_file", str(tmp_path / "test.parquet"),
                        "--dtype", "fp32", "--max_length", "256", "--metrics_path", str(metrics), "--no_plots",
                        "--baseline", "qwen3-reranker"])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads(metrics.read_text())
    b = report["baseline"]
    p_yes = published_p_yes(tiny_model_dir, test["query"], test["item_text"])
    expected = ranking_metrics(test["query_id"].to_numpy(), test["esci_label"].map(LABEL_TO_ID).to_numpy(), p_yes)
    for key in ("ndcg", "ndcg@10", "roc_auc_E_vs_rest", "roc_auc_ES_vs_CI", "ndcg_random"):
        assert b[key] == pytest.approx(expected[key], abs=1e-6), key
    assert b["name"] == "qwen3-reranker" and b["model"] == tiny_model_dir and b["ndcg_random"] == report["ndcg_random"]
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("nDCG ") and "baseline" not in ln and len(ln.split()) == 4)
    assert line.split()[1:] == [f"{report['ndcg']:.4f}", f"{b['ndcg']:.4f}", f"{report['ndcg_random']:.4f}"]
    assert "off-the-shelf baseline: qwen3-reranker" in out


@pytest.mark.parametrize("extra, words", [
    (["--baseline", "qwen3-reranker", "--baseline_model", "/nonexistent/model"], "/nonexistent/model"),
    (["--baseline_model", "/tmp"], "pass --baseline qwen3-reranker"),
])
def test_a_bad_baseline_flag_is_exit_2_before_scoring(tiny_model_dir, demo_data, tmp_path, capsys, extra, words):
    rc = eval_cli.main(["--base_model", tiny_model_dir, "--eval_file", demo_data[1], "--metrics_path",
                        str(tmp_path / "m.json"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Traceback" not in err and not (tmp_path / "m.json").exists()
