"""Turn the official Shopping Queries (ESCI) release into the parquet files train.py reads.

Input: the ``shopping_queries_dataset/`` folder of https://github.com/amazon-science/esci-data
(cloned with git-lfs). Output, in ``--output_dir``:

    esci_multiclass_train.parquet   rows whose official split is "train"
    esci_multiclass_test.parquet    rows whose official split is "test"
    esci_prepare_summary.json       arguments, counted problems, per-split statistics

Columns: query, item_text, esci_label (E/S/C/I), example_id, query_id, product_id, product_locale,
and source with --with_source. Both files load with esci_dataset.load_esci_parquet as they are.

item_text (built only by build_item_text): the non-empty fields of --item_fields,
in that order, each with its label, joined by one space:

    Title: {title} Brand: {brand} Color: {color} Features: {bullet points} Description: {description}

Each field has its HTML tags removed (inline ones such as <b> join their text; others such
as <br>, <li> become a space), entities unescaped, and every run of whitespace (newlines,
tabs) folded into one space. A null, NaN, empty or blank field is left out, label included.
The result is cut to --max_item_chars at a word boundary.

Problems (unknown labels, duplicate pairs, missing products, ...) are counted and reported
in the summary, never dropped silently. A product with an empty title is kept when its
other fields still give text. A column whose type differs from the official release (a
numeric query, integer labels, float product ids) is an error (exit 2) naming file, column,
row and value; so is an --output_dir that cannot be written, found before any work.

    python prepare_esci.py --esci_dir ../esci-data/shopping_queries_dataset
"""

from __future__ import annotations

import argparse
import functools
import html
import logging
import os
import re
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from esci_dataset import LABELS, ESCIDataError, PromptEncoder, require_columns
from tiny_reranker.cli import ArgumentParser, HelpFormatter, check_output_dir, cli_error, set_up_logging
from tiny_reranker.esci_release import EXAMPLES_FILE, PRODUCTS_FILE, SOURCES_FILE
from tiny_reranker.io import atomic_write, write_json

logger = logging.getLogger("prepare_esci")

OUTPUT_FILES = {"train": "esci_multiclass_train.parquet", "test": "esci_multiclass_test.parquet"}
SUMMARY_FILE = "esci_prepare_summary.json"
SHORT_ITEM_CHARS = 100  # below this --max_item_chars cuts most titles: warned, not refused

# --item_fields name -> (products column, label written into item_text)
ITEM_FIELDS = {
    "title": ("product_title", "Title"),
    "brand": ("product_brand", "Brand"),
    "color": ("product_color", "Color"),
    "bullet_points": ("product_bullet_point", "Features"),
    "description": ("product_description", "Description"),
}
# Column -> the kind of values the official release stores there (text: string, integer: int64).
EXAMPLE_COLUMNS = {"example_id": "integer", "query": "text", "query_id": "integer", "product_id": "text",
                   "product_locale": "text", "esci_label": "text", "split": "text"}
OUTPUT_SCHEMA = pa.schema([("query", pa.string()), ("item_text", pa.string()), ("esci_label", pa.string()),
                           ("example_id", pa.int64()), ("query_id", pa.int64()),
                           ("product_id", pa.string()), ("product_locale", pa.string())])
# What happens to a row with each problem. Every count goes to the summary, even when 0.
PROBLEMS = {
    "unknown_label": "dropped: esci_label is not one of E/S/C/I",
    "unknown_split": "dropped: split is neither train nor test",
    "blank_query": "dropped: query is null or blank",
    "duplicate_pair": "dropped: (product_locale, query_id, product_id) seen before; the first row is kept",
    "missing_product": "dropped: no (product_locale, product_id) in the products file",
    "empty_item_text": "dropped: every --item_fields field of the product is empty",
    "empty_title": "kept: the title is empty, but other fields give item_text",
    "duplicate_product": "products-file rows repeating a (product_locale, product_id); the first is used",
    "missing_source": "kept with a null source: query_id not in the sources csv",
}
_LFS_POINTER = b"version https://git-lfs"
# Inline tags vanish ("<b>case</b>." -> "case."); other tags (<br>, <li>, <p>) separate words.
_INLINE_TAG = re.compile(r"</?(?:a|b|i|u|em|strong|span|font|small|sub|sup)\b[^<>]*>", re.I)
_HTML_TAG = re.compile(r"<!--.*?-->|</?[A-Za-z][^<>]*>", re.S)  # a bare "<" or "< 5" is text, not a tag


