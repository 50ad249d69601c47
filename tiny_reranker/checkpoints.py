"""Which checkpoint a run resumes from, and whether an output folder may be (re)used.

A checkpoint is *complete* when every file the Trainer reads to resume is there
and readable. A run killed while saving, or a full disk, leaves an incomplete
one: ``latest`` skips it and says so. Our ``run_config.json`` (written by the
on-save callback) names the run a checkpoint belongs to, so resuming it under
other model flags is refused.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from esci_dataset import INSTRUCT, ESCIDataError
from tiny_reranker import compat
from tiny_reranker.contract import MODEL_CARD_NAME, RUN_CONFIG_NAME, is_model_card
from tiny_reranker.io import read_json_object
from tiny_reranker.model_files import safetensors_names

logger = logging.getLogger(__name__)

# Flags that decide the weights' shape or meaning: resuming under other values would mix two runs.
RUN_IDENTITY_FLAGS = ("base_model", "lora_r", "lora_alpha", "lora_target_modules", "instruction")
# Flags that decide which rows train and which are held out, and how the best checkpoint is judged: the Trainer
# resumes at step N of the data order they define, and compares new scores with the checkpoint's best.
RUN_DATA_FLAGS = ("train_file", "eval_ratio", "seed", "max_train_samples", "load_best_model_at_end",
                  "metric_for_best_model")
# Flags that change how many rows a step takes: resuming under others skips a different number of rows.
RUN_STEP_FLAGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "world_size")
# transformers' get_last_checkpoint gives only the newest folder; `latest` must skip incomplete ones, so all are listed.
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_folders(output_dir: str) -> list[str]:
    """``checkpoint-N`` folders in ``output_dir``, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := _CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]


