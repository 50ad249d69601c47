"""A catalogue of bad inputs: every CLI answers each with exit code 2 and one message naming the value, never a traceback.

Adding a case is one line in CASES. In ``argv`` (split like a shell line) these are filled in:

    {tmp}     the case's own folder, which already holds:
    {base}    {tmp}/base, an empty "model" folder      {lora}  {tmp}/lora, a folder with adapter_config.json
    {ok}      {tmp}/ok.jsonl, one good pair line      {file}  {tmp}/a_file, a plain file
    {esci}    {tmp}/esci, a small valid ESCI release
    {tiny}    the tiny Qwen3 (session fixture)          {adapter}  a real LoRA folder for it (session fixture)
    {data}    {tmp}/data.parquet, a valid two-row ESCI file

COMMON[cli] goes in front of ``argv``; argparse keeps the last value of a repeated flag, so a
case can override it. Loading model weights is blocked: every case must fail before it (a case
that names {tiny} or {adapter} may load their tokenizer). ``files`` maps a path in {tmp} to text, bytes, a writer function
or None (a folder). Cases run in-process; ``stdin`` is decoded as UTF-8 with surrogateescape,
as Python reads a pipe under the C/POSIX locale (a UTF-8 locale fails earlier, on decoding,
which tests/test_predict.py covers with a file).
"""

from __future__ import annotations

import errno
import importlib
import io
import json
import os
import shlex
import sys
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import pytest

from esci_dataset import ESCIDataError
from prepare_esci import EXAMPLES_FILE, PRODUCTS_FILE, SOURCES_FILE
from tests.test_prepare_esci import write_release
from tiny_reranker import cli
from tiny_reranker.io import write_json


class Case(NamedTuple):
    cli: str                          # module whose main(argv) runs: predict, export, prepare_esci, ...
    argv: str                         # after COMMON[cli]
    must: tuple[str, ...]             # words the error line must contain: the flag, file, line/row and value
    stdin: str | bytes | None = None
    files: dict | None = None         # {tmp}-relative path -> str | bytes | writer(path) | None (folder)


COMMON = {
    "predict": "--base_model {base} --lora_model {lora}",
    "export": "--base_model {base} --lora_model {lora} --format merged --output_dir {tmp}/out",
    "prepare_esci": "--esci_dir {esci} --output_dir {tmp}/out",
    "train": "--base_model {tiny} --train_file {data} --output_dir {tmp}/o",
    "eval": "--base_model {base} --eval_file {data} --metrics_path {tmp}/m.json",
    "bench": "--model tiny",
    "demo": "--out_dir {tmp}/demo",
}


def parquet(**columns) -> Callable[[str], None]:
    return lambda path: pd.DataFrame(columns).to_parquet(path, index=False)


def release(examples: dict | None = None, products: dict | None = None) -> Callable[[str], None]:
    """The test release with columns replaced by one value of another type (see write_release)."""
    return lambda path: write_release(path, examples, products)


def line(**fields) -> str:
    return json.dumps(fields) + "\n"


HUGE_INT = "9" * 5000  # Python refuses to parse integers of more than 4300 digits (ValueError, not JSONDecodeError)
DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in the json parser

