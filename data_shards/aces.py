"""Task labels from ACES task configs (the MEDS ecosystem's cohort definitions, also MEDS-DEV's task format).

``ehrfm prepare ... aces_tasks=[TASK ...]`` runs ACES (``aces-cli`` from its own environment,
:mod:`ehrfm.tool_envs`) over the MEDS data being prepared -- the input folder for MEDS input, ``OUT/events/`` for
FHIR input -- and turns each task's output into ehrfm label files exactly like external labels: the MEDS label
schema per split, the same no-leakage rule (model inputs are the tokens *strictly before* the prediction time,
whatever the ACES input window includes), and the same tallies in the manifest (labels, positives, rows of
subjects not in the corpus excluded as ``not_in_corpus``).

A TASK is
* an ACES task YAML (``trigger``, ``windows``, optionally ``predicates``), named by its file stem, or
  ``NAME=PATH`` to name it -- MEDS-DEV's tasks are such files (``tasks/readmission/general_hospital/30d.yaml``:
  ``aces_tasks=[readmission_30d=.../30d.yaml]``), their predicates left as ``???`` for a dataset to supply;
* ``demo``: ehrfm's demo tasks as shipped ACES configs (``task_configs/aces/``).

Predicates: ``aces_predicates`` names a predicates YAML that supplies or overrides the tasks' ``predicates``
(ACES' ``predicates_path``). ``synthea`` = the shipped predicates for the codes of ehrfm's FHIR conversion,
under ehrfm's names (``admission``, ``discharge``, ``death``) and MEDS-DEV's (``hospital_admission``,
``hospital_discharge``, ``death``): ``ENCOUNTER/IMP`` at admission, ``ENCOUNTER_END/IMP`` at discharge,
``MEDS_DEATH``. MEDS-DEV predicates Synthea cannot supply (``icu_admission``: Synthea has no ICU encounter
class) leave those tasks unmappable.

What ACES cannot express (kept as ehrfm task YAML, see the README): a label that is the *absence* of an event in
a window (ACES labels count a predicate; there is no negation), e.g. a stay longer than 7 days = no discharge
within 7 days of admission -- ACES gives its complement (``discharged_7d``); a censoring at the dataset's end
(ACES follows each patient's own record); a stay's start and end paired by encounter id.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import polars as pl

from ..tool_envs import run_tool
from .config import check_task_name
from .errors import DataError
from .tasks import read_external_labels

SHIPPED_PREDICATES = {"synthea": "synthea_predicates.yaml"}


def _shipped_dir() -> Path:
    return Path(str(resources.files("ehrfm.data_shards.task_configs") / "aces"))


def resolve_aces_tasks(specs: list[str]) -> list[tuple[str, Path]]:
    """(task name, task YAML) for each spec (see the module docstring); DataError for a missing one."""
    tasks: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        path = Path(rest if sep else spec)
        if spec == "demo":
            shipped = sorted(_shipped_dir().glob("*.yaml"))
            found = [(p.stem, p) for p in shipped if p.name not in SHIPPED_PREDICATES.values()]
        elif path.suffix in (".yaml", ".yml") and path.is_file():
            found = [(name if sep else path.stem, path)]
        else:
            raise DataError(f"aces_tasks: {spec!r} is neither an ACES task YAML ([NAME=]PATH) nor 'demo'")
        for name, file in found:
            check_task_name(name, "aces_tasks", source=str(file))
            if any(name == other for other, _ in tasks):
                raise DataError(f"aces_tasks: two tasks named {name!r} ({file})")
            tasks.append((name, file))
    return tasks


def resolve_predicates(spec: str) -> Path | None:
    """The predicates YAML ``aces_predicates`` names (a shipped name or a path), or None (the task YAMLs define
    their predicates)."""
    if not spec:
        return None
    if spec in SHIPPED_PREDICATES:
        return _shipped_dir() / SHIPPED_PREDICATES[spec]
    path = Path(spec)
    if not path.is_file():
        known = ", ".join(SHIPPED_PREDICATES)
        raise DataError(f"aces_predicates: {spec!r} is neither a file nor a shipped name ({known})")
    return path


def aces_labels(task_file: Path, meds_root: Path, predicates: Path | None, work: Path) -> pl.DataFrame:
    """Run ACES for one task over the MEDS folder ``meds_root``; returns subject_id, prediction_time,
    boolean_value (ACES' label count > 0). ``work`` is a scratch folder (removed)."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "labels.parquet"
    config_dir = work / "config"
    config_dir.mkdir(exist_ok=True)
    # aces-cli finds the task as <cohort_dir>/<cohort_name>.yaml
    shutil.copyfile(task_file, config_dir / "task.yaml")
    args = [
        f"cohort_dir={config_dir}",
        "cohort_name=task",
        "data.standard=meds",
        f"data.path={Path(meds_root).resolve() / 'data'}",
        f"output_filepath={out}",
        f"log_dir={work / 'logs'}",
        f"hydra.run.dir={work / 'hydra'}",
    ]
    if predicates is not None:
        args.append(f"predicates_path={Path(predicates).resolve()}")
    try:
        run_tool("aces", "aces-cli", args, cwd=work)
        if not out.exists():  # ACES writes nothing when no trigger matched
            return pl.DataFrame(
                schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean}
            )
        return read_external_labels(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
