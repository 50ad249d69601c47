"""Side-by-side speed and memory benchmark: our eval and training paths against the reference recipes.

In one process, on the same model and the same pairs, with interleaved repeats:

* **eval**: ``Reranker.predict_probs`` (what ``eval.py`` runs, default settings) against the
  Qwen3-Reranker transformers example adapted to 4 labels: left padding, batches in input order
  padded to their longest, a full-vocabulary forward, then ``logits[:, -1, label_ids]``;
* **train**: train.py's ``LabelHeadTrainer.training_step`` (each random step cut into length-sorted
  micro-batches, the shared prefix run once, 4-row head, CE over 4 logits; one packed row on a
  CUDA GPU in bf16, through flash-attn or PyTorch's own varlen kernel) against a stock ``Trainer.training_step`` on a causal-LM batch:
  the label word appended, padded to the longest, LM loss over the full vocabulary on it. Both
  sides see the *same random steps* (same seed, same rows per step) and train the same LoRA
  weights with AdamW.

    python bench.py --model tiny                  # smoke run, seconds
    python bench.py --model qwen3-0.6b            # real shape, random init (no download)
    python bench.py --model /models/Qwen3-0.6B    # a real checkpoint

It ends with one line per metric: eval_speedup_vs_reference, train_speedup_vs_naive,
train_peak_memory_ratio. Peak memory is counted above the loaded model over a whole epoch of
batches: ``max_memory_allocated`` on CUDA, sampled process RSS on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np
import torch

from esci_dataset import LABELS, ESCIDataError, PromptEncoder, label_token_ids
from tiny_reranker import compat
from tiny_reranker.benchmark import (
    PeakMemory,
    catalog_pairs,
    load_bench_model,
    naive_batches,
    predict_peak_rss,
    published_token_ids,
    reference_eval,
    synthetic_pairs,
)
from tiny_reranker.cli import (
    ArgumentParser,
    add_dtype_args,
    check_output_file,
    cli_error,
    dtype_flag,
    positive_int,
    save_or_fallback,
)
from tiny_reranker.demo_model import build_tiny_model
from tiny_reranker.io import write_json
from tiny_reranker.modeling import apply_lora, attach_label_head, detach_label_head, resolve_dtype
from tiny_reranker.reranker import Reranker
from tiny_reranker.train_config import TrainerConfig, training_arguments
from tiny_reranker.trainer import LabelHeadTrainer, check_packed_steps, step_collator


def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=str, default="tiny", help="'tiny', 'qwen3-0.6b' (real shape, random init) or a model folder")
    p.add_argument("--n_queries", type=positive_int, default=None, help="synthetic queries (default: 8 for tiny, 4 otherwise)")
    p.add_argument("--items_per_query", type=positive_int, default=12, help="candidate items per query (ESCI has ~10-20)")
    p.add_argument("--repeats", type=positive_int, default=3, help="interleaved repeats per side; median and spread are reported")
    p.add_argument("--eval_batch_size", type=positive_int, default=16, help="pairs per batch for the reference eval recipe")
    p.add_argument("--train_batch_size", type=positive_int, default=8, help="pairs per training step, both sides")
    add_dtype_args(p, "the dtype both sides use")
    p.add_argument("--whole_process", action="store_true",
                   help="also time eval.py as a user runs it (a fresh process) against the published recipe as a script")
    p.add_argument("--predict_memory", type=str, default=None, metavar="N1,N2",
                   help="instead: predict.py's peak memory on N1 and on N2 pairs of ~2 KB items (fresh processes, "
                        "interleaved --repeats), and how much it grows; e.g. 5000,40000")
    p.add_argument("--vllm_python", type=str, default=os.environ.get("TINY_RERANKER_VLLM_PYTHON"),
                   help="also time vLLM's classify on a seq_cls export of the same model against Reranker.predict_probs "
                        "(same pairs, dtype and threads, interleaved), with this venv's python (default: "
                        "$TINY_RERANKER_VLLM_PYTHON; scripts/check_vllm.sh builds one in .venv-vllm)")
    p.add_argument("--reference_process", action="store_true", help=argparse.SUPPRESS)  # internal: one reference run
    p.add_argument("--eval_file", type=str, default=None, help=argparse.SUPPRESS)
    p.add_argument("--max_length", type=int, default=512, help=argparse.SUPPRESS)
    p.add_argument("--no_breakdown", action="store_true",
                   help="skip the four extra eval variants that time where the reference's time goes")
    p.add_argument("--skip_train", action="store_true", help="only benchmark evaluation")
    p.add_argument("--skip_eval", action="store_true", help="only benchmark training")
    p.add_argument("--seed", type=int, default=0, help="seed for the workload, weights and batch order")
    p.add_argument("--json", type=str, default=None, help="also write all numbers to this JSON file")
    return p


# ---------------------------------------------------------------------------
# Training: ours against the naive step, each through its Trainer's own training_step
# ---------------------------------------------------------------------------
def our_batches(token_ids, labels, batch_size, seed, collator):
    """The same random steps as :func:`naive_batches` (same seed, same rows per step), laid out by train.py's collator."""
    order = np.random.default_rng(seed).permutation(len(token_ids))
    for start in range(0, len(order), batch_size):
        yield collator([{"input_ids": token_ids[i], "labels": labels[i]} for i in order[start:start + batch_size]])


