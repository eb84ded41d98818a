"""`ehrfm bench prepare` runs end to end at small scales; its replicated corpora are new patients with the same
events (k copies: k x the patients and events of 1x, the same bytes per token)."""

from __future__ import annotations

from ehrfm.data_shards.bench_prepare import run


def test_bench_prepare_replicates_patients_and_reports_every_field(synthea_fhir, tmp_path):
    result = run(
        [
            "--fhir",
            str(synthea_fhir),
            "--base-patients",
            "2",
            "--meds-base-patients",
            "2",
            "--scales",
            "1,3",
            "--jobs",
            "1",
            "--work",
            str(tmp_path),
        ]
    )
    for fmt in ("fhir", "meds"):
        one, three = result[fmt]
        assert (one["scale"], three["scale"]) == (1, 3)
        assert three["patients"] == 3 * one["patients"] and three["events"] == 3 * one["events"], fmt
        assert three["tokens"] == 3 * one["tokens"]
        for key in ("seconds", "events_per_s", "import_s", "peak_rss_mb", "bytes_per_token"):
            assert one[key] > 0 and three[key] > 0, (fmt, key)
        assert one["bytes_per_token"] <= 12
        assert set(result["summary"][fmt]) >= {"peak_rss_ratio_3x_over_1x", "events_per_s_ratio_3x_over_1x"}
    parse = result["fhir"][0]["orjson_parse"]
    assert parse["files"] == 2 and result["fhir"][1]["orjson_parse"]["files"] == 6
    assert result["fhir"][0]["fhir_vs_orjson"] > 0
    assert not list(tmp_path.iterdir())  # the scratch folder is cleaned up