def checkpoint_problem(folder: str) -> str | None:
    """Why ``folder`` cannot be resumed from, or None when it is complete."""
    missing = lambda name: not os.path.isfile(os.path.join(folder, name))  # noqa: E731
    try:  # in the order the Trainer reads them, so the first problem is the one named
        if missing("trainer_state.json"):
            return "trainer_state.json is missing"
        state = read_json_object(os.path.join(folder, "trainer_state.json"))
        step = state.get("global_step")
        if not isinstance(step, int) or isinstance(step, bool):
            return "trainer_state.json has no global_step"
        named = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(folder)))
        if step < 0 or (named and step != int(named.group(1))):  # the Trainer names a checkpoint by its step
            return f"trainer_state.json says global_step {step}, which does not fit the folder name"
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if missing(name):
                return f"{name} is missing"
        read_json_object(os.path.join(folder, "adapter_config.json"))
        if not safetensors_names(os.path.join(folder, "adapter_model.safetensors")):
            return "adapter_model.safetensors holds no tensors"
    except Exception as exc:  # truncated or corrupt files raise many types
        return f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    for name in ("optimizer.pt", "scheduler.pt"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            return f"{name} is missing or empty"
    rng_files = sorted(n for n in os.listdir(folder) if n.startswith("rng_state") and n.endswith(".pth"))
    for name in ("optimizer.pt", "scheduler.pt", *rng_files):  # small for LoRA: the adapter's moments, a few numbers
        try:
            compat.load_trainer_state_file(os.path.join(folder, name))
        except Exception as exc:  # garbage, truncation, or a pickle needing globals weights_only refuses
            return f"{name} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
    return None


def resolve_checkpoint(spec: str | None, output_dir: str) -> str | None:
    """``None`` (start fresh), a checkpoint folder, or ``latest``: the newest *complete* one in ``output_dir``."""
    if spec is None:
        return None
    if spec != "latest":
        problem = checkpoint_problem(spec) if os.path.isdir(spec) else "folder not found"
        if problem:
            raise ESCIDataError(f"--resume_from_checkpoint {spec}: cannot resume from it: {problem}")
        return spec
    folders = checkpoint_folders(output_dir)
    for folder in folders:
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("skipping incomplete checkpoint %s: %s", folder, problem)
    if folders:
        raise ESCIDataError(f"--resume_from_checkpoint latest: none of the {len(folders)} checkpoint-* folders in "
                            f"{output_dir} is complete (see the warnings above); start a fresh run with "
                            "--overwrite_output_dir")
    raise ESCIDataError(f"--resume_from_checkpoint latest: no checkpoint-* folder in {output_dir}")


def run_identity(args_dict: dict) -> dict:
    """The flags of a run that must not change on resume (paths made absolute)."""
    ident = {k: args_dict.get(k) for k in RUN_IDENTITY_FLAGS}
    # The prompt that trains, not the flag as typed: no --instruction (None) and --instruction "" both mean INSTRUCT.
    ident["instruction"] = ident.get("instruction") or INSTRUCT
    base = ident.get("base_model")
    if isinstance(base, str) and os.path.isdir(os.path.expanduser(base)):
        ident["base_model"] = os.path.realpath(os.path.expanduser(base))
    return ident


def saved_identity(checkpoint: str) -> dict:
    """The identity flags ``checkpoint`` was trained with, from its ``run_config.json``.

    A run killed between the Trainer's save and our callback's leaves a resumable checkpoint without it;
    then the LoRA rank and alpha come from ``adapter_config.json``, which the Trainer always writes.
    """
    try:
        return run_identity(read_json_object(os.path.join(checkpoint, RUN_CONFIG_NAME)))
    except (OSError, ValueError):
        pass
    try:
        adapter = read_json_object(os.path.join(checkpoint, "adapter_config.json"))
    except (OSError, ValueError):
        adapter = {}
    logger.warning("%s has no readable %s (killed before it was written?): checking only --base_model, --lora_r and "
                   "--lora_alpha, from adapter_config.json", checkpoint, RUN_CONFIG_NAME)
    base = adapter.get("base_model_name_or_path")
    return {"lora_r": adapter.get("r"), "lora_alpha": adapter.get("lora_alpha"),
            "base_model": run_identity({"base_model": base})["base_model"] if isinstance(base, str) else None}


def _saved_run_config(checkpoint: str) -> dict:
    try:
        return read_json_object(os.path.join(checkpoint, RUN_CONFIG_NAME))
    except (OSError, ValueError):
        return {}


def _differences(saved: dict, current: dict, flags: tuple[str, ...]) -> list[str]:
    """``--flag saved (checkpoint) vs now`` for each of ``flags`` the checkpoint recorded with another value
    (a flag older checkpoints did not record is not compared; a recorded None is: it means "all" or "off")."""
    def same(k):
        a, b = saved[k], current.get(k)
        if k == "train_file" and isinstance(a, str) and isinstance(b, str):
            return os.path.realpath(a) == os.path.realpath(b)
        return a == b
    return [f"--{k} {saved[k]!r} (checkpoint) vs {current.get(k)!r} (now)" for k in flags if k in saved and not same(k)]


def check_resume_matches(checkpoint: str, args_dict: dict) -> None:
    """Refuse to resume ``checkpoint`` under flags that change the model, the rows or the best-checkpoint rule
    (exit-2 message naming them); warn when only the rows per step differ."""
    saved, current = saved_identity(checkpoint), run_identity(args_dict)
    differ = [f"--{k} {saved[k]!r} (checkpoint) vs {current[k]!r} (now)" for k in RUN_IDENTITY_FLAGS
              if saved.get(k) is not None and saved[k] != current[k]]
    config = _saved_run_config(checkpoint)
    differ += _differences(config, args_dict, RUN_DATA_FLAGS)
    if differ:
        raise ESCIDataError(f"{checkpoint} was trained with other flags, so resuming would mix two runs: "
                            + "; ".join(differ) + ". Resume with the checkpoint's flags, or start a fresh run in "
                            "another --output_dir (or pass --overwrite_output_dir).")
    steps = _differences(config, args_dict, RUN_STEP_FLAGS)
    if steps:
        logger.warning("resuming %s with other rows per step (%s): the Trainer skips the steps already done by "
                       "count, so the rest of this epoch is not exactly the rest of the interrupted one",
                       checkpoint, "; ".join(steps))


def finished_run_files(output_dir: str) -> list[str]:
    """Files in ``output_dir`` that a fresh run would replace although no ``checkpoint-*`` marks them as a run's:
    a finished adapter (``adapter_config.json`` and what lies beside it) and a README.md that is not our card."""
    if not os.path.isdir(output_dir):
        return []
    names = sorted(os.listdir(output_dir))
    found = [n for n in names if n.startswith("adapter_")] if "adapter_config.json" in names else []
    readme = os.path.join(output_dir, MODEL_CARD_NAME)
    if os.path.isfile(readme) and not is_model_card(readme):
        found.append(MODEL_CARD_NAME)
    return found


def prepare_output_dir(output_dir: str, resuming: bool, overwrite: bool, is_main: bool) -> None:
    """Refuse to start a fresh run among another run's checkpoints, over a finished adapter or over a README.md of
    the user's, unless ``overwrite`` (which removes the checkpoints and says what it replaces)."""
    folders = checkpoint_folders(output_dir)
    finished = [] if resuming else finished_run_files(output_dir)
    if (not folders and not finished) or resuming:
        return
    if not overwrite:
        if folders:
            raise ESCIDataError(f"--output_dir {output_dir} already holds checkpoints of an earlier run "
                                f"({', '.join(os.path.basename(f) for f in folders[:3])}{', ...' if len(folders) > 3 else ''}). "
                                "Pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace "
                                "it, or choose another --output_dir.")
        raise ESCIDataError(f"--output_dir {output_dir} already holds {', '.join(finished)}, which a new run would "
                            "replace (a finished adapter, or a README.md that is not a tiny-reranker model card). Pass "
                            "--overwrite_output_dir to replace them, or choose another --output_dir.")
    if is_main:
        for folder in folders:
            shutil.rmtree(folder)
        if folders:
            logger.warning("--overwrite_output_dir: removed %d old checkpoint folder(s) from %s", len(folders), output_dir)
        if finished:
            logger.warning("--overwrite_output_dir: this run replaces %s in %s", ", ".join(finished), output_dir)
