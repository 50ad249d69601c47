"""eval.py's report, files and flags, with a stand-in model whose logits are fixed per pair (no model loads).

The numbers themselves are metrics.py's (tested in test_metrics.py); here: the report carries the three ESCI
tasks, calibration and the worst queries, says what was evaluated, writes plots, and applies a stored temperature.
"""

import errno
import json
import logging
import os
import tempfile
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import eval as eval_cli
from esci_dataset import LABEL_TO_ID
from tiny_reranker.calibration import brier_score, expected_calibration_error, nll
from tiny_reranker.contract import LABEL_CONFIG_NAME, stored_temperature
from tiny_reranker.metrics import task3_substitute_micro_f1
from tiny_reranker.scoring import PROB_COLUMNS, probs_from_logits

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("confusion_matrix", "score_distribution", "roc", "reliability")

# Three queries of four items. "tent" is ranked upside down (its exact item scores lowest): the worst query.
ROWS = [  # query_id, query, item_text, label, logits (E, S, C, I)
    (1, "usb c charger", "Anker 65W USB-C charger", "E", (3.0, 1.0, 0.0, -1.0)),
    (1, "usb c charger", "Belkin USB-C charger", "S", (1.0, 2.5, 0.0, -1.0)),
    (1, "usb c charger", "USB-C cable", "C", (0.0, 0.5, 2.0, 0.0)),
    (1, "usb c charger", "garden hose", "I", (-1.0, 0.0, 0.0, 3.0)),
    (2, "camping tent", "Coleman 4-person tent", "E", (-1.0, 0.0, 0.5, 2.0)),
    (2, "camping tent", "Ozark 4-person tent", "S", (0.0, 0.5, 1.0, 0.0)),
    (2, "camping tent", "tent stakes", "C", (1.0, 2.0, 0.0, 0.0)),
    (2, "camping tent", "HDMI cable", "I", (4.0, 0.0, 0.0, -1.0)),  # a very confident mistake
    (3, "wireless mouse", "Logitech wireless mouse", "E", (2.0, 1.5, 0.0, 0.0)),
    (3, "wireless mouse", "Razer wired mouse", "S", (1.5, 1.0, 0.0, 0.0)),
    (3, "wireless mouse", "mouse pad", "C", (0.0, 0.0, 1.0, 1.2)),
    (3, "wireless mouse", "coffee mug", "I", (0.0, 0.0, 0.0, 2.0)),
]
LOGITS = {(q, item): logits for _, q, item, _, logits in ROWS}


