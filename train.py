"""Fine-tune a Qwen3 causal LM with LoRA into a 4-class ESCI reranker (E / S / C / I).

The model reads the last prompt position; the loss is cross-entropy over the
four label-token logits ``last_hidden @ W[label_ids].T`` (never the full vocabulary).

Single process:   python train.py --base_model Qwen/Qwen3-0.6B --train_file data/esci_multiclass_train.parquet
Several GPUs:     torchrun --nproc_per_node 4 train.py ...   (or NPROC=4 bash scripts/run_train.sh)
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from esci_dataset import (
    LABELS,
    ESCIDataError,
    ESCIMultiClassRerankDataset,
    PromptEncoder,
    collate_left_padded,
    collate_packed,
    label_token_ids,
    load_esci_parquet,
    split_by_query,
)
from metrics import classification_metrics, majority_baseline
from modeling import (
    DEFAULT_LORA_TARGETS,
    apply_lora,
    attach_label_head,
    encode_prefix,
    label_logits,
    load_base_model,
    load_tokenizer,
    parse_target_modules,
    save_reranker_config,
)

logger = logging.getLogger("train")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    g = p.add_argument_group("data and model")
    g.add_argument("--base_model", type=str, required=True, help="base causal LM: a local folder or hub id (e.g. Qwen/Qwen3-0.6B)")
    g.add_argument("--train_file", type=str, required=True, help="parquet with columns query, item_text, esci_label (E/S/C/I or full words)")
    g.add_argument("--output_dir", type=str, required=True, help="where the adapter, tokenizer, checkpoints and metrics go")
    g.add_argument("--max_length", type=int, default=512, help="max prompt tokens; only the item text (then the query) is truncated")
    g.add_argument("--eval_ratio", type=float, default=0.02, help="fraction of QUERIES held out for periodic eval (0 disables); no query is on both sides")
    g.add_argument("--seed", type=int, default=42, help="seed for the split, LoRA init and data order")

    g = p.add_argument_group("optimisation")
    g.add_argument("--per_device_train_batch_size", type=int, default=16, help="pairs per device per step")
    g.add_argument("--per_device_eval_batch_size", type=int, default=32, help="pairs per device per eval step")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--num_train_epochs", type=float, default=1.0, help="passes over the training split")
    g.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (overrides epochs when > 0)")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="peak AdamW learning rate (LoRA weights only)")
    g.add_argument("--warmup_ratio", type=float, default=0.03, help="fraction of steps spent warming up linearly")
    g.add_argument("--bf16", action="store_true", help="load and train the model in bfloat16")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward to save memory (non-reentrant)")
    g.add_argument("--no_flash_attn", action="store_true", help="force PyTorch sdpa attention even when flash-attn is installed")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
    g.add_argument("--lora_alpha", type=int, default=32, help="LoRA scaling numerator (scale = alpha / r)")
    g.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
    g.add_argument("--lora_target_modules", type=str, default=DEFAULT_LORA_TARGETS,
                   help="comma list of module names, or 'all-linear'; never lm_head (tied to the embeddings)")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--logging_steps", type=int, default=10, help="log loss and learning rate every N steps")
    g.add_argument("--save_steps", type=int, default=500, help="save a checkpoint every N steps")
    g.add_argument("--eval_steps", type=int, default=None, help="evaluate every N steps (default: --save_steps)")
    g.add_argument("--save_total_limit", type=int, default=3, help="keep at most N checkpoints")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="checkpoint folder to continue from, or 'latest' for the newest in --output_dir")
    g.add_argument("--report_to", type=str, default="none", help="'none', 'wandb' or 'tensorboard' (comma list allowed)")
    g.add_argument("--wandb_run_name", type=str, default=None, help="W&B run name (the project comes from WANDB_PROJECT)")
    return p


# ---------------------------------------------------------------------------
# Loss and metrics on the 4-row head
# ---------------------------------------------------------------------------
def label_head_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the 4 label logits (computed in fp32 for bf16 runs)."""
    return F.cross_entropy(logits.float(), labels)


def compute_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    metrics = classification_metrics(labels, np.asarray(logits).argmax(axis=-1))
    metrics["majority_accuracy"] = majority_baseline(labels)["accuracy"]
    return metrics


