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


VARYING = ('{"query": "a", "item_text": "b", "x": 1}\n{"query": "c", "item_text": "d", "y": 2}\n'
           '{"item_text": "f", "query": "e"}\n')


@pytest.mark.parametrize("out", ["o.csv", "o.parquet"])
def test_json_lines_whose_fields_vary_line_up_across_chunks(model_args, tmp_path, out):
    """Fields that differ, or come in another order, between chunks: each chunk is written with the whole output's
    columns, so a chunked table equals a one-chunk one (it shifted columns in CSV, and crashed the parquet join)."""
    (tmp_path / "in.jsonl").write_text(VARYING)
    argv = [*model_args, "--input", str(tmp_path / "in.jsonl")]
    assert predict_cli.main([*argv, "--output", str(tmp_path / "one" / out)]) == 0
    assert predict_cli.main([*argv, "--output", str(tmp_path / "chunked" / out), "--chunk_size", "1"]) == 0
    one, chunked = _read(tmp_path / "one" / out), _read(tmp_path / "chunked" / out)
    assert chunked["query"].tolist() == ["a", "c", "e"] and chunked["item_text"].tolist() == ["b", "d", "f"]
    pd.testing.assert_frame_equal(chunked.drop(columns=[*PROB_COLUMNS, "score"]), one.drop(columns=[*PROB_COLUMNS, "score"]))


def test_stdin_into_a_file_and_its_resume(model_args, tmp_path, monkeypatch, capsys):
    import io

    out = str(tmp_path / "o.jsonl")
    monkeypatch.setattr("sys.stdin", io.StringIO(VARYING))
    assert predict_cli.main([*model_args, "--input", "-", "--output", out]) == 0  # it crashed on os.stat("-")
    assert [json.loads(line)["query"] for line in open(out)] == ["a", "c", "e"]


def test_partial_output_problems_are_exit_2_before_the_model_loads(tmp_path, capsys, monkeypatch):
    (tmp_path / "base").mkdir()
    monkeypatch.setattr(predict_cli, "reranker_from_args", lambda *a, **k: pytest.fail("the model loaded first"))
    base = ["--base_model", str(tmp_path / "base")]
    (tmp_path / "empty_object.jsonl").write_text('{"query": "a", "item_text": "b", "x": {}}\n')
    assert predict_cli.main([*base, "--input", str(tmp_path / "empty_object.jsonl"), "--output",
                             str(tmp_path / "e.parquet")]) == 2
    assert "'x' holds an empty object" in capsys.readouterr().err
    (tmp_path / "in.csv").write_text("query,item_text\nq1,i1\nq2,i2\n,i3\nq4,   \n")
    assert predict_cli.main([*base, "--input", str(tmp_path / "in.csv"), "--chunk_size", "1"]) == 2
    err = capsys.readouterr().err  # every chunk's bad rows, not only the first chunk's
    assert "row 2: null" in err and "row 3: '   '" in err
    (tmp_path / "ok.jsonl").write_text('{"query": "a", "item_text": "b"}\n')
    (tmp_path / "f.jsonl.partial").write_text("a file")
    assert predict_cli.main([*base, "--input", str(tmp_path / "ok.jsonl"), "--output", str(tmp_path / "f.jsonl")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    (tmp_path / "g.jsonl.partial").mkdir()
    (tmp_path / "g.jsonl.partial" / STATE_NAME).write_text('{"identity": [], "chunks_done": "two"}')
    assert predict_cli.main([*base, "--input", str(tmp_path / "ok.jsonl"), "--output", str(tmp_path / "g.jsonl"),
                             "--resume"]) == 2
    assert "is damaged" in capsys.readouterr().err


def test_a_full_disk_mid_run_keeps_the_complete_chunks_and_says_resume(model_args, pairs, tmp_path, monkeypatch,
                                                                         capsys):
    import errno

    real, calls = predict_cli.write_output, []

    def full_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_cli, "write_output", full_on_the_third)
    out = str(tmp_path / "o.csv")
    argv = [*model_args, "--input", str(pairs / "in.csv"), "--output", out, "--chunk_size", "5"]
    assert predict_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "writing chunk 2" in err and "No space left" in err and "2 complete chunk(s) are kept" in err
    assert "--resume" in err
    monkeypatch.setattr(predict_cli, "write_output", real)
    assert predict_cli.main([*argv, "--resume"]) == 0 and len(pd.read_csv(out)) == len(pd.read_csv(pairs / "in.csv"))


def test_torchrun_scores_chunks_in_order_and_resumes_a_partial_output(model_args, pairs, tmp_path, monkeypatch):
    """A partial output left by a killed run (here a one-process run, 3 of 6 chunks done) is resumed under torchrun:
    each rank scores its share of every remaining chunk, rank 0 writes them in order, and the result equals one
    unchunked process."""
    from tests.conftest import ROOT, run_torchrun

    source, single = str(pairs / "in.parquet"), str(tmp_path / "single.parquet")
    assert predict_cli.main([*model_args, "--input", source, "--output", single]) == 0

    out = str(tmp_path / "resumed.parquet")
    argv = [*model_args, "--input", source, "--output", out, "--chunk_size", "4"]
    calls, real = [], Reranker.predict_logits

    def killed_in_chunk_4(self, queries, items, progress=False):
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(self, queries, items, progress)

    monkeypatch.setattr(Reranker, "predict_logits", killed_in_chunk_4)
    with pytest.raises(KeyboardInterrupt):
        predict_cli.main(argv)
    assert json.load(open(os.path.join(out + PARTIAL_SUFFIX, STATE_NAME)))["chunks_done"] == 3
    proc = run_torchrun(os.path.join(ROOT, "predict.py"), *argv, "--resume", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same(pd.read_parquet(out), pd.read_parquet(single))
    assert not os.path.exists(out + PARTIAL_SUFFIX)
