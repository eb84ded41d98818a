"""Binary classification metrics with patient-level bootstrap CIs (003 3.4: 1000 resamples, 95%).

Point metrics come from scikit-learn: AUROC (``roc_auc_score``), AUPRC as average precision
(``average_precision_score``), Brier (``brier_score_loss``), and best F1 / F2 over the thresholds of
``precision_recall_curve`` (F_beta = (1 + b^2) P R / (b^2 P + R); the threshold reported is the smallest score
classified positive). The bootstrap resamples *subjects* with replacement and takes all their label rows
(a patient with several admissions moves as a unit); the CI is the 2.5 / 97.5 percentile of the
replicates where the metric is defined (both classes present). Seeded: same inputs + seed -> same CIs.
The replicates use ``fast_binary_metrics``, the same definitions in plain numpy over one sort (scikit-learn's
input validation made 1000 resamples take seconds per task); its tests hold it equal to scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, precision_recall_curve, roc_auc_score

METRICS = ("auroc", "auprc", "brier", "best_f1", "best_f1_threshold", "best_f2", "best_f2_threshold", "prevalence", "n")


def best_fbeta(y: np.ndarray, p: np.ndarray, beta: float) -> tuple[float, float]:
    """(best F_beta, its threshold) over the precision-recall curve's thresholds."""
    precision, recall, thresholds = precision_recall_curve(y, p)
    precision, recall = precision[:-1], recall[:-1]  # the last point (P=1, R=0) has no threshold
    b2 = beta * beta
    denom = b2 * precision + recall
    f = np.divide((1 + b2) * precision * recall, denom, out=np.zeros_like(denom, dtype=float), where=denom > 0)
    i = int(np.argmax(f))
    return float(f[i]), float(thresholds[i])


def binary_metrics(y, p) -> dict[str, float]:
    """Point metrics of labels y (bool/0-1) and probabilities p; AUROC/AUPRC/F are NaN for one class."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    out = {"n": float(len(y)), "prevalence": float(y.mean()) if len(y) else float("nan")}
    out["brier"] = float(brier_score_loss(y, p)) if len(y) else float("nan")
    if len(np.unique(y)) < 2:
        for key in ("auroc", "auprc", "best_f1", "best_f1_threshold", "best_f2", "best_f2_threshold"):
            out[key] = float("nan")
        return out
    out["auroc"] = float(roc_auc_score(y, p))
    out["auprc"] = float(average_precision_score(y, p))
    out["best_f1"], out["best_f1_threshold"] = best_fbeta(y, p, 1.0)
    out["best_f2"], out["best_f2_threshold"] = best_fbeta(y, p, 2.0)
    return out


def fast_binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """``binary_metrics`` (same keys and definitions, ties included) from one descending sort of ``p``.

    y (N,) int 0/1, p (N,) float. At each distinct score s (descending) tp(s), fp(s) count the rows scored >= s;
    AUROC is the trapezoid area under (fp / N-, tp / N+) from (0, 0); AUPRC = sum over s of
    (recall(s) - recall(previous s)) * precision(s); best F_beta takes the lowest threshold among equal maxima,
    as ``best_fbeta`` does on scikit-learn's ascending thresholds.
    """
    n = len(y)
    out = {
        "n": float(n),
        "prevalence": float(y.mean()) if n else float("nan"),
        "brier": float(np.mean((p - y) ** 2)) if n else float("nan"),
    }
    positives = int(y.sum())
    if positives == 0 or positives == n:
        for key in ("auroc", "auprc", "best_f1", "best_f1_threshold", "best_f2", "best_f2_threshold"):
            out[key] = float("nan")
        return out
    order = np.argsort(p, kind="mergesort")[::-1]
    scores, labels = p[order], y[order]
    ends = np.r_[np.flatnonzero(np.diff(scores)), n - 1]  # last row of each run of equal scores
    tp = np.cumsum(labels)[ends].astype(float)
    fp = ends + 1.0 - tp
    recall, fpr = tp / positives, fp / (n - positives)
    precision = tp / (tp + fp)
    out["auroc"] = float(np.trapezoid(np.r_[0.0, recall], np.r_[0.0, fpr]))
    out["auprc"] = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    thresholds = scores[ends]
    for beta, key in ((1.0, "best_f1"), (2.0, "best_f2")):
        b2 = beta * beta
        denom = b2 * precision + recall
        f = np.divide((1 + b2) * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)[::-1]
        i = int(np.argmax(f))
        out[key], out[key + "_threshold"] = float(f[i]), float(thresholds[::-1][i])
    return out


def bootstrap_metrics(y, p, groups, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, dict]:
    """Point value and (1 - alpha) percentile CI of every metric from ``n_boot`` subject-level resamples.

    y, p, groups: (N,) labels, probabilities, subject ids. Returns {metric: {value, ci_low, ci_high,
    n_valid}} (n_valid = replicates where the metric was defined).
    """
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    point = binary_metrics(y, p)
    return subject_bootstrap(
        groups, lambda rows: fast_binary_metrics(y[rows], p[rows]), point, METRICS, n_boot, seed, alpha
    )


def subject_bootstrap(
    groups,
    metrics_of: Callable[[np.ndarray], dict[str, float]],
    point: dict[str, float],
    names,
    n_boot: int,
    seed: int,
    alpha: float = 0.05,
) -> dict[str, dict]:
    """Percentile CIs from ``n_boot`` resamples of *subjects* (all rows of a drawn subject move together).

    groups (N,): the subject id of every row; metrics_of(rows) -> {name: value} on those row indices (repeats
    allowed); point: the values on all rows. Returns {name: {value, ci_low, ci_high, n_valid}} in ``names``
    order, n_valid counting the replicates where the metric was defined (not NaN). Seeded."""
    subjects, inverse = np.unique(np.asarray(groups), return_inverse=True)
    rows_of = [np.flatnonzero(inverse == s) for s in range(len(subjects))]
    rng = np.random.default_rng(seed)
    replicates = {name: [] for name in names}
    for _ in range(n_boot):
        pick = rng.integers(0, len(subjects), size=len(subjects))
        values = metrics_of(np.concatenate([rows_of[s] for s in pick]))
        for name in names:
            replicates[name].append(values[name])
    out = {}
    for name in names:
        arr = np.asarray(replicates[name], dtype=float)
        valid = arr[~np.isnan(arr)]
        lo, hi = np.percentile(valid, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if len(valid) else (np.nan, np.nan)
        out[name] = {"value": point[name], "ci_low": float(lo), "ci_high": float(hi), "n_valid": int(len(valid))}
    return out
