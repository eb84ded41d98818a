"""ehrfm.data_shards: MEDS parquet / FHIR R4 -> patient timelines -> CEHR-BERT/EhrMamba tokens with attribute
streams -> sharded, versioned corpora (``ehrfm prepare``), streamed deterministically and packed; clinical task
labels without leakage."""
