"""Deterministic, resumable, rank/worker-sharded streaming of a prepared split into packed or padded batches.

Order. Epoch ``e`` visits every row of the split once, in an order that is a pure function of
(seed, e): shards in a seeded permutation, then rows permuted within windows of ``shuffle_buffer`` rows
(a seeded shuffle buffer that keeps reads local). Call this list of rows the epoch's *positions*.

Sharding. With K = world_size x num_workers consumers, consumer c takes the positions still unconsumed
in the epoch, every K-th starting at c. So the union over consumers is exactly the split, without
duplicates, for any world size and worker count.

State. A consumer's state is (epoch, the epoch's consumed set when it started, how many of its positions
it has read, which of those are still pending in its packing buffer). :func:`merge_states` folds the states
of all consumers (all ranks) into one *global* state = the set of consumed positions per epoch; loading
a global state with a different world size / worker count continues without repeating or skipping a
sample. With an unchanged layout, each consumer resumes its own state, so the batches after a restart are
exactly those of an uninterrupted run.

:class:`EhrDataLoader` wraps ``torch.utils.data.DataLoader``: each worker attaches its state to every batch,
the main process keeps the state of the last batch it actually handed out (prefetching does not matter),
and on resume the worker that was due next is started first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..seeding import derive_seed
from .collate import assemble_rows, best_fit_pack, cut_document
from .config import StreamSettings
from .errors import DataError
from .schema import SEQUENCE_STREAMS
from .shard_codec import StoredShard, open_shard
from .shards import read_manifest

STATE_VERSION = 1


class ShardReader:
    """Random access to rows of a split's Arrow shards (memory-mapped; a row's streams decoded when read)."""

    def __init__(self, root: Path, shards: list[dict], columns=SEQUENCE_STREAMS + ("event_time_s",)) -> None:
        self.root = Path(root)
        self.shards = shards
        self.columns = tuple(columns)
        self.row_counts = np.array([s["rows"] for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.row_counts)])
        self._open: dict[int, StoredShard] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _load(self, shard: int) -> StoredShard:
        if shard not in self._open:
            if len(self._open) >= 8:
                self._open.pop(next(iter(self._open)))
            self._open[shard] = open_shard(self.root / self.shards[shard]["path"], self.columns)
        return self._open[shard]

    def subject_ids(self) -> np.ndarray:
        """(rows,) subject id of every row, in row order."""
        ids = [self._load(shard).subject_id for shard in range(len(self.shards))]
        return np.concatenate(ids) if ids else np.zeros(0, np.int64)

    def get(self, row: int) -> dict[str, np.ndarray]:
        """The streams of ``self.columns`` of one row (decoded: :func:`.shard_codec.decode`), and subject_id."""
        shard = int(np.searchsorted(self.starts, row, side="right") - 1)
        local = row - int(self.starts[shard])
        stored = self._load(shard)
        decoded = stored.streams(local, local + 1)
        sample = {name: decoded[name] for name in self.columns}
        sample["subject_id"] = stored.subject_id[local]
        return sample


def epoch_order(row_counts: np.ndarray, seed: int, epoch: int, shuffle_buffer: int) -> np.ndarray:
    """Global row ids of the split in epoch ``epoch``'s order (see module docstring)."""
    rng = np.random.default_rng(derive_seed(seed, "epoch-order", epoch))
    starts = np.concatenate([[0], np.cumsum(row_counts)])
    shard_order = rng.permutation(len(row_counts))
    rows = (
        np.concatenate([np.arange(starts[s], starts[s + 1]) for s in shard_order])
        if len(row_counts)
        else np.zeros(0, np.int64)
    )
    if shuffle_buffer > 1:
        for lo in range(0, len(rows), shuffle_buffer):
            window = rows[lo : lo + shuffle_buffer]
            rows[lo : lo + shuffle_buffer] = window[rng.permutation(len(window))]
    return rows.astype(np.int64)


