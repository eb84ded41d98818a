"""Typed configuration of `ehrfm prepare` (YAML + ``key=value`` overrides, see :mod:`ehrfm.config`)."""

from __future__ import annotations

import datetime as dt
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import ConfigError, check_range
from .schema import SPECIAL_TOKENS

# Token types a history.concept_groups entry may name (the coded event types of schema.TokenType).
CONCEPT_GROUPS = ("DX", "MED", "LAB", "PRO", "VIT", "IMM", "OTHER")


# history.lookback values; the one list of their names (HistoryConfig, `ehrfm bench train-throughput
# --history-lookback`). What each keeps: HistoryConfig's docstring.
Lookback = Literal["all", "latest_visit", "1y", "3y", "inpatient_24h"]
LOOKBACKS: tuple[str, ...] = typing.get_args(Lookback)


# A task name becomes a path segment (labels/<name>/<split>.parquet), so it is restricted to a safe set.
TASK_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_task_name(name: str, where: str, *, source: str | None = None) -> None:
    """ConfigError (naming ``where`` and the name) unless ``name`` is a safe path segment: letters, digits,
    ``_ . -``, starting with a letter or digit, at most 64 characters, no ``..``."""
    if not isinstance(name, str) or not TASK_NAME_PATTERN.fullmatch(name) or ".." in name:
        origin = f" (the file name of {source})" if source else ""
        raise ConfigError(
            f"{where}: task name {name!r}{origin} is not allowed: task names become folder names and must match "
            f"{TASK_NAME_PATTERN.pattern} without '..'"
        )


def parse_time(value: str, name: str) -> dt.datetime:
    """An ISO date/datetime of the config as a naive UTC datetime (MEDS times are naive); ConfigError naming
    ``name`` otherwise."""
    try:
        parsed = dt.datetime.fromisoformat(str(value).strip())
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not an ISO date (YYYY-MM-DD) or datetime") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
    return parsed


@dataclass
class SplitConfig:
    """Patient-level splits (001 B.3: 57 / 28 / 15 %), each with a validation slice.

    Assignment hashes (seed, subject_id), so it is deterministic, streaming and independent of shard order.
    With a MEDS ``metadata/subject_splits.parquet``: ``held_out`` -> test, ``tuning`` -> the validation
    slices, ``train`` -> pretrain/finetune by the ratio of their fractions.
    """

    pretrain: float = 0.57
    finetune: float = 0.28
    test: float = 0.15
    val_fraction: float = 0.1
    seed: int = 0
    respect_meds_splits: bool = True

    def validate(self) -> None:
        for name in ("pretrain", "finetune", "test"):
            check_range(self, name, ge=0.0, le=1.0)
        total = self.pretrain + self.finetune + self.test
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(
                f"pretrain: pretrain + finetune + test must sum to 1 (within 1e-6), got "
                f"{self.pretrain} + {self.finetune} + {self.test} = {total}"
            )
        check_range(self, "val_fraction", ge=0.0, lt=1.0)


@dataclass
class VocabConfig:
    """Vocabulary: value bins (003: b = 5 or 10), code hierarchy truncation, minimum frequency."""

    num_bins: int = 10
    # Truncate ICD codes to this many characters of the code proper (003: level 3 "I50" or level 4 "I509").
    # None keeps them whole. Applies to prefixes listed in icd_prefixes.
    icd_level: int | None = None
    icd_prefixes: list[str] = field(default_factory=lambda: ["ICD10CM", "ICD10", "ICD9CM", "ICD9"])
    min_frequency: int = 1  # codes seen fewer times in the pretraining split map to [UNK]
    max_values_per_code: int = 20000  # reservoir size for learning quantile bin edges
    # Task tokens reserved for multitask prompted finetuning: every configured task's token, plus these.
    extra_task_tokens: list[str] = field(default_factory=list)

    def validate(self) -> None:
        check_range(self, "num_bins", ge=1)
        check_range(self, "icd_level", ge=1)
        check_range(self, "min_frequency", ge=1)
        check_range(self, "max_values_per_code", ge=1)
        for token in self.extra_task_tokens:
            check_token(token, "extra_task_tokens")


def check_token(token: str, name: str) -> None:
    """A task token must be one whitespace-free word (the HF tokenizer splits on whitespace) and no special token."""
    if not token or token != token.strip() or any(ch.isspace() for ch in token):
        raise ConfigError(f"{name}: task token {token!r} must be a non-empty word without whitespace")
    if token in SPECIAL_TOKENS:
        raise ConfigError(f"{name}: task token {token!r} is a special token ({', '.join(SPECIAL_TOKENS[:7])}, ...)")


@dataclass
class VisitConfig:
    """How events are grouped into visits.

    With an encounter column (FHIR input, or MEDS extra column) each encounter is a visit. Otherwise
    consecutive events less than ``gap_hours`` apart form one visit. ``stay_tokens`` puts a stay-length token
    ([S<k>D], :data:`.schema.STAY_TOKENS`) before each visit's [VE]: the clock inside visits that zero-shot
    length-of-stay forecasts read (``ehrfm forecast``); false gives 001/003's layout exactly.
    """

    encounter_column: str = "encounter_id"
    gap_hours: float = 24.0
    stay_tokens: bool = True

    def validate(self) -> None:
        check_range(self, "gap_hours", gt=0.0)


