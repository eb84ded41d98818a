"""A real two-node SLURM cluster on one machine, all traffic on loopback, for tests and local trials.

Debian's Slurm 22.05 (``munge slurmctld slurmd slurm-client``) is installed with apt if missing (a temporary
``policy-rc.d`` keeps apt from starting daemons; there is no systemd). ``munged`` runs as the munge user;
``slurmctld`` and one ``slurmd -N nX`` per virtual node run as root with a minimal config written to a temp
folder (state, spool, pid and log files there too). Nodes are named n1, n2 and resolve to 127.0.0.1 through
lines added to /etc/hosts and removed at teardown. Ports are picked free so parallel runs do not collide.

    with SlurmTestbed(nodes=2) as cluster:
        job = cluster.sbatch(script_path)
        cluster.wait(job)

Daemons started here are stopped here, by their pid files. Requires root.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
HOSTS_MARK = "# ehrfm-slurm-testbed"


class TestbedUnavailable(RuntimeError):
    """SLURM cannot be brought up here (not root, apt or daemons unavailable); the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> float:
    """Install the Debian packages if ``slurmctld`` is missing; returns the seconds it took (0 if present)."""
    if shutil.which("slurmctld") and shutil.which("sbatch") and shutil.which("munged"):
        return 0.0
    if os.geteuid() != 0:
        raise TestbedUnavailable("installing Slurm needs root (apt-get)")
    if not shutil.which("apt-get"):
        raise TestbedUnavailable("no apt-get on this machine")
    started = time.time()
    policy = Path("/usr/sbin/policy-rc.d")
    had_policy = policy.exists()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if not had_policy:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        result = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise TestbedUnavailable(f"apt-get failed: {err}") from None
    finally:
        if not had_policy:
            policy.unlink(missing_ok=True)
    if result.returncode != 0:
        raise TestbedUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr[-2000:]}")
    return time.time() - started


