"""`ehrfm prepare`: MEDS or FHIR input -> tokenized, sharded, versioned corpus (see :mod:`.shards`).

Two streaming passes over the (MEDS-shaped) input, one shard in memory at a time:

1. clean, split, and learn the vocabulary on the pretraining split: code counts and a seeded reservoir of
   numeric values per code for the quantile bins (pretraining split only, so no statistics leak from the
   finetune/test patients);
2. clean again, tokenize into patient sequences, write them to the split's shards, and compute task labels.

FHIR input is first converted into a MEDS folder (kept as ``events/`` in the output) so both formats share
one code path.

The data end (censoring of task labels) is derived from the per-subject last event times of pass 1 by
:func:`derive_data_end`, or given as ``cleaning.data_end``; manifest.json records it with its rule.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from ..config import save_config, to_dict
from ..outputs import atomic_output, set_fingerprint
from . import aces, meds_dataset, passes
from . import splits as splits_mod
from .cleaning import Tally
from .config import CleaningConfig, PrepareConfig, parse_time
from .errors import DataError
from .parallel import ShardPool
from .readers import fhir
from .readers.meds import list_meds_shards, read_subject_splits
from .reference_ppl import reference_perplexities
from .schema import SPECIAL_TOKENS, US_PER_DAY
from .shards import FORMAT_VERSION, SplitShardWriter, subject_splits, write_json_atomic
from .tasks import TaskConfig, TaskTally, external_task_names, load_tasks, read_external_labels
from .vocab import ValueReservoir, Vocabulary

log = logging.getLogger("ehrfm.prepare")


def source_fingerprint(files: list[Path], root: Path, digests: dict[Path, bytes] | None = None) -> str:
    """Content hash of the input files (relative path + bytes), so a corpus records exactly what it saw.
    ``digests`` holds :func:`fhir.file_digest` of files already read (the FHIR conversion reads each once)."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode())
        if digests is not None and path in digests:
            digest.update(digests[path])
            continue
        file_hash = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                file_hash.update(block)
        digest.update(file_hash.digest())
    return digest.hexdigest()[:24]


