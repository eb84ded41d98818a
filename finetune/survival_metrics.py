"""Time-to-event metrics with patient-level bootstrap CIs, computed by scikit-survival.

Inputs per label row: the observed time (days from the prediction time to the event or to censoring), whether
the event was observed, a risk score (higher = earlier event) and, for the Brier score, survival probabilities
S(t) on a time grid. Metrics:

* ``harrell_c`` -- Harrell's concordance (``concordance_index_censored``);
* ``uno_c`` -- Uno's IPCW concordance truncated at the largest horizon (``concordance_index_ipcw``);
* ``td_auroc@<h>`` -- cumulative/dynamic AUROC at each horizon h in days (``cumulative_dynamic_auc``): cases
  have the event by h, controls are still event-free after h, weighted by inverse censoring probabilities;
* ``ibs`` -- the integrated Brier score with IPCW over the grid (``integrated_brier_score``), when survival
  probabilities are given.

The censoring distribution of the IPCW weights is estimated (Kaplan-Meier) on the evaluated rows themselves:
ehrfm evaluates on a held-out split without a separate training set of times. Metrics a sample cannot define
(no events, a horizon beyond the follow-up) are NaN. The bootstrap resamples subjects, as
:mod:`ehrfm.finetune.metrics` does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _structured(time: np.ndarray, event: np.ndarray):
    from sksurv.util import Surv

    return Surv.from_arrays(event=event.astype(bool), time=time.astype(float))


def time_grid(time: np.ndarray, horizons: list[float], points: int = 10) -> np.ndarray:
    """``points`` evaluation times in days, evenly spaced up to the largest horizon and kept strictly inside the
    observed follow-up (scikit-survival's IPCW estimates need that)."""
    upper = min(max(horizons), float(np.max(time)) * (1 - 1e-9))
    lower = float(np.min(time))
    grid = np.linspace(upper / points, upper, points)
    return grid[(grid > lower) & (grid < float(np.max(time)))]


def survival_point_metrics(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    horizons: list[float],
    survival_at: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, float]:
    """Point values (see the module docstring). survival_at(grid) -> (rows, len(grid)) probabilities."""
    from sksurv.metrics import (
        concordance_index_censored,
        concordance_index_ipcw,
        cumulative_dynamic_auc,
        integrated_brier_score,
    )

    time, event, risk = np.asarray(time, float), np.asarray(event, bool), np.asarray(risk, float)
    out = {name: float("nan") for name in metric_names(horizons, survival_at is not None)}
    if len(time) < 2 or not event.any():
        return out
    y = _structured(time, event)
    try:
        out["harrell_c"] = float(concordance_index_censored(event, time, risk)[0])
    except (ValueError, ZeroDivisionError):
        pass
    try:
        out["uno_c"] = float(concordance_index_ipcw(y, y, risk, tau=max(horizons))[0])
    except (ValueError, ZeroDivisionError):
        pass
    for horizon in horizons:
        try:
            out[f"td_auroc@{horizon:g}"] = float(cumulative_dynamic_auc(y, y, risk, [horizon])[0][0])
        except (ValueError, ZeroDivisionError):
            pass
    if survival_at is not None:
        grid = time_grid(time, horizons)
        if len(grid) >= 2:
            try:
                out["ibs"] = float(integrated_brier_score(y, y, survival_at(grid), grid))
            except (ValueError, ZeroDivisionError):
                pass
    return out


def metric_names(horizons: list[float], with_survival: bool) -> list[str]:
    names = ["harrell_c", "uno_c", *(f"td_auroc@{h:g}" for h in horizons)]
    return names + (["ibs"] if with_survival else [])


def bootstrap_survival_metrics(
    time,
    event,
    risk,
    groups,
    horizons: list[float],
    survival: np.ndarray | None = None,
    survival_grid: np.ndarray | None = None,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, dict]:
    """{metric: {value, ci_low, ci_high, n_valid}} from ``n_boot`` subject-level resamples.

    survival (rows, len(survival_grid)): each row's S(t) on ``survival_grid`` (days); the metrics' grid reads it
    by step interpolation (the last grid value at or before t; 1 before the first)."""
    time, event, risk, groups = (np.asarray(a) for a in (time, event, risk, groups))

    def survival_for(rows: np.ndarray):
        if survival is None:
            return None
        table = np.asarray(survival, float)[rows]
        known = np.asarray(survival_grid, float)

        def at(grid: np.ndarray) -> np.ndarray:
            index = np.searchsorted(known, grid, side="right") - 1
            values = table[:, np.clip(index, 0, None)]
            return np.where(index[None, :] < 0, 1.0, values)

        return at

    from .metrics import subject_bootstrap

    point = survival_point_metrics(time, event, risk, horizons, survival_for(np.arange(len(time))))

    def metrics_of(rows: np.ndarray) -> dict[str, float]:
        return survival_point_metrics(time[rows], event[rows], risk[rows], horizons, survival_for(rows))

    return subject_bootstrap(groups, metrics_of, point, list(point), n_boot, seed, alpha)


def horizon_report(
    time, event, risk, groups, horizon: float, survival: np.ndarray, survival_grid: np.ndarray, n_boot: int, seed: int
) -> dict[str, dict]:
    """The time-to-event metrics ehrfm reports for a task followed for ``horizon`` days (``ehrfm evaluate`` and
    ``ehrfm forecast`` alike): time-dependent AUROC at a third and two thirds of the horizon (whole days; at
    the horizon itself, the end of follow-up, it is undefined), at most 200 bootstrap resamples (each
    replicate refits the IPCW weights)."""
    return bootstrap_survival_metrics(
        time,
        event,
        risk,
        groups,
        [float(round(horizon / 3)), float(round(2 * horizon / 3))],
        survival=survival,
        survival_grid=survival_grid,
        n_boot=min(n_boot, 200),
        seed=seed,
    )
