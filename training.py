"""What train.py hands the Hugging Face Trainer: the label-head loss and Trainer, the TrainingArguments,
the step collator, and the contract written into every checkpoint.

``train.py`` is the script (flags, set-up, the run in order); this module is the training machinery it
configures, which ``bench.py`` and the tests use as they are, so they time and test the real step.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import EvalPrediction, Trainer, TrainerCallback, TrainingArguments

from batching import TrainStepCollator, step_logits
from checkpoints import RUN_CONFIG_NAME
from cli_utils import write_json, write_text
from esci_dataset import PromptEncoder
from calibration import at_search_bound, calibration_before_after, fit_temperature, softmax
from metrics import classification_metrics, majority_baseline, task1_ranking_ndcg
from modeling import non_finite_names, save_reranker_config, scores_from_probs
from varlen import choose_packed_attention

logger = logging.getLogger(__name__)


def label_head_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the step's pairs on the 4 label logits (in fp32 for bf16 runs)."""
    return F.cross_entropy(logits.float(), labels)


BEST_MODEL_METRICS = ("ndcg", "loss", "accuracy", "macro_f1")  # held-out metrics --metric_for_best_model can use


def held_out_metrics(groups) -> Callable[[EvalPrediction], dict[str, float]]:
    """The Trainer's ``compute_metrics`` for the held-out split: accuracy and F1 beside the majority class, and
    ``ndcg``, ESCI task 1 (mean per-query nDCG of the ranking score, as eval.py reports it) from the raw logits.

    ``groups``: the split's query keys in dataset order, which is the order the Trainer's eval loop returns
    (sequential sampler; under torchrun it gathers the ranks' shards back into that order).
    """
    groups = np.asarray(groups)

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        logits, labels = np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)
        if len(labels) != len(groups):
            raise RuntimeError(f"held-out predictions for {len(labels)} pairs, but the split has {len(groups)}")
        metrics = classification_metrics(labels, logits.argmax(axis=-1))
        metrics["majority_accuracy"] = majority_baseline(labels)["accuracy"]
        ndcg = task1_ranking_ndcg(groups, labels, scores_from_probs(softmax(logits)))
        if ndcg is not None:  # None when no held-out query has a relevant item
            metrics["ndcg"] = ndcg
        return metrics

    return compute_metrics


