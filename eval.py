"""Evaluate an ESCI reranker: base model + LoRA adapter, or the base alone as a zero-shot baseline.

Each pair is scored at its last prompt position: softmax over the four
label-token logits gives P(E), P(S), P(C), P(I), and the ranking score is
``(3·P(E) + 2·P(S) + 1·P(C)) / 3``. The report (accuracy, micro/macro-F1 beside
the majority-class baseline, per-class report, confusion matrix, mean score
per label, ROC-AUC, nDCG per query) is printed and written as JSON.

    python eval.py --base_model Qwen/Qwen3-0.6B --lora_model outputs/qwen3-esci-lora \\
        --eval_file data/esci_multiclass_test.parquet --save_scores_path scores.parquet
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np
import pandas as pd

from esci_dataset import LABEL_TO_ID, ESCIDataError, atomic_write, load_esci_parquet, query_groups
from metrics import evaluation_report, format_report
from reranker import PROB_COLUMNS, add_inference_args, positive_int, prediction_columns, reranker_from_args

logger = logging.getLogger("eval")
N_MISCLASSIFIED_SHOWN = 5


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    add_inference_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--eval_file", type=str, required=True, help="parquet with query, item_text, esci_label (query_id optional, used for nDCG)")
    g.add_argument("--max_samples", type=positive_int, default=None, help="evaluate only the first N rows (quick checks)")

    g = p.add_argument_group("outputs")
    g.add_argument("--save_scores_path", type=str, default=None,
                   help="write per-row p_E,p_S,p_C,p_I,score,pred_label (.parquet or .csv by extension), in input order")
    g.add_argument("--metrics_path", type=str, default=None,
                   help="metrics JSON (default: <lora_model>/eval_metrics.json, or ./eval_metrics.json without an adapter)")
    return p


def scores_frame(df: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    """Input columns + true label + prediction + probabilities + score, one row per input, input order."""
    out = df.copy()
    out["true_label"] = df["esci_label"]
    columns = prediction_columns(probs)
    out["pred_label"] = columns.pop("pred_label")
    for name, values in columns.items():
        out[name] = values
    return out


def write_scores(frame: pd.DataFrame, path: str) -> None:
    """Write atomically, so an interrupted run never leaves a complete-looking file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".csv"):
        atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    else:
        atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def misclassified_examples(frame: pd.DataFrame, n: int = N_MISCLASSIFIED_SHOWN) -> list[dict]:
    """The ``n`` most confident wrong predictions."""
    wrong = frame[frame["true_label"] != frame["pred_label"]]
    confidence = wrong[list(PROB_COLUMNS)].max(axis=1)
    rows = wrong.loc[confidence.sort_values(ascending=False).index[:n]]
    return [
        {"row": int(i), "query": r["query"], "item_text": r["item_text"][:200], "true": r["true_label"],
         "pred": r["pred_label"], **{c: round(float(r[c]), 4) for c in PROB_COLUMNS}}
        for i, r in rows.iterrows()
    ]


def main(argv: list[str] | None = None) -> int:
    # 1. Arguments ---------------------------------------------------------------
    args = make_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info("arguments: %s", json.dumps(vars(args), sort_keys=True))
    if args.save_scores_path and not args.save_scores_path.endswith((".parquet", ".csv")):
        print(f"error: --save_scores_path {args.save_scores_path!r} must end in .parquet or .csv", file=sys.stderr)
        return 2
    metrics_path = args.metrics_path or os.path.join(args.lora_model or ".", "eval_metrics.json")

    # 2. Data and model ----------------------------------------------------------------
    try:
        df = load_esci_parquet(args.eval_file)
        if args.max_samples is not None:
            df = df.head(args.max_samples)
        reranker = reranker_from_args(args)
    except ESCIDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: cannot load the model (--base_model {args.base_model}, --lora_model {args.lora_model}): {exc}",
              file=sys.stderr)
        return 2
    logger.info("evaluating %d pairs from %s with %s%s", len(df), args.eval_file, args.base_model,
                f" + {args.lora_model}" if args.lora_model else " (zero-shot, no adapter)")
    first = reranker.encode(df["query"].iloc[:1], df["item_text"].iloc[:1])[0]
    logger.info("example prompt (%d tokens, label %s):\n%s", len(first), df["esci_label"].iloc[0],
                reranker.tokenizer.decode(first))

    # 3. Score (length-sorted batches, last position, 4-way softmax) -------------------
    probs = reranker.predict_probs(df["query"].tolist(), df["item_text"].tolist(), progress=True)
    frame = scores_frame(df, probs)

    # 4. Report ---------------------------------------------------------------------
    y_true = df["esci_label"].map(LABEL_TO_ID).to_numpy()
    report = evaluation_report(y_true, probs, frame["score"].to_numpy(), query_groups(df).to_numpy())
    report["misclassified_examples"] = misclassified_examples(frame)
    report["config"] = vars(args)
    print(format_report(report))
    print("\nmost confident mistakes:")
    for ex in report["misclassified_examples"]:
        print(f"  row {ex['row']}: true {ex['true']} pred {ex['pred']} | {ex['query']!r} | {ex['item_text'][:80]!r}")

    # 5. Save --------------------------------------------------------------------------
    os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
    with open(metrics_path, "w") as f:
        json.dump(report, f, indent=2)
    logger.info("metrics written to %s", metrics_path)
    if args.save_scores_path:
        write_scores(frame, args.save_scores_path)
        logger.info("scores written to %s", args.save_scores_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