@dataclass
class HistoryConfig:
    """003 section 3.5.3 history options, applied before tokenization.

    lookback: "all", "latest_visit", "1y" or "3y": pretraining splits relative to the end of the patient's
        last visit; task examples relative to their prediction time (``examples.cut_at``), never to the
        record's end, which would leak the outcome.
        "inpatient_24h" (short histories, like a cohort of ICU stays): for the pretraining splits (pretrain,
        pretrain_val), one document per patient holding only the patient's inpatient visits (an
        ``ENCOUNTER/IMP`` event, :data:`.timeline.STAY_WINDOWS`), each cut to its events in [start, start +
        24 h), start = the visit's first event; a visit's end becomes its last kept event (or encounter end),
        so its stay token is always [S1D] and interval tokens count from the cut ends. Static codes stay.
        Patients without an inpatient visit have no pretraining document. Task examples keep their whole
        history before the prediction time (a task's own window, e.g. 24 h after admission, is its
        prediction time): cutting labelled splits by stay would drop the patients a task needs.
    aggregate_days: average repeated numeric events of the same code within windows of w days (0 = off).
    concept_groups: token types kept (003 3.5.4 augmentation: DX, VIT, LAB, MED, PRO, IMM, OTHER).
    """

    lookback: Lookback = "all"
    aggregate_days: float = 0.0
    concept_groups: list[str] = field(default_factory=lambda: ["DX", "MED", "LAB", "PRO", "VIT", "IMM", "OTHER"])

    def validate(self) -> None:
        check_range(self, "aggregate_days", ge=0.0)
        if not self.concept_groups:
            raise ConfigError(f"concept_groups: must name at least one of {list(CONCEPT_GROUPS)}, got []")
        unknown = [g for g in self.concept_groups if g not in CONCEPT_GROUPS]
        if unknown:
            raise ConfigError(f"concept_groups: unknown group(s) {unknown}; known: {list(CONCEPT_GROUPS)}")


@dataclass
class CleaningConfig:
    """Documented handling of bad rows (see :mod:`.cleaning`); every dropped or rewritten row is tallied in
    manifest.json."""

    drop_duplicates: bool = True
    # Events this long after death are dropped (Synthea writes some events after death).
    after_death_tolerance_hours: float = 24.0
    drop_before_birth: bool = True
    min_events_per_patient: int = 1
    # Plausible event times: rows with min_time <= time < max_time are kept, others dropped and counted
    # ("time_out_of_bounds"; static rows with a null time stay). ISO dates or datetimes (UTC). The upper
    # bound is far in the future on purpose: MIMIC-IV-derived MEDS data are date-shifted into 2110-2210.
    min_time: str = "1900-01-01"
    max_time: str = "2300-01-01"
    # End of the data, used to censor task labels. None = derived (manifest "data_end_rule"): the largest
    # per-subject last event time that is at most data_end_margin_days after the 99th percentile of the
    # per-subject last event times, so a few far-future outliers cannot switch censoring off.
    data_end: str | None = None
    data_end_margin_days: float = 365.0

    def validate(self) -> None:
        check_range(self, "after_death_tolerance_hours", ge=0.0)
        check_range(self, "min_events_per_patient", ge=1)
        check_range(self, "data_end_margin_days", ge=0.0)
        low, high = parse_time(self.min_time, "min_time"), parse_time(self.max_time, "max_time")
        if not low < high:
            raise ConfigError(
                f"min_time: must be before max_time, got min_time={self.min_time!r} max_time={self.max_time!r}"
            )
        if self.data_end is not None:
            parse_time(self.data_end, "data_end")


@dataclass
class ShardConfig:
    patients_per_shard: int = 2000
    # FHIR bundles converted together into one MEDS shard; bounds memory (a Synthea patient is ~4 MB of JSON)
    fhir_bundles_per_shard: int = 100
    # input events read per batch when streaming MEDS shards (bounds memory; whole patients are kept together)
    max_rows_per_batch: int = 2_000_000

    def validate(self) -> None:
        for name in ("patients_per_shard", "fhir_bundles_per_shard", "max_rows_per_batch"):
            check_range(self, name, ge=1)


@dataclass
class PrepareConfig:
    format: Literal["meds", "fhir"] = "meds"
    splits: SplitConfig = field(default_factory=SplitConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    visits: VisitConfig = field(default_factory=VisitConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    # YAML files (or names of shipped configs in data_shards/task_configs) with clinical task definitions
    tasks: list[str] = field(default_factory=lambda: ["ehrmamba", "heart_failure"])
    # parquet files in the MEDS label schema (subject_id, prediction_time, boolean_value), e.g. from ACES
    external_labels: list[str] = field(default_factory=list)
    # ACES task configs run over the MEDS data (data_shards/aces.py): task YAMLs, MEDS-DEV task folders, or
    # "demo" (the demo tasks as shipped ACES configs); aces_predicates: a predicates YAML or "synthea"
    aces_tasks: list[str] = field(default_factory=list)
    aces_predicates: str = ""

    def validate(self) -> None:
        for i, path in enumerate(self.external_labels):
            check_task_name(Path(path).stem, f"external_labels[{i}]", source=path)


@dataclass
class StreamSettings:
    """What a user chooses about a stream (``data_shards.stream``); pretraining's ``data.*`` keys are these
    fields (``PretrainDataConfig`` extends this class, so each is declared once)."""

    context_length: int = 512  # tokens per row
    batch_size: int = 8  # rows per batch
    mode: Literal["packed", "padded"] = "packed"
    long_sequences: Literal["truncate", "split"] = "split"
    shuffle_buffer: int = 1024  # documents
    pack_window: int = 64  # documents considered together by best-fit packing / length bucketing

    def validate(self) -> None:
        check_range(self, "context_length", ge=2)
        for name in ("batch_size", "shuffle_buffer", "pack_window"):
            check_range(self, name, ge=1)