def _node_resources() -> tuple[int, int]:
    """(CPUs, RealMemory MB) as slurmd -C reports them."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return int(fields["CPUs"]), int(fields["RealMemory"])


class SlurmTestbed:
    """Context manager: a running N-node cluster; ``env`` holds SLURM_CONF for client commands."""

    def __init__(self, nodes: int = 2, workdir: Path | None = None) -> None:
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="ehrfm-slurm-"))
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.timings: dict[str, float] = {}
        self._pidfiles: list[Path] = []
        self._hosts_added = False

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> SlurmTestbed:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if os.geteuid() != 0:
            raise TestbedUnavailable("the SLURM testbed runs its daemons as root")
        self.timings["install_s"] = ensure_installed()
        started = time.time()
        self._write_config()
        self._add_hosts()
        self._start_munge()
        self._run_daemon(["slurmctld", "-f", str(self.conf)], self.dir / "slurmctld.pid")
        for node in self.nodes:
            self._run_daemon(["slurmd", "-f", str(self.conf), "-N", node], self.dir / f"slurmd-{node}.pid")
        self._wait_idle(timeout=60)
        self.timings["bring_up_s"] = time.time() - started

    def stop(self) -> None:
        for pidfile in reversed(self._pidfiles):
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
        deadline = time.time() + 10
        for pidfile in self._pidfiles:
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
        self._pidfiles.clear()
        self._remove_hosts()

    # -- setup pieces ------------------------------------------------------------------------------
    def _write_config(self) -> None:
        cpus, memory = _node_resources()
        hostname = socket.gethostname()
        (self.dir / "state").mkdir(exist_ok=True)
        ctld_port = free_port()
        lines = [
            "ClusterName=ehrfmtest",
            f"SlurmctldHost={hostname}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge",
            # A requeued job waits cred_expire + 1 s before it may start again (Slurm's guard against a
            # relaunch racing the cleanup of the killed run; default 120 s). A short real wait keeps the
            # preemption test quick without forcing an early start: a requeued job force-started with
            # `StartTime=now` once ended FAILED in CI.
            "AuthInfo=cred_expire=10",
            "CredType=cred/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "SlurmUser=root",
            "SlurmdUser=root",
            "MpiDefault=none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "KillWait=30",
            "MinJobAge=600",
            f"StateSaveLocation={self.dir / 'state'}",
            f"SlurmdSpoolDir={self.dir / 'spool-%n'}",
            f"SlurmctldPidFile={self.dir / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.dir / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.dir / 'slurmd-%n.log'}",
        ]
        per_node_memory = max(1, memory // len(self.nodes))
        for node in self.nodes:
            lines.append(
                f"NodeName={node} NodeHostname={hostname} NodeAddr=127.0.0.1 Port={free_port()} "
                f"CPUs={cpus} RealMemory={per_node_memory} State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _add_hosts(self) -> None:
        hosts = Path("/etc/hosts")
        line = f"127.0.0.1 {' '.join(self.nodes)} {HOSTS_MARK}\n"
        text = hosts.read_text()
        if line not in text:
            hosts.write_text(text + ("" if text.endswith("\n") else "\n") + line)
        self._hosts_added = True

    def _remove_hosts(self) -> None:
        if not self._hosts_added:
            return
        hosts = Path("/etc/hosts")
        kept = [line for line in hosts.read_text().splitlines(keepends=True) if HOSTS_MARK not in line]
        hosts.write_text("".join(kept))
        self._hosts_added = False

    def _start_munge(self) -> None:
        probe = subprocess.run(["munge", "-n"], capture_output=True)
        if probe.returncode == 0:
            return  # a munged is already serving
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/mungekey", "--create"], check=False)
        result = subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], capture_output=True, text=True)
        if result.returncode != 0:
            raise TestbedUnavailable(f"munged did not start: {result.stderr.strip()}")
        self._pidfiles.append(run_dir / "munged.pid")

    def _run_daemon(self, cmd: list[str], pidfile: Path) -> None:
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if result.returncode != 0:
            raise TestbedUnavailable(f"{cmd[0]} did not start: {result.stderr.strip()} (logs in {self.dir})")
        deadline = time.time() + 10
        while not pidfile.exists() and time.time() < deadline:
            time.sleep(0.1)
        self._pidfiles.append(pidfile)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            if states and all(states.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.5)
        raise TestbedUnavailable(f"nodes did not become idle in {timeout} s: {out.stdout.strip()} (logs in {self.dir})")

    # -- client helpers ----------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check)

    def sbatch(self, script: Path, *extra: str) -> int:
        out = self.run("sbatch", "--parsable", *extra, str(script)).stdout.strip()
        return int(out.split(";")[0])

    def job_state(self, job: int) -> str:
        out = self.run("scontrol", "show", "job", str(job), check=False).stdout
        for item in out.split():
            if item.startswith("JobState="):
                return item.split("=", 1)[1]
        return "UNKNOWN"

    def diagnose(self, job: int) -> str:
        """What the controller and the node daemons said about ``job``: for assertion messages."""
        parts = [self.run("scontrol", "show", "job", str(job), check=False).stdout.strip()]
        pattern = re.compile(rf"(JobId={job}\b|job[ _]?{job}\b|StepId={job}\.)", re.IGNORECASE)
        for log in [self.dir / "slurmctld.log", *(self.dir / f"slurmd-{n}.log" for n in self.nodes)]:
            if log.exists():
                lines = [ln for ln in log.read_text(errors="replace").splitlines() if pattern.search(ln)]
                parts.append(f"--- {log.name} ---\n" + "\n".join(lines[-60:]))
        return "\n".join(parts)

    def wait(
        self, job: int, timeout: float = 600, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
    ) -> str:
        deadline = time.time() + timeout
        state = "UNKNOWN"
        while time.time() < deadline:
            state = self.job_state(job)
            if state in done:
                return state
            time.sleep(1.0)
        raise TimeoutError(f"job {job} still {state} after {timeout} s")
