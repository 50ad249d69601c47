"""train.py then eval.py through their main(), on the tiny Qwen3 and synthetic ESCI data."""

import json
import os

import pandas as pd
import pytest

import eval as eval_cli
import train as train_cli
from esci_dataset import LABELS, load_esci_parquet, split_by_query
from tests.reference_loop import held_out_accuracy, reference_loop

DEMO_TRAIN_ARGS = [  # the recipe scripts/run_demo.sh uses: a random tiny model, LoRA on every linear layer
    "--max_length", "256", "--per_device_train_batch_size", "16", "--num_train_epochs", "1",
    "--learning_rate", "3e-3", "--lora_target_modules", "all-linear", "--eval_ratio", "0.1",
    "--save_steps", "10000", "--logging_steps", "50", "--dtype", "fp32",
]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, demo_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "lora")
    rc = train_cli.main(["--base_model", tiny_model_dir, "--train_file", demo_data[0], "--output_dir", out, *DEMO_TRAIN_ARGS])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def evaluated(trained, tiny_model_dir, demo_data):
    scores = os.path.join(trained, "scores.parquet")
    rc = eval_cli.main(["--base_model", tiny_model_dir, "--lora_model", trained, "--dtype", "fp32", "--eval_file", demo_data[1],
                        "--max_length", "256", "--save_scores_path", scores])
    assert rc == 0
    with open(os.path.join(trained, "eval_metrics.json")) as f:
        return json.load(f), pd.read_parquet(scores)


