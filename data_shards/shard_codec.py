"""The on-disk encoding of a shard row (one patient sequence) and its decoding back into the token streams.

A patient sequence has seven per-token streams (:data:`.schema.SEQUENCE_STREAMS` + ``event_time_s``); four of
them are functions of the others, so a shard stores (bytes per token in brackets):

==================  ===========================================================================  =========
column              content                                                                      bytes
==================  ===========================================================================  =========
input_ids           vocabulary ids: uint16 when the vocabulary has at most 65,536 ids, else int32  2 (4)
type_ids            TokenType                                                                    1
visit_steps         visit order minus the previous token's (the first token: its own order);     1
                    0 or 1, as orders are sorted and numbered without gaps
time_offsets_s      seconds from the row's ``base_time_s`` (its earliest token) to the token's   4 (8)
                    event: uint32 when no patient's events span more than 2**32 - 1 s (136
                    years, see :func:`shard_schema`), else int64
==================  ===========================================================================  =========

plus per row ``subject_id``, ``base_time_s`` (int64, epoch seconds), ``birth_s`` (int64 epoch seconds, null
when unknown) and ``length``: 8 bytes per token (more only with a vocabulary over 65,536 ids or a record over
136 years), against 26 for the seven streams stored as they are used. Decoding (:func:`decode`) is exact:

* ``event_time_s = base_time_s + time_offsets_s``
* ``visit_orders = cumsum(visit_steps)``; ``visit_segments = 0`` where the order is 0, else ``2 - order % 2``
  (1, 2, 1, ... per visit, as :func:`.timeline.assign_visits` numbers them)
* ``times = event_time_s / SECONDS_PER_WEEK`` and ``ages = (event_time_s - birth_s) / SECONDS_PER_YEAR``
  (365.25 days) in float64, then float32; ``ages = 0`` without a birth time. :func:`.timeline.build_sequences`
  computes them from whole seconds with the same operations, so prepared streams and decoded ones agree bit
  for bit.

Shards stay uncompressed Arrow IPC (memory-mapped, zero-copy reads); the loader decodes one row at a time.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from .errors import DataError
from .schema import SECONDS_PER_WEEK, SECONDS_PER_YEAR

MAX_OFFSET_S = 2**32 - 1
ROW_COLUMNS = ("subject_id", "base_time_s", "birth_s", "length")
STORED_TOKEN_COLUMNS = ("input_ids", "type_ids", "visit_steps", "time_offsets_s")


def shard_schema(vocab_size: int, max_span_s: int = 0) -> pa.Schema:
    """Arrow schema of the shards of a corpus whose vocabulary has ``vocab_size`` ids and whose longest
    record spans ``max_span_s`` seconds (first to last event of a patient, known after prepare's pass 1)."""
    ids = pa.uint16() if vocab_size <= 1 << 16 else pa.int32()
    offsets = pa.uint32() if max_span_s <= MAX_OFFSET_S else pa.int64()
    return pa.schema(
        [
            ("subject_id", pa.int64()),
            ("input_ids", pa.list_(ids)),
            ("type_ids", pa.list_(pa.int8())),
            ("visit_steps", pa.list_(pa.int8())),
            ("time_offsets_s", pa.list_(offsets)),
            ("base_time_s", pa.int64()),
            ("birth_s", pa.int64()),
            ("length", pa.int32()),
        ]
    )


def _list_values(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (rows + 1,), values) of a list column."""
    arr = table.column(name).combine_chunks()
    return arr.offsets.to_numpy().astype(np.int64), arr.values.to_numpy(zero_copy_only=False)


def _row_starts(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def encode(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Sequences as :func:`.timeline.build_sequences` makes them (its Arrow table) -> the stored columns."""
    offsets, times = _list_values(table, "event_time_s")
    lengths = np.diff(offsets)
    times = times.astype(np.int64)
    starts = offsets[:-1]
    nonempty = lengths > 0
    base = np.zeros(len(lengths), np.int64)
    base[nonempty] = np.minimum.reduceat(times, starts[nonempty]) if len(times) else []
    rel = times - np.repeat(base, lengths)
    limit = MAX_OFFSET_S if schema.field("time_offsets_s").type.value_type == pa.uint32() else np.iinfo(np.int64).max
    if len(rel) and rel.max() > limit:
        row = int(np.searchsorted(offsets, int(rel.argmax()), side="right") - 1)
        raise DataError(
            f"subject_id {table.column('subject_id')[row].as_py()}: events span {rel.max()} s, more than the "
            f"{limit} s that this corpus's shard schema was sized for (pass 1 saw a shorter record)"
        )
    _, orders = _list_values(table, "visit_orders")
    steps = np.diff(orders.astype(np.int64), prepend=0)
    if len(steps):
        steps[starts[nonempty]] = orders[starts[nonempty]]
    if len(steps) and (steps.min() < 0 or steps.max() > 127):
        raise AssertionError("visit orders are not sorted without gaps within a sequence")  # by construction

    def as_list(values: np.ndarray, field: str) -> pa.ListArray:
        kind = schema.field(field).type.value_type
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values).cast(kind))

    _, ids = _list_values(table, "input_ids")
    _, types = _list_values(table, "type_ids")
    columns = {
        "subject_id": table.column("subject_id"),
        "input_ids": as_list(ids, "input_ids"),
        "type_ids": as_list(types, "type_ids"),
        "visit_steps": as_list(steps, "visit_steps"),
        "time_offsets_s": as_list(rel, "time_offsets_s"),
        "base_time_s": pa.array(base),
        "birth_s": table.column("birth_s"),
        "length": pa.array(lengths.astype(np.int32)),
    }
    return pa.table([columns[f.name] for f in schema], schema=schema)


