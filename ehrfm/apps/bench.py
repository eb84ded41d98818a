"""`ehrfm bench NAME`: speed / memory measurements, printed as JSON and written to a file.

Each benchmark is a function ``run(argv: list[str]) -> dict`` in the module of the stage it measures; this
module adds machine information and the command line, so every result can be compared across machines.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
import sys
from pathlib import Path

from ..outputs import write_text_atomic

BENCHMARKS = {
    "prepare": "ehrfm.data_shards.bench_prepare:run",
    "packing": "ehrfm.data_shards.bench:run_packing",
    "mamba-scan": "ehrfm.kernels.mamba_scan.bench:run",
    "anaa": "ehrfm.kernels.anaa.bench:run",
    "dense": "ehrfm.kernels.dense.bench:run",
    "train-throughput": "ehrfm.pretrain.bench:run",
    "perplexity": "ehrfm.pretrain.curves:perplexity_report",
    "generate": "ehrfm.finetune.bench:run",
}


def machine_info() -> dict:
    """CPU, core count, library versions and the device the benchmark ran on."""
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for name in ("transformers", "triton", "polars", "pyarrow"):
        try:
            info[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - optional library, record its absence
            info[name] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run a benchmark, print JSON", description=__doc__)
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("--json-out", type=Path, default=None, help="file to write (default: bench-NAME-DATE.json)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    module_name, func_name = BENCHMARKS[args.name].split(":")
    run = getattr(importlib.import_module(module_name), func_name)
    rest = [a for a in args.rest if a != "--"]
    # `--json-out` is ours wherever it appears (also after the benchmark name)
    if "--json-out" in rest:
        i = rest.index("--json-out")
        if i + 1 >= len(rest):
            raise SystemExit("ehrfm bench: --json-out needs a file name")
        args.json_out = Path(rest[i + 1])
        del rest[i : i + 2]
    result = {
        "benchmark": args.name,
        "command": " ".join(["ehrfm", "bench", args.name] + rest),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "results": run(rest),
    }
    text = json.dumps(result, indent=2)
    print(text)
    out = args.json_out or Path(f"bench-{args.name}-{_dt.datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, text + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0
