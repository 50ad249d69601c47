"""eval.py's report: the metrics dict built from a scored eval set, and the same as readable text.

The numbers are :mod:`tiny_reranker.metrics`' and :mod:`tiny_reranker.calibration`'s pure functions;
this module puts them together (with the stored temperature, the worst queries, the most confident
mistakes and the per-locale breakdown), formats them, and prints them.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from esci_dataset import LABEL_TEXT, LABEL_TO_ID, LABELS, SCORE_WEIGHTS, query_groups
from tiny_reranker.calibration import ECE_BINS
from tiny_reranker.contract import LABEL_CONFIG_NAME, stored_temperature
from tiny_reranker.metrics import breakdown, evaluation_report, mean_ndcg
from tiny_reranker.scoring import PROB_COLUMNS, expected_gains, prediction_columns, probs_from_logits, scores_from_probs

N_SHOWN = 5  # worst queries and confident mistakes printed and kept in the JSON
LOCALE_COLUMN = "product_locale"  # an eval file with several (prepare_esci --locale all) gets metrics per locale


def scores_frame(df: pd.DataFrame, probs: np.ndarray, prefix: str = "") -> pd.DataFrame:
    """Input columns + true label + prediction + probabilities + score (ours named ``prefix + name``),
    one row per input, input order."""
    out = df.copy()
    out[prefix + "true_label"] = df["esci_label"]
    columns = prediction_columns(probs)
    out[prefix + "pred_label"] = columns.pop("pred_label")
    for name, values in columns.items():
        out[prefix + name] = values
    return out


def misclassified_examples(frame: pd.DataFrame, n: int = N_SHOWN) -> list[dict]:
    """The ``n`` most confident wrong predictions."""
    wrong = frame[frame["true_label"] != frame["pred_label"]]
    confidence = wrong[list(PROB_COLUMNS)].max(axis=1)
    rows = wrong.loc[confidence.sort_values(ascending=False).index[:n]]
    return [
        {"row": int(i), "query": r["query"], "item_text": r["item_text"][:200], "true": r["true_label"],
         "pred": r["pred_label"], **{c: round(float(r[c]), 4) for c in PROB_COLUMNS}}
        for i, r in rows.iterrows()
    ]


def describe_worst_queries(rows: list[dict], df: pd.DataFrame) -> list[dict]:
    """``metrics.worst_queries`` rows plus the query text and its label counts, so a reader sees why."""
    keys = query_groups(df).astype(str)
    out = []
    for row in rows:
        mine = df[keys == str(row["query_id"])]
        counts = mine["esci_label"].value_counts()
        out.append({**row, "query": mine["query"].iloc[0],
                    "labels": {label: int(counts.get(label, 0)) for label in LABELS}})
    return out


def temperature_info(base_model: str, lora_model: str | None, no_temperature: bool) -> dict:
    """The stored temperature (None if none), whether scoring applies it (not under ``no_temperature``), and
    where it came from."""
    stored = stored_temperature(base_model, lora_model)
    source = os.path.join(lora_model or base_model, LABEL_CONFIG_NAME) if stored is not None else None
    return {"value": stored, "applied": stored is not None and not no_temperature, "source": source}


def build_report(df: pd.DataFrame, logits: np.ndarray, probs: np.ndarray, temperature: dict) -> dict:
    """The metrics dict for ``probs`` (what was applied), with the raw model's calibration before/after T.

    ``ece``/``brier``/``nll`` describe the raw logits' probabilities; ``calibration`` gives them, and
    the nDCG, before and after the stored temperature; ranking metrics use the applied score.
    """
    y_true = df["esci_label"].map(LABEL_TO_ID).to_numpy()
    groups = query_groups(df).to_numpy()
    raw, scores = probs_from_logits(logits), scores_from_probs(probs)
    report = evaluation_report(y_true, raw, scores, groups, temperature=temperature["value"],
                               n_worst=N_SHOWN)
    report["temperature"] = temperature
    # The same queries ranked by the expected ESCI gain instead of the score (its chance line is the same).
    gains = expected_gains(probs)
    report["ndcg_expected_gain"] = mean_ndcg(groups, y_true, gains)[0]
    report["ndcg@10_expected_gain"] = mean_ndcg(groups, y_true, gains, k=10)[0]
    if temperature["value"] is not None:
        # A temperature can reorder items: rank once more with the scoring that was NOT applied.
        not_applied = raw if temperature["applied"] else probs_from_logits(logits, temperature["value"])
        ndcg_other = mean_ndcg(groups, y_true, scores_from_probs(not_applied))[0]
        without_t, with_t = (ndcg_other, report["ndcg"]) if temperature["applied"] else (report["ndcg"], ndcg_other)
        report["calibration"].update(ndcg_before=without_t, ndcg_after=with_t)
    report["worst_queries"] = describe_worst_queries(report["worst_queries"], df)
    if LOCALE_COLUMN in df.columns and df[LOCALE_COLUMN].nunique(dropna=False) > 1:  # e.g. prepare_esci --locale all
        report["by_locale"] = breakdown(df[LOCALE_COLUMN].to_numpy(), y_true, probs.argmax(axis=1), scores, groups)
    return report


def temperature_line(temperature: dict) -> str:
    t = temperature
    if t["value"] is None:
        return "temperature: none stored, raw logits (train.py fits one on its held-out split unless --no_calibrate)"
    if t["applied"]:
        return (f"temperature: T={t['value']:.4f} from {t['source']}, applied: P = softmax(logits / T) "
                "(--no_temperature scores the raw logits)")
    return f"temperature: T={t['value']:.4f} stored in {t['source']} but not applied (--no_temperature): raw logits"


def print_report(report: dict, adapter: str | None) -> None:
    """format_report's tables, the temperature under the header, then worst queries and confident mistakes."""
    text = format_report({k: v for k, v in report.items() if k != "worst_queries"}, adapter=adapter)
    header, _, body = text.partition("\n\n")
    print("\n\n".join([header + "\n" + temperature_line(report["temperature"]), body]))
    c = report.get("calibration", {})
    if c.get("ndcg_before") is not None:
        print(f"  nDCG without -> with the temperature: {c['ndcg_before']:.4f} -> {c['ndcg_after']:.4f}"
              " (it can reorder items by score)")
    if report.get("by_locale"):
        print(f"\nby {LOCALE_COLUMN}:{'n':>9}  accuracy  macro_f1  majority      nDCG    random")
        for locale, m in report["by_locale"].items():
            ndcg, chance = (_fmt(m.get(key)) for key in ("ndcg", "ndcg_random"))
            print(f"  {locale:<17}{m['n']:>8d}  {m['accuracy']:>8.4f}  {m['macro_f1']:>8.4f}  "
                  f"{m['majority_accuracy']:>8.4f}  {ndcg:>8}  {chance:>8}")
    if report.get("worst_queries"):
        print("\nworst queries by nDCG:")
        for q in report["worst_queries"]:
            mix = " ".join(f"{label}{n}" for label, n in q["labels"].items())
            print(f"  nDCG {q['ndcg']:.4f}  {q['n_items']:>4d} items ({mix})  {q['query'][:80]!r}")
    print("\nmost confident mistakes:")
    for ex in report["misclassified_examples"]:
        confidence = max(ex[c] for c in PROB_COLUMNS)
        print(f"  row {ex['row']}: true {ex['true']} pred {ex['pred']} (p {confidence:.2f}) | {ex['query']!r} | "
              f"{ex['item_text'][:80]!r}")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _legend() -> list[str]:
    """Label meanings and the score formula, built from esci_dataset so they cannot drift from the code."""
    meanings = ", ".join(f"{label} = {LABEL_TEXT[label]}" for label in LABELS)
    terms = " + ".join(f"{SCORE_WEIGHTS[label]:g}·P({label})" for label in LABELS if SCORE_WEIGHTS[label])
    return [f"labels: {meanings}", f"score = ({terms}) / {max(SCORE_WEIGHTS.values()):g}"]


