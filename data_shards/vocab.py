"""Vocabulary: normalized codes, per-code quantile value bins, token types and the HF tokenizer.

Token strings:
* a coded event without a numeric value: its code, e.g. ``SNOMED/44054006``;
* with a numeric value and learned bin edges: ``<code>//Q<k>`` with k = 1..num_bins (003: b = 5 or 10);
* ICD codes (prefixes in ``vocab.icd_prefixes``) truncated to ``icd_level`` characters of the code proper,
  dots removed (003 level 3: ``ICD10CM/I50``; level 4: ``ICD10CM/I509``).

Bin edges are the (1..b-1)/b quantiles of each code's values in the *pretraining split only*, learned from a
seeded reservoir of at most ``max_values_per_code`` values (deterministic for a given input and seed).
Codes that occur fewer than ``min_frequency`` times in the pretraining split map to [UNK].
Reserved strings (special and task tokens) are never code tokens: cleaning escapes input codes spelled like
them (``CODE//[PAD]``), and only finite numeric values (cleaning sets NaN/inf to null) feed the bin edges.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl

from . import schema
from .config import VocabConfig
from .schema import TokenType

# Codes that structure the timeline but are not tokens themselves.
NON_TOKEN_CODES = ("MEDS_BIRTH",)
NON_TOKEN_PREFIXES = ("ENCOUNTER_END/",)

# MEDS input has no event_type column: infer it from the code's vocabulary prefix.
PREFIX_TYPES = {
    "ICD10CM": "DX",
    "ICD10": "DX",
    "ICD9CM": "DX",
    "ICD9": "DX",
    "DIAGNOSIS": "DX",
    "SNOMED": "DX",
    "LOINC": "LAB",
    "LAB": "LAB",
    "RXNORM": "MED",
    "ATC": "MED",
    "NDC": "MED",
    "MEDICATION": "MED",
    "CPT": "PRO",
    "ICD10PCS": "PRO",
    "ICD9PROC": "PRO",
    "PROCEDURE": "PRO",
    "HCPCS": "PRO",
    "CVX": "IMM",
    "VITALS": "VIT",
    "VITAL": "VIT",
}
# LOINC vital-sign codes (used when a MEDS dataset labels vitals only by LOINC).
VITAL_LOINC = frozenset(
    "8480-6 8462-4 8867-4 9279-1 8310-5 29463-7 8302-2 39156-5 2708-6 59408-5 72514-3 8287-5 85354-9".split()
)


def infer_event_type(code: pl.Expr) -> pl.Expr:
    """Event type name (DX/MED/LAB/PRO/VIT/IMM/OTHER) of a code from its prefix."""
    prefix = code.str.split_exact("/", 1).struct.field("field_0").str.to_uppercase()
    base = prefix.replace_strict(PREFIX_TYPES, default="OTHER", return_dtype=pl.String)
    loinc_code = code.str.split_exact("/", 1).struct.field("field_1")
    return pl.when((prefix == "LOINC") & loinc_code.is_in(list(VITAL_LOINC))).then(pl.lit("VIT")).otherwise(base)


TYPE_IDS = {t.name: int(t) for t in TokenType}


def normalize_codes(code: pl.Expr, cfg: VocabConfig) -> pl.Expr:
    """Apply ICD level truncation to codes with an ICD prefix; other codes unchanged."""
    if cfg.icd_level is None:
        return code
    parts = code.str.split_exact("/", 1)
    prefix, rest = parts.struct.field("field_0"), parts.struct.field("field_1")
    truncated = prefix + "/" + rest.str.replace_all(".", "", literal=True).str.slice(0, cfg.icd_level)
    return pl.when(prefix.is_in(cfg.icd_prefixes) & rest.is_not_null()).then(truncated).otherwise(code)


def bin_tokens(frame: pl.DataFrame, edges: dict[str, list[float]]) -> pl.Series:
    """Token strings for events: ``code//Q<k>`` where the code has edges and a value, else the code."""
    if not edges:
        return frame["code"]
    table = pl.DataFrame(
        {"code": list(edges), "_edges": [list(map(float, e)) for e in edges.values()]},
        schema={"code": pl.String, "_edges": pl.List(pl.Float64)},
    )
    joined = frame.select("code", "numeric_value").with_row_index("_row").join(table, on="code", how="left")
    has = joined.filter(pl.col("_edges").is_not_null() & pl.col("numeric_value").is_not_null())
    if has.height:
        exploded = has.select("_row", "numeric_value", "_edges").explode("_edges")
        ranks = exploded.group_by("_row").agg(k=(pl.col("numeric_value").cast(pl.Float64) > pl.col("_edges")).sum() + 1)
        joined = joined.join(ranks, on="_row", how="left")
    else:
        joined = joined.with_columns(k=pl.lit(None, dtype=pl.UInt32))
    joined = joined.sort("_row")
    token = (
        pl.when(pl.col("k").is_not_null())
        .then(pl.col("code") + "//Q" + pl.col("k").cast(pl.String))
        .otherwise(pl.col("code"))
    )
    return joined.select(token.alias("token"))["token"]


