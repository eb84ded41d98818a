"""`ehrfm bench prepare`: the data path at 1x, 10x and 100x a base corpus, FHIR and MEDS side by side.

    ehrfm bench prepare [--fhir DIR | --patients 320 --seed 7 --age 60-90] [--base-patients 10]
                        [--meds-base-patients 40] [--scales 1,10,100] [--jobs 1,2] [--work DIR]

For every format, scale and ``--jobs`` value, `ehrfm prepare` runs in a fresh process (so runs never share a
heap) and reports events/s, wall seconds, peak RSS (the process's and its workers'), the import time of the
process before ``prepare`` starts, and the shards' bytes per token (Arrow files of ``shards/`` / tokens).
Beside the FHIR runs, the rate at which orjson alone parses the same bundle files in one thread (read +
``orjson.loads``, nothing else) is measured in a fresh process too: ``fhir_vs_orjson`` is prepare's events/s
over that parse rate in events/s (the same events).

How the scales are made (no new Synthea run):

* FHIR: the first ``--base-patients`` bundles of the source are the 1x corpus; copy ``r`` of a bundle is its
  bytes with the Patient id replaced by a new UUID (uuid5 of the id and ``r``) everywhere it occurs, i.e. a
  new patient with the same events at the same times. 100x of 10 bundles is ~6 GB of JSON in ``--work``.
* MEDS: the MEDS folder converted from the first ``--meds-base-patients`` bundles is the 1x corpus; copy
  ``r`` of each data shard has ``subject_id XOR (r * 0x9E3779B97F4A7C15 mod 2^63)`` (a bijection, so ids stay
  distinct) and every time shifted by ``r`` days; one shard file per copy, as a hospital's extract would be.

``peak_rss_ratio_100x_over_1x`` (per format, first ``--jobs`` value) is the memory target's measure: a data
path whose memory does not grow with the corpus has a ratio near 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ehrfm.config_flags import comma_ints, comma_list

_PREPARE_CHILD = r"""
import json, resource, sys, time
launched = float(sys.argv[5])
from pathlib import Path
from ehrfm.data_shards.config import PrepareConfig
from ehrfm.data_shards.prepare import prepare
from ehrfm.config import load_config
src, out, fmt, jobs = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
cfg = load_config(PrepareConfig, None, [f"format={fmt}", "tasks=[demo]", *sys.argv[6:]])
started, t = time.time(), time.perf_counter()
m = prepare(Path(src), out, cfg, progress=False, jobs=jobs)
seconds = time.perf_counter() - t
shard_bytes = sum(p.stat().st_size for p in (out / "shards").rglob("*.arrow"))
tokens = m["counts"]["tokens_total"]
print(json.dumps({
    "jobs": jobs, "events": m["counts"]["events_in"], "patients": m["counts"]["patients_total"], "tokens": tokens,
    "seconds": round(seconds, 3), "events_per_s": round(m["counts"]["events_in"] / seconds),
    "import_s": round(started - launched, 3),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    "peak_rss_workers_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    "shard_bytes": shard_bytes, "bytes_per_token": round(shard_bytes / max(tokens, 1), 2),
}))
"""

_ORJSON_CHILD = r"""
import json, sys, time
from pathlib import Path
import orjson
files = sorted(Path(sys.argv[1]).glob("*.json"))
t = time.perf_counter()
size = 0
for path in files:
    data = path.read_bytes()
    size += len(data)
    orjson.loads(data)
seconds = time.perf_counter() - t
print(json.dumps({"files": len(files), "bytes": size, "seconds": round(seconds, 3),
                  "mb_per_s": round(size / seconds / 1e6, 1)}))
