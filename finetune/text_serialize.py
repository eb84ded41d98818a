"""A patient's history before a prediction time as clinical text (002's input for BERT-family encoders).

Input: the MEDS events a prepared folder was made from (``OUT/events/`` for FHIR input, the MEDS input folder
otherwise; :func:`ehrfm.data_shards.meds_dataset.source_of`) and, where the data has one, its
``metadata/codes.parquet`` (code -> description). Each label row (subject_id, prediction_time) becomes one text.

No leakage: only events whose time is *strictly before* the prediction time are rendered -- the rule of the
token path (:func:`ehrfm.data_shards.examples.cut_at`) -- plus the static events (no time: sex, race,
ethnicity). A visit's end is written only when its end event lies before the prediction time.

Template (deterministic: events sorted by time then code; one line per item kind)::

    Patient: 74-year-old female. Race: white. Ethnicity: hispanic.
    History before 2020-05-01.
    (12 earlier visits omitted.)
    Visit on 2019-11-02 (inpatient), ended 2019-11-09:
    Diagnoses: Essential hypertension; Prediabetes.
    Procedures: Electrocardiographic procedure.
    Medications: lisinopril 10 MG Oral Tablet.
    Immunizations: Influenza, seasonal, injectable.
    Labs: Hemoglobin A1c 6.1 %; Glucose 102 mg/dL.
    Vitals: Heart rate 72 /min; Body weight 80.1 kg.
    Other: Tobacco smoking status Never smoked tobacco.
    Entries on 2019-12-01 (outside a visit):
    Diagnoses: Chronic sinusitis.

* Header (always kept): age in whole years at the prediction time (from ``MEDS_BIRTH``), sex (``GENDER/`` or
  ``SEX/`` codes), race and ethnicity (``RACE/``, ``ETHNICITY/``) when present, the prediction date.
* One block per visit (the events' ``encounter_id``; events without one are grouped per calendar day as
  "Entries on DATE (outside a visit)"), oldest first, dated by its first event; the type from its
  ``ENCOUNTER/<type>`` code (AMB ambulatory, EMER emergency, IMP inpatient, HH home health, else the code).
* Inside a block one line per kind, in the order shown: the ``event_type`` column when the data has it (DX,
  PRO, MED, IMM, LAB, VIT, OTHER), else a guess from the code's vocabulary (ICD -> diagnoses, RXNORM/ATC ->
  medications, LOINC -> labs, CVX -> immunizations, ...). Each code appears once per visit, at its first
  time, with its latest value in the visit: the number (4 significant digits) and its unit when the data
  has one (an events ``unit`` column, else a ``unit`` column of codes.parquet), or the text value (a coded
  value is described too).
* Names: the code's description from codes.parquet, else the code itself (``LOINC/8867-4``).

Long histories -- truncation, not chunking: an encoder sees ``max_length`` wordpieces at most, and the recent
past predicts best, so the header is always kept and then the *most recent* whole visits that fit are kept
(newest last, as in the full text), with a line "(N earlier visits omitted.)"; of the first visit that does not
fit whole, its header and its first lines that fit are kept too, the last of them cut to its first items that
fit (diagnoses come first, labs and vitals last), and the older ones go (a partly kept visit counts as kept). Wordpieces are counted per line with the encoder's
tokenizer (exact for BERT WordPiece, whose pre-tokenizer splits on whitespace); the tokenizer's own
truncation at ``max_length`` remains the hard limit. One text per row keeps the encoder's cost per row fixed
and lets the ALFIA head attend over a single sequence; chunking + pooling is not done.
"""

from __future__ import annotations

import bisect
import datetime as dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ehrfm.errors import EhrfmError

KINDS = (
    ("DX", "Diagnoses"),
    ("PRO", "Procedures"),
    ("MED", "Medications"),
    ("IMM", "Immunizations"),
    ("LAB", "Labs"),
    ("VIT", "Vitals"),
    ("OTHER", "Other"),
)
KIND_LABEL = dict(KINDS)
# code vocabulary -> kind, for MEDS data without an event_type column
PREFIX_KIND = {
    "ICD9CM": "DX",
    "ICD10CM": "DX",
    "ICD9": "DX",
    "ICD10": "DX",
    "DIAGNOSIS": "DX",
    "ICD9PCS": "PRO",
    "ICD10PCS": "PRO",
    "CPT": "PRO",
    "PROCEDURE": "PRO",
    "RXNORM": "MED",
    "ATC": "MED",
    "NDC": "MED",
    "MEDICATION": "MED",
    "LOINC": "LAB",
    "LAB": "LAB",
    "CVX": "IMM",
}
VISIT_TYPES = {"AMB": "ambulatory", "EMER": "emergency", "IMP": "inpatient", "HH": "home health"}
STATIC_PREFIXES = {"GENDER": "sex", "SEX": "sex", "RACE": "race", "ETHNICITY": "ethnicity"}
BIRTH, VISIT_START, VISIT_END = "MEDS_BIRTH", "ENCOUNTER", "ENCOUNTER_END"


