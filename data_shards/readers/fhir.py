"""FHIR R4 -> MEDS-shaped event table.

Inputs: a folder of transaction/collection Bundles (one JSON per patient, as Synthea writes them) and/or
NDJSON resource files (one resource per line, bulk-export style). Output: polars DataFrames with the MEDS
columns ``subject_id, time, code, numeric_value, text_value`` plus ``encounter_id`` and ``event_type`` (extra
columns, allowed by MEDS), so one tokenizer serves MEDS and FHIR input alike.

Mapping (codes keep their system as a prefix, e.g. ``SNOMED/44054006``, ``LOINC/8480-6``):

==========================  =====================================================  ==========
resource                    event(s)                                               event_type
==========================  =====================================================  ==========
Patient                     MEDS_BIRTH at birthDate; GENDER/<g> (static, no time);   OTHER
                            MEDS_DEATH at deceasedDateTime
Encounter                   ENCOUNTER/<class> at period.start,                       OTHER
                            ENCOUNTER_END/<class> at period.end
Condition                   code at onsetDateTime (else recordedDate)                DX
Observation                 code (+ each component) with valueQuantity.value;       VIT/LAB/OTHER
                            category vital-signs -> VIT, laboratory -> LAB, else OTHER
MedicationRequest           medication code at authoredOn                            MED
MedicationAdministration    medication code at effectiveDateTime / effectivePeriod   MED
Procedure                   code at performedDateTime / performedPeriod.start        PRO
Immunization                vaccineCode at occurrenceDateTime                        IMM
==========================  =====================================================  ==========

Other resource types are ignored (counted). A resource of a mapped type without a code or a time is
dropped and tallied with its file and resource id (see :class:`FhirTally`), never silently.

A value that is not a JSON number (``valueQuantity.value`` or ``valueInteger`` given as a string such as
``"12.5"`` or ``"abc"``, a boolean, an object; a ``valueQuantity`` that is not an object) is not guessed at:
the event is kept without a numeric value, and the tally counts it under ``invalid_values`` with the first
20 resources (file and ``Observation/<id>``) in ``invalid_value_examples``. Finite numbers beyond float32's
range become inf here and are then nulled and counted by cleaning ("non_finite_numeric_values").

Subject ids are stable 63-bit hashes of the Patient resource id. A bundle file holds whole patients: a
patient whose resources are in two bundle files (or in a bundle and NDJSON) is a :class:`DataError` naming
both input files and the Patient id as written in the data, whatever ``shards.fhir_bundles_per_shard`` is.
NDJSON files may spread a patient's resources over files (bulk export).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson
import polars as pl

from ..errors import DataError
from . import EVENT_SCHEMA

SYSTEM_PREFIXES = {
    "http://snomed.info/sct": "SNOMED",
    "http://loinc.org": "LOINC",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RXNORM",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD10CM",
    "http://hl7.org/fhir/sid/icd-10": "ICD10",
    "http://hl7.org/fhir/sid/icd-9-cm": "ICD9CM",
    "http://hl7.org/fhir/sid/cvx": "CVX",
    "http://www.ama-assn.org/go/cpt": "CPT",
    "http://hl7.org/fhir/sid/ndc": "NDC",
    "http://www.whocc.no/atc": "ATC",
    "http://unitsofmeasure.org": "UCUM",
}
EVENT_COLUMNS = tuple(EVENT_SCHEMA)
MAX_EXAMPLES = 20  # examples of dropped resources kept in the tally


@functools.lru_cache(maxsize=4096)  # a bundle repeats its patient's reference in every resource
def subject_id_for(patient_ref: str) -> int:
    """Stable int64 subject id for a FHIR Patient id (or reference ``Patient/x`` / ``urn:uuid:x``)."""
    key = patient_ref.rsplit("/", 1)[-1].removeprefix("urn:uuid:")
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def _ref_id(ref: dict | None) -> str | None:
    if not ref:
        return None
    value = ref.get("reference")
    if not value:
        return None
    return value.rsplit("/", 1)[-1].removeprefix("urn:uuid:")


def system_prefix(system: str | None) -> str:
    if not system:
        return "UNKNOWN"
    if system in SYSTEM_PREFIXES:
        return SYSTEM_PREFIXES[system]
    tail = system.rstrip("/").rsplit("/", 1)[-1]
    return tail.upper().replace(" ", "_") or "UNKNOWN"


def _code_of(concept: dict | None, names: dict[str, str] | None = None) -> str | None:
    """``SYSTEM/code`` of the first coding of a CodeableConcept, or None. With ``names``, the coding's display
    text (else the concept's ``text``) is recorded for the code the first time it is seen."""
    if not isinstance(concept, dict):
        return None
    for coding in concept.get("coding") or ():
        code = coding.get("code") if isinstance(coding, dict) else None
        if code:
            full = f"{system_prefix(coding.get('system'))}/{code}"
            if names is not None and full not in names:
                display = coding.get("display") or concept.get("text")
                if isinstance(display, str) and display:
                    names[full] = display
            return full
    return None


@dataclasses.dataclass
class FhirTally:
    """Counts of what the converter read, emitted and dropped (goes into manifest.json)."""

    files: int = 0
    resources: Counter = dataclasses.field(default_factory=Counter)
    ignored_types: Counter = dataclasses.field(default_factory=Counter)
    dropped: Counter = dataclasses.field(default_factory=Counter)
    examples: list = dataclasses.field(default_factory=list)
    events: int = 0
    # values kept out of numeric_value because they are not JSON numbers (reason -> count), with examples
    invalid_values: Counter = dataclasses.field(default_factory=Counter)
    invalid_value_examples: list = dataclasses.field(default_factory=list)
    # code -> its display text in the data (first seen), for the MEDS codes.parquet; not part of to_dict()
    code_names: dict = dataclasses.field(default_factory=dict)

    def invalid_value(self, reason: str, file: Path | str, resource: dict) -> None:
        self.invalid_values[reason] += 1
        if len(self.invalid_value_examples) < MAX_EXAMPLES:
            self.invalid_value_examples.append(
                {
                    "reason": reason,
                    "file": str(file),
                    "resource": f"{resource.get('resourceType')}/{resource.get('id')}",
                }
            )

    def drop(self, reason: str, file: Path | str, resource: dict) -> None:
        self.dropped[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(
                {
                    "reason": reason,
                    "file": str(file),
                    "resource": f"{resource.get('resourceType')}/{resource.get('id')}",
                }
            )

    def merge(self, other: FhirTally) -> None:
        self.files += other.files
        self.resources.update(other.resources)
        self.ignored_types.update(other.ignored_types)
        self.dropped.update(other.dropped)
        self.events += other.events
        self.examples.extend(other.examples[: max(0, MAX_EXAMPLES - len(self.examples))])
        self.invalid_values.update(other.invalid_values)
        for code, name in other.code_names.items():
            self.code_names.setdefault(code, name)
        room = max(0, MAX_EXAMPLES - len(self.invalid_value_examples))
        self.invalid_value_examples.extend(other.invalid_value_examples[:room])

    def to_dict(self) -> dict:
        return {
            "files": self.files,
            "resources": dict(self.resources),
            "ignored_resource_types": dict(self.ignored_types),
            "dropped": dict(self.dropped),
            "dropped_examples": self.examples,
            "events": self.events,
            "invalid_values": dict(self.invalid_values),
            "invalid_value_examples": self.invalid_value_examples,
        }


class _EventBuffer:
    """Column lists filled resource by resource; times stay strings until one vectorized parse."""

    def __init__(self) -> None:
        self.cols: dict[str, list] = {c: [] for c in EVENT_COLUMNS}
        self.sources: list[str] = []  # "file|Resource/id" per event, for error messages on bad times
        self.patient_ids: dict[int, str] = {}  # subject id -> the Patient id as written (for error messages)

    def add(self, subject, time, code, value, text, encounter, etype, source) -> None:
        c = self.cols
        c["subject_id"].append(subject)
        c["time"].append(time)
        c["code"].append(code)
        c["numeric_value"].append(value)
        c["text_value"].append(text)
        c["encounter_id"].append(encounter)
        c["event_type"].append(etype)
        self.sources.append(source)

    def __len__(self) -> int:
        return len(self.sources)


_OBS_CATEGORY_TYPES = {"vital-signs": "VIT", "laboratory": "LAB"}


def _observation_type(resource: dict) -> str:
    for category in resource.get("category") or ():
        for coding in category.get("coding") or ():
            etype = _OBS_CATEGORY_TYPES.get(coding.get("code"))
            if etype:
                return etype
    return "OTHER"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _quantity(item: dict, invalid) -> tuple[float | None, str | None]:
    """(numeric value, text value) of an Observation or component; ``invalid(reason)`` is called for a value
    that is present but not a JSON number (the event then has no numeric value)."""
    quantity = item.get("valueQuantity")
    if quantity is not None:
        if not isinstance(quantity, dict):
            invalid("valueQuantity_not_an_object")
            return None, None
        value = quantity.get("value")
        if _is_number(value):
            return float(value), None
        if value is not None:
            invalid("valueQuantity.value_not_a_number")
            return None, None
    concept = item.get("valueCodeableConcept")
    if concept:
        return None, _code_of(concept)
    for key in ("valueString", "valueBoolean", "valueInteger"):
        if key in item:
            value = item[key]
            if key == "valueInteger":
                if _is_number(value):
                    return float(value), None
                invalid("valueInteger_not_a_number")
                return None, None
            return None, str(value)
    return None, None


def _convert_resource(resource: dict, source_file: Path, out: _EventBuffer, tally: FhirTally) -> None:
    rtype = resource.get("resourceType")
    tally.resources[rtype] += 1
    if rtype != "Patient" and rtype not in _TIME_FIELDS:  # before any other work: most resources are ignored
        tally.ignored_types[rtype] += 1
        return
    rid = resource.get("id")
    source = f"{source_file}|{rtype}/{rid}"
    if rtype == "Patient":
        if not rid:
            raise DataError(f"{source_file}: Patient resource without an id")
        sid = subject_id_for(rid)
        out.patient_ids[sid] = rid
        birth = resource.get("birthDate")
        if birth:
            out.add(sid, birth, "MEDS_BIRTH", None, None, None, "OTHER", source)
        else:
            tally.drop("patient_without_birthDate", source_file, resource)
        gender = resource.get("gender")
        if gender:
            out.add(sid, None, f"GENDER/{gender.upper()}", None, None, None, "OTHER", source)
        death = resource.get("deceasedDateTime")
        if death:
            out.add(sid, death, "MEDS_DEATH", None, None, None, "OTHER", source)
        return
    subject_ref = _ref_id(resource.get("subject") or resource.get("patient"))
    if subject_ref is None:
        tally.drop("no_subject", source_file, resource)
        return
    sid = subject_id_for(subject_ref)
    out.patient_ids.setdefault(sid, subject_ref)
    time = _time_of(resource, rtype)
    if time is None:
        tally.drop("no_time", source_file, resource)
        return
    encounter = _ref_id(resource.get("encounter") or resource.get("context"))
    if rtype == "Encounter":
        klass = resource.get("class")
        if isinstance(klass, list):  # R5 / some US-Core profiles: a list of CodeableConcepts
            klass = (klass[0].get("coding") or [{}])[0] if klass else None
        code = (klass or {}).get("code")
        if not code:
            tally.drop("no_code", source_file, resource)
            return
        out.add(sid, time, f"ENCOUNTER/{code}", None, None, rid, "OTHER", source)
        end = (resource.get("period") or {}).get("end")
        if end:
            out.add(sid, end, f"ENCOUNTER_END/{code}", None, None, rid, "OTHER", source)
        return
    if rtype == "Observation":
        etype = _observation_type(resource)
        code = _code_of(resource.get("code"), tally.code_names)
        components = resource.get("component") or ()
        if code is None and not components:
            tally.drop("no_code", source_file, resource)
            return

        def invalid(reason: str) -> None:
            tally.invalid_value(reason, source_file, resource)

        value, text = _quantity(resource, invalid)
        if components:
            for component in components:
                ccode = _code_of(component.get("code"), tally.code_names)
                if ccode is None:
                    tally.drop("component_without_code", source_file, resource)
                    continue
                cvalue, ctext = _quantity(component, invalid)
                out.add(sid, time, ccode, cvalue, ctext, encounter, etype, source)
            if value is None and text is None:
                return  # the panel itself carries no value: its components are the events
        out.add(sid, time, code, value, text, encounter, etype, source)
        return
    concept_field, etype = _CODE_FIELDS[rtype]
    code = _code_of(resource.get(concept_field), tally.code_names)
    if code is None:
        tally.drop("no_code", source_file, resource)
        return
    out.add(sid, time, code, None, None, encounter, etype, source)


_CODE_FIELDS = {
    "Condition": ("code", "DX"),
    "MedicationRequest": ("medicationCodeableConcept", "MED"),
    "MedicationAdministration": ("medicationCodeableConcept", "MED"),
    "Procedure": ("code", "PRO"),
    "Immunization": ("vaccineCode", "IMM"),
}
_TIME_FIELDS = {
    "Encounter": (("period", "start"),),
    "Condition": ("onsetDateTime", ("onsetPeriod", "start"), "recordedDate"),
    "Observation": ("effectiveDateTime", ("effectivePeriod", "start"), "issued"),
    "MedicationRequest": ("authoredOn",),
    "MedicationAdministration": ("effectiveDateTime", ("effectivePeriod", "start")),
    "Procedure": ("performedDateTime", ("performedPeriod", "start")),
    "Immunization": ("occurrenceDateTime", "recorded"),
}


def _time_of(resource: dict, rtype: str) -> str | None:
    for field in _TIME_FIELDS[rtype]:
        if isinstance(field, tuple):
            value = (resource.get(field[0]) or {}).get(field[1])
        else:
            value = resource.get(field)
        if value:
            return value
    return None


def parse_fhir_times(values: pl.Series) -> pl.Series:
    """FHIR date/dateTime/instant strings -> UTC ``datetime[us]`` (naive, as MEDS wants).

    Accepts ``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD`` and datetimes with or without fractional seconds and
    offsets; anything else becomes null (callers report it).
    """
    s = values.cast(pl.String)
    s = pl.when(s.str.len_chars() == 4).then(s + "-01-01").when(s.str.len_chars() == 7).then(s + "-01").otherwise(s)
    frame = pl.DataFrame({"s": values.cast(pl.String)}).with_columns(s=s)
    col = pl.col("s")
    with_tz = col.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%:z", strict=False, time_unit="us", time_zone="UTC")
    with_z = col.str.replace(r"Z$", "+00:00").str.to_datetime(
        "%Y-%m-%dT%H:%M:%S%.f%:z", strict=False, time_unit="us", time_zone="UTC"
    )
    naive = col.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", strict=False, time_unit="us")
    date_only = col.str.to_date("%Y-%m-%d", strict=False).cast(pl.Datetime("us"))
    parsed = frame.select(
        pl.coalesce(
            with_tz.dt.replace_time_zone(None),
            with_z.dt.replace_time_zone(None),
            naive,
            date_only,
        ).alias("time")
    )
    return parsed["time"]


def _to_frame(buffer: _EventBuffer, tally: FhirTally) -> pl.DataFrame:
    if not len(buffer):
        return empty_events()
    raw_time = pl.Series("time", buffer.cols["time"], dtype=pl.String)
    time = parse_fhir_times(raw_time)
    bad = (time.is_null() & raw_time.is_not_null()).arg_true()
    if len(bad):
        first = int(bad[0])
        where = buffer.sources[first].split("|")
        raise DataError(
            f"{where[0]}: resource {where[1]} has an unparseable time {buffer.cols['time'][first]!r} "
            f"({len(bad)} such values in this batch)"
        )
    columns = {
        name: pl.Series(buffer.cols[name], dtype=dtype) for name, dtype in EVENT_SCHEMA.items() if name != "time"
    }
    frame = pl.DataFrame({**columns, "time": time}).select(list(EVENT_SCHEMA))
    tally.events += frame.height
    return frame


def empty_events() -> pl.DataFrame:
    return pl.DataFrame(schema=EVENT_SCHEMA)


def file_digest(data: bytes) -> bytes:
    """The per-file content hash that :func:`ehrfm.data_shards.prepare.source_fingerprint` folds in."""
    return hashlib.blake2b(data, digest_size=16).digest()


def _load_json(path: Path, digests: dict[Path, bytes] | None = None) -> dict:
    data = path.read_bytes()
    if digests is not None:
        digests[path] = file_digest(data)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as err:
        kind = "not valid UTF-8" if "utf-8" in str(err).lower() else "truncated or malformed JSON"
        raise DataError(f"{path}: {kind} ({err})") from None


def _bundle_resources(path: Path, digests: dict[Path, bytes] | None = None) -> Iterator[dict]:
    bundle = _load_json(path, digests)
    if not isinstance(bundle, dict):
        raise DataError(f"{path}: expected a FHIR resource object, got {type(bundle).__name__}")
    if bundle.get("resourceType") != "Bundle":
        yield bundle  # a single resource per file is accepted too
        return
    for i, entry in enumerate(bundle.get("entry") or ()):
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            raise DataError(f"{path}: Bundle.entry[{i}] has no resource")
        yield resource


def _ndjson_resources(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open("rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, orjson.loads(line)
            except orjson.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: invalid NDJSON line ({err})") from None


def list_fhir_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(bundle JSON files, NDJSON files) under ``root`` (or ``root/fhir`` as Synthea writes), sorted."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"input folder {root} does not exist")
    if root.is_file():
        files = [root]
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file())
    bundles = [p for p in files if p.suffix == ".json"]
    ndjson = [p for p in files if p.suffix == ".ndjson"]
    if not bundles and not ndjson:
        raise DataError(f"{root}: no FHIR files (*.json bundles or *.ndjson) found")
    return bundles, ndjson


def split_patient_error(patient: str, first: Path, second: Path) -> DataError:
    return DataError(
        f"Patient {patient} is split over two bundle files, {first} and {second}; a bundle file must hold all "
        f"resources of its patients (merge them, or provide the resources as NDJSON)"
    )


def claim_patient(owners: dict[int, Path], sid: int, path: Path, patient_ids: dict[int, str]) -> None:
    """Records ``path`` as the bundle file holding subject ``sid``; a second file is a :class:`DataError`
    naming both files and the Patient id as written (``patient_ids``)."""
    first = owners.setdefault(sid, path)
    if first != path:
        raise split_patient_error(patient_ids.get(sid, str(sid)), first, path)


def read_bundle_files(
    paths: Iterable[Path],
    tally: FhirTally,
    owners: dict[int, Path] | None = None,
    *,
    patient_ids: dict[int, str] | None = None,
    digests: dict[Path, bytes] | None = None,
) -> pl.DataFrame:
    """Events of a group of bundle files (each normally one patient), as one DataFrame.

    ``owners`` (subject id -> bundle file), shared over the calls of one conversion, makes a patient found in
    two bundle files a :class:`DataError` naming both files and the Patient id. ``patient_ids`` receives
    subject id -> Patient id as written, ``digests`` each file's :func:`file_digest` (read once for both).
    """
    owners = {} if owners is None else owners
    buffer = _EventBuffer()
    for path in paths:
        tally.files += 1
        start = len(buffer)
        for resource in _bundle_resources(path, digests):
            _convert_resource(resource, path, buffer, tally)
        for sid in sorted(set(buffer.cols["subject_id"][start:])):
            claim_patient(owners, sid, path, buffer.patient_ids)
    if patient_ids is not None:
        patient_ids.update(buffer.patient_ids)
    return _to_frame(buffer, tally)


@dataclasses.dataclass
class BundleGroup:
    """Bundle files converted together into one MEDS shard file ``out`` (written only if it has events)."""

    paths: list[Path]
    out: Path


@dataclasses.dataclass
class BundleGroupResult:
    events: int
    tally: FhirTally
    owners: dict[int, Path]  # subject id -> its bundle file, in the order first seen
    patient_ids: dict[int, str]  # subject id -> Patient id as written (error messages)
    digests: dict[Path, bytes]  # bundle file -> file_digest of its bytes


def convert_bundle_group(group: BundleGroup, _context: None = None) -> BundleGroupResult:
    """One group of bundle files -> ``group.out`` (a MEDS data shard) and what the parent folds in (a
    :meth:`ehrfm.data_shards.parallel.ShardPool.map` function; it needs no shared context)."""
    from ..meds_dataset import write_shard

    tally, owners, patient_ids, digests = FhirTally(), {}, {}, {}
    frame = read_bundle_files(group.paths, tally, owners, patient_ids=patient_ids, digests=digests)
    if frame.height:
        write_shard(frame, group.out)
    return BundleGroupResult(frame.height, tally, owners, patient_ids, digests)


def iter_ndjson_events(
    path: Path, tally: FhirTally, chunk_lines: int = 200_000, bundle_owners: dict[int, Path] | None = None
) -> Iterator[pl.DataFrame]:
    """Events of one NDJSON file in chunks (resources of one patient may span NDJSON files, but not a bundle
    file and an NDJSON file: ``bundle_owners`` from :func:`read_bundle_files` makes that a DataError)."""
    tally.files += 1
    buffer = _EventBuffer()

    def flush() -> pl.DataFrame:
        if bundle_owners:
            for sid in sorted(set(buffer.cols["subject_id"])):
                if sid in bundle_owners:
                    raise split_patient_error(buffer.patient_ids.get(sid, str(sid)), bundle_owners[sid], path)
        return _to_frame(buffer, tally)

    for line_no, resource in _ndjson_resources(path):
        if not isinstance(resource, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object")
        _convert_resource(resource, Path(f"{path}:{line_no}"), buffer, tally)
        if len(buffer) >= chunk_lines:
            yield flush()
            buffer = _EventBuffer()
    if len(buffer):
        yield flush()
