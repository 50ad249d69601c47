"""Evaluate an ESCI reranker: base model + LoRA adapter, or the base alone as a zero-shot baseline.

Each pair is scored at its last prompt position: softmax over the four label-token logits gives
P(E), P(S), P(C), P(I) (E exact, S substitute, C complement, I irrelevant), and the ranking score
is (3·P(E) + 2·P(S) + 1·P(C)) / 3. When train.py stored a temperature T with the adapter
(it fits one on its held-out split by default), the logits are divided by T first (--no_temperature: raw logits). T never changes the
predicted label, but it can reorder items by score; the report shows nDCG with and without it.

The report, printed and written as JSON (--metrics_path):
  * the three ESCI benchmark tasks (KDD Cup 2022): 1 query-product ranking, mean nDCG per query
    with gains E 1 / S 0.1 / C 0.01 / I 0; 2 E/S/C/I classification, micro-F1 (and macro-F1);
    3 substitute identification, S vs not-S from the 4-class prediction, micro-F1;
  * accuracy and F1 beside the majority-class baseline, per-class report, confusion matrix,
    mean score per label, ROC-AUC, nDCG and nDCG@10;
  * calibration of the raw model (ECE over 15 bins of the top-class probability, Brier, NLL), and
    with a stored temperature the same before -> after it ("calibration" in the JSON);
  * the worst queries by nDCG and the most confident mistakes;
  * with several product_locale values (prepare_esci.py --locale all), the headline metrics per locale.
PNG plots (confusion matrix, score per true label, ROC, reliability diagram) go next to the JSON.

    python eval.py --base_model Qwen/Qwen3-0.6B --lora_model outputs/qwen3-esci-lora \\
        --eval_file data/esci_multiclass_test.parquet --save_scores_path scores.parquet
    torchrun --nproc_per_node 4 eval.py ...       # each GPU scores a quarter; rank 0 gathers and writes
"""

from __future__ import annotations

import argparse
import copy
import logging
import os

import numpy as np
import pandas as pd

from esci_dataset import LABEL_TO_ID, QWEN3_RERANKER_INSTRUCT, ESCIDataError, load_esci_parquet, query_groups
from tiny_reranker import distributed
from tiny_reranker.baselines import BASELINES, qwen3_reranker_p_yes, ranking_metrics
from tiny_reranker.cli import (
    ArgumentParser,
    HelpFormatter,
    add_inference_args,
    check_output_file,
    check_outputs_apart,
    cli_error,
    dtype_flag,
    positive_int,
    reranker_from_args,
    save_or_fallback,
    set_up_logging,
)
from tiny_reranker.contract import LABEL_CONFIG_NAME
from tiny_reranker.io import write_json
from tiny_reranker.model_files import check_model_paths
from tiny_reranker.modeling import resolve_dtype
from tiny_reranker.report import (
    build_report,
    misclassified_examples,
    print_report,
    scores_frame,
    temperature_info,
    temperature_line,
)
from tiny_reranker.scoring import OUTPUT_COLUMNS, probs_from_logits

logger = logging.getLogger("eval")
SCORE_FORMATS = (".parquet", ".csv")
SCORE_COLUMNS = ("true_label", *OUTPUT_COLUMNS)  # what --save_scores_path adds to the input columns


def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    add_inference_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--eval_file", type=str, required=True, help=".parquet, .csv or .jsonl with query, item_text, esci_label (query_id optional, used for nDCG)")
    g.add_argument("--max_samples", type=positive_int, default=None, help="evaluate only the first N rows (quick checks)")

    g = p.add_argument_group("off-the-shelf baseline (is fine-tuning worth it?)")
    g.add_argument("--baseline", choices=BASELINES, default=None,
                   help="also score this baseline and report its nDCG and AUCs beside the model's: qwen3-reranker = "
                        "Qwen3-Reranker's published yes/no prompt, ranking by P(yes)")
    g.add_argument("--baseline_model", type=str, default=None,
                   help="the model --baseline scores (default: --base_model); e.g. a Qwen3-Reranker-0.6B folder")
    g.add_argument("--baseline_instruction", type=str, default=QWEN3_RERANKER_INSTRUCT,
                   help="the Instruct line of the baseline's prompt (default: Qwen3-Reranker's published one, %(default)r)")

    g = p.add_argument_group("outputs")
    g.add_argument("--save_scores_path", type=str, default=None,
                   help="write every input column plus true_label, pred_label, p_E, p_S, p_C, p_I, score (.parquet or "
                        ".csv by extension), in input order")
    g.add_argument("--column_prefix", type=str, default="",
                   help="write our columns in --save_scores_path as PREFIX + name (e.g. eval_ -> eval_score); needed "
                        f"when the eval file already has a column named {', '.join(SCORE_COLUMNS)} (default: %(default)r)")
    g.add_argument("--metrics_path", type=str, default=None,
                   help="metrics JSON (default: <lora_model>/eval_metrics.json; without an adapter "
                        "outputs/eval/<base model folder name>/eval_metrics.json)")
    g.add_argument("--no_plots", action="store_true",
                   help="do not draw the PNG plots otherwise written next to --metrics_path and named after it "
                        "(eval_metrics.json -> eval_confusion_matrix.png, eval_score_distribution.png, eval_roc.png, "
                        "eval_reliability.png)")
    return p


