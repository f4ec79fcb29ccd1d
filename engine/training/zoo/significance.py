"""Is model A better than the reference on this test set? DeLong's paired AUC test and a paired
bootstrap, so the comparison table does not rank noise.

DeLong E.R. et al., Biometrics 1988; fast O(n log n) algorithm after Sun and Xu, IEEE SPL 2014.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _midrank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = len(x)
    ranks = np.empty(n, dtype=np.float64)
    i = 0
    while i < n:
        j = i
        while j < n and xs[j] == xs[i]:
            j += 1
        ranks[i:j] = 0.5 * (i + j - 1) + 1.0
        i = j
    out = np.empty(n, dtype=np.float64)
    out[order] = ranks
    return out


def delong_covariance(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (k,) and their covariance (k, k) for k score rows of shape (k, n) on the same cases."""
    y = np.asarray(y_true).astype(bool)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    pos, neg = s[:, y], s[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise ValueError("DeLong needs at least one positive and one negative case")
    k = s.shape[0]
    tx = np.stack([_midrank(pos[r]) for r in range(k)])
    ty = np.stack([_midrank(neg[r]) for r in range(k)])
    tz = np.stack([_midrank(np.concatenate([pos[r], neg[r]])) for r in range(k)])
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v01 = (tz[:, :m] - tx) / n
    v10 = 1.0 - (tz[:, m:] - ty) / m
    sx = np.atleast_2d(np.cov(v01)) if m > 1 else np.zeros((k, k))
    sy = np.atleast_2d(np.cov(v10)) if n > 1 else np.zeros((k, k))
    return aucs, sx / m + sy / n


@dataclass
class PairedTest:
    auc_a: float
    auc_b: float
    difference: float      # auc_a - auc_b
    z: float
    p_value: float         # two-sided
    method: str


def delong_test(y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> PairedTest:
    """Two-sided DeLong test of AUC(a) == AUC(b) for two models scored on the same cases."""
    aucs, cov = delong_covariance(y_true, np.vstack([scores_a, scores_b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 1e-15:
        z, p = 0.0, 1.0
    else:
        z = diff / math.sqrt(var)
        p = math.erfc(abs(z) / math.sqrt(2.0))
    return PairedTest(float(aucs[0]), float(aucs[1]), diff, z, p, "DeLong")


def bootstrap_auc_difference(y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                             n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Paired bootstrap of AUC(a) - AUC(b): (difference, ci_low, ci_high) at 95%."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y_true).astype(bool)
    a, b = np.asarray(scores_a, float), np.asarray(scores_b, float)
    diffs = []
    n = len(y)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if y[idx].all() or not y[idx].any():
            continue
        da, db = delong_covariance(y[idx], np.vstack([a[idx], b[idx]]))[0]
        diffs.append(da - db)
    full = delong_covariance(y, np.vstack([a, b]))[0]
    lo, hi = np.percentile(diffs, [2.5, 97.5]) if diffs else (float("nan"), float("nan"))
    return float(full[0] - full[1]), float(lo), float(hi)