def bench_trainers(model, tokenizer, encoder, batch_size: int, workdir: str, check_rows: list[dict]) -> dict:
    """``{side: (trainer, collator, prefix_ids)}`` around the same model: ``naive`` (a stock ``Trainer``),
    ``ours`` (train.py's ``LabelHeadTrainer`` and collator) and ``ours_prefix_in_every_row`` (the same without
    prefix reuse, which measures what the reuse saves).

    Each side's step is its Trainer's own ``training_step`` (forward, loss, backward), so the
    benchmark times the code train.py runs, not a copy of it.
    """
    from transformers import Trainer

    config = TrainerConfig(output_dir=workdir, per_device_train_batch_size=batch_size)  # train.py's defaults
    targs = training_arguments(config, next(model.parameters()).dtype, eval_enabled=False)
    sides = {"naive": (Trainer(model=model, args=targs), None, [])}
    for side, reuse in (("ours", True), ("ours_prefix_in_every_row", False)):
        collator, prefix_ids = step_collator(model, tokenizer, encoder, config, n_gpu=1, reuse_prefix=reuse)
        trainer = LabelHeadTrainer(model=model, args=targs, data_collator=collator, prefix_ids=prefix_ids)
        check_packed_steps(trainer, check_rows, config.max_micro_batches)  # as train.py does
        sides[side] = (trainer, trainer.data_collator, prefix_ids)
    for trainer, _, _ in sides.values():
        compat.prepare_manual_steps(trainer)  # what Trainer.train(), which we do not run, sets per step
    return sides


