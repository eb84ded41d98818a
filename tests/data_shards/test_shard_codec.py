"""The compact shard rows (:mod:`ehrfm.data_shards.shard_codec`): decoding gives back exactly the streams that
build_sequences made, whole-shard and row by row, at <= 12 bytes per token."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from ehrfm.data_shards.errors import DataError
from ehrfm.data_shards.schema import SEQUENCE_STREAMS
from ehrfm.data_shards.shard_codec import encode, read_streams, shard_schema
from ehrfm.data_shards.shards import SplitShardWriter
from ehrfm.data_shards.stream import ShardReader

STREAMS = (*SEQUENCE_STREAMS, "event_time_s")
YEAR_S = 31_557_600


def _sequences(rng: np.random.Generator, n: int, vocab_size: int) -> pl.DataFrame:
    """Random sequences with build_sequences' columns and invariants: orders 0 then 1, 2, ... without gaps,
    segments from orders, ages/times from whole seconds; a patient without a birth date; times not sorted."""
    rows = []
    for i in range(n):
        length = int(rng.integers(1, 60))
        orders = np.concatenate([[0], np.sort(rng.integers(1, 6, length - 1))]).astype(np.int64)
        orders = np.concatenate([[0], np.cumsum(np.diff(orders) > 0)])  # renumber without gaps
        seconds = 1_400_000_000 + rng.integers(-40 * YEAR_S, 40 * YEAR_S, length)
        birth = None if i == 1 else int(seconds.min() - rng.integers(0, 80 * YEAR_S))
        since = seconds - (birth or 0)
        ages = (since * 1_000_000).astype(np.float64) / (86400 * 1_000_000 * 365.25)
        rows.append(
            {
                "subject_id": 1000 + i,
                "input_ids": rng.integers(0, vocab_size, length).astype(np.int32).tolist(),
                "type_ids": rng.integers(1, 15, length).astype(np.int8).tolist(),
                "ages": (ages.astype(np.float32) if birth is not None else np.zeros(length, np.float32)).tolist(),
                "times": ((seconds * 1_000_000).astype(np.float64) / (7 * 86400 * 1_000_000))
                .astype(np.float32)
                .tolist(),
                "visit_segments": np.where(orders > 0, 2 - orders % 2, 0).astype(np.int8).tolist(),
                "visit_orders": orders.astype(np.int32).tolist(),
                "event_time_s": seconds.tolist(),
                "length": length,
                "birth_s": birth,
            }
        )
    return pl.DataFrame(rows).with_columns(
        pl.col("input_ids").cast(pl.List(pl.Int32)),
        pl.col("type_ids").cast(pl.List(pl.Int8)),
        pl.col("ages").cast(pl.List(pl.Float32)),
        pl.col("times").cast(pl.List(pl.Float32)),
        pl.col("visit_segments").cast(pl.List(pl.Int8)),
        pl.col("visit_orders").cast(pl.List(pl.Int32)),
        pl.col("length").cast(pl.Int32),
        pl.col("birth_s").cast(pl.Int64),
    )


@pytest.mark.parametrize("vocab_size", [300, 70_000])
def test_decoding_gives_back_every_stream_exactly(tmp_path, vocab_size):
    seqs = _sequences(np.random.default_rng(vocab_size), 9, vocab_size)
    writer = SplitShardWriter(tmp_path, "pretrain", 4, vocab_size)
    writer.write(seqs)
    shards = writer.finish()
    assert [s["rows"] for s in shards] == [4, 4, 1]
    width = pa.uint16() if vocab_size <= 65536 else pa.int32()
    assert shard_schema(vocab_size).field("input_ids").type.value_type == width
    # whole shards (reference perplexities, forecast statistics)
    got = {s: [] for s in STREAMS}
    for shard in shards:
        _, streams, _ = read_streams(tmp_path / shard["path"], STREAMS)
        for s in STREAMS:
            got[s].append(streams[s])
    for s in STREAMS:
        want = seqs[s].explode().to_numpy()
        np.testing.assert_array_equal(np.concatenate(got[s]), want, err_msg=s)
        assert np.concatenate(got[s]).dtype == want.dtype, s
    # row by row (the training loader)
    reader = ShardReader(tmp_path, shards, STREAMS)
    for row in range(seqs.height):
        sample = reader.get(row)
        assert sample["subject_id"] == seqs["subject_id"][row]
        for s in STREAMS:
            np.testing.assert_array_equal(sample[s], seqs[s][row].to_numpy(), err_msg=f"{s} row {row}")


def test_shards_take_at_most_12_bytes_per_token(synthea_prepared):
    out, manifest = synthea_prepared
    files = [out / s["path"] for split in manifest["shards"].values() for s in split]
    size = sum(f.stat().st_size for f in files)
    assert size / manifest["counts"]["tokens_total"] <= 12.0


def test_records_longer_than_136_years_get_wide_time_offsets(tmp_path):
    """A corpus with a record over 2**32 s keeps exact times with int64 offsets; a schema sized for shorter
    records refuses such a row with a clear error instead of wrapping around."""
    seqs = _sequences(np.random.default_rng(0), 2, 300)
    times = seqs["event_time_s"].to_list()
    times[1][-1] = times[1][0] + 140 * YEAR_S
    seqs = seqs.with_columns(pl.Series("event_time_s", times))
    with pytest.raises(DataError, match=r"subject_id 1001: events span \d+ s, more than the 4294967295 s"):
        encode(seqs.to_arrow(), shard_schema(300))
    writer = SplitShardWriter(tmp_path, "test", 10, 300, max_span_s=141 * YEAR_S)
    writer.write(seqs)
    (shard,) = writer.finish()
    _, streams, _ = read_streams(tmp_path / shard["path"], ("event_time_s",))
    np.testing.assert_array_equal(streams["event_time_s"], seqs["event_time_s"].explode().to_numpy())