@dataclasses.dataclass
class ConsumedSet:
    """Positions consumed in one epoch: all below ``prefix``, plus ``extras`` (sorted, all >= prefix).

    ``todo`` lists, for patients cut into several documents of which only some were emitted, the document
    (chunk) indices still to emit; such positions count as unconsumed, and only their ``todo`` chunks are read.
    """

    prefix: int = 0
    extras: tuple[int, ...] = ()
    todo: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.todo = {int(k): [int(j) for j in v] for k, v in self.todo.items()}

    @classmethod
    def from_positions(cls, positions: np.ndarray, todo: dict | None = None) -> ConsumedSet:
        positions = np.unique(positions)
        prefix = 0
        # largest p with 0..p-1 all present
        if len(positions) and positions[0] == 0:
            gaps = np.nonzero(np.diff(positions) != 1)[0]
            prefix = int(positions[gaps[0]] + 1) if len(gaps) else int(positions[-1] + 1)
        return cls(prefix, tuple(int(p) for p in positions[positions >= prefix]), dict(todo or {}))

    def to_state(self) -> dict:
        return {"prefix": self.prefix, "extras": list(self.extras), "todo": {str(k): v for k, v in self.todo.items()}}

    def positions(self) -> np.ndarray:
        return np.concatenate([np.arange(self.prefix), np.asarray(self.extras, dtype=np.int64)])

    def remaining(self, total: int) -> np.ndarray:
        rest = np.arange(self.prefix, total, dtype=np.int64)
        if self.extras:
            rest = rest[~np.isin(rest, np.asarray(self.extras, dtype=np.int64))]
        return rest


@dataclasses.dataclass
class StreamConfig(StreamSettings):
    """A stream's full configuration: the user's settings plus what the caller decides."""

    seed: int = 0
    infinite: bool = True  # loop over epochs (training); False = one pass over the remaining rows

    @classmethod
    def from_settings(cls, settings: StreamSettings, *, seed: int, infinite: bool) -> StreamConfig:
        """The stream fields of ``settings`` (any StreamSettings subclass) with ``seed`` and ``infinite``."""
        chosen = {f.name: getattr(settings, f.name) for f in dataclasses.fields(StreamSettings)}
        return cls(**chosen, seed=seed, infinite=infinite)