def convert_fhir_to_meds(
    input_dir: Path,
    meds_root: Path,
    patients_per_shard: int,
    progress: bool,
    pool: ShardPool,
    digests: dict[Path, bytes] | None = None,
) -> fhir.FhirTally:
    """FHIR bundles / NDJSON -> MEDS folder (``data/<i>.parquet``, whole patients per shard). Groups of
    ``patients_per_shard`` bundle files are converted by the processes of ``pool``; shards, tally and the owner
    check are folded in group order, so the output is the same for any number of processes. ``digests``
    receives each bundle file's content hash (for :func:`source_fingerprint`)."""
    bundles, ndjson = fhir.list_fhir_files(input_dir)
    data_dir = meds_root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    tally = fhir.FhirTally()
    owners: dict = {}  # subject id -> the bundle file holding it: a patient split over two files is an error
    shard = 0
    groups = [
        fhir.BundleGroup(bundles[start : start + patients_per_shard], data_dir / f"_group-{start}.parquet")
        for start in range(0, len(bundles), patients_per_shard)
    ]
    results = pool.map(fhir.convert_bundle_group, groups)
    for group, result in tqdm(
        zip(groups, results), total=len(groups), desc="fhir bundles", unit="shard", disable=not progress
    ):
        for sid, path in result.owners.items():
            fhir.claim_patient(owners, sid, path, result.patient_ids)
        tally.merge(result.tally)
        if digests is not None:
            digests.update(result.digests)
        if result.events:
            group.out.rename(data_dir / f"{shard}.parquet")
            shard += 1
    if ndjson:
        # Resources of one patient are spread over files: bucket events by subject, then merge each bucket.
        parts_dir = meds_root / "_parts"
        parts_dir.mkdir()
        n_buckets = max(1, sum(p.stat().st_size for p in ndjson) // (patients_per_shard * 4_000_000) + 1)
        part = 0
        for path in tqdm(ndjson, desc="fhir ndjson", unit="file", disable=not progress):
            for frame in fhir.iter_ndjson_events(path, tally, bundle_owners=owners):
                frame = frame.with_columns(_bucket=(pl.col("subject_id") % n_buckets))
                for (bucket,), group in frame.partition_by("_bucket", as_dict=True).items():
                    group.drop("_bucket").write_parquet(parts_dir / f"{bucket}-{part}.parquet")
                part += 1
        for bucket in range(n_buckets):
            files = sorted(parts_dir.glob(f"{bucket}-*.parquet"))
            if files:
                meds_dataset.write_shard(pl.concat([pl.read_parquet(f) for f in files]), data_dir / f"{shard}.parquet")
                shard += 1
        shutil.rmtree(parts_dir)
    if shard == 0:
        raise DataError(f"{input_dir}: the FHIR files contained no clinical events")
    return tally


DATA_END_RULE = (
    "data_end = the largest per-subject last event time that is at most cleaning.data_end_margin_days after "
    "the 99th percentile of the per-subject last event times (the order statistic at index floor(0.99 * (n - 1)) "
    "of the n sorted last times), unless cleaning.data_end gives it; events after it are kept and counted "
    "(cleaning notes events_after_data_end)"
)


def _from_epoch_us(value: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=int(value))


def derive_data_end(last_times_us: np.ndarray, cfg: CleaningConfig) -> tuple[dt.datetime, dict]:
    """(data end, its rule for the manifest) from the per-subject last event times (epoch microseconds).

    With few subjects the percentile is the second-largest last time, so the data end is the maximum unless
    it lies more than the margin beyond the others. Pure function of the data and config (deterministic).
    """
    last = np.sort(np.asarray(last_times_us, dtype=np.int64))
    n = len(last)
    p99 = int(last[(99 * (n - 1)) // 100])
    margin_us = int(round(cfg.data_end_margin_days * US_PER_DAY))
    derived = int(last[np.searchsorted(last, p99 + margin_us, side="right") - 1])
    if cfg.data_end is not None:
        data_end, source = parse_time(cfg.data_end, "cleaning.data_end"), "config (cleaning.data_end)"
    else:
        data_end, source = _from_epoch_us(derived), "derived"
    end_us = int((data_end - dt.datetime(1970, 1, 1)) // dt.timedelta(microseconds=1))
    rule = {
        "rule": DATA_END_RULE,
        "source": source,
        "subjects": n,
        "last_time_p99": str(_from_epoch_us(p99)),
        "margin_days": cfg.data_end_margin_days,
        "derived": str(_from_epoch_us(derived)),
        "latest_last_time": str(_from_epoch_us(int(last[-1]))),
        "subjects_ending_after_data_end": int(n - np.searchsorted(last, end_us, side="right")),
    }
    return data_end, rule


def prepare(
    input_dir: Path,
    out: Path,
    cfg: PrepareConfig,
    *,
    progress: bool = True,
    overwrite: bool = False,
    config_file: Path | None = None,
    jobs: int = 1,
) -> dict:
    """Run both passes; returns the manifest. ``out`` appears only when everything succeeded, and replaces an
    existing folder only if `ehrfm prepare` wrote it (or ``overwrite``; never an input: :mod:`ehrfm.outputs`)."""
    started = time.time()
    input_dir, out = Path(input_dir), Path(out)
    if not input_dir.exists():
        raise DataError(f"{input_dir}: input folder does not exist")
    tasks = load_tasks(cfg.tasks)
    task_tokens = list(dict.fromkeys([t.token for t in tasks if t.token] + list(cfg.vocab.extra_task_tokens)))
    aces_tasks = aces.resolve_aces_tasks(cfg.aces_tasks)
    inputs = [input_dir, config_file, *_task_files(cfg.tasks), *cfg.external_labels, *(f for _, f in aces_tasks)]
    with atomic_output(out, "prepare", inputs=inputs, overwrite=overwrite) as tmp:
        with ShardPool(jobs) as pool:
            manifest = _prepare_into(input_dir, tmp, cfg, tasks, task_tokens, progress, pool, aces_tasks)
        manifest["reference_perplexity"] = reference_perplexities(tmp, manifest)
        manifest["seconds"] = round(time.time() - started, 2)
        write_json_atomic(tmp / "manifest.json", manifest)
        set_fingerprint(tmp, manifest["source"]["fingerprint"])
    log.info(
        "prepared %s: %d patients, %d tokens, vocab %d, %.1f s",
        out,
        manifest["counts"]["patients_total"],
        manifest["counts"]["tokens_total"],
        manifest["vocab_size"],
        manifest["seconds"],
    )
    return manifest


def convert_fhir(
    input_dir: Path,
    out: Path,
    cfg: PrepareConfig,
    *,
    progress: bool = True,
    overwrite: bool = False,
    config_file: Path | None = None,
    jobs: int = 1,
) -> dict:
    """``ehrfm prepare --format fhir --meds-only``: FHIR -> a MEDS dataset at ``out`` (data + metadata, validated
    with the ``meds`` schemas; :mod:`.meds_dataset`) and nothing else. The subject splits are the ones a full
    prepare with ``cfg.splits`` would use. Returns the summary also written to ``out/conversion.json``."""
    started = time.time()
    input_dir, out = Path(input_dir), Path(out)
    if not input_dir.exists():
        raise DataError(f"{input_dir}: input folder does not exist")
    if cfg.format != "fhir":
        raise DataError("--meds-only converts FHIR input: set --format fhir (MEDS input is a MEDS dataset already)")
    with atomic_output(out, "prepare", inputs=[input_dir, config_file], overwrite=overwrite) as tmp:
        bundles, ndjson = fhir.list_fhir_files(input_dir)
        digests: dict[Path, bytes] = {}
        with ShardPool(jobs) as pool:
            tally = convert_fhir_to_meds(input_dir, tmp, cfg.shards.fhir_bundles_per_shard, progress, pool, digests)
        fingerprint = source_fingerprint(bundles + ndjson, input_dir, digests)
        subjects = pl.concat([pl.read_parquet(path, columns=["subject_id"]).unique() for path in list_meds_shards(tmp)])
        meds_dataset.write_metadata(
            tmp,
            source=input_dir,
            dataset_version=fingerprint,
            subject_splits=splits_mod.assign_splits(subjects, cfg.splits),
            code_names=tally.code_names,
        )
        counts = meds_dataset.validate(tmp)
        summary = {
            "source": {"path": str(input_dir.resolve()), "fingerprint": fingerprint},
            "meds": counts,
            "fhir": tally.to_dict(),
            "seconds": round(time.time() - started, 2),
        }
        write_json_atomic(tmp / "conversion.json", summary)
        set_fingerprint(tmp, fingerprint)
    log.info("converted %s -> MEDS %s: %d subjects, %.1f s", input_dir, out, counts["subjects"], summary["seconds"])
    return summary


def _task_files(specs: list[str]) -> list[Path]:
    """The task specs that are files (the others name shipped configs): inputs the output may not contain."""
    return [Path(spec) for spec in specs if Path(spec).is_file()]


def _prepare_into(
    input_dir: Path, tmp: Path, cfg: PrepareConfig, tasks, task_tokens, progress: bool, pool: ShardPool, aces_tasks=()
) -> dict:
    external_names = external_task_names(cfg.external_labels, tasks)  # ConfigError before any work
    taken = {t.name for t in tasks} | set(external_names)
    clash = [name for name, _ in aces_tasks if name in taken]
    if clash:
        raise DataError(f"aces_tasks: task name(s) {clash} already used by tasks or external_labels")
    reserved = (*SPECIAL_TOKENS, *task_tokens)  # input codes spelled like these are escaped (cleaning.py)
    fhir_tally = None
    digests: dict[Path, bytes] = {}
    if cfg.format == "fhir":
        bundles, ndjson = fhir.list_fhir_files(input_dir)
        input_files = bundles + ndjson
        meds_root = tmp / "events"
        fhir_tally = convert_fhir_to_meds(
            input_dir, meds_root, cfg.shards.fhir_bundles_per_shard, progress, pool, digests
        )
    else:
        meds_root = input_dir
        input_files = list_meds_shards(input_dir)
    fingerprint = source_fingerprint(input_files, input_dir if input_dir.is_dir() else input_dir.parent, digests)
    meds_splits = read_subject_splits(meds_root)
    shard_paths = list_meds_shards(meds_root)
    cache_dir = tmp / "_cleaned"  # pass 1's cleaned events, read by pass 2 (inside the output: atomic)
    cache_dir.mkdir()
    context = passes.PassContext(
        cfg=cfg, meds_root=meds_root, reserved=reserved, meds_splits=meds_splits, cache_dir=cache_dir
    )

    # Pass 1: vocabulary and value bins from the pretraining split.
    counts: Counter = Counter()
    reservoir = ValueReservoir(cfg.vocab.max_values_per_code, cfg.splits.seed)
    last_times: list[np.ndarray] = []
    tally = Tally()
    max_span_s = 0
    owners: dict[int, Path] = {}  # subject id -> its MEDS shard: a subject in two shards is an error
    results = pool.map(passes.vocab_pass, shard_paths, context)
    for result in tqdm(results, total=len(shard_paths), desc="pass 1 vocab", unit="shard", disable=not progress):
        for sid in result.subjects:
            first = owners.setdefault(sid, result.path)
            if first != result.path:
                raise DataError(
                    f"subject_id {sid} appears in both {first} and {result.path}; MEDS shards must hold whole subjects"
                )
        tally.merge(result.tally)
        last_times.append(result.last_times_us)
        max_span_s = max(max_span_s, result.max_span_s)
        for code, count in result.code_counts:
            counts[code] += count
        reservoir.add_grouped(result.values)
    del owners
    if tally.subjects_out == 0:
        raise DataError(
            f"{input_dir}: no patient has any usable event after cleaning ({tally.to_dict()['dropped_rows']})"
        )
    data_end, data_end_rule = derive_data_end(np.concatenate(last_times), cfg.cleaning)
    edges = reservoir.edges(cfg.vocab.num_bins)
    token_counts = Counter()
    for code, count in counts.items():
        token_counts[code] += count
        if code in edges:
            for k in range(1, len(edges[code]) + 2):
                token_counts[f"{code}//Q{k}"] += count
    vocab = Vocabulary.build(dict(token_counts), edges, min_frequency=cfg.vocab.min_frequency, task_tokens=task_tokens)
    vocab.save(tmp / "tokenizer")
    save_config(cfg, tmp / "config.yaml")

    # Pass 2: sequences and labels.
    writers = {
        s: SplitShardWriter(tmp, s, cfg.shards.patients_per_shard, len(vocab), max_span_s) for s in splits_mod.SPLITS
    }
    labels: dict[tuple[str, str], list[pl.DataFrame]] = {}
    task_tallies = {t.name: TaskTally() for t in tasks}
    split_counts: Counter = Counter()
    split_parts: list[pl.DataFrame] = []  # subject_id -> split, per input shard
    unk_tokens = 0
    context = dataclasses.replace(context, vocab=vocab, data_end=data_end, tasks=tuple(tasks))
    results = pool.map(passes.token_pass, shard_paths, context)
    for result in tqdm(results, total=len(shard_paths), desc="pass 2 tokens", unit="shard", disable=not progress):
        if result.events_after_data_end:
            tally.notes["events_after_data_end"] += result.events_after_data_end
        unk_tokens += result.unk_tokens
        for split, part in result.sequences.items():
            writers[split].write(part)
            split_counts[split] += part.height
        split_parts.append(result.subject_split)
        for key, part in result.labels.items():
            labels.setdefault(key, []).append(part)
        for name, task_tally in result.task_tallies.items():
            task_tallies[name].merge(task_tally)
    shutil.rmtree(cache_dir)
    shard_lists = {s: w.finish() for s, w in writers.items()}
    if fhir_tally is not None:  # the MEDS folder written from FHIR gets its metadata once the splits are known
        meds_dataset.write_metadata(
            meds_root,
            source=input_dir,
            dataset_version=fingerprint,
            subject_splits=pl.concat(split_parts),
            code_names=fhir_tally.code_names,
        )
        meds_dataset.validate(meds_root)
    # subject -> split of the written sequences: only labels from outside (ACES, external files) need it
    subject_splits_all = subject_splits(tmp, shard_lists) if aces_tasks or cfg.external_labels else None
    predicates = aces.resolve_predicates(cfg.aces_predicates)
    for name, task_file in aces_tasks:
        found = aces.aces_labels(task_file, meds_root, predicates, tmp / "_aces" / name)
        found = found.join(subject_splits_all, on="subject_id", how="left")
        outside = found.filter(pl.col("split").is_null()).height  # subjects cleaning dropped, or not in the data
        found = found.filter(pl.col("split").is_not_null())
        for (split,), part in found.partition_by("split", as_dict=True).items():
            labels.setdefault((name, split), []).append(part.drop("split"))
        tasks = [*tasks, TaskConfig(name=name, description=f"ACES task {task_file}")]
        task_tallies[name] = TaskTally(
            labels=found.height,
            positives=int(found["boolean_value"].sum() or 0),
            excluded=Counter({"not_in_corpus": outside} if outside else {}),
        )
    shutil.rmtree(tmp / "_aces", ignore_errors=True)
    for path, name in zip(cfg.external_labels, external_names):
        external = read_external_labels(Path(path))
        external = external.join(subject_splits_all, on="subject_id", how="left")
        unknown = external.filter(pl.col("split").is_null())
        if unknown.height:
            raise DataError(
                f"{path}: {unknown.height} label row(s) for subjects not in the data, e.g. {unknown['subject_id'][0]}"
            )
        for (split,), part in external.partition_by("split", as_dict=True).items():
            labels.setdefault((name, split), []).append(part.drop("split"))
        tasks = [*tasks, TaskConfig(name=name, description=f"external labels from {path}")]
        task_tallies[name] = TaskTally(labels=external.height, positives=int(external["boolean_value"].sum() or 0))
    label_files = _write_labels(tmp, tasks, labels)

    tokens_per_split = {s: sum(x["tokens"] for x in shard_lists[s]) for s in shard_lists}
    return {
        "format_version": FORMAT_VERSION,
        "source": {
            "path": str(input_dir.resolve()),
            "format": cfg.format,
            "fingerprint": fingerprint,
            "files": len(input_files),
        },
        "vocab_size": len(vocab),
        "vocab_fingerprint": vocab.fingerprint(),
        "task_tokens": task_tokens,
        "tasks": {
            t.name: {
                "token": t.token,
                "description": t.description,
                **task_tallies[t.name].to_dict(),
                "files": label_files.get(t.name, {}),
            }
            for t in tasks
        },
        "data_end": str(data_end),
        "data_end_rule": data_end_rule,
        "counts": {
            "patients": dict(split_counts),
            "tokens": tokens_per_split,
            "patients_total": sum(split_counts.values()),
            "tokens_total": sum(tokens_per_split.values()),
            "events_in": tally.rows_in,
            "unk_tokens": unk_tokens,
        },
        "cleaning": tally.to_dict(),
        "fhir": fhir_tally.to_dict() if fhir_tally else None,
        "shards": shard_lists,
        "config": to_dict(cfg),
    }


def _write_labels(tmp: Path, tasks, labels) -> dict:
    files: dict[str, dict] = {}
    for task in tasks:
        for split in splits_mod.SPLITS:
            parts = labels.get((task.name, split))
            schema = {"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean}
            if getattr(task, "kind", "binary") == "time_to_event":
                schema["time_to_event_days"] = pl.Float64
            frame = pl.concat(parts).sort("subject_id", "prediction_time") if parts else pl.DataFrame(schema=schema)
            path = tmp / "labels" / task.name / f"{split}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            frame.write_parquet(path)
            files.setdefault(task.name, {})[split] = {
                "path": str(path.relative_to(tmp)),
                "rows": frame.height,
                "positives": int(frame["boolean_value"].sum() or 0),
            }
    return files
