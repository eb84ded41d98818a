"""Sampling patient futures from a causal EHR model: batched rollouts with the model's cache, a clock driven by
the generated interval and stay-length tokens, and the attribute streams the model was trained with.

A rollout continues a patient's history (cut strictly before the prediction time) one token at a time. Each
generated token gets the streams the data stage would have given it (``data_shards.timeline``): its token
type, the visit order / segment (a new visit starts at an interval token, or at a [VS] that no interval
token announced), and time and age advanced by the clock. The clock is the days elapsed since the prediction
time. Interval tokens advance it by the middle of their range (``interval_days``); a stay-length token
([S<k>D], data prepared with ``visits.stay_tokens``) by the stay's length (``TokenTable.stay_days``: the mean
length of that token's visits in the data) -- for the visit open at the prediction time, minus the days it had
already lasted then (``open_visit_days``), never below zero. Without stay tokens, time inside visits counts
as zero.

Per row an :class:`OutcomeRule` (built from a task's outcome definition in ``finetune/forecast.py``) decides
after every token: a hit (one of the outcome's tokens, in a new visit or in the open visit if the rule asks for
it, with the clock inside the window) ends the row as positive; the clock passing the window, one of the rule's
end tokens (a death for an outcome other than death; a shorter stay token for length of stay), or leaving the
open visit for an open-visit rule, ends it as negative; a row still open after ``max_new_tokens`` is
*truncated* (negative, counted). Finished rows leave the batch (their cache rows are dropped), so the cost
follows the open rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ehrfm.data_shards.schema import (
    CLS,
    DAYS_PER_YEAR,
    INTERVAL_TOKENS,
    LONG_TERM,
    MASK,
    PAD,
    SECONDS_PER_DAY,
    STAY_TOKENS,
    UNK,
    VS,
    TokenType,
    stay_range_days,
)

from .config import SamplingConfig

DAYS_PER_WEEK = 7.0


def interval_days(token: str) -> float:
    """Days an interval token stands for: the middle of its range (``timeline.interval_token``): [W<k>] covers
    [7k, 7k + 7) days, [M1] [28, 60), [M<k>] [30k, 30k + 30) for k >= 2 (up to 365 for [M12]), [LT] 365 or
    more (counted as 365: every window of a year or less has closed by then)."""
    if token == LONG_TERM:
        return 365.0
    kind, number = token[1], int(token[2:-1])
    if kind == "W":
        return 7.0 * number + 3.5
    low, high = (28.0, 60.0) if number == 1 else (30.0 * number, min(30.0 * number + 30.0, 365.0))
    return (low + high) / 2


def default_stay_days(token: str) -> float:
    """Days a stay-length token counts when the data gives no mean: the middle of its range ([SLT]: its lower
    edge)."""
    low, high = stay_range_days(token)
    return low if high == float("inf") else (low + high) / 2


def open_visit_days(sample: dict, prediction_time_s: int) -> float:
    """Days the visit still open at the end of a cut history (its last token neither [REG] nor static) had
    lasted at the prediction time, from its first token's time; 0 when the history ends between visits."""
    orders, types = np.asarray(sample["visit_orders"]), np.asarray(sample["type_ids"])
    if len(orders) == 0 or orders[-1] == 0 or types[-1] == int(TokenType.REG):
        return 0.0
    start = int(np.asarray(sample["event_time_s"])[orders == orders[-1]].min())
    return max(0.0, (prediction_time_s - start) / SECONDS_PER_DAY)


@dataclasses.dataclass
class OutcomeRule:
    """When a rollout answers a task: ``hit_ids`` (token ids of the outcome), ``window_days`` (the label window
    after the prediction time; inf for none), ``new_visit_only`` (a hit counts only in a visit the rollout
    started, e.g. a readmission's new encounter), ``open_visit_only`` (a hit counts only in the visit open at
    the prediction time, and the row ends when a new visit starts: length of stay) and ``end_ids`` (tokens that
    end the row as negative: a death for every other outcome, a shorter stay token for length of stay)."""

    hit_ids: list[int]
    window_days: float
    new_visit_only: bool = False
    end_ids: list[int] = dataclasses.field(default_factory=list)
    open_visit_only: bool = False


