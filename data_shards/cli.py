"""`ehrfm prepare`: EHR data (MEDS or FHIR R4) -> tokenized, sharded corpus."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    from ..outputs import add_overwrite_argument

    p = subparsers.add_parser(
        "prepare",
        help="MEDS / FHIR data -> tokenized, sharded corpus",
        description=__doc__,
        epilog="Overrides: key=value with dotted keys, e.g. vocab.num_bins=5 vocab.icd_level=3 history.lookback=1y",
    )
    p.add_argument("--input", required=True, type=Path, help="MEDS root folder, or a folder of FHIR bundles/NDJSON")
    p.add_argument("--format", choices=["meds", "fhir"], default=None, help="input format (default: from config, meds)")
    p.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    p.add_argument("--config", type=Path, default=None, help="prepare YAML config")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_overwrite_argument(p)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from .config import PrepareConfig
    from .prepare import prepare

    overrides = list(args.overrides)
    if args.format:
        overrides.append(f"format={args.format}")
    cfg = load_config(PrepareConfig, args.config, overrides)
    manifest = prepare(args.input, args.out, cfg, progress=not args.no_progress, overwrite=args.overwrite,
                       config_file=args.config)
    counts = manifest["counts"]
    print(f"wrote {args.out}: {counts['patients_total']} patients, {counts['tokens_total']} tokens, vocab {manifest['vocab_size']}")
    for split, n in sorted(counts["patients"].items()):
        print(f"  {split:13s} {n:7d} patients {counts['tokens'].get(split, 0):10d} tokens")
    for name, task in manifest["tasks"].items():
        print(f"  task {name}: {task['labels']} labels, {task['positives']} positive")
    return 0