def run_epoch(trainer, model, batches, optimizer, device) -> float:
    start = time.perf_counter()
    for batch in batches:
        trainer.training_step(model, batch)  # moves the batch to the device, forward, loss, backward
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------
# Eval: interleaved sides and the measured breakdown
# ---------------------------------------------------------------------------
def eval_benchmark(model, tokenizer, queries, items, token_ids, label_ids, args) -> tuple[dict, list[str]]:
    """Interleaved repeats of our eval path, the published recipe, and variants that each remove one of
    the recipe's costs, so the breakdown is measured, not derived from FLOPs."""
    reranker = Reranker(model, tokenizer)  # eval.py's defaults
    bs = args.eval_batch_size
    published = published_token_ids(tokenizer, queries, items)
    bare = published_token_ids(tokenizer, queries, items, template=False)
    sides = {  # name -> (label head attached?, run)
        "ours": (True, lambda: reranker.predict_probs(queries, items)),
        "published": (False, lambda: reference_eval(model, tokenizer, published, label_ids, bs)),
        "same_template": (False, lambda: reference_eval(model, tokenizer, token_ids, label_ids, bs)),
    }
    if not args.no_breakdown:
        sides.update({
            "published_4row_head": (True, lambda: reference_eval(model, tokenizer, published, label_ids, bs,
                                                                 label_rows_only=True)),
            "published_no_padding": (False, lambda: reference_eval(model, tokenizer, published, label_ids, bs,
                                                                   sort_by_length=True)),
            "published_no_template": (False, lambda: reference_eval(model, tokenizer, bare, label_ids, bs)),
            "floor": (True, lambda: reference_eval(model, tokenizer, bare, label_ids, bs, sort_by_length=True,
                                                   label_rows_only=True)),
        })
    times, probs = {name: [] for name in sides}, {}
    for rep in range(args.repeats):  # rotate the order, so no side always runs warm
        names = list(sides)[rep % len(sides):] + list(sides)[:rep % len(sides)]
        for name in names:
            with_head, run = sides[name]
            (attach_label_head if with_head else lambda m, _ids: detach_label_head(m))(model, label_ids)
            start = time.perf_counter()
            probs[name] = run()
            times[name].append(time.perf_counter() - start)
    attach_label_head(model, label_ids)
    med = {name: statistics.median(t) for name, t in times.items()}
    n_pairs = len(queries)
    out = {"seconds": times, "median_s": med, "pairs_per_s": {k: n_pairs / v for k, v in med.items()},
           "speedup_vs_published": med["published"] / med["ours"],
           "speedup_vs_same_template": med["same_template"] / med["ours"],
           "speedup_vs_published_per_repeat": [p / o for p, o in zip(times["published"], times["ours"])],
           "max_prob_diff_same_template": float(abs(probs["same_template"] - probs["ours"]).max()),
           "published_prompt_tokens": int(sum(map(len, published))), "our_prompt_tokens": int(sum(map(len, token_ids)))}
    print(f"\n{'eval side':<24}{'pairs/s':>10}{'median s':>10}{'spread s':>10}")
    for name in sides:
        print(f"{name:<24}{n_pairs / med[name]:>10.2f}{med[name]:>10.2f}{max(times[name]) - min(times[name]):>10.2f}")
    print(f"max |prob difference| ours vs same-template reference: {out['max_prob_diff_same_template']:.2e}")
    if not args.no_breakdown:
        pub = med["published"]
        parts = {"full-vocabulary head": pub - med["published_4row_head"], "padding": pub - med["published_no_padding"],
                 "template tokens": pub - med["published_no_template"]}
        out["published_breakdown_s"] = {**parts, "floor": med["floor"], "left_to_win": med["ours"] - med["floor"]}
        print(f"\nwhere the published recipe's {pub:.2f} s go (each cost removed alone, medians):")
        for part, secs in parts.items():
            print(f"  {part:<22}{secs:>8.2f} s  ({secs / pub:.0%})")
        print(f"  floor: query + item + suffix only, batches padded as ours (≤ 10%), 4-row head: {med['floor']:.2f} s "
              f"(best possible ratio ~{pub / med['floor']:.2f}x)")
        print(f"  ours {med['ours']:.2f} s: left to win against the floor {med['ours'] - med['floor']:.2f} s")
    lines = [f"eval_speedup_vs_reference: {out['speedup_vs_published']:.2f}",
             f"eval_speedup_vs_same_template_reference: {out['speedup_vs_same_template']:.2f}"]
    return out, lines


# ---------------------------------------------------------------------------
# Whole process: what a user feels
# ---------------------------------------------------------------------------
def reference_process(args) -> int:
    """The published recipe as a standalone run (``bench.py --reference_process``): load, tokenize, score."""
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=resolve_dtype(args.dtype)).eval()
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # where eval.py scores: the same device on both sides
    df = pd.read_parquet(args.eval_file)
    token_ids = published_token_ids(tokenizer, df["query"].tolist(), df["item_text"].tolist(), args.max_length)
    probs = reference_eval(model, tokenizer, token_ids, label_token_ids(tokenizer), args.eval_batch_size)
    print(f"scored {len(probs)} pairs")
    return 0


