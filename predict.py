"""Score (query, item_text) pairs with a trained reranker: a file in, the same rows plus predictions out.

Added columns: p_E, p_S, p_C, p_I (softmax over the four labels), score = (3·p_E + 2·p_S + p_C) / 3
and pred_label (the argmax). Scoring is tiny_reranker.Reranker, the same path as eval.py.

Files:   python predict.py --base_model Qwen/Qwen3-0.6B --lora_model outputs/lora --input pairs.parquet --output scored.parquet
Stdin:   echo '{"query": "usb c charger", "items": ["Anker 65W charger", "HDMI cable"]}' | python predict.py --base_model ... --input -

Input: .parquet, .csv or .jsonl with columns query and item_text (other columns are kept),
or JSON lines on stdin ("-"). A JSON line is a pair {"query", "item_text"} or a request
{"query", "items": [...]}; blank lines are skipped. The output format follows --output's
extension (.parquet/.csv/.jsonl); without --output, JSON lines go to stdout. A pair line
gets the prediction fields added; a request line is answered by ONE line: the request
without "items", plus "results", its items ranked by score, each {index, item, p_*, score,
pred_label}, cut to --top_k. Requests can only be written as JSON lines.

Input columns are never overwritten: if one is named like an output (p_E ... pred_label, or
results for a request), predict refuses and asks for --column_prefix, which writes ours as
PREFIX + name. JSON output is strict: NaN and infinities become null.

Bad input (a blank or non-text query/item, a line that is not a JSON object) is an error,
exit 2, checked with --output before the model loads. Files are written atomically; if the
final write fails (a full disk), the results go to the system temp folder and the error says where.

A temperature stored with the adapter (train.py --calibrate) divides the label logits before the
softmax; --no_temperature scores the raw logits. Several GPUs: torchrun --nproc_per_node N predict.py
... --input FILE: each rank scores its share of the pairs, rank 0 writes them in input order.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from esci_dataset import ESCIDataError, read_table, require_columns, validate_text_column
from tiny_reranker import distributed
from tiny_reranker.cli import (
    ArgumentParser,
    HelpFormatter,
    add_inference_args,
    check_output_file,
    check_outputs_apart,
    cli_error,
    reranker_from_args,
    save_or_fallback,
    set_up_logging,
)
from tiny_reranker.io import dumps_strict
from tiny_reranker.model_files import check_model_paths
from tiny_reranker.scoring import (
    OUTPUT_COLUMNS,
    PROB_COLUMNS,
    prediction_columns,
    prediction_records,
    probs_from_logits,
    rank_results,
)

logger = logging.getLogger("predict")

TABLE_FORMATS = (".parquet", ".csv", ".jsonl")
_SHOW = 5  # bad lines quoted in an error message


def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    add_inference_args(p)

    g = p.add_argument_group("input and output")
    g.add_argument("--input", type=str, required=True, help="a .parquet/.csv/.jsonl file with query and item_text columns, or - for JSON lines on stdin")
    g.add_argument("--output", type=str, default=None,
                   help="output file, format by extension (.parquet/.csv/.jsonl); its folder is created if needed. "
                        "Without it: JSON lines on stdout")
    g.add_argument("--top_k", type=int, default=None, help="for {query, items} requests: keep only the best K ranked items (without it: all)")
    g.add_argument("--column_prefix", type=str, default="",
                   help="write our columns as PREFIX + name (e.g. pred_ -> pred_score); needed when the input already "
                        f"has a column or field named {', '.join(OUTPUT_COLUMNS)} (or results, for requests) (default: %(default)r)")
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
    df = read_table(path).reset_index(drop=True)
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


def _clip(text: str) -> str:
    """``text`` cut to 80 characters, lone surrogates shown as ``\\udXXX`` escapes (they cannot be printed)."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 80 else text[:77] + "..."


def _short(v) -> str:
    """A JSON value as the user wrote it (``null``, ``"text"``, ``[1, 2]``), clipped."""
    try:
        return _clip(json.dumps(v, ensure_ascii=False))
    except (TypeError, ValueError):
        return _clip(repr(v))


def _strings(obj) -> Iterable[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield key
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)


def _not_unicode(obj) -> str | None:
    """The first key or string in ``obj`` with an unpaired surrogate, else None.

    ``"\\ud800"`` is valid JSON but not text: the tokenizer and the UTF-8 output cannot
    take it. Undecodable bytes on stdin arrive as such surrogates too.
    """
    for text in _strings(obj):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return text
    return None