"""

REPLICA_XOR = 0x9E3779B97F4A7C15 % (1 << 63)


def _child(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_prepare(src: Path, out: Path, fmt: str, jobs: int, overrides: list[str]) -> dict:
    result = _child(_PREPARE_CHILD, str(src), str(out), fmt, str(jobs), repr(time.time()), *overrides)
    shutil.rmtree(out)
    return result


def _patient_id(bundle: Path) -> str:
    import orjson

    for entry in orjson.loads(bundle.read_bytes()).get("entry") or ():
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "Patient":
            return resource["id"]
    raise ValueError(f"{bundle}: no Patient resource")


def replicate_fhir(bundles: list[Path], copies: int, out: Path) -> Path:
    """``copies`` x ``bundles`` in ``out``: copy 0 links the originals, copy r > 0 renames the patient."""
    out.mkdir(parents=True)
    for bundle in bundles:
        patient = _patient_id(bundle)
        data = bundle.read_bytes() if copies > 1 else b""
        os.symlink(bundle.resolve(), out / bundle.name)
        for r in range(1, copies):
            new = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{patient}/{r}"))
            (out / f"{bundle.stem}-r{r}.json").write_bytes(data.replace(patient.encode(), new.encode()))
    return out


def replicate_meds(base: Path, copies: int, out: Path) -> Path:
    """``copies`` x the MEDS folder ``base`` (data shards only) in ``out`` (see the module docstring)."""
    import polars as pl
    import pyarrow.parquet as pq

    from .readers.meds import list_meds_shards

    (out / "data").mkdir(parents=True)
    for i, shard in enumerate(list_meds_shards(base)):
        table = pq.read_table(shard)
        for r in range(copies):
            frame = pl.from_arrow(table)
            if r:
                frame = frame.with_columns(
                    pl.col("subject_id").xor(pl.lit(r * REPLICA_XOR % (1 << 63), pl.Int64)),
                    pl.col("time") + pl.duration(days=r),
                )
            pq.write_table(frame.to_arrow().cast(table.schema), out / "data" / f"{i}-{r:04d}.parquet")
    return out


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(
        prog="ehrfm bench prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--fhir", type=Path, default=None, help="folder of bundles (default: a cached Synthea cohort)")
    p.add_argument("--patients", type=int, default=320, help="Synthea cohort size when --fhir is not given")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--age", default="60-90")
    p.add_argument("--base-patients", type=int, default=10, help="bundles of the 1x FHIR corpus")
    p.add_argument("--meds-base-patients", type=int, default=40, help="bundles converted into the 1x MEDS corpus")
    p.add_argument("--scales", type=comma_ints, default=[1, 10, 100])
    p.add_argument(
        "--jobs",
        type=comma_ints,
        default=[1, 2],
        help="`ehrfm prepare --jobs` values run at each scale",
    )
    p.add_argument("--bundles-per-shard", type=int, default=25, help="shards.fhir_bundles_per_shard of the runs")
    p.add_argument("--formats", default="fhir,meds")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary folder)")
    args = p.parse_args(argv)
    from .readers.fhir import list_fhir_files
    from .synthea import generate_cohort

    source = args.fhir or generate_cohort(args.patients, seed=args.seed, age=args.age)
    bundles, _ = list_fhir_files(source)
    overrides = [f"shards.fhir_bundles_per_shard={args.bundles_per_shard}"]
    formats = comma_list(args.formats)
    results: dict = {"source": str(source), "scales": args.scales, "jobs": args.jobs, "overrides": overrides}
    with tempfile.TemporaryDirectory(prefix="ehrfm-bench-prepare-", dir=args.work) as tmp:
        tmp = Path(tmp)
        if "fhir" in formats:
            results["fhir"] = []
            for scale in args.scales:
                corpus = replicate_fhir(bundles[: args.base_patients], scale, tmp / f"fhir-{scale}x")
                parse = _child(_ORJSON_CHILD, str(corpus))
                for jobs in args.jobs:
                    run_ = _run_prepare(corpus, tmp / "out", "fhir", jobs, overrides)
                    run_["orjson_parse"] = parse
                    run_["orjson_events_per_s"] = round(run_["events"] / parse["seconds"])
                    run_["fhir_vs_orjson"] = round(run_["events_per_s"] / run_["orjson_events_per_s"], 3)
                    results["fhir"].append({"scale": scale, **run_})
                    print(json.dumps({"fhir": results["fhir"][-1]}), file=sys.stderr)
                shutil.rmtree(corpus)
        if "meds" in formats:
            results["meds"] = []
            base = tmp / "meds-base"
            converted = replicate_fhir(bundles[: args.meds_base_patients], 1, tmp / "meds-base-fhir")
            _child(_PREPARE_CHILD, str(converted), str(base), "fhir", "1", repr(time.time()), *overrides)
            for scale in args.scales:
                corpus = replicate_meds(base / "events", scale, tmp / f"meds-{scale}x")
                for jobs in args.jobs:
                    run_ = _run_prepare(corpus, tmp / "out", "meds", jobs, [])
                    results["meds"].append({"scale": scale, **run_})
                    print(json.dumps({"meds": results["meds"][-1]}), file=sys.stderr)
                shutil.rmtree(corpus)
    for fmt in formats:
        runs = [r for r in results[fmt] if r["jobs"] == args.jobs[0]]
        by_scale = {r["scale"]: r for r in runs}
        lo, hi = min(by_scale), max(by_scale)
        results.setdefault("summary", {})[fmt] = {
            f"peak_rss_ratio_{hi}x_over_{lo}x": round(by_scale[hi]["peak_rss_mb"] / by_scale[lo]["peak_rss_mb"], 3),
            f"events_per_s_ratio_{hi}x_over_{lo}x": round(
                by_scale[hi]["events_per_s"] / by_scale[lo]["events_per_s"], 3
            ),
            "speedup_of_jobs": {
                f"{r['scale']}x_jobs{r['jobs']}": round(r["events_per_s"] / by_scale[r["scale"]]["events_per_s"], 3)
                for r in results[fmt]
                if r["jobs"] != args.jobs[0]
            },
        }
    return results