# ---------------------------------------------------------------------------
# Inputs and outputs
# ---------------------------------------------------------------------------
def check_outputs(args, metrics_path: str) -> None:
    """Before the model loads: every output can be written (ESCIDataError naming the flag otherwise)."""
    check_outputs_apart({"--metrics_path": metrics_path, "--save_scores_path": args.save_scores_path},
                        {"--eval_file": args.eval_file, "--base_model": args.base_model, "--lora_model": args.lora_model})
    check_output_file(metrics_path, "--metrics_path")  # after: its write probe must not touch an input folder
    if args.save_scores_path:
        if not args.save_scores_path.endswith(SCORE_FORMATS):
            raise ESCIDataError(f"--save_scores_path {args.save_scores_path}: must end in .parquet or .csv")
        check_output_file(args.save_scores_path, "--save_scores_path")


def load_eval_data(args) -> pd.DataFrame:
    """The validated eval file (first --max_samples rows); with --save_scores_path, none of its columns may be
    one we would write (a user's own ``score`` column is never silently replaced)."""
    df = load_esci_parquet(args.eval_file)
    if args.save_scores_path:
        clash = [args.column_prefix + name for name in SCORE_COLUMNS if args.column_prefix + name in df.columns]
        if clash:
            raise ESCIDataError(
                f"{args.eval_file}: column(s) {', '.join(map(repr, clash))} would be overwritten in --save_scores_path "
                f"{args.save_scores_path}; rename {'it' if len(clash) == 1 else 'them'}, or pass --column_prefix PREFIX "
                f"to write ours as PREFIX + name (e.g. --column_prefix eval_ gives "
                f"{', '.join('eval_' + name.removeprefix(args.column_prefix) for name in clash)})")
    return df.head(args.max_samples) if args.max_samples is not None else df


def adapter_description(args) -> str | None:
    """The adapter the report names; a merged export (export.py) counts as one. None: zero-shot."""
    if args.lora_model:
        return args.lora_model
    if os.path.isfile(os.path.join(os.path.expanduser(args.base_model), LABEL_CONFIG_NAME)):
        return f"merged into --base_model {args.base_model} (export.py --format merged)"
    return None


def default_metrics_path(base_model: str, lora_model: str | None) -> str:
    """Beside the adapter; without one, ``outputs/eval/<base model's name>/`` (git ignores ``outputs/``): never the
    current folder, and never inside the base model's folder."""
    if lora_model:
        return os.path.join(lora_model, "eval_metrics.json")
    name = os.path.basename(os.path.normpath(os.path.expanduser(base_model))) or "base_model"
    return os.path.join("outputs", "eval", name, "eval_metrics.json")


def plot_prefix(metrics_path: str) -> str:
    """Plot file prefix from the metrics file name: eval_metrics.json -> "eval_", run1.json -> "run1_"."""
    stem = os.path.splitext(os.path.basename(metrics_path))[0]
    return stem[: -len("metrics")] if stem.endswith("metrics") else f"{stem}_"


def write_table(frame: pd.DataFrame, tmp: str, path: str) -> None:
    """``frame`` into ``tmp`` in the format of ``path``'s extension (``tmp`` is the atomic write's temp name)."""
    if path.endswith(".csv"):
        frame.to_csv(tmp, index=False)
    else:
        frame.to_parquet(tmp, index=False)


def score_baseline(args, df: pd.DataFrame, shard) -> dict:
    """``--baseline``'s ranking metrics on ``df`` (every rank scores its share; rank 0 gets the metrics, the
    others None), as the report's ``baseline`` block."""
    model = args.baseline_model or args.base_model
    logger.info("scoring the %s baseline with %s", args.baseline, model)
    mine = qwen3_reranker_p_yes(model, shard.take(df["query"].tolist()), shard.take(df["item_text"].tolist()),
                                resolve_dtype(dtype_flag(args)), shard.device, args.max_length, args.batch_size,
                                args.max_batch_tokens or None, args.no_flash_attn, args.baseline_instruction)
    p_yes = shard.gather(mine[:, None], len(df))
    if p_yes is None:
        return None
    y_true = df["esci_label"].map(LABEL_TO_ID).to_numpy()
    return {"name": args.baseline, "model": model, "instruction": args.baseline_instruction, "score": "P(yes)",
            **ranking_metrics(query_groups(df).to_numpy(), y_true, p_yes[:, 0])}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
def logged(what: str, path: str, rc: int) -> int:
    """``rc`` of a write, logging the path when it succeeded (a failure has printed its own error)."""
    if rc == 0:
        logger.info("%s written to %s", what, path)
    return rc


