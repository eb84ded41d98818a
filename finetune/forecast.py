"""`ehrfm forecast`: zero-shot predictions from a pretrained causal model by sampling patient futures.

For every label row of a split, the patient's history cut strictly before the prediction time (the same cut
finetuning uses) is continued ``samples`` times (``finetune/rollout.py``) and each rollout is read with the
task's own outcome definition (``data_shards.tasks``), so zero-shot and supervised predictions answer the same
question. The predicted probability is the fraction of positive rollouts.

Which outcomes a rollout can answer with today's token scheme:

* ``death`` -- a generated death token (codes starting ``MEDS_DEATH``) before the window closes;
* ``encounter_start`` -- an ``ENCOUNTER/<class>`` token in a visit the rollout started (the index stay's own
  encounter token is history);
* ``code`` -- a token of one of the codes (prefix match, value bins included);
* ``stay_longer_than`` (length of stay) -- the stay-length token ([S<k>D], ``visits.stay_tokens``) the rollout
  generates for the visit open at the prediction time: positive when its whole range lies above the task's
  ``stay_days``, negative for a shorter one or when the rollout starts a new visit first. ``stay_days`` must be
  one of the token edges (``schema.STAY_EDGES_DAYS``: 1-7, 14, 30 days) so that every token answers exactly;
  data prepared without stay tokens (``visits.stay_tokens: false``, the CEHR-BERT layout) keeps no clock inside
  visits and cannot answer it. Tasks that cannot be answered are skipped with a warning (an error when asked
  for by name).

Output folder: the ``ehrfm evaluate`` layout (``<task>/predictions.parquet`` in the MEDS label schema,
metrics.json with patient-level bootstrap CIs, report.md, plots) plus ``rollouts.parquet`` (per example:
positives, truncated rollouts, the Wilson 95% interval of the fraction, the median sampled event time in
days) and ``forecast.json`` (settings, per-task counts, tokens generated, wall time). For time-to-event tasks
(labels with ``time_to_event_days``), forecast.json also holds the rollouts' time-to-event metrics
(``finetune/survival_metrics.py``: Harrell's and Uno's C, time-dependent AUROC, integrated Brier score).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from ehrfm.data_shards.shards import read_manifest, write_json_atomic

from .config import ForecastConfig
from .data import FinetuneInputError, check_vocabulary, plain_sample, read_export_metadata, resolve_tasks
from .rollout import OutcomeRule, RolloutResult, TokenTable, open_visit_days, rollout, wilson_interval

log = logging.getLogger("ehrfm.finetune")

DEATH_PREFIX = "MEDS_DEATH"
ENCOUNTER_PREFIX = "ENCOUNTER/"


def outcome_rule(task, tokens: list[str], stay_tokens_seen: bool = True) -> tuple[OutcomeRule | None, str]:
    """The rule that reads ``task``'s outcome off a rollout, or (None, why it cannot be read).
    ``stay_tokens_seen``: whether the data (and so the model) has stay-length tokens."""
    outcome = task.outcome
    death_ids = [i for i, t in enumerate(tokens) if t.startswith(DEATH_PREFIX)]
    if outcome.kind == "stay_longer_than":
        return stay_rule(outcome.stay_days, tokens, stay_tokens_seen)
    if outcome.kind == "death":
        hits, new_visit_only, ends = death_ids, False, []
    elif outcome.kind == "encounter_start":
        prefixes = tuple(f"{ENCOUNTER_PREFIX}{c}" for c in outcome.encounter_classes)
        hits, new_visit_only, ends = [i for i, t in enumerate(tokens) if t.startswith(prefixes)], True, death_ids
    else:
        prefixes = tuple(outcome.codes)
        hits, new_visit_only, ends = [i for i, t in enumerate(tokens) if t.startswith(prefixes)], False, death_ids
    if not hits:
        return None, f"no token of its {outcome.kind} outcome is in the vocabulary"
    return OutcomeRule(hits, float(outcome.window_days), new_visit_only, ends), ""


def stay_rule(stay_days: float, tokens: list[str], stay_tokens_seen: bool) -> tuple[OutcomeRule | None, str]:
    """Length of stay > ``stay_days``: read off the open visit's stay-length token (see the module docstring)."""
    from ehrfm.data_shards.schema import STAY_EDGES_DAYS, STAY_TOKENS, stay_range_days

    if not stay_tokens_seen:
        return None, (
            "length of stay needs a clock inside visits: prepare the data with visits.stay_tokens (the default) "
            "and pretrain on it"
        )
    if stay_days not in STAY_EDGES_DAYS:
        return None, f"stay_days {stay_days:g} is not a stay-token edge {STAY_EDGES_DAYS}, so no token answers it"
    ids = {t: i for i, t in enumerate(tokens) if t in STAY_TOKENS}
    longer = [i for t, i in ids.items() if stay_range_days(t)[0] >= stay_days]
    shorter = [i for t, i in ids.items() if stay_range_days(t)[1] <= stay_days]
    return OutcomeRule(longer, float("inf"), end_ids=shorter, open_visit_only=True), ""


