"""Metric code against values computed by hand, and the patient-level bootstrap."""

import numpy as np
import pytest

from ehrfm.finetune.metrics import binary_metrics, bootstrap_metrics, fast_binary_metrics

Y = np.array([0, 0, 1, 1])
P = np.array([0.1, 0.4, 0.35, 0.8])


def test_metrics_equal_hand_computed_values():
    m = binary_metrics(Y, P)
    # AUROC: positive/negative pairs ranked correctly: (0.35>0.1), (0.8>0.1), (0.8>0.4); wrong: (0.35<0.4) -> 3/4
    assert m["auroc"] == pytest.approx(0.75)
    # AP: ranks 0.8(+) 0.4(-) 0.35(+) 0.1(-): precision at the positives 1 and 2/3 -> mean 5/6
    assert m["auprc"] == pytest.approx(5 / 6)
    # Brier: (0.1^2 + 0.4^2 + 0.65^2 + 0.2^2) / 4
    assert m["brier"] == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    # thresholds 0.8 / 0.4 / 0.35 / 0.1: (P, R) = (1, .5) (.5, .5) (2/3, 1) (.5, 1) -> F1 .667 .5 .8 .667
    assert m["best_f1"] == pytest.approx(0.8) and m["best_f1_threshold"] == pytest.approx(0.35)
    # F2 = 5PR / (4P + R): .556 .5 .909 .833
    assert m["best_f2"] == pytest.approx(10 / 11) and m["best_f2_threshold"] == pytest.approx(0.35)
    assert m["prevalence"] == 0.5 and m["n"] == 4


def test_f2_prefers_recall_over_f1():
    y = np.array([1, 0, 1, 0, 0, 1])
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.15, 0.1])
    m = binary_metrics(y, p)
    # F1 best at 0.9 (P=1, R=1/3 -> .5) vs 0.3 (P=2/4, R=2/3 -> .571) vs 0.1 (P=.5, R=1 -> .667)
    assert m["best_f1"] == pytest.approx(2 / 3) and m["best_f1_threshold"] == pytest.approx(0.1)
    assert m["best_f2"] == pytest.approx(5 * 0.5 / (4 * 0.5 + 1)) and m["best_f2_threshold"] == pytest.approx(0.1)


def test_single_class_gives_nan_ranking_metrics_but_a_brier_score():
    m = binary_metrics(np.array([0, 0, 0]), np.array([0.2, 0.1, 0.0]))
    assert np.isnan(m["auroc"]) and np.isnan(m["auprc"]) and np.isnan(m["best_f1"])
    assert m["brier"] == pytest.approx((0.04 + 0.01) / 3)


def _cohort(seed=0, subjects=60):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, size=subjects)
    groups = np.repeat(np.arange(subjects) * 7 + 3, sizes)
    risk = np.repeat(rng.uniform(0, 1, size=subjects), sizes)
    y = rng.uniform(0, 1, size=len(groups)) < risk
    p = np.clip(risk + rng.normal(0, 0.2, size=len(groups)), 0, 1)
    return y, p, groups, sizes


def test_bootstrap_ci_contains_the_point_and_is_seeded():
    y, p, groups, _ = _cohort()
    a = bootstrap_metrics(y, p, groups, n_boot=300, seed=5)
    b = bootstrap_metrics(y, p, groups, n_boot=300, seed=5)
    c = bootstrap_metrics(y, p, groups, n_boot=300, seed=6)
    assert a == b
    assert a["auprc"]["ci_low"] != c["auprc"]["ci_low"] or a["auroc"]["ci_high"] != c["auroc"]["ci_high"]
    point = binary_metrics(y, p)
    for key in ("auroc", "auprc", "brier", "best_f1", "best_f2", "prevalence"):
        assert a[key]["value"] == point[key]
        assert a[key]["ci_low"] <= a[key]["value"] <= a[key]["ci_high"], key
        assert a[key]["ci_low"] < a[key]["ci_high"], key
        assert a[key]["n_valid"] == 300


def test_bootstrap_resamples_patients_not_rows():
    y, p, groups, sizes = _cohort(1, subjects=20)
    m = bootstrap_metrics(y, p, groups, n_boot=200, seed=0)
    # row-level resampling would always draw len(y) rows; patient-level draws whole patients, so n varies
    assert m["n"]["ci_low"] < m["n"]["ci_high"]
    # one row per patient: n is constant
    single = bootstrap_metrics(y[:20], p[:20], np.arange(20), n_boot=50, seed=0)
    assert single["n"]["ci_low"] == single["n"]["ci_high"] == 20


def test_bootstrap_draws_whole_patients(monkeypatch):
    """In every replicate each subject's rows appear equally often (k copies of the whole patient)."""
    import ehrfm.finetune.metrics as metrics

    y, _, groups, _ = _cohort(2, subjects=10)
    p = (np.arange(len(y)) + 0.5) / len(y)  # distinct scores identify the rows
    seen = []
    real_point, real_fast = metrics.binary_metrics, metrics.fast_binary_metrics

    def spy(real):
        def wrapped(yy, pp):
            seen.append(np.asarray(pp).copy())
            return real(yy, pp)

        return wrapped

    monkeypatch.setattr(metrics, "binary_metrics", spy(real_point))
    monkeypatch.setattr(metrics, "fast_binary_metrics", spy(real_fast))
    metrics.bootstrap_metrics(y, p, groups, n_boot=20, seed=0)
    assert len(seen) == 21  # the point estimate, then 20 replicates
    for rep in seen[1:]:
        copies = {int(round(v * len(y) - 0.5)): c for v, c in zip(*np.unique(rep, return_counts=True))}
        for g in np.unique(groups):
            rows = np.flatnonzero(groups == g)
            assert len({copies.get(int(r), 0) for r in rows}) == 1, f"subject {g} split across a replicate"


@pytest.mark.parametrize("seed", range(40))
def test_fast_metrics_equal_scikit_learn_with_ties(seed):
    """The bootstrap's numpy metrics against scikit-learn's (``binary_metrics``), scores rounded to create ties."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 80))
    y = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(int)
    p = np.round(rng.random(n), int(rng.integers(1, 4)))
    slow, fast = binary_metrics(y, p), fast_binary_metrics(y, p)
    assert slow.keys() == fast.keys()
    for key, value in slow.items():
        assert fast[key] == pytest.approx(value, abs=1e-12, nan_ok=True), key
