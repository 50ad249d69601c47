"""predict.py: files and stdin in, the same rows plus predictions out; bad input is exit 2 without a traceback."""

import errno
import io
import json
import os
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import predict as predict_cli
from tests.conftest import ROOT
from tiny_reranker import demo_model
from tiny_reranker.io import atomic_write
from tiny_reranker.reranker import Reranker
from tiny_reranker.scoring import OUTPUT_COLUMNS, PROB_COLUMNS

MAX_LENGTH = 256
BATCH = 4


@pytest.fixture(scope="module")
def model_args(tiny_model_dir, adapter_dir):
    return ["--base_model", tiny_model_dir, "--lora_model", adapter_dir, "--dtype", "fp32", "--max_length", str(MAX_LENGTH),
            "--batch_size", str(BATCH)]


@pytest.fixture(scope="module")
def rr(tiny_model_dir, adapter_dir):
    return Reranker.from_pretrained(tiny_model_dir, adapter_dir, device="cpu", dtype="fp32", max_length=MAX_LENGTH, batch_size=BATCH)


@pytest.fixture(scope="module")
def pairs_df():
    return demo_model.synthetic_esci(2, items_per_query=4, seed=5)  # 8 rows with ids and labels as extra columns


def _run(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = predict_cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------
def test_parquet_in_parquet_out_keeps_rows_and_adds_predictions(model_args, rr, pairs_df, tmp_path, capsys):
    src, dst = tmp_path / "pairs.parquet", tmp_path / "scored.parquet"
    pairs_df.to_parquet(src, index=False)
    rc, out, err = _run([*model_args, "--input", str(src), "--output", str(dst)], capsys)
    assert rc == 0 and out == ""  # nothing on stdout when writing a file
    assert "scoring" in err  # tqdm progress bar, on stderr
    scored = pd.read_parquet(dst)
    assert list(scored.columns) == [*pairs_df.columns, *OUTPUT_COLUMNS]
    pd.testing.assert_frame_equal(scored[pairs_df.columns], pairs_df)  # same rows, same order
    expected = rr.predict(zip(pairs_df["query"], pairs_df["item_text"]))
    assert np.array_equal(scored[list(PROB_COLUMNS)].to_numpy(), [[p[c] for c in PROB_COLUMNS] for p in expected])
    assert scored["pred_label"].tolist() == [p["pred_label"] for p in expected]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_csv_to_jsonl_and_jsonl_to_csv_give_the_same_numbers(model_args, pairs_df, tmp_path, capsys):
    pairs_df.to_csv(tmp_path / "pairs.csv", index=False)
    rc, _, _ = _run([*model_args, "--input", str(tmp_path / "pairs.csv"), "--output", str(tmp_path / "a.jsonl")], capsys)
    assert rc == 0
    lines = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["item_text"] for r in lines] == pairs_df["item_text"].tolist()
    assert lines[0]["query_id"] == str(pairs_df["query_id"][0])  # CSV columns are read as text, kept as text

    pairs_df[["query", "item_text"]].to_json(tmp_path / "pairs.jsonl", orient="records", lines=True)
    rc, _, _ = _run([*model_args, "--input", str(tmp_path / "pairs.jsonl"), "--output", str(tmp_path / "b.csv")], capsys)
    assert rc == 0
    back = pd.read_csv(tmp_path / "b.csv")
    np.testing.assert_allclose(back[list(PROB_COLUMNS)].to_numpy(), [[r[c] for c in PROB_COLUMNS] for r in lines],
                               rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------
# Stdin: pairs and {query, items} requests, JSON lines to stdout
# ---------------------------------------------------------------------------
def test_stdin_pairs_and_requests_to_stdout(model_args, rr, capsys, monkeypatch):
    items = ["Title: Acme laptop Brand: Acme", "Title: coffee mug Brand: Kiyo", "Title: laptop sleeve Brand: Lumio"]
    stdin = "\n".join([
        json.dumps({"query": "acme laptop", "item_text": items[0], "id": "a"}),
        "",  # blank lines are skipped
        json.dumps({"query": "acme laptop", "items": items, "request_id": 7}),
        json.dumps({"query": "acme laptop", "items": []}),
    ]) + "\n"
    rc, out, _ = _run([*model_args, "--input", "-", "--top_k", "2"], capsys, stdin, monkeypatch)
    assert rc == 0
    pair, request, empty = [json.loads(line) for line in out.splitlines()]  # stdout is pure JSON lines
    assert pair["id"] == "a" and set(OUTPUT_COLUMNS) <= set(pair)
    assert request["request_id"] == 7 and "items" not in request
    expected = rr.rank("acme laptop", items, top_k=2)
    assert [r["index"] for r in request["results"]] == [r["index"] for r in expected]
    np.testing.assert_allclose([r["score"] for r in request["results"]], [r["score"] for r in expected], atol=1e-6)
    assert pair["score"] == pytest.approx(rr.predict([("acme laptop", items[0])])[0]["score"], abs=1e-6)
    assert empty["results"] == []


def test_a_real_pipe_gets_only_json_on_stdout(model_args, tmp_path):
    """As a program: logs, warnings and progress go to stderr, so stdout can be piped into jq or a file."""
    stdin = json.dumps({"query": "acme laptop", "items": ["Acme laptop", "coffee mug"]}) + "\n"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), *model_args, "--input", "-"], input=stdin,
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = proc.stdout.splitlines()
    assert sorted(r["item"] for r in json.loads(line)["results"]) == ["Acme laptop", "coffee mug"]
    assert "arguments" in proc.stderr  # the log is there, just not on stdout


