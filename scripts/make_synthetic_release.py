"""Write a synthetic Shopping Queries (ESCI) release at a fraction of full size, for measuring cost at scale.

The three files have the official names, columns and dtypes, so prepare_esci.py reads the folder as it
reads the real `shopping_queries_dataset/`. The text is random catalog words; its lengths, null rates,
label mix (E 65% S 22% C 3% I 10%), locales (us/es/jp), splits and versions follow the real release
(tiny_reranker/esci_release.py lists the numbers). At --fraction 1: 2.62M examples, 1.81M products.

    python scripts/make_synthetic_release.py --fraction 0.125 --output_dir /tmp/esci-synth-1of8
    python prepare_esci.py --esci_dir /tmp/esci-synth-1of8 --output_dir /tmp/esci-prepared-1of8

--output_dir must be empty or new: nothing already there is replaced.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere, as a file

from esci_dataset import ESCIDataError  # noqa: E402
from tiny_reranker.cli import ArgumentParser, HelpFormatter, check_output_dir, cli_error  # noqa: E402
from tiny_reranker.esci_release import write_release  # noqa: E402


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--fraction", type=fraction, required=True, help="share of the full release to write, in (0, 1]")
    p.add_argument("--output_dir", type=str, required=True, help="new or empty folder for the three release files")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        check_output_dir(args.output_dir, "--output_dir")
        if os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
            raise ESCIDataError(f"--output_dir {args.output_dir}: not empty; give a new or empty folder (nothing is replaced)")
        started = time.time()
        info = write_release(args.output_dir, args.fraction, args.seed)
    except ESCIDataError as exc:
        return cli_error(exc)
    print(f"wrote {info['examples']:,} examples, {info['products']:,} products, {info['queries']:,} queries "
          f"({sum(info['bytes'].values()) / 2**20:,.0f} MiB) to {args.output_dir} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
