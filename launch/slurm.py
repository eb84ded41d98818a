"""Render and submit the multi-node pretraining sbatch script (``ehrfm launch slurm``).

The template (templates/pretrain.sbatch) holds no user names, hosts or paths: everything site-specific comes
from the command line. Rendering is deterministic (no timestamps), so a dry run can be reviewed and
snapshot-tested.
"""

from __future__ import annotations

import dataclasses
import shlex
import string
import subprocess
import sys
from importlib import resources
from pathlib import Path

DEFAULT_SIGNAL_SECONDS = 300


@dataclasses.dataclass
class SlurmJob:
    pretrain_args: list[str] = dataclasses.field(default_factory=list)  # `ehrfm pretrain` arguments (after --)
    nodes: int = 1
    gpus_per_node: int = dataclasses.field(default=0, metadata={"help": "0 = CPU nodes"})
    procs_per_node: int | None = None  # default: gpus_per_node, or 1 on CPU nodes
    cpus_per_task: int = 8
    partition: str | None = None
    account: str | None = None
    time: str | None = dataclasses.field(default=None, metadata={"help": "time limit, e.g. 2-00:00:00"})
    job_name: str = "ehrfm-pretrain"
    signal_seconds: int = dataclasses.field(
        default=DEFAULT_SIGNAL_SECONDS,
        metadata={"help": "SIGUSR1 this long before the time limit (checkpoint, requeue)"},
    )
    max_restarts: int = dataclasses.field(default=3, metadata={"help": "requeues allowed after preemption"})
    master_port: int | None = None  # default: derived from the job id on the cluster
    setup: str | None = None  # shell line(s) that make `ehrfm` available, e.g. "source .venv/bin/activate"
    extra_sbatch: list[str] = dataclasses.field(default_factory=list)

    @property
    def run_dir(self) -> str:
        """The ``--out`` of the pretraining command: checkpoints, logs and the preemption flag live there."""
        out = _flag_value(self.pretrain_args, "--out")
        if out is None:
            raise ValueError("the pretraining arguments need --out RUN (the run folder the job resumes from)")
        return out


def default_setup() -> str:
    """Activate the Python environment this command runs in (the same `ehrfm` on every node)."""
    activate = Path(sys.prefix) / "bin" / "activate"
    if activate.exists():
        return f"source {shlex.quote(str(activate))}"
    return f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH"


def render(job: SlurmJob) -> str:
    if job.nodes < 1 or job.gpus_per_node < 0:
        raise ValueError("--nodes must be >= 1 and --gpus-per-node >= 0")
    template = string.Template(resources.files("ehrfm.launch").joinpath("templates/pretrain.sbatch").read_text())
    optional = []
    if job.partition:
        optional.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        optional.append(f"#SBATCH --account={job.account}")
    if job.time:
        optional.append(f"#SBATCH --time={job.time}")
    optional += [f"#SBATCH {line}" for line in job.extra_sbatch]
    procs = job.procs_per_node or job.gpus_per_node or 1
    run_dir = job.run_dir
    return template.substitute(
        job_name=job.job_name,
        nodes=job.nodes,
        gpu_line=f"#SBATCH --gpus-per-node={job.gpus_per_node}\n" if job.gpus_per_node else "",
        cpus_per_task=job.cpus_per_task,
        optional_lines="".join(line + "\n" for line in optional),
        signal_seconds=job.signal_seconds,
        log_dir=str(Path(run_dir) / "logs"),
        setup=job.setup if job.setup is not None else default_setup(),
        run_dir=shlex.quote(run_dir),
        max_restarts=job.max_restarts,
        procs_per_node=procs,
        master_port=job.master_port or "$((20000 + SLURM_JOB_ID % 20000))",
        pretrain_args=shlex.join(job.pretrain_args),
    )


def write_script(job: SlurmJob, path: Path | None = None) -> Path:
    """Write the rendered script into RUN/slurm/ (or ``path``) atomically; returns its path. RUN is claimed as a
    run folder of `ehrfm pretrain` first (:func:`ehrfm.outputs.claim_run_dir`): a foreign folder is refused."""
    from ehrfm.outputs import atomic_file, claim_run_dir

    claim_run_dir(Path(job.run_dir), "pretrain", inputs=[_flag_value(job.pretrain_args, "--data")])
    path = Path(path or Path(job.run_dir) / "slurm" / "pretrain.sbatch")
    path.parent.mkdir(parents=True, exist_ok=True)
    (Path(job.run_dir) / "logs").mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(render(job))
        tmp.chmod(0o755)
    return path


def _flag_value(args: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``args`` (``--flag V`` or ``--flag=V``), or None."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def submit(script: Path, env: dict | None = None) -> int:
    """sbatch the script; returns the job id."""
    result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
    return int(result.stdout.strip().split(";")[0])