def test_empty_input_gives_empty_output(model_args, tmp_path, capsys, monkeypatch):
    rc, out, _ = _run([*model_args, "--input", "-"], capsys, "\n", monkeypatch)
    assert rc == 0 and out == ""
    pd.DataFrame({"query": pd.Series([], dtype=str), "item_text": pd.Series([], dtype=str)}).to_parquet(tmp_path / "e.parquet")
    rc, _, _ = _run([*model_args, "--input", str(tmp_path / "e.parquet"), "--output", str(tmp_path / "o.parquet")], capsys)
    assert rc == 0
    scored = pd.read_parquet(tmp_path / "o.parquet")
    assert len(scored) == 0 and set(OUTPUT_COLUMNS) <= set(scored.columns)


# ---------------------------------------------------------------------------
# Errors: one paragraph naming file, column/line, row and value; exit 2; no traceback
# ---------------------------------------------------------------------------
def test_bad_rows_name_file_column_rows_and_values(model_args, tmp_path, capsys, monkeypatch):
    bad = pd.DataFrame({"query": ["usb", "tent", None], "item_text": ["Anker", "  ", "Coleman"]})
    bad.to_csv(tmp_path / "bad.csv", index=False)
    rc, out, err = _run([*model_args, "--input", str(tmp_path / "bad.csv")], capsys)
    assert rc == 2 and out == ""
    message = err.strip().splitlines()[-1]
    for part in ("bad.csv", "'query'", "row 2", "'item_text'", "row 1: '  '"):
        assert part in message
    assert "Traceback" not in err

    stdin = '{"query": "usb", "item_text": "Anker"}\nnot json\n{"query": "", "items": ["a"]}\n{"query": "q", "items": ["a", 3]}\n'
    rc, out, err = _run([*model_args, "--input", "-"], capsys, stdin, monkeypatch)
    assert rc == 2 and out == ""
    message = err.strip().splitlines()[-1]
    for part in ("<stdin>", "line 2: not valid JSON", "line 3: 'query'", "line 4", "items[1]=3"):
        assert part in message

    pd.DataFrame({"query": ["q"]}).to_parquet(tmp_path / "nocol.parquet")
    rc, _, err = _run([*model_args, "--input", str(tmp_path / "nocol.parquet")], capsys)
    assert rc == 2 and "missing required column(s) 'item_text'" in err


@pytest.mark.parametrize("case", ["missing_input", "input_format", "not_utf8", "output_format", "output_under_file",
                                  "requests_to_csv", "missing_lora", "missing_base"])