def make_trainer(**kwargs):
    from transformers import Trainer

    class LabelHeadTrainer(Trainer):
        """Trainer whose loss is CE over the label head; everything else is stock."""

        def __init__(self, *a, tokenizer=None, base_model_name="", prefix_ids=(), **kw):
            super().__init__(*a, **kw)
            self.model_accepts_loss_kwargs = False  # our loss is a per-batch mean...
            self.loss_is_scaled_for_ga = False      # ...so the Trainer divides it by the accumulation steps
            self._tok, self._base_model_name, self._prefix_ids = tokenizer, base_model_name, list(prefix_ids)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            prefix_kv = None
            if self._prefix_ids:  # the batch holds only what follows the shared prefix
                prefix_kv = encode_prefix(self.accelerator.unwrap_model(model), self._prefix_ids)
            logits = label_logits(model, inputs, prefix_kv=prefix_kv)
            loss = label_head_loss(logits, inputs["labels"])
            return (loss, {"logits": logits}) if return_outputs else loss

        def _save(self, output_dir=None, state_dict=None):
            super()._save(output_dir, state_dict)
            if not self.args.should_save:  # only one process writes
                return
            # Every checkpoint carries the label/prompt contract, so any of them can be evaluated.
            output_dir = output_dir or self.args.output_dir
            self._tok.save_pretrained(output_dir)
            save_reranker_config(output_dir, self._tok, self._base_model_name)

    return LabelHeadTrainer(**kwargs)