CASES = {
    # predict: JSON lines on stdin ---------------------------------------------------------------
    "predict_not_json": Case("predict", "--input -", ("line 1", "not json"), "not json\n"),
    "predict_not_an_object": Case("predict", "--input -", ("line 1", "[1, 2]"), "[1, 2]\n"),
    "predict_null_line": Case("predict", "--input -", ("line 1", "got null"), "null\n"),
    "predict_query_missing": Case("predict", "--input -", ("line 1", "'query'", "null"), line(item_text="x")),
    "predict_query_a_number": Case("predict", "--input -", ("line 1", "'query'", ": 5"), line(query=5, item_text="x")),
    "predict_query_infinite": Case("predict", "--input -", ("'query'", "Infinity"), '{"query": 1e999, "item_text": "x"}\n'),
    "predict_huge_integer": Case("predict", "--input -", ("line 1", "4300 digits", '"n": 9999'),
                                 '{"query": "q", "item_text": "x", "n": %s}\n' % HUGE_INT),
    "predict_deep_nesting": Case("predict", "--input -", ("line 1", "nested too deeply"),
                                 '{"query": "q", "item_text": "x", "a": %s}\n' % DEEP),
    "predict_lone_surrogate": Case("predict", "--input -", ("line 1", "\\ud800"), '{"query": "\\ud800", "item_text": "x"}\n'),
    "predict_items_a_string": Case("predict", "--input -", ("'items'", '"abc"'), line(query="q", items="abc")),
    "predict_item_a_number": Case("predict", "--input -", ("line 1", "items[1]=3"), line(query="q", items=["a", 3])),
    "predict_pair_and_request": Case("predict", "--input -", ("line 1", "exactly one"), line(query="q", item_text="x", items=[])),
    "predict_line_number": Case("predict", "--input -", ("line 3", "'item_text'", '""'), "\n" + line(query="q", item_text="x")
                                + line(query="q", item_text="")),
    "predict_stdin_not_utf8": Case("predict", "--input -", ("line 1", "UTF-8", "caf\\udce9"),
                                   b'{"query": "caf\xe9", "item_text": "x"}\n'),
    # predict: user columns are never overwritten ------------------------------------------------
    "predict_user_score_column": Case("predict", "--input {tmp}/in.csv", ("in.csv", "'score'", "--column_prefix"),
                                      files={"in.csv": "query,item_text,score\nq,x,0.5\n"}),
    "predict_user_pred_label_field": Case("predict", "--input {tmp}/in.jsonl", ("in.jsonl", "'pred_label'", "--column_prefix"),
                                          files={"in.jsonl": line(query="q", item_text="x", pred_label="E")}),
    "predict_user_results_field": Case("predict", "--input -", ("'results'", "--column_prefix"), line(query="q", items=["a"], results=1)),
    "predict_prefixed_clash": Case("predict", "--input {tmp}/in.parquet --column_prefix pred_", ("'pred_score'",),
                                   files={"in.parquet": parquet(query=["q"], item_text=["x"], pred_score=[1.0])}),
    # predict: flags and the output path, checked before the model loads ---------------------------
    "predict_output_is_a_folder": Case("predict", "--input {ok} --output {tmp}/out.jsonl", ("--output", "out.jsonl", "is a folder"),
                                       files={"out.jsonl": None}),
    "predict_output_under_a_file": Case("predict", "--input {ok} --output {file}/o.jsonl", ("--output", "a_file", "not a folder")),
    "predict_output_mixed_types": Case("predict", "--input {tmp}/in.jsonl --output {tmp}/o.parquet", ("o.parquet", "'a'"),
                                       files={"in.jsonl": line(query="q", item_text="x", id=1) + line(query="q", item_text="y", id="a")}),
    "predict_top_k_negative": Case("predict", "--input {ok} --top_k -1", ("--top_k", "-1")),
    "predict_batch_size_zero": Case("predict", "--input {ok} --batch_size 0", ("--batch_size", "0")),
    # export: never deletes or mixes with its inputs ------------------------------------------------
    "export_onto_the_adapter": Case("export", "--output_dir {lora} --overwrite", ("--output_dir", "is the --lora_model", "lora")),
    "export_into_the_adapter": Case("export", "--output_dir {lora}/export", ("is inside the --lora_model",)),
    "export_around_the_adapter": Case("export", "--output_dir {tmp} --overwrite", ("contains the --lora_model",)),
    "export_onto_the_base": Case("export", "--output_dir {base} --overwrite", ("is the --base_model", "base")),
    "export_onto_a_real_adapter": Case("export", "--base_model {tiny} --lora_model {adapter} --output_dir {adapter} --overwrite",
                                       ("is the --lora_model",)),
    "export_overwrite_not_an_export": Case("export", "--overwrite", ("out", "not an earlier export"), files={"out/notes.txt": "mine"}),
    "export_overwrite_an_export_holding_a_users_file": Case("export", "--overwrite", ("out", "not an earlier export"),
                                                            files={"out/reranker_prompt.json": "{}", "out/config.json": "{}",
                                                                   "out/my_notes.txt": "mine"}),
    "export_not_empty": Case("export", "", ("out", "--overwrite"), files={"out/notes.txt": "mine"}),
    "export_output_is_a_file": Case("export", "--output_dir {file}", ("--output_dir", "a_file", "is a file")),
    "export_output_under_a_file": Case("export", "--output_dir {file}/out", ("--output_dir", "a_file", "not a folder")),
    "export_unknown_format": Case("export", "--format onnx", ("--format", "onnx")),
    # prepare_esci: column types of the release files, and the output folder -------------------------
    "prepare_product_id_float": Case("prepare_esci", "--esci_dir {tmp}/rel", (PRODUCTS_FILE, "'product_id'", "row 0: 2.5"),
                                     files={"rel": release(products={"product_id": 2.5})}),
    "prepare_title_int": Case("prepare_esci", "--esci_dir {tmp}/rel", (PRODUCTS_FILE, "'product_title'", "row 0: 9"),
                              files={"rel": release(products={"product_title": 9})}),
    "prepare_version_text": Case("prepare_esci", "--esci_dir {tmp}/rel", (EXAMPLES_FILE, "'large_version'", "row 0: '1'"),
                                 files={"rel": release(examples={"large_version": "1"})}),
    "prepare_query_id_text": Case("prepare_esci", "--esci_dir {tmp}/rel", (EXAMPLES_FILE, "'query_id'", "row 0: 'q1'"),
                                  files={"rel": release(examples={"query_id": "q1"})}),
    "prepare_locale_all_null": Case("prepare_esci", "--esci_dir {tmp}/rel", (PRODUCTS_FILE, "'product_locale'", "every row is null"),
                                    files={"rel": release(products={"product_locale": None})}),
    "prepare_sources_query_id": Case("prepare_esci", "--with_source", (SOURCES_FILE, "'query_id'", "row 1: 'abc'"),
                                     files={f"esci/{SOURCES_FILE}": "query_id,source\n1,other\nabc,other\n"}),
    "prepare_output_is_a_file": Case("prepare_esci", "--output_dir {file}", ("--output_dir", "a_file", "is a file")),
    "prepare_output_under_a_file": Case("prepare_esci", "--output_dir {file}/out", ("--output_dir", "a_file", "not a folder")),
    "prepare_max_item_chars": Case("prepare_esci", "--max_item_chars 0", ("--max_item_chars", "got 0")),
    # train: numbers, files, output folders and checkpoints, all before the model loads ---------------
    "train_learning_rate_nan": Case("train", "--learning_rate nan", ("--learning_rate", "nan")),
    "train_epochs_negative": Case("train", "--num_train_epochs -1", ("--num_train_epochs", "-1")),
    "train_max_train_samples_zero": Case("train", "--max_train_samples 0", ("--max_train_samples", "got 0")),
    "train_best_model_without_held_out": Case("train", "--load_best_model_at_end --eval_ratio 0",
                                              ("--load_best_model_at_end", "--eval_ratio")),
    "train_best_model_steps_misaligned": Case("train", "--load_best_model_at_end --save_steps 10 --eval_steps 4",
                                              ("--save_steps (10)", "multiple of --eval_steps (4)")),
    "train_best_model_one_query": Case("train", "--train_file {tmp}/one.parquet --load_best_model_at_end",
                                       ("one.parquet", "only one query", "--load_best_model_at_end"),
                                       files={"one.parquet": parquet(query=["q", "q"], item_text=["a", "b"],
                                                                     esci_label=["E", "I"])}),
    "train_best_model_ndcg_undefined": Case("train", "--train_file {tmp}/all_i.parquet --load_best_model_at_end",
                                            ("all_i.parquet", "no held-out query has an E, S or C item"),
                                            files={"all_i.parquet": parquet(query=["q", "q", "r", "r"],
                                                                            item_text=["a", "b", "c", "d"],
                                                                            esci_label=["I", "I", "I", "I"])}),
    "train_best_model_metric_unknown": Case("train", "--load_best_model_at_end --metric_for_best_model f1",
                                            ("--metric_for_best_model", "'f1'")),
    "train_max_length_below_template": Case("train", "--max_length 70", ("max_length=70", "too small")),
    "train_optim_unknown": Case("train", "--optim nosuch", ("--optim", "'nosuch'", "adamw_torch")),
    "train_scheduler_unknown": Case("train", "--lr_scheduler_type nosuch", ("--lr_scheduler_type", "'nosuch'", "cosine")),
    "train_report_to_unknown": Case("train", "--report_to none,nosuch", ("--report_to", "'nosuch'", "tensorboard")),
    "train_missing_file": Case("train", "--train_file {tmp}/absent.parquet", ("absent.parquet", "file not found",
                                                                               "prepare_esci.py")),
    "train_reused_output_dir": Case("train", "", ("--output_dir", "checkpoint-4", "--overwrite_output_dir"),
                                    files={"o/checkpoint-4/trainer_state.json": '{"global_step": 4}'}),
    "train_resume_corrupt_state": Case("train", "--resume_from_checkpoint {tmp}/o/checkpoint-4",
                                       ("checkpoint-4", "unreadable"), files={"o/checkpoint-4/trainer_state.json": '{"glo'}),
    "train_resume_latest_none": Case("train", "--resume_from_checkpoint latest", ("latest", "no checkpoint-*")),
    # eval: model folders that would crash the loaders, user columns, the max_length floor ------------
    "eval_empty_adapter_config": Case("eval", "--lora_model {tmp}/l2", ("adapter_config.json", "not a readable JSON"),
                                      files={"l2/adapter_config.json": ""}),
    "eval_junk_adapter_weights": Case("eval", "--lora_model {tmp}/l2", ("adapter_model.safetensors", "unreadable"),
                                      files={"l2/adapter_config.json": "{}", "l2/adapter_model.safetensors": b"0123456789"}),
    "eval_pickle_only_base": Case("eval", "--base_model {tmp}/pb", ("pytorch_model.bin", "save_pretrained"),
                                  files={"pb/pytorch_model.bin": b"not unpickled"}),
    "eval_seq_cls_export_as_base": Case("eval", "--base_model {tmp}/sc", ("base_model", "sc", "Qwen3ForSequenceClassification",
                                                                       "--format merged"),
                                        files={"sc/config.json": '{"architectures": ["Qwen3ForSequenceClassification"]}'}),
    "predict_seq_cls_export_as_base": Case("predict", "--base_model {tmp}/sc --input {ok}", ("sc", "sequence classifier"),
                                           files={"sc/config.json": '{"architectures": ["Qwen3ForSequenceClassification"]}'}),
    "eval_adapter_as_base": Case("eval", "--base_model {adapter}", ("base_model", "LoRA adapter folder", "--lora_model",
                                                                   "trained on")),
    "predict_adapter_as_base": Case("predict", "--base_model {adapter} --input {ok}", ("LoRA adapter folder",)),
    "export_adapter_as_base": Case("export", "--base_model {adapter} --lora_model {adapter}", ("LoRA adapter folder",)),
    "train_adapter_as_base": Case("train", "--base_model {adapter}", ("LoRA adapter folder", "--lora_model")),
    "eval_missing_file": Case("eval", "--eval_file {tmp}/absent.parquet", ("absent.parquet", "prepare_esci.py")),
    "eval_user_score_column": Case("eval", "--eval_file {tmp}/e.parquet --save_scores_path {tmp}/s.parquet",
                                   ("e.parquet", "'score'", "--column_prefix"),
                                   files={"e.parquet": parquet(query=["q"], item_text=["x"], esci_label=["E"], score=[0.5])}),
    "eval_max_length_below_template": Case("eval", "--base_model {tiny} --max_length 70", ("max_length=70", "too small")),
    "eval_batch_size_zero": Case("eval", "--batch_size 0", ("--batch_size", "0")),
    # bench and demo: sizes -------------------------------------------------------------------------
    "bench_n_queries_zero": Case("bench", "--n_queries 0", ("--n_queries", "0")),
    "bench_repeats_negative": Case("bench", "--repeats -2", ("--repeats", "-2")),
    "demo_test_queries_zero": Case("demo", "--n_test_queries 0", ("--n_test_queries", "0")),
    # outputs never land on an input, in a model folder, or on another output (issue 20) ---------------
    "eval_metrics_onto_the_eval_file": Case("eval", "--metrics_path {data}", ("--metrics_path", "is the --eval_file file")),
    "eval_scores_onto_the_eval_file": Case("eval", "--save_scores_path {data}", ("--save_scores_path", "--eval_file")),
    "eval_scores_onto_the_metrics": Case("eval", "--metrics_path {tmp}/s.parquet --save_scores_path {tmp}/./s.parquet",
                                         ("--save_scores_path", "same file as --metrics_path")),
    "eval_metrics_onto_adapter_weights": Case("eval", "--base_model {tiny} --lora_model {adapter} --metrics_path "
                                              "{adapter}/adapter_model.safetensors",
                                              ("--metrics_path", "inside the --lora_model folder", "model files")),
    "eval_metrics_inside_the_base": Case("eval", "--base_model {tiny} --metrics_path {tiny}/m.json",
                                         ("--metrics_path", "inside the --base_model folder")),
    "predict_output_onto_the_input": Case("predict", "--input {tmp}/in.csv --output {tmp}/sub/../in.csv",
                                          ("--output", "is the --input file"),
                                          files={"in.csv": "query,item_text\nq,x\n", "sub": None}),
    "train_output_is_the_base": Case("train", "--output_dir {tiny}", ("--output_dir", "is the --base_model folder")),
    "train_output_inside_the_base": Case("train", "--output_dir {tiny}/run", ("is inside the --base_model folder",)),
    "train_output_holds_an_adapter": Case("train", "", ("--output_dir", "adapter_config.json", "--overwrite_output_dir"),
                                          files={"o/adapter_config.json": "{}", "o/adapter_model.safetensors": b"w"}),
    "train_output_holds_a_users_readme": Case("train", "", ("README.md", "--overwrite_output_dir"),
                                              files={"o/README.md": "# my notes"}),
    "bench_pickle_only_model": Case("bench", "--model {tmp}/pb", ("pytorch_model.bin", "save_pretrained"),
                                    files={"pb/pytorch_model.bin": b"not unpickled", "pb/config.json": "{}"}),
    "bench_json_unwritable": Case("bench", "--json /proc/bench.json", ("--json", "/proc/bench.json")),
    "demo_users_file_in_the_model_folder": Case("demo", "", ("--out_dir", "mine.txt", "another --out_dir"),
                                                files={"demo/tiny-qwen3/mine.txt": "keep me"}),
    "demo_users_train_file": Case("demo", "", ("train.parquet", "another --out_dir"),
                                  files={"demo/data/train.parquet": parquet(query=["q"], item_text=["x"])}),
    "demo_out_dir_under_a_file": Case("demo", "--out_dir {file}/d", ("--out_dir", "not a folder")),
    # read what the user wrote, or refuse (issue 20) ------------------------------------------------
    "predict_csv_row_with_an_extra_field": Case("predict", "--input {tmp}/in.csv", ("in.csv", "line 2: 3 fields", "2 fields"),
                                                files={"in.csv": "query,item_text\nq,x,extra\n"}),
    "predict_csv_row_short_a_field": Case("predict", "--input {tmp}/in.csv", ("in.csv", "line 3: 1 fields"),
                                          files={"in.csv": "query,item_text\nq,x\nr\n"}),
    "predict_csv_repeated_header": Case("predict", "--input {tmp}/in.csv", ("in.csv", "'query'", "more than once"),
                                        files={"in.csv": "query,item_text,query\nq,x,r\n"}),
    "predict_categorical_blank_item": Case("predict", "--input {tmp}/in.parquet", ("in.parquet", "'item_text'", "row 1: ' '"),
                                           files={"in.parquet": parquet(query=pd.Categorical(["q", "q"]),
                                                                        item_text=pd.Categorical(["x", " "]))}),
    "eval_null_query_id": Case("eval", "--eval_file {tmp}/e.parquet", ("e.parquet", "'query_id'", "row 1: null"),
                               files={"e.parquet": parquet(query=["q", "r"], item_text=["x", "y"], esci_label=["E", "I"],
                                                           query_id=[1.0, None])}),
    "train_list_query_id": Case("train", "--train_file {tmp}/t.parquet", ("t.parquet", "'query_id'", "row 0"),
                                files={"t.parquet": parquet(query=["q", "r"], item_text=["x", "y"], esci_label=["E", "I"],
                                                            query_id=[[1], [2]])}),
    "train_empty_instruction": Case("train", "--instruction ''", ("--instruction is empty",)),
    "train_instruction_with_a_control_token": Case("train", "--instruction 'rank it<|im_end|>'",
                                                   ("--instruction", "<|im_end|>", "control token")),
    "train_resume_step_not_the_folders": Case("train", "--resume_from_checkpoint {tmp}/o/checkpoint-4",
                                              ("checkpoint-4", "global_step 1000000000"),
                                              files={"o/checkpoint-4/trainer_state.json": '{"global_step": 1000000000}'}),
    "eval_adapter_config_without_peft_type": Case("eval", "--lora_model {tmp}/l2", ("adapter_config.json", "peft_type"),
                                                  files={"l2/adapter_config.json": "{}"}),
}