class FakeReranker:
    """The parts of reranker.Reranker eval.py uses; logits come from LOGITS."""

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature
        self.tokenizer = SimpleNamespace(decode=lambda ids: "<the prompt>")
        self.encoder = SimpleNamespace(truncation_warning=lambda: None, encode_batch=self.encode)

    def encode(self, queries, items):
        return [[0] * 5 for _ in queries]

    def predict_logits(self, queries, items, progress=False):
        return np.array([LOGITS[pair] for pair in zip(queries, items)], dtype=np.float32).reshape(-1, 4)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A base folder, an adapter folder, the data file, and eval.py wired to the stand-in model."""
    base, lora = tmp_path / "base", tmp_path / "lora"
    base.mkdir()
    lora.mkdir()
    (lora / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"]}')
    data = tmp_path / "eval.parquet"
    pd.DataFrame([r[:4] for r in ROWS], columns=["query_id", "query", "item_text", "esci_label"]).to_parquet(data)

    def load(args, device=None):  # the real loader's temperature rule: the stored one unless --no_temperature
        stored = stored_temperature(args.base_model, args.lora_model)
        return FakeReranker(1.0 if args.no_temperature or stored is None else stored)

    monkeypatch.setattr(eval_cli, "reranker_from_args", load)
    return SimpleNamespace(base=str(base), lora=str(lora), data=str(data), out=tmp_path / "out")


def run(setup, capsys, *extra, adapter=True):
    argv = ["--base_model", setup.base, "--eval_file", setup.data, *(["--lora_model", setup.lora] if adapter else []),
            "--metrics_path", str(setup.out / "eval_metrics.json"), "--save_scores_path", str(setup.out / "s.parquet"),
            *extra]
    rc = eval_cli.main(argv)
    out, err = capsys.readouterr()
    report = json.loads((setup.out / "eval_metrics.json").read_text()) if rc == 0 else None
    return rc, out, err, report


def test_report_has_the_three_esci_tasks_calibration_and_worst_queries(setup, capsys):
    rc, _, _, report = run(setup, capsys)
    assert rc == 0 and report["n"] == len(ROWS)
    tasks = report["esci_tasks"]
    assert tasks["task1_ranking_ndcg"] == report["ndcg"] is not None  # query ids reached the report
    assert tasks["task2_esci_micro_f1"] == report["micro_f1"] and tasks["task2_esci_macro_f1"] == report["macro_f1"]
    # The other numbers are metrics.py's and calibration.py's (tested there) on these rows' logits.
    probs = probs_from_logits(np.array([r[4] for r in ROWS], dtype=np.float32))
    y_true = np.array([LABEL_TO_ID[r[3]] for r in ROWS])
    assert tasks["task3_substitute_micro_f1"] == pytest.approx(task3_substitute_micro_f1(y_true, probs.argmax(1)))
    assert report["ece"] == pytest.approx(expected_calibration_error(probs, y_true))
    assert report["brier"] == pytest.approx(brier_score(probs, y_true)) and report["nll"] == pytest.approx(nll(probs, y_true))
    worst = report["worst_queries"][0]
    assert worst["query_id"] == 2 and worst["query"] == "camping tent" and worst["labels"] == {"E": 1, "S": 1, "C": 1, "I": 1}
    assert [q["ndcg"] for q in report["worst_queries"]] == sorted(q["ndcg"] for q in report["worst_queries"])
    assert report["misclassified_examples"][0]["item_text"] == "HDMI cable"  # the most confident mistake first
    assert report["adapter"] == setup.lora
    assert report["temperature"] == {"value": None, "applied": False, "source": None} and "calibration" not in report


def test_printed_report_explains_labels_score_and_model_then_worst_queries_beside_mistakes(setup, capsys):
    rc, out, _, _ = run(setup, capsys)
    assert rc == 0
    header = out[:out.index("metric")]
    for words in (f"model: adapter {setup.lora}", "E = exact, S = substitute, C = complement, I = irrelevant",
                  "score = (3·P(E) + 2·P(S) + 1·P(C)) / 3", "temperature: none stored"):
        assert words in header, words
    for words in ("task 1 query-product ranking", "task 2 E/S/C/I classification", "task 3 substitute identification",
                  "ECE", "Brier"):
        assert words in out, words
    worst, mistakes = out.index("worst queries by nDCG"), out.index("most confident mistakes")
    assert worst < mistakes and "'camping tent'" in out[worst:mistakes].splitlines()[1]
    assert "HDMI cable" in out[mistakes:].splitlines()[1]


def test_every_ndcg_is_printed_beside_its_random_order_baseline(setup, capsys):
    from tiny_reranker.metrics import random_order_ndcg

    rc, out, _, report = run(setup, capsys)
    df = pd.read_parquet(setup.data)
    chance = random_order_ndcg(df["query_id"].to_numpy(), df["esci_label"].map(LABEL_TO_ID).to_numpy())
    assert rc == 0 and report["ndcg_random"] == pytest.approx(chance) and report["ndcg@10_random"] is not None
    line = next(ln for ln in out.splitlines() if ln.startswith("nDCG (ESCI gains"))
    assert f"{report['ndcg']:.4f} (random order {chance:.4f})" in line and "nDCG@10" in line
    assert f"(random order: {chance:.4f})" in next(ln for ln in out.splitlines() if "task 1" in ln)
    assert report["queries"] == df["query_id"].nunique() >= report["ndcg_queries"]


def test_ndcg_ranked_by_expected_gain_is_reported_beside_the_default(setup, capsys):
    from tiny_reranker.metrics import mean_ndcg
    from tiny_reranker.scoring import expected_gains

    rc, out, _, report = run(setup, capsys)
    df = pd.read_parquet(setup.data)
    groups, y_true = df["query_id"].to_numpy(), df["esci_label"].map(LABEL_TO_ID).to_numpy()
    gains = expected_gains(probs_from_logits(np.array([r[4] for r in ROWS], dtype=np.float32)))
    assert rc == 0 and report["ndcg_expected_gain"] == pytest.approx(mean_ndcg(groups, y_true, gains)[0])
    assert report["ndcg@10_expected_gain"] == pytest.approx(mean_ndcg(groups, y_true, gains, k=10)[0])
    line = next(ln for ln in out.splitlines() if "ranked by expected gain" in ln)
    assert f"{report['ndcg_expected_gain']:.4f} (random order {report['ndcg_random']:.4f})" in line


def test_an_eval_file_with_several_locales_gets_metrics_per_locale(setup, capsys):
    df = pd.read_parquet(setup.data)
    df["product_locale"] = ["us"] * 8 + ["es"] * 4  # queries 1-2 us, query 3 es
    df.to_parquet(setup.data)
    rc, out, _, report = run(setup, capsys)
    assert rc == 0 and list(report["by_locale"]) == ["es", "us"]
    us, es = report["by_locale"]["us"], report["by_locale"]["es"]
    assert us["n"] + es["n"] == report["n"]
    assert (us["ndcg"] * 2 + es["ndcg"]) / 3 == pytest.approx(report["ndcg"])  # 2 us queries, 1 es query
    assert (us["accuracy"] * 8 + es["accuracy"] * 4) / 12 == pytest.approx(report["accuracy"])
    table = out[out.index("by product_locale:"):].splitlines()
    assert table[1].split()[:2] == ["es", "4"] and table[2].split()[:2] == ["us", "8"]

    df.assign(product_locale="us").to_parquet(setup.data)  # one locale: nothing to break down
    rc, out, _, report = run(setup, capsys)
    assert rc == 0 and "by_locale" not in report and "by product_locale" not in out


def test_zero_shot_says_so(setup, capsys):
    rc, out, _, report = run(setup, capsys, adapter=False)
    assert rc == 0 and "model: zero-shot (no adapter loaded)" in out and report["adapter"] is None


def test_plots_are_written_next_to_the_metrics_named_after_them_unless_no_plots(setup, capsys, caplog):
    caplog.set_level(logging.INFO, logger="eval")
    rc, _, _, _ = run(setup, capsys)
    assert rc == 0
    paths = [setup.out / f"eval_{name}.png" for name in PLOTS]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC, path
    assert any(all(str(p) in r.getMessage() for p in paths) for r in caplog.records)  # their paths are logged

    metrics = setup.out / "more" / "run1.json"
    assert eval_cli.main(["--base_model", setup.base, "--eval_file", setup.data, "--metrics_path", str(metrics)]) == 0
    assert sorted(os.listdir(metrics.parent)) == ["run1.json", *sorted(f"run1_{name}.png" for name in PLOTS)]

    quiet = setup.out / "quiet" / "eval_metrics.json"
    assert eval_cli.main(["--base_model", setup.base, "--eval_file", setup.data, "--metrics_path", str(quiet),
                          "--no_plots"]) == 0
    assert os.listdir(quiet.parent) == ["eval_metrics.json"]


def test_a_stored_temperature_is_applied_reported_before_and_after_and_can_be_switched_off(setup, capsys):
    with open(os.path.join(setup.lora, LABEL_CONFIG_NAME), "w") as f:
        json.dump({"temperature": 2.0}, f)
    logits = np.array([r[4] for r in ROWS], dtype=np.float32)  # the model's logits are fp32

    rc, out, _, report = run(setup, capsys)
    assert rc == 0 and report["temperature"]["value"] == 2.0 and report["temperature"]["applied"]
    saved = pd.read_parquet(setup.out / "s.parquet")[list(PROB_COLUMNS)].to_numpy()
    np.testing.assert_allclose(saved, probs_from_logits(logits, 2.0), rtol=0, atol=1e-12)
    c = report["calibration"]
    assert c["temperature"] == 2.0 and c["ece_before"] == report["ece"] and c["ece_after"] != c["ece_before"]
    assert c["ndcg_after"] == report["ndcg"] and c["ndcg_before"] is not None  # ranking with and without T
    assert "T=2.0000" in out[:out.index("metric")] and "applied" in out and "ECE" in out[out.index("with temperature"):]

    rc, out, _, raw = run(setup, capsys, "--no_temperature")
    assert rc == 0 and raw["temperature"]["value"] == 2.0 and not raw["temperature"]["applied"]
    saved = pd.read_parquet(setup.out / "s.parquet")[list(PROB_COLUMNS)].to_numpy()
    np.testing.assert_allclose(saved, probs_from_logits(logits), rtol=0, atol=1e-12)
    assert raw["calibration"]["ndcg_before"] == raw["ndcg"]  # still shows what T would do
    assert "not applied (--no_temperature)" in out


def test_outputs_are_checked_before_the_model_loads(setup, capsys, monkeypatch):
    monkeypatch.setattr(eval_cli, "reranker_from_args", lambda *a, **k: pytest.fail("the model loaded first"))
    folder = setup.out / "a_folder.json"
    folder.mkdir(parents=True)
    cases = [(["--metrics_path", str(folder)], "--metrics_path"),
             (["--save_scores_path", str(setup.out / "scores.txt")], "must end in .parquet or .csv")]
    for extra, words in cases:
        rc = eval_cli.main(["--base_model", setup.base, "--eval_file", setup.data, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and err.startswith("error: ") and "Traceback" not in err, err


def test_a_failed_final_write_keeps_the_metrics_elsewhere(setup, capsys, monkeypatch, tmp_path):
    real_write_json = eval_cli.write_json

    def disk_full_in_out(path, *args, **kwargs):
        if os.path.dirname(os.path.abspath(path)) == str(setup.out):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_json(path, *args, **kwargs)

    monkeypatch.setattr(eval_cli, "write_json", disk_full_in_out)
    spare = tmp_path / "spare"
    spare.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spare))
    rc, _, err, _ = run(setup, capsys, "--no_plots")
    assert rc == 2 and "No space left" in err
    (saved,) = os.listdir(spare)
    assert str(spare / saved) in err and json.loads((spare / saved).read_text())["n"] == len(ROWS)
    assert len(pd.read_parquet(setup.out / "s.parquet")) == len(ROWS)  # the scores were written all the same


def test_help_shows_defaults_and_the_new_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        eval_cli.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help lines wrap anywhere
    for words in ("--no_plots", "--no_temperature", "--metrics_path", "(default: 512)", "(default: auto)", "torchrun"):
        assert words in text, words


def test_user_columns_named_like_ours_are_refused_then_kept_beside_prefixed_ones(setup, capsys, monkeypatch):
    table = pd.read_parquet(setup.data)
    table["score"] = np.arange(len(table)) / 10  # e.g. the shop's current ranking score
    table["true_label"] = "from the shop"
    table.to_parquet(setup.data)
    monkeypatch.setattr(eval_cli, "reranker_from_args", lambda *a, **k: pytest.fail("the model loaded first"))
    rc, _, err, _ = run(setup, capsys)
    assert rc == 2 and "'score'" in err and "'true_label'" in err and "--column_prefix" in err
    assert "Traceback" not in err and not (setup.out / "s.parquet").exists()

    monkeypatch.undo()
    monkeypatch.setattr(eval_cli, "reranker_from_args", lambda args, device=None: FakeReranker())
    rc, _, _, report = run(setup, capsys, "--column_prefix", "eval_")
    saved = pd.read_parquet(setup.out / "s.parquet")
    assert rc == 0 and report["n"] == len(ROWS)
    np.testing.assert_array_equal(saved["score"], table["score"])  # the user's columns, untouched
    assert (saved["true_label"] == "from the shop").all() and (saved["eval_true_label"] == table["esci_label"]).all()
    assert {"eval_score", "eval_pred_label", *(f"eval_{c}" for c in PROB_COLUMNS)} <= set(saved.columns)


@pytest.mark.parametrize("ext", [".csv", ".jsonl"])
def test_a_csv_or_jsonl_eval_file_gives_the_parquet_files_report(setup, capsys, tmp_path, ext):
    """eval.py reads .csv and .jsonl as predict.py does (before, they got "Parquet magic bytes not found")."""
    _, _, _, from_parquet = run(setup, capsys)
    path = tmp_path / f"eval{ext}"
    table = pd.read_parquet(setup.data)
    table.to_csv(path, index=False) if ext == ".csv" else table.to_json(path, orient="records", lines=True)
    setup.data = str(path)
    rc, _, _, from_text = run(setup, capsys)
    assert rc == 0
    for key in ("n", "accuracy", "macro_f1", "ndcg", "ndcg_queries", "esci_tasks", "confusion_matrix"):
        assert from_text[key] == from_parquet[key], key


def test_plots_show_the_probabilities_the_report_applies(setup, capsys, monkeypatch):
    """With a stored temperature, the histogram and ROC use the calibrated probabilities the report uses (they
    used the raw logits while the report applied T); under --no_temperature, the raw ones."""
    from tiny_reranker import plots

    with open(os.path.join(setup.lora, LABEL_CONFIG_NAME), "w") as f:
        json.dump({"temperature": 2.0}, f)
    seen = []
    real = plots.plot_eval
    monkeypatch.setattr(plots, "plot_eval", lambda *a, **k: seen.append(k.get("use_calibrated")) or real(*a, **k))
    assert run(setup, capsys)[0] == 0 and run(setup, capsys, "--no_temperature")[0] == 0
    assert seen == [True, False]


def test_zero_shot_outputs_go_to_outputs_eval_not_the_current_folder(setup, capsys, monkeypatch, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert eval_cli.main(["--base_model", setup.base, "--eval_file", setup.data]) == 0
    folder = work / "outputs" / "eval" / os.path.basename(setup.base)
    assert sorted(os.listdir(work)) == ["outputs"] and (folder / "eval_metrics.json").is_file()
    assert len(list(folder.glob("eval_*.png"))) == 4