class LabelHeadTrainer(Trainer):
    """The stock Trainer with CE over the label head on :class:`batching.TrainStepCollator` steps.

    ``prefix_ids``: the shared prompt prefix the collator left out; it runs once
    per step and every micro-batch attends to its keys/values.
    """

    # Our loss is a mean over the batch, so the Trainer divides it by the accumulation steps.
    model_accepts_loss_kwargs = False
    loss_is_scaled_for_ga = False

    def __init__(self, *args, prefix_ids=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the base __init__ inspects the model and sets it again
        self.prefix_ids = list(prefix_ids)

    def _get_eval_sampler(self, eval_dataset):
        # Dataset order, whatever the training sampler: held_out_metrics matches predictions to queries by position
        # (the stock Trainer groups eval batches by length too under --group_by_length). Under torchrun, None lets
        # accelerate shard the batches in order.
        if eval_dataset is None or self.args.world_size > 1:
            return None
        return torch.utils.data.SequentialSampler(eval_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The prefix runs outside the DDP wrapper: its gradients still reach the same parameters.
        logits = step_logits(model, inputs, self.prefix_ids, prefix_model=self.accelerator.unwrap_model(model))
        loss = label_head_loss(logits, inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss


class SaveRunContract(TrainerCallback):
    """Write ``reranker_config.json`` and ``run_config.json`` into every checkpoint, so any of them can be
    evaluated, and resumed only under the same model flags. Written after the Trainer's own files."""

    def __init__(self, tokenizer, encoder: PromptEncoder, run_config: dict):
        self.tokenizer, self.encoder, self.run_config = tokenizer, encoder, run_config

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            save_run_contract(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"),
                              self.tokenizer, self.encoder, self.run_config)


def save_run_contract(folder: str, tokenizer, encoder: PromptEncoder, run_config: dict,
                      temperature: float | None = None) -> None:
    """The label/prompt contract (with the exact template and any fitted temperature) and the run's flags."""
    save_reranker_config(folder, tokenizer, run_config["base_model"], encoder.template, run_config.get("instruction"),
                         temperature)
    write_json(os.path.join(folder, RUN_CONFIG_NAME), run_config)
    write_model_card(folder, run_config)


def write_model_card(folder: str, run_config: dict) -> None:
    """A short README.md of our own in place of peft's placeholder card ("[More Information Needed]")."""
    card = (f"# ESCI reranker adapter (tiny-reranker)\n\nA LoRA adapter on `{run_config['base_model']}` that scores a "
            "(query, product) pair as E exact / S substitute / C complement / I irrelevant, and ranks by\n"
            "`score = (3·P(E) + 2·P(S) + 1·P(C)) / 3`.\n\nTrained by `train.py` on "
            f"`{run_config['train_file']}`; every flag is in `run_config.json`, the prompt and label ids in "
            "`reranker_config.json`, metrics in `train_metrics.json`.\n\n```bash\n"
            f"python eval.py --base_model {run_config['base_model']} --lora_model <this folder> --eval_file test.parquet\n```\n")
    write_text(os.path.join(folder, "README.md"), card)


MIN_CALIBRATION_PAIRS = 100  # below this a fitted T is noise: 2 held-out pairs once gave T=0.01 and 8x the test NLL


def fit_held_out_temperature(logits: np.ndarray, labels: np.ndarray) -> dict:
    """One temperature for the held-out label logits ``[N, 4]``:
    ``{temperature, n, ece/brier/nll _before/_after}``, where ``temperature`` is what to store.

    It is None, with ``not_stored`` saying why, when the held-out split has fewer than
    :data:`MIN_CALIBRATION_PAIRS` pairs or the fit ends on a bound of the search range
    (``fitted_temperature`` keeps that value): storing either would make every later score
    over- or under-confident on the strength of a handful of rows.
    """
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    n = int(len(labels))
    if n < MIN_CALIBRATION_PAIRS:
        return {"n": n, "temperature": None,
                "not_stored": f"only {n} held-out pairs, and a temperature needs at least {MIN_CALIBRATION_PAIRS} "
                              "(raise --eval_ratio)"}
    fitted = fit_temperature(logits, labels)
    result = {"n": n, **calibration_before_after(softmax(logits), labels, fitted)}
    if at_search_bound(fitted):
        result.update(temperature=None, fitted_temperature=fitted, not_stored=(
            f"the held-out NLL kept falling to T={fitted:.4g}, the end of the search range: the held-out pairs "
            "support no finite temperature (they are nearly all classified correctly, or carry no signal)"))
    return result


def non_finite_parameters(model) -> tuple[list[str], int]:
    """(names of the trained tensors holding NaN or inf, number of trained tensors).

    After a diverged run every rank holds the same tensors (DDP keeps them equal), so every rank
    reaches the same verdict. Checked after training: the Trainer's logged loss filters NaN steps
    out (``logging_nan_inf_filter``), so a NaN run can otherwise look quiet.
    """
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return non_finite_names(trained), len(trained)


_WANDB_OFF = ("offline", "disabled", "dryrun")


def report_to_problem(report_to: str) -> str | None:
    """Why ``--report_to`` would fail once training starts (unknown name, package missing, W&B without
    credentials), or None. The Trainer only finds out after the model has loaded, with a traceback."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [name.strip() for name in report_to.split(",") if name.strip() not in ("", "none", "all")]
    unknown = [name for name in names if name not in INTEGRATION_TO_CALLBACK]
    if unknown:
        return (f"unknown {', '.join(map(repr, unknown))}; use none, all, or any of "
                f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))} (comma-separated)")
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


def launched_distributed() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def checkpointing_arguments(enabled: bool) -> dict:
    """Activation checkpointing for TrainingArguments, under the name this transformers uses (renamed in 5.x).
    Non-reentrant: gradients reach the LoRA weights although the frozen embeddings need none."""
    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def training_arguments(args: argparse.Namespace, dtype: torch.dtype, eval_enabled: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        optim=args.optim,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,  # transformers 5: a float < 1 is a ratio of total steps
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        **best_model_arguments(args, eval_enabled),
        eval_strategy="steps" if eval_enabled else "no",
        eval_steps=args.eval_steps or args.save_steps,
        bf16=dtype == torch.bfloat16,
        seed=args.seed,
        report_to=[r for r in args.report_to.split(",") if r and r != "none"] or "none",
        run_name=args.wandb_run_name,
        remove_unused_columns=False,         # our collator needs every field
        label_names=["labels"],
        ddp_find_unused_parameters=False,    # every LoRA weight is used in every step
        # A step runs as many forwards as it has micro-batches, which differs between ranks; buffer
        # broadcasting is a collective in every forward and would deadlock. No buffer is ever trained.
        ddp_broadcast_buffers=False,
        # "random": every step an i.i.d. draw, each rank its shard of one permutation. Length grouping
        # makes steps' label mixes follow length bands and can collapse training (see --group_by_length).
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        **checkpointing_arguments(args.gradient_checkpointing),
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without CUDA, torchrun needs gloo and an explicit CPU state, or each rank silently trains alone.
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if launched_distributed() and not torch.cuda.is_available() else None,
    )


def best_model_arguments(args: argparse.Namespace, eval_enabled: bool) -> dict:
    """TrainingArguments for --load_best_model_at_end. Without it no metric is set: the Trainer would otherwise track
    a "best" checkpoint anyway, keep it out of --save_total_limit's rotation and fail on a missing metric."""
    if not (args.load_best_model_at_end and eval_enabled):
        return {}
    metric_driven = args.lr_scheduler_type in ("reduce_lr_on_plateau", "greedy")
    return {"load_best_model_at_end": True,
            "metric_for_best_model": args.metric_for_best_model,  # greater is better except for "loss"
            # the schedulers that watch this metric assume lower is better unless told
            **({"lr_scheduler_kwargs": {"mode": "max"}} if metric_driven and args.metric_for_best_model != "loss" else {})}


def step_collator(model, tokenizer, encoder: PromptEncoder, args: argparse.Namespace, n_gpu: int,
                  reuse_prefix: bool = True):
    """``(collator, prefix_ids)``: packed padding-free steps where a varlen attention kernel runs (flash-attn, or
    PyTorch's own on a recent CUDA torch; see ``varlen.choose_packed_attention``, which may switch the model to it)
    and one process drives one GPU; else length-sorted left-padded micro-batches. Either way the shared prefix is
    left out of the rows and runs once per step, except with gradient checkpointing, under which transformers runs
    decoder layers without a cache (``reuse_prefix=False`` also keeps it in every row: bench.py's measure of what
    the reuse saves). Call :func:`check_packed_steps` once the model is on its device."""
    prefix_ids = encoder.head_ids if reuse_prefix and not args.gradient_checkpointing else []
    if n_gpu <= 1 and choose_packed_attention(model):
        return TrainStepCollator(tokenizer.pad_token_id, len(prefix_ids), packed=True), prefix_ids
    return TrainStepCollator(tokenizer.pad_token_id, len(prefix_ids), args.max_micro_batches), prefix_ids


PACKED_CHECK_ROWS = 4          # training rows scored both ways before the first packed step
PACKED_CHECK_TOLERANCE = 1e-2  # max |prob. difference|: bf16 noise ~1e-3; wrong layouts gave >= 2.4e-2 (tiny model)


def check_packed_steps(trainer: LabelHeadTrainer, features, max_micro_batches: int) -> float | None:
    """Score the first training rows through the packed step and through plain left-padded full prompts; if their
    label probabilities differ by more than :data:`PACKED_CHECK_TOLERANCE`, warn and train with length-sorted
    micro-batches instead (the varlen kernels' masking conventions differ across versions, and a wrong one would
    train silently on the wrong attention). Returns the difference, or None when steps are not packed."""
    collator = trainer.data_collator
    if not getattr(collator, "packed", False):
        return None
    rows = [{"input_ids": features[i]["input_ids"], "labels": features[i]["labels"]}
            for i in range(min(PACKED_CHECK_ROWS, len(features)))]
    model = trainer.model
    device = next(model.parameters()).device
    to_device = lambda step: {  # noqa: E731
        "micro_batches": [{k: v.to(device) if torch.is_tensor(v) else v for k, v in mb.items()}
                          for mb in step["micro_batches"]], "order": step["order"].to(device)}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        packed = step_logits(model, to_device(collator(rows)), trainer.prefix_ids).float().softmax(-1)
        plain_collator = TrainStepCollator(collator.pad_token_id, 0, max_micro_batches=1)
        plain = step_logits(model, to_device(plain_collator(rows))).float().softmax(-1)
    model.train(was_training)
    diff = float((packed - plain).abs().max())
    if diff > PACKED_CHECK_TOLERANCE:
        logger.warning("packed training steps disagree with plain padded prompts on the first %d rows (max "
                       "|probability difference| %.3g > %.3g): this attention kernel's varlen masking is not what "
                       "the packed layout needs, so training uses length-sorted micro-batches instead", len(rows),
                       diff, PACKED_CHECK_TOLERANCE)
        trainer.data_collator = TrainStepCollator(collator.pad_token_id, collator.skip_prefix, max_micro_batches)
    else:
        logger.info("packed training steps match plain padded prompts (max |probability difference| %.2g)", diff)
    return diff
