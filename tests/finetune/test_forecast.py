"""Zero-shot forecasting: the rollout clock and outcome rules on scripted models (hand-computed), batched rollouts
== each example alone on real backbones (cache row selection, left padding), and a rule corpus on which a
pretrained model forecasts the outcome."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ehrfm.data_shards.schema import SPECIAL_TOKENS, TokenType
from ehrfm.data_shards.tasks import OutcomeSpec, TaskConfig
from ehrfm.finetune.bench import random_prompts
from ehrfm.finetune.forecast import outcome_rule
from ehrfm.finetune.rollout import (
    OutcomeRule,
    SamplingConfig,
    TokenTable,
    interval_days,
    open_visit_days,
    rollout,
    wilson_interval,
)

TOKENS = [*SPECIAL_TOKENS, "ENCOUNTER/IMP", "MEDS_DEATH", "LAB/x", "ENCOUNTER/AMB", "LAB/x//Q2"]
ID = {t: i for i, t in enumerate(TOKENS)}


def test_interval_days_are_the_middles_of_the_timeline_ranges():
    assert [interval_days(f"[W{k}]") for k in range(4)] == [3.5, 10.5, 17.5, 24.5]
    assert interval_days("[M1]") == 44.0 and interval_days("[M2]") == 75.0 and interval_days("[M12]") == 362.5
    assert interval_days("[LT]") == 365.0


def test_median_hit_days_ignores_rollouts_without_a_hit():
    from ehrfm.finetune.forecast import median_hit_days

    days = np.array([[3.5, np.nan, 10.5, 75.0], [np.nan] * 4, [np.nan, 17.5, np.nan, np.nan]])
    np.testing.assert_array_equal(median_hit_days(days), [10.5, np.nan, 17.5])


def test_wilson_interval_by_hand():
    low, high = wilson_interval(np.array([5, 0]), 10)
    np.testing.assert_allclose(low, [0.2366, 0.0], atol=1e-4)
    np.testing.assert_allclose(high, [0.7634, 0.2775], atol=1e-4)


def test_outcome_rules_follow_the_task_definitions():
    def task(**outcome):
        return TaskConfig(name="t", outcome=OutcomeSpec(**outcome))

    death, why = outcome_rule(task(kind="death", window_days=365), TOKENS)
    assert death == OutcomeRule([ID["MEDS_DEATH"]], 365.0, False, [])
    readmit, _ = outcome_rule(task(kind="encounter_start", encounter_classes=["IMP"], window_days=30), TOKENS)
    assert readmit == OutcomeRule([ID["ENCOUNTER/IMP"]], 30.0, True, [ID["MEDS_DEATH"]])
    code, _ = outcome_rule(task(kind="code", codes=["LAB/x"], window_days=10), TOKENS)
    assert code.hit_ids == [ID["LAB/x"], ID["LAB/x//Q2"]] and not code.new_visit_only
    los, why = outcome_rule(task(kind="stay_longer_than", stay_days=7), TOKENS)
    longer, shorter = ["[S14D]", "[S30D]", "[SLT]"], [f"[S{k}D]" for k in range(1, 8)]
    assert los == OutcomeRule([ID[t] for t in longer], float("inf"), False, [ID[t] for t in shorter], True)
    los3, _ = outcome_rule(task(kind="stay_longer_than", stay_days=3), TOKENS)
    assert los3.hit_ids == [ID[t] for t in ("[S4D]", "[S5D]", "[S6D]", "[S7D]", *longer)]
    off_edge, why = outcome_rule(task(kind="stay_longer_than", stay_days=10), TOKENS)
    assert off_edge is None and "edge" in why
    no_clock, why = outcome_rule(task(kind="stay_longer_than", stay_days=7), TOKENS, stay_tokens_seen=False)
    assert no_clock is None and "clock inside visits" in why
    missing, why = outcome_rule(task(kind="code", codes=["NOPE/"]), TOKENS)
    assert missing is None and "vocabulary" in why


@dataclasses.dataclass
class _Out:
    logits: torch.Tensor
    cache: object


class _ScriptCache:
    def __init__(self, rows: int) -> None:
        self.rows, self.step = torch.arange(rows), 0

    def reorder_cache(self, index) -> None:
        self.rows = self.rows[index]


class _ScriptedModel(torch.nn.Module):
    """Emits scripts[example][step] (greedy); records the streams it is fed."""

    def __init__(self, scripts: list[list[str]], samples: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"model_type": "ehr_llama"})()
        self.scripts, self.samples, self.fed = scripts, samples, []

    def forward(self, input_ids, cache=None, use_cache=True, **streams):
        if cache is None:
            cache = _ScriptCache(len(input_ids))
        else:
            cache.step += 1
            self.fed.append({"rows": cache.rows.clone(), "input_ids": input_ids.clone(), **streams})
        logits = torch.full((len(input_ids), 1, len(TOKENS)), -1e9)
        for i, row in enumerate(cache.rows.tolist()):
            script = self.scripts[row // self.samples]
            logits[i, 0, ID[script[min(cache.step, len(script) - 1)]]] = 0.0
        return _Out(logits=logits, cache=cache)


def _history(visit_order=3, weeks=2800.0, age=70.0):
    return {
        "input_ids": np.array([ID["[CLS]"], ID["[VS]"], ID["ENCOUNTER/IMP"]]),
        "type_ids": np.array([TokenType.CLS, TokenType.VS, TokenType.OTHER]),
        "ages": np.full(3, age, dtype=np.float32),
        "times": np.full(3, weeks, dtype=np.float32),
        "visit_segments": np.array([0, 1, 1]),
        "visit_orders": np.array([0, visit_order, visit_order]),
    }


def test_rollout_clock_windows_new_visits_death_and_truncation():
    scripts = [
        ["ENCOUNTER/IMP", "[VE]", "[REG]", "[W1]", "[VS]", "ENCOUNTER/IMP"],  # same stay: no; 10.5 days later: hit
        ["[VE]", "[REG]", "[M2]", "[VS]", "ENCOUNTER/IMP"],  # 75 days: the 30-day window closed at [M2]
        ["[VE]", "[REG]", "[W0]", "[VS]", "MEDS_DEATH", "ENCOUNTER/IMP"],  # died first: negative
        ["LAB/x"],  # never answers: truncated after the budget
    ]
    rule = OutcomeRule([ID["ENCOUNTER/IMP"]], 30.0, True, [ID["MEDS_DEATH"]])
    table = TokenTable(TOKENS, [], {ID["LAB/x"]: int(TokenType.LAB)})
    model = _ScriptedModel(scripts, samples=2)
    cfg = SamplingConfig(samples=2, temperature=0.0, max_new_tokens=8)
    result = rollout(model, [_history()] * 4, [rule] * 4, table, cfg, torch.Generator())
    assert result.positives.tolist() == [2, 0, 0, 0] and result.truncated.tolist() == [0, 0, 0, 2]
    assert result.hit_days[0].tolist() == [10.5, 10.5] and np.isnan(result.hit_days[1:]).all()
    # streams of example 0's rows: [W1] opens visit 4 (segment 2) 1.5 weeks and 10.5 days of age later
    after_interval = model.fed[3]  # the step that feeds the 4th generated token ([W1]) back
    rows = (after_interval["rows"] // 2 == 0).nonzero().flatten()
    assert after_interval["input_ids"][rows, 0].tolist() == [ID["[W1]"]] * 2
    assert after_interval["visit_orders"][rows, 0].tolist() == [4, 4]
    assert after_interval["visit_segments"][rows, 0].tolist() == [2, 2]
    torch.testing.assert_close(after_interval["times"][rows, 0], torch.full((2,), 2801.5))
    torch.testing.assert_close(after_interval["ages"][rows, 0], torch.full((2,), 70 + 10.5 / 365.25))
    assert after_interval["type_ids"][rows, 0].tolist() == [int(TokenType.INTERVAL)] * 2
    # finished rows left the batch: example 1 ended at its 3rd token, example 2 at its 5th
    assert [len(f["rows"]) for f in model.fed] == [8, 8, 6, 6, 4, 2, 2]


def test_open_visit_days_by_hand():
    day = 86400
    history = {
        "visit_orders": np.array([0, 1, 1, 1, 1, 2, 2, 2]),
        "type_ids": np.array([1, 2, 8, 7, 4, 5, 2, 8]),
        "event_time_s": np.array([0, 0, day, day, day, 10 * day, 10 * day, 10 * day + 3600]),
    }
    # visit 2 began (its interval token) on day 10 and is still open at day 11.5
    assert open_visit_days(history, int(11.5 * day)) == 1.5
    closed = {k: v[:5] for k, v in history.items()}  # ends with [REG]: between visits
    assert open_visit_days(closed, 5 * day) == 0.0
    assert open_visit_days({k: v[:1] for k, v in history.items()}, day) == 0.0  # only [CLS]


def test_rollout_reads_length_of_stay_and_the_clock_counts_stays():
    """A stay token of the open visit answers length of stay; leaving the visit without one is negative. The
    clock counts a stay token's mean days (the table's), for the open visit minus the days it had lasted at
    the prediction time (hand-computed)."""
    los, _ = outcome_rule(TaskConfig(name="los", outcome=OutcomeSpec(kind="stay_longer_than", stay_days=7)), TOKENS)
    scripts = [
        ["LAB/x", "[S14D]"],  # the open stay ends after 7-14 days: positive
        ["[S3D]", "[VE]"],  # a short stay: negative at the token
        ["[VE]", "[REG]", "[W1]", "[VS]", "[S14D]"],  # a new visit before the stay token: negative at [W1]
        ["LAB/x"],  # truncated
    ]
    table = TokenTable(TOKENS, [], {}, {ID["[S3D]"]: 2.5})
    assert table.stay_days[ID["[S3D]"]] == 2.5 and table.stay_days[ID["[S14D]"]] == 10.5  # measured / middle
    assert table.stay_days[ID["[SLT]"]] == 30.0 and table.types[ID["[S1D]"]] == TokenType.STAY
    cfg = SamplingConfig(samples=1, temperature=0.0, max_new_tokens=6)
    prompts = [dict(_history(), open_visit_days=1.0) for _ in scripts]
    model = _ScriptedModel(scripts, samples=1)
    result = rollout(model, prompts, [los] * 4, table, cfg, torch.Generator(), keep_tokens=True)
    assert result.positives.tolist() == [1, 0, 0, 0] and result.truncated.tolist() == [0, 0, 0, 1]
    assert [len(s) for s in result.sampled] == [2, 1, 3, 6]

    readmit = OutcomeRule([ID["ENCOUNTER/IMP"]], 30.0, True, [ID["MEDS_DEATH"]])
    scripts = [
        ["[S3D]", "[VE]", "[REG]", "[W1]", "[VS]", "ENCOUNTER/IMP"],  # (2.5 - 1.0) + 10.5 = 12.0 days
        ["[VE]", "[REG]", "[W0]", "[VS]", "LAB/x", "[S3D]", "[VE]", "[REG]", "[W1]", "[VS]", "ENCOUNTER/IMP"],
    ]  # the open visit closes without a stay token; 3.5 + 2.5 (a whole new stay) + 10.5 = 16.5 days
    cfg = SamplingConfig(samples=1, temperature=0.0, max_new_tokens=12)
    model = _ScriptedModel(scripts, samples=1)
    result = rollout(model, [dict(_history(), open_visit_days=1.0)] * 2, [readmit] * 2, table, cfg, torch.Generator())
    assert result.hit_days[:, 0].tolist() == [12.0, 16.5]
    # the stay token's streams carry the visit end: 1.5 days after the prediction time, in weeks and years
    fed_stay = model.fed[0]
    assert fed_stay["type_ids"][0, 0] == TokenType.STAY
    torch.testing.assert_close(fed_stay["times"][0, 0], torch.tensor(2800.0 + 1.5 / 7))
    torch.testing.assert_close(fed_stay["ages"][0, 0], torch.tensor(70.0 + 1.5 / 365.25))


@pytest.mark.parametrize("arch", ["llama", "mamba", "mamba2"])
def test_batched_rollouts_equal_each_example_alone(arch):
    """Greedy rollouts of left-padded prompts of different lengths, rows leaving the batch as they hit, equal
    each example rolled out alone (the cache keeps the right rows; padding changes nothing)."""
    from ehrfm.pretrain.models import build_model

    shapes = {
        "llama": dict(num_attention_heads=4, intermediate_size=64),
        "mamba": {},
        "mamba2": dict(head_dim=16, num_heads=4, state_size=8, chunk_size=4),
    }
    vocab = 60
    torch.manual_seed(0)
    model = build_model(
        arch,
        "tiny",
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        time_embedding_size=8,
        embedding_dropout=0.0,
        **shapes[arch],
    ).eval()
    tokens = list(SPECIAL_TOKENS) + [f"C{i}" for i in range(vocab - len(SPECIAL_TOKENS))]
    table = TokenTable(tokens, [], {})
    prompts = random_prompts([5, 9, 7], vocab, seed=0)
    cfg = SamplingConfig(samples=1, temperature=0.0, max_new_tokens=12)
    # rules made to end rows at different steps: the first example hits its 1st token, the third the token of
    # its 5th step, the second never ends (truncated)
    free = [
        rollout(model, [p], [OutcomeRule([], 1e9)], table, cfg, torch.Generator(), keep_tokens=True) for p in prompts
    ]
    first, fifth = free[0].sampled[0][0], free[2].sampled[0][4]
    rules = [OutcomeRule([first], 1e9), OutcomeRule([], 1e9), OutcomeRule([fifth], 1e9)]
    together = rollout(model, prompts, rules, table, cfg, torch.Generator(), keep_tokens=True)
    alone = [rollout(model, [p], [r], table, cfg, torch.Generator(), keep_tokens=True) for p, r in zip(prompts, rules)]
    assert together.sampled == [a.sampled[0] for a in alone]
    assert together.positives.tolist() == [a.positives[0] for a in alone]
    assert together.truncated.tolist() == [a.truncated[0] for a in alone]
    lengths = sorted(len(s) for s in together.sampled)
    assert lengths[0] < lengths[-1] == cfg.max_new_tokens  # a row left the batch while others went on


TASK_YAML = """
tasks:
  - name: death_30d
    token: "[D30]"
    description: death within 30 days after an inpatient discharge
    anchor: {kind: encounter_end, encounter_classes: [IMP], select: all}
    outcome: {kind: death, window_days: 30}
  - name: death_tte
    token: "[DTE]"
    description: days to death within 30 days after an inpatient discharge (time-to-event)
    kind: time_to_event
    anchor: {kind: encounter_end, encounter_classes: [IMP], select: all}
    outcome: {kind: death, window_days: 30}
  - name: long_stay
    token: "[LST]"
    description: inpatient stay longer than 7 days, predicted 24 h after admission
    anchor: {kind: encounter_start, encounter_classes: [IMP], offset_hours: 24, min_stay_hours: 24, select: all}
    outcome: {kind: stay_longer_than, stay_days: 7, window_days: 0}