def _line_problem(obj) -> str | None:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {_short(obj)}"
    if not _is_text(obj.get("query")):
        return f"'query' is missing, empty or not text: {_short(obj.get('query'))}"
    if ("item_text" in obj) == ("items" in obj):
        return "needs exactly one of 'item_text' (a pair) or 'items' (a request)"
    if "item_text" in obj and not _is_text(obj["item_text"]):
        return f"'item_text' is empty or not text: {_short(obj['item_text'])}"
    items = obj.get("items", [])
    if not isinstance(items, list):
        return f"'items' must be a list of strings, got {_short(items)}"
    bad = [f"items[{i}]={_short(v)}" for i, v in enumerate(items) if not _is_text(v)]
    if bad:
        return f"empty or non-text item(s): {', '.join(bad[:_SHOW])}"
    bad_text = _not_unicode(obj)
    if bad_text is not None:
        return f"not valid text (an unpaired surrogate such as \\ud800, or bytes that are not UTF-8): {_short(bad_text)}"
    return None


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
                problems.append(f"line {number}: not valid JSON ({exc.msg}): {_clip(line.strip())}")
                continue
            except ValueError as exc:  # e.g. an integer of more than 4300 digits
                problems.append(f"line {number}: cannot be read as JSON ({str(exc).split(';')[0]}): {_clip(line.strip())}")
                continue
            except RecursionError:
                problems.append(f"line {number}: JSON nested too deeply: {_clip(line.strip())}")
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
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is not text
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


def added_names(prefix: str, request: bool = False) -> list[str]:
    """The columns/fields predict adds to a table row or pair line, or to a ``{query, items}`` request."""
    return [prefix + name for name in (["results"] if request else OUTPUT_COLUMNS)]


def check_no_clash(df: pd.DataFrame | None, records: list[dict] | None, prefix: str, source: str) -> None:
    """Refuse input that already has a column/field we would write: never overwrite user data silently."""
    if df is not None:
        clash = [name for name in added_names(prefix) if name in df.columns]
    else:
        clash = sorted({name for rec in records for name in added_names(prefix, "items" in rec) if name in rec})
    if clash:
        kind = "column(s)" if df is not None else "field(s)"
        raise ESCIDataError(
            f"{source}: input {kind} {', '.join(map(repr, clash))} would be overwritten by the predictions; "
            f"rename {'it' if len(clash) == 1 else 'them'}, or pass --column_prefix PREFIX to write ours as "
            f"PREFIX + name (e.g. --column_prefix pred_ gives {', '.join('pred_' + n for n in clash)})")


def with_predictions(df: pd.DataFrame | None, records: list[dict] | None, probs: np.ndarray, top_k: int | None,
                     prefix: str = ""):
    """Put ``probs`` (in :func:`flat_pairs` order) back: columns on a table; fields or ranked ``results`` on lines.

    Every added name starts with ``prefix``; the fields inside ``results`` are ours alone and are not prefixed.
    """
    if df is not None:
        return df.assign(**{prefix + name: values for name, values in prediction_columns(probs).items()}), None
    preds, out = iter(prediction_records(probs)), []
    for rec in records:
        if "items" in rec:
            ranked = rank_results(rec["items"], [next(preds) for _ in rec["items"]], top_k)
            out.append({**{k: v for k, v in rec.items() if k != "items"}, prefix + "results": ranked})
        else:
            out.append({**rec, **{prefix + name: value for name, value in next(preds).items()}})
    return None, out


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------
def jsonl_lines(records: Iterable[dict]) -> Iterable[str]:
    """One strict JSON object per line: NaN/±inf (ours or the user's) become null, never ``NaN``/``Infinity``."""
    for rec in records:
        yield dumps_strict(rec, ensure_ascii=False) + "\n"


def write_output(path: str, ext: str, df: pd.DataFrame | None, records: list[dict] | None) -> None:
    """Write a scored table (``df``) or scored JSON records to ``path`` in the format of ``ext``
    (``path`` is the temp file of ``cli.save_or_fallback``'s atomic write)."""
    if ext == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(jsonl_lines(records if records is not None else df.to_dict(orient="records")))
        return
    table = df if df is not None else pd.DataFrame(records)
    if ext == ".parquet":
        table.to_parquet(path, index=False)
    else:
        table.to_csv(path, index=False)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