class TokenTable:
    """Per vocabulary id: token type, interval days and stay days (NaN where not such a token), [VS] flag, and
    which ids are never sampled (padding, [UNK], [MASK], [CLS], task tokens). ``token_types`` maps ids to the
    type the data gives them (read from the shards); ids never seen there take OTHER. ``stay_days`` maps stay
    token ids to the mean length of their visits in the data; others take :func:`default_stay_days`."""

    def __init__(
        self,
        tokens: list[str],
        task_tokens: list[str],
        token_types: dict[int, int],
        stay_days: dict[int, float] | None = None,
    ) -> None:
        size = len(tokens)
        self.types = torch.full((size,), int(TokenType.OTHER), dtype=torch.long)
        for token_id, type_id in token_types.items():
            self.types[token_id] = type_id
        self.interval_days = torch.full((size,), float("nan"))
        for i, token in enumerate(tokens):
            if token in INTERVAL_TOKENS:
                self.interval_days[i] = interval_days(token)
                self.types[i] = int(TokenType.INTERVAL)
        self.stay_days = torch.full((size,), float("nan"))
        for i, token in enumerate(tokens):
            if token in STAY_TOKENS:
                self.stay_days[i] = (stay_days or {}).get(i, default_stay_days(token))
                self.types[i] = int(TokenType.STAY)
        self.is_visit_start = torch.tensor([t == VS for t in tokens])
        banned = {PAD, UNK, MASK, CLS, *task_tokens}
        self.banned = torch.tensor([t in banned for t in tokens])

    def to(self, device: torch.device) -> TokenTable:
        for name, value in vars(self).items():
            setattr(self, name, value.to(device))
        return self


@dataclasses.dataclass
class RolloutResult:
    """Per example: positives and truncated rollouts out of ``samples``; hit_days (examples, samples) with NaN
    for a rollout without a hit; tokens generated in all; with ``keep_tokens``, the sampled token ids of every
    rollout (row ``example * samples + sample``)."""

    positives: np.ndarray
    truncated: np.ndarray
    hit_days: np.ndarray
    tokens: int
    sampled: list[list[int]] | None = None


def _sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """(R, V) float32 logits (banned ids at -inf) -> (R,) sampled ids; temperature 0 = greedy."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < cfg.top_p  # the smallest prefix reaching top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    draws = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1)
    return draws.to(logits.device)


def left_pad(prompts: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    """Prompts (1-D numpy streams of different lengths) -> left-padded (R, L) tensors plus attention_mask."""
    length = max(len(p["input_ids"]) for p in prompts)
    keys = ("input_ids", "type_ids", "ages", "times", "visit_segments", "visit_orders")
    out = {}
    for key in keys:
        dtype = torch.float32 if key in ("ages", "times") else torch.long
        rows = torch.zeros(len(prompts), length, dtype=dtype)
        for i, p in enumerate(prompts):
            values = torch.as_tensor(np.asarray(p[key]), dtype=dtype)
            rows[i, length - len(values) :] = values
        out[key] = rows.to(device)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        mask[i, length - len(p["input_ids"]) :] = 1
    out["attention_mask"] = mask.to(device)
    return out


class RolloutBatch:
    """The open rows of one batch: per row its index, outcome tables, clock and visit state."""

    def __init__(self, prompts: list[dict], rules: list[OutcomeRule], table: TokenTable, device: torch.device):
        rows = len(prompts)
        vocab = len(table.types)
        self.row = torch.arange(rows, device=device)  # index among the batch's rows: example * samples + sample
        self.hit_table = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        self.end_table = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        for i, rule in enumerate(rules):
            self.hit_table[i, rule.hit_ids] = True
            self.end_table[i, rule.end_ids] = True
        self.window = torch.tensor([r.window_days for r in rules], device=device)
        self.new_visit_only = torch.tensor([r.new_visit_only for r in rules], device=device)
        self.open_visit_only = torch.tensor([r.open_visit_only for r in rules], device=device)
        self.open_days = torch.tensor([float(p.get("open_visit_days", 0.0)) for p in prompts], device=device)
        self.elapsed = torch.zeros(rows, device=device)
        self.new_visits = torch.zeros(rows, dtype=torch.long, device=device)
        self.prev_interval = torch.zeros(rows, dtype=torch.bool, device=device)
        last = {
            k: torch.tensor([float(np.asarray(p[k])[-1]) for p in prompts], device=device)
            for k in ("ages", "times", "visit_orders")
        }
        self.ages, self.times = last["ages"], last["times"]
        self.visit_order = last["visit_orders"].long()

    def select(self, keep: torch.Tensor) -> None:
        for name in (
            "row",
            "hit_table",
            "end_table",
            "window",
            "new_visit_only",
            "open_visit_only",
            "open_days",
            "elapsed",
            "new_visits",
            "prev_interval",
            "ages",
            "times",
            "visit_order",
        ):
            setattr(self, name, getattr(self, name)[keep])

    def advance(self, tokens: torch.Tensor, table: TokenTable) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Account one generated token per row. Returns (hit, ended) bool (R,) and the token's streams (R, 1)."""
        interval_days, stay_days = table.interval_days[tokens], table.stay_days[tokens]
        interval = ~torch.isnan(interval_days)
        starts_visit = interval | (table.is_visit_start[tokens] & ~self.prev_interval)
        self.new_visits = self.new_visits + starts_visit.long()
        self.visit_order = self.visit_order + starts_visit.long()
        in_open_visit = self.new_visits == 0
        stay = torch.where(in_open_visit, (stay_days - self.open_days).clamp(min=0.0), stay_days)
        days = torch.where(interval, interval_days, torch.nan_to_num(stay, nan=0.0))
        self.elapsed = self.elapsed + days
        self.times = self.times + days / DAYS_PER_WEEK
        self.ages = self.ages + days / DAYS_PER_YEAR
        self.prev_interval = interval
        rows = torch.arange(len(tokens), device=tokens.device)
        in_window = self.elapsed <= self.window
        visit_ok = (~self.new_visit_only | ~in_open_visit) & (~self.open_visit_only | in_open_visit)
        hit = self.hit_table[rows, tokens] & visit_ok & in_window
        left_open_visit = self.open_visit_only & ~in_open_visit
        ended = hit | ~in_window | self.end_table[rows, tokens] | left_open_visit
        streams = {
            "input_ids": tokens[:, None],
            "type_ids": table.types[tokens][:, None],
            "ages": self.ages[:, None],
            "times": self.times[:, None],
            "visit_segments": (2 - self.visit_order % 2)[:, None],
            "visit_orders": self.visit_order[:, None],
        }
        return hit, ended, streams


