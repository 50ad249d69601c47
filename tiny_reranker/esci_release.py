"""The official Shopping Queries (ESCI) release's layout, and a synthetic copy of it at a chosen fraction of full
size, for measuring what each stage costs at scale.

The file names, columns and dtypes are the official ones (``shopping_queries_dataset/``: the examples
and products parquet files and the sources csv; ``prepare_esci.py`` takes the names from here), so
``prepare_esci.py`` reads a synthetic copy as it reads the real release. The text is random words, but its lengths, null rates, label mix, locales, splits and versions
follow the real release's published statistics (below), so every stage does the work it would do there.

Memory stays bounded while writing: products are made and written ``chunk_rows`` at a time.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

EXAMPLES_FILE = "shopping_queries_dataset_examples.parquet"
PRODUCTS_FILE = "shopping_queries_dataset_products.parquet"
SOURCES_FILE = "shopping_queries_dataset_sources.csv"
EXAMPLES_SCHEMA = pa.schema([
    ("example_id", pa.int64()), ("query", pa.string()), ("query_id", pa.int64()), ("product_id", pa.string()),
    ("product_locale", pa.string()), ("esci_label", pa.string()), ("small_version", pa.int64()),
    ("large_version", pa.int64()), ("split", pa.string()),
])
PRODUCTS_SCHEMA = pa.schema([(name, pa.string()) for name in (
    "product_id", "product_title", "product_description", "product_bullet_point",
    "product_brand", "product_color", "product_locale")])


@dataclass(frozen=True)
class Locale:
    """One locale of the full release (large version): queries, judgements, products."""
    name: str
    queries: int
    examples: int
    products: int


# The official release (large version), per locale: 2.62M judgements over 130k queries and 1.80M products;
# US is 1.82M judgements, of which 1.39M are train.
FULL_RELEASE = (Locale("us", 97_345, 1_818_825, 1_215_851),
                Locale("es", 15_180, 356_410, 259_973),
                Locale("jp", 18_127, 446_053, 339_059))
LABEL_MIX = {"E": 0.652, "S": 0.219, "C": 0.029, "I": 0.100}  # large version, all locales
TEST_SHARE = 0.234       # of queries in the official test split (US: 425,762 of 1,818,825 judgements)
SMALL_SHARE = 0.37       # of queries also in the small version (48,300 of 130,652)
SOURCES = ("other", "negations", "behavioral", "parse_pattern", "nlqec")
# Field -> (share of products where it is null, mean characters when present). Measured shapes of the
# real US products: short titles, long bullet lists, descriptions missing about half the time.
FIELDS = {"product_title": (0.002, 120), "product_brand": (0.05, 10), "product_color": (0.35, 8),
          "product_bullet_point": (0.17, 650), "product_description": (0.48, 900)}
# Catalog-like words for synthetic text (also bench.py's workload).
WORDS = ("wireless bluetooth headphones noise cancelling over ear battery charging case black white silver "
         "stainless steel kitchen knife set with block premium quality durable lightweight portable compact "
         "outdoor camping tent waterproof family size easy setup cotton shirt men women kids size small medium "
         "large pack of replacement filter compatible model water bottle insulated keeps drinks cold hours "
         "gaming mouse ergonomic design adjustable programmable buttons light led office home gift ideal").split()


def scaled(fraction: float) -> list[Locale]:
    """The release's locales at ``fraction`` of full size (at least one query and product each)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return [Locale(loc.name, max(1, round(loc.queries * fraction)), max(1, round(loc.examples * fraction)),
                   max(1, round(loc.products * fraction))) for loc in FULL_RELEASE]


def _phrases(rng: np.random.Generator, n: int, words_each: int) -> np.ndarray:
    """``n`` distinct-looking phrases of about ``words_each`` words, as an object array."""
    words = np.array(WORDS)
    return np.array([" ".join(words[rng.integers(0, len(words), words_each)]) for _ in range(n)], dtype=object)


def _texts(rng: np.random.Generator, pool: np.ndarray, mean_chars: int, n: int, null_share: float, tag: list[str]) -> list:
    """``n`` texts of about ``mean_chars`` characters (exponential lengths around the mean), made of pool
    phrases and ended by ``tag`` (unique per product, so no two texts are equal); ``None`` for a null."""
    phrase_chars = np.mean([len(p) for p in pool[:64]]) + 1
    counts = np.maximum(1, rng.exponential(mean_chars / phrase_chars, n).round().astype(int))
    picks = rng.integers(0, len(pool), counts.sum())
    nulls = rng.random(n) < null_share
    out, start = [], 0
    for i, k in enumerate(counts):
        out.append(None if nulls[i] else " ".join(pool[picks[start:start + k]]) + " " + tag[i])
        start += k
    return out