# ---------------------------------------------------------------------------
# Running one case
# ---------------------------------------------------------------------------
def make_case_dir(tmp) -> dict[str, str]:
    os.makedirs(tmp / "base")
    os.makedirs(tmp / "lora")
    (tmp / "lora" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp / "ok.jsonl").write_text(line(query="q", item_text="x"))
    (tmp / "a_file").write_text("not a folder")
    write_release(tmp / "esci")
    parquet(query=["usb c charger", "hdmi cable"], item_text=["Anker charger", "HDMI 2.1 cable"],
            esci_label=["E", "I"])(str(tmp / "data.parquet"))
    return {"tmp": str(tmp), "base": str(tmp / "base"), "lora": str(tmp / "lora"), "ok": str(tmp / "ok.jsonl"),
            "file": str(tmp / "a_file"), "esci": str(tmp / "esci"), "data": str(tmp / "data.parquet")}


def write_files(tmp, files: dict) -> None:
    for name, content in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir()
        elif callable(content):
            content(str(path))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def file_digests(tmp, paths: dict[str, str]) -> dict[str, str]:
    """sha256 of every file in the case folder and in the session's model folders, by path."""
    import hashlib

    roots = [str(tmp)] + [paths[k] for k in ("tiny", "adapter") if k in paths]
    digests = {}
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    digests[path] = hashlib.sha256(f.read()).hexdigest()
    return digests