Line = tuple[list[str], str]  # items and end of one rendered line: "; ".join(items) + end


class TextInputError(EhrfmError, ValueError):
    """Data or encoder the text path cannot use; names the file or argument."""


@dataclass(frozen=True)
class Event:
    time: dt.datetime
    code: str
    kind: str
    visit: str
    value: str | None  # rendered value (number [unit] or text), or None


def _prefix(code: str) -> str:
    return code.split("/", 1)[0].upper()


def format_number(value: float) -> str:
    """4 significant digits, no exponent for ordinary lab magnitudes (13.4, 124.5, 0.0123, 1.235e+05)."""
    return f"{value:.4g}"


class HistoryTexts:
    """Renders the text of label rows of one prepared folder (see the module docstring).

    ``events``: the MEDS data folder (``<root>/data``) or a frame; ``codes``: a codes.parquet path (optional);
    ``subjects``: only these subjects' events are read."""

    def __init__(self, events: Path | pl.DataFrame, codes: Path | None = None, subjects: Sequence[int] | None = None):
        frame = events if isinstance(events, pl.DataFrame) else _read_events(Path(events), subjects)
        self.names, units = _read_codes(codes)
        self._by_subject: dict[int, tuple[list[Event], list[dt.datetime], dict[str, str], dt.datetime | None]] = {}
        self._group(frame, units)

    def describe(self, code: str) -> str:
        return self.names.get(code) or code

    def _group(self, frame: pl.DataFrame, units: dict[str, str]) -> None:
        for col, dtype in (("encounter_id", pl.String), ("event_type", pl.String), ("unit", pl.String)):
            if col not in frame.columns:
                frame = frame.with_columns(pl.lit(None, dtype=dtype).alias(col))
        frame = frame.sort("subject_id", "time", "code", nulls_last=False)
        for (sid,), part in frame.group_by("subject_id", maintain_order=True):
            events, static, birth = [], {}, None
            for time, code, num, text, enc, etype, unit in part.select(
                "time", "code", "numeric_value", "text_value", "encounter_id", "event_type", "unit"
            ).iter_rows():
                prefix = _prefix(code)
                if code == BIRTH:
                    birth = time
                    continue
                if time is None:
                    if prefix in STATIC_PREFIXES:
                        static.setdefault(STATIC_PREFIXES[prefix], code.split("/", 1)[-1].lower())
                    continue
                value = None
                if num is not None and not math.isnan(num):
                    unit = unit or units.get(code)
                    value = format_number(float(num)) + (f" {unit}" if unit else "")
                elif text:
                    value = self.describe(text)
                kind = etype if etype in KIND_LABEL else PREFIX_KIND.get(prefix, "OTHER")
                visit = enc if enc else f"day:{time.date().isoformat()}"
                events.append(Event(time, code, kind, visit, value))
            self._by_subject[int(sid)] = (events, [e.time for e in events], static, birth)

    def blocks(self, subject_id: int, prediction_time: dt.datetime) -> tuple[list[str], list[list[Line]]]:
        """(header lines, visit blocks oldest first) of the history before the time; a block is a list of lines,
        a line its items and its end (``"; ".join(items) + end``), the visit's header line first."""
        events, times, static, birth = self._by_subject.get(int(subject_id), ([], [], {}, None))
        cut = bisect.bisect_left(times, prediction_time)  # events strictly before the prediction time
        return _header(static, birth, prediction_time), self._visit_blocks(events[:cut])

    def _visit_blocks(self, events: list[Event]) -> list[list[Line]]:
        visits: dict[str, list[Event]] = {}
        for e in events:
            visits.setdefault(e.visit, []).append(e)
        blocks = []
        for key, evs in visits.items():  # insertion order = first event time, then code
            start = evs[0].time.date().isoformat()
            kinds = [_prefix(e.code) for e in evs]
            if key.startswith("day:"):
                head = f"Entries on {start} (outside a visit):"
            else:
                kind = next((e.code.split("/", 1)[-1] for e, p in zip(evs, kinds) if p == VISIT_START), None)
                end = next((e.time for e, p in zip(evs, kinds) if p == VISIT_END), None)
                head = f"Visit on {start}" + (f" ({VISIT_TYPES.get(kind, kind.lower())})" if kind else "")
                head += f", ended {end.date().isoformat()}:" if end is not None else ":"
            items: dict[str, dict[str, str | None]] = {k: {} for k, _ in KINDS}
            for e, p in zip(evs, kinds):
                if p in (VISIT_START, VISIT_END):
                    continue
                latest = items[e.kind]
                if e.code not in latest or e.value is not None:
                    latest[e.code] = e.value if e.value is not None else latest.get(e.code)
            lines: list[Line] = [([head], "")]
            for kind, label in KINDS:
                if items[kind]:
                    rendered = [self.describe(c) + (f" {v}" if v else "") for c, v in items[kind].items()]
                    rendered[0] = f"{label}: {rendered[0]}"
                    lines.append((rendered, "."))
            blocks.append(lines)
        return blocks

    def render(
        self,
        subject_id: int,
        prediction_time: dt.datetime,
        count: Callable[[list[str]], list[int]] | None = None,
        budget: int | None = None,
    ) -> tuple[str, int, int]:
        """(text, visits in the history, visits kept). With ``count`` (wordpieces per line) and ``budget``
        (wordpieces allowed), the truncation rule of the module docstring applies."""
        header, blocks = self.blocks(subject_id, prediction_time)
        kept = blocks if count is None or budget is None else fit_blocks(header, blocks, count, budget)
        lines = list(header)
        if len(kept) < len(blocks):
            lines.append(omitted_line(len(blocks) - len(kept)))
        lines += ["; ".join(items) + end for block in kept for items, end in block]
        return "\n".join(lines), len(blocks), len(kept)