def read_input(args, world_size: int = 1) -> tuple[pd.DataFrame | None, list[dict] | None]:
    """``(table, None)`` for .parquet/.csv, ``(None, records)`` for JSON lines (file or stdin)."""
    if args.input == "-":
        if world_size > 1:
            raise ESCIDataError("--input -: torchrun processes cannot share stdin; write the pairs to a file")
        return None, parse_jsonl(sys.stdin, "<stdin>")
    if extension(args.input, "--input") == ".jsonl":
        return None, read_jsonl_file(args.input)
    return read_pairs_table(args.input), None


def check_output_path(args) -> None:
    """``--output`` has a known format and can be written (its folder may not exist yet)."""
    if args.output is not None:
        extension(args.output, "--output")
        check_output_file(args.output, "--output")
        check_outputs_apart({"--output": args.output}, {"--input": None if args.input == "-" else args.input,
                                                        "--base_model": args.base_model, "--lora_model": args.lora_model})


def check_output_fits(args, records: list[dict] | None) -> None:
    """The input can be written in ``--output``'s format."""
    if args.output is None:
        return
    ext = extension(args.output, "--output")
    if ext != ".jsonl" and records is not None and any("items" in r for r in records):
        raise ESCIDataError(f"--output {args.output}: {{query, items}} requests produce ranked lists; "
                            "write them as .jsonl or to stdout")
    if ext == ".parquet" and records:  # found now, not after scoring: a field whose values mix types
        try:
            pa.Table.from_pandas(pd.DataFrame(records), preserve_index=False)
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise ESCIDataError(f"--output {args.output}: the input's JSON fields do not fit parquet columns "
                                f"({str(exc).splitlines()[0]}); write .jsonl or .csv instead") from None


def main(argv: list[str] | None = None) -> int:
    # 1. Arguments, processes, logging (stderr only: stdout may carry the JSON lines) -----
    args = make_parser().parse_args(argv)
    shard = distributed.start()  # torchrun: this rank's share of the pairs; one process: all of them
    set_up_logging(logger, args, shard.is_main)  # stderr: stdout may carry the JSON lines
    if args.top_k is not None and args.top_k < 0:
        return cli_error(f"--top_k must be >= 0, got {args.top_k}")

    try:
        # 2. Input and output checks, before the (slow) model load ------------
        check_model_paths(args.base_model, args.lora_model)
        check_output_path(args)
        df, records = read_input(args, shard.world_size)
        check_output_fits(args, records)
        check_no_clash(df, records, args.column_prefix, "<stdin>" if args.input == "-" else args.input)
    except ESCIDataError as exc:
        return cli_error(exc)
    queries, items = flat_pairs(df, records)
    logger.info("%d pair(s) to score from %s", len(queries), args.input)

    # 3. Model (skipped when there is nothing to score) ---------------------------
    reranker = None
    if queries:
        try:
            reranker = reranker_from_args(args, device=shard.device)
        except (OSError, ValueError) as exc:  # missing/unloadable model, or an adapter with a different prompt
            return cli_error(f"cannot load the reranker (--base_model {args.base_model}, --lora_model {args.lora_model}): "
                             f"{exc}")

    # 4. Score this rank's pairs (length-sorted batches); rank 0 gathers them in input order ----
    if reranker is None:
        logger.warning("%s has no pairs; writing an empty output", args.input)
        probs = np.zeros((0, len(PROB_COLUMNS)))
    else:
        mine = reranker.predict_logits(shard.take(queries), shard.take(items),
                                       progress=shard.is_main and args.input != "-")  # tqdm on stderr for files
        logits = shard.gather(mine, len(queries))
        if not shard.is_main:
            return 0
        if (warning := reranker.encoder.truncation_warning()):
            logger.warning("input: %s", warning)
        try:  # on rank 0 after the gather, so a refusal never leaves other ranks waiting
            probs = probs_from_logits(logits, reranker.temperature)
        except ESCIDataError as exc:  # non-finite logits: a broken adapter or an overflowing dtype
            return cli_error(f"--base_model {args.base_model}, --lora_model {args.lora_model}: {exc}")
    if not shard.is_main:
        return 0
    df, records = with_predictions(df, records, probs, args.top_k, args.column_prefix)

    # 5. Write (if the file cannot be written now, the results go to a fallback file) -------
    if args.output is None:
        sys.stdout.writelines(jsonl_lines(records if records is not None else df.to_dict(orient="records")))
        sys.stdout.flush()
        return 0
    ext = extension(args.output, "--output")
    rc = save_or_fallback(args.output, lambda tmp: write_output(tmp, ext, df, records), "--output")
    if rc == 0:
        logger.info("wrote %s", args.output)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