def task_definitions(data_dir: Path) -> dict:
    """name -> TaskConfig of the tasks the data folder was prepared with (its config.yaml; a task file that can no
    longer be read leaves its tasks out, with a warning)."""
    from ehrfm.config import load_config
    from ehrfm.data_shards.config import PrepareConfig
    from ehrfm.data_shards.errors import DataError
    from ehrfm.data_shards.tasks import load_tasks

    path = Path(data_dir) / "config.yaml"
    if not path.exists():
        return {}
    found = {}
    for ref in load_config(PrepareConfig, path, []).tasks:
        try:
            found.update({t.name: t for t in load_tasks([ref])})
        except DataError as err:  # a task file moved since prepare: its tasks are skipped, the others run
            log.warning("forecast: cannot read the task config the data was prepared with: %s", err)
    return found


def token_statistics(
    data_dir: Path, manifest: dict, split: str, vocab_size: int
) -> tuple[dict[int, int], dict[int, float]]:
    """From ``split``'s shards: the type the data gives each token id (its most frequent type_id) and, per
    stay-length token id, the mean length in days of the visits it closes (token time minus the time of the
    visit's first token)."""
    from ehrfm.data_shards.schema import NUM_TOKEN_TYPES, SECONDS_PER_DAY, TokenType
    from ehrfm.data_shards.shard_codec import read_streams

    columns: dict[str, list[np.ndarray]] = {"input_ids": [], "type_ids": [], "event_time_s": [], "visit_orders": []}
    rows = []
    for shard in manifest["shards"][split]:
        lengths, streams, _ = read_streams(Path(data_dir) / shard["path"], tuple(columns))
        for name, parts in columns.items():
            parts.append(streams[name])
        rows.append(np.repeat(np.arange(len(lengths)) + sum(len(r) for r in rows), lengths))
    if not rows:
        return {}, {}
    ids, types, times, orders, row = (
        np.concatenate(columns["input_ids"]).astype(np.int64),
        np.concatenate(columns["type_ids"]).astype(np.int64),
        np.concatenate(columns["event_time_s"]).astype(np.int64),
        np.concatenate(columns["visit_orders"]).astype(np.int64),
        np.concatenate(rows),
    )
    counts = np.zeros((vocab_size, NUM_TOKEN_TYPES), dtype=np.int64)
    np.add.at(counts, (ids, types), 1)
    seen = counts.sum(1) > 0
    types_by_id = {int(i): int(counts[i].argmax()) for i in np.nonzero(seen)[0]}
    # visits are contiguous runs of (row, visit order); each stay token is measured from its run's first token
    new_run = np.ones(len(ids), dtype=bool)
    new_run[1:] = (row[1:] != row[:-1]) | (orders[1:] != orders[:-1])
    run_start = times[np.nonzero(new_run)[0]][np.cumsum(new_run) - 1]
    stay = types == int(TokenType.STAY)
    days = (times[stay] - run_start[stay]) / SECONDS_PER_DAY
    total = np.bincount(ids[stay], weights=days, minlength=vocab_size)
    number = np.bincount(ids[stay], minlength=vocab_size)
    stay_days = {int(i): float(total[i] / number[i]) for i in np.nonzero(number)[0]}
    return types_by_id, stay_days


