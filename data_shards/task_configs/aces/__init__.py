"""ehrfm's demo tasks as ACES task configs, and ACES predicates for the codes of ehrfm's FHIR conversion."""
