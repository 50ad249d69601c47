"""Fine-tune a Qwen3 causal LM with LoRA into a 4-class ESCI reranker (E / S / C / I).

The model reads the last prompt position; the loss is cross-entropy over the
four label-token logits ``last_hidden @ W[label_ids].T`` (never the full vocabulary).
Each optimizer step trains on a uniformly random batch (plain SGD sampling); the
speed-ups only change how that batch is laid out (length-sorted micro-batches,
the shared prompt prefix run once), never which pairs it holds.

Single process:   python train.py --base_model Qwen/Qwen3-0.6B --train_file data/esci_multiclass_train.parquet --output_dir outputs/lora
Several GPUs:     torchrun --nproc_per_node 4 train.py ...   (or NPROC=4 bash scripts/run_train.sh)
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import time

from transformers import set_seed

from esci_dataset import (
    INSTRUCT,
    LABELS,
    NDCG_GAINS,
    ESCIDataError,
    PromptEncoder,
    attach_item_text,
    build_template,
    check_instruction_is_text,
    label_token_ids,
    load_esci_parquet,
    query_groups,
    split_by_query,
)
from tiny_reranker.checkpoints import check_resume_matches, prepare_output_dir, resolve_checkpoint
from tiny_reranker.cli import (
    ArgumentParser,
    HelpFormatter,
    add_dtype_args,
    check_output_dir,
    cli_error,
    dtype_flag,
    folder_relation,
    set_up_logging,
)
from tiny_reranker.compat import optimizer_names
from tiny_reranker.contract import save_run_contract
from tiny_reranker.data_cache import cache_folder, tokenize_split
from tiny_reranker.io import read_json_object, write_json
from tiny_reranker.model_files import check_model_paths
from tiny_reranker.modeling import (
    DEFAULT_LORA_TARGETS,
    apply_lora,
    attach_label_head,
    load_base_model,
    load_tokenizer,
    parse_target_modules,
    resolve_dtype,
)
from tiny_reranker.train_config import BEST_MODEL_METRICS, TrainerConfig, report_to_problem, training_arguments
from tiny_reranker.trainer import (
    LabelHeadTrainer,
    SaveRunContract,
    check_packed_steps,
    fit_held_out_temperature,
    held_out_metrics,
    non_finite_parameters,
    step_collator,
)

logger = logging.getLogger("train")


def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    g = p.add_argument_group("data and model")
    g.add_argument("--base_model", type=str, required=True, help="base causal LM: a local folder or hub id (e.g. Qwen/Qwen3-0.6B)")
    g.add_argument("--train_file", type=str, required=True,
                   help="parquet with columns query, item_text, esci_label (E/S/C/I or full words); prepare_esci.py makes it")
    g.add_argument("--output_dir", type=str, required=True, help="where the adapter, tokenizer, checkpoints and metrics go")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="start fresh even if --output_dir holds another run's checkpoints (they are removed)")
    g.add_argument("--max_length", type=int, default=512,
                   help="max prompt tokens; only the item text (then the query) is truncated. At least the template "
                        "(60 tokens by default) + 32")
    g.add_argument("--instruction", type=str, default=None,
                   help=f"the task instruction in the prompt (default: {INSTRUCT!r}); stored with the adapter, "
                        "so eval, predict and export reuse it")
    g.add_argument("--eval_ratio", type=float, default=0.02, help="fraction of QUERIES held out for periodic eval (0 disables); no query is on both sides")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="train on a seeded random sample of this many rows of the training split (quick runs); "
                        "the held-out split is unchanged, and the log says how many rows were left out")
    g.add_argument("--seed", type=int, default=TrainerConfig.seed, help="seed for the split, the --max_train_samples sample, LoRA init "
                                                        "and data order")
    g.add_argument("--preprocessing_num_workers", type=int, default=None,
                   help="processes that tokenize the data when it is not cached yet (in --output_dir/.tokenized); "
                        "default: 1 below 50k rows or on 2 cores or fewer, else one per core up to 8")

    g = p.add_argument_group("optimisation")
    g.add_argument("--per_device_train_batch_size", type=int, default=TrainerConfig.per_device_train_batch_size, help="pairs per device per step (drawn at random)")
    g.add_argument("--per_device_eval_batch_size", type=int, default=TrainerConfig.per_device_eval_batch_size, help="pairs per device per eval step")
    g.add_argument("--gradient_accumulation_steps", type=int, default=TrainerConfig.gradient_accumulation_steps,
                   help="batches per optimizer step; scripts/run_train.sh passes 4 (GRAD_ACCUM): 16 x 4 = 64 pairs "
                        "per optimizer step and process")
    g.add_argument("--num_train_epochs", type=float, default=TrainerConfig.num_train_epochs, help="passes over the training split")
    g.add_argument("--max_steps", type=int, default=TrainerConfig.max_steps, help="stop after this many optimizer steps (overrides epochs when > 0)")
    g.add_argument("--learning_rate", type=float, default=TrainerConfig.learning_rate, help="peak learning rate (LoRA weights only)")
    g.add_argument("--warmup_ratio", type=float, default=TrainerConfig.warmup_ratio, help="fraction of steps spent warming up linearly")
    g.add_argument("--lr_scheduler_type", type=str, default=TrainerConfig.lr_scheduler_type, help="transformers scheduler name: linear, cosine, constant, ...")
    g.add_argument("--optim", type=str, default=TrainerConfig.optim, help="transformers optimizer name (adamw_torch, sgd, ...)")
    g.add_argument("--weight_decay", type=float, default=TrainerConfig.weight_decay, help="decoupled weight decay on the LoRA weights")
    add_dtype_args(g, "training dtype")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in backward to save memory (non-reentrant; turns off shared-prefix reuse)")
    g.add_argument("--no_flash_attn", action="store_true", help="force PyTorch sdpa attention even when flash-attn is installed")

    g = p.add_argument_group("batching (how a step's random batch is laid out; the gradient is the same)")
    g.add_argument("--max_micro_batches", type=int, default=TrainerConfig.max_micro_batches,
                   help="cut each step's batch into at most N length-sorted micro-batches to skip padding (1 = one padded batch)")
    g.add_argument("--group_by_length", action="store_true",
                   help="RISKY, off by default: let the sampler put similar lengths in the same step. Less padding, but "
                        "each step's label mix then follows its length band, which can collapse training to the "
                        "majority class when item length correlates with the label (it does in real catalogs)")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
    g.add_argument("--lora_alpha", type=int, default=32, help="LoRA scaling numerator (scale = alpha / r)")
    g.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
    g.add_argument("--lora_target_modules", type=str, default=DEFAULT_LORA_TARGETS,
                   help="comma list of module names, or 'all-linear'; never lm_head (tied to the embeddings)")

    g = p.add_argument_group("calibration (after training)")
    # On by default: T is one number fitted on held-out queries, it never changes a predicted label, and
    # it makes the probabilities (and the expected-gain score built on them) mean what they say.
    g.add_argument("--calibrate", dest="calibrate", action="store_true", default=argparse.SUPPRESS,
                   help="ON BY DEFAULT (nothing to pass; kept for old commands): fit one temperature T on the held-out split (--eval_ratio) and store it in reranker_config.json; "
                        "eval.py, predict.py, Reranker and export.py divide the label logits by T. Same predicted "
                        "labels, calibrated probabilities, and the score can order items differently")
    g.add_argument("--no_calibrate", dest="calibrate", action="store_false", default=argparse.SUPPRESS,
                   help="fit no temperature: every scoring path uses the raw logits")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--logging_steps", type=int, default=TrainerConfig.logging_steps, help="log loss and learning rate every N steps")
    g.add_argument("--save_steps", type=int, default=TrainerConfig.save_steps, help="save a checkpoint every N steps")
    g.add_argument("--eval_steps", type=int, default=None, help="evaluate every N steps (default: --save_steps)")
    g.add_argument("--save_total_limit", type=int, default=TrainerConfig.save_total_limit, help="keep at most N checkpoints")
    g.add_argument("--load_best_model_at_end", action="store_true",
                   help="end with the checkpoint that scored best on the held-out split (--metric_for_best_model) "
                        "instead of the last step; it becomes the saved adapter and is kept by --save_total_limit. "
                        "Needs --eval_ratio > 0 and --save_steps a multiple of --eval_steps")
    g.add_argument("--metric_for_best_model", choices=BEST_MODEL_METRICS, default=TrainerConfig.metric_for_best_model,
                   help="held-out metric that picks the best checkpoint: ndcg (ESCI task 1, the ranking), loss "
                        "(lower is better), accuracy or macro_f1")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="checkpoint folder to continue from, or 'latest' for the newest complete one in --output_dir")
    g.add_argument("--report_to", type=str, default=TrainerConfig.report_to, help="'none', 'wandb' or 'tensorboard' (comma list allowed)")
    g.add_argument("--wandb_run_name", type=str, default=None, help="W&B run name (the project comes from WANDB_PROJECT)")
    p.set_defaults(calibrate=True)  # not in --calibrate's help: it reads "ON BY DEFAULT"
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked (a bad value exits with code 2 before anything slow happens)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    return args


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad flag values before anything slow happens (argparse exits with code 2)."""
    if args.instruction is not None and not args.instruction.strip():  # "" once became the default silently
        parser.error("--instruction is empty; omit the flag to train with the default instruction")
    try:
        parse_target_modules(args.lora_target_modules)
    except ValueError as exc:
        parser.error(f"--lora_target_modules: {exc}")
    for flag, low, high in (("eval_ratio", 0.0, 1.0), ("warmup_ratio", 0.0, 1.0), ("lora_dropout", 0.0, 1.0)):
        value = getattr(args, flag)
        if not (math.isfinite(value) and low <= value < high):
            parser.error(f"--{flag} must be in [{low:g}, {high:g}), got {value}")
    for flag in ("learning_rate", "num_train_epochs"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{flag} must be a positive number, got {value}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error(f"--weight_decay must be 0 or more, got {args.weight_decay}")
    for flag in ("max_length", "per_device_train_batch_size", "per_device_eval_batch_size", "max_micro_batches",
                 "gradient_accumulation_steps", "lora_r", "lora_alpha", "logging_steps", "save_steps", "save_total_limit"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.max_steps == 0 or args.max_steps < -1:
        parser.error(f"--max_steps must be a positive number of steps (or -1 to use --num_train_epochs), got {args.max_steps}")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        parser.error(f"--max_train_samples must be at least 1, got {args.max_train_samples}")
    if args.eval_steps is not None and args.eval_steps < 1:
        parser.error(f"--eval_steps must be at least 1, got {args.eval_steps}")
    if args.load_best_model_at_end and args.eval_ratio == 0:
        parser.error("--load_best_model_at_end needs a held-out split to pick the best checkpoint on; set --eval_ratio > 0")
    if args.load_best_model_at_end and args.eval_steps and args.save_steps % args.eval_steps:
        parser.error(f"--load_best_model_at_end needs --save_steps ({args.save_steps}) to be a multiple of --eval_steps "
                     f"({args.eval_steps}), so every saved checkpoint has a held-out score")
    if args.preprocessing_num_workers is not None and args.preprocessing_num_workers < 1:
        parser.error(f"--preprocessing_num_workers must be at least 1, got {args.preprocessing_num_workers}")
    from transformers import SchedulerType

    for flag, names in (("optim", optimizer_names()), ("lr_scheduler_type", [name.value for name in SchedulerType])):
        if getattr(args, flag) not in names:
            parser.error(f"--{flag} {getattr(args, flag)!r}: not a transformers name; use one of {', '.join(names)}")
    if (problem := report_to_problem(args.report_to)):
        parser.error(f"--report_to {args.report_to}: {problem}")
    args.dtype = dtype_flag(args)  # --bf16 folded in once; run_config.json records the dtype that ran


# ---------------------------------------------------------------------------
# Set-up and wrap-up steps of main()
# ---------------------------------------------------------------------------
def prepare_run(args: argparse.Namespace, is_main: bool, run_config: dict) -> str | None:
    """Check --output_dir, find the checkpoint to resume (same model, data and best-checkpoint flags only; see
    ``checkpoints.check_resume_matches``) and clear or keep old runs. ``run_config``: the flags and world size."""
    if os.path.isdir(os.path.expanduser(args.base_model)):
        if (relation := folder_relation(args.output_dir, args.base_model)):
            raise ESCIDataError(f"--output_dir {args.output_dir} {relation} the --base_model folder {args.base_model}; "
                                "training writes its adapter, checkpoints and model card there, and the base would "
                                "then read as an adapter folder. Choose a separate --output_dir")
    check_output_dir(args.output_dir, "--output_dir")  # after: its write probe must not touch the base folder
    resume = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if resume:
        check_resume_matches(resume, run_config)
    prepare_output_dir(args.output_dir, resume is not None, args.overwrite_output_dir, is_main)
    return resume


def load_training_data(args: argparse.Namespace):
    """``(train_df, eval_df)``: the validated parquet, split by query (no query on both sides), without item_text
    (:func:`with_texts_to_tokenize` reads it where the tokenized cache does not hold the split yet)."""
    train_df, eval_df = split_by_query(load_esci_parquet(args.train_file, keys_only=True), args.eval_ratio,
                                       args.seed)
    logger.info("train rows %d, eval rows %d (split by query, seed %d)", len(train_df), len(eval_df), args.seed)
    if args.max_train_samples is not None and args.max_train_samples < len(train_df):
        logger.info("--max_train_samples %d: training on a random sample of %d of the %d training rows (%d left out)",
                    args.max_train_samples, args.max_train_samples, len(train_df),
                    len(train_df) - args.max_train_samples)
        train_df = train_df.sample(n=args.max_train_samples, random_state=args.seed).sort_index()
    if args.eval_ratio > 0 and len(eval_df) == 0:
        if args.load_best_model_at_end:
            raise ESCIDataError(f"{args.train_file}: only one query, so no held-out split to pick the best checkpoint "
                                "on (--load_best_model_at_end); train without it, or on more queries")
        logger.warning("only one query in %s: no held-out split, periodic evaluation is off", args.train_file)
    if (args.load_best_model_at_end and args.metric_for_best_model == "ndcg" and len(eval_df)
            and not eval_df["esci_label"].map(NDCG_GAINS).gt(0).any()):
        raise ESCIDataError(f"{args.train_file}: no held-out query has an E, S or C item, so held-out nDCG is "
                            "undefined and cannot pick the best checkpoint; use another --metric_for_best_model or "
                            "--eval_ratio/--seed")
    return train_df, eval_df


def with_texts_to_tokenize(train_df, eval_df, encoder: PromptEncoder, args: argparse.Namespace):
    """The splits, each with its item_text read (and validated) only when its tokenized cache is missing: training
    from the cache never holds the training file's text in memory (~2.5 KB a row of ESCI)."""
    def needed(df, split):
        return len(df) and not os.path.isdir(cache_folder(df, encoder, split, args.train_file, args.output_dir))

    return tuple(attach_item_text(df, args.train_file) if needed(df, split) else df
                 for df, split in ((train_df, "train"), (eval_df, "eval")))


def tokenize_splits(train_df, eval_df, encoder: PromptEncoder, args: argparse.Namespace):
    """``(train_ds, eval_ds or None)``, tokenized into the Arrow cache under ``--output_dir/.tokenized``."""
    cache = dict(source=args.train_file, output_dir=args.output_dir, num_proc=args.preprocessing_num_workers,
                 add_texts=lambda df: attach_item_text(df, args.train_file))  # a damaged cache is rebuilt
    train_ds = tokenize_split(train_df, encoder, "train", **cache)
    eval_ds = tokenize_split(eval_df, encoder, "eval", **cache) if len(eval_df) else None
    return train_ds, eval_ds


def load_base(args: argparse.Namespace, load):
    """``load(--base_model)`` (its tokenizer or model); a folder or hub id that cannot be loaded is a user error."""
    try:
        return load(args.base_model)
    except (OSError, ValueError) as exc:
        raise ESCIDataError(f"cannot load --base_model {args.base_model!r}: {str(exc).strip().splitlines()[0]}") from None


def add_lora_head(model, label_ids: list[int], args: argparse.Namespace):
    """The 4-row label head, then LoRA on ``--lora_target_modules`` (a name the model lacks is a user error)."""
    attach_label_head(model, label_ids)
    try:
        return apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
    except ValueError as exc:
        raise ESCIDataError(f"--lora_target_modules {args.lora_target_modules!r}: {str(exc).splitlines()[0]}") from None


def log_run_start(model, tokenizer, encoder: PromptEncoder, train_ds, label_ids: list[int], n_gpu: int) -> None:
    """What a reader needs to trust the run: trainable parameters, label ids, one full prompt, truncation."""
    model.print_trainable_parameters()
    first = train_ds[0]
    logger.info("label words %s -> ids %s", [tokenizer.decode([i]) for i in label_ids], label_ids)
    logger.info("example prompt (%d tokens, label %s):\n%s", len(first["input_ids"]),
                LABELS[first["labels"]], tokenizer.decode(first["input_ids"]))
    if (warning := encoder.truncation_warning()):
        logger.warning("training data: %s", warning)
    if n_gpu > 1:
        logger.warning("one process drives %d GPUs (DataParallel); torchrun is much faster: "
                       "NPROC=%d bash scripts/run_train.sh", n_gpu, n_gpu)


def evaluate_held_out(trainer: LabelHeadTrainer, eval_ds, calibrate: bool) -> dict:
    """``{"eval": metrics, "calibration": {temperature, ...}}`` on the held-out split (empty without one)."""
    if eval_ds is None:
        if calibrate:
            logger.warning("no held-out split, so no temperature was fitted: scoring will use the raw logits")
        return {}
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    last = trainer.compute_metrics.last
    if evals and evals[-1].get("step") == trainer.state.global_step and last and not trainer.args.load_best_model_at_end:
        # The last step was an evaluation step: its metrics are logged and its logits kept; no second pass.
        eval_metrics, (logits, labels) = {k: v for k, v in evals[-1].items() if k.startswith("eval_")}, last
    else:
        # predict() is evaluate()'s pass and metrics, and also returns the 4 label logits for calibration
        logger.info("held-out eval of the final model (%d pairs)", len(eval_ds))
        held_out = trainer.predict(eval_ds, metric_key_prefix="eval")
        if not trainer.args.load_best_model_at_end:
            # The last step's model, logged at the last step. The best checkpoint's are already in the log at its
            # own step: logged again at the last step they would draw a false last point in the curves and W&B.
            trainer.log(held_out.metrics)
        eval_metrics, logits, labels = held_out.metrics, held_out.predictions, held_out.label_ids
    metrics = {"eval": eval_metrics}
    if calibrate:
        metrics["calibration"] = fit_held_out_temperature(logits, labels)
    return metrics


def save_run_outputs(trainer: LabelHeadTrainer, tokenizer, encoder: PromptEncoder, run_config: dict,
                     metrics: dict) -> None:
    """Rank 0: the contract (with the fitted temperature), train_metrics.json, the curves, and a summary."""
    output_dir = trainer.args.output_dir
    temperature = metrics.get("calibration", {}).get("temperature")
    save_run_contract(output_dir, tokenizer, encoder.template, run_config, temperature)
    write_json(os.path.join(output_dir, "train_metrics.json"), {**metrics, "log_history": trainer.state.log_history})
    if "eval" in metrics:
        e = metrics["eval"]
        logger.info("held-out eval: accuracy %.4f (majority %.4f), macro-F1 %.4f, nDCG %s (ESCI task 1, raw logits)",
                    e["eval_accuracy"], e["eval_majority_accuracy"], e["eval_macro_f1"],
                    f"{e['eval_ndcg']:.4f} (random order {e['eval_ndcg_random']:.4f})" if "eval_ndcg" in e
                    else "n/a (no held-out query has a relevant item)")
    c = metrics.get("calibration", {})
    if c.get("temperature") is not None:
        logger.info("temperature T=%.4f fitted on %d held-out pairs: NLL %.4f -> %.4f, ECE %.4f -> %.4f "
                    "(stored in reranker_config.json)", c["temperature"], c["n"], c["nll_before"], c["nll_after"],
                    c["ece_before"], c["ece_after"])
    elif c:
        logger.warning("no temperature stored: %s. Scoring will use the raw logits.", c["not_stored"])
    from tiny_reranker.plots import plot_training  # matplotlib loads only here, after training

    curves = plot_training(trainer.state.log_history, os.path.join(output_dir, "train_curves.png"))
    if curves:
        logger.info("loss and held-out metrics over steps: %s", curves)
    logger.info("saved LoRA reranker to %s", output_dir)


def log_finish(args: argparse.Namespace, started: float) -> None:
    """The run's total time, and the command that evaluates what it saved."""
    test_file = os.path.join(os.path.dirname(args.train_file), os.path.basename(args.train_file).replace("train", "test"))
    if test_file == args.train_file or not os.path.isfile(test_file):
        test_file = "TEST.parquet"
    logger.info("done in %s. Next, evaluate it: python eval.py --base_model %s --lora_model %s --eval_file %s",
                format_duration(time.time() - started), args.base_model, args.output_dir, test_file)


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def log_resume(checkpoint: str) -> None:
    """Which checkpoint the run continues from, and how far it had got."""
    state = read_json_object(os.path.join(checkpoint, "trainer_state.json")) or {}
    logger.info("resuming from %s (step %s of %s)", os.path.basename(checkpoint), state.get("global_step", "?"),
                state.get("max_steps", "?"))


# ---------------------------------------------------------------------------
# The run, in order
# ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    # 1. Arguments and logging ---------------------------------------------------------------
    started = time.time()
    args = parse_args(argv)
    dtype, config = resolve_dtype(args.dtype), TrainerConfig.from_flags(vars(args))
    targs = training_arguments(config, dtype, eval_enabled=args.eval_ratio > 0)
    is_main = targs.process_index == 0
    set_up_logging(logger, args, is_main)  # INFO and the flags on the main process, warnings on the others
    run_config = {**vars(args), "world_size": targs.world_size}
    try:
        # 2. Output folder and resume point; the data, split by query --------------------------
        resume = prepare_run(args, is_main, run_config)
        train_df, eval_df = load_training_data(args)
        if args.eval_ratio > 0 and len(eval_df) == 0:
            targs = training_arguments(config, dtype, eval_enabled=False)
        # 3. Tokenizer and prompt (--max_length checked against it), model; tokenized once per node
        check_model_paths(args.base_model)  # a loadable base: not an adapter or seq_cls export, hub reachable
        tokenizer = load_base(args, load_tokenizer)
        check_instruction_is_text(args.instruction, tokenizer)
        encoder = PromptEncoder(tokenizer, args.max_length, build_template(args.instruction or INSTRUCT))
        label_ids = label_token_ids(tokenizer)
        train_df, eval_df = with_texts_to_tokenize(train_df, eval_df, encoder, args)  # bad item_text: before the model
        model = load_base(args, lambda path: load_base_model(path, dtype, args.no_flash_attn))
        model.config.use_cache = False
        with targs.main_process_first(desc="tokenization"):
            train_ds, eval_ds = tokenize_splits(train_df, eval_df, encoder, args)
        # 4. Label head, then LoRA (seeded: the LoRA init is random) ----------------------------
        set_seed(args.seed)
        model = add_lora_head(model, label_ids, args)
    except ESCIDataError as exc:
        return cli_error(exc)
    if is_main:
        log_run_start(model, tokenizer, encoder, train_ds, label_ids, targs.n_gpu)

    # 5. Trainer: random steps, laid out by the step collator; the contract in every checkpoint
    collator, prefix_ids = step_collator(model, tokenizer, encoder, config, targs.n_gpu)
    trainer = LabelHeadTrainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                               data_collator=collator, processing_class=tokenizer,
                               compute_metrics=held_out_metrics(query_groups(eval_df)) if eval_ds else None,
                               callbacks=[SaveRunContract(tokenizer, encoder.template, run_config)], prefix_ids=prefix_ids)
    check_packed_steps(trainer, train_ds, args.max_micro_batches)  # packed layout vs plain prompts, on the device

    # 6. Train; save the adapter (safetensors) and tokenizer; evaluate and calibrate on held-out queries
    if resume and is_main:
        log_resume(resume)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except OSError as exc:  # a full disk or a read-only mount while saving a checkpoint: say how to go on
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        return cli_error(f"--output_dir {args.output_dir}: writing failed at step {trainer.state.global_step} "
                         f"({exc.strerror or exc}). Free space (or fix the folder), then run the same command with "
                         f"--resume_from_checkpoint latest: it continues from the newest complete checkpoint.")
    broken, n_trained = non_finite_parameters(model)
    if broken:  # NaN weights score every pair NaN: refuse to save them as the run's adapter
        return cli_error(
            f"training diverged: {len(broken)} of {n_trained} trained tensors hold NaN or inf after step "
            f"{trainer.state.global_step} (first: {broken[0]}), so no adapter was saved in {args.output_dir}. "
            f"Lower --learning_rate (it was {args.learning_rate:g}), or continue from a checkpoint-* folder saved "
            f"before the divergence with --resume_from_checkpoint.")
    if args.load_best_model_at_end and trainer.state.best_model_checkpoint:
        logger.info("the saved adapter is the best checkpoint on the held-out split, %s (%s %.4f); training ran "
                    "to step %d", os.path.basename(trainer.state.best_model_checkpoint), args.metric_for_best_model,
                    trainer.state.best_metric, trainer.state.global_step)
    trainer.save_model(args.output_dir)
    metrics = {"train": result.metrics, **evaluate_held_out(trainer, eval_ds, args.calibrate)}

    # 7. Contract with the temperature, metrics JSON, curves (rank 0 only) ----------------------
    if trainer.is_world_process_zero():
        save_run_outputs(trainer, tokenizer, encoder, run_config, metrics)
        log_finish(args, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
