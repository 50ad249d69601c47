"""Resume picks the newest complete checkpoint, reused folders and changed flags are refused, pickles never load."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import train as train_cli
from esci_dataset import ESCIDataError
from tiny_reranker.checkpoints import check_resume_matches, prepare_output_dir, resolve_checkpoint
from tiny_reranker.model_files import check_model_paths


def _checkpoint(folder, step, broken=None, run_config=None):
    """A checkpoint folder with the files the Trainer needs to resume; ``broken`` names one to damage."""
    path = os.path.join(folder, f"checkpoint-{step}")
    os.makedirs(path)
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step}, f)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"r": 8, "target_modules": ["q_proj"]}, f)
    save_file({"w": torch.zeros(2)}, os.path.join(path, "adapter_model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, os.path.join(path, "optimizer.pt"))
    torch.save({"last_epoch": step}, os.path.join(path, "scheduler.pt"))
    with open(os.path.join(path, "run_config.json"), "w") as f:
        json.dump(run_config or {"base_model": "m", "lora_r": 8, "lora_alpha": 16, "lora_target_modules": "q_proj"}, f)
    if broken == "truncated_weights":
        with open(os.path.join(path, "adapter_model.safetensors"), "r+b") as f:
            f.truncate(10)
    elif broken == "no_optimizer":
        os.remove(os.path.join(path, "optimizer.pt"))
    elif broken == "corrupt_state":
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            f.write('{"global_step": ')
    elif broken == "garbage_optimizer":
        with open(os.path.join(path, "optimizer.pt"), "wb") as f:
            f.write(b"x" * 16)
    elif broken == "hostile_rng_state":  # a pickle that would run a command: weights_only loading refuses it
        torch.save({"python": HostilePickle()}, os.path.join(path, "rng_state.pth"))
    return path


class HostilePickle:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("broken", ["truncated_weights", "no_optimizer", "corrupt_state", "garbage_optimizer",
                                    "hostile_rng_state"])
def test_latest_skips_an_incomplete_newest_checkpoint(tmp_path, broken, caplog):
    good = _checkpoint(str(tmp_path), 4)
    _checkpoint(str(tmp_path), 8, broken=broken)
    assert resolve_checkpoint("latest", str(tmp_path)) == good
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint-8" in caplog.text


def test_latest_with_only_incomplete_checkpoints_is_a_clear_error(tmp_path):
    _checkpoint(str(tmp_path), 8, broken="corrupt_state")
    with pytest.raises(ESCIDataError, match="none of the 1 checkpoint-\\* folders"):
        resolve_checkpoint("latest", str(tmp_path))
    with pytest.raises(ESCIDataError, match="cannot resume from it: unreadable"):
        resolve_checkpoint(str(tmp_path / "checkpoint-8"), str(tmp_path))
    _checkpoint(str(tmp_path), 9, broken="hostile_rng_state")
    with pytest.raises(ESCIDataError, match="checkpoint-9: cannot resume from it: rng_state.pth is unreadable "
                                            "\\(UnpicklingError"):
        resolve_checkpoint(str(tmp_path / "checkpoint-9"), str(tmp_path))


def test_a_fresh_run_among_another_runs_checkpoints_is_refused(tmp_path):
    _checkpoint(str(tmp_path), 4)
    with pytest.raises(ESCIDataError, match="already holds checkpoints of an earlier run"):
        prepare_output_dir(str(tmp_path), resuming=False, overwrite=False, is_main=True)
    prepare_output_dir(str(tmp_path), resuming=True, overwrite=False, is_main=True)  # resuming it is fine
    assert os.path.isdir(tmp_path / "checkpoint-4")
    prepare_output_dir(str(tmp_path), resuming=False, overwrite=True, is_main=True)  # --overwrite_output_dir
    assert not os.path.exists(tmp_path / "checkpoint-4")


def test_resuming_under_other_model_flags_names_them(tmp_path):
    path = _checkpoint(str(tmp_path), 4)
    same = {"base_model": "m", "lora_r": 8, "lora_alpha": 16, "lora_target_modules": "q_proj", "instruction": None}
    check_resume_matches(path, same)
    with pytest.raises(ESCIDataError, match="--lora_r 8 \\(checkpoint\\) vs 16 \\(now\\)"):
        check_resume_matches(path, {**same, "lora_r": 16})


def test_resuming_on_other_rows_or_another_best_checkpoint_rule_is_refused_and_other_step_sizes_warn(tmp_path,
                                                                                                        caplog):
    model = {"base_model": "m", "lora_r": 8, "lora_alpha": 16, "lora_target_modules": "q_proj", "instruction": None}
    data = {"train_file": str(tmp_path / "train.parquet"), "eval_ratio": 0.02, "seed": 42, "max_train_samples": None,
            "load_best_model_at_end": False, "metric_for_best_model": "ndcg"}
    steps = {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 4, "world_size": 2}
    path = _checkpoint(str(tmp_path), 4, run_config={**model, **data, **steps})
    check_resume_matches(path, {**model, **data, **steps})
    relative = os.path.relpath(data["train_file"])  # the same file, named another way
    check_resume_matches(path, {**model, **data, **steps, "train_file": relative})
    for flag, value in (("max_train_samples", 200), ("seed", 7), ("eval_ratio", 0.05), ("metric_for_best_model", "loss"),
                        ("train_file", str(tmp_path / "other.parquet"))):
        with pytest.raises(ESCIDataError, match=f"--{flag} .* \\(checkpoint\\) vs .* \\(now\\)"):
            check_resume_matches(path, {**model, **data, **steps, flag: value})
    assert "other rows per step" not in caplog.text
    check_resume_matches(path, {**model, **data, **steps, "world_size": 4})  # resumed on more GPUs: allowed
    assert "other rows per step (--world_size 2 (checkpoint) vs 4 (now))" in caplog.text


def test_a_checkpoint_killed_before_its_run_config_still_checks_the_lora_rank(tmp_path):
    path = _checkpoint(str(tmp_path), 4)
    os.remove(os.path.join(path, "run_config.json"))  # the on-save callback writes it after the Trainer's files
    same = {"base_model": "m", "lora_r": 8, "lora_alpha": 16, "lora_target_modules": "q_proj", "instruction": None}
    check_resume_matches(path, same)
    with pytest.raises(ESCIDataError, match="--lora_r 8 \\(checkpoint\\) vs 16 \\(now\\)"):
        check_resume_matches(path, {**same, "lora_r": 16})


def test_resume_compares_the_prompt_that_trains_not_the_flag_as_typed(tmp_path):
    """No --instruction (None) and --instruction "" both train on INSTRUCT; another instruction is another prompt."""
    model = {"base_model": "m", "lora_r": 8, "lora_alpha": 16, "lora_target_modules": "q_proj"}
    default = _checkpoint(str(tmp_path / "a"), 4, run_config={**model, "instruction": None})
    with pytest.raises(ESCIDataError, match="--instruction .* \\(checkpoint\\) vs 'Rank the products' \\(now\\)"):
        check_resume_matches(default, {**model, "instruction": "Rank the products"})
    check_resume_matches(default, {**model, "instruction": ""})
    empty = _checkpoint(str(tmp_path / "b"), 4, run_config={**model, "instruction": ""})
    check_resume_matches(empty, {**model, "instruction": None})


def test_a_checkpoint_without_run_config_of_another_base_model_is_refused(tmp_path, tiny_model_dir):
    path = _checkpoint(str(tmp_path), 4)
    os.remove(os.path.join(path, "run_config.json"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"r": 8, "lora_alpha": 16, "base_model_name_or_path": str(tmp_path / "other-base")}, f)
    flags = {"base_model": tiny_model_dir, "lora_r": 8, "lora_alpha": 16, "lora_target_modules": "q_proj"}
    with pytest.raises(ESCIDataError, match="--base_model .*other-base.* \\(checkpoint\\) vs .*tiny-qwen3.* \\(now\\)"):
        check_resume_matches(path, flags)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"r": 8, "lora_alpha": 16, "base_model_name_or_path": tiny_model_dir}, f)
    check_resume_matches(path, flags)  # the same base, recorded by peft


def test_a_finished_adapter_or_a_users_readme_is_not_replaced_by_a_fresh_run(tmp_path, caplog):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    with pytest.raises(ESCIDataError, match="adapter_config.json, adapter_model.safetensors.*--overwrite_output_dir"):
        prepare_output_dir(str(tmp_path), resuming=False, overwrite=False, is_main=True)
    prepare_output_dir(str(tmp_path), resuming=False, overwrite=True, is_main=True)
    assert "replaces adapter_config.json, adapter_model.safetensors" in caplog.text
    readme = tmp_path / "notes" / "README.md"
    readme.parent.mkdir()
    readme.write_text("# my notes\n")
    with pytest.raises(ESCIDataError, match="README.md"):
        prepare_output_dir(str(readme.parent), resuming=False, overwrite=False, is_main=True)
    readme.write_text("# ESCI reranker adapter (tiny-reranker)\n\nours")
    prepare_output_dir(str(readme.parent), resuming=False, overwrite=False, is_main=True)  # our card: fine


def test_train_refuses_to_resume_under_another_lora_rank_end_to_end(tmp_path, tiny_model_dir, demo_data, capsys):
    out = str(tmp_path / "out")
    _checkpoint(out, 4, run_config={"base_model": tiny_model_dir, "lora_r": 8, "lora_alpha": 16,
                                    "lora_target_modules": "q_proj", "instruction": None})
    rc = train_cli.main(["--base_model", tiny_model_dir, "--train_file", demo_data[0], "--output_dir", out,
                         "--lora_target_modules", "q_proj", "--lora_alpha", "16", "--lora_r", "16",
                         "--resume_from_checkpoint", "latest"])
    err = capsys.readouterr().err
    assert rc == 2 and "--lora_r 8 (checkpoint) vs 16 (now)" in err and "Traceback" not in err
    assert "--lora_alpha" not in err  # only the flag that differs is named


def test_train_refuses_a_reused_output_dir_end_to_end(tmp_path, tiny_model_dir, demo_data, capsys):
    _checkpoint(str(tmp_path / "out"), 4)
    rc = train_cli.main(["--base_model", tiny_model_dir, "--train_file", demo_data[0], "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite_output_dir" in err and "Traceback" not in err


@pytest.mark.parametrize("flag,value", [("--learning_rate", "nan"), ("--learning_rate", "-1"),
                                        ("--num_train_epochs", "0"), ("--num_train_epochs", "nan"),
                                        ("--max_steps", "0"), ("--warmup_ratio", "inf")])
def test_bad_numbers_are_flag_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        train_cli.main(["--base_model", "m", "--train_file", "t.parquet", "--output_dir", "o", flag, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and flag in err and value in err


@pytest.mark.parametrize("bystander", [None, "other.safetensors"])  # not a file the loaders would read instead
@pytest.mark.parametrize("name", ["pytorch_model.bin", "adapter_model.bin"])
def test_pickle_only_weights_are_refused(tmp_path, tiny_model_dir, name, bystander):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / name).write_bytes(b"not even unpickled")
    if bystander:
        (folder / bystander).write_bytes(b"")
    (folder / "adapter_config.json").write_text('{"r": 8}')
    with pytest.raises(ESCIDataError, match="only pickle weights .*save_pretrained"):
        if name == "adapter_model.bin":
            check_model_paths(tiny_model_dir, str(folder))
        else:
            check_model_paths(str(folder))


def test_an_unreachable_hub_id_fails_fast_with_a_hint(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    from huggingface_hub import HfApi

    asked, original = [], HfApi.model_info

    def recorded(self, repo_id, **kwargs):
        asked.append((repo_id, kwargs.get("timeout")))
        return original(self, repo_id, **kwargs)

    monkeypatch.setattr(HfApi, "model_info", recorded)
    with pytest.raises(ESCIDataError, match="not a local folder .*could not be fetched.*pass the local folder"):
        check_model_paths("Qwen/Qwen3-0.6B-not-cached")
    # One bounded request, then the error: not a minute of download retries.
    assert len(asked) == 1 and asked[0][0] == "Qwen/Qwen3-0.6B-not-cached" and 0 < asked[0][1] <= 10


def test_an_uncached_hub_id_in_offline_mode_says_to_pass_a_local_folder(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    with pytest.raises(ESCIDataError, match="HF_HUB_OFFLINE is set; .*pass the local folder"):
        check_model_paths("Qwen/Qwen3-0.6B-not-cached")


def test_an_empty_adapter_config_is_a_clear_error(tmp_path, tiny_model_dir, adapter_dir):
    folder = tmp_path / "adapter"
    shutil.copytree(adapter_dir, folder)
    (folder / "adapter_config.json").write_text("")
    with pytest.raises(ESCIDataError, match="adapter_config.json.*not a readable JSON"):
        check_model_paths(tiny_model_dir, str(folder))


def test_a_truncated_adapter_weights_file_is_a_clear_error(tmp_path, tiny_model_dir, adapter_dir):
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(adapter_dir, folder)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ESCIDataError, match="unreadable safetensors file"):
        check_model_paths(tiny_model_dir, str(folder))


def test_a_reachable_hub_id_is_probed_once_per_process(monkeypatch):
    """eval/predict check the model before reading input and again when loading: one network call, not two."""
    import huggingface_hub
    import huggingface_hub.constants as hub_constants

    calls = []
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, name, timeout=None: calls.append(name))
    for _ in range(2):
        check_model_paths("some-org/some-reranker-not-cached")
    assert calls == ["some-org/some-reranker-not-cached"]
