"""`ehrfm prepare`: EHR data (MEDS or FHIR R4) -> tokenized, sharded corpus."""

from __future__ import annotations

import argparse
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(subparsers) -> None:
    from ..config_flags import add_config_arguments
    from ..outputs import add_overwrite_argument
    from .config import PrepareConfig

    p = subparsers.add_parser(
        "prepare",
        help="MEDS / FHIR data -> tokenized, sharded corpus",
        description=__doc__,
        epilog="Every config field is a flag (--vocab.num-bins 5) and a key=value override (vocab.num_bins=5); "
        "overrides win over flags, which win over --config.",
    )
    p.add_argument("--input", required=True, type=Path, help="MEDS root folder, or a folder of FHIR bundles/NDJSON")
    p.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    p.add_argument("--config", type=Path, default=None, help="prepare YAML config")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--meds-only",
        action="store_true",
        help="FHIR input: write only the MEDS dataset (data/ + metadata/, validated) to --out and stop",
    )
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        help="processes for the per-shard work (FHIR conversion, both passes); the output is the same for any N",
    )
    add_overwrite_argument(p)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    add_config_arguments(p, PrepareConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..config_flags import config_overrides
    from .config import PrepareConfig
    from .prepare import convert_fhir, prepare

    cfg = load_config(PrepareConfig, args.config, config_overrides(args))
    options = {
        "progress": not args.no_progress,
        "overwrite": args.overwrite,
        "config_file": args.config,
        "jobs": args.jobs,
    }
    if args.meds_only:
        meds = convert_fhir(args.input, args.out, cfg, **options)["meds"]
        print(
            f"wrote MEDS dataset {args.out}: {meds['subjects']} subjects, {meds['shards']} shards, {meds['codes']} codes"
        )
        return 0
    manifest = prepare(args.input, args.out, cfg, **options)
    counts = manifest["counts"]
    print(
        f"wrote {args.out}: {counts['patients_total']} patients, {counts['tokens_total']} tokens, vocab {manifest['vocab_size']}"
    )
    for split, n in sorted(counts["patients"].items()):
        print(f"  {split:13s} {n:7d} patients {counts['tokens'].get(split, 0):10d} tokens")
    for name, task in manifest["tasks"].items():
        print(f"  task {name}: {task['labels']} labels, {task['positives']} positive")
    return 0
