"""Score (query, item_text) pairs with a trained reranker: a file in, the same rows plus predictions out.

Added columns: p_E, p_S, p_C, p_I (softmax over the four labels), score = (3·p_E + 2·p_S + p_C) / 3
and pred_label (the argmax). Scoring is reranker.Reranker, the same path as eval.py.

Files:   python predict.py --base_model Qwen/Qwen3-0.6B --lora_model outputs/lora --input pairs.parquet --output scored.parquet
Stdin:   echo '{"query": "usb c charger", "items": ["Anker 65W charger", "HDMI cable"]}' | python predict.py --base_model ... --input -

Input: .parquet, .csv or .jsonl with columns query and item_text (other columns are kept),
or JSON lines on stdin ("-"). A JSON line is a pair {"query", "item_text"} or a request
{"query", "items": [...]}; blank lines are skipped. The output format follows --output's
extension (.parquet/.csv/.jsonl); without --output, JSON lines go to stdout. A pair line
gets the prediction fields added; a request line is answered by ONE line: the request
without "items", plus "results", its items ranked by score, each {index, item, p_*, score,
pred_label}, cut to --top_k. Requests can only be written as JSON lines.
Blank or non-text query/item values are errors (exit 2); files are written atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Iterable

import numpy as np
import pandas as pd

from esci_dataset import ESCIDataError, atomic_write, read_table, require_columns, validate_text_column
from reranker import (
    PROB_COLUMNS,
    add_inference_args,
    check_model_paths,
    prediction_columns,
    prediction_records,
    rank_results,
    reranker_from_args,
)

logger = logging.getLogger("predict")

TABLE_FORMATS = (".parquet", ".csv", ".jsonl")
_SHOW = 5  # bad lines quoted in an error message


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add_inference_args(p)

    g = p.add_argument_group("input and output")
    g.add_argument("--input", type=str, required=True, help="a .parquet/.csv/.jsonl file with query and item_text columns, or - for JSON lines on stdin")
    g.add_argument("--output", type=str, default=None, help="output file, format by extension (.parquet/.csv/.jsonl); default: JSON lines on stdout")
    g.add_argument("--top_k", type=int, default=None, help="for {query, items} requests: keep only the best K ranked items")
    return p


# ---------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------
def extension(path: str, flag: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in TABLE_FORMATS:
        raise ESCIDataError(f"{flag} {path}: unsupported format {ext or '(no extension)'!r}; use "
                            f"{', '.join(TABLE_FORMATS)}" + (" or - for JSON lines on stdin" if flag == "--input" else ""))
    return ext


def read_pairs_table(path: str) -> pd.DataFrame:
    """A .parquet or .csv file of pairs, validated; row order kept, index 0..n-1. Raises ESCIDataError."""
    if path.lower().endswith(".csv"):
        if not os.path.exists(path):
            raise ESCIDataError(f"{path}: file not found")
        try:  # all text: no number parsing of ids, and a title "NA" stays "NA"; only empty cells are missing
            df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        except Exception as exc:  # pandas raises several types for unreadable CSV
            raise ESCIDataError(f"{path}: not a readable CSV file ({type(exc).__name__}: {exc})") from None
    else:
        df = read_table(path)
    df = df.reset_index(drop=True)
    require_columns(df, ("query", "item_text"), path)
    problems = []
    for column in ("query", "item_text"):  # report both columns at once, not one per run
        try:
            df[column] = validate_text_column(df, column, path)
        except ESCIDataError as exc:
            problems.append(str(exc))
    if problems:
        raise ESCIDataError("; ".join(problems))
    return df


def _is_text(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _line_problem(obj) -> str | None:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {_short(obj)}"
    if not _is_text(obj.get("query")):
        return f"'query' is missing, empty or not text: {_short(obj.get('query'))}"
    if ("item_text" in obj) == ("items" in obj):
        return "needs exactly one of 'item_text' (a pair) or 'items' (a request)"
    if "item_text" in obj:
        return None if _is_text(obj["item_text"]) else f"'item_text' is empty or not text: {_short(obj['item_text'])}"
    items = obj["items"]
    if not isinstance(items, list):
        return f"'items' must be a list of strings, got {_short(items)}"
    bad = [f"items[{i}]={_short(v)}" for i, v in enumerate(items) if not _is_text(v)]
    return f"empty or non-text item(s): {', '.join(bad[:_SHOW])}" if bad else None


def parse_jsonl(lines: Iterable[str], source: str) -> list[dict]:
    """Pair and request objects from JSON lines (blank lines skipped). Raises ESCIDataError naming bad lines (1-based)."""
    records, problems, number = [], [], 0
    try:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"line {number}: not valid JSON ({exc.msg}): {_short(line.strip())}")
                continue
            problem = _line_problem(obj)
            if problem:
                problems.append(f"line {number}: {problem}")
            else:
                records.append(obj)
    except UnicodeDecodeError as exc:
        raise ESCIDataError(f"{source}: not UTF-8 text (near line {number + 1}: {exc.reason})") from None
    if problems:
        more = f" (and {len(problems) - _SHOW} more)" if len(problems) > _SHOW else ""
        raise ESCIDataError(f"{source}: {len(problems)} bad JSON line(s) (lines are 1-based): "
                            + "; ".join(problems[:_SHOW]) + more)
    return records


def read_jsonl_file(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise ESCIDataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        return parse_jsonl(f, path)


# ---------------------------------------------------------------------------
# Scoring: every pair (table rows, pair lines, request items) in one flat list
# ---------------------------------------------------------------------------
def flat_pairs(df: pd.DataFrame | None, records: list[dict] | None) -> tuple[list[str], list[str]]:
    if df is not None:
        return df["query"].tolist(), df["item_text"].tolist()
    queries, items = [], []
    for rec in records:
        texts = rec["items"] if "items" in rec else [rec["item_text"]]
        queries += [rec["query"]] * len(texts)
        items += texts
    return queries, items


def with_predictions(df: pd.DataFrame | None, records: list[dict] | None, probs: np.ndarray, top_k: int | None):
    """Put ``probs`` (in :func:`flat_pairs` order) back: columns on a table; fields or ranked ``results`` on lines."""
    if df is not None:
        return df.assign(**prediction_columns(probs)), None
    preds, out = iter(prediction_records(probs)), []
    for rec in records:
        if "items" in rec:
            ranked = rank_results(rec["items"], [next(preds) for _ in rec["items"]], top_k)
            out.append({**{k: v for k, v in rec.items() if k != "items"}, "results": ranked})
        else:
            out.append({**rec, **next(preds)})
    return None, out


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------
def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)  # timestamps, decimals, ...


def _clean(value):
    """NaN / NA -> None, so every line is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def jsonl_lines(records: Iterable[dict]) -> Iterable[str]:
    for rec in records:
        yield json.dumps({k: _clean(v) for k, v in rec.items()}, ensure_ascii=False, default=_json_default) + "\n"