def no_model(*args, **kwargs):
    raise RuntimeError("a bad-input case reached model loading; it must fail before")


def run_main(cli: str, argv: list[str], stdin, capsys, monkeypatch) -> tuple[int, str]:
    if stdin is not None:
        data = stdin if isinstance(stdin, bytes) else stdin.encode("utf-8")
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape"))
    capsys.readouterr()
    try:
        rc = importlib.import_module(cli).main(argv)
    except SystemExit as exc:  # argparse rejects a flag value
        rc = exc.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_exit_2_with_a_message_naming_it(name, tmp_path, capsys, monkeypatch, request):
    case = CASES[name]
    paths = make_case_dir(tmp_path)
    argv_text = f"{COMMON[case.cli]} {case.argv}"
    if "{tiny}" in argv_text or "{adapter}" in argv_text:  # only the tokenizer may load: never the weights
        paths.update(tiny=request.getfixturevalue("tiny_model_dir"), adapter=request.getfixturevalue("adapter_dir"))
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    write_files(tmp_path, case.files or {})
    argv = [arg.format(**paths) for arg in shlex.split(argv_text)]

    before = file_digests(tmp_path, paths)
    rc, err = run_main(case.cli, argv, case.stdin, capsys, monkeypatch)
    assert file_digests(tmp_path, paths) == before  # a refused command changes no file it was given or found
    assert "Traceback" not in err and "usage:" not in err, err[-3000:]  # no traceback, no 20-line usage block
    assert rc == 2, err[-3000:]
    last = err.strip().splitlines()[-1]  # the message is one paragraph, last on stderr (after any log lines)
    assert "error: " in last, err[-3000:]
    for word in case.must:
        assert word.format(**paths) in last, (word, last)


