"""``ehrfm launch local --nproc N -- <ehrfm pretrain args>``: the SLURM path on one machine, through torchrun.

torchrun forwards SIGTERM to the workers, which checkpoint and exit with code 75; re-running the same command
resumes. ``--no-python`` runs the `ehrfm` executable directly, so the checkout never lands on sys.path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def torchrun_command(nproc: int, pretrain_args: list[str], master_port: int | None = None) -> list[str]:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    ehrfm = shutil.which("ehrfm") or str(Path(sys.executable).with_name("ehrfm"))
    cmd = [torchrun, "--nnodes=1", f"--nproc-per-node={nproc}"]
    cmd += [f"--master-port={master_port}", "--master-addr=127.0.0.1"] if master_port else ["--standalone"]
    return cmd + ["--no-python", ehrfm, "pretrain", *pretrain_args]


def run_local(nproc: int, pretrain_args: list[str], master_port: int | None = None) -> int:
    return subprocess.call(torchrun_command(nproc, pretrain_args, master_port))
