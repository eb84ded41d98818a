"""Typed configuration of `ehrfm prepare` (YAML + ``key=value`` overrides, see :mod:`ehrfm.config`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


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


@dataclass
class VocabConfig:
    """Vocabulary: value bins (003: b = 5 or 10), code hierarchy truncation, minimum frequency."""

    num_bins: int = 10
    # Truncate ICD codes to this many characters of the code proper (003: level 3 "I50" or level 4 "I509").
    # None keeps them whole. Applies to prefixes listed in icd_prefixes.
    icd_level: Optional[int] = None
    icd_prefixes: list[str] = field(default_factory=lambda: ["ICD10CM", "ICD10", "ICD9CM", "ICD9"])
    min_frequency: int = 1  # codes seen fewer times in the pretraining split map to [UNK]
    max_values_per_code: int = 20000  # reservoir size for learning quantile bin edges
    # Task tokens reserved for multitask prompted finetuning: every configured task's token, plus these.
    extra_task_tokens: list[str] = field(default_factory=list)


@dataclass
class VisitConfig:
    """How events are grouped into visits.

    With an encounter column (FHIR input, or MEDS extra column) each encounter is a visit. Otherwise
    consecutive events less than ``gap_hours`` apart form one visit.
    """

    encounter_column: str = "encounter_id"
    gap_hours: float = 24.0


@dataclass
class HistoryConfig:
    """003 section 3.5.3 history options, applied before tokenization.

    lookback: "all", "latest_visit", "1y" or "3y": pretraining splits relative to the end of the patient's
        last visit; task examples relative to their prediction time (``examples.cut_at``), never to the
        record's end, which would leak the outcome.
    aggregate_days: average repeated numeric events of the same code within windows of w days (0 = off).
    concept_groups: token types kept (003 3.5.4 augmentation: DX, VIT, LAB, MED, PRO, IMM, OTHER).
    """

    lookback: Literal["all", "latest_visit", "1y", "3y"] = "all"
    aggregate_days: float = 0.0
    concept_groups: list[str] = field(default_factory=lambda: ["DX", "MED", "LAB", "PRO", "VIT", "IMM", "OTHER"])


@dataclass
class CleaningConfig:
    """Documented handling of bad rows; every dropped row is tallied in manifest.json."""

    drop_duplicates: bool = True
    # Events this long after death are dropped (Synthea writes some events after death).
    after_death_tolerance_hours: float = 24.0
    drop_before_birth: bool = True
    min_events_per_patient: int = 1


@dataclass
class ShardConfig:
    patients_per_shard: int = 2000
    # FHIR bundles converted together into one MEDS shard; bounds memory (a Synthea patient is ~4 MB of JSON)
    fhir_bundles_per_shard: int = 100
    # input events read per batch when streaming MEDS shards (bounds memory; whole patients are kept together)
    max_rows_per_batch: int = 2_000_000


@dataclass
class PrepareConfig:
    format: Literal["meds", "fhir"] = "meds"
    splits: SplitConfig = field(default_factory=SplitConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    visits: VisitConfig = field(default_factory=VisitConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    # YAML files (or names of shipped configs under configs/tasks) with clinical task definitions
    tasks: list[str] = field(default_factory=lambda: ["ehrmamba", "heart_failure"])
    # parquet files in the MEDS label schema (subject_id, prediction_time, boolean_value), e.g. from ACES
    external_labels: list[str] = field(default_factory=list)
