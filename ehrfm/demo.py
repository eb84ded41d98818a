"""`ehrfm demo`: the pipeline end to end on a seeded Synthea cohort (cached) or on your own data.

Stages available so far: generate a cohort (cached under $EHRFM_CACHE), `prepare` it, and report the
corpus and the packing efficiency. Later stages (pretrain, export, finetune, evaluate) join here as they land.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the pipeline end to end on a Synthea cohort", description=__doc__)
    p.add_argument("--patients", type=int, default=60, help="Synthea patients to generate (default 60)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--age", default="50-90", help="Synthea age band (older patients have more admissions)")
    p.add_argument("--input", type=Path, default=None, help="your own data instead of Synthea")
    p.add_argument("--format", choices=["meds", "fhir"], default="fhir")
    p.add_argument("--out", type=Path, default=Path("ehrfm-demo"), help="output folder (default ./ehrfm-demo)")
    p.add_argument("--context-length", type=int, default=512)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ehrfm.data_shards.config import PrepareConfig
    from ehrfm.data_shards.packing_report import packing_report
    from ehrfm.data_shards.prepare import prepare
    from ehrfm.data_shards.synthea import generate_cohort

    started = time.time()
    if args.input is None:
        print(f"[1/3] Synthea cohort: {args.patients} patients, seed {args.seed}, ages {args.age} (cached after the first run)")
        source = generate_cohort(args.patients, seed=args.seed, age=args.age)
        fmt = "fhir"
    else:
        source, fmt = args.input, args.format
    data_dir = args.out / "data"
    print(f"[2/3] prepare {source} -> {data_dir}")
    manifest = prepare(source, data_dir, PrepareConfig(format=fmt, tasks=["demo"]))
    print(f"[3/3] packing report at context length {args.context_length}")
    report = packing_report(data_dir, "pretrain", args.context_length, long_sequences="split")
    counts = manifest["counts"]
    print()
    print(f"patients {counts['patients_total']}, tokens {counts['tokens_total']}, vocabulary {manifest['vocab_size']}")
    print(f"{'task':18s} {'labels':>7s} {'positive':>9s}")
    for name, task in manifest["tasks"].items():
        print(f"{name:18s} {task['labels']:7d} {task['positives']:9d}")
    print(f"real-token fraction at C={args.context_length}: packed {report['packed']['real_token_fraction']:.3f}, "
          f"length-bucketed padding {report['padded']['real_token_fraction']:.3f}, "
          f"padding to C {report['padded_to_context']['real_token_fraction']:.3f}")
    (args.out / "demo_report.json").write_text(json.dumps({"manifest_counts": counts, "packing": report}, indent=2))
    print(f"\nprepared data: {data_dir}\nreport: {args.out / 'demo_report.json'}\n({time.time() - started:.0f} s)")
    return 0
