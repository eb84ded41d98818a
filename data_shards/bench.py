"""`ehrfm bench prepare` and `ehrfm bench packing`.

prepare: events/s and peak memory (max RSS of a fresh process, so runs never share a heap) of
FHIR -> shards and MEDS -> shards at two input sizes, the second twice the first. MEDS input is the MEDS
folder that the FHIR run converted, so both formats see the same events.
packing: real-token fraction of packed vs padded batches over the pretraining split at a context length.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from ehrfm.data_shards.config import PrepareConfig
from ehrfm.data_shards.prepare import prepare
src, out, fmt = sys.argv[1:4]
t = time.perf_counter()
m = prepare(Path(src), Path(out), PrepareConfig(format=fmt, tasks=["demo"]), progress=False)
seconds = time.perf_counter() - t
print(json.dumps({"events": m["counts"]["events_in"], "patients": m["counts"]["patients_total"],
                  "tokens": m["counts"]["tokens_total"], "seconds": seconds,
                  "events_per_s": m["counts"]["events_in"] / seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run_child(src: Path, out: Path, fmt: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), fmt], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"prepare benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="ehrfm bench prepare", description=__doc__)
    parser.add_argument("--patients", type=int, default=250, help="smaller input size; the larger is twice this")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--age", default="50-90")
    parser.add_argument("--fhir", type=Path, default=None, help="use this folder of bundles instead of Synthea")
    args = parser.parse_args(argv)
    from .synthea import generate_cohort

    sizes = [args.patients, 2 * args.patients]
    source = args.fhir or generate_cohort(sizes[-1], seed=args.seed, age=args.age)
    bundles = sorted(source.glob("*.json"))
    results = {"source": str(source), "runs": []}
    with tempfile.TemporaryDirectory(prefix="ehrfm-bench-") as tmp:
        tmp = Path(tmp)
        for n in sizes:
            subset = tmp / f"fhir-{n}"
            subset.mkdir()
            for path in bundles[:n]:
                os.symlink(path.resolve(), subset / path.name)
            fhir_run = _run_child(subset, tmp / f"out-fhir-{n}", "fhir")
            meds_run = _run_child(tmp / f"out-fhir-{n}" / "events", tmp / f"out-meds-{n}", "meds")
            results["runs"].append({"bundles": n, "fhir": fhir_run, "meds": meds_run})
            shutil.rmtree(tmp / f"out-meds-{n}")
    small, large = results["runs"]
    results["peak_rss_ratio_when_input_doubles"] = {
        fmt: round(large[fmt]["peak_rss_mb"] / small[fmt]["peak_rss_mb"], 3) for fmt in ("fhir", "meds")
    }
    return results


def run_packing(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="ehrfm bench packing")
    parser.add_argument("--data", type=Path, required=True, help="a prepared folder")
    parser.add_argument("--split", default="pretrain")
    parser.add_argument("--context-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--long-sequences", choices=["truncate", "split"], default="truncate")
    args = parser.parse_args(argv)
    from .packing_report import packing_report

    return packing_report(args.data, args.split, args.context_length, args.batch_size, args.long_sequences)
