"""What each stage costs as the data grows: wall time, CPU time and peak memory at fractions of the full ESCI release.

For each --fractions value, on a synthetic release of that size (scripts/make_synthetic_release.py), each stage
runs as its own fresh process, as a user runs it:

  prepare      prepare_esci.py (--locale us, the recipe's default)
  prepare_all  prepare_esci.py --locale all (every row of the release: the memory target)
  tokenize     train.py --max_steps 1 on a cold cache: the US training split tokenized (rows/s, cache size)
  train        train.py --max_steps N again, on the warm cache: start-up, then steps/s (constant = no stall)
  eval         eval.py on the US test split (report and plots included)
  predict      predict.py on FRACTION x 1M pairs, streaming

The model is the tiny random Qwen3 (the real tokenizer): the numbers are the cost of the data path around the
model, not of a 0.6B forward pass; --max_length 128 for eval and predict keeps their model cost small.
Results go to --json after every stage (a rerun skips stages already measured), then a table is printed.

    python scripts/bench_growth.py --workdir /tmp/growth --fractions 0.125,0.25,0.5,1 --json BENCH_growth.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere, as a file

import pyarrow.parquet as pq  # noqa: E402

from tiny_reranker.benchmark import measure_script  # noqa: E402
from tiny_reranker.cli import ArgumentParser, HelpFormatter  # noqa: E402
from tiny_reranker.demo_model import build_tiny_model  # noqa: E402
from tiny_reranker.io import write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("prepare", "prepare_all", "tokenize", "train", "eval", "predict")
PREDICT_PAIRS_FULL = 1_000_000
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}


def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--workdir", type=str, required=True, help="folder for the releases, prepared files and runs (GBs at 1)")
    p.add_argument("--fractions", type=str, default="0.125,0.25,0.5,1", help="comma-separated shares of the full release")
    p.add_argument("--stages", type=str, default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    p.add_argument("--train_steps", type=int, default=60, help="optimizer steps of the train stage (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="train.py --preprocessing_num_workers (default: train.py's)")
    p.add_argument("--json", type=str, required=True, help="results file, read back on a rerun and updated after each stage")
    return p


def script(name: str) -> str:
    return os.path.join(ROOT, name)


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def run_stage(stage: str, fraction: float, work: str, model: str, args) -> dict:
    """Run one stage at one fraction; returns its cost and what it processed."""
    env = {**os.environ, **OFFLINE}
    release, prepared, run = (os.path.join(work, name) for name in ("release", "prepared", "run"))
    train_file = os.path.join(prepared, "esci_multiclass_train.parquet")
    test_file = os.path.join(prepared, "esci_multiclass_test.parquet")
    extra = {}
    if stage in ("prepare", "prepare_all"):
        out = prepared if stage == "prepare" else os.path.join(work, "prepared_all")
        argv = ["--esci_dir", release, "--output_dir", out] + (["--locale", "all"] if stage == "prepare_all" else [])
        cost = measure_script(script("prepare_esci.py"), argv, env)
        summary = json.load(open(os.path.join(out, "esci_prepare_summary.json")))
        extra["rows"] = sum(s["rows"] for s in summary["splits"].values())
    elif stage in ("tokenize", "train"):
        steps = 1 if stage == "tokenize" else args.train_steps
        argv = ["--base_model", model, "--train_file", train_file, "--output_dir", run, "--max_steps", str(steps),
                "--eval_ratio", "0", "--no_calibrate", "--logging_steps", str(max(1, steps // 3)),
                "--save_steps", "100000", "--overwrite_output_dir", "--dtype", "fp32"]
        if args.workers:
            argv += ["--preprocessing_num_workers", str(args.workers)]
        cost = measure_script(script("train.py"), argv, env)
        extra["rows"] = pq.ParquetFile(train_file).metadata.num_rows
        done = re.search(r"tokenized (\d+) train rows in ([\d.]+) s \((\d+) process", cost["stderr"])
        if stage == "tokenize":
            if not done:
                raise RuntimeError("the tokenize stage found a warm cache; remove " + os.path.join(run, ".tokenized"))
            extra.update(tokenize_seconds=float(done.group(2)), workers=int(done.group(3)),
                         cache_bytes=folder_bytes(os.path.join(run, ".tokenized")))
        else:
            metrics = json.load(open(os.path.join(run, "train_metrics.json")))
            train_log = metrics.get("train", metrics)
            extra.update(steps=steps, train_seconds=train_log.get("train_runtime"),
                         warm_cache="loaded tokenized cache" in cost["stderr"])
    elif stage == "eval":
        argv = ["--base_model", model, "--lora_model", run, "--eval_file", test_file, "--max_length", "128",
                "--dtype", "fp32", "--metrics_path", os.path.join(work, "eval_metrics.json")]
        cost = measure_script(script("eval.py"), argv, env)
        extra["rows"] = pq.ParquetFile(test_file).metadata.num_rows
    else:
        pairs = os.path.join(work, "predict_input.parquet")
        n = round(PREDICT_PAIRS_FULL * fraction)
        if not os.path.exists(pairs):
            table = pq.read_table(train_file, columns=["query", "item_text"])
            if table.num_rows < n:
                table = pa_concat_until(table, n)
            pq.write_table(table.slice(0, n), pairs, row_group_size=50_000)
        out = os.path.join(work, "predict_scored.parquet")
        if os.path.exists(out):
            os.remove(out)
        cost = measure_script(script("predict.py"), ["--base_model", model, "--lora_model", run, "--input", pairs,
                                                     "--output", out, "--max_length", "128", "--dtype", "fp32"], env)
        extra["rows"] = n
    cost.pop("stderr")
    return {**cost, **extra}


def pa_concat_until(table, n: int):
    """``table`` repeated until it has at least ``n`` rows (a small release's train split is < 1M pairs)."""
    import pyarrow as pa

    return pa.concat_tables([table] * -(-n // table.num_rows))


def format_table(results: dict) -> str:
    lines = ["| stage | fraction | rows | wall s | CPU s | peak MiB | rows/s (wall) | notes |", "|---|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        for fraction, by_stage in sorted(results.items(), key=lambda kv: float(kv[0])):
            r = by_stage.get(stage)
            if not r:
                continue
            seconds = r.get("tokenize_seconds") or r["seconds"]
            notes = []
            if stage == "tokenize":
                notes.append(f"{r['workers']} worker(s), cache {r['cache_bytes'] / 2**20:,.0f} MiB, tokenizing {r['tokenize_seconds']:.0f} s of {r['seconds']:.0f} s")
            if stage == "train":
                steps_s = r["steps"] / r["train_seconds"] if r.get("train_seconds") else float("nan")
                notes.append(f"{r['steps']} steps in {r['train_seconds']:.1f} s ({steps_s:.2f} steps/s), warm cache: {r['warm_cache']}")
            if r["worker_peak_bytes"] > r["peak_bytes"]:
                notes.append(f"largest child {r['worker_peak_bytes'] / 2**20:,.0f} MiB")
            rate = r["rows"] / seconds if stage != "train" else float("nan")
            lines.append(f"| {stage} | {float(fraction):g} | {r['rows']:,} | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} | "
                         f"{r['peak_bytes'] / 2**20:,.0f} | {rate:,.0f} | {'; '.join(notes)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        print(f"error: --stages: unknown {unknown}; choose from {', '.join(STAGES)}", file=sys.stderr)
        return 2
    results = json.load(open(args.json)) if os.path.exists(args.json) else {}
    os.makedirs(args.workdir, exist_ok=True)
    model = os.path.join(args.workdir, "tiny-qwen3")
    if not os.path.isdir(model):
        build_tiny_model(model)
    for fraction in [float(f) for f in args.fractions.split(",")]:
        work = os.path.join(args.workdir, f"f{fraction:g}")
        done = results.setdefault(f"{fraction:g}", {})
        if not os.path.isdir(os.path.join(work, "release")):
            subprocess.run([sys.executable, script("scripts/make_synthetic_release.py"), "--fraction", str(fraction),
                            "--output_dir", os.path.join(work, "release")], check=True)
        for stage in stages:
            if stage in done:
                continue
            print(f"[{fraction:g}] {stage} ...", flush=True)
            done[stage] = run_stage(stage, fraction, work, model, args)
            print(f"[{fraction:g}] {stage}: {json.dumps(done[stage])}", flush=True)
            write_json(args.json, results)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
