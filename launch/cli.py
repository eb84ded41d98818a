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
        raise SystemExit("ehrfm launch: give the pretraining arguments after --, e.g. "
                         f"-- --data D --model llama --out RUN, or -- pretrain --data D ...{found}")
    return args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("launch", help="run pretraining on SLURM or locally (torchrun)", description=__doc__)
    sub = p.add_subparsers(dest="launcher", required=True)
    s = sub.add_parser("slurm", help="render (and submit) a multi-node sbatch script")
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--gpus-per-node", type=int, default=0, help="0 = CPU nodes")
    s.add_argument("--procs-per-node", type=int, default=None, help="default: gpus per node (1 on CPU nodes)")
    s.add_argument("--cpus-per-task", type=int, default=8)
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--time", help="time limit, e.g. 2-00:00:00")
    s.add_argument("--job-name", default="ehrfm-pretrain")
    s.add_argument("--signal-seconds", type=int, default=300, help="USR1 this long before the time limit")
    s.add_argument("--max-restarts", type=int, default=3, help="requeues allowed after preemption")
    s.add_argument("--master-port", type=int, default=None)
    s.add_argument("--setup", default=None, help="shell line making `ehrfm` available (default: this venv)")
    s.add_argument("--sbatch", action="append", default=[], help="extra #SBATCH option, repeatable")
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
    from .slurm import SlurmJob, render, submit, write_script

    job = SlurmJob(
        pretrain_args=_pretrain_args(args.rest), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        procs_per_node=args.procs_per_node, cpus_per_task=args.cpus_per_task, partition=args.partition,
        account=args.account, time=args.time, job_name=args.job_name, signal_seconds=args.signal_seconds,
        max_restarts=args.max_restarts, master_port=args.master_port, setup=args.setup, extra_sbatch=args.sbatch,
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