def resolve_checkpoint(spec: str | None, output_dir: str) -> str | None:
    """``None`` (start fresh), a checkpoint folder, or ``latest`` (the newest in ``output_dir``)."""
    if spec is None:
        return None
    if spec != "latest":
        if not os.path.isfile(os.path.join(spec, "trainer_state.json")):
            raise ESCIDataError(f"--resume_from_checkpoint {spec}: not a checkpoint folder (no trainer_state.json)")
        return spec
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if last is None:
        raise ESCIDataError(f"--resume_from_checkpoint latest: no checkpoint-* folder in {output_dir}")
    return last


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad flag values before anything slow happens (argparse exits with code 2)."""
    try:
        parse_target_modules(args.lora_target_modules)
    except ValueError as exc:
        parser.error(f"--lora_target_modules: {exc}")
    if not 0.0 <= args.eval_ratio < 1.0:
        parser.error(f"--eval_ratio must be in [0, 1), got {args.eval_ratio}")
    if not 0.0 <= args.warmup_ratio < 1.0:
        parser.error(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    for flag in ("max_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "lora_r", "logging_steps", "save_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")


def batching_plan(attn_implementation: str, pad_token_id: int, prefix_ids: list[int], n_gpu: int = 1,
                  gradient_checkpointing: bool = False):
    """``(collator, shared_prefix_ids)`` for training batches; every choice gives the same loss and gradients (tested).

    * flash-attention (varlen): padding-free packed batches. A packed batch is one
      row, which DataParallel (one process, several GPUs) cannot split.
    * otherwise: left-padded batches without the shared system+instruction prefix,
      which runs once per batch instead of once per row. Not with gradient
      checkpointing, whose recomputation would append to the prefix cache twice.
    """
    if attn_implementation == "flash_attention_2" and n_gpu <= 1:
        return collate_packed, []
    if gradient_checkpointing:
        return functools.partial(collate_left_padded, pad_token_id=pad_token_id), []
    return functools.partial(collate_left_padded, pad_token_id=pad_token_id, skip_prefix=len(prefix_ids)), prefix_ids


def launched_distributed() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def main(argv: list[str] | None = None) -> int:
    # 1. Arguments and logging ------------------------------------------------
    parser = make_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    from transformers import TrainingArguments, set_seed
    from transformers.trainer_utils import IntervalStrategy

    targs = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_ratio,  # transformers 5: a float < 1 is a ratio of total steps
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        eval_strategy="steps" if args.eval_ratio > 0 else "no",
        eval_steps=args.eval_steps or args.save_steps,
        bf16=args.bf16,
        seed=args.seed,
        report_to=[r for r in args.report_to.split(",") if r and r != "none"] or "none",
        run_name=args.wandb_run_name,
        remove_unused_columns=False,         # our collator needs every field
        label_names=["labels"],
        ddp_find_unused_parameters=False,    # every LoRA weight is used in every step
        train_sampling_strategy="group_by_length",  # similar lengths per batch: less padding, same data
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without CUDA, torchrun needs gloo and an explicit CPU state, or each rank silently trains alone.
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if launched_distributed() and not torch.cuda.is_available() else None,
    )
    is_main = targs.process_index == 0
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if is_main else logging.WARNING)
    if is_main:
        logger.info("arguments: %s", json.dumps(vars(args), sort_keys=True))
    set_seed(args.seed)

    try:
        # 2. Data ------------------------------------------------------------
        df = load_esci_parquet(args.train_file)
        train_df, eval_df = split_by_query(df, args.eval_ratio, args.seed)
        logger.info("train rows %d, eval rows %d (split by query, seed %d)", len(train_df), len(eval_df), args.seed)
        if args.eval_ratio > 0 and len(eval_df) == 0:
            logger.warning("only one query in %s: no held-out split, periodic evaluation is off", args.train_file)
            targs.eval_strategy = IntervalStrategy.NO
        resume = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)

        # 3. Tokenizer and datasets (tokenize once per node) -----------------
        tokenizer = load_tokenizer(args.base_model)
        label_ids = label_token_ids(tokenizer)
        with targs.main_process_first(desc="tokenization"):
            train_ds = ESCIMultiClassRerankDataset(train_df, tokenizer, args.max_length)
            eval_ds = ESCIMultiClassRerankDataset(eval_df, tokenizer, args.max_length) if len(eval_df) else None
        if is_main:
            first = train_ds[0]
            logger.info("label words %s -> ids %s", [tokenizer.decode([i]) for i in label_ids], label_ids)
            logger.info("example prompt (%d tokens, label %s):\n%s", len(first["input_ids"]),
                        LABELS[first["labels"]], tokenizer.decode(first["input_ids"]))

        # 4. Model: base -> label head -> LoRA --------------------------------
        model = load_base_model(args.base_model, torch.bfloat16 if args.bf16 else torch.float32, args.no_flash_attn)
        model.config.use_cache = False
        if targs.n_gpu > 1:
            logger.warning("one process drives %d GPUs (DataParallel); torchrun is much faster: "
                           "NPROC=%d bash scripts/run_train.sh", targs.n_gpu, targs.n_gpu)
        collator, prefix_ids = batching_plan(model.config._attn_implementation, tokenizer.pad_token_id,
                                             PromptEncoder(tokenizer, args.max_length).head_ids, targs.n_gpu,
                                             args.gradient_checkpointing)
        attach_label_head(model, label_ids)
        if args.gradient_checkpointing:
            # Non-reentrant checkpointing lets gradients reach LoRA weights even though the
            # frozen embedding output does not require grad.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
        if is_main:
            model.print_trainable_parameters()

        # 5. Trainer -------------------------------------------------------------
        trainer = make_trainer(
            model=model,
            args=targs,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            data_collator=collator,
            compute_metrics=compute_metrics,
            tokenizer=tokenizer,
            base_model_name=args.base_model,
            prefix_ids=prefix_ids,
        )
    except ESCIDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # unloadable model, unusable tokenizer, bad LoRA target, ...
        print(f"error: cannot set up training with --base_model {args.base_model!r}: {exc}", file=sys.stderr)
        return 2

    # 6. Train -------------------------------------------------------------------
    result = trainer.train(resume_from_checkpoint=resume)

    # 7. Save: adapter (safetensors), tokenizer, label/prompt contract, metrics ----
    trainer.save_model(args.output_dir)
    metrics = {"train": result.metrics}
    if eval_ds is not None:
        metrics["eval"] = trainer.evaluate()
    if trainer.is_world_process_zero():
        write_json(os.path.join(args.output_dir, "run_config.json"), {**vars(args), "world_size": targs.world_size})
        write_json(os.path.join(args.output_dir, "train_metrics.json"),
                   {**metrics, "log_history": trainer.state.log_history})
        if "eval" in metrics:
            e = metrics["eval"]
            logger.info("held-out eval: accuracy %.4f (majority %.4f), macro-F1 %.4f",
                        e["eval_accuracy"], e["eval_majority_accuracy"], e["eval_macro_f1"])
        logger.info("saved LoRA reranker to %s", args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