def whole_process_benchmark(model, tokenizer, queries, items, args, workdir) -> tuple[dict, list[str]]:
    """Interleaved wall-clock runs of ``eval.py`` as a user runs it and of the published recipe as a script,
    on the same pairs and model folder, with the seed's flags (--batch_size 16 --max_length 512)."""
    import subprocess

    import pandas as pd

    model_dir = args.model if os.path.isdir(args.model) else os.path.join(workdir, "model")
    if model_dir != args.model:
        detach_label_head(model)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    data = os.path.join(workdir, "pairs.parquet")
    rng = np.random.default_rng(args.seed)
    pd.DataFrame({"query_id": [q for q in queries], "query": queries, "item_text": items,
                  "esci_label": rng.choice(list(LABELS), len(queries))}).to_parquet(data, index=False)
    common = ["--batch_size", str(args.eval_batch_size), "--max_length", "512", "--dtype", args.dtype]
    here = os.path.dirname(os.path.abspath(__file__))
    commands = {
        "eval.py": [sys.executable, os.path.join(here, "eval.py"), "--base_model", model_dir, "--eval_file", data,
                    "--metrics_path", os.path.join(workdir, "metrics.json"), *common],
        "published recipe": [sys.executable, os.path.abspath(__file__), "--reference_process", "--model", model_dir,
                             "--eval_file", data, "--dtype", args.dtype, "--eval_batch_size", str(args.eval_batch_size)],
    }
    times = {name: [] for name in commands}
    for rep in range(args.repeats):
        for name in (list(commands) if rep % 2 == 0 else list(commands)[::-1]):
            start = time.perf_counter()
            proc = subprocess.run(commands[name], capture_output=True, text=True)
            times[name].append(time.perf_counter() - start)
            if proc.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{proc.stderr[-2000:]}")
    med = {name: statistics.median(t) for name, t in times.items()}
    ratio = med["published recipe"] / med["eval.py"]
    print(f"\n{'whole process':<20}{'median s':>10}{'spread s':>10}   ({len(queries)} pairs, flags {' '.join(common)})")
    for name in commands:
        print(f"{name:<20}{med[name]:>10.2f}{max(times[name]) - min(times[name]):>10.2f}")
    out = {"seconds": times, "median_s": med, "speedup": ratio,
           "speedup_per_repeat": [r / o for r, o in zip(times["published recipe"], times["eval.py"])]}
    return out, [f"eval_whole_process_speedup_vs_reference: {ratio:.2f}"]