def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    g = p.add_argument_group("input and output")
    g.add_argument("--esci_dir", type=str, required=True,
                   help=f"folder with {EXAMPLES_FILE}, {PRODUCTS_FILE} and (for --with_source) {SOURCES_FILE}")
    g.add_argument("--output_dir", type=str, default="../datasets/esci-data",
                   help="where the output files go (default: %(default)s, where scripts/run_train.sh looks for TRAIN_FILE)")
    g = p.add_argument_group("which rows")
    g.add_argument("--locale", type=str, choices=["us", "es", "jp", "all"], default="us",
                   help="product_locale to keep; 'all' keeps the three (default: %(default)s)")
    g.add_argument("--version", type=str, choices=["small", "large"], default="large",
                   help="small = Task 1 subset (small_version == 1); large = Tasks 2/3 (large_version == 1) (default: %(default)s)")
    g = p.add_argument_group("item text")
    g.add_argument("--item_fields", type=str, default="title,brand,color,bullet_points",
                   help=f"ordered comma list of fields written into item_text, from: {', '.join(ITEM_FIELDS)} (default: %(default)s)")
    # ~500 English tokens: train.py's default --max_length 512 would truncate the rest anyway.
    g.add_argument("--max_item_chars", type=int, default=2000, help="cut item_text to at most this many characters, at a word boundary (default: %(default)s)")
    g.add_argument("--with_source", action="store_true", help=f"add a 'source' column (query source) from {SOURCES_FILE}")
    g = p.add_argument_group("report")
    g.add_argument("--tokenizer", type=str, default=None,
                   help="HF tokenizer folder; the summary then reports prompt tokens (mean, p50, p95, p99, max) to pick --max_length")
    g.add_argument("--token_sample_rows", type=int, default=20000,
                   help="rows per split tokenized for that report; 0 = every row, ~25 s per 100k rows on 2 CPU cores (default: %(default)s)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = make_parser()
    args = parser.parse_args(argv)
    args.item_fields = [f.strip() for f in args.item_fields.split(",") if f.strip()]
    unknown = [f for f in args.item_fields if f not in ITEM_FIELDS]
    if not args.item_fields:
        parser.error(f"--item_fields is empty; list one or more of {', '.join(ITEM_FIELDS)}")
    if unknown:
        parser.error(f"--item_fields: unknown {', '.join(map(repr, unknown))}; use names from {', '.join(ITEM_FIELDS)}")
    if len(set(args.item_fields)) != len(args.item_fields):
        repeated = sorted({f for f in args.item_fields if args.item_fields.count(f) > 1})
        parser.error(f"--item_fields names {', '.join(repeated)} more than once")
    if args.max_item_chars < 1:
        parser.error(f"--max_item_chars must be >= 1, got {args.max_item_chars}")
    if args.max_item_chars < SHORT_ITEM_CHARS:  # allowed (titles only, on purpose), but never silently
        logger.warning("--max_item_chars %d cuts most item texts short: ESCI titles alone are often longer than %d "
                       "characters", args.max_item_chars, SHORT_ITEM_CHARS)
    if args.token_sample_rows < 0:
        parser.error(f"--token_sample_rows must be >= 0, got {args.token_sample_rows}")
    return args


# ---------------------------------------------------------------------------
# item_text: the one place it is built
# ---------------------------------------------------------------------------
def clean_text(value) -> str:
    """HTML tags removed, entities unescaped, whitespace folded. Non-strings (None, NaN, NA) give ''."""
    if not isinstance(value, str):
        return ""
    if "<" in value:
        value = _HTML_TAG.sub(" ", _INLINE_TAG.sub("", value))
    if "&" in value:
        value = html.unescape(value)  # after tag removal, so "&lt;b&gt;" stays visible text
    return " ".join(value.split())  # str.split() also splits on "\xa0" from &nbsp;


def cut_at_word(text: str, max_chars: int) -> str:
    """``text`` if it fits, else its longest prefix of <= max_chars ending at a word boundary."""
    if len(text) <= max_chars:
        return text
    space = text.rfind(" ", 0, max_chars + 1)
    return text[:space].rstrip() if space > 0 else text[:max_chars]


def build_item_text(row_fields: dict, fields, max_chars: int) -> str:
    """``row_fields`` maps --item_fields names (``title``, ``brand``, ...) to raw values; '' if all are empty."""
    parts, length = [], 0
    for name in fields:
        text = clean_text(row_fields.get(name))
        if text:
            parts.append(f"{ITEM_FIELDS[name][1]}: {text}")
            length += len(parts[-1]) + 1
            if length > max_chars:  # later fields would be cut off anyway
                break
    return cut_at_word(" ".join(parts), max_chars)


# ---------------------------------------------------------------------------
# Reading the release
# ---------------------------------------------------------------------------
def check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ESCIDataError(f"{path}: file not found. --esci_dir must be the shopping_queries_dataset/ folder of "
                            "https://github.com/amazon-science/esci-data, cloned with git-lfs installed")
    with open(path, "rb") as f:
        if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
            raise ESCIDataError(f"{path}: this is a git-lfs pointer, not the data; run `git lfs install && git lfs pull` in the esci-data clone")


_KINDS = {  # kind -> (as the release stores it, check)
    "text": ("text (string)", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    # an item field nobody filled in may be written as an all-null column
    "optional_text": ("text (string)", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)),
    "integer": ("whole numbers (int64)", pa.types.is_integer),
}


def first_value(parquet: pq.ParquetFile, column: str) -> tuple[int, object]:
    """``(row, value)`` of the first non-null value of ``column`` (0-based row), or ``(-1, None)``."""
    offset = 0
    for batch in parquet.iter_batches(batch_size=65_536, columns=[column]):
        values = batch.column(0)
        valid = pc.indices_nonzero(pc.is_valid(values))
        if len(valid):
            row = valid[0].as_py()
            return offset + row, values[row].as_py()
        offset += len(values)
    return -1, None


def check_column_types(parquet: pq.ParquetFile, path: str, kinds: dict[str, str]) -> None:
    """Each column holds the kind of values (a key of ``_KINDS``) the official release has there."""
    for column, kind in kinds.items():
        arrow_type = parquet.schema_arrow.field(column).type
        stored_as, fits = _KINDS[kind]
        if not fits(arrow_type):
            row, value = first_value(parquet, column)
            example = f"row {row}: {value!r}" if row >= 0 else "every row is null"
            raise ESCIDataError(f"{path}: column '{column}' holds {arrow_type} values ({example}; rows are 0-based), "
                                f"but the official release stores {stored_as} there. Is this file from another source, "
                                "or re-saved with other types?")


def open_parquet(path: str, columns: dict[str, str]) -> pq.ParquetFile:
    """The parquet file, after checking that it is readable and has ``columns`` (name -> kind) of the right types."""
    check_file(path)
    try:
        # Stream pages: by default a whole row group (up to ~1M products, >1 GB of text) is held at once.
        parquet = pq.ParquetFile(path, buffer_size=1 << 23, pre_buffer=False)
    except Exception as exc:  # pyarrow raises many types for unreadable files
        raise ESCIDataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    require_columns(pd.DataFrame(columns=parquet.schema_arrow.names), list(columns), path)
    check_column_types(parquet, path, columns)
    return parquet


def read_examples(path: str, locale: str, version: str) -> pd.DataFrame:
    """The needed example columns, filtered by locale and version flag while reading."""
    flag = f"{version}_version"
    open_parquet(path, {**EXAMPLE_COLUMNS, flag: "integer"})
    filters = [(flag, "=", 1)] + ([("product_locale", "=", locale)] if locale != "all" else [])
    return pq.read_table(path, columns=list(EXAMPLE_COLUMNS), filters=filters).to_pandas()


def read_products(path: str, wanted: pd.DataFrame, fields: list[str], max_chars: int) -> tuple[pd.DataFrame, pa.Array, np.ndarray]:
    """Build item_text once per wanted product (not per example), in bounded-memory batches.

    ``wanted`` holds the (product_locale, product_id) pairs the examples use. Returns
    the keys found (with ``product_row``, 0..n-1), item_text ``[n]`` and a bool ``[n]``: empty title.
    """
    columns = ["product_id", "product_locale"] + [ITEM_FIELDS[f][0] for f in fields]
    parquet = open_parquet(path, {**dict.fromkeys(columns[:2], "text"), **dict.fromkeys(columns[2:], "optional_text")})
    ids_by_locale = {loc: pa.array(group["product_id"].unique(), pa.string()) for loc, group in wanted.groupby("product_locale")}
    keys, texts, no_title = [], [], []
    for batch in tqdm(parquet.iter_batches(batch_size=50_000, columns=columns), desc="products",
                      total=-(-parquet.metadata.num_rows // 50_000), unit="batch", mininterval=5):
        masks = [pc.and_(pc.equal(batch["product_locale"], loc), pc.is_in(batch["product_id"], value_set=ids))
                 for loc, ids in ids_by_locale.items()]
        batch = batch.filter(functools.reduce(pc.or_, masks))
        rows = [dict(zip(fields, values)) for values in zip(*(batch[ITEM_FIELDS[f][0]].to_pylist() for f in fields))]
        texts.append(pa.array([build_item_text(r, fields, max_chars) for r in rows], pa.large_string()))
        no_title.append(np.array([not clean_text(r["title"]) for r in rows] if "title" in fields else np.zeros(len(rows)), bool))
        keys.append(batch.select(["product_locale", "product_id"]).to_pandas())
    products = pd.concat(keys, ignore_index=True) if keys else pd.DataFrame(columns=["product_locale", "product_id"])
    products["product_row"] = np.arange(len(products))
    item_text = pa.concat_arrays(texts) if texts else pa.array([], pa.large_string())  # take() on a chunked array would concatenate per call
    return products, item_text, np.concatenate(no_title) if no_title else np.zeros(0, bool)


def read_sources(path: str) -> pd.Series:
    """query_id -> source, from the optional csv."""
    check_file(path)
    try:
        df = pd.read_csv(path)
    except Exception as exc:
        raise ESCIDataError(f"{path}: not a readable csv file ({type(exc).__name__}: {exc})") from None
    require_columns(df, ["query_id", "source"], path)
    ids = pd.to_numeric(df["query_id"], errors="coerce")
    bad = df["query_id"][ids.isna() | (ids % 1 != 0)]
    if len(bad):
        raise ESCIDataError(f"{path}: column 'query_id' must hold whole numbers, as in the examples file; "
                            f"{len(bad)} row(s) do not (rows are 0-based), e.g. row {bad.index[0]}: {bad.iloc[0]!r}")
    return df.assign(query_id=ids.astype(np.int64)).drop_duplicates("query_id").set_index("query_id")["source"]


# ---------------------------------------------------------------------------
# Problems, statistics, writing
# ---------------------------------------------------------------------------
def drop_counted(df: pd.DataFrame, bad: pd.Series, name: str, problems: dict, show: str) -> pd.DataFrame:
    """Drop the ``bad`` rows, recording how many in ``problems[name]`` and logging a few."""
    bad = bad.to_numpy(dtype=bool)
    problems[name] = int(bad.sum())
    if problems[name]:
        logger.warning("%s: %d row(s), %s; e.g. %s=%s", name, problems[name], PROBLEMS[name], show, df.loc[bad, show].head(5).tolist())
    return df[~bad]


def prompt_token_stats(encoder: PromptEncoder, queries: list[str], docs: list[str]) -> dict:
    """Tokens per full prompt (never truncated: ``encoder.max_length`` is huge)."""
    lengths = np.array([len(ids) for start in range(0, len(queries), 4096)
                        for ids in encoder.encode_batch(queries[start:start + 4096], docs[start:start + 4096])])
    p50, p95, p99 = np.percentile(lengths, [50, 95, 99])
    return {"sampled_rows": len(lengths), "template_tokens": encoder.fixed_len, "mean": round(float(lengths.mean()), 1),
            "p50": int(p50), "p95": int(p95), "p99": int(p99), "max": int(lengths.max()),
            "over_512": round(float((lengths > 512).mean()), 4)}


def write_parquet(df: pd.DataFrame, item_text: pa.Array, path: str, schema: pa.Schema, chunk_rows: int = 200_000) -> None:
    """Write ``df`` plus item_text ``[product_row]`` in chunks, atomically (a temp file, then os.replace)."""
    def write(tmp: str) -> None:
        with pq.ParquetWriter(tmp, schema) as writer:
            for start in range(0, len(df), chunk_rows):
                part = df.iloc[start:start + chunk_rows]
                table = pa.Table.from_pandas(part[[n for n in schema.names if n != "item_text"]], preserve_index=False)
                table = table.append_column("item_text", item_text.take(part["product_row"].to_numpy()))
                writer.write_table(table.select(schema.names).cast(schema))

    atomic_write(path, write)


def prepare(args: argparse.Namespace) -> dict:
    """Read, clean, join, write. Returns the summary (also written as SUMMARY_FILE). Raises ESCIDataError."""
    started = time.time()
    check_output_dir(args.output_dir, "--output_dir")  # before the slow part, not after it
    encoder = None
    if args.tokenizer:  # fail on a bad path before the slow part
        try:
            from transformers import AutoTokenizer
            encoder = PromptEncoder(AutoTokenizer.from_pretrained(args.tokenizer), max_length=1 << 30)
        except (OSError, ValueError) as exc:
            raise ESCIDataError(f"--tokenizer {args.tokenizer}: cannot load a tokenizer ({exc})") from None
    for name in (EXAMPLES_FILE, PRODUCTS_FILE):  # all inputs present (and not git-lfs pointers) before reading any
        check_file(os.path.join(args.esci_dir, name))
    sources = read_sources(os.path.join(args.esci_dir, SOURCES_FILE)) if args.with_source else None

    # 1. Examples: filtered while reading, then bad rows counted and dropped ----
    ex = read_examples(os.path.join(args.esci_dir, EXAMPLES_FILE), args.locale, args.version)
    logger.info("%d examples for locale=%s version=%s", len(ex), args.locale, args.version)
    problems: dict[str, int] = {}
    ex = drop_counted(ex, ~ex["esci_label"].isin(LABELS), "unknown_label", problems, "esci_label")
    ex = drop_counted(ex, ~ex["split"].isin(OUTPUT_FILES), "unknown_split", problems, "split")
    ex = drop_counted(ex, ex["query"].fillna("").str.strip().eq(""), "blank_query", problems, "example_id")
    ex = drop_counted(ex, ex.duplicated(["product_locale", "query_id", "product_id"]), "duplicate_pair", problems, "example_id")
    if ex.empty:
        raise ESCIDataError(f"{args.esci_dir}: no usable example for locale={args.locale} version={args.version}; problems: {problems}")

    # 2. Products: item_text per product, joined on (locale, product_id) -------
    products, item_text, no_title = read_products(
        os.path.join(args.esci_dir, PRODUCTS_FILE), ex[["product_locale", "product_id"]].drop_duplicates(),
        args.item_fields, args.max_item_chars)
    repeated = products.duplicated(["product_locale", "product_id"])
    problems["duplicate_product"] = int(repeated.sum())
    ex = ex.merge(products[~repeated], how="left", on=["product_locale", "product_id"])  # keeps example order
    ex = drop_counted(ex, ex["product_row"].isna(), "missing_product", problems, "product_id")
    ex["product_row"] = ex["product_row"].astype(np.int64)
    chars = pc.utf8_length(item_text).to_numpy(zero_copy_only=False)
    ex = drop_counted(ex, pd.Series(chars[ex["product_row"]] == 0), "empty_item_text", problems, "product_id")
    if "title" in args.item_fields:
        problems["empty_title"] = int(no_title[ex["product_row"]].sum())
    schema = OUTPUT_SCHEMA
    if sources is not None:
        ex["source"] = ex["query_id"].map(sources)
        problems["missing_source"] = int(ex["source"].isna().sum())
        schema = schema.append(pa.field("source", pa.string()))

    # 3. Statistics per split; refuse to write an empty split -------------------
    splits = {}
    for split in OUTPUT_FILES:
        part = ex[ex["split"] == split]
        if part.empty:
            raise ESCIDataError(f"{args.esci_dir}: no usable '{split}' rows for locale={args.locale} version={args.version}; problems: {problems}")
        n_chars = chars[part["product_row"]]
        splits[split] = {"rows": len(part), "queries": int(part["query_id"].nunique()),
                         "labels": {label: int((part["esci_label"] == label).sum()) for label in LABELS},
                         "item_text_chars": {"mean": round(float(n_chars.mean()), 1), "p95": int(np.percentile(n_chars, 95))},
                         "rows_by_locale": {str(k): int(v) for k, v in sorted(part["product_locale"].value_counts().items())}}
        if encoder is not None:
            rows = part if not args.token_sample_rows or len(part) <= args.token_sample_rows else part.sample(args.token_sample_rows, random_state=0)
            docs = item_text.take(rows["product_row"].to_numpy()).to_pylist()
            splits[split]["prompt_tokens"] = prompt_token_stats(encoder, rows["query"].tolist(), docs)

    # 4. Write: each file atomically, then the summary ---------------------------
    summary = {"args": vars(args), "problems": problems, "splits": splits, "seconds": None,
               "files": {split: os.path.join(args.output_dir, name) for split, name in OUTPUT_FILES.items()}}
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        for split, name in OUTPUT_FILES.items():
            write_parquet(ex[ex["split"] == split], item_text, os.path.join(args.output_dir, name), schema)
        summary["seconds"] = round(time.time() - started, 1)
        write_json(os.path.join(args.output_dir, SUMMARY_FILE), summary)
    except OSError as exc:  # e.g. a full disk; each file is complete or absent (atomic writes)
        raise ESCIDataError(f"--output_dir {args.output_dir}: writing failed ({exc.strerror or exc})") from None
    return summary


def format_summary(summary: dict) -> str:
    lines = []
    for split, s in summary["splits"].items():
        labels = " ".join(f"{k} {v / s['rows']:.1%}" for k, v in s["labels"].items())
        c = s["item_text_chars"]
        lines.append(f"{split}: {s['rows']:,} rows, {s['queries']:,} queries | {labels} | item_text chars mean {c['mean']:.0f} p95 {c['p95']}")
        if len(s.get("rows_by_locale", {})) > 1:
            lines.append("  rows by locale: " + ", ".join(f"{k} {v:,}" for k, v in s["rows_by_locale"].items()))
        if "prompt_tokens" in s:
            t = s["prompt_tokens"]
            lines.append(f"  prompt tokens ({t['sampled_rows']:,} rows, template {t['template_tokens']}): mean {t['mean']:.0f} "
                         f"p50 {t['p50']} p95 {t['p95']} p99 {t['p99']} max {t['max']}; {t['over_512']:.1%} over 512")
    lines.append("problems:")
    lines += [f"  {name}: {count:,} ({PROBLEMS[name]})" for name, count in summary["problems"].items()]
    lines += [f"wrote {path}" for path in summary["files"].values()]
    lines.append(f"done in {summary['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_up_logging(logger, args)
    try:
        summary = prepare(args)
    except ESCIDataError as exc:
        return cli_error(exc)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
