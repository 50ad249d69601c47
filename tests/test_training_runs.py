"""Training modes: resume after a crash, torchrun on CPU, W&B offline, gradient checkpointing."""

import json
import logging
import os
import textwrap

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

import eval as eval_cli
import train as train_cli
from esci_dataset import load_esci_parquet, split_by_query
from tests.conftest import ROOT, run_torchrun
from tiny_reranker.data_cache import CACHE_DIRNAME
from tiny_reranker.trainer import LabelHeadTrainer

SHORT = ["--max_length", "192", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2",
         "--eval_ratio", "0.1", "--logging_steps", "2", "--report_to", "none"]


def _args(model, data, out, *extra):
    return ["--base_model", model, "--train_file", data, "--output_dir", out, *SHORT, *extra]


def _lora_b(out):
    return {k: v for k, v in load_file(os.path.join(out, "adapter_model.safetensors")).items() if "lora_B" in k}


def test_resume_after_interruption_finishes_like_an_uninterrupted_run(tiny_model_dir, demo_data, tmp_path, monkeypatch, caplog):
    from transformers import Trainer

    full = str(tmp_path / "full")
    predicts = []
    original_predict = LabelHeadTrainer.predict
    monkeypatch.setattr(LabelHeadTrainer, "predict", lambda self, *a, **kw: predicts.append(1) or original_predict(self, *a, **kw))
    assert train_cli.main(_args(tiny_model_dir, demo_data[0], full, "--max_steps", "8", "--save_steps", "4")) == 0
    # Step 8 was an evaluation step: calibration reuses its logits, with no second held-out pass. They are the
    # final model's: the temperature equals one fitted on the adapter's own held-out logits, scored anew.
    assert predicts == []
    with open(os.path.join(full, "train_metrics.json")) as f:
        fitted = json.load(f)["calibration"]["temperature"]
    from esci_dataset import LABEL_TO_ID
    from tiny_reranker.reranker import Reranker
    from tiny_reranker.trainer import fit_held_out_temperature

    held_out = split_by_query(load_esci_parquet(demo_data[0]), 0.1, 42)[1]
    rr = Reranker.from_pretrained(tiny_model_dir, full, device="cpu", dtype="fp32", max_length=192, temperature=1.0)
    logits = rr.predict_logits(held_out["query"].tolist(), held_out["item_text"].tolist())
    refit = fit_held_out_temperature(logits, held_out["esci_label"].map(LABEL_TO_ID).to_numpy())["temperature"]
    assert refit == pytest.approx(fitted, rel=1e-3)
    for step in (4, 8):  # every checkpoint carries the contract, our model card, and can be evaluated as is
        checkpoint = os.path.join(full, f"checkpoint-{step}")
        with open(os.path.join(checkpoint, "README.md")) as f:
            assert "More Information Needed" not in f.read()
        metrics = str(tmp_path / f"eval-{step}.json")
        assert eval_cli.main(["--base_model", tiny_model_dir, "--lora_model", checkpoint, "--eval_file", demo_data[1],
                              "--max_samples", "24", "--max_length", "256", "--no_plots", "--metrics_path", metrics]) == 0
        with open(metrics) as f:
            assert json.load(f)["n"] == 24

    crashed = str(tmp_path / "crashed")
    original = Trainer._save_checkpoint

    def save_then_crash(self, *a, **kw):
        original(self, *a, **kw)
        raise KeyboardInterrupt("simulated crash right after checkpoint-4")

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_cli.main(_args(tiny_model_dir, demo_data[0], crashed, "--max_steps", "8", "--save_steps", "4"))
    monkeypatch.setattr(Trainer, "_save_checkpoint", original)
    left = os.listdir(crashed)
    assert "checkpoint-4" in left and "checkpoint-8" not in left and "adapter_model.safetensors" not in left

    steps_run = []
    original_step = LabelHeadTrainer.training_step

    def counted_step(self, *a, **kw):
        steps_run.append(self.state.global_step)
        return original_step(self, *a, **kw)

    monkeypatch.setattr(LabelHeadTrainer, "training_step", counted_step)
    with caplog.at_level(logging.INFO, logger="train"):
        rc = train_cli.main(_args(tiny_model_dir, demo_data[0], crashed, "--max_steps", "8", "--save_steps", "4",
                                  "--resume_from_checkpoint", "latest"))
    assert rc == 0
    assert "resuming from checkpoint-4 (step 4 of 8)" in caplog.text
    assert f"Next, evaluate it: python eval.py --base_model {tiny_model_dir} --lora_model {crashed}" in caplog.text
    assert steps_run == [4, 5, 6, 7]  # it went on from checkpoint-4; a fresh run of 8 steps would end alike
    with open(os.path.join(crashed, "checkpoint-8", "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == 8
    resumed, reference = _lora_b(crashed), _lora_b(full)
    assert resumed.keys() == reference.keys()
    for key in reference:  # same data order, optimizer and scheduler state: same weights
        torch.testing.assert_close(resumed[key], reference[key], atol=1e-5, rtol=1e-4)


def test_max_train_samples_trains_one_epoch_over_that_many_rows_and_says_what_it_left_out(tiny_model_dir, demo_data,
                                                                                          tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="train")
    out = str(tmp_path / "sample")
    assert train_cli.main(_args(tiny_model_dir, demo_data[0], out, "--max_train_samples", "40", "--num_train_epochs", "1",
                                "--save_steps", "100", "--eval_ratio", "0")) == 0
    n_rows = len(pd.read_parquet(demo_data[0]))
    assert f"training on a random sample of 40 of the {n_rows} training rows ({n_rows - 40} left out)" in caplog.text
    with open(os.path.join(out, "train_metrics.json")) as f:
        history = json.load(f)["log_history"]
    assert max(entry["step"] for entry in history) == 5  # 40 rows in steps of 8, not the file's 1,920


def test_load_best_model_at_end_saves_the_checkpoint_with_the_best_held_out_ndcg(tiny_model_dir, demo_data, tmp_path):
    out = str(tmp_path / "best")
    assert train_cli.main(_args(tiny_model_dir, demo_data[0], out, "--learning_rate", "5e-2", "--max_steps", "8",
                                "--save_steps", "2", "--eval_steps", "2", "--save_total_limit", "1",
                                "--load_best_model_at_end", "--dtype", "fp32")) == 0
    with open(os.path.join(out, "train_metrics.json")) as f:
        metrics = json.load(f)
    logged = [(e["step"], e["eval_ndcg"]) for e in metrics["log_history"] if "eval_ndcg" in e]
    assert [step for step, _ in logged] == [2, 4, 6, 8]  # the final eval is not logged again at step 8 (a false point)
    periodic = dict(logged)
    best_step = max(periodic, key=periodic.get)
    assert best_step != 8, periodic  # this run peaks early, so the test can tell the best from the last
    assert sorted(os.listdir(out)).count(f"checkpoint-{best_step}") == 1  # kept beside the last one despite the limit
    saved, best = _lora_b(out), _lora_b(os.path.join(out, f"checkpoint-{best_step}"))
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in best)
    assert metrics["eval"]["eval_ndcg"] == pytest.approx(periodic[best_step], abs=1e-6)  # the final held-out eval
    assert metrics["eval"]["eval_ndcg"] > periodic[8]


def test_a_plain_run_tracks_no_best_checkpoint_and_trains_when_held_out_ndcg_is_undefined(tiny_model_dir, demo_data,
                                                                                          tmp_path, caplog):
    """Without --load_best_model_at_end no metric is watched: the last checkpoint is the one --save_total_limit keeps,
    and a held-out split without a relevant item (nDCG undefined) is no reason to stop."""
    caplog.set_level(logging.INFO, logger="train")
    all_irrelevant = str(tmp_path / "all_i.parquet")
    pd.read_parquet(demo_data[0]).assign(esci_label="I").to_parquet(all_irrelevant, index=False)
    out = str(tmp_path / "plain")
    assert train_cli.main(_args(tiny_model_dir, all_irrelevant, out, "--max_steps", "4", "--save_steps", "2",
                                "--save_total_limit", "1")) == 0
    assert [d for d in os.listdir(out) if d.startswith("checkpoint-")] == ["checkpoint-4"]
    with open(os.path.join(out, "checkpoint-4", "trainer_state.json")) as f:
        assert json.load(f)["best_model_checkpoint"] is None
    assert "nDCG n/a (no held-out query has a relevant item)" in caplog.text


def test_held_out_ndcg_follows_dataset_order_under_group_by_length(tiny_model_dir, demo_data, tmp_path):
    """The stock Trainer also length-groups eval batches under --group_by_length, which scrambled the predictions
    against their queries: train.py's nDCG must still be eval.py's on the same held-out rows."""
    out = str(tmp_path / "grouped")
    assert train_cli.main(_args(tiny_model_dir, demo_data[0], out, "--group_by_length", "--max_steps", "2",
                                "--save_steps", "100", "--dtype", "fp32")) == 0
    _, held_out = split_by_query(load_esci_parquet(demo_data[0]), 0.1, 42)  # SHORT's --eval_ratio, the default seed
    held_out_file, metrics_path = str(tmp_path / "held_out.parquet"), str(tmp_path / "m.json")
    held_out.to_parquet(held_out_file, index=False)
    assert eval_cli.main(["--base_model", tiny_model_dir, "--lora_model", out, "--dtype", "fp32", "--no_temperature",
                          "--eval_file", held_out_file, "--max_length", "192", "--metrics_path", metrics_path,
                          "--no_plots"]) == 0
    with open(metrics_path) as f:
        expected = json.load(f)["esci_tasks"]["task1_ranking_ndcg"]
    with open(os.path.join(out, "train_metrics.json")) as f:
        assert json.load(f)["eval"]["eval_ndcg"] == pytest.approx(expected, abs=1e-6)


def test_resume_latest_without_checkpoint_is_a_clear_error(tiny_model_dir, demo_data, tmp_path, capsys):
    rc = train_cli.main(_args(tiny_model_dir, demo_data[0], str(tmp_path / "empty"), "--resume_from_checkpoint", "latest"))
    assert rc == 2 and "no checkpoint-* folder" in capsys.readouterr().err


def test_gradient_checkpointing_recomputes_layers_and_trains_like_a_plain_run(tiny_model_dir, demo_data, tmp_path,
                                                                               monkeypatch):
    """--gradient_checkpointing runs every decoder layer under non-reentrant checkpointing (which also turns the
    prefix reuse off) and makes the same updates as a run without it."""
    import torch.utils.checkpoint as torch_checkpoint

    calls, original = [], torch_checkpoint._checkpoint_without_reentrant_generator

    def counted(*a, **kw):  # the non-reentrant implementation behind torch.utils.checkpoint.checkpoint
        calls.append(1)
        return original(*a, **kw)

    monkeypatch.setattr(torch_checkpoint, "_checkpoint_without_reentrant_generator", counted)
    same = ["--max_steps", "4", "--save_steps", "100", "--lora_dropout", "0", "--dtype", "fp32"]
    out, plain = str(tmp_path / "gc"), str(tmp_path / "plain")
    assert train_cli.main(_args(tiny_model_dir, demo_data[0], out, *same, "--gradient_checkpointing")) == 0
    n_layers = AutoConfig.from_pretrained(tiny_model_dir).num_hidden_layers
    assert len(calls) >= 4 * n_layers  # every layer of every training step (the held-out eval runs without)
    calls.clear()
    assert train_cli.main(_args(tiny_model_dir, demo_data[0], plain, *same)) == 0
    assert calls == []
    checkpointed, reference = _lora_b(out), _lora_b(plain)
    assert checkpointed.keys() == reference.keys() and any(v.abs().sum() > 0 for v in reference.values())
    for key in reference:
        torch.testing.assert_close(checkpointed[key], reference[key], atol=1e-5, rtol=1e-4)
    with open(os.path.join(out, "README.md")) as f:  # our card, not peft's placeholder
        card = f.read()
    assert "More Information Needed" not in card and "score = (3·P(E)" in card


def test_wandb_offline(tiny_model_dir, demo_data, tmp_path, monkeypatch):
    import wandb  # a dev requirement: missing is a failure, not a skip
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "tiny-reranker-test")
    out = str(tmp_path / "wb")
    assert train_cli.main(_args(tiny_model_dir, demo_data[0], out, "--max_steps", "3", "--save_steps", "100",
                                "--report_to", "wandb", "--wandb_run_name", "ci-run")) == 0
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    assert wandb.run is not None and wandb.run.name == "ci-run"  # the Trainer leaves the run open until exit
    summary = dict(wandb.run.summary)  # what the run logged last: training loss, held-out metrics
    wandb.finish()
    assert summary["train/global_step"] == 3 and "train/loss" in summary and "eval/ndcg" in summary, summary
    assert os.path.exists(os.path.join(out, "adapter_model.safetensors"))