def test_output_dir_holds_adapter_tokenizer_contract_and_metrics(trained):
    files = set(os.listdir(trained))
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "reranker_config.json",
            "train_metrics.json", "run_config.json", "train_curves.png"} <= files
    with open(os.path.join(trained, "train_curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"  # loss and held-out metrics drawn from the log history
    with open(os.path.join(trained, "reranker_config.json")) as f:
        contract = json.load(f)
    assert contract["labels"] == list(LABELS) and contract["label_token_ids"] == [4734, 27679, 22766, 39715]
    assert contract["prompt_version"] and contract["base_model"]
    with open(os.path.join(trained, "adapter_config.json")) as f:
        targets = json.load(f)["target_modules"]  # all-linear: every projection of every layer
    assert all(any(t.endswith(proj) for t in targets) for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    with open(os.path.join(trained, "train_metrics.json")) as f:
        metrics = json.load(f)
    assert {"eval_accuracy", "eval_macro_f1", "eval_majority_accuracy", "eval_ndcg"} <= set(metrics["eval"])


def test_held_out_ndcg_is_what_eval_py_reports_on_the_held_out_queries(trained, tiny_model_dir, demo_data, tmp_path):
    """train.py's held-out nDCG (raw logits, the Trainer's eval loop) is eval.py's ESCI task 1 on the same rows."""
    _, held_out = split_by_query(load_esci_parquet(demo_data[0]), 0.1, 42)  # train.py's split: --eval_ratio 0.1, seed 42
    held_out_file = str(tmp_path / "held_out.parquet")
    held_out.to_parquet(held_out_file, index=False)
    metrics_path = str(tmp_path / "held_out_metrics.json")
    assert eval_cli.main(["--base_model", tiny_model_dir, "--lora_model", trained, "--dtype", "fp32", "--no_temperature",
                          "--eval_file", held_out_file, "--max_length", "256", "--metrics_path", metrics_path,
                          "--no_plots"]) == 0
    with open(metrics_path) as f:
        report = json.load(f)
    with open(os.path.join(trained, "train_metrics.json")) as f:
        held_out_eval = json.load(f)["eval"]
    assert report["n"] == len(held_out) and held_out["query_id"].nunique() > 1
    assert held_out_eval["eval_ndcg"] == pytest.approx(report["esci_tasks"]["task1_ranking_ndcg"], abs=1e-6)
    assert held_out_eval["eval_accuracy"] == pytest.approx(report["accuracy"], abs=1e-9)


def test_calibrate_fits_a_temperature_on_the_held_out_logits_and_stores_it(trained):
    with open(os.path.join(trained, "train_metrics.json")) as f:
        metrics = json.load(f)
    c = metrics["calibration"]
    # The logits it was fitted on are the held-out ones: their NLL is the Trainer's held-out loss.
    assert c["nll_before"] == pytest.approx(metrics["eval"]["eval_loss"], abs=1e-4)
    assert c["nll_after"] < c["nll_before"] and c["n"] > 0
    with open(os.path.join(trained, "reranker_config.json")) as f:
        assert json.load(f)["temperature"] == c["temperature"] != 1.0


def test_the_demo_recipe_learns_as_well_as_a_plain_random_batch_loop(evaluated, tiny_model_dir, demo_data):
    """train.py with the demo's flags, scored by eval.py on the test file, against the plain reference loop
    trained on the same split (train.py's --eval_ratio 0.1, seed 42) for the same steps of the same size."""
    report, _ = evaluated
    train_split, _ = split_by_query(load_esci_parquet(demo_data[0]), 0.1, 42)
    reference, tokenizer = reference_loop(tiny_model_dir, train_split, steps=-(-len(train_split) // 16), batch=16,
                                          lr=3e-3, targets="all-linear", max_len=256, seed=42)
    ref_accuracy, ref_recalls = held_out_accuracy(reference, tokenizer, pd.read_parquet(demo_data[1]), 256)
    assert ref_accuracy >= report["majority_baseline"]["accuracy"] + 0.3, ref_accuracy  # learnable in this budget
    assert report["accuracy"] >= ref_accuracy - 0.03, (report["accuracy"], ref_accuracy)
    recalls = [report["per_class"][label]["recall"] for label in LABELS]
    assert min(recalls) >= min(ref_recalls) - 0.1, (recalls, ref_recalls)  # every class, not just the majority
    # The score must rank: exact items above irrelevant ones on average.
    assert report["mean_score_by_true_label"]["E"] > report["mean_score_by_true_label"]["I"]


def test_eval_report_contents(evaluated, demo_data):
    report, _ = evaluated
    test_df = pd.read_parquet(demo_data[1])
    for key in ("accuracy", "micro_f1", "macro_f1", "per_class", "confusion_matrix", "roc_auc_E_vs_rest",
                "roc_auc_ES_vs_CI", "ndcg", "ndcg@10", "misclassified_examples", "ece", "brier", "worst_queries"):
        assert key in report
    assert sum(map(sum, report["confusion_matrix"]["rows_true_cols_pred"])) == report["n"] == len(test_df)
    assert report["ndcg_queries"] == test_df["query_id"].nunique()
    assert report["esci_tasks"]["task1_ranking_ndcg"] == report["ndcg"]
    assert report["esci_tasks"]["task2_esci_micro_f1"] > report["majority_baseline"]["micro_f1"] - 1e-9


def test_eval_applies_the_trained_temperature_and_draws_the_plots(evaluated, trained):
    report, _ = evaluated
    with open(os.path.join(trained, "reranker_config.json")) as f:
        temperature = json.load(f)["temperature"]
    assert report["temperature"]["value"] == temperature and report["temperature"]["applied"]
    assert report["calibration"]["temperature"] == temperature
    assert report["calibration"]["nll_after"] < report["calibration"]["nll_before"]  # held out here too
    for name in ("confusion_matrix", "score_distribution", "roc", "reliability"):
        assert os.path.getsize(os.path.join(trained, f"eval_{name}.png")) > 1000, name


def test_scores_file_is_one_row_per_input_in_input_order(evaluated, demo_data):
    _, scores = evaluated
    source = pd.read_parquet(demo_data[1])
    assert len(scores) == len(source)
    assert scores["product_id"].tolist() == source["product_id"].tolist()
    assert {"query", "item_text", "true_label", "pred_label", "p_E", "p_S", "p_C", "p_I", "score"} <= set(scores.columns)
    probs = scores[["p_E", "p_S", "p_C", "p_I"]].to_numpy()
    assert abs(probs.sum(axis=1) - 1).max() < 1e-6
    expected = (3 * scores["p_E"] + 2 * scores["p_S"] + scores["p_C"]) / 3
    assert abs(scores["score"] - expected).max() < 1e-9


def test_zero_shot_eval_without_adapter_and_csv_scores(tiny_model_dir, demo_data, tmp_path):
    scores, metrics = str(tmp_path / "zs.csv"), str(tmp_path / "zs.json")
    rc = eval_cli.main(["--base_model", tiny_model_dir, "--eval_file", demo_data[1], "--max_samples", "24",
                        "--save_scores_path", scores, "--metrics_path", metrics])
    assert rc == 0
    assert len(pd.read_csv(scores)) == 24
    with open(metrics) as f:
        assert json.load(f)["n"] == 24