def decode(
    stored: dict[str, np.ndarray], lengths: np.ndarray, base_time_s: np.ndarray, birth_s: np.ndarray | None
) -> dict[str, np.ndarray]:
    """The token streams of one or more consecutive rows from their stored columns.

    ``stored``: flat values over the rows of any of :data:`STORED_TOKEN_COLUMNS`; ``lengths`` and
    ``base_time_s``: per row; ``birth_s``: per row, float64 epoch seconds with NaN where a row has no birth
    time, or None when none has. Returns the streams those columns give, flat, in the dtypes
    :func:`.timeline.build_sequences` makes them (ids int32, types int8, ages and times float32, segments
    int8, orders int32, event_time_s int64).
    """
    out: dict[str, np.ndarray] = {}
    if "input_ids" in stored:
        out["input_ids"] = stored["input_ids"].astype(np.int32)
    if "type_ids" in stored:
        out["type_ids"] = stored["type_ids"].astype(np.int8, copy=False)
    single = len(lengths) == 1  # the loader's case: per-row values are scalars, no repeats
    if "visit_steps" in stored:
        orders = np.cumsum(stored["visit_steps"], dtype=np.int32)
        if not single:  # restart the sum at each row
            starts = _row_starts(lengths)
            before = np.where(starts > 0, orders[np.maximum(starts - 1, 0)], 0)
            orders -= np.repeat(before, lengths).astype(np.int32)
        out["visit_orders"] = orders
        segments = (2 - (orders & 1)).astype(np.int8)
        if single:  # order 0 ([CLS], static codes) is a row's prefix
            segments[: np.searchsorted(orders, 1)] = 0
        else:
            segments[orders == 0] = 0
        out["visit_segments"] = segments
    if "time_offsets_s" in stored:
        base = int(base_time_s[0]) if single else np.repeat(base_time_s.astype(np.int64), lengths)
        seconds = stored["time_offsets_s"].astype(np.int64) + base
        out["event_time_s"] = seconds
        out["times"] = (seconds / SECONDS_PER_WEEK).astype(np.float32)
        if birth_s is None or (single and np.isnan(birth_s[0])):
            out["ages"] = np.zeros(len(seconds), np.float32)
        elif single:
            out["ages"] = ((seconds - int(birth_s[0])) / SECONDS_PER_YEAR).astype(np.float32)
        else:
            birth = np.repeat(birth_s, lengths)
            known = ~np.isnan(birth)
            since = seconds - np.where(known, birth, 0).astype(np.int64)
            out["ages"] = np.where(known, since / SECONDS_PER_YEAR, 0.0).astype(np.float32)
    return out


def stored_columns_for(streams: tuple[str, ...]) -> tuple[str, ...]:
    """The stored columns that :func:`decode` needs for ``streams``."""
    need = {
        "input_ids": "input_ids",
        "type_ids": "type_ids",
        "visit_orders": "visit_steps",
        "visit_segments": "visit_steps",
        "event_time_s": "time_offsets_s",
        "times": "time_offsets_s",
        "ages": "time_offsets_s",
    }
    return tuple(dict.fromkeys(need[s] for s in streams))


@dataclasses.dataclass
class StoredShard:
    """The stored columns of one shard file, as numpy views of the memory-mapped file (nothing decoded)."""

    offsets: np.ndarray  # (rows + 1,) token offsets of the rows (every list column shares them)
    columns: dict[str, np.ndarray]  # stored token column -> flat values over all rows
    subject_id: np.ndarray  # (rows,)
    base_time_s: np.ndarray  # (rows,)
    birth_s: np.ndarray | None  # (rows,) float64, NaN where unknown; None when no row has one

    def streams(self, first: int, stop: int) -> dict[str, np.ndarray]:
        """The decoded streams of rows ``first`` .. ``stop - 1``, flat (:func:`decode`)."""
        lo, hi = int(self.offsets[first]), int(self.offsets[stop])
        return decode(
            {name: values[lo:hi] for name, values in self.columns.items()},
            np.diff(self.offsets[first : stop + 1]),
            self.base_time_s[first:stop],
            None if self.birth_s is None else self.birth_s[first:stop],
        )


def open_shard(path, streams: tuple[str, ...]) -> StoredShard:
    """The stored columns that ``streams`` need, of the shard file at ``path`` (memory-mapped)."""
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    offsets, columns = np.zeros(1, np.int64), {}
    for name in stored_columns_for(streams):
        offsets, columns[name] = _list_values(table, name)
    if not columns:  # no token stream asked for: the offsets still come from the row lengths
        offsets = np.concatenate([[0], np.cumsum(table.column("length").to_numpy())]).astype(np.int64)
    return StoredShard(
        offsets=offsets,
        columns=columns,
        subject_id=table.column("subject_id").to_numpy(),
        base_time_s=table.column("base_time_s").to_numpy(),
        birth_s=birth_as_float(table),
    )


def read_streams(path, streams: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """(lengths, {stream: flat values over all rows}, subject ids) of a whole shard file: for passes over a
    whole corpus (reference perplexities, forecast statistics, tests)."""
    shard = open_shard(path, streams)
    rows = len(shard.subject_id)
    decoded = shard.streams(0, rows)
    return np.diff(shard.offsets), {s: decoded[s] for s in streams}, shard.subject_id


def birth_as_float(table: pa.Table) -> np.ndarray | None:
    """Per-row birth seconds as float64 with NaN for unknown (None when no row has one)."""
    birth = table.column("birth_s")
    if birth.null_count == len(birth):
        return None
    return birth.to_numpy(zero_copy_only=False).astype(np.float64)