# ---------------------------------------------------------------------------
# vLLM: the serving engine users would pick, on a seq_cls export of the same model
# ---------------------------------------------------------------------------
def vllm_benchmark(model, tokenizer, args, workdir) -> tuple[dict, list[str]]:
    """Interleaved repeats of ``Reranker.predict_probs`` (eval.py's path) and vLLM's offline ``classify`` on a
    seq_cls export of ``model``: same pairs, dtype and thread count; scoring time only, plus each start-up.

    Each repeat scores pairs neither side has seen (vLLM caches the KV blocks of prompts it has seen, which
    would time a cache, not a forward pass), after one unmeasured warm-up set. vLLM gets our token ids
    (truncation included), so both sides run the same tokens, as predict.py --engine vllm does."""
    from export import save_export, seq_cls_from_causal_lm
    from tiny_reranker.vllm_engine import VllmProcess

    dtype = next(model.parameters()).dtype
    label_ids = label_token_ids(tokenizer)
    detach_label_head(model)
    causal_dir, seq_cls_dir = os.path.join(workdir, "vllm-causal"), os.path.join(workdir, "vllm-seq_cls")
    model.save_pretrained(causal_dir)
    tokenizer.save_pretrained(causal_dir)
    seq_cls = seq_cls_from_causal_lm(model.float().cpu(), label_ids, tokenizer.pad_token_id).to(dtype)
    model.to(dtype)
    save_export(seq_cls, tokenizer, label_ids, causal_dir, causal_dir, seq_cls_dir, bf16=False, folded=True)
    del seq_cls
    threads = torch.get_num_threads()
    start = time.perf_counter()
    reranker = Reranker.from_pretrained(causal_dir, device=str(next(model.parameters()).device), dtype=args.dtype)
    ours_startup = time.perf_counter() - start
    n_queries = args.n_queries or (8 if args.model == "tiny" else 4)
    sets = []  # set 0 warms both sides up; 1..repeats are measured
    for rep in range(args.repeats + 1):
        queries, items = synthetic_pairs(tokenizer, n_queries, args.items_per_query, args.seed + 1000 * (rep + 1))
        path = os.path.join(workdir, f"vllm-prompts-{rep}.json")
        with open(path, "w") as f:  # our token ids (truncation included), as predict.py --engine vllm sends them
            json.dump([list(map(int, ids)) for ids in reranker.encode(queries, items)], f)
        sets.append((queries, items, path))
    engine = VllmProcess(args.vllm_python, seq_cls_dir, sets[0][2], str(dtype), os.path.join(workdir, "vllm.log"),
                         threads)
    times, diffs = {"ours": [], "vllm": []}, []
    try:
        for rep, (queries, items, path) in enumerate(sets):  # alternate which side goes first
            probs = {}
            for side in (("ours", "vllm") if rep % 2 == 0 else ("vllm", "ours")):
                start = time.perf_counter()
                if side == "vllm":
                    reply = engine.run(path)
                    seconds, probs["vllm"] = reply["seconds"], np.asarray(reply["probs"])
                else:
                    probs["ours"] = reranker.predict_probs(queries, items)
                    seconds = time.perf_counter() - start
                if rep:
                    times[side].append(seconds)
            diffs.append(float(np.abs(probs["vllm"] - probs["ours"]).max()))
    finally:
        engine.close()
    med = {side: statistics.median(t) for side, t in times.items()}
    n = len(sets[1][0])
    out = {"seconds": times, "median_s": med, "pairs_per_repeat": n, "pairs_per_s": {k: n / v for k, v in med.items()},
           "startup_s": {"ours": ours_startup, "vllm": engine.startup_seconds}, "threads": threads,
           "speedup_vs_vllm": med["vllm"] / med["ours"],
           "speedup_vs_vllm_per_repeat": [v / o for v, o in zip(times["vllm"], times["ours"])],
           "max_prob_diff": max(diffs)}
    print(f"\n{'scoring side':<24}{'pairs/s':>10}{'median s':>10}{'spread s':>10}{'start-up s':>12}  ({threads} threads, "
          f"{n} new pairs a repeat)")
    for side in times:
        print(f"{side:<24}{n / med[side]:>10.2f}{med[side]:>10.2f}{max(times[side]) - min(times[side]):>10.2f}"
              f"{out['startup_s'][side]:>12.1f}")
    print(f"max |prob difference| ours vs vLLM: {out['max_prob_diff']:.2e}")
    return out, [f"eval_speedup_vs_vllm: {out['speedup_vs_vllm']:.2f}   per repeat "
                 + ", ".join(f"{r:.2f}" for r in out["speedup_vs_vllm_per_repeat"]) + "   (above 1: ours is faster)"]