class PatientStream(IterableDataset):
    """IterableDataset over one split; see the module docstring for order, sharding and state."""

    def __init__(self, data_dir: Path, split: str, cfg: StreamConfig, *, rank: int = 0, world_size: int = 1) -> None:
        manifest = read_manifest(data_dir)
        if split not in manifest["shards"]:
            raise DataError(f"{data_dir}: unknown split {split!r}; have {sorted(manifest['shards'])}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.shards = manifest["shards"][split]
        self.total = sum(s["rows"] for s in self.shards)
        if self.total == 0:
            raise DataError(f"{data_dir}: split {split!r} has no patients")
        self.row_counts = np.array([s["rows"] for s in self.shards], dtype=np.int64)
        # set by EhrDataLoader before workers start
        self.global_state: dict[int, ConsumedSet] = {}
        self.consumer_states: dict[int, dict] = {}
        self.num_workers = 1
        self.role_shift = 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        role = (worker + self.role_shift) % workers
        consumers = self.world_size * workers
        consumer = self.rank * workers + role
        if self.cfg.infinite and consumers > self.total:
            # (a finite pass is fine: consumers without rows simply yield nothing)
            raise DataError(
                f"split {self.split!r} has {self.total} patients, fewer than the {consumers} data consumers "
                f"(world size {self.world_size} x {workers} workers); use fewer ranks/workers or more data"
            )
        reader = ShardReader(self.data_dir, self.shards)
        state = self.consumer_states.get(consumer)
        if state is None:
            epoch = min(self.global_state) if self.global_state else 0
            state = {"epoch": epoch, "base": self.global_state.get(epoch, ConsumedSet()), "read": 0, "pending": []}
        else:
            state = {
                **state,
                "base": ConsumedSet(**state["base"]) if isinstance(state["base"], dict) else state["base"],
            }
        while True:
            yield from self._epoch(reader, state, consumer, consumers, role)
            if not self.cfg.infinite:
                return
            epoch = state["epoch"] + 1
            state = {"epoch": epoch, "base": self.global_state.get(epoch, ConsumedSet()), "read": 0, "pending": []}

    def _epoch(self, reader: ShardReader, state: dict, consumer: int, consumers: int, role: int) -> Iterator[dict]:
        """Batches of one epoch. Documents are keyed (position, chunk); the state names the packing window
        and how many of its batches were already emitted, so a resumed run re-packs the same rows."""
        cfg = self.cfg
        order = epoch_order(self.row_counts, cfg.seed, state["epoch"], cfg.shuffle_buffer)
        mine = state["base"].remaining(self.total)[consumer::consumers]
        read = state["read"]
        resume_window = [tuple(k) for k in state.get("window") or []]
        skip = state.get("skip", 0)
        pending: list[tuple[int, int]] = resume_window or [tuple(k) for k in state["pending"]]
        cache: dict[int, list[dict]] = {}

        def docs_of(pos: int) -> list[dict]:
            if pos not in cache:
                cache[pos] = cut_document(reader.get(int(order[pos])), cfg.context_length, cfg.long_sequences)
            return cache[pos]

        def chunks_of(pos: int) -> list[int]:
            todo = state["base"].todo.get(pos)
            return list(todo) if todo is not None else list(range(len(docs_of(pos))))

        while True:
            if not resume_window:
                while len(pending) < cfg.pack_window and read < len(mine):
                    pos = int(mine[read])
                    read += 1
                    pending.extend((pos, j) for j in chunks_of(pos))
            if not pending:
                return
            final = read >= len(mine)
            docs = [docs_of(pos)[j] for pos, j in pending]
            rows = self._rows(docs)
            take = len(rows) if final else len(rows) // cfg.batch_size * cfg.batch_size
            if take == 0:
                # too few documents for a full batch: widen the window by one more patient
                pos = int(mine[read])
                read += 1
                pending.extend((pos, j) for j in chunks_of(pos))
                continue
            window = list(pending)
            emitted: set[tuple[int, int]] = set()
            for b, lo in enumerate(range(0, take, cfg.batch_size)):
                chunk = rows[lo : lo + cfg.batch_size]
                emitted.update(window[i] for row in chunk for i in row)
                if b < skip:
                    continue
                width = cfg.context_length
                if cfg.mode == "padded":  # length-bucketed padding: pad to the longest document of the batch
                    width = max(len(docs[i]["input_ids"]) for row in chunk for i in row)
                batch = assemble_rows([[docs[i] for i in row] for row in chunk], width)
                batch["_stream_state"] = {
                    "consumer": consumer,
                    "role": role,
                    "epoch": state["epoch"],
                    "base": state["base"].to_state(),
                    "read": read,
                    "window": [list(k) for k in window],
                    "skip": b + 1,
                    "pending": [list(k) for k in window if k not in emitted],
                }
                yield batch
            pending = [k for k in window if k not in emitted]
            resume_window, skip = [], 0
            used = {pos for pos, _ in pending}
            cache = {pos: docs for pos, docs in cache.items() if pos in used}

    def _rows(self, docs: list[dict]) -> list[list[int]]:
        """Rows of document indices: best-fit packing, or one document per row ordered by length."""
        if self.cfg.mode == "packed":
            return best_fit_pack([len(d["input_ids"]) for d in docs], self.cfg.context_length)
        order = sorted(range(len(docs)), key=lambda i: (len(docs[i]["input_ids"]), i))
        return [[i] for i in order]


def merge_states(states: list[dict]) -> dict:
    """Fold loader states of all ranks into one global state: consumed positions per epoch."""
    consumed: dict[int, list[np.ndarray]] = {}
    todo: dict[int, dict[int, list[int]]] = {}
    totals = set()
    for state in states:
        totals.add(state["total"])
        for epoch, base in state.get("global", {}).items():
            base = ConsumedSet(**base)
            consumed.setdefault(int(epoch), []).append(base.positions())
            todo.setdefault(int(epoch), {}).update(base.todo)
        for cstate in state.get("consumers", {}).values():
            epoch = int(cstate["epoch"])
            base = ConsumedSet(**cstate["base"])
            mine = base.remaining(state["total"])[cstate["consumer"] :: cstate["consumers"]][: cstate["read"]]
            pending: dict[int, list[int]] = {}
            for pos, chunk in cstate["pending"]:
                pending.setdefault(int(pos), []).append(int(chunk))
            done = mine[~np.isin(mine, np.asarray(sorted(pending), dtype=np.int64))]
            consumed.setdefault(epoch, []).extend([base.positions(), done])
            epoch_todo = todo.setdefault(epoch, {})
            epoch_todo.update(base.todo)
            for pos in done.tolist():
                epoch_todo.pop(pos, None)
            epoch_todo.update({pos: sorted(chunks) for pos, chunks in pending.items()})
    consumer_epochs = {int(c["epoch"]) for s in states for c in s.get("consumers", {}).values()}
    if len(consumer_epochs) > 1:
        raise DataError(
            f"cannot reshard the data position: consumers are in different epochs {sorted(consumer_epochs)} "
            "(some finished their share of an epoch before others); resume with the original world size and "
            "worker count until the epoch boundary has passed"
        )
    if len(totals) != 1:
        raise DataError(f"cannot merge loader states of different datasets (row counts {sorted(totals)})")
    total = totals.pop()
    merged = {}
    for epoch, parts in sorted(consumed.items()):
        cs = ConsumedSet.from_positions(np.concatenate(parts) if parts else np.zeros(0, np.int64), todo.get(epoch))
        if cs.prefix < total:
            merged[epoch] = cs.to_state()
    if not merged:
        merged[max(consumed) + 1 if consumed else 0] = ConsumedSet().to_state()
    return {"version": STATE_VERSION, "total": total, "global": merged, "consumers": {}}


class EhrDataLoader:
    """A DataLoader over :class:`PatientStream` with exact ``state_dict()`` / ``load_state_dict()``."""

    def __init__(self, dataset: PatientStream, num_workers: int = 0, **loader_kwargs) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.loader_kwargs = loader_kwargs
        self._consumer_states: dict[int, dict] = {}
        self._next_role = 0

    def __iter__(self) -> Iterator[dict]:
        workers = max(1, self.num_workers)
        self.dataset.num_workers = workers
        self.dataset.role_shift = self._next_role
        self.dataset.consumer_states = dict(self._consumer_states)
        loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False, **self.loader_kwargs
        )
        for batch in loader:
            state = batch.pop("_stream_state")
            state["consumers"] = self.dataset.world_size * workers
            self._consumer_states[state["consumer"]] = state
            self._next_role = (state["role"] + 1) % workers
            yield batch

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "total": self.dataset.total,
            "layout": {
                "world_size": self.dataset.world_size,
                "rank": self.dataset.rank,
                "num_workers": max(1, self.num_workers),
            },
            "next_role": self._next_role,
            "global": {str(k): v.to_state() for k, v in self.dataset.global_state.items()},
            "consumers": {str(k): v for k, v in self._consumer_states.items()},
        }

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Own state (same layout): exact continuation. A list of all ranks' states, or a merged global state
        with another layout: continue from the union of what every consumer consumed."""
        states = state if isinstance(state, list) else [state]
        layout = {"world_size": self.dataset.world_size, "num_workers": max(1, self.num_workers)}
        for s in states:
            if s.get("version") != STATE_VERSION:
                raise DataError(f"data-loader state version {s.get('version')} != {STATE_VERSION}")
        own = [s for s in states if s.get("layout", {}).get("rank") == self.dataset.rank]
        same_layout = (
            own
            and all({k: s.get("layout", {}).get(k) for k in layout} == layout for s in states)
            and len(states) == self.dataset.world_size
        )
        if same_layout:
            s = own[0]
            self._consumer_states = {int(k): v for k, v in s["consumers"].items()}
            self._next_role = s["next_role"]
            self.dataset.global_state = {int(k): ConsumedSet(**v) for k, v in s["global"].items()}
            return
        merged = merge_states(states)
        self._consumer_states = {}
        self._next_role = 0
        self.dataset.global_state = {int(k): ConsumedSet(**v) for k, v in merged["global"].items()}
