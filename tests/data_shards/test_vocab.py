"""Value bins (pretraining split only), ICD truncation, minimum frequency, and the HF tokenizer."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ehrfm.data_shards import schema
from ehrfm.data_shards.config import PrepareConfig, SplitConfig, VocabConfig
from ehrfm.data_shards.prepare import prepare
from ehrfm.data_shards.splits import SPLITS, assign_splits
from ehrfm.data_shards.vocab import ValueReservoir, Vocabulary, bin_tokens, normalize_codes


def _cohort(n: int, value_of) -> pl.DataFrame:
    rows = []
    for sid in range(n):
        rows.append((sid, dt.datetime(1950, 1, 1), "MEDS_BIRTH", None))
        for k in range(5):
            rows.append((sid, dt.datetime(2000, 1, 1 + k), "LOINC/2345-7", value_of(sid, k)))
        rows.append((sid, dt.datetime(2000, 1, 7), "ICD10CM/I50.9" if sid % 2 else "ICD10CM/I50.1", None))
        if sid == 0:
            rows.append((sid, dt.datetime(2000, 1, 8), "ICD10CM/Z99.99", None))
    return pl.DataFrame(
        rows,
        schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32},
        orient="row",
    )


def _split_of(n: int) -> dict[int, str]:
    frame = assign_splits(pl.DataFrame({"subject_id": list(range(n))}), SplitConfig(respect_meds_splits=False))
    return dict(frame.iter_rows())


def test_bins_are_learned_on_the_pretraining_split_only(tmp_path):
    n = 60
    split = _split_of(n)
    normal = lambda sid, k: float(sid * 5 + k)  # noqa: E731
    # identical pretraining values, wildly different values for every other split
    shifted = lambda sid, k: normal(sid, k) if split[sid] == "pretrain" else 1e6 + sid  # noqa: E731
    edges = []
    for name, fn in (("a", normal), ("b", shifted)):
        root = tmp_path / name
        (root / "data").mkdir(parents=True)
        _cohort(n, fn).write_parquet(root / "data" / "0.parquet")
        cfg = PrepareConfig(tasks=[])
        cfg.splits.respect_meds_splits = False
        prepare(root, tmp_path / f"out-{name}", cfg, progress=False)
        edges.append(Vocabulary.load(tmp_path / f"out-{name}" / "tokenizer").bin_edges["LOINC/2345-7"])
    assert edges[0] == edges[1]
    pretrain_values = [normal(s, k) for s in range(n) if split[s] == "pretrain" for k in range(5)]
    expected = np.unique(np.quantile(pretrain_values, np.arange(1, 10) / 10))
    np.testing.assert_allclose(edges[0], expected, rtol=1e-6)


def test_bin_tokens_by_hand():
    frame = pl.DataFrame(
        {"code": ["A", "A", "A", "B", "A"], "numeric_value": [0.5, 1.5, 9.0, 3.0, None]},
        schema_overrides={"numeric_value": pl.Float32},
    )
    tokens = bin_tokens(frame, {"A": [1.0, 2.0]}).to_list()
    assert tokens == ["A//Q1", "A//Q2", "A//Q3", "B", "A"]


@pytest.mark.parametrize("level,expected", [(3, "ICD10CM/I50"), (4, "ICD10CM/I509"), (None, "ICD10CM/I50.9")])
def test_icd_truncation(level, expected):
    frame = pl.DataFrame({"code": ["ICD10CM/I50.9", "SNOMED/88805009"]})
    out = frame.select(normalize_codes(pl.col("code"), VocabConfig(icd_level=level)).alias("code"))["code"].to_list()
    assert out == [expected, "SNOMED/88805009"]


def test_min_frequency_maps_rare_codes_to_unk_and_tokenizer_round_trips(tmp_path):
    root = tmp_path / "in"
    (root / "data").mkdir(parents=True)
    _cohort(40, lambda s, k: float(k)).write_parquet(root / "data" / "0.parquet")
    cfg = PrepareConfig(tasks=["demo"])
    cfg.splits.respect_meds_splits = False
    cfg.vocab.min_frequency = 2
    cfg.vocab.icd_level = 3
    manifest = prepare(root, tmp_path / "out", cfg, progress=False)
    vocab = Vocabulary.load(tmp_path / "out" / "tokenizer")
    assert "ICD10CM/I50" in vocab.ids and "ICD10CM/Z99" not in vocab.ids  # seen once: [UNK]
    assert manifest["counts"]["unk_tokens"] >= 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    text = "[CLS] [VS] ICD10CM/I50 [VE] [REG] [LOS] NOT/A_CODE"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [vocab.token_id(t) for t in text.split()]
    assert ids[-1] == vocab.unk_id and tok.pad_token_id == 0
    assert vocab.task_tokens[:3] == ["[LOS]", "[REA]", "[MOR1Y]"]


def test_reservoir_is_bounded_and_seeded():
    frames = [
        pl.DataFrame({"code": ["X"] * 1000, "numeric_value": np.arange(i * 1000, (i + 1) * 1000, dtype=np.float32)})
        for i in range(5)
    ]
    a, b = ValueReservoir(cap=300, seed=1), ValueReservoir(cap=300, seed=1)
    for f in frames:
        a.add(f)
        b.add(f)
    assert len(a.values["X"]) == 300 and a.counts["X"] == 5000
    assert np.array_equal(a.values["X"], b.values["X"])


def test_every_subject_gets_exactly_one_split():
    ids = pl.DataFrame({"subject_id": np.arange(20000)})
    frame = assign_splits(ids, SplitConfig())
    assert frame.height == 20000 and set(frame["split"].unique()) <= set(SPLITS)
    shares = frame["split"].value_counts().to_dict(as_series=False)
    share = dict(zip(shares["split"], shares["count"]))
    assert abs((share["pretrain"] + share["pretrain_val"]) / 20000 - 0.57) < 0.02
    assert abs(share["test"] / 20000 - 0.15) < 0.02
    assert abs(share["pretrain_val"] / (share["pretrain"] + share["pretrain_val"]) - 0.1) < 0.02


def test_saved_tokenizer_equals_one_made_by_transformers(tmp_path):
    """Vocabulary.save writes the HF files without transformers; AutoTokenizer loads from them the tokenizer
    that transformers' own PreTrainedTokenizerFast would save (ids, special tokens, encoding, decoding)."""
    counts = {"LOINC/1": 5, "SNOMED/2": 3, "RXNORM/3": 1}
    vocab = Vocabulary.build(counts, {"LOINC/1": [1.0, 2.0]}, min_frequency=1, task_tokens=["[LOS]", "[MOR1Y]"])
    vocab.save(tmp_path / "ours")
    core = Tokenizer(models.WordLevel(vocab=dict(vocab.ids), unk_token=schema.UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=schema.PAD,
        unk_token=schema.UNK,
        mask_token=schema.MASK,
        cls_token=schema.CLS,
        additional_special_tokens=vocab.additional_special_tokens(),
        model_max_length=1_000_000,
    ).save_pretrained(str(tmp_path / "transformers"))
    ours, theirs = (AutoTokenizer.from_pretrained(tmp_path / name) for name in ("ours", "transformers"))
    assert len(ours) == len(theirs) == len(vocab)
    assert ours.all_special_tokens == theirs.all_special_tokens and ours.all_special_ids == theirs.all_special_ids
    assert (ours.pad_token_id, ours.mask_token_id, ours.cls_token_id, ours.unk_token_id) == (0, 2, 3, 1)
    text = " ".join(vocab.tokens) + " NOT_IN_VOCAB [VS] [LOS]"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert ours.decode(ours(text)["input_ids"]) == theirs.decode(theirs(text)["input_ids"])
    assert ours.model_max_length == theirs.model_max_length == 1_000_000