# ---------------------------------------------------------------------------
# tiny_reranker.cli
# ---------------------------------------------------------------------------
def test_cli_error_prints_one_paragraph_and_returns_2(capsys):
    assert cli.cli_error(ESCIDataError("a.csv: column 'query'\n  row 1: '  '")) == 2
    assert capsys.readouterr().err == "error: a.csv: column 'query' row 1: '  '\n"  # spaces in values kept


def test_output_checks_name_the_flag_and_create_nothing(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder").mkdir()
    cli.check_output_file(str(tmp_path / "new" / "deeper" / "o.json"), "--out")  # creatable: fine
    cli.check_output_dir(str(tmp_path / "new" / "deeper"), "--dir")
    assert sorted(os.listdir(tmp_path)) == ["a_file", "folder"]  # nothing created, no probe file left
    bad = [(cli.check_output_file, tmp_path / "folder", "is a folder"),
           (cli.check_output_file, tmp_path / "a_file" / "o.json", "not a folder"),
           (cli.check_output_dir, tmp_path / "a_file", "is a file"),
           (cli.check_output_dir, tmp_path / "a_file" / "sub" / "dir", "not a folder")]
    for check, path, words in bad:
        with pytest.raises(ESCIDataError) as exc:
            check(str(path), "--flag")
        assert str(exc.value).startswith(f"--flag {path}: ") and words in str(exc.value)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc, where even root cannot create files")
def test_unwritable_folder_is_found_by_writing():
    with pytest.raises(ESCIDataError, match=r"--out /proc/o\.json: cannot write in /proc"):
        cli.check_output_file("/proc/o.json", "--out")


def test_write_json_is_strict(tmp_path):
    path = tmp_path / "sub" / "m.json"
    write_json(str(path), {"nan": float("nan"), "inf": [float("inf"), -np.inf], "np": np.float32("nan"),
                                     "na": pd.NA, "int": np.int64(3), "ok": 0.5, "arr": np.array([1.0, np.nan])})
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in strict JSON"))
    assert data == {"nan": None, "inf": [None, None], "np": None, "na": None, "int": 3, "ok": 0.5, "arr": [1.0, None]}
    assert os.listdir(path.parent) == ["m.json"]


def _fails_in(folder: str):
    """A writer that hits a full disk in ``folder`` and works elsewhere."""
    def write(tmp: str) -> None:
        if os.path.dirname(os.path.abspath(tmp)) == os.path.abspath(folder):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with open(tmp, "w") as f:
            f.write("the results\n")
    return write


def test_save_or_fallback_keeps_the_work(tmp_path, capsys):
    out, spare = tmp_path / "out", tmp_path / "spare"
    spare.mkdir()
    assert cli.save_or_fallback(str(out / "s.jsonl"), _fails_in(str(tmp_path / "elsewhere")), "--output") == 0
    assert (out / "s.jsonl").read_text() == "the results\n"

    assert cli.save_or_fallback(str(out / "t.jsonl"), _fails_in(str(out)), "--output", str(spare)) == 2
    (saved,) = os.listdir(spare)
    assert saved.startswith("t.") and saved.endswith(".jsonl") and (spare / saved).read_text() == "the results\n"
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --output ") and "No space left" in err and str(spare / saved) in err
    assert not (out / "t.jsonl").exists()

    assert cli.save_or_fallback(str(out / "u.jsonl"), _fails_in(str(out)), "--output", str(out)) == 2
    assert "failed too" in capsys.readouterr().err