def _product_id(locale: str, i: np.ndarray) -> list[str]:
    return [f"B{locale.upper()}{k:08d}" for k in i]


def write_products(path: str, locales: list[Locale], rng: np.random.Generator, chunk_rows: int) -> int:
    """The products file, ``chunk_rows`` products per row group. Returns the number of rows."""
    pool = _phrases(rng, 4096, 4)
    rows = 0
    with pq.ParquetWriter(path, PRODUCTS_SCHEMA) as writer:
        for loc in locales:
            for start in range(0, loc.products, chunk_rows):
                idx = np.arange(start, min(loc.products, start + chunk_rows))
                ids = _product_id(loc.name, idx)
                columns = {"product_id": ids, "product_locale": [loc.name] * len(idx)}
                for name, (null_share, mean_chars) in FIELDS.items():
                    columns[name] = _texts(rng, pool, mean_chars, len(idx), null_share, ids)
                writer.write_table(pa.table(columns, schema=PRODUCTS_SCHEMA))
                rows += len(idx)
    return rows


def examples_table(locales: list[Locale], rng: np.random.Generator) -> pa.Table:
    """Every judgement: each query gets consecutive products of its locale (so no pair repeats), labels drawn
    from the release's mix; a query's split and versions hold for all its rows, as in the release."""
    parts, query_id, example_id = [], 0, 0
    labels, weights = list(LABEL_MIX), np.array(list(LABEL_MIX.values()))
    query_pool = _phrases(rng, 50_000, 1)
    for loc in locales:
        per_query = rng.multinomial(loc.examples - loc.queries, np.full(loc.queries, 1 / loc.queries)) + 1
        n = int(per_query.sum())
        qids = np.repeat(np.arange(query_id, query_id + loc.queries), per_query)
        first = rng.integers(0, loc.products, loc.queries)
        within = np.arange(n) - np.repeat(np.cumsum(per_query) - per_query, per_query)
        product = (np.repeat(first, per_query) + within) % loc.products
        query_words = [" ".join(query_pool[rng.integers(0, len(query_pool), int(k))]) for k in rng.integers(2, 6, loc.queries)]
        test = rng.random(loc.queries) < TEST_SHARE
        small = rng.random(loc.queries) < SMALL_SHARE
        parts.append(pa.table({
            "example_id": np.arange(example_id, example_id + n, dtype=np.int64),
            "query": np.array(query_words, dtype=object)[qids - query_id],
            "query_id": qids.astype(np.int64),
            "product_id": _product_id(loc.name, product),
            "product_locale": [loc.name] * n,
            "esci_label": np.array(labels)[rng.choice(len(labels), n, p=weights / weights.sum())],
            "small_version": small[qids - query_id].astype(np.int64),
            "large_version": np.ones(n, np.int64),
            "split": np.where(test[qids - query_id], "test", "train"),
        }, schema=EXAMPLES_SCHEMA))
        query_id += loc.queries
        example_id += n
    return pa.concat_tables(parts)


def write_release(folder: str, fraction: float, seed: int = 0, chunk_rows: int = 100_000) -> dict:
    """Write the three release files into ``folder`` (created). Returns rows and bytes per file."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    locales = scaled(fraction)
    examples = examples_table(locales, rng)
    pq.write_table(examples, os.path.join(folder, EXAMPLES_FILE), row_group_size=chunk_rows)
    n_products = write_products(os.path.join(folder, PRODUCTS_FILE), locales, rng, chunk_rows)
    query_ids = np.unique(examples["query_id"].to_numpy())
    with open(os.path.join(folder, SOURCES_FILE), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["query_id", "source"])
        writer.writerows(zip(query_ids.tolist(), np.array(SOURCES)[rng.integers(0, len(SOURCES), len(query_ids))]))
    files = {name: os.path.getsize(os.path.join(folder, name)) for name in (EXAMPLES_FILE, PRODUCTS_FILE, SOURCES_FILE)}
    return {"fraction": fraction, "examples": examples.num_rows, "products": n_products, "queries": len(query_ids),
            "by_locale": {loc.name: {"queries": loc.queries, "examples": loc.examples, "products": loc.products} for loc in locales},
            "bytes": files}
