"""Pair files in and out: reading and validating (query, item_text) pairs from parquet, CSV and JSON lines, in
chunks, and writing them back with the predictions added (``predict.py``'s data contract).

A JSON line is a pair ``{"query", "item_text"}`` or a request ``{"query", "items": [...]}``. Tables keep every
input column; a request is answered by one line with its items ranked (``results``). Our columns are added
as ``prefix + name`` and never replace one of the user's.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from esci_dataset import ESCIDataError, read_csv_strict, read_table, require_columns, validate_text_column
from tiny_reranker.io import dumps_strict
from tiny_reranker.scoring import prediction_columns, prediction_records, rank_results

TABLE_FORMATS = (".parquet", ".csv", ".jsonl")


_SHOW = 5  # bad lines quoted in an error message


def extension(path: str, flag: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in TABLE_FORMATS:
        raise ESCIDataError(f"{flag} {path}: unsupported format {ext or '(no extension)'!r}; use "
                            f"{', '.join(TABLE_FORMATS)}" + (" or - for JSON lines on stdin" if flag == "--input" else ""))
    return ext


def validate_pairs(df: pd.DataFrame, path: str) -> pd.DataFrame:
    """``df`` with ``query`` and ``item_text`` checked as text (both columns' problems reported at once);
    row numbers in messages are ``df``'s index."""
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


def read_pairs_table(path: str) -> pd.DataFrame:
    """A .parquet or .csv file of pairs, validated; row order kept, index 0..n-1. Raises ESCIDataError."""
    return validate_pairs(read_table(path).reset_index(drop=True), path)


def iter_table_chunks(path: str, chunk_size: int) -> Iterator[pd.DataFrame]:
    """A .parquet (row batches) or .csv file of pairs in validated chunks of ``chunk_size`` rows, in order; each
    chunk's index is its rows' place in the file (0-based), so messages name the file's rows. At least one chunk,
    empty for a file without rows, so the output still gets its columns."""
    if not os.path.exists(path):
        raise ESCIDataError(f"{path}: file not found")
    if path.lower().endswith(".csv"):
        chunks = read_csv_strict(path, chunksize=chunk_size)
    else:
        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises many types for unreadable files
            raise ESCIDataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
        index_columns = [c for c in (parquet.schema_arrow.pandas_metadata or {}).get("index_columns", [])
                         if isinstance(c, str)]  # a saved pandas index is not data (pd.read_parquet drops it too)
        columns = [name for name in parquet.schema_arrow.names if name not in index_columns]
        empty = parquet.schema_arrow.empty_table().select(columns).to_pandas()
        chunks = (batch.to_pandas() for batch in parquet.iter_batches(batch_size=chunk_size, columns=columns))
    start, any_rows, problems = 0, False, []
    try:
        for chunk in chunks:
            chunk.index = pd.RangeIndex(start, start + len(chunk))
            start += len(chunk)
            any_rows = True
            try:
                yield validate_pairs(chunk, path)
            except ESCIDataError as exc:  # go on: one pass names the bad rows of every chunk
                if "missing required column" in str(exc):
                    raise
                problems.append(str(exc))
    except ESCIDataError:
        raise
    except Exception as exc:  # a file damaged past its header
        raise ESCIDataError(f"{path}: unreadable near row {start} ({type(exc).__name__}: {exc})") from None
    if problems:
        more = f" (and {len(problems) - _SHOW} more chunks with bad rows)" if len(problems) > _SHOW else ""
        raise ESCIDataError("; ".join(problems[:_SHOW]) + more)
    if not any_rows:
        yield validate_pairs(pd.read_csv(path, dtype=str, nrows=0) if path.lower().endswith(".csv") else empty, path)


def iter_jsonl_chunks(lines: Iterable[str], source: str, chunk_size: int) -> Iterator[list[dict]]:
    """Pair and request objects from JSON lines, in chunks of at least ``chunk_size`` pairs (a request is never
    split: its items count as pairs); blank lines are skipped. Bad lines are collected over the whole input and
    raised at its end as one ESCIDataError naming them (1-based), so a full pass validates everything."""
    chunk, pairs, problems, number, yielded = [], 0, [], 0, False
    try:
        for number, line in enumerate(lines, start=1):
            record, problem = _parse_line(number, line)
            if problem:
                problems.append(problem)
            elif record is not None:
                chunk.append(record)
                pairs += len(record["items"]) if "items" in record else 1
                if pairs >= chunk_size:
                    yield chunk
                    chunk, pairs, yielded = [], 0, True
    except UnicodeDecodeError as exc:
        raise ESCIDataError(f"{source}: not UTF-8 text (near line {number + 1}: {exc.reason})") from None
    if problems:
        more = f" (and {len(problems) - _SHOW} more)" if len(problems) > _SHOW else ""
        raise ESCIDataError(f"{source}: {len(problems)} bad JSON line(s) (lines are 1-based): "
                            + "; ".join(problems[:_SHOW]) + more)
    if chunk or not yielded:  # the rest; or one empty chunk for an input without records
        yield chunk


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


def _parse_line(number: int, line: str) -> tuple[dict | None, str | None]:
    """``(record, None)`` for a good pair or request line, ``(None, problem)`` for a bad one, ``(None, None)``
    for a blank one."""
    if not line.strip():
        return None, None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"line {number}: not valid JSON ({exc.msg}): {_clip(line.strip())}"
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        return None, f"line {number}: cannot be read as JSON ({str(exc).split(';')[0]}): {_clip(line.strip())}"
    except RecursionError:
        return None, f"line {number}: JSON nested too deeply: {_clip(line.strip())}"
    problem = _line_problem(obj)
    return (None, f"line {number}: {problem}") if problem else (obj, None)


def parse_jsonl(lines: Iterable[str], source: str) -> list[dict]:
    """Pair and request objects from JSON lines (blank lines skipped). Raises ESCIDataError naming bad lines (1-based)."""
    return [record for chunk in iter_jsonl_chunks(lines, source, chunk_size=2**62) for record in chunk]


def read_jsonl_file(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise ESCIDataError(f"{path}: file not found")
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is not text
        return parse_jsonl(f, path)


def flat_pairs(df: pd.DataFrame | None, records: list[dict] | None) -> tuple[list[str], list[str]]:
    if df is not None:
        return df["query"].tolist(), df["item_text"].tolist()
    queries, items = [], []
    for rec in records:
        texts = rec["items"] if "items" in rec else [rec["item_text"]]
        queries += [rec["query"]] * len(texts)
        items += texts
    return queries, items


def added_names(prefix: str, request: bool = False, rank_by: str = "score") -> list[str]:
    """The columns/fields predict adds to a table row or pair line, or to a ``{query, items}`` request."""
    return [prefix + name for name in (["results"] if request else prediction_columns(np.zeros((0, 4)), rank_by))]


def check_no_clash(df: pd.DataFrame | None, records: list[dict] | None, prefix: str, source: str,
                   rank_by: str = "score") -> None:
    """Refuse input that already has a column/field we would write: never overwrite user data silently."""
    if df is not None:
        clash = [name for name in added_names(prefix, rank_by=rank_by) if name in df.columns]
    else:
        clash = sorted({name for rec in records for name in added_names(prefix, "items" in rec, rank_by) if name in rec})
    if clash:
        kind = "column(s)" if df is not None else "field(s)"
        raise ESCIDataError(
            f"{source}: input {kind} {', '.join(map(repr, clash))} would be overwritten by the predictions; "
            f"rename {'it' if len(clash) == 1 else 'them'}, or pass --column_prefix PREFIX to write ours as "
            f"PREFIX + name (e.g. --column_prefix pred_ gives {', '.join('pred_' + n for n in clash)})")


def with_predictions(df: pd.DataFrame | None, records: list[dict] | None, probs: np.ndarray, top_k: int | None,
                     prefix: str = "", rank_by: str = "score"):
    """Put ``probs`` (in :func:`flat_pairs` order) back: columns on a table; fields or ranked ``results`` on lines.

    Every added name starts with ``prefix``; the fields inside ``results`` are ours alone and are not prefixed.
    ``rank_by``: what requests' items are sorted by (``expected_gain`` also adds that column/field).
    """
    if df is not None:
        return df.assign(**{prefix + name: values for name, values in prediction_columns(probs, rank_by).items()}), None
    preds, out = iter(prediction_records(probs, rank_by)), []
    for rec in records:
        if "items" in rec:
            ranked = rank_results(rec["items"], [next(preds) for _ in rec["items"]], top_k, rank_by)
            out.append({**{k: v for k, v in rec.items() if k != "items"}, prefix + "results": ranked})
        else:
            out.append({**rec, **{prefix + name: value for name, value in next(preds).items()}})
    return None, out


def jsonl_lines(records: Iterable[dict]) -> Iterable[str]:
    """One strict JSON object per line: NaN/±inf (ours or the user's) become null, never ``NaN``/``Infinity``."""
    for rec in records:
        yield dumps_strict(rec, ensure_ascii=False) + "\n"


def write_output(path: str, ext: str, df: pd.DataFrame | None, records: list[dict] | None, header: bool = True,
                 columns: list[str] | None = None) -> None:
    """Write a scored table (``df``) or scored JSON records to ``path`` in the format of ``ext`` (``path`` is the
    temp file of an atomic write). ``header``: a CSV's header line (not for the chunks after the first).
    ``columns``: for records, the columns of the whole output in order (:func:`record_columns` over every chunk),
    so that chunks written apart line up; a field a chunk lacks is empty there."""
    if ext == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(jsonl_lines(records if records is not None else df.to_dict(orient="records")))
        return
    table = df if df is not None else pd.DataFrame(records)
    if df is None and columns is not None:
        table = pd.DataFrame({c: table[c] if c in table else pd.Series([None] * len(table), dtype=object)
                              for c in columns})
    if ext == ".parquet":
        table.to_parquet(path, index=False)
    else:
        table.to_csv(path, index=False, header=header)


def record_columns(records: Iterable[dict], prefix: str, seen: dict | None = None, rank_by: str = "score") -> dict:
    """The table columns scored records make, in the order pandas would give one frame of all of them (first
    seen first): each record's fields, then the prediction columns. ``seen``: the dict to extend (chunk by
    chunk); its keys are the columns."""
    seen = {} if seen is None else seen
    for record in records:
        for name in [*record, *added_names(prefix, "items" in record, rank_by)]:
            seen.setdefault(name, None)
    return seen


def unwritable_parquet_field(schema) -> str | None:
    """The first field parquet cannot store (a struct with no fields, from an empty JSON object), or None."""
    import pyarrow as pa

    def bad(kind) -> bool:
        if pa.types.is_struct(kind):
            return kind.num_fields == 0 or any(bad(kind.field(i).type) for i in range(kind.num_fields))
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            return bad(kind.value_type)
        return False

    return next((field.name for field in schema if bad(field.type)), None)