def load_causal_model(model_dir: Path, architecture: str):
    """The pretraining head model (``AutoModelForCausalLM``) of an export, in eval mode."""
    from transformers import AutoModelForCausalLM

    from ehrfm.pretrain.models import OBJECTIVES, is_causal, register_auto_classes

    if not is_causal(architecture):
        causal = [name for name, objective in OBJECTIVES.items() if objective == "ntp"]
        raise FinetuneInputError(
            f"{model_dir}: a {architecture} export is not a next-token model and cannot sample futures; "
            f"forecast needs one of {', '.join(causal)}"
        )
    register_auto_classes()
    try:
        return AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    except Exception as err:  # noqa: BLE001
        raise FinetuneInputError(f"{model_dir}: cannot load the model with AutoModelForCausalLM ({err})") from None


def forecast(model_dir: Path, data_dir: Path, out: Path, cfg: ForecastConfig, *, overwrite: bool = False) -> dict:
    """Zero-shot predictions for the tasks of ``data_dir``'s ``cfg.split``; returns metrics.json."""
    from ehrfm.data_shards.examples import TaskExamples
    from ehrfm.data_shards.vocab import Vocabulary
    from ehrfm.devices import autocast, compute_device
    from ehrfm.outputs import check_output_dir

    from .evaluate import write_evaluation

    started = time.time()
    model_dir, data_dir, out = Path(model_dir), Path(data_dir), Path(out)
    check_output_dir(out, "forecast", inputs=[model_dir, data_dir], overwrite=overwrite)
    cfg.validate()
    meta = read_export_metadata(model_dir)
    manifest = read_manifest(data_dir)
    check_vocabulary(meta["vocab_fingerprint"], model_dir / "ehrfm_export.json", data_dir, manifest)
    vocab = Vocabulary.load(data_dir / "tokenizer")
    definitions = task_definitions(data_dir)
    pretrain_split = "pretrain" if "pretrain" in manifest["shards"] else cfg.split
    types_by_id, stay_days = token_statistics(data_dir, manifest, pretrain_split, len(vocab))
    rules, skipped = {}, {}
    for name in resolve_tasks(manifest, data_dir, cfg.tasks):
        known = name in definitions
        rule, why = outcome_rule(definitions[name], vocab.tokens, bool(stay_days)) if known else (None, "")
        if rule is None:
            why = why or "no task definition (external labels): the outcome is unknown"
            if cfg.tasks:
                raise FinetuneInputError(f"task {name!r} cannot be forecast zero-shot: {why}", task=name)
            skipped[name] = why
            continue
        rules[name] = rule
    for name, why in skipped.items():
        log.warning("forecast: skipping task %r: %s", name, why)
    if not rules:
        raise FinetuneInputError(f"{data_dir}: no task can be forecast zero-shot ({skipped})")

    model = load_causal_model(model_dir, str(meta["architecture"]))
    device = compute_device()
    model.to(device)
    table = TokenTable(vocab.tokens, vocab.task_tokens, types_by_id, stay_days)
    table.to(device)
    generator = torch.Generator().manual_seed(cfg.sampling.seed)
    frames, rollout_rows, tallies, tokens = [], [], {}, 0
    for name, rule in rules.items():
        examples = TaskExamples(data_dir, name, cfg.split, cfg.context_length - cfg.sampling.max_new_tokens)
        count = len(examples) if not cfg.max_examples else min(cfg.max_examples, len(examples))
        with autocast(cfg.precision, device):
            result = forecast_examples(model, examples, count, rule, table, cfg.sampling, generator, name)
        tokens += result.tokens
        labels = examples.labels.head(count).with_columns(task=pl.lit(name))
        frames.append(
            labels.select("subject_id", "prediction_time", "boolean_value", "task").with_columns(
                predicted_boolean_probability=pl.Series(result.positives / cfg.sampling.samples)
            )
        )
        low, high = wilson_interval(result.positives, cfg.sampling.samples)
        rollout_rows.append(
            labels.select("subject_id", "prediction_time", "task").with_columns(
                samples=pl.lit(cfg.sampling.samples),
                positives=pl.Series(result.positives),
                truncated=pl.Series(result.truncated),
                probability_ci_low=pl.Series(low),
                probability_ci_high=pl.Series(high),
                median_event_days=pl.Series(median_hit_days(result.hit_days)),
            )
        )
        tallies[name] = {
            "examples": count,
            "rollouts": count * cfg.sampling.samples,
            "truncated_rollouts": int(result.truncated.sum()),
            "window_days": rule.window_days if np.isfinite(rule.window_days) else None,
        }
        if "time_to_event_days" in labels.columns:
            tallies[name]["time_to_event"] = zero_shot_time_to_event(labels, result, rule.window_days, cfg)
    seconds = time.time() - started
    summary = {
        "model": str(model_dir.resolve()),
        "data": str(data_dir.resolve()),
        "split": cfg.split,
        "config": dataclasses.asdict(cfg),
        "tasks": tallies,
        "skipped_tasks": skipped,
        "tokens_generated": tokens,
        "seconds": round(seconds, 2),
        "device": str(device),
    }

    def extras(folder: Path) -> None:
        pl.concat(rollout_rows).write_parquet(folder / "rollouts.parquet")
        write_json_atomic(folder / "forecast.json", summary)

    metrics = write_evaluation(
        pl.concat(frames),
        out,
        model=f"zero-shot {model_dir}",
        split=cfg.split,
        n_boot=cfg.bootstrap,
        seed=cfg.sampling.seed,
        extra={"method": "zero-shot", "samples": cfg.sampling.samples},
        command="forecast",
        inputs=[model_dir, data_dir],
        overwrite=overwrite,
        also=extras,
    )
    log.info("forecast %s on %s/%s -> %s (%.1f s, %d tokens)", model_dir, data_dir, cfg.split, out, seconds, tokens)
    return metrics


