"""`ehrfm launch slurm|local`: run `ehrfm pretrain` on a SLURM cluster or on this machine via torchrun."""

from __future__ import annotations

import argparse
from pathlib import Path


def _pretrain_args(rest: list[str]) -> list[str]:
    """The arguments of `ehrfm pretrain` after ``--``; a leading ``pretrain`` (the subcommand's name) is accepted."""
    args = list(rest)
    if args and args[0] == "--":
        args = args[1:]
    if args and args[0] == "pretrain":
        args = args[1:]
    if not args or not args[0].startswith("-"):
        found = f" (found {args[0]!r})" if args else ""
        raise SystemExit(
            "ehrfm launch: give the pretraining arguments after --, e.g. "
            f"-- --data D --model llama --out RUN, or -- pretrain --data D ...{found}"
        )
    return args


def add_parser(subparsers) -> None:
    from ..config_flags import add_config_arguments
    from .slurm import SlurmJob

    p = subparsers.add_parser("launch", help="run pretraining on SLURM or locally (torchrun)", description=__doc__)
    sub = p.add_subparsers(dest="launcher", required=True)
    s = sub.add_parser("slurm", help="render (and submit) a multi-node sbatch script")
    s.add_argument("--sbatch", action="append", default=[], help="extra #SBATCH option, repeatable")
    add_config_arguments(s, SlurmJob, by_hand=("pretrain_args", "extra_sbatch"))
    s.add_argument("--script", type=Path, default=None, help="where to write the script (default RUN/slurm/)")
    mode = s.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    mode.add_argument("--submit", action="store_true", help="write the script and sbatch it")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=run_slurm)
    loc = sub.add_parser("local", help="torchrun on this machine")
    loc.add_argument("--nproc", type=int, default=1)
    loc.add_argument("--master-port", type=int, default=None)
    loc.add_argument("rest", nargs=argparse.REMAINDER)
    loc.set_defaults(func=run_local_cli)


def run_slurm(args: argparse.Namespace) -> int:
    import dataclasses

    from ..config import load_config
    from ..config_flags import config_overrides
    from .slurm import SlurmJob, render, submit, write_script

    job = dataclasses.replace(
        load_config(SlurmJob, None, config_overrides(args)),
        pretrain_args=_pretrain_args(args.rest),
        extra_sbatch=list(args.sbatch),
    )
    if args.dry_run:
        print(render(job), end="")
        return 0
    script = write_script(job, args.script)
    job_id = submit(script)
    print(job_id)
    return 0


def run_local_cli(args: argparse.Namespace) -> int:
    from .local import run_local

    return run_local(args.nproc, _pretrain_args(args.rest), args.master_port)
