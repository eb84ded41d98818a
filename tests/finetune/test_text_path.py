"""002's clinical-text path: the serialization template (exact text), no leakage, the truncation rule, the
encoder from a local checkpoint folder or a package, ALFIA on text end to end and ALFIA-boost (LightGBM and
CatBoost) on its embeddings. The encoder is a tiny random BERT written by the test (no MiniLM needed)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ehrfm.data_shards.readers import EVENT_SCHEMA
from ehrfm.finetune.text_serialize import HistoryTexts, TextInputError, fit_blocks

D = dt.datetime


def _events() -> pl.DataFrame:
    rows = [
        # subject, time, code, numeric, text, encounter, event_type
        (1, None, "GENDER/FEMALE", None, None, None, "OTHER"),
        (1, D(1950, 6, 15), "MEDS_BIRTH", None, None, None, "OTHER"),
        (1, D(2019, 3, 4, 8), "ENCOUNTER/AMB", None, None, "e1", "OTHER"),
        (1, D(2019, 3, 4, 8), "SNOMED/38341003", None, None, "e1", "DX"),
        (1, D(2019, 3, 4, 9), "LOINC/4548-4", 6.1, None, "e1", "LAB"),
        (1, D(2019, 3, 4, 10), "LOINC/4548-4", 6.25, None, "e1", "LAB"),  # latest value of the visit wins
        (1, D(2019, 3, 4, 10), "LOINC/72166-2", None, "SNOMED/266919005", "e1", "OTHER"),
        (1, D(2019, 3, 4, 11), "ENCOUNTER_END/AMB", None, None, "e1", "OTHER"),
        (1, D(2019, 6, 1, 12), "SNOMED/40055000", None, None, None, "DX"),  # outside a visit
        (1, D(2020, 1, 2, 7), "ENCOUNTER/IMP", None, None, "e2", "OTHER"),
        (1, D(2020, 1, 2, 7), "RXNORM/314076", None, None, "e2", "MED"),
        (1, D(2020, 1, 2, 8), "LOINC/8867-4", 88.0, None, "e2", "VIT"),
        # after the prediction time (2020-01-03 00:00): must never appear
        (1, D(2020, 1, 3, 0), "SNOMED/22298006", None, None, "e2", "DX"),
        (1, D(2020, 1, 9, 9), "ENCOUNTER_END/IMP", None, None, "e2", "OTHER"),
    ]
    return pl.DataFrame(
        rows,
        schema=EVENT_SCHEMA,
        orient="row",
    )


@pytest.fixture()
def codes(tmp_path) -> Path:
    path = tmp_path / "codes.parquet"
    pl.DataFrame(
        {
            "code": ["SNOMED/38341003", "LOINC/4548-4", "LOINC/72166-2", "SNOMED/266919005", "LOINC/8867-4"],
            "description": [
                "Hypertension",
                "Hemoglobin A1c",
                "Tobacco smoking status",
                "Never smoked tobacco",
                "Heart rate",
            ],
            "unit": [None, "%", None, None, "/min"],
        }
    ).write_parquet(path)
    return path


EXPECTED = """Patient: 69-year-old female.
History before 2020-01-03.
Visit on 2019-03-04 (ambulatory), ended 2019-03-04:
Diagnoses: Hypertension.
Labs: Hemoglobin A1c 6.25 %.
Other: Tobacco smoking status Never smoked tobacco.
Entries on 2019-06-01 (outside a visit):
Diagnoses: SNOMED/40055000.
Visit on 2020-01-02 (inpatient):
Medications: RXNORM/314076.
Vitals: Heart rate 88 /min."""


def test_template_exact_text_and_no_leakage(codes):
    texts = HistoryTexts(_events(), codes)
    text, visits, kept = texts.render(1, D(2020, 1, 3))
    assert text == EXPECTED
    assert (visits, kept) == (3, 3)
    # the event at the prediction time and the discharge after it are not rendered
    assert "SNOMED/22298006" not in text and "2020-01-09" not in text
    # a day earlier: the inpatient visit is not there yet, age unchanged
    earlier, visits, _ = texts.render(1, D(2020, 1, 2, 7))
    assert visits == 2 and "inpatient" not in earlier and earlier.startswith("Patient: 69-year-old female.")
    # deterministic: the same text from shuffled input rows
    shuffled = HistoryTexts(_events().sample(fraction=1.0, shuffle=True, seed=3), codes)
    assert shuffled.render(1, D(2020, 1, 3))[0] == EXPECTED
    # an unknown subject: header only
    assert HistoryTexts(_events(), codes).render(2, D(2020, 1, 3))[0].startswith("Patient: patient of unknown age.")


def words(lines: list[str]) -> list[int]:
    return [len(line.replace(";", " ;").replace(".", " .").split()) for line in lines]


def test_truncation_keeps_header_and_most_recent_visits(codes):
    texts = HistoryTexts(_events(), codes)
    header, blocks = texts.blocks(1, D(2020, 1, 3))
    full = words(header)
    costs = [sum(words(["; ".join(items) + end for items, end in b])) for b in blocks]
    marker = words(["(3 earlier visits omitted.)"])[0]
    # room for the newest visit only
    budget = sum(full) + marker + costs[2]
    text, visits, kept = texts.render(1, D(2020, 1, 3), words, budget)
    assert (visits, kept) == (3, 1)
    assert text.splitlines()[:3] == [*header, "(2 earlier visits omitted.)"]
    assert text.endswith("Vitals: Heart rate 88 /min.") and "2019-06-01" not in text
    # everything fits: the full text, no marker
    assert texts.render(1, D(2020, 1, 3), words, sum(full) + marker + sum(costs))[0] == EXPECTED
    # room for the newest visit, then the older visit's header and its first item only
    older = blocks[0]
    head_cost, first_item = words(older[0][0])[0], words([older[1][0][0]])[0] + 1  # item + its "."
    kept_blocks = fit_blocks(header, [older, blocks[2]], words, sum(full) + marker + costs[2] + head_cost + first_item)
    assert kept_blocks == [[older[0], older[1]], blocks[2]]
    # the wordpiece budget is never exceeded
    for budget in range(sum(full) + marker, sum(full) + marker + sum(costs) + 2):
        text, _, _ = texts.render(1, D(2020, 1, 3), words, budget)
        assert sum(words(text.splitlines())) <= budget


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ":", ";", "(", ")", "patient", "visit", "on", "year"]
VOCAB += ["old", "female", "male", "history", "before", "diagnoses", "labs", "vitals", "-", "/", "0", "1", "2"]


def tiny_encoder(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT (hidden 32) and a WordPiece tokenizer saved as a Hugging Face checkpoint."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(VOCAB)})  # WordPiece over VOCAB
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_encoder_from_a_folder_or_a_package(tmp_path, monkeypatch):
    from ehrfm.finetune.text import load_encoder, resolve_encoder

    folder = tiny_encoder(tmp_path / "enc")
    assert resolve_encoder(folder) == folder
    model, tokenizer = load_encoder(folder)
    assert model.config.hidden_size == 32 and tokenizer("patient visit")["input_ids"] == [2, 10, 11, 3]
    # a package that ships the checkpoint in a sub-folder, named with dashes
    package = tmp_path / "site" / "tiny_text_encoder_pkg"
    (package / "weights").parent.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    tiny_encoder(package / "weights")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_encoder("tiny-text-encoder-pkg") == package / "weights"
    # pickle weights are refused; unknown names give one clear error
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(TextInputError, match="safetensors"):
        resolve_encoder(bad)
    with pytest.raises(TextInputError, match="neither a checkpoint folder nor an installed package"):
        resolve_encoder("no-such-encoder-package")


def test_alfia_on_text_and_boost(ft_data, tasks, tmp_path):
    from sklearn.metrics import roc_auc_score

    from ehrfm.finetune.config import FinetuneConfig
    from ehrfm.finetune.text import comparison_table, finetune_text, run_boost

    encoder = tiny_encoder(tmp_path / "enc")
    cfg = FinetuneConfig(method="alfia", tasks=list(tasks), epochs=1, batch_size=8, progress_bar=False)
    cfg.lora.enabled = True
    cfg.alfia.num_fuse_layers = 3
    run = tmp_path / "run"
    meta = finetune_text(ft_data, encoder, run, cfg, max_length=64, n_boot=20)
    assert meta["num_fuse"] == 3 and meta["tasks"] == list(tasks)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    for task in tasks:
        texts = pl.read_parquet(run / "texts" / task / "test.parquet")
        assert texts["text"].str.starts_with("Patient: ").all()
        preds = pl.read_parquet(run / "eval" / task / "predictions.parquet")
        labels = pl.read_parquet(Path(ft_data) / "labels" / task / "test.parquet")
        assert preds["subject_id"].to_list() == labels["subject_id"].to_list()
        oracle = roc_auc_score(preds["boolean_value"].to_numpy(), preds["predicted_boolean_probability"].to_numpy())
        assert metrics["tasks"][task]["auroc"]["value"] == pytest.approx(oracle)
        emb = pl.read_parquet(run / "embeddings" / task / "finetune.parquet")
        norms = np.linalg.norm(np.stack(emb["embedding"].to_list()), axis=1)
        assert np.allclose(norms, 1.0, atol=1e-5) and len(emb["layer_weights"][0]) == 3
    # the merged encoder reloads as a plain checkpoint folder
    from ehrfm.finetune.text import load_encoder

    assert load_encoder(run / "model" / "backbone")[0].config.hidden_size == 32

    results = run_boost(ft_data, run, tmp_path / "boost", ["lightgbm", "catboost"], n_boot=20)
    for name, result in results.items():
        for task in tasks:
            preds = pl.read_parquet(tmp_path / "boost" / name / task / "predictions.parquet")
            oracle = roc_auc_score(preds["boolean_value"].to_numpy(), preds["predicted_boolean_probability"])
            assert result["tasks"][task]["auroc"]["value"] == pytest.approx(oracle)
        assert result["embeddings"] == str(run / "embeddings")
    assert (tmp_path / "boost" / "catboost" / "models" / f"{tasks[0]}.catboost.json").exists()
    table = comparison_table(
        [("text ALFIA", run / "eval"), ("text ALFIA-boost CatBoost", tmp_path / "boost" / "catboost")]
    )
    assert table.count("| text ALFIA |") == len(tasks) and table.count("CatBoost") == len(tasks)