"""


def write_rule_corpus(root, subjects: int = 160, seed: int = 0):
    """A MEDS dataset where rules decide the outcomes: every patient has ambulatory visits and one inpatient
    stay; in half of the stays the code RULE/FATAL is recorded, and exactly those patients die 5 days after
    discharge (the others come back 60 and 120 days later); in a third of the stays RULE/LONG is recorded 12 h
    after admission, and exactly those stays last 10 days (the others 3)."""
    import datetime as dt

    import polars as pl

    rng = np.random.default_rng(seed)
    rows = []
    day = dt.timedelta(days=1)
    for s in range(subjects):
        birth = dt.datetime(1950, 1, 1) + int(rng.integers(0, 3650)) * day
        rows.append((s, birth, "MEDS_BIRTH", None))
        t = dt.datetime(2015, 1, 1) + int(rng.integers(0, 365)) * day
        for k in range(3):
            enc = f"a{s}-{k}"
            rows += [(s, t, "ENCOUNTER/AMB", enc), (s, t, f"DX/A{int(rng.integers(0, 5))}", enc)]
            rows.append((s, t + dt.timedelta(hours=1), "ENCOUNTER_END/AMB", enc))
            t += int(rng.integers(40, 80)) * day
        stay = f"i{s}"
        rows += [(s, t, "ENCOUNTER/IMP", stay), (s, t + day, "DX/B", stay)]
        fatal, long = s % 2 == 0, s % 3 == 0
        if fatal:
            rows.append((s, t + day, "RULE/FATAL", stay))
        if long:
            rows.append((s, t + dt.timedelta(hours=12), "RULE/LONG", stay))
        end = t + (10 if long else 3) * day
        rows.append((s, end, "ENCOUNTER_END/IMP", stay))
        if fatal:
            rows.append((s, end + 5 * day, "MEDS_DEATH", None))
        else:
            for gap in (60, 120):
                enc = f"b{s}-{gap}"
                start = end + gap * day
                rows += [(s, start, "ENCOUNTER/AMB", enc), (s, start, f"DX/A{int(rng.integers(0, 5))}", enc)]
                rows.append((s, start + dt.timedelta(hours=1), "ENCOUNTER_END/AMB", enc))
    frame = pl.DataFrame(
        rows,
        schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "encounter_id": pl.String},
        orient="row",
    ).with_columns(numeric_value=pl.lit(None, pl.Float32))
    (root / "data" / "train").mkdir(parents=True)
    frame.select("subject_id", "time", "code", "numeric_value", "encounter_id").write_parquet(
        root / "data" / "train" / "0.parquet"
    )
    (root / "metadata").mkdir()
    (root / "metadata" / "dataset.json").write_text('{"dataset_name": "rule", "dataset_version": "1"}')


@pytest.mark.slow
def test_zero_shot_forecast_learns_a_rule_corpus(tmp_path):
    """After pretraining on the rule corpus, zero-shot rollouts forecast 30-day death and a long stay almost
    perfectly (the stay from the stay-length token the rollout generates for the open visit)."""
    import json

    import polars as pl

    from ehrfm.cli import main
    from ehrfm.data_shards.config import PrepareConfig
    from ehrfm.data_shards.prepare import prepare

    write_rule_corpus(tmp_path / "meds")
    (tmp_path / "tasks.yaml").write_text(TASK_YAML)
    cfg = PrepareConfig(format="meds", tasks=[str(tmp_path / "tasks.yaml")])
    cfg.splits.respect_meds_splits = False
    prepare(tmp_path / "meds", tmp_path / "data", cfg, progress=False)
    run, hf, out = tmp_path / "run", tmp_path / "hf", tmp_path / "zero"
    pretrain = ["pretrain", "--data", str(tmp_path / "data"), "--model", "llama", "--size", "mini", "--out", str(run)]
    overrides = [
        "data.context_length=64",
        "data.batch_size=16",
        "train.max_steps=500",
        "train.val_every=100",
        "checkpoint.every=0",
        "optim.lr=3e-3",
        "train.progress_bar=false",
        "train.save_probe=false",
        "model.overrides.hidden_size=32",
        "model.overrides.num_hidden_layers=2",
        "model.overrides.num_attention_heads=2",
        "model.overrides.intermediate_size=64",
    ]
    assert main([*pretrain, *overrides]) == 0
    assert main(["export", "--run", str(run), "--out", str(hf)]) == 0
    code = main(
        [
            "forecast",
            "--model",
            str(hf),
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--samples",
            "8",
            "--max-new-tokens",
            "24",
            "--context-length",
            "64",
            "--bootstrap",
            "50",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())["tasks"]["death_30d"]
    assert metrics["auroc"]["value"] >= 0.9, metrics
    long_stay = json.loads((out / "metrics.json").read_text())["tasks"]["long_stay"]
    assert long_stay["auroc"]["value"] >= 0.9, long_stay
    predictions = pl.read_parquet(out / "death_30d" / "predictions.parquet")
    assert predictions.columns == [
        "subject_id",
        "prediction_time",
        "boolean_value",
        "predicted_boolean_value",
        "predicted_boolean_probability",
    ]
    rollouts = pl.read_parquet(out / "rollouts.parquet").filter(pl.col("task") == "death_30d")
    assert rollouts.height == predictions.height and (rollouts["samples"] == 8).all()
    # deaths follow discharge by 5 days: an [W0] interval (3.5 days) before the death token
    assert rollouts.filter(pl.col("positives") > 0)["median_event_days"].median() == 3.5
    summary = json.loads((out / "forecast.json").read_text())
    assert summary["tasks"]["death_30d"]["rollouts"] == 8 * predictions.height
    # the same rollouts read as time-to-event forecasts: sampled death times order the patients
    survival = summary["tasks"]["death_tte"]["time_to_event"]
    assert survival["harrell_c"]["value"] >= 0.85 and survival["td_auroc@20"]["value"] >= 0.85, survival
    assert 0 <= survival["ibs"]["value"] < 0.25


def test_task_definitions_come_from_the_prepare_config_and_survive_a_moved_file(tmp_path, caplog):
    from ehrfm.finetune.forecast import task_definitions

    (tmp_path / "tasks.yaml").write_text(TASK_YAML)
    (tmp_path / "config.yaml").write_text(f"tasks:\n- demo\n- {tmp_path / 'tasks.yaml'}\n- {tmp_path / 'gone.yaml'}\n")
    found = task_definitions(tmp_path)
    assert {"los_7d", "readmission_30d", "mortality_1y", "death_30d", "death_tte", "long_stay"} == set(found)
    assert found["death_tte"].kind == "time_to_event" and "gone.yaml" in caplog.text