_NOT_GIVEN = object()


def _model_line(report: dict, adapter) -> str:
    """Which adapter was evaluated: the argument, else ``report['adapter']``, else eval.py's ``config``."""
    if adapter is _NOT_GIVEN:
        if "adapter" in report:
            adapter = report["adapter"]
        elif "lora_model" in report.get("config", {}):
            adapter = report["config"]["lora_model"]
        else:
            return "model: adapter not recorded"
    return f"model: adapter {adapter}" if adapter else "model: zero-shot (no adapter loaded)"


def baseline_lines(report: dict) -> list[str]:
    """The model beside eval.py --baseline's off-the-shelf ranker, with the chance line of each metric."""
    b = report["baseline"]
    rows = [("nDCG", "ndcg", report.get("ndcg_random")), ("nDCG@10", "ndcg@10", report.get("ndcg@10_random")),
            ("ROC-AUC E vs rest", "roc_auc_E_vs_rest", 0.5), ("ROC-AUC E+S vs C+I", "roc_auc_ES_vs_CI", 0.5)]
    lines = [f"off-the-shelf baseline: {b['name']} ({b['model']}, its published yes/no prompt, ranked by {b['score']})",
             f"  {'metric':<20}{'this model':>12}{'baseline':>10}{'chance':>10}"]
    for name, key, chance in rows:
        if key in b or key in report:
            lines.append(f"  {name:<20}{_fmt(report.get(key)):>12}{_fmt(b.get(key)):>10}{_fmt(chance):>10}")
    return lines