def write_output(path: str, df: pd.DataFrame | None, records: list[dict] | None) -> None:
    """Write a scored table (``df``) or scored JSON records to ``path`` by its extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        lines = jsonl_lines(records if records is not None else df.to_dict(orient="records"))

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(lines)
    else:
        table = df if df is not None else pd.DataFrame(records)
        write = (lambda tmp: table.to_parquet(tmp, index=False)) if ext == ".parquet" else \
            (lambda tmp: table.to_csv(tmp, index=False))
    atomic_write(path, write)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
def read_input(args) -> tuple[pd.DataFrame | None, list[dict] | None]:
    """``(table, None)`` for .parquet/.csv, ``(None, records)`` for JSON lines (file or stdin)."""
    if args.input == "-":
        return None, parse_jsonl(sys.stdin, "<stdin>")
    if extension(args.input, "--input") == ".jsonl":
        return None, read_jsonl_file(args.input)
    return read_pairs_table(args.input), None


def check_output(args, records: list[dict] | None) -> None:
    if args.output is None:
        return
    ext = extension(args.output, "--output")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise ESCIDataError(f"--output {args.output}: folder {out_dir} does not exist")
    if ext != ".jsonl" and records is not None and any("items" in r for r in records):
        raise ESCIDataError(f"--output {args.output}: {{query, items}} requests produce ranked lists; "
                            "write them as .jsonl or to stdout")


def main(argv: list[str] | None = None) -> int:
    # 1. Arguments and logging (stderr only: stdout may carry the JSON lines) -----
    args = make_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stderr)
    logger.info("arguments: %s", json.dumps(vars(args), sort_keys=True))
    if args.top_k is not None and args.top_k < 0:
        print(f"error: --top_k must be >= 0, got {args.top_k}", file=sys.stderr)
        return 2

    try:
        # 2. Input and output checks, before the (slow) model load ------------
        check_model_paths(args.base_model, args.lora_model)
        df, records = read_input(args)
        check_output(args, records)
    except ESCIDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    queries, items = flat_pairs(df, records)
    logger.info("%d pair(s) to score from %s", len(queries), args.input)

    # 3. Model (skipped when there is nothing to score) ---------------------------
    reranker = None
    if queries:
        try:
            reranker = reranker_from_args(args)
        except (OSError, ValueError) as exc:  # missing/unloadable model, or an adapter with a different prompt
            print(f"error: cannot load the reranker (--base_model {args.base_model}, --lora_model {args.lora_model}): "
                  f"{exc}", file=sys.stderr)
            return 2

    # 4. Score (length-sorted batches; output keeps input order) ---------------
    if reranker is None:
        logger.warning("%s has no pairs; writing an empty output", args.input)
        probs = np.zeros((0, len(PROB_COLUMNS)))
    else:
        probs = reranker.predict_probs(queries, items, progress=args.input != "-")  # tqdm on stderr for files
    df, records = with_predictions(df, records, probs, args.top_k)

    # 5. Write ------------------------------------------------------------------
    if args.output is None:
        sys.stdout.writelines(jsonl_lines(records if records is not None else df.to_dict(orient="records")))
        sys.stdout.flush()
    else:
        write_output(args.output, df, records)
        logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