def test_bad_arguments_exit_2(case, tiny_model_dir, adapter_dir, tmp_path, capsys, monkeypatch):
    model = ["--base_model", tiny_model_dir, "--lora_model", adapter_dir]
    good = tmp_path / "ok.jsonl"
    good.write_text('{"query": "q", "items": ["a"]}\n')
    (tmp_path / "latin1.jsonl").write_bytes('{"query": "caf\u00e9", "item_text": "x"}\n'.encode("latin-1"))
    argv, must = {
        "missing_input": ([*model, "--input", str(tmp_path / "absent.parquet")], "file not found"),
        "input_format": ([*model, "--input", str(tmp_path / "x.txt")], "unsupported format '.txt'"),
        "not_utf8": ([*model, "--input", str(tmp_path / "latin1.jsonl")], "not UTF-8 text (near line 1"),
        "output_format": ([*model, "--input", str(good), "--output", str(tmp_path / "o.xlsx")], "unsupported format"),
        "output_under_file": ([*model, "--input", str(good), "--output", str(good / "o.jsonl")], "not a folder"),
        "requests_to_csv": ([*model, "--input", str(good), "--output", str(tmp_path / "o.csv")], "write them as .jsonl"),
        "missing_lora": (["--base_model", tiny_model_dir, "--lora_model", str(tmp_path / "nolora"), "--input", str(good)],
                         "lora_model"),
        "missing_base": (["--base_model", str(tmp_path / "nobase"), "--input", str(good)], "base_model"),
    }[case]
    rc, out, err = _run(argv, capsys)
    assert rc == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith("error: ") and must in err and "Traceback" not in err


def test_help_reads_like_docs(capsys):
    with pytest.raises(SystemExit) as exc:
        predict_cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--base_model", "--lora_model", "--input", "--output", "--max_length", "--batch_size", "--bf16",
                 "--no_flash_attn", "--top_k", "--column_prefix"):
        assert flag in text
    assert "(default: 512)" in text and "(default: '')" in text  # defaults are shown


# ---------------------------------------------------------------------------
# Never overwrite user columns, strict JSON, outputs checked first, no lost work
# (a stand-in reranker: these are about predict.py's input and output, not the model)
# ---------------------------------------------------------------------------
class FixedReranker:
    """Gives every pair the logits ``log(probs)``, so predict.py's softmax returns ``probs``."""

    temperature = 1.0

    def __init__(self, probs):
        self.logits = np.log(np.asarray(probs, dtype=np.float64))
        self.encoder = SimpleNamespace(truncation_warning=lambda: None)

    def predict_logits(self, queries, items, progress=False):
        return np.resize(self.logits, (len(queries), 4))


@pytest.fixture
def fixed_model(monkeypatch, tmp_path):
    (tmp_path / "base").mkdir()
    monkeypatch.setattr(predict_cli, "reranker_from_args", lambda args, device=None: FixedReranker([[0.7, 0.1, 0.1, 0.1]]))
    return ["--base_model", str(tmp_path / "base")]


def test_user_columns_are_refused_then_kept_beside_prefixed_ones(fixed_model, tmp_path, capsys):
    user = pd.DataFrame({"query": ["q1", "q2"], "item_text": ["a", "b"], "score": [5.0, 1.0], "pred_label": ["gold", "x"]})
    user.to_parquet(tmp_path / "in.parquet", index=False)
    argv = [*fixed_model, "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out.parquet")]
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and "'score', 'pred_label'" in err and "--column_prefix" in err  # was: silently replaced
    assert not (tmp_path / "out.parquet").exists()

    rc, _, _ = _run([*argv, "--column_prefix", "pred_"], capsys)
    assert rc == 0
    scored = pd.read_parquet(tmp_path / "out.parquet")
    pd.testing.assert_frame_equal(scored[user.columns], user)  # the user's score and pred_label, untouched
    assert list(scored.columns[len(user.columns):]) == ["pred_" + c for c in OUTPUT_COLUMNS]
    assert scored["pred_pred_label"].tolist() == ["E", "E"]


def test_jsonl_output_is_strict_json(fixed_model, tmp_path, capsys, monkeypatch):
    # (a model's NaN logits never get here: tests/test_non_finite_logits.py)
    stdin = '{"query": "q", "item_text": "a", "weight": Infinity}\n{"query": "q", "item_text": "b", "weight": NaN}\n'
    rc, out, _ = _run([*fixed_model, "--input", "-"], capsys, stdin, monkeypatch)
    assert rc == 0
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) for line in out.splitlines()]
    assert [r["weight"] for r in rows] == [None, None] and rows[1]["p_E"] == pytest.approx(0.7)


