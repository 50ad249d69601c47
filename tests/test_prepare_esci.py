"""prepare_esci.py on a tiny hand-made copy of the official Shopping Queries release (CPU, no network)."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare_esci
from esci_dataset import PromptEncoder, load_esci_parquet
from prepare_esci import OUTPUT_SCHEMA, build_item_text, clean_text, cut_at_word, main
from tiny_reranker.esci_release import EXAMPLES_SCHEMA, PRODUCTS_SCHEMA
from tiny_reranker.esci_release import write_release as write_synthetic_release

NAN = float("nan")

# ---------------------------------------------------------------------------
# Fixture: the official schema and dtypes, every awkward case once
# ---------------------------------------------------------------------------
EXAMPLES = [  # example_id, query, query_id, product_id, locale, label, small, large, split
    (1, "iphone 12 case", 1, "P1", "us", "E", 1, 1, "train"),
    (2, "iphone 12 case", 1, "P2", "us", "S", 0, 1, "train"),   # product has no title
    (3, "iphone 12 case", 1, "P9", "us", "I", 1, 1, "train"),   # P9 is not in the products file
    (4, "funda iphone", 2, "P1", "es", "E", 1, 1, "train"),     # same id as example 1, es product
    (5, "usb c cable", 3, "P5", "us", "C", 1, 1, "test"),
    (6, "usb c cable", 3, "P3", "us", "I", 0, 1, "test"),       # every text field of P3 is blank
    (7, "usb c cable", 3, "P5", "us", "E", 1, 1, "test"),       # duplicate (3, P5): dropped
    (8, "iphone ケース", 4, "P4", "jp", "E", 0, 1, "test"),
    (9, "usb c cable", 3, "P1", "us", "X", 1, 1, "test"),       # unknown label
    (10, "iphone 12 case", 1, "P5", "us", "I", 0, 0, "train"),  # in neither version
    (11, "cable usb", 5, "P7", "es", "S", 1, 1, "test"),
    (12, "ケーブル", 6, "P8", "jp", "C", 1, 1, "train"),
]
PRODUCTS = [  # product_id, title, description, bullet_point, brand, color, locale
    ("P1", "Apple iPhone 12 Case", "<p>Great case.</p>",
     "<li>Fits iPhone&nbsp;12</li>\n<li>Shock &amp; drop proof</li>", "Acme", "Black", "us"),
    ("P1", "Funda para iPhone 12", None, None, None, "Negro", "es"),
    ("P2", None, None, "Soft\tgrip   cover\n", "Acme", NAN, "us"),
    ("P3", "   ", None, "", None, "\n", "us"),
    ("P4", "iPhone 12 ケース", None, "耐衝撃", "エース", None, "jp"),
    ("P5", "USB-C Cable 2m", None, None, "Cabl&eacute;", "White", "us"),
    ("P5", "USB-C Cable, a repeated row", None, None, None, None, "us"),  # duplicate product: the first wins
    ("P7", "Cable USB-C", "Cable <b>rápido</b>", None, None, None, "es"),
    ("P8", "USB ケーブル", None, None, None, None, "jp"),
]
GOLDEN = {  # (locale, product_id) -> item_text with the default --item_fields
    ("us", "P1"): "Title: Apple iPhone 12 Case Brand: Acme Color: Black Features: Fits iPhone 12 Shock & drop proof",
    ("es", "P1"): "Title: Funda para iPhone 12 Color: Negro",
    ("us", "P2"): "Brand: Acme Features: Soft grip cover",
    ("jp", "P4"): "Title: iPhone 12 ケース Brand: エース Features: 耐衝撃",
    ("us", "P5"): "Title: USB-C Cable 2m Brand: Cablé Color: White",
    ("es", "P7"): "Title: Cable USB-C",
    ("jp", "P8"): "Title: USB ケーブル",
}


def write_release(folder, examples: dict | None = None, products: dict | None = None) -> str:
    """The fixture release in ``folder``. ``examples`` / ``products``: column -> one value for every row,
    replacing that column with whatever type pyarrow infers for it (to build files with wrong types)."""
    os.makedirs(folder, exist_ok=True)
    for rows, schema, overrides, name in ((EXAMPLES, EXAMPLES_SCHEMA, examples, prepare_esci.EXAMPLES_FILE),
                                          (PRODUCTS, PRODUCTS_SCHEMA, products, prepare_esci.PRODUCTS_FILE)):
        table = pa.Table.from_pandas(pd.DataFrame(rows, columns=schema.names), schema=schema, preserve_index=False)
        for column, value in (overrides or {}).items():
            table = table.set_column(schema.get_field_index(column), column, pa.array([value] * len(rows)))
        pq.write_table(table, os.path.join(folder, name))
    with open(os.path.join(folder, prepare_esci.SOURCES_FILE), "w") as f:
        f.write("query_id,source\n1,other\n2,negations\n3,behavioral\n4,parse_pattern\n5,nlqec\n")
    return str(folder)


@pytest.fixture
def esci_dir(tmp_path) -> str:
    return write_release(tmp_path / "shopping_queries_dataset")


def run(esci_dir: str, out_dir, *extra: str) -> tuple[int, dict | None]:
    code = main(["--esci_dir", esci_dir, "--output_dir", str(out_dir), *extra])
    summary_path = os.path.join(str(out_dir), prepare_esci.SUMMARY_FILE)
    summary = json.load(open(summary_path)) if code == 0 else None
    return code, summary


def read_split(out_dir, split: str) -> pd.DataFrame:
    return pd.read_parquet(os.path.join(str(out_dir), prepare_esci.OUTPUT_FILES[split]))


# ---------------------------------------------------------------------------
# item_text: pure functions, golden strings
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    (None, ""), (NAN, ""), (pd.NA, ""), ("", ""), (" \n\t ", ""),
    ("<ul><li>One</li><li>Two&nbsp;&amp; three</li></ul>", "One Two & three"),
    ("line one\nline two\r\n\ttabbed    spaced", "line one line two tabbed spaced"),
    ("&lt;b&gt; is shown, <!-- a comment --> is not", "<b> is shown, is not"),
    ("size < 5 and > 3", "size < 5 and > 3"),  # not a tag
    ("<B>Bold</B>er text<br/>next<span class='x'>line</span>", "Bolder text nextline"),  # inline tags join, <br> splits
])
def test_clean_text(value, expected):
    assert clean_text(value) == expected


def test_cut_at_word():
    assert cut_at_word("short", 10) == "short"
    assert cut_at_word("exactly ten", 11) == "exactly ten"
    assert cut_at_word("one two three", 8) == "one two"   # the space at index 7 ends a word
    assert cut_at_word("one two three", 9) == "one two"   # never half a word
    assert cut_at_word("abcdefghijkl", 5) == "abcde"      # a single long word is cut hard


def test_build_item_text_golden():
    row = {"title": "  Apple  iPhone 12 Case ", "brand": None, "color": NAN,
           "bullet_points": "<li>Fits iPhone&nbsp;12</li>\n<li>Shock &amp; drop proof</li>",
           "description": "<p>Great <b>case</b>.</p>"}
    default = ["title", "brand", "color", "bullet_points"]
    assert build_item_text(row, default, 2000) == "Title: Apple iPhone 12 Case Features: Fits iPhone 12 Shock & drop proof"
    assert build_item_text(row, ["description", "title"], 2000) == "Description: Great case. Title: Apple iPhone 12 Case"
    assert build_item_text(row, default, 30) == "Title: Apple iPhone 12 Case"
    assert build_item_text({"title": None, "brand": " "}, default, 2000) == ""
    long_row = {"title": "word " * 1000, "bullet_points": "never reached"}
    text = build_item_text(long_row, default, 100)
    assert len(text) <= 100 and text.endswith("word") and "Features" not in text


# ---------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------
def test_default_run_golden_rows_and_problems(esci_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, summary = run(esci_dir, out)
    assert code == 0
    train, test = read_split(out, "train"), read_split(out, "test")
    expected = textwrap.dedent("""\
        1 E Title: Apple iPhone 12 Case Brand: Acme Color: Black Features: Fits iPhone 12 Shock & drop proof
        2 S Brand: Acme Features: Soft grip cover""")
    assert "\n".join(f"{r.example_id} {r.esci_label} {r.item_text}" for r in train.itertuples()) == expected
    assert test[["example_id", "query", "esci_label", "item_text", "query_id", "product_id", "product_locale"]].values.tolist() == [
        [5, "usb c cable", "C", GOLDEN[("us", "P5")], 3, "P5", "us"]]
    assert summary["problems"] == {"unknown_label": 1, "unknown_split": 0, "blank_query": 0, "duplicate_pair": 1,
                                   "missing_product": 1, "empty_item_text": 1, "empty_title": 1, "duplicate_product": 1}
    assert summary["splits"]["train"]["rows"] == 2 and summary["splits"]["train"]["queries"] == 1
    assert summary["splits"]["train"]["labels"] == {"E": 1, "S": 1, "C": 0, "I": 0}
    printed = capsys.readouterr().out
    for line in ("train: 2 rows, 1 queries | E 50.0% S 50.0% C 0.0% I 0.0%", "missing_product: 1 (dropped",
                 "duplicate_pair: 1 (dropped", "unknown_label: 1 (dropped", "empty_item_text: 1 (dropped", "empty_title: 1 (kept"):
        assert line in printed
    assert sorted(os.listdir(out)) == sorted([*prepare_esci.OUTPUT_FILES.values(), prepare_esci.SUMMARY_FILE])  # no temp files left


def test_output_contract_and_round_trip(esci_dir, tmp_path):
    out = tmp_path / "out"
    assert run(esci_dir, out, "--locale", "all")[0] == 0
    for split, name in prepare_esci.OUTPUT_FILES.items():
        path = os.path.join(str(out), name)
        assert pq.read_schema(path).remove_metadata().equals(OUTPUT_SCHEMA)
        df = load_esci_parquet(path)
        assert df["esci_label"].isin(list("ESCI")).all() and len(df) == len(read_split(out, split))
        for row in df.itertuples():  # the join uses the locale: P1 has a us and an es product
            assert row.item_text == GOLDEN[(row.product_locale, row.product_id)]


@pytest.mark.parametrize("locale, version, train_ids, test_ids", [
    ("us", "large", [1, 2], [5]),
    ("us", "small", [1], [5]),
    ("es", "large", [4], [11]),
    ("jp", "large", [12], [8]),
    ("all", "large", [1, 2, 4, 12], [5, 8, 11]),
    ("all", "small", [1, 4, 12], [5, 11]),
])
def test_locale_and_version_filters_keep_the_official_split(esci_dir, tmp_path, locale, version, train_ids, test_ids):
    out = tmp_path / "out"
    assert run(esci_dir, out, "--locale", locale, "--version", version)[0] == 0
    assert read_split(out, "train")["example_id"].tolist() == train_ids
    assert read_split(out, "test")["example_id"].tolist() == test_ids


def test_item_fields_and_max_chars_flags(esci_dir, tmp_path):
    out = tmp_path / "out"
    assert run(esci_dir, out, "--item_fields", "description,title", "--max_item_chars", "40")[0] == 0
    train = read_split(out, "train")
    assert train["item_text"].tolist() == ["Description: Great case. Title: Apple"]  # P2 has neither field
    assert read_split(out, "test")["item_text"].tolist() == ["Title: USB-C Cable 2m"]


def test_with_source(esci_dir, tmp_path):
    out = tmp_path / "out"
    code, summary = run(esci_dir, out, "--locale", "all", "--with_source")
    assert code == 0
    train = read_split(out, "train")
    assert dict(zip(train["example_id"], train["source"].fillna("<null>"))) == {1: "other", 2: "other", 4: "negations", 12: "<null>"}
    assert summary["problems"]["missing_source"] == 1  # query 6 is not in the csv
    load_esci_parquet(os.path.join(str(out), prepare_esci.OUTPUT_FILES["train"]))


def test_tokenizer_report_matches_prompt_encoder(esci_dir, tmp_path, tokenizer_dir, qwen3_tokenizer, capsys):
    out = tmp_path / "out"
    code, summary = run(esci_dir, out, "--locale", "all", "--tokenizer", tokenizer_dir)
    assert code == 0
    encoder = PromptEncoder(qwen3_tokenizer, max_length=100_000)
    for split in ("train", "test"):
        df = read_split(out, split)
        lengths = [len(ids) for ids in encoder.encode_batch(df["query"].tolist(), df["item_text"].tolist())]
        tokens = summary["splits"][split]["prompt_tokens"]
        assert tokens["max"] == max(lengths) and tokens["sampled_rows"] == len(df)
        assert tokens["template_tokens"] == encoder.fixed_len and tokens["p50"] == int(np.percentile(lengths, 50))
    assert "prompt tokens (4 rows, template" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# Errors are for people: one paragraph, exit code 2, no traceback
# ---------------------------------------------------------------------------
def assert_clean_error(capsys, *needles: str) -> None:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == 1
    for needle in needles:
        assert needle in errors[0]


def test_missing_products_file_is_found_before_the_examples_are_read(esci_dir, tmp_path, capsys, monkeypatch):
    os.remove(os.path.join(esci_dir, prepare_esci.PRODUCTS_FILE))
    monkeypatch.setattr(prepare_esci, "read_examples", lambda *a, **k: pytest.fail("read the examples first"))
    assert run(esci_dir, tmp_path / "out")[0] == 2
    assert_clean_error(capsys, prepare_esci.PRODUCTS_FILE, "file not found", "git-lfs")
    assert not os.path.exists(tmp_path / "out" / prepare_esci.OUTPUT_FILES["train"])


def test_sources_csv_only_needed_with_flag(esci_dir, tmp_path, capsys):
    os.remove(os.path.join(esci_dir, prepare_esci.SOURCES_FILE))
    assert run(esci_dir, tmp_path / "a")[0] == 0
    assert run(esci_dir, tmp_path / "b", "--with_source")[0] == 2
    assert_clean_error(capsys, prepare_esci.SOURCES_FILE, "file not found")


@pytest.mark.parametrize("file_name, column", [
    ("EXAMPLES_FILE", "split"), ("EXAMPLES_FILE", "large_version"), ("PRODUCTS_FILE", "product_bullet_point")])
def test_missing_column(esci_dir, tmp_path, capsys, file_name, column):
    path = os.path.join(esci_dir, getattr(prepare_esci, file_name))
    pq.write_table(pq.read_table(path).drop_columns([column]), path)
    assert run(esci_dir, tmp_path / "out")[0] == 2
    assert_clean_error(capsys, path, f"'{column}'")


def test_missing_source_column(esci_dir, tmp_path, capsys):
    path = os.path.join(esci_dir, prepare_esci.SOURCES_FILE)
    with open(path, "w") as f:
        f.write("query_id,origin\n1,other\n")
    assert run(esci_dir, tmp_path / "out", "--with_source")[0] == 2
    assert_clean_error(capsys, path, "'source'")


def test_bad_tokenizer_path(esci_dir, tmp_path, capsys):
    assert run(esci_dir, tmp_path / "out", "--tokenizer", str(tmp_path / "no-such-tokenizer"))[0] == 2
    assert_clean_error(capsys, "--tokenizer", "no-such-tokenizer")


def test_git_lfs_pointer_is_explained(esci_dir, tmp_path, capsys):
    path = os.path.join(esci_dir, prepare_esci.EXAMPLES_FILE)
    with open(path, "w") as f:
        f.write("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    assert run(esci_dir, tmp_path / "out")[0] == 2
    assert_clean_error(capsys, path, "git lfs pull")


def test_split_left_empty_is_an_error(esci_dir, tmp_path, capsys):
    assert run(esci_dir, tmp_path / "out", "--locale", "jp", "--version", "small")[0] == 2  # jp small has no test row
    assert_clean_error(capsys, "no usable 'test' rows", "locale=jp")


def test_bad_flags_and_help(capsys):
    for fields, said in (("title,price", "unknown 'price'"), ("", "--item_fields is empty"), (" , ", "is empty"),
                         ("title,brand,title", "names title more than once")):
        with pytest.raises(SystemExit) as exc:
            main(["--esci_dir", "x", "--item_fields", fields])
        assert exc.value.code == 2 and said in capsys.readouterr().err, fields
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--max_item_chars" in capsys.readouterr().out


@pytest.mark.parametrize("column, value, shown", [
    ("query", 42, "row 0: 42"),            # numeric queries: .str.strip() used to raise AttributeError
    ("esci_label", 3, "row 0: 3"),         # integer labels: every row used to be dropped as "unknown"
    ("product_id", 1.5, "row 0: 1.5"),     # float ids: the product join used to raise ArrowTypeError
])
def test_wrong_column_types_are_named(tmp_path, capsys, column, value, shown):
    esci = write_release(tmp_path / "release", examples={column: value})
    assert run(esci, tmp_path / "out")[0] == 2
    assert_clean_error(capsys, prepare_esci.EXAMPLES_FILE, f"column '{column}'", shown, "string")
    assert not os.path.exists(tmp_path / "out")


def test_unwritable_output_dir_is_found_before_any_work(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    # No release at all: the output is checked first, so the message is about --output_dir, not the input.
    assert run(str(tmp_path / "absent_release"), tmp_path / "a_file" / "out")[0] == 2
    assert_clean_error(capsys, "--output_dir", "a_file", "not a folder")
    assert run(str(tmp_path / "absent_release"), tmp_path / "a_file")[0] == 2
    assert_clean_error(capsys, "--output_dir", "a_file", "is a file")



def test_locale_all_keeps_the_same_pair_in_two_locales(esci_dir, tmp_path):
    """ESCI reuses query ids and product ids across locales: (query 1, P1) in "es" is another row than in "us"."""
    path = os.path.join(esci_dir, prepare_esci.EXAMPLES_FILE)
    table = pq.read_table(path)
    extra = pa.Table.from_pandas(pd.DataFrame([(13, "funda iphone", 1, "P1", "es", "E", 1, 1, "train")],
                                              columns=EXAMPLES_SCHEMA.names), schema=EXAMPLES_SCHEMA, preserve_index=False)
    pq.write_table(pa.concat_tables([table, extra]), path)
    code, summary = run(esci_dir, tmp_path / "out", "--locale", "all")
    assert code == 0 and summary["problems"]["duplicate_pair"] == 1  # only (3, P5) in "us", as before
    train = read_split(tmp_path / "out", "train")
    pair = train[(train["query_id"] == 1) & (train["product_id"] == "P1")]
    assert sorted(pair["product_locale"]) == ["es", "us"]
    assert summary["splits"]["train"]["rows_by_locale"] == train["product_locale"].value_counts().sort_index().to_dict()


def test_a_tiny_max_item_chars_is_warned_not_silent(esci_dir, tmp_path, caplog):
    code, summary = run(esci_dir, tmp_path / "out", "--max_item_chars", "1")
    assert code == 0 and "--max_item_chars 1 cuts most item texts short" in caplog.text


def test_the_synthetic_release_is_read_like_the_official_one_with_no_problem(tmp_path):
    """scripts/make_synthetic_release.py's files: the official schema, the release's label mix and splits, no
    repeated pair or missing product; prepare_esci.py reads them with every problem count at 0."""
    info = write_synthetic_release(str(tmp_path / "rel"), fraction=0.002, seed=3)
    assert info["examples"] == sum(v["examples"] for v in info["by_locale"].values()) == 5243
    for name, schema in ((prepare_esci.EXAMPLES_FILE, EXAMPLES_SCHEMA), (prepare_esci.PRODUCTS_FILE, PRODUCTS_SCHEMA)):
        assert pq.read_schema(tmp_path / "rel" / name).remove_metadata().equals(schema)
    code, summary = run(str(tmp_path / "rel"), tmp_path / "out", "--locale", "all", "--with_source")
    assert code == 0
    assert {k: v for k, v in summary["problems"].items() if k not in ("empty_title", "empty_item_text")} == dict.fromkeys(
        ["unknown_label", "unknown_split", "blank_query", "duplicate_pair", "duplicate_product", "missing_product",
         "missing_source"], 0)
    rows = sum(s["rows"] for s in summary["splits"].values())
    labels = {k: sum(s["labels"][k] for s in summary["splits"].values()) / rows for k in "ESCI"}
    assert labels["E"] == pytest.approx(0.652, abs=0.03) and labels["C"] == pytest.approx(0.029, abs=0.01)
    assert summary["splits"]["test"]["rows"] / rows == pytest.approx(0.234, abs=0.05)
    train = read_split(tmp_path / "out", "train")
    assert train["item_text"].str.len().mean() > 300  # catalog-length text, not stubs