@dataclasses.dataclass
class ValueReservoir:
    """Per-code sample of numeric values from the pretraining split (bounded memory, seeded)."""

    cap: int
    seed: int
    values: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, frame: pl.DataFrame) -> None:
        self.add_grouped(self.group(frame))

    @staticmethod
    def group(frame: pl.DataFrame) -> list[tuple[str, np.ndarray]]:
        """(code, float64 values) of the finite numeric values in ``frame``, codes sorted: what :meth:`add`
        folds in. Computed where the shard is read; folding the groups in shard order gives the same sample
        whichever process grouped them."""
        numeric = frame.filter(pl.col("numeric_value").is_not_null() & pl.col("numeric_value").is_finite())
        if not numeric.height:
            return []
        grouped = numeric.group_by("code").agg(pl.col("numeric_value").cast(pl.Float64)).sort("code")
        return [
            (code, np.asarray(vals, dtype=np.float64))
            for code, vals in zip(grouped["code"].to_list(), grouped["numeric_value"].to_list())
        ]

    def add_grouped(self, groups: list[tuple[str, np.ndarray]]) -> None:
        for code, arr in groups:
            self.counts[code] = self.counts.get(code, 0) + len(arr)
            merged = np.concatenate([self.values[code], arr]) if code in self.values else arr
            if len(merged) > self.cap:
                rng = np.random.default_rng([self.seed, self.counts[code], len(code)])
                merged = rng.choice(merged, size=self.cap, replace=False)
            self.values[code] = merged

    def edges(self, num_bins: int) -> dict[str, list[float]]:
        """Unique interior quantile edges per code; codes with a single distinct value get none."""
        out = {}
        qs = np.arange(1, num_bins) / num_bins
        for code in sorted(self.values):
            vals = self.values[code]
            edges = np.unique(np.quantile(vals, qs))
            if len(np.unique(vals)) > 1 and len(edges):
                out[code] = [float(e) for e in edges]
        return out


@dataclasses.dataclass
class Vocabulary:
    """Token <-> id mapping; ids: special tokens, then task tokens, then codes by frequency."""

    tokens: list[str]
    task_tokens: list[str]
    bin_edges: dict[str, list[float]]
    token_counts: dict[str, int]

    def __post_init__(self) -> None:
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        if len(self.ids) != len(self.tokens):
            raise ValueError("duplicate tokens in vocabulary")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def unk_id(self) -> int:
        return self.ids[schema.UNK]

    def token_id(self, token: str) -> int:
        return self.ids.get(token, self.unk_id)

    @classmethod
    def build(
        cls, counts: dict[str, int], edges: dict[str, list[float]], *, min_frequency: int, task_tokens: list[str]
    ) -> Vocabulary:
        clash = [t for t in task_tokens if t in schema.SPECIAL_TOKENS]
        if clash:
            raise ValueError(f"task tokens {clash} clash with special tokens")
        reserved = list(schema.SPECIAL_TOKENS) + list(task_tokens)
        kept = sorted(
            (t for t, c in counts.items() if c >= min_frequency and t not in reserved),
            key=lambda t: (-counts[t], t),
        )
        return cls(reserved + kept, list(task_tokens), edges, {t: counts[t] for t in kept})

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256("\n".join(self.tokens).encode()).hexdigest()[:16]

    def additional_special_tokens(self) -> list[str]:
        """The special tokens of the HF tokenizer besides [PAD], [UNK], [MASK] and [CLS]."""
        return [schema.VS, schema.VE, schema.REG, *schema.INTERVAL_TOKENS, *self.task_tokens]

    def save(self, folder: Path) -> None:
        """HF tokenizer files (AutoTokenizer-loadable) plus ``ehrfm_vocab.json`` with edges and counts.

        Written with the ``tokenizers`` library alone: importing transformers would cost `ehrfm prepare` ~2 s of
        start-up. tokenizer.json is a word-level model over the ids with the special and task tokens added as
        special; tokenizer_config.json names them the way ``PreTrainedTokenizerFast(...)`` would (a test
        checks that AutoTokenizer loads the same tokenizer as one made by transformers).
        """
        from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

        folder.mkdir(parents=True, exist_ok=True)
        core = Tokenizer(models.WordLevel(vocab=dict(self.ids), unk_token=schema.UNK))
        core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        named = {"pad_token": schema.PAD, "unk_token": schema.UNK, "mask_token": schema.MASK, "cls_token": schema.CLS}
        extra = self.additional_special_tokens()
        core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*named.values(), *extra)])
        core.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **named,
            "additional_special_tokens": extra,
            "model_max_length": 1_000_000,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "ehrfm_vocab.json").write_text(
            json.dumps(
                {
                    "fingerprint": self.fingerprint(),
                    "tokens": self.tokens,
                    "task_tokens": self.task_tokens,
                    "bin_edges": self.bin_edges,
                    "token_counts": self.token_counts,
                },
                indent=1,
            )
        )

    @classmethod
    def load(cls, folder: Path) -> Vocabulary:
        data = json.loads((Path(folder) / "ehrfm_vocab.json").read_text())
        return cls(data["tokens"], data["task_tokens"], data["bin_edges"], data["token_counts"])