def keep_cache_rows(cache, index: torch.Tensor) -> None:
    """Keep rows ``index`` (1-D, batch order) of an HF cache, in place: attention keys/values and Mamba's conv and
    recurrent states alike. ``reorder_cache`` (beam search's row gather) is the one row selection every cache
    layer implements (Mamba's layers lack ``batch_select_indices``)."""
    cache.reorder_cache(index)


@torch.no_grad()
def rollout(
    model,
    prompts: list[dict],
    rules: list[OutcomeRule],
    table: TokenTable,
    cfg: SamplingConfig,
    generator: torch.Generator,
    *,
    keep_tokens: bool = False,
) -> RolloutResult:
    """``cfg.samples`` rollouts of each prompt (one rule per prompt), decoded together as len(prompts) x samples
    rows with the model's cache (left-padded prefill, then one token per step). ``table`` must be on the
    model's device. Returns per-example counts and hit times (and every sampled token with ``keep_tokens``)."""
    from ehrfm.pretrain.models.hf_cache_compat import output_cache

    device = next(model.parameters()).device
    k = cfg.samples
    rows = [p for p in prompts for _ in range(k)]
    state = RolloutBatch(rows, [r for r in rules for _ in range(k)], table, device)
    batch = left_pad(rows, device)
    attention_mask = batch["attention_mask"]
    out = model(**batch, use_cache=True)
    cache = output_cache(out)
    logits = out.logits[:, -1].float()
    positives = np.zeros(len(prompts), dtype=np.int64)
    truncated = np.zeros(len(prompts), dtype=np.int64)
    hit_days = np.full((len(prompts), k), np.nan)
    generated = 0
    sampled: list[list[int]] | None = [[] for _ in rows] if keep_tokens else None
    # Mamba's state has absorbed the padding: decoding steps take no mask (attention models need it for
    # positions and for masking the padded cache entries)
    recurrent = model.config.model_type in ("ehr_mamba", "ehr_mamba2")
    for step in range(cfg.max_new_tokens):
        tokens = _sample(logits.masked_fill(table.banned, float("-inf")), cfg, generator)
        generated += len(tokens)
        if sampled is not None:
            for row, token in zip(state.row.tolist(), tokens.tolist()):
                sampled[row].append(token)
        hit, ended, streams = state.advance(tokens, table)
        for i in torch.nonzero(hit).flatten().tolist():
            row = int(state.row[i])
            positives[row // k] += 1
            hit_days[row // k, row % k] = float(state.elapsed[i])
        keep = torch.nonzero(~ended).flatten()
        state.select(keep)
        if len(keep) == 0:
            break
        if step == cfg.max_new_tokens - 1:
            for row in state.row.tolist():
                truncated[row // k] += 1
            break
        if len(keep) < len(ended):
            keep_cache_rows(cache, keep)
            attention_mask = attention_mask[keep]
            streams = {name: value[keep] for name, value in streams.items()}
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(keep), 1)], dim=1)
        step_inputs = dict(streams, cache=cache, use_cache=True)
        if not recurrent:
            step_inputs["attention_mask"] = attention_mask
        out = model(**step_inputs)
        cache = output_cache(out)
        logits = out.logits[:, -1].float()
    return RolloutResult(positives, truncated, hit_days, generated, sampled)


def wilson_interval(positives: np.ndarray, n: int, z: float = 1.959964) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of positives / n (95% by default), elementwise."""
    p = positives / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)