def format_report(report: dict, adapter: str | None = _NOT_GIVEN) -> str:
    """The report as readable text tables. ``adapter``: path, or None for zero-shot."""
    base = report["majority_baseline"]
    lines = [_model_line(report, adapter), *_legend(), f"pairs evaluated: {report['n']}", ""]
    lines.append(f"{'metric':<14}{'model':>10}{'majority(' + base['label'] + ')':>16}")
    for key in ("accuracy", "micro_f1", "macro_f1"):
        lines.append(f"{key:<14}{report[key]:>10.4f}{base[key]:>16.4f}")
    lines += ["", f"{'class':<8}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for label, row in report["per_class"].items():
        lines.append(f"{label:<8}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}{row['support']:>10d}")
    lines += ["", "confusion matrix (rows = true, cols = predicted)", "      " + "".join(f"{label:>8}" for label in LABELS)]
    for label, row in zip(LABELS, report["confusion_matrix"]["rows_true_cols_pred"]):
        lines.append(f"{label:<6}" + "".join(f"{v:>8d}" for v in row))
    lines += ["", "mean score by true label: " + "  ".join(
        f"{label}={_fmt(v)}" for label, v in report["mean_score_by_true_label"].items())]
    lines.append(f"ROC-AUC  E vs rest: {_fmt(report['roc_auc_E_vs_rest'])}   E+S vs C+I: {_fmt(report['roc_auc_ES_vs_CI'])}")
    if "ndcg" in report:
        skipped = report["queries"] - report["ndcg_queries"] if "queries" in report else None
        lines.append(f"nDCG (ESCI gains 1/0.1/0.01/0): {_fmt(report['ndcg'])} (random order "
                     f"{_fmt(report.get('ndcg_random'))})   nDCG@10: {_fmt(report['ndcg@10'])} (random order "
                     f"{_fmt(report.get('ndcg@10_random'))})")
        if "ndcg_expected_gain" in report:
            lines.append(f"  ranked by expected gain P(E) + 0.1·P(S) + 0.01·P(C) instead: nDCG "
                         f"{_fmt(report['ndcg_expected_gain'])} (random order {_fmt(report.get('ndcg_random'))})   "
                         f"nDCG@10: {_fmt(report['ndcg@10_expected_gain'])} (random order {_fmt(report.get('ndcg@10_random'))})")
        lines.append(f"  over {report['ndcg_queries']} queries" + (
            f" of {report['queries']} ({skipped} without an E, S or C item have no nDCG and are left out)"
            if skipped else ""))
    if "baseline" in report:
        lines += ["", *baseline_lines(report)]
    if "esci_tasks" in report:
        t = report["esci_tasks"]
        lines += ["", "ESCI benchmark tasks (KDD Cup 2022)",
                  f"  task 1 query-product ranking, nDCG:           {_fmt(t['task1_ranking_ndcg'])}"
                  f"   (random order: {_fmt(report.get('ndcg_random'))})",
                  f"  task 2 E/S/C/I classification, micro-F1:      {_fmt(t['task2_esci_micro_f1'])}"
                  f"   macro-F1: {_fmt(t['task2_esci_macro_f1'])}",
                  f"  task 3 substitute identification, micro-F1:   {_fmt(t['task3_substitute_micro_f1'])}"
                  f"   (always not-S: {_fmt(t['task3_majority_micro_f1'])})"]
    if "ece" in report:
        lines += ["", f"calibration (top-class probability, {ECE_BINS} bins): ECE {_fmt(report['ece'])}"
                      f"   Brier {_fmt(report['brier'])}   NLL {_fmt(report['nll'])}"]
    if "calibration" in report:
        c = report["calibration"]
        lines.append(f"  with temperature T={c['temperature']:.3f}: "
                     + "   ".join(f"{name} {_fmt(c[key + '_before'])} -> {_fmt(c[key + '_after'])}"
                                  for name, key in (("ECE", "ece"), ("Brier", "brier"), ("NLL", "nll"))))
    if report.get("worst_queries"):
        lines += ["", "worst queries by nDCG:"]
        for row in report["worst_queries"]:
            lines.append(f"  nDCG {row['ndcg']:.4f}  {row['n_items']:>4d} items  query {str(row['query_id'])[:80]!r}")
    return "\n".join(lines)
