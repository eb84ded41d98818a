"""Shared contracts of the data stage: special tokens, token types and the batch/shard column names.

Everything downstream (models, finetuning, kernels) imports these names instead of re-declaring them.
"""

from __future__ import annotations

import enum

PAD, UNK, MASK, CLS, VS, VE, REG = "[PAD]", "[UNK]", "[MASK]", "[CLS]", "[VS]", "[VE]", "[REG]"
# Time-interval tokens placed between [REG] of one visit and [VS] of the next (CEHR-BERT / EhrMamba):
# [W0]..[W3] = whole weeks 0-3, [M1]..[M12] = whole months 1-12 (30-day months), [LT] = longer than that.
WEEK_TOKENS = tuple(f"[W{i}]" for i in range(4))
MONTH_TOKENS = tuple(f"[M{i}]" for i in range(1, 13))
LONG_TERM = "[LT]"
INTERVAL_TOKENS = WEEK_TOKENS + MONTH_TOKENS + (LONG_TERM,)
# Stay-length tokens (an ehrfm addition to the CEHR-BERT layout, ``visits.stay_tokens``): one just before each
# visit's [VE], carrying the visit end time, so that a generative model keeps a clock inside visits and a sampled
# future can say how long a stay lasts. [S<k>D] = the visit lasted more than the previous edge and at most k days
# (a same-day visit is [S1D]); [SLT] = longer than the last edge. Edges in days:
STAY_EDGES_DAYS = (1, 2, 3, 4, 5, 6, 7, 14, 30)
STAY_TOKENS = tuple(f"[S{k}D]" for k in STAY_EDGES_DAYS) + ("[SLT]",)
# Order fixes the ids: [PAD] is always id 0, [UNK] 1, [MASK] 2 ...; task tokens follow, then codes.
SPECIAL_TOKENS = (PAD, UNK, MASK, CLS, VS, VE, REG) + INTERVAL_TOKENS + STAY_TOKENS
PAD_ID = 0
# Time units of the ages (years) and times (weeks since the epoch) streams.
SECONDS_PER_DAY = 86400
US_PER_DAY = SECONDS_PER_DAY * 1_000_000
DAYS_PER_YEAR = 365.25
SECONDS_PER_WEEK = 7 * SECONDS_PER_DAY
SECONDS_PER_YEAR = SECONDS_PER_DAY * DAYS_PER_YEAR
# Input codes that are spelled like a reserved token (a special token or a task token), or that already start
# with this prefix, get it prepended during cleaning, so "[PAD]" in the data becomes the ordinary code token
# "CODE//[PAD]" and never the id of a special/task token (escaping stays one-to-one).
ESCAPED_CODE_PREFIX = "CODE//"


class TokenType(enum.IntEnum):
    """Per-token event type (the `type_ids` stream). 0 is padding so embeddings can use padding_idx=0."""

    PAD = 0
    CLS = 1
    VS = 2
    VE = 3
    REG = 4
    INTERVAL = 5  # [W*], [M*], [LT]
    TASK = 6  # task tokens used by multitask prompted finetuning
    STAY = 7  # stay-length tokens [S<k>D], [SLT]
    # clinical event types: DX..OTHER, the last ones (``is_code_type`` and the data stage rely on it)
    DX = 8  # conditions / diagnoses
    MED = 9  # medications (requests, administrations)
    LAB = 10  # laboratory observations
    PRO = 11  # procedures
    VIT = 12  # vital signs
    IMM = 13  # immunizations
    OTHER = 14  # any other coded event (demographics, unmapped systems)


NUM_TOKEN_TYPES = len(TokenType)
SPECIAL_TYPES = frozenset(
    {TokenType.CLS, TokenType.VS, TokenType.VE, TokenType.REG, TokenType.INTERVAL, TokenType.TASK, TokenType.STAY}
)


def stay_range_days(token: str) -> tuple[float, float]:
    """(low, high] days of a stay-length token; [SLT] -> (last edge, inf)."""
    i = STAY_TOKENS.index(token)
    low = 0.0 if i == 0 else float(STAY_EDGES_DAYS[i - 1])
    high = float(STAY_EDGES_DAYS[i]) if i < len(STAY_EDGES_DAYS) else float("inf")
    return low, high


# Per-token streams of one patient sequence (a shard row) and of a model batch. All have the same length.
#   input_ids       int64  vocabulary ids
#   type_ids        int64  TokenType
#   ages            float32 age of the patient at the token, in years
#   times           float32 weeks since 1970-01-01 (UTC) of the token's event
#   visit_segments  int64  0 for [CLS]/pad, then 1/2 alternating per visit
#   visit_orders    int64  0 for [CLS]/pad, visit number (1-based) otherwise
#   event_time_s    int64  seconds since epoch of the token's event (shards only: task cutting)
SEQUENCE_STREAMS = ("input_ids", "type_ids", "ages", "times", "visit_segments", "visit_orders")
# A model batch adds: position_ids (B, L) restarting at 0 per document, attention_mask (B, L) 1 = real token,
# document_ids (B, L) when packed (0 = padding, 1.. = document index within the row), labels (B, L).
BATCH_KEYS = SEQUENCE_STREAMS + ("position_ids", "attention_mask", "document_ids")
