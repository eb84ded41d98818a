"""Readers turn MEDS parquet folders and FHIR R4 files into MEDS-shaped event DataFrames."""

import polars as pl

# The event table every reader produces: MEDS columns plus the optional extra columns ehrfm uses.
EVENT_SCHEMA = {
    "subject_id": pl.Int64,
    "time": pl.Datetime("us"),
    "code": pl.String,
    "numeric_value": pl.Float32,
    "text_value": pl.String,
    "encounter_id": pl.String,
    "event_type": pl.String,
}