def omitted_line(n: int) -> str:
    return f"({n} earlier visit{'s' if n != 1 else ''} omitted.)"


def fit_blocks(
    header: list[str], blocks: list[list[Line]], count: Callable[[list[str]], list[int]], budget: int
) -> list[list[Line]]:
    """The most recent whole blocks (oldest first) that fit in ``budget`` wordpieces beside the header and the
    omission line, then, of the next older block, its header and first lines -- the last one cut to its first
    items -- that fit (when at least one item does). A line costs its items' wordpieces plus one per ``;``
    separator and one for its end ``.``."""
    left = budget - sum(count(header))
    if blocks:
        left -= count([omitted_line(len(blocks))])[0]  # reserved even when nothing is omitted
    kept: list[list[Line]] = []
    for block in reversed(blocks):
        sizes = count([item for items, _ in block for item in items])
        costs, start = [], 0
        for items, _end in block:
            costs.append([*sizes[start : start + len(items)]])
            start += len(items)
        total = sum(sum(c) + len(c) - 1 + (1 if end else 0) for c, (_, end) in zip(costs, block))
        if total <= left:
            kept.append(block)
            left -= total
            continue
        partial: list[Line] = []
        for c, (items, end) in zip(costs, block):
            n, used = 0, 1 if end else 0  # items kept, their cost with separators and end
            while n < len(items) and used + c[n] + (1 if n else 0) <= left:
                used += c[n] + (1 if n else 0)
                n += 1
            if n:
                partial.append((items[:n], end))
                left -= used
            if n < len(items):
                break
        if len(partial) > 1:  # the visit's header and at least one item
            kept.append(partial)
        break
    return kept[::-1]


def _header(static: dict[str, str], birth: dt.datetime | None, prediction_time: dt.datetime) -> list[str]:
    if birth is not None:
        years = (
            prediction_time.year
            - birth.year
            - ((prediction_time.month, prediction_time.day) < (birth.month, birth.day))
        )
        who = f"{years}-year-old {static.get('sex', 'patient')}"
    else:
        who = f"{static.get('sex', 'patient')} of unknown age"
    first = f"Patient: {who}."
    for key in ("race", "ethnicity"):
        if key in static:
            first += f" {key.capitalize()}: {static[key]}."
    return [first, f"History before {prediction_time.date().isoformat()}."]


def _read_events(data_root: Path, subjects: Sequence[int] | None) -> pl.DataFrame:
    files = sorted(data_root.rglob("*.parquet"))
    if not files:
        raise TextInputError(f"{data_root}: no MEDS event files (*.parquet); the text path reads the MEDS events")
    scan = pl.scan_parquet(files)
    names = scan.collect_schema().names()
    columns = [c for c in ("subject_id", "time", "code", "numeric_value", "text_value") if c not in names]
    if columns:
        raise TextInputError(f"{data_root}: MEDS events without column(s) {columns}")
    if subjects is not None:
        scan = scan.filter(pl.col("subject_id").is_in(list(subjects)))
    keep = ["subject_id", "time", "code", "numeric_value", "text_value"]
    keep += [c for c in ("encounter_id", "event_type", "unit") if c in names]
    return scan.select(keep).collect()


def _read_codes(path: Path | None) -> tuple[dict[str, str], dict[str, str]]:
    """(code -> description, code -> unit) of a MEDS codes.parquet (empty without one)."""
    if path is None or not Path(path).exists():
        return {}, {}
    frame = pl.read_parquet(path)
    if "code" not in frame.columns:
        raise TextInputError(f"{path}: codes metadata without a 'code' column")
    out = []
    for col in ("description", "unit"):
        if col in frame.columns:
            rows = frame.select("code", col).drop_nulls()
            out.append({c: str(v) for c, v in rows.iter_rows() if str(v).strip()})
        else:
            out.append({})
    return out[0], out[1]


def events_root(data_dir: Path) -> tuple[Path, Path]:
    """(MEDS data folder, codes.parquet path) of a prepared folder's source."""
    from ehrfm.data_shards.meds_dataset import source_of
    from ehrfm.data_shards.shards import read_manifest

    root = source_of(Path(data_dir), read_manifest(data_dir))
    if not (root / "data").is_dir():
        raise TextInputError(f"{root}: the MEDS events of {data_dir} are not there (no data/ folder)")
    return root / "data", root / "metadata" / "codes.parquet"
