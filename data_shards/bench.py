"""`ehrfm bench packing`: real-token fraction of packed vs padded batches over the pretraining split at a
context length. (`ehrfm bench prepare` is :mod:`.bench_prepare`.)"""

from __future__ import annotations

import argparse
from pathlib import Path


def run_packing(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="ehrfm bench packing")
    parser.add_argument("--data", type=Path, required=True, help="a prepared folder")
    parser.add_argument("--split", default="pretrain")
    parser.add_argument("--context-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--long-sequences", choices=["truncate", "split"], default="truncate")
    args = parser.parse_args(argv)
    from .packing_report import packing_report

    return packing_report(args.data, args.split, args.context_length, args.batch_size, args.long_sequences)