def test_output_is_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    (tmp_path / "base").mkdir()
    (tmp_path / "out.jsonl").mkdir()  # a folder where the output file should go
    (tmp_path / "in.jsonl").write_text('{"query": "q", "item_text": "a"}\n')
    monkeypatch.setattr(predict_cli, "reranker_from_args", lambda args, device=None: pytest.fail("the model loaded first"))
    rc, _, err = _run(["--base_model", str(tmp_path / "base"), "--input", str(tmp_path / "in.jsonl"),
                       "--output", str(tmp_path / "out.jsonl")], capsys)
    assert rc == 2 and "--output" in err and "is a folder" in err


def test_output_folder_is_created(fixed_model, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"query": "q", "item_text": "a"}\n')
    rc, _, _ = _run([*fixed_model, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "new" / "o.csv")], capsys)
    assert rc == 0 and len(pd.read_csv(tmp_path / "new" / "o.csv")) == 1


def test_a_full_disk_at_the_end_keeps_the_results(fixed_model, tmp_path, capsys, monkeypatch):
    real_write, out_dir = predict_cli.finish_output, tmp_path / "out"

    def disk_full_in_out_dir(path, *args):
        if os.path.dirname(os.path.abspath(path)) == str(out_dir):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, *args)

    monkeypatch.setattr(predict_cli, "finish_output", disk_full_in_out_dir)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "spare"))
    os.makedirs(tmp_path / "spare")
    (tmp_path / "in.jsonl").write_text('{"query": "q", "item_text": "a"}\n{"query": "q", "item_text": "b"}\n')
    rc, _, err = _run([*fixed_model, "--input", str(tmp_path / "in.jsonl"), "--output", str(out_dir / "s.jsonl")], capsys)
    assert rc == 2 and "No space left" in err
    (saved,) = os.listdir(tmp_path / "spare")
    assert str(tmp_path / "spare" / saved) in err
    assert [json.loads(line)["item_text"] for line in (tmp_path / "spare" / saved).read_text().splitlines()] == ["a", "b"]


# ---------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------
def test_a_crash_while_writing_leaves_no_partial_output(tmp_path):
    target = tmp_path / "scores.jsonl"
    target.write_text("old complete file\n")

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write('{"half": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(target), crash)
    assert target.read_text() == "old complete file\n"  # untouched
    assert os.listdir(tmp_path) == ["scores.jsonl"]  # and no temp file left behind

    atomic_write(str(tmp_path / "new.jsonl"), lambda tmp: open(tmp, "w").close())
    assert sorted(os.listdir(tmp_path)) == ["new.jsonl", "scores.jsonl"]


def test_rank_by_expected_gain_reorders_requests_and_adds_the_column(monkeypatch, tmp_path, capsys):
    """Item 0 is E-or-I (score 0.50, expected gain 0.50), item 1 mostly S (score 0.70, expected gain 0.19)."""
    (tmp_path / "base").mkdir()
    probs = [[0.5, 1e-12, 1e-12, 0.5], [0.1, 0.9, 1e-12, 1e-12]]
    monkeypatch.setattr(predict_cli, "reranker_from_args", lambda args, device=None: FixedReranker(probs))
    request = json.dumps({"query": "q", "items": ["either", "substitute"]}) + "\n"
    argv = ["--base_model", str(tmp_path / "base"), "--input", "-"]
    rc, out, _ = _run(argv, capsys, request, monkeypatch)
    assert rc == 0 and [r["index"] for r in json.loads(out)["results"]] == [1, 0]  # the default: by score
    assert "expected_gain" not in json.loads(out)["results"][0]  # the default output is unchanged
    rc, out, _ = _run([*argv, "--rank_by", "expected_gain"], capsys, request, monkeypatch)
    results = json.loads(out)["results"]
    assert rc == 0 and [r["index"] for r in results] == [0, 1]
    assert [round(r["expected_gain"], 4) for r in results] == [0.5, 0.19]
    pd.DataFrame({"query": ["q", "q"], "item_text": ["either", "substitute"]}).to_parquet(tmp_path / "in.parquet")
    rc, _, _ = _run([*argv[:2], "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out.csv"),
                     "--rank_by", "expected_gain"], capsys)
    scored = pd.read_csv(tmp_path / "out.csv")
    assert rc == 0 and list(scored.columns[2:]) == ["p_E", "p_S", "p_C", "p_I", "score", "expected_gain", "pred_label"]
    np.testing.assert_allclose(scored["expected_gain"], [0.5, 0.19], atol=1e-6)