# ---------------------------------------------------------------------------
# predict.py's memory as the input grows (issue 21: bounded by the chunk, not the input)
# ---------------------------------------------------------------------------
def predict_memory_benchmark(args, workdir: str) -> int:
    """Peak RSS of predict.py (the tiny model, --max_length 128, default --chunk_size) on two input sizes, as the
    median of interleaved fresh-process repeats; ends with the growth in MB."""
    sizes = [int(n) for n in args.predict_memory.split(",")]
    model_dir = build_tiny_model(os.path.join(workdir, "tiny-qwen3"))
    inputs = {}
    for n in sizes:
        inputs[n] = os.path.join(workdir, f"pairs-{n}.parquet")
        catalog_pairs(n, args.seed).to_parquet(inputs[n], index=False)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "predict.py")
    peaks, seconds = {n: [] for n in sizes}, {n: [] for n in sizes}
    for rep in range(args.repeats):
        for n in (sizes if rep % 2 == 0 else sizes[::-1]):
            out = os.path.join(workdir, f"scored-{n}-{rep}.parquet")
            peak, secs = predict_peak_rss(script, ["--base_model", model_dir, "--input", inputs[n], "--output", out,
                                                   "--max_length", "128", "--dtype", "fp32"])
            peaks[n].append(peak)
            seconds[n].append(secs)
    med = {n: statistics.median(peaks[n]) / 2**20 for n in sizes}
    print(f"\n{'pairs':>8}{'peak MiB':>10}{'seconds':>9}   (predict.py, tiny model, ~2 KB items, max_length 128)")
    for n in sizes:
        print(f"{n:>8}{med[n]:>10.0f}{statistics.median(seconds[n]):>9.1f}   per repeat "
              + ", ".join(f"{p / 2**20:.0f}" for p in peaks[n]))
    growth = med[sizes[-1]] - med[sizes[0]]
    print(f"\npredict_peak_memory_growth_mb: {growth:.0f}  ({sizes[0]} -> {sizes[-1]} pairs)")
    if args.json:
        write_json(args.json, {"pairs": sizes, "peak_bytes": peaks, "seconds": seconds, "growth_mb": growth})
    return 0


