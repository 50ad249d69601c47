"""What train.py hands the Hugging Face Trainer: the label-head loss and Trainer, the held-out metrics and
temperature, the step collator, and the contract written into every checkpoint.

``train.py`` is the script (flags, set-up, the run in order); this module is the training machinery it
configures (with ``train_config.TrainerConfig``), which ``bench.py`` and the tests use as they are, so
they time and test the real step.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import EvalPrediction, ProgressCallback, Trainer, TrainerCallback

from esci_dataset import PromptEncoder, PromptTemplate
from tiny_reranker import compat
from tiny_reranker.batching import TrainStepCollator
from tiny_reranker.calibration import at_search_bound, calibration_before_after, fit_temperature
from tiny_reranker.contract import save_run_contract
from tiny_reranker.forward import step_logits
from tiny_reranker.metrics import classification_metrics, majority_baseline, random_order_ndcg, task1_ranking_ndcg
from tiny_reranker.modeling import non_finite_names
from tiny_reranker.scoring import scores_from_probs, softmax
from tiny_reranker.train_config import TrainerConfig
from tiny_reranker.varlen import choose_packed_attention

logger = logging.getLogger(__name__)


def label_head_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the step's pairs on the 4 label logits (in fp32 for bf16 runs)."""
    return F.cross_entropy(logits.float(), labels)


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
            metrics["ndcg"], metrics["ndcg_random"] = ndcg, random_order_ndcg(groups, labels)  # and its chance line
        compute_metrics.last = (logits, labels)  # the newest evaluation's logits: calibration reuses them
        return metrics

    compute_metrics.last = None

    return compute_metrics


class TrainingBarOnly(ProgressCallback):
    """The Trainer's progress bar without its held-out bars: nested in the training bar, they leave raw cursor
    escapes (``[A``) in logs, and each held-out evaluation logs its result anyway."""

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        return


class LabelHeadTrainer(compat.SequentialEvalSampler, Trainer):
    """The stock Trainer with CE over the label head on :class:`batching.TrainStepCollator` steps.

    ``prefix_ids``: the shared prompt prefix the collator left out; it runs once
    per step and every micro-batch attends to its keys/values. Held-out batches stay in
    dataset order (:class:`compat.SequentialEvalSampler`): ``held_out_metrics`` matches
    predictions to queries by position.
    """

    # Our loss is a mean over the batch, so the Trainer divides it by the accumulation steps.
    model_accepts_loss_kwargs = False
    loss_is_scaled_for_ga = False

    def __init__(self, *args, prefix_ids=(), **kwargs):
        super().__init__(*args, **kwargs)
        compat.disable_loss_kwargs(self)  # the base __init__ inspects the model and sets it again
        self.prefix_ids = list(prefix_ids)
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(TrainingBarOnly)


    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The prefix runs outside the DDP wrapper: its gradients still reach the same parameters.
        logits = step_logits(model, inputs, self.prefix_ids, prefix_model=self.accelerator.unwrap_model(model))
        loss = label_head_loss(logits, inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss


class SaveRunContract(TrainerCallback):
    """Write ``reranker_config.json`` and ``run_config.json`` into every checkpoint, so any of them can be
    evaluated, and resumed only under the same model flags. Written after the Trainer's own files."""

    def __init__(self, tokenizer, template: PromptTemplate, run_config: dict):
        self.tokenizer, self.template, self.run_config = tokenizer, template, run_config

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            save_run_contract(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"),
                              self.tokenizer, self.template, self.run_config)


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


def step_collator(model, tokenizer, encoder: PromptEncoder, config: TrainerConfig, n_gpu: int,
                  reuse_prefix: bool = True):
    """``(collator, prefix_ids)``: packed padding-free steps where a varlen attention kernel runs (flash-attn, or
    PyTorch's own on a recent CUDA torch; see ``varlen.choose_packed_attention``, which may switch the model to it)
    and one process drives one GPU; else length-sorted left-padded micro-batches. Either way the shared prefix is
    left out of the rows and runs once per step, except with gradient checkpointing, under which transformers runs
    decoder layers without a cache (``reuse_prefix=False`` also keeps it in every row: bench.py's measure of what
    the reuse saves). Call :func:`check_packed_steps` once the model is on its device."""
    prefix_ids = encoder.head_ids if reuse_prefix and not config.gradient_checkpointing else []
    if n_gpu <= 1 and choose_packed_attention(model):
        return TrainStepCollator(tokenizer.pad_token_id, len(prefix_ids), packed=True), prefix_ids
    return TrainStepCollator(tokenizer.pad_token_id, len(prefix_ids), config.max_micro_batches), prefix_ids


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
    failure = None
    with torch.no_grad():
        plain_collator = TrainStepCollator(collator.pad_token_id, 0, max_micro_batches=1)
        plain = step_logits(model, to_device(plain_collator(rows))).float().softmax(-1)
        try:  # a varlen kernel whose signature changed raises instead of disagreeing: the same fallback
            packed = step_logits(model, to_device(collator(rows)), trainer.prefix_ids).float().softmax(-1)
        except Exception as exc:  # noqa: BLE001 - any failure of the packed path means: do not pack
            failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    model.train(was_training)
    diff = float("inf") if failure else float((packed - plain).abs().max())
    if diff > PACKED_CHECK_TOLERANCE:
        why = (f"raised {failure}" if failure else f"disagree with plain padded prompts (max |probability difference| "
               f"{diff:.3g} > {PACKED_CHECK_TOLERANCE:.3g}): this attention kernel's varlen masking is not what the "
               "packed layout needs")
        logger.warning("packed training steps on the first %d rows %s, so training uses length-sorted micro-batches "
                       "instead", len(rows), why)
        trainer.data_collator = TrainStepCollator(collator.pad_token_id, collator.skip_prefix, max_micro_batches)
    else:
        logger.info("packed training steps match plain padded prompts (max |probability difference| %.2g)", diff)
    return diff
