"""predict.py at catalog scale: chunked reading and writing, and --resume after a kill (issue 21)."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

import predict as predict_cli
from tiny_reranker import demo_model
from tiny_reranker.reranker import Reranker
from tiny_reranker.scoring import PROB_COLUMNS
from tiny_reranker.streaming import PARTIAL_SUFFIX, STATE_NAME

MAX_LENGTH = 128


@pytest.fixture(scope="module")
def model_args(tiny_model_dir, adapter_dir):
    return ["--base_model", tiny_model_dir, "--lora_model", adapter_dir, "--dtype", "fp32", "--max_length", str(MAX_LENGTH),
            "--batch_size", "4"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """22 pairs as parquet, CSV and JSON lines (the JSON lines as 3 requests and 10 pair lines)."""
    folder = tmp_path_factory.mktemp("pairs")
    df = demo_model.synthetic_esci(3, items_per_query=4, seed=7)
    df = pd.concat([df, demo_model.synthetic_esci(5, items_per_query=2, seed=8, query_id_offset=10)], ignore_index=True)
    df.to_parquet(folder / "in.parquet", index=False)
    df.to_csv(folder / "in.csv", index=False)
    lines = [json.dumps({"query": q, "items": group["item_text"].tolist()}) for q, group in df.head(12).groupby("query")]
    lines += [json.dumps({"query": r.query, "item_text": r.item_text, "id": i}) for i, r in df.iloc[12:].iterrows()]
    (folder / "in.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _read(path) -> pd.DataFrame | list:
    path = str(path)
    if path.endswith(".parquet"):
        return pd.read_parquet(path)
    if path.endswith(".csv"):
        return pd.read_csv(path, dtype={"query_id": str})
    return [json.loads(line) for line in open(path)]


def _assert_same(a, b):
    if isinstance(a, pd.DataFrame):
        assert list(a.columns) == list(b.columns) and len(a) == len(b)
        for column in a.columns:
            if column in (*PROB_COLUMNS, "score"):
                np.testing.assert_allclose(a[column], b[column], rtol=0, atol=1e-5)
            else:
                assert a[column].tolist() == b[column].tolist(), column
        return
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if key == "results":  # ranked items: the same order and scores
                assert [r["index"] for r in x[key]] == [r["index"] for r in y[key]]
                np.testing.assert_allclose([r["score"] for r in x[key]], [r["score"] for r in y[key]], atol=1e-5)
            elif key in (*PROB_COLUMNS, "score"):
                assert x[key] == pytest.approx(y[key], abs=1e-5)
            else:
                assert x[key] == y[key], key


@pytest.mark.parametrize("source, out", [("in.parquet", "o.parquet"), ("in.csv", "o.csv"), ("in.jsonl", "o.jsonl")])
def test_a_chunked_run_equals_one_chunk(model_args, pairs, tmp_path, source, out):
    argv = [*model_args, "--input", str(pairs / source)]
    assert predict_cli.main([*argv, "--output", str(tmp_path / "whole" / out)]) == 0
    assert predict_cli.main([*argv, "--output", str(tmp_path / "chunked" / out), "--chunk_size", "5"]) == 0
    _assert_same(_read(tmp_path / "chunked" / out), _read(tmp_path / "whole" / out))
    assert not os.path.exists(str(tmp_path / "chunked" / out) + PARTIAL_SUFFIX)  # joined, then removed


def test_resume_after_a_kill_scores_every_pair_once_in_order(model_args, pairs, tmp_path, monkeypatch, capsys):
    source, out = str(pairs / "in.parquet"), str(tmp_path / "o.parquet")
    argv = [*model_args, "--input", source, "--output", out, "--chunk_size", "4"]
    assert predict_cli.main([*model_args, "--input", source, "--output", str(tmp_path / "single.parquet")]) == 0

    scored, real = [], Reranker.predict_logits

    def killed_in_chunk_3(self, queries, items, progress=False):
        if len(scored) == 2:
            raise KeyboardInterrupt("killed")  # what a kill leaves: two complete chunks, nothing at --output
        scored.append(list(items))
        return real(self, queries, items, progress)

    monkeypatch.setattr(Reranker, "predict_logits", killed_in_chunk_3)
    with pytest.raises(KeyboardInterrupt):
        predict_cli.main(argv)
    partial = out + PARTIAL_SUFFIX
    assert not os.path.exists(out) and json.load(open(os.path.join(partial, STATE_NAME)))["chunks_done"] == 2

    capsys.readouterr()
    assert predict_cli.main(argv) == 2  # without --resume: refused, and it says how to go on
    assert "--resume" in capsys.readouterr().err and os.path.isdir(partial)

    resumed = []
    monkeypatch.setattr(Reranker, "predict_logits",
                        lambda self, q, i, progress=False: resumed.append(list(i)) or real(self, q, i, progress))
    assert predict_cli.main([*argv, "--resume"]) == 0
    every = pd.read_parquet(source)["item_text"].tolist()
    assert sum(scored, []) + sum(resumed, []) == every  # each pair scored once, in input order
    _assert_same(pd.read_parquet(out), pd.read_parquet(tmp_path / "single.parquet"))
    assert not os.path.exists(partial)


def test_resume_refuses_another_input_or_model_and_needs_a_partial_output(model_args, pairs, tmp_path, capsys,
                                                                          adapter_dir):
    source = tmp_path / "in.jsonl"
    source.write_text((pairs / "in.jsonl").read_text())
    out = str(tmp_path / "o.jsonl")
    argv = [*model_args, "--input", str(source), "--output", out, "--chunk_size", "4"]
    assert predict_cli.main([*argv, "--resume"]) == 2
    assert "no partial output" in capsys.readouterr().err

    os.makedirs(out + PARTIAL_SUFFIX)
    with open(os.path.join(out + PARTIAL_SUFFIX, STATE_NAME), "w") as f:
        json.dump({"version": 1, "identity": predict_cli.run_identity(predict_cli.make_parser().parse_args(argv)),
                   "chunks_done": 0}, f)
    source.write_text(source.read_text() + json.dumps({"query": "q", "item_text": "another"}) + "\n")  # changed
    assert predict_cli.main([*argv, "--resume"]) == 2
    assert "written for another input" in capsys.readouterr().err
    assert predict_cli.main([*argv, "--resume", "--max_length", "256"]) == 2
    assert "written for another flags, input than" in capsys.readouterr().err
