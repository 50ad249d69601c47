"""Bad input at the CLIs: one clear paragraph, exit code 2, no traceback; and --help reads like docs."""

import argparse
import os
import subprocess
import sys

import pandas as pd
import pytest

import eval as eval_cli
import train as train_cli
from tests.conftest import ROOT

GOOD = {"query": ["usb charger", "tent"], "item_text": ["Anker charger", "Coleman tent"], "esci_label": ["E", "I"]}


def _bad_files(tmp_path):
    """(name, path, words the message must contain)."""
    cases = []

    def add(name, frame, *must):
        path = tmp_path / f"{name}.parquet"
        frame.to_parquet(path, index=False)
        cases.append((name, str(path), must))

    add("missing_column", pd.DataFrame(GOOD).drop(columns=["esci_label"]), "'esci_label'", "missing")
    add("unknown_label", pd.DataFrame({**GOOD, "esci_label": ["E", "Z"]}), "'esci_label'", "row 1: 'Z'")
    add("null_query", pd.DataFrame({**GOOD, "query": ["usb", None]}), "'query'", "row 1: null")
    add("empty_item", pd.DataFrame({**GOOD, "item_text": ["", "x"]}), "'item_text'", "row 0: ''")
    add("empty_file", pd.DataFrame(GOOD).iloc[0:0], "no rows")
    cases.append(("missing_file", str(tmp_path / "absent.parquet"), ("file not found", "prepare_esci.py")))
    return cases


@pytest.mark.parametrize("cli", ["train", "eval"])
def test_bad_inputs_exit_2_with_clear_message(cli, tmp_path, tiny_model_dir, capsys):
    for name, path, must in _bad_files(tmp_path):
        if cli == "train":
            rc = train_cli.main(["--base_model", tiny_model_dir, "--train_file", path, "--output_dir", str(tmp_path / "o")])
        else:
            rc = eval_cli.main(["--base_model", tiny_model_dir, "--eval_file", path])
        err = capsys.readouterr().err
        assert rc == 2, name
        assert path in err and all(m in err for m in must), (name, err)
        assert err.strip().startswith("error:") and len(err.strip().splitlines()) == 1, err


def test_cli_process_prints_no_traceback(tmp_path, tiny_model_dir):
    path = tmp_path / "bad.parquet"
    pd.DataFrame({**GOOD, "esci_label": ["E", "maybe"]}).to_parquet(path)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--base_model", tiny_model_dir,
                           "--eval_file", str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "row 1: 'maybe'" in proc.stderr


def test_missing_adapter_folder_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    pd.DataFrame(GOOD).to_parquet(tmp_path / "ok.parquet")
    rc = eval_cli.main(["--base_model", tiny_model_dir, "--lora_model", str(tmp_path / "nope"),
                        "--eval_file", str(tmp_path / "ok.parquet")])
    assert rc == 2 and "lora_model" in capsys.readouterr().err


def test_lm_head_is_refused_as_lora_target(tmp_path, tiny_model_dir, capsys):
    pd.DataFrame(GOOD).to_parquet(tmp_path / "ok.parquet")
    with pytest.raises(SystemExit) as info:
        train_cli.main(["--base_model", tiny_model_dir, "--train_file", str(tmp_path / "ok.parquet"),
                        "--output_dir", str(tmp_path / "o"), "--lora_target_modules", "q_proj,lm_head"])
    assert info.value.code == 2 and "must not be a LoRA target" in capsys.readouterr().err


SCRIPTS = sorted(f for f in os.listdir(ROOT) if f.endswith(".py") and "make_parser" in open(os.path.join(ROOT, f)).read())


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_documents_every_flag(script, capsys):
    """In-process (test_cli_process_prints_no_traceback runs a script as a process): ``main(["--help"])``."""
    import importlib

    module = importlib.import_module(script[:-3])
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith("usage:")
    for action in module.make_parser()._actions:
        if action.option_strings and action.dest != "help" and action.help != argparse.SUPPRESS:
            assert action.help, f"{script} {action.option_strings} has no help text"
            assert action.option_strings[0] in out


