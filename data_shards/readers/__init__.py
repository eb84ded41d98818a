"""Readers turn MEDS parquet folders and FHIR R4 files into MEDS-shaped event DataFrames."""
