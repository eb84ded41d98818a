"""The `ehrfm` command: one entry point, one subcommand per stage.

Each stage module exposes ``add_parser(subparsers)`` which registers its subcommand and sets ``func``;
the heavy imports happen inside ``func`` so `ehrfm --help` stays fast.

Error boundary: an expected error (:class:`ehrfm.errors.EhrfmError`: bad config, bad data, a refused output
folder, a checkpoint failing its integrity check, diverged training, ...) prints one line ``error: <message>``
on stderr and exits 2; ``--log-level DEBUG`` shows its traceback as well. Other exceptions are bugs and keep
their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

# (module providing add_parser) in the order shown by `ehrfm --help`
SUBCOMMAND_MODULES = (
    "ehrfm.data_shards.cli",  # prepare
    "ehrfm.pretrain.cli",  # models (presets / parameter counts)
    "ehrfm.pretrain.cli_train",  # pretrain, export
    "ehrfm.launch.cli",  # launch
    "ehrfm.apps.demo",  # demo
    "ehrfm.apps.ablate",  # ablate
    "ehrfm.apps.compare",  # compare (001 Table 1)
    "ehrfm.apps.study",  # study convergence, study pretraining-benefit
    "ehrfm.apps.bench",  # bench
    "ehrfm.apps.plan",  # plan (size a run on paper)
    "ehrfm.finetune.cli",  # finetune, evaluate, baseline, embed
    "ehrfm.finetune.probe",  # probe
    "ehrfm.finetune.text_cli",  # text serialize / finetune / boost / report (002's clinical-text path)
    "ehrfm.tool_envs",  # tools (ACES, MEDS-Tab in their own environments)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ehrfm", description="Foundation models for electronic health records: prepare, pretrain, finetune."
    )
    parser.add_argument("--version", action="version", version=f"ehrfm {importlib.import_module('ehrfm').__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills a `key=value ...` positional only once: overrides written after a later option
    # (`--data D a=1 --out R b=2`) come back as extras and join the others, in command-line order
    if extra:
        overrides = getattr(args, "overrides", None)
        if overrides is None or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        overrides.extend(extra)
    args.print_help = parser.print_help
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not getattr(args, "func", None):
        args.print_help()
        return 2
    from ehrfm.errors import EXPECTED_ERROR_EXIT_CODE, EhrfmError
    from ehrfm.logging import setup_logging

    setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except EhrfmError as err:
        if str(args.log_level).upper() == "DEBUG":
            traceback.print_exc()
        message = " ".join(str(err).split())  # one line, whatever the message holds
        print(f"error: {message}", file=sys.stderr, flush=True)
        return EXPECTED_ERROR_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
