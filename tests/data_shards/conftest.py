"""Shared data fixtures: a meds-testing-helpers dataset, a small cached Synthea cohort and a hand-built FHIR
bundle whose every token and label is known."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from ehrfm.data_shards.config import PrepareConfig
from ehrfm.data_shards.prepare import prepare
from ehrfm.data_shards.synthea import generate_cohort


@pytest.fixture(scope="session")
def meds_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("meds") / "dataset"
    exe = Path(sys.executable).with_name("build_sample_MEDS_dataset")
    subprocess.run([str(exe), f"output_dir={root}", "N_subjects=120", "seed=3"], check=True, capture_output=True)
    return root


@pytest.fixture(scope="session")
def synthea_fhir() -> Path:
    """Six older Synthea patients (~10 s the first time, then cached)."""
    return generate_cohort(6, seed=11, age="55-90", threads=1)


@pytest.fixture(scope="session")
def synthea_prepared(synthea_fhir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prep") / "synthea"
    cfg = PrepareConfig(format="fhir", tasks=["demo", "ehrmamba", "heart_failure"])
    cfg.shards.patients_per_shard = 2
    manifest = prepare(synthea_fhir, out, cfg, progress=False)
    return out, manifest


@pytest.fixture(scope="session")
def stream_data(synthea_fhir, meds_dataset, tmp_path_factory) -> dict:
    """Prepared corpora whose pretraining split holds every patient: Synthea (long sequences, context 256)
    and meds-testing-helpers (short sequences, context 16)."""
    root = tmp_path_factory.mktemp("stream")
    out = {}
    for name, source, fmt, context in (("synthea", synthea_fhir, "fhir", 256), ("meds", meds_dataset, "meds", 16)):
        cfg = PrepareConfig(format=fmt, tasks=[])
        cfg.splits.pretrain, cfg.splits.finetune, cfg.splits.test, cfg.splits.val_fraction = 1.0, 0.0, 0.0, 0.0
        cfg.splits.respect_meds_splits = False
        cfg.shards.patients_per_shard = 7
        prepare(source, root / name, cfg, progress=False)
        out[name] = (root / name, context)
    return out


def _res(kind: str, rid: str, **fields) -> dict:
    return {"fullUrl": f"urn:uuid:{rid}", "resource": {"resourceType": kind, "id": rid, **fields}}


def tiny_bundle() -> dict:
    """One patient born 1950-01-01, two inpatient stays (10 days and 2 days, 20 days apart), death 2001-03-01."""
    subj = {"reference": "urn:uuid:p1"}
    snomed = "http://snomed.info/sct"
    loinc = "http://loinc.org"

    def enc(eid, start, end):
        return _res(
            "Encounter",
            eid,
            status="finished",
            subject=subj,
            **{"class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"}},
            period={"start": start, "end": end},
        )

    entries = [
        _res("Patient", "p1", birthDate="1950-01-01", gender="female", deceasedDateTime="2001-03-01T00:00:00+00:00"),
        enc("e1", "2001-01-01T08:00:00+00:00", "2001-01-11T08:00:00+00:00"),
        _res(
            "Condition",
            "c1",
            subject=subj,
            encounter={"reference": "urn:uuid:e1"},
            code={"coding": [{"system": snomed, "code": "88805009"}]},
            onsetDateTime="2001-01-01T09:00:00+00:00",
        ),
        _res(
            "Observation",
            "o1",
            subject=subj,
            encounter={"reference": "urn:uuid:e1"},
            category=[{"coding": [{"code": "vital-signs"}]}],
            code={"coding": [{"system": loinc, "code": "8867-4"}]},
            effectiveDateTime="2001-01-01T10:00:00+00:00",
            valueQuantity={"value": 80.0, "unit": "/min"},
        ),
        _res(
            "MedicationRequest",
            "m1",
            subject=subj,
            encounter={"reference": "urn:uuid:e1"},
            medicationCodeableConcept={
                "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197361"}]
            },
            authoredOn="2001-01-10T08:00:00+00:00",
        ),
        enc("e2", "2001-01-31T08:00:00+00:00", "2001-02-02T08:00:00+00:00"),
        _res(
            "Procedure",
            "x1",
            subject=subj,
            encounter={"reference": "urn:uuid:e2"},
            code={"coding": [{"system": snomed, "code": "430193006"}]},
            performedDateTime="2001-01-31T09:00:00+00:00",
        ),
        _res(
            "Immunization",
            "i1",
            patient=subj,
            encounter={"reference": "urn:uuid:e2"},
            vaccineCode={"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "140"}]},
            occurrenceDateTime="2001-02-01T09:00:00+00:00",
        ),
    ]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def write_bundle(folder: Path, bundle: dict, name: str = "p1.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(orjson.dumps(bundle))
    return path


@pytest.fixture
def tiny_fhir_dir(tmp_path) -> Path:
    write_bundle(tmp_path / "fhir", tiny_bundle())
    return tmp_path / "fhir"


@pytest.fixture
def bundle_factory():
    return lambda: copy.deepcopy(tiny_bundle())