def forecast_examples(
    model, examples, count: int, rule: OutcomeRule, table: TokenTable, sampling, generator, name: str
):
    """Rollouts of the first ``count`` examples of a ``TaskExamples``, ``sampling.batch_rows // samples``
    examples per batch, under a progress bar; returns one :class:`RolloutResult` over all of them."""
    from tqdm import tqdm

    per_batch = max(1, sampling.batch_rows // sampling.samples)
    parts = []
    with tqdm(total=count, desc=f"forecast {name}", unit="ex", dynamic_ncols=True) as bar:
        for start in range(0, count, per_batch):
            stop = min(count, start + per_batch)
            prompts = []
            for i in range(start, stop):
                prompt = plain_sample(examples[i][0])
                prompt["open_visit_days"] = open_visit_days(prompt, examples.prediction_time_s(i))
                prompts.append(prompt)
            parts.append(rollout(model, prompts, [rule] * len(prompts), table, sampling, generator))
            bar.update(stop - start)
    empty = np.zeros(0, dtype=np.int64)
    return RolloutResult(
        positives=np.concatenate([p.positives for p in parts]) if parts else empty,
        truncated=np.concatenate([p.truncated for p in parts]) if parts else empty,
        hit_days=np.concatenate([p.hit_days for p in parts]) if parts else np.zeros((0, sampling.samples)),
        tokens=sum(p.tokens for p in parts),
    )


def zero_shot_time_to_event(labels: pl.DataFrame, result: RolloutResult, horizon: float, cfg: ForecastConfig) -> dict:
    """Time-to-event metrics of the rollouts against time-to-event labels (``survival_metrics.horizon_report``):
    the risk is the fraction of rollouts with the event within the horizon, and each example's survival curve
    the empirical one of its sampled event times (S(t) = share of rollouts without an event by day t), on the
    grid the survival heads report (``SURVIVAL_GRID`` x the horizon)."""
    from .survival import SURVIVAL_GRID
    from .survival_metrics import horizon_report

    grid = SURVIVAL_GRID.numpy().astype(float) * horizon
    hits = np.nan_to_num(result.hit_days, nan=np.inf)
    survival = 1.0 - (hits[:, None, :] <= grid[None, :, None]).mean(axis=2)
    return horizon_report(
        labels["time_to_event_days"].to_numpy(),
        labels["boolean_value"].to_numpy(),
        result.positives / cfg.sampling.samples,
        labels["subject_id"].to_numpy(),
        horizon,
        survival,
        grid,
        cfg.bootstrap,
        cfg.sampling.seed,
    )


def median_hit_days(hit_days: np.ndarray) -> np.ndarray:
    """(examples, samples) days with NaN for rollouts without a hit -> (examples,) median over the hits (NaN
    for an example without any)."""
    out = np.full(len(hit_days), np.nan)
    for i, days in enumerate(hit_days):
        hits = days[~np.isnan(days)]
        if len(hits):
            out[i] = float(np.median(hits))
    return out
