"""A real two-node SLURM cluster (Debian's Slurm 22.05 on loopback) for the launch tests.

The suite skips only when the cluster cannot be brought up here (not root, apt or daemons unavailable), and
says so loudly in the terminal summary; when it runs, the summary shows the bring-up and job timings.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

# the testbed installs Debian packages and edits /etc/hosts: a test helper, never part of the installed package
_spec = importlib.util.spec_from_file_location("slurm_testbed", Path(__file__).with_name("slurm_testbed.py"))
_testbed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_testbed)
SlurmTestbed, TestbedUnavailable = _testbed.SlurmTestbed, _testbed.TestbedUnavailable

_REPORT: dict = {}


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    testbed = SlurmTestbed(nodes=2, workdir=tmp_path_factory.mktemp("slurm"))
    try:
        testbed.start()
    except TestbedUnavailable as err:
        testbed.stop()
        _REPORT["skipped"] = str(err)
        pytest.skip(f"SLURM TESTBED UNAVAILABLE, SLURM TESTS NOT RUN: {err}")
    _REPORT["timings"] = testbed.timings
    _REPORT["jobs"] = []
    yield testbed
    testbed.stop()


@pytest.fixture(scope="session")
def slurm_data(tmp_path_factory) -> Path:
    """A prepared MEDS corpus big enough for 2 ranks in every split."""
    from ehrfm.data_shards.config import PrepareConfig
    from ehrfm.data_shards.prepare import prepare

    root = tmp_path_factory.mktemp("slurm-data")
    exe = Path(sys.executable).with_name("build_sample_MEDS_dataset")
    subprocess.run(
        [str(exe), f"output_dir={root / 'meds'}", "N_subjects=300", "seed=5"], check=True, capture_output=True
    )
    prepare(root / "meds", root / "prepared", PrepareConfig(tasks=[]), progress=False)
    return root / "prepared"


@pytest.fixture(scope="session")
def record_job():
    """``record_job(name, seconds, detail)``: a line in the terminal summary."""
    return lambda name, seconds, detail: _REPORT.setdefault("jobs", []).append((name, seconds, detail))


def pytest_terminal_summary(terminalreporter):
    if not _REPORT:
        return
    terminalreporter.section("SLURM testbed")
    if "skipped" in _REPORT:
        terminalreporter.write_line(f"!!! SLURM tests did NOT run: {_REPORT['skipped']}", red=True, bold=True)
        return
    t = _REPORT["timings"]
    terminalreporter.write_line(
        f"real Slurm 22.05, 2 nodes (n1, n2) on loopback: install {t.get('install_s', 0):.1f} s, "
        f"bring-up {t.get('bring_up_s', 0):.1f} s"
    )
    for name, seconds, detail in _REPORT.get("jobs", []):
        terminalreporter.write_line(f"  {name}: {seconds:.1f} s ({detail})")
