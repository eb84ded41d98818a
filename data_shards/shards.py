"""Sharded sequence files and the manifest.

Layout of a prepared folder::

    manifest.json                  format version, source fingerprint, counts, shard list + checksums, config
    config.yaml                    the resolved prepare config
    tokenizer/                     HF tokenizer (AutoTokenizer.from_pretrained) + ehrfm_vocab.json (bins, counts)
    shards/<split>/<split>-00000.arrow   one row per patient (Arrow IPC, uncompressed: memory-mapped reads;
                                   the columns and their decoding: :mod:`.shard_codec`)
    labels/<task>/<split>.parquet  MEDS label schema (subject_id, prediction_time, boolean_value)

Everything is written into ``<out>.tmp-<pid>`` and renamed to ``<out>`` only when complete, so an
interrupted run never leaves a folder that looks finished; an existing ``<out>`` is replaced only when an
earlier `ehrfm prepare` wrote it (see :mod:`ehrfm.outputs`).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa

from ehrfm.outputs import file_sha256, write_json_atomic, write_text_atomic  # noqa: F401  (re-exported)

from .shard_codec import encode, open_shard, shard_schema

FORMAT_VERSION = 3  # 3: compact rows (.shard_codec: 8 bytes per token); 2: stay-length tokens ([S<k>D])


class SplitShardWriter:
    """Appends patient sequences to ``shards/<split>/`` files, starting a new file every N patients."""

    def __init__(self, root: Path, split: str, patients_per_shard: int, vocab_size: int, max_span_s: int = 0) -> None:
        self.dir = root / "shards" / split
        self.schema = shard_schema(vocab_size, max_span_s)
        self.split = split
        self.per_shard = patients_per_shard
        self.shards: list[dict] = []
        self._writer = None
        self._rows = 0
        self._tokens = 0
        self._path: Path | None = None

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._path = self.dir / f"{self.split}-{len(self.shards):05d}.arrow"
        self._writer = pa.ipc.new_file(str(self._path), self.schema)
        self._rows = self._tokens = 0

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        assert self._path is not None
        self.shards.append(
            {
                "path": str(self._path.relative_to(self.dir.parent.parent)),
                "rows": self._rows,
                "tokens": self._tokens,
                "sha256": file_sha256(self._path),
            }
        )
        self._writer = None

    def write(self, seqs: pl.DataFrame) -> None:
        """Appends sequences (:func:`.timeline.build_sequences` columns), encoded by :func:`.shard_codec.encode`."""
        table = encode(seqs.to_arrow(), self.schema)
        offset = 0
        while offset < table.num_rows:
            if self._writer is None:
                self._open()
            take = min(self.per_shard - self._rows, table.num_rows - offset)
            chunk = table.slice(offset, take)
            self._writer.write_table(chunk)
            self._rows += take
            self._tokens += int(pa.compute.sum(chunk["length"]).as_py() or 0)
            offset += take
            if self._rows >= self.per_shard:
                self._close()

    def finish(self) -> list[dict]:
        self._close()
        return self.shards


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.exists():
        from .errors import DataError

        raise DataError(f"{folder}: not a prepared ehrfm data folder (no manifest.json); run `ehrfm prepare` first")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        from .errors import DataError

        raise DataError(f"{path}: format version {manifest.get('format_version')} != {FORMAT_VERSION}; re-run prepare")
    return manifest


def subject_splits(root: Path, shard_lists: dict) -> pl.DataFrame:
    """subject_id -> split of every sequence of a prepared folder (``manifest["shards"]``; reads only the
    subject_id column)."""
    frames = []
    for split, shards in shard_lists.items():
        for shard in shards:
            ids = open_shard(Path(root) / shard["path"], ()).subject_id
            frames.append(pl.DataFrame({"subject_id": pl.Series(ids), "split": split}))
    return pl.concat(frames) if frames else pl.DataFrame(schema={"subject_id": pl.Int64, "split": pl.String})