def test_train_help_lists_the_design_flags():
    flags = [a.option_strings[0] for a in train_cli.make_parser()._actions if a.option_strings]
    for flag in ("--base_model", "--train_file", "--output_dir", "--max_length", "--per_device_train_batch_size",
                 "--gradient_accumulation_steps", "--num_train_epochs", "--learning_rate", "--warmup_ratio",
                 "--logging_steps", "--save_steps", "--save_total_limit", "--lora_r", "--lora_alpha", "--lora_dropout",
                 "--eval_ratio", "--bf16", "--no_flash_attn", "--report_to", "--wandb_run_name",
                 "--lora_target_modules", "--seed", "--max_steps", "--resume_from_checkpoint",
                 "--gradient_checkpointing", "--per_device_eval_batch_size"):
        assert flag in flags


def test_train_setup_errors_exit_2_without_traceback(tmp_path, tiny_model_dir, capsys):
    pd.DataFrame(GOOD).to_parquet(tmp_path / "ok.parquet")
    base = ["--base_model", tiny_model_dir, "--train_file", str(tmp_path / "ok.parquet"), "--output_dir", str(tmp_path / "o")]
    cases = [
        (["--resume_from_checkpoint", str(tmp_path / "checkpoint-15OO")], "cannot resume from it: folder not found"),
        (["--max_length", "64"], "max_length=64 is too small"),
        (["--lora_target_modules", "no_such_module"], "no_such_module"),
    ]
    for extra, must in cases:
        assert train_cli.main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert "error: " in err and must in err and "Traceback" not in err, err


@pytest.mark.parametrize("flag,value", [("--batch_size", "0"), ("--max_samples", "0"), ("--max_length", "-1")])
def test_eval_rejects_non_positive_sizes(flag, value, tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as info:
        eval_cli.main(["--base_model", tiny_model_dir, "--eval_file", "x.parquet", flag, value])
    assert info.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_bench_unknown_model_is_a_clear_error(tmp_path, capsys):
    import bench

    assert bench.main(["--model", str(tmp_path / "no_model_here")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model") and "Traceback" not in err


@pytest.mark.parametrize("script,argv", [("bench", ["--n_queries", "0"]), ("bench", ["--repeats", "-1"]),
                                         ("bench", ["--train_batch_size", "0"]), ("demo", ["--n_train_queries", "0"])])
def test_bench_and_demo_refuse_bad_sizes(script, argv, capsys):
    import importlib

    with pytest.raises(SystemExit) as info:
        importlib.import_module(script).main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and argv[0] in err and "must be at least 1" in err


def test_eval_and_predict_warn_when_many_items_are_cut_below_half(tmp_path, tiny_model_dir, caplog):
    import logging

    import predict as predict_cli

    long_item = "stainless steel water bottle with a leak proof lid and a carry loop " * 10
    data = tmp_path / "long.parquet"
    pd.DataFrame({"query": ["bottle"] * 4, "item_text": [long_item] * 3 + ["cup"], "esci_label": ["E"] * 4}).to_parquet(data)
    caplog.set_level(logging.WARNING)
    assert eval_cli.main(["--base_model", tiny_model_dir, "--eval_file", str(data), "--max_length", "96", "--no_plots",
                          "--metrics_path", str(tmp_path / "m.json"), "--dtype", "fp32"]) == 0
    assert any("3 of 4 items" in r.getMessage() and "--max_length" in r.getMessage() for r in caplog.records)
    caplog.clear()
    assert predict_cli.main(["--base_model", tiny_model_dir, "--input", str(data), "--output", str(tmp_path / "p.jsonl"),
                             "--max_length", "96", "--dtype", "fp32"]) == 0
    assert any("3 of 4 items" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("script", ["run_train.sh", "run_eval.sh"])
def test_a_wrapper_refuses_an_nproc_that_is_not_a_count(script):
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "NPROC": "abc"})
    assert proc.returncode == 2 and "NPROC must be a positive number of processes, got 'abc'" in proc.stderr
