"""load_esci_parquet validation, the dataset items and the query-disjoint split."""

import numpy as np
import pandas as pd
import pytest

from esci_dataset import ESCIDataError, ESCIMultiClassRerankDataset, load_esci_parquet, split_by_query


def _write(tmp_path, frame, name="data.parquet"):
    path = tmp_path / name
    frame.to_parquet(path, index=False)
    return str(path)


def _frame(**overrides):
    data = {
        "query_id": [1, 1, 2, 3],
        "query": ["usb charger", "usb charger", "red shoes", "tent"],
        "item_text": ["Anker charger", "HDMI cable", "Nike shoes red", "Coleman tent"],
        "esci_label": ["E", " substitute ", "c", "IRRELEVANT"],
        "product_id": ["a", "b", "c", "d"],
        "product_locale": ["us"] * 4,
    }
    data.update(overrides)
    return pd.DataFrame(data)


def test_labels_normalized_and_extra_columns_kept(tmp_path):
    df = load_esci_parquet(_write(tmp_path, _frame()))
    assert df["esci_label"].tolist() == ["E", "S", "C", "I"]
    assert {"query_id", "product_id", "product_locale"} <= set(df.columns)
    assert df["product_id"].tolist() == ["a", "b", "c", "d"]


def test_missing_file(tmp_path):
    with pytest.raises(ESCIDataError, match=r"nope\.parquet: file not found"):
        load_esci_parquet(str(tmp_path / "nope.parquet"))


def test_missing_column_names_file_and_column(tmp_path):
    path = _write(tmp_path, _frame().drop(columns=["item_text"]))
    with pytest.raises(ESCIDataError) as info:
        load_esci_parquet(path)
    assert path in str(info.value) and "'item_text'" in str(info.value)


def test_unknown_label_names_rows_and_values(tmp_path):
    path = _write(tmp_path, _frame(esci_label=["E", "X", "S", "maybe"]))
    with pytest.raises(ESCIDataError) as info:
        load_esci_parquet(path)
    message = str(info.value)
    assert path in message and "'esci_label'" in message
    assert "row 1: 'X'" in message and "row 3: 'maybe'" in message and "2 unknown label" in message


@pytest.mark.parametrize("column", ["query", "item_text"])
def test_null_or_empty_text_names_rows(tmp_path, column):
    values = _frame()[column].tolist()
    values[0], values[2] = None, "   "
    path = _write(tmp_path, _frame(**{column: values}))
    with pytest.raises(ESCIDataError) as info:
        load_esci_parquet(path)
    message = str(info.value)
    assert f"'{column}'" in message and "row 0: null" in message and "row 2: '   '" in message


def test_empty_file(tmp_path):
    path = _write(tmp_path, _frame().iloc[0:0])
    with pytest.raises(ESCIDataError, match="has no rows"):
        load_esci_parquet(path)


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_text("query,item_text\n")
    with pytest.raises(ESCIDataError, match="not a readable parquet file"):
        load_esci_parquet(str(path))


def test_many_bad_rows_are_summarized(tmp_path):
    n = 20
    path = _write(tmp_path, pd.DataFrame({"query": ["q"] * n, "item_text": ["d"] * n, "esci_label": ["?"] * n}))
    with pytest.raises(ESCIDataError, match=r"20 unknown label.*and 15 more"):
        load_esci_parquet(path)


def test_dataset_items(qwen3_tokenizer, tmp_path):
    df = load_esci_parquet(_write(tmp_path, _frame()))
    ds = ESCIMultiClassRerankDataset(df, qwen3_tokenizer, max_length=200)
    assert len(ds) == 4
    item = ds[1]
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    assert item["labels"] == 1 and [ds[i]["labels"] for i in range(4)] == [0, 1, 2, 3]
    assert len(item["input_ids"]) == len(item["attention_mask"]) <= 200
    assert all(isinstance(t, int) for t in item["input_ids"])


def test_split_by_query_is_disjoint_and_deterministic():
    df = pd.DataFrame({"query_id": np.repeat(np.arange(50), 4), "query": "q", "item_text": "d", "esci_label": "E"})
    train, evl = split_by_query(df, 0.2, seed=7)
    assert len(train) + len(evl) == len(df)
    assert not set(train["query_id"]) & set(evl["query_id"])
    assert evl["query_id"].nunique() == 10
    train2, evl2 = split_by_query(df, 0.2, seed=7)
    assert evl2.index.equals(evl.index)
    _, evl3 = split_by_query(df, 0.2, seed=8)
    assert not evl3.index.equals(evl.index)


def test_split_by_query_text_when_no_query_id():
    df = pd.DataFrame({"query": np.repeat([f"q{i}" for i in range(10)], 3), "item_text": "d", "esci_label": "E"})
    train, evl = split_by_query(df, 0.3, seed=0)
    assert not set(train["query"]) & set(evl["query"]) and evl["query"].nunique() == 3