# train.py as torchrun runs it, recording each rank's map() (tokenization) and load_from_disk (cache load).
TRAIN_RECORDING_DATASET_CALLS = textwrap.dedent("""
    import os, sys
    import datasets

    sys.path.insert(0, {root!r})
    marker = {marker!r}
    original_map, original_load = datasets.Dataset.map, datasets.load_from_disk

    def record(event):
        with open(marker, "a") as f:
            f.write(f"{{event}} rank{{os.environ['RANK']}}\\n")

    def recording_map(self, *args, **kwargs):
        record("map")
        return original_map(self, *args, **kwargs)

    def recording_load(*args, **kwargs):
        record("load")
        return original_load(*args, **kwargs)

    datasets.Dataset.map, datasets.load_from_disk = recording_map, recording_load
    import train

    raise SystemExit(train.main())
""")


def test_torchrun_two_processes_train_like_one_process_with_the_combined_batch(tiny_model_dir, demo_data, tmp_path):
    """Each rank takes its shard of one random permutation and gradients are averaged across ranks: two ranks
    x 4 pairs make the same SGD updates as one process x 8 pairs (micro-batch counts differ between ranks).
    The same run shows one tokenization per node (rank 0 tokenizes into the cache, rank 1 only loads it) and
    the held-out evaluation sharded across ranks and gathered back in order: its metrics, nDCG per query and
    the fitted temperature included, are the single process's (one torchrun run, as each costs ~30 s)."""
    sgd = ["--max_steps", "2", "--save_steps", "100", "--optim", "sgd", "--learning_rate", "0.5", "--warmup_ratio", "0",
           "--lr_scheduler_type", "constant", "--lora_dropout", "0", "--eval_ratio", "0.1", "--dtype", "fp32"]
    ddp, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    marker, script = str(tmp_path / "calls.txt"), str(tmp_path / "train_recording.py")
    with open(script, "w") as f:
        f.write(TRAIN_RECORDING_DATASET_CALLS.format(root=ROOT, marker=marker))
    proc = run_torchrun(script, *_args(tiny_model_dir, demo_data[0], ddp, *sgd, "--per_device_train_batch_size", "4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(ddp, "run_config.json")) as f:
        assert json.load(f)["world_size"] == 2

    with open(marker) as f:  # train and held-out splits: rank 1 never tokenized
        assert sorted(f.read().split("\n")[:-1]) == ["load rank0"] * 2 + ["load rank1"] * 2 + ["map rank0"] * 2
    train_split, held_out = split_by_query(load_esci_parquet(demo_data[0]), 0.1, 42)
    assert f"tokenized {len(train_split)} train rows" in proc.stderr
    assert f"tokenized {len(held_out)} eval rows" in proc.stderr
    assert len(os.listdir(os.path.join(ddp, CACHE_DIRNAME))) == 2

    assert train_cli.main(_args(tiny_model_dir, demo_data[0], single, *sgd, "--per_device_train_batch_size", "8")) == 0
    two_ranks, one_process = _lora_b(ddp), _lora_b(single)
    assert any(v.abs().sum() > 0 for v in one_process.values())
    for key in one_process:
        torch.testing.assert_close(two_ranks[key], one_process[key], atol=1e-5, rtol=1e-4)

    def held_out_metrics(folder):
        with open(os.path.join(folder, "train_metrics.json")) as f:
            metrics = json.load(f)
        return metrics["eval"], metrics["calibration"]

    (ddp_eval, ddp_calibration), (one_eval, one_calibration) = held_out_metrics(ddp), held_out_metrics(single)
    for key in ("eval_loss", "eval_accuracy", "eval_macro_f1", "eval_ndcg"):
        assert ddp_eval[key] == pytest.approx(one_eval[key], abs=1e-5), key
    assert ddp_calibration["n"] == one_calibration["n"] == len(held_out)  # no pair lost or repeated by the gather
    assert ddp_calibration["nll_before"] == pytest.approx(one_calibration["nll_before"], abs=1e-5)


def test_report_to_wandb_without_credentials_stops_before_the_model_loads(tiny_model_dir, demo_data, tmp_path,
                                                                          monkeypatch, capsys):
    # It used to fail after the model had loaded, with wandb's UsageError traceback.
    import wandb  # noqa: F401  (a dev requirement: missing is a failure, not a skip)
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "NETRC", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no wandb settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_cli, "load_base_model", lambda *a, **k: pytest.fail("the model loaded first"))
    with pytest.raises(SystemExit) as stop:
        train_cli.main(_args(tiny_model_dir, demo_data[0], str(tmp_path / "out"), "--report_to", "wandb"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--report_to wandb" in err and "no API key" in err and "WANDB_MODE=offline" in err


def test_report_to_a_logger_that_is_not_installed_stops_before_the_model_loads(tiny_model_dir, demo_data, tmp_path,
                                                                               monkeypatch, capsys):
    from transformers.integrations import is_tensorboard_available

    if is_tensorboard_available():
        pytest.skip("tensorboard is installed here")
    monkeypatch.setattr(train_cli, "load_base_model", lambda *a, **k: pytest.fail("the model loaded first"))
    with pytest.raises(SystemExit) as stop:
        train_cli.main(_args(tiny_model_dir, demo_data[0], str(tmp_path / "out"), "--report_to", "tensorboard"))
    assert stop.value.code == 2 and "tensorboard is not installed" in capsys.readouterr().err


def test_wandb_credentials_in_a_netrc_or_the_environment_are_found_without_asking_wandb(tmp_path, monkeypatch):
    import wandb

    from tiny_reranker import train_config

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(wandb, "login", lambda *a, **k: pytest.fail("asked wandb (seconds) although a key was at hand"))
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert train_config.report_to_problem("wandb") is None
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert train_config.report_to_problem("none,wandb") is None


def test_a_full_disk_while_saving_a_checkpoint_is_exit_2_with_how_to_go_on(tiny_model_dir, demo_data, tmp_path,
                                                                            monkeypatch, capsys):
    import errno

    from transformers import Trainer

    def disk_full(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "_save_checkpoint", disk_full)
    out = str(tmp_path / "full")
    rc = train_cli.main(_args(tiny_model_dir, demo_data[0], out, "--max_steps", "2", "--save_steps", "2"))
    captured = capsys.readouterr().err
    errors = [line for line in captured.splitlines() if "error: " in line]
    assert len(errors) == 1, captured[-3000:]
    err = errors[0]
    assert rc == 2 and "writing failed at step 2 (No space left on device)" in err
    assert "--resume_from_checkpoint latest" in err