def write_plots(df: pd.DataFrame, logits: np.ndarray, temperature: dict, metrics_path: str) -> int:
    """The four PNGs next to the metrics JSON, on the report's probabilities (the temperature applied unless
    --no_temperature), with the raw and calibrated reliability side by side."""
    from tiny_reranker.plots import plot_eval  # matplotlib loads only when plots are drawn

    y_true = df["esci_label"].map(LABEL_TO_ID).to_numpy()
    calibrated = probs_from_logits(logits, temperature["value"]) if temperature["value"] is not None else None
    folder = os.path.dirname(metrics_path) or "."  # logged as given, like every other output path
    try:
        paths = plot_eval(y_true, probs_from_logits(logits), folder, plot_prefix(metrics_path), calibrated,
                          use_calibrated=temperature["applied"])  # the probabilities the report shows
    except OSError as exc:
        return cli_error(f"plots: writing into {folder} failed ({exc.strerror or exc}); the metrics and scores are not affected (where they went is logged above)")
    logger.info("plots written: %s", ", ".join(paths))
    return 0


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    # 1. Arguments, processes, logging (under torchrun only rank 0 logs progress) ------
    args = make_parser().parse_args(argv)
    shard = distributed.start()  # torchrun: this rank's share of the rows; one process: all of them
    set_up_logging(logger, args, shard.is_main)
    metrics_path = args.metrics_path or default_metrics_path(args.base_model, args.lora_model)

    # 2. Checks before the slow steps, then data and model ------------------------------
    # (errors print on every rank: all ranks see the same input, and a failure on one alone must show)
    try:
        check_model_paths(args.base_model, args.lora_model)
        if args.baseline_model and not args.baseline:
            raise ESCIDataError("--baseline_model names the model for --baseline; pass --baseline qwen3-reranker too")
        if args.baseline:
            check_model_paths(args.baseline_model or args.base_model, None)
        check_outputs(args, metrics_path)
        df = load_eval_data(args)
        reranker = reranker_from_args(args, device=shard.device)
        temperature = temperature_info(args.base_model, args.lora_model, args.no_temperature)
    except ESCIDataError as exc:
        return cli_error(exc)
    except (OSError, ValueError) as exc:
        return cli_error(f"cannot load the model (--base_model {args.base_model}, --lora_model {args.lora_model}): {exc}")
    logger.info("evaluating %d pairs from %s with %s%s on %d process(es); %s", len(df), args.eval_file, args.base_model,
                f" + {args.lora_model}" if args.lora_model else " (no adapter)", shard.world_size,
                temperature_line(temperature))
    # a copy of the encoder, so the example does not count twice in the truncation summary
    first = copy.copy(reranker.encoder).encode_batch(df["query"].iloc[:1].tolist(), df["item_text"].iloc[:1].tolist())[0]
    logger.info("example prompt (%d tokens, label %s):\n%s", len(first), df["esci_label"].iloc[0],
                reranker.tokenizer.decode(first))

    # 3. Score this rank's rows (length-sorted batches, last position); rank 0 gathers in input order
    mine = reranker.predict_logits(shard.take(df["query"].tolist()), shard.take(df["item_text"].tolist()),
                                   progress=shard.is_main)
    logits = shard.gather(mine, len(df))
    applied_t, warning = reranker.temperature, reranker.encoder.truncation_warning()  # (torchrun: rank 0's share)
    baseline = None
    if args.baseline:  # every rank scores its share of the baseline too, before rank 0 goes on alone
        del reranker  # one model in memory at a time
        try:
            baseline = score_baseline(args, df, shard)
        except ESCIDataError as exc:
            return cli_error(f"--baseline {args.baseline}: {exc}")
        except (OSError, ValueError) as exc:
            return cli_error(f"--baseline {args.baseline}: cannot load {args.baseline_model or args.base_model}: {exc}")
    if not shard.is_main:
        return 0
    try:
        probs = probs_from_logits(logits, applied_t)  # exactly what Reranker and predict.py give
    except ESCIDataError as exc:  # non-finite logits: a broken adapter or an overflowing dtype
        return cli_error(f"--base_model {args.base_model}, --lora_model {args.lora_model}: {exc}")
    if warning:
        logger.warning("eval data: %s", warning)

    # 4. Metrics and the printed report ------------------------------------------------
    report = build_report(df, logits, probs, temperature)
    report["adapter"] = adapter_description(args)
    report["misclassified_examples"] = misclassified_examples(scores_frame(df[["query", "item_text", "esci_label"]],
                                                                           probs))
    if baseline is not None:
        report["baseline"] = baseline
    report["config"] = vars(args)
    print_report(report, report["adapter"])

    # 5. Write scores, metrics, plots (a write that fails keeps the results in the temp folder) -
    rc = 0
    if args.save_scores_path:
        path, frame = args.save_scores_path, scores_frame(df, probs, args.column_prefix)
        rc = max(rc, logged("scores", path, save_or_fallback(path, lambda tmp: write_table(frame, tmp, path),
                                                              "--save_scores_path")))
    rc = max(rc, logged("metrics", metrics_path,
                        save_or_fallback(metrics_path, lambda tmp: write_json(tmp, report), "--metrics_path")))
    if not args.no_plots:
        rc = max(rc, write_plots(df, logits, temperature, metrics_path))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
