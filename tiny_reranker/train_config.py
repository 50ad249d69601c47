"""The training run's settings as one typed value, and what they become for the Hugging Face Trainer.

``train.py``'s flags of the same names fill :class:`TrainerConfig` (its defaults are the flags' defaults);
:func:`training_arguments` turns it into ``TrainingArguments``. Library code never sees argparse.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from transformers import TrainingArguments

from tiny_reranker import compat
from tiny_reranker.batching import DEFAULT_MAX_MICRO_BATCHES
from tiny_reranker.distributed import world_size

BEST_MODEL_METRICS = ("ndcg", "loss", "accuracy", "macro_f1")  # held-out metrics --metric_for_best_model can use


@dataclass
class TrainerConfig:
    """How the Trainer runs: steps, optimisation, checkpoints, logging and the step layout (train.py's flags)."""

    output_dir: str
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1              # > 0 overrides num_train_epochs
    learning_rate: float = 1e-4      # LoRA weights only
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "linear"
    optim: str = "adamw_torch"
    weight_decay: float = 0.0
    logging_steps: int = 10
    save_steps: int = 500
    eval_steps: int | None = None    # None: every save_steps
    save_total_limit: int = 3
    load_best_model_at_end: bool = False
    metric_for_best_model: str = "ndcg"
    seed: int = 42
    report_to: str = "none"          # comma list of transformers integrations
    wandb_run_name: str | None = None
    # Off by default: length-grouped steps follow length bands in their label mix and can collapse training.
    group_by_length: bool = False
    gradient_checkpointing: bool = False
    max_micro_batches: int = DEFAULT_MAX_MICRO_BATCHES

    @classmethod
    def from_flags(cls, flags: dict) -> "TrainerConfig":
        """The config from a dict of flags (train.py: ``vars(args)``); keys that are not fields are ignored."""
        return cls(**{f.name: flags[f.name] for f in dataclasses.fields(cls) if f.name in flags})


# TrainingArguments fields that take a TrainerConfig field of the same name as it is
_SAME_NAME = ("output_dir", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
              "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type", "optim", "weight_decay",
              "logging_steps", "save_steps", "save_total_limit", "seed")


def training_arguments(config: TrainerConfig, dtype: torch.dtype, eval_enabled: bool) -> TrainingArguments:
    """``TrainingArguments`` for ``config``: bf16 when ``dtype`` is, periodic held-out eval when ``eval_enabled``."""
    distributed_cpu = world_size() > 1 and not torch.cuda.is_available()
    return TrainingArguments(
        **{name: getattr(config, name) for name in _SAME_NAME},
        warmup_steps=config.warmup_ratio,  # transformers 5: a float < 1 is a ratio of total steps
        **best_model_arguments(config, eval_enabled),
        eval_strategy="steps" if eval_enabled else "no",
        eval_steps=config.eval_steps or config.save_steps,
        bf16=dtype == torch.bfloat16,
        report_to=[r for r in config.report_to.split(",") if r and r != "none"] or "none",
        run_name=config.wandb_run_name,
        remove_unused_columns=False,         # our collator needs every field
        label_names=["labels"],
        ddp_find_unused_parameters=False,    # every LoRA weight is used in every step
        # A step runs as many forwards as it has micro-batches, which differs between ranks; buffer
        # broadcasting is a collective in every forward and would deadlock. No buffer is ever trained.
        ddp_broadcast_buffers=False,
        # "random": every step an i.i.d. draw, each rank its shard of one permutation. Length grouping
        # makes steps' label mixes follow length bands and can collapse training (see --group_by_length).
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        **compat.checkpointing_arguments(config.gradient_checkpointing),
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without CUDA, torchrun needs gloo and an explicit CPU state, or each rank silently trains alone.
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if distributed_cpu else None,
    )


def best_model_arguments(config: TrainerConfig, eval_enabled: bool) -> dict:
    """TrainingArguments for --load_best_model_at_end. Without it no metric is set: the Trainer would otherwise track
    a "best" checkpoint anyway, keep it out of --save_total_limit's rotation and fail on a missing metric."""
    if not (config.load_best_model_at_end and eval_enabled):
        return {}
    metric_driven = config.lr_scheduler_type in ("reduce_lr_on_plateau", "greedy")
    return {"load_best_model_at_end": True,
            "metric_for_best_model": config.metric_for_best_model,  # greater is better except for "loss"
            # the schedulers that watch this metric assume lower is better unless told
            **({"lr_scheduler_kwargs": {"mode": "max"}}
               if metric_driven and config.metric_for_best_model != "loss" else {})}


_WANDB_OFF = ("offline", "disabled", "dryrun")


def report_to_problem(report_to: str) -> str | None:
    """Why ``--report_to`` would fail once training starts (unknown name, package missing, W&B without
    credentials), or None. The Trainer only finds out after the model has loaded, with a traceback."""
    from transformers.integrations import get_available_reporting_integrations

    known = compat.reporting_integrations()
    names = [name.strip() for name in report_to.split(",") if name.strip() not in ("", "none", "all")]
    unknown = [name for name in names if name not in known]
    if unknown:
        return (f"unknown {', '.join(map(repr, unknown))}; use none, all, or any of "
                f"{', '.join(known)} (comma-separated)")
    missing = [name for name in names if name not in get_available_reporting_integrations()]
    if missing:
        return f"{', '.join(missing)} is not installed here (pip install it, or drop it from --report_to)"
    if "wandb" in names and not wandb_has_credentials():
        return ("wandb has no API key here (WANDB_API_KEY, `wandb login`, or ~/.netrc): set one, or run with "
                "WANDB_MODE=offline and `wandb sync` the run later")
    return None


def wandb_has_credentials() -> bool:
    """True when W&B runs offline or finds an API key without prompting (older wandb: assumed True).

    The usual places (WANDB_API_KEY, a netrc entry) are read first: asking wandb itself takes seconds.
    """
    if os.environ.get("WANDB_MODE", "").lower() in _WANDB_OFF or os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return True
    except (OSError, netrc.NetrcParseError):
        pass
    import inspect

    import wandb

    if "prompt" not in inspect.signature(wandb.login).parameters:  # an older wandb can only ask by prompting
        return True
    return bool(wandb.login(prompt=False, verify=False))  # its settings files, identity tokens, ...
