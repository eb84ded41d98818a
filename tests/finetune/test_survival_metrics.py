"""Time-to-event metrics against independent oracles: Harrell's C by pair counting, and without censoring the
cumulative/dynamic AUROC equals scikit-learn's AUROC of "event by h" and the IPCW Brier score the plain one."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ehrfm.finetune.survival_metrics import bootstrap_survival_metrics, survival_point_metrics, time_grid


def harrell_by_pairs(time, event, risk) -> float:
    """Comparable pairs: i had the event and j outlived T_i; concordant when risk_i > risk_j, ties count 1/2."""
    concordant, comparable = 0.0, 0
    for i in range(len(time)):
        for j in range(len(time)):
            if event[i] and time[j] > time[i]:
                comparable += 1
                concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / comparable


def test_harrell_c_by_hand_and_by_pair_counting():
    time, event = np.array([1.0, 2, 3, 4]), np.ones(4, bool)
    assert survival_point_metrics(time, event, np.array([4.0, 3, 2, 1]), [3.0])["harrell_c"] == 1.0
    assert survival_point_metrics(time, event, np.array([1.0, 2, 3, 4]), [3.0])["harrell_c"] == 0.0
    rng = np.random.default_rng(0)
    time = rng.exponential(100, 60)  # no tied times: conventions for ties differ between definitions
    event = rng.random(60) < 0.6
    risk = -time + rng.normal(0, 60, 60)
    got = survival_point_metrics(time, event, risk, [50.0])["harrell_c"]
    assert got == pytest.approx(harrell_by_pairs(time, event, risk), abs=1e-12)


def test_without_censoring_td_auroc_and_ibs_reduce_to_the_plain_metrics():
    rng = np.random.default_rng(1)
    time = rng.exponential(100, 80) + 1
    event = np.ones(80, bool)
    risk = -time + rng.normal(0, 40, 80)
    horizons = [30.0, 90.0]
    rates = np.exp(rng.normal(-4.5, 0.3, 80))

    def survival_at(grid):
        return np.exp(-rates[:, None] * grid[None, :])

    got = survival_point_metrics(time, event, risk, horizons, survival_at)
    for h in horizons:
        assert got[f"td_auroc@{h:g}"] == pytest.approx(roc_auc_score(time <= h, risk), abs=1e-9)
    grid = time_grid(time, horizons)
    brier = [np.mean(((time > t).astype(float) - survival_at(np.array([t]))[:, 0]) ** 2) for t in grid]
    assert got["ibs"] == pytest.approx(np.trapezoid(brier, grid) / (grid[-1] - grid[0]), rel=1e-9)
    assert 0.5 < got["uno_c"] <= 1 and got["uno_c"] == pytest.approx(got["harrell_c"], abs=0.05)


def test_bootstrap_cis_are_seeded_and_bracket_the_point():
    rng = np.random.default_rng(2)
    time = rng.exponential(100, 120) + 1
    event = rng.random(120) < 0.7
    risk = -time + rng.normal(0, 50, 120)
    groups = np.arange(120) // 2  # two rows per patient move together
    a = bootstrap_survival_metrics(time, event, risk, groups, [60.0], n_boot=50, seed=3)
    b = bootstrap_survival_metrics(time, event, risk, groups, [60.0], n_boot=50, seed=3)
    assert a == b
    for name in ("harrell_c", "uno_c", "td_auroc@60"):
        assert a[name]["ci_low"] <= a[name]["value"] <= a[name]["ci_high"] and a[name]["n_valid"] == 50
    assert np.isnan(survival_point_metrics(time, np.zeros(120, bool), risk, [60.0])["harrell_c"])  # no events