# ---------------------------------------------------------------------------
def _median_spread(values):
    return statistics.median(values), (max(values) - min(values))


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    args.dtype = dtype_flag(args)  # --bf16 folded in once
    if args.reference_process:
        return reference_process(args)
    if args.json:
        try:  # before the benchmark, which takes minutes
            check_output_file(args.json, "--json")
        except ESCIDataError as exc:
            return cli_error(exc)
    workdir = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"tiny-reranker-bench-{os.getpid()}")
    try:
        if args.predict_memory:
            return predict_memory_benchmark(args, workdir)
        return run_benchmarks(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # a saved 0.6B model is GBs


def run_benchmarks(args, workdir: str) -> int:
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype)
    try:
        model, tokenizer = load_bench_model(args.model, dtype, workdir)
    except (OSError, ValueError) as exc:
        print(f"error: --model {args.model!r} is neither 'tiny', 'qwen3-0.6b' nor a loadable model folder: {exc}",
              file=sys.stderr)
        return 2
    model.to(device).eval()
    n_queries = args.n_queries or (8 if args.model == "tiny" else 4)
    queries, items = synthetic_pairs(tokenizer, n_queries, args.items_per_query, args.seed)
    encoder = PromptEncoder(tokenizer, 512)
    token_ids = encoder.encode_batch(queries, items)
    lengths = np.array([len(t) for t in token_ids])
    label_ids = label_token_ids(tokenizer)
    labels = np.random.default_rng(args.seed).integers(0, len(LABELS), len(token_ids)).tolist()
    results = {"model": args.model, "device": str(device), "dtype": str(dtype), "pairs": len(token_ids),
               "prompt_tokens": {"mean": float(lengths.mean()), "p50": float(np.median(lengths)),
                                 "p95": float(np.percentile(lengths, 95)), "total": int(lengths.sum())},
               "threads": torch.get_num_threads()}
    print(f"model {args.model} on {device} ({dtype}), {len(token_ids)} pairs, prompt tokens mean "
          f"{lengths.mean():.0f} p50 {np.median(lengths):.0f} p95 {np.percentile(lengths, 95):.0f}")
    lines = []

    if not args.skip_eval:
        results["eval"], eval_lines = eval_benchmark(model, tokenizer, queries, items, token_ids, label_ids, args)
        lines += eval_lines
    if args.whole_process:
        results["eval_whole_process"], process_lines = whole_process_benchmark(model, tokenizer, queries, items, args,
                                                                                workdir)
        attach_label_head(model, label_ids)
        lines += process_lines

    if args.vllm_python:
        results["vllm"], vllm_lines = vllm_benchmark(model, tokenizer, args, workdir)
        attach_label_head(model, label_ids)
        lines += vllm_lines

    if not args.skip_train:
        model.train()
        model = apply_lora(model, r=16, alpha=32, dropout=0.0, target_modules="q_proj,v_proj")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        attach_label_head(model.get_base_model(), label_ids)
        sides = bench_trainers(model, tokenizer, encoder, args.train_batch_size, workdir,
                               [{"input_ids": ids, "labels": label} for ids, label in zip(token_ids, labels)])
        causal_lm = model.get_base_model()
        seconds, peaks = {side: [] for side in sides}, {side: [] for side in sides}

        def epoch(side, rep):
            trainer, collator, _ = sides[side]
            if collator is None:  # the naive side: a causal-LM batch through the full-vocabulary head
                detach_label_head(causal_lm)
                batches = naive_batches(token_ids, labels, label_ids, args.train_batch_size, tokenizer.pad_token_id,
                                        args.seed + rep)
            else:
                attach_label_head(causal_lm, label_ids)
                batches = our_batches(token_ids, labels, args.train_batch_size, args.seed + rep, collator)
            with PeakMemory(device) as mem:
                seconds[side].append(run_epoch(trainer, model, batches, optimizer, device))
            peaks[side].append(mem.peak)

        for rep in range(args.repeats):  # rotate which side goes first, so none always runs warm
            names = list(sides)
            for side in names[rep % len(names):] + names[:rep % len(names)]:
                epoch(side, rep)
        medians = {side: _median_spread(seconds[side]) for side in sides}
        naive_t, our_t, full_t = seconds["naive"], seconds["ours"], seconds["ours_prefix_in_every_row"]
        ratios = [n / o for n, o in zip(naive_t, our_t)]
        prefix_ratios = [f / o for f, o in zip(full_t, our_t)]
        mem_ratio = statistics.median(peaks["ours"]) / max(1, statistics.median(peaks["naive"]))
        n_med, o_med = medians["naive"][0], medians["ours"][0]
        _, collator, prefix_ids = sides["ours"]
        results["train"] = {"naive_s": naive_t, "ours_s": our_t, "ours_prefix_in_every_row_s": full_t,
                            "naive_peak_bytes": peaks["naive"], "ours_peak_bytes": peaks["ours"],
                            "naive_tokens_per_s": lengths.sum() / n_med, "ours_tokens_per_s": lengths.sum() / o_med,
                            "speedup": n_med / o_med, "speedup_min": min(ratios), "speedup_max": max(ratios),
                            "peak_memory_ratio": mem_ratio, "packed": collator.packed,
                            "shared_prefix_tokens": len(prefix_ids),
                            "prefix_reuse_speedup": medians["ours_prefix_in_every_row"][0] / o_med}
        t = results["train"]
        print(f"\n{'train':<26}{'tokens/s':>12}{'pairs/s':>10}{'median s':>10}{'spread s':>10}{'peak MiB':>10}")
        for side, (med, spr) in medians.items():
            print(f"{side:<26}{lengths.sum() / med:>12.1f}{len(lengths) / med:>10.2f}{med:>10.2f}{spr:>10.2f}"
                  f"{statistics.median(peaks[side]) / 2**20:>10.1f}")
        print(f"{'packed' if collator.packed else 'left-padded micro-batches'}; shared prefix {len(prefix_ids)} tokens "
              f"of {lengths.mean():.0f} per pair on average")
        print(f"speedup per repeat: {', '.join(f'{r:.2f}' for r in ratios)}")
        print(f"prefix reuse speedup per repeat: {', '.join(f'{r:.2f}' for r in prefix_ratios)} "
              "(prefix in every row / ours; below 1 it costs time)")
        lines.append(f"train_speedup_vs_naive: {t['speedup']:.2f}")
        lines.append(f"train_peak_memory_ratio: {mem_ratio:.2f}")
        lines.append(f"train_prefix_reuse_speedup: {t['prefix_reuse_speedup']:.2f}")

    print()
    for line in lines:
        print(line)
    if args.json:  # a full disk now keeps the numbers in the temp folder
        return save_or_fallback(args.json, lambda tmp: write_json(tmp, results), "--json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
