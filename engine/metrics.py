"""Classification and regression metrics for model cards (numpy only, no sklearn).

Binary metrics follow the usual confusion-matrix definitions; ROC AUC is the Mann-Whitney U
statistic with ties counted 1/2. Confidence intervals are percentile bootstrap (95%), resampling
*patients* when group ids are given, because several images of one patient are not independent.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np


def confusion(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, int]:
    """Binary confusion matrix as {'tp','fp','tn','fn'}."""
    t = np.asarray(y_true).astype(bool)
    p = np.asarray(y_pred).astype(bool)
    return {"tp": int((t & p).sum()), "fp": int((~t & p).sum()), "tn": int((~t & ~p).sum()),
            "fn": int((t & ~p).sum())}


def _div(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def binary_metrics_from_confusion(cm: dict[str, int]) -> dict[str, float]:
    tp, fp, tn, fn = cm["tp"], cm["fp"], cm["tn"], cm["fn"]
    sens = _div(tp, tp + fn)
    ppv = _div(tp, tp + fp)
    return {
        "accuracy": _div(tp + tn, tp + fp + tn + fn),
        "sensitivity": sens,
        "specificity": _div(tn, tn + fp),
        "ppv": ppv,
        "npv": _div(tn, tn + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
    }


def roc_auc(y_true: Sequence[int], score: Sequence[float]) -> float:
    """Area under the ROC curve (Mann-Whitney); NaN when only one class is present."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    r = rankdata(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y_true: Sequence[int], score: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) over the distinct scores, thresholds descending (predict pos if s >= thr)."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    thr = np.unique(s)[::-1]
    tpr = np.array([(s[y] >= t).mean() if y.any() else np.nan for t in thr])
    fpr = np.array([(s[~y] >= t).mean() if (~y).any() else np.nan for t in thr])
    return fpr, tpr, thr


def binary_report(y_true: Sequence[int], score: Sequence[float], threshold: float) -> dict:
    """All threshold metrics + AUC + confusion matrix at ``threshold`` (positive if score >= threshold)."""
    y = np.asarray(y_true).astype(int)
    s = np.asarray(score, dtype=np.float64)
    cm = confusion(y, s >= threshold)
    out = binary_metrics_from_confusion(cm)
    out["auc"] = roc_auc(y, s)
    out["threshold"] = float(threshold)
    out["confusion"] = cm
    out["n"] = int(len(y))
    out["n_pos"] = int(y.sum())
    return out


def bootstrap_ci(stat: Callable[[np.ndarray], float], n: int, *, groups: Sequence | None = None,
                 n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat(indices)``; resamples whole groups (patients) when given.
    Resamples where the statistic is undefined (NaN, e.g. one class only) are skipped."""
    rs = np.random.RandomState(seed)
    if groups is not None:
        g = np.asarray(groups)
        uniq, inv = np.unique(g, return_inverse=True)
        members = [np.nonzero(inv == k)[0] for k in range(len(uniq))]
    vals = []
    for _ in range(n_boot):
        if groups is None:
            idx = rs.randint(0, n, n)
        else:
            pick = rs.randint(0, len(members), len(members))
            idx = np.concatenate([members[k] for k in pick])
        v = stat(idx)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            vals.append(v)
    if len(vals) < max(10, n_boot // 10):
        return float("nan"), float("nan")
    lo, hi = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


CI_KEYS = ("accuracy", "sensitivity", "specificity", "ppv", "f1", "auc")


def binary_report_ci(y_true: Sequence[int], score: Sequence[float], threshold: float, *,
                     groups: Sequence | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """``binary_report`` plus ``ci95`` {metric: [lo, hi]} from one shared set of bootstrap resamples."""
    y = np.asarray(y_true).astype(int)
    s = np.asarray(score, dtype=np.float64)
    rep = binary_report(y, s, threshold)
    rs = np.random.RandomState(seed)
    if groups is not None:
        uniq, inv = np.unique(np.asarray(groups), return_inverse=True)
        members = [np.nonzero(inv == k)[0] for k in range(len(uniq))]
    samples: dict[str, list[float]] = {k: [] for k in CI_KEYS}
    for _ in range(n_boot):
        if groups is None:
            idx = rs.randint(0, len(y), len(y))
        else:
            idx = np.concatenate([members[k] for k in rs.randint(0, len(members), len(members))])
        m = binary_metrics_from_confusion(confusion(y[idx], s[idx] >= threshold))
        m["auc"] = roc_auc(y[idx], s[idx])
        for k in CI_KEYS:
            if not math.isnan(m[k]):
                samples[k].append(m[k])
    rep["ci95"] = {k: ([float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
                       if len(v) >= max(10, n_boot // 10) else [None, None]) for k, v in samples.items()}
    rep["bootstrap"] = {"n_boot": n_boot, "unit": "patient" if groups is not None else "image"}
    return rep


def youden_threshold(y_true: Sequence[int], score: Sequence[float]) -> float:
    """Threshold maximising sensitivity + specificity - 1 (the validation operating point)."""
    fpr, tpr, thr = roc_curve(y_true, score)
    if len(thr) == 0 or np.all(np.isnan(tpr)) or np.all(np.isnan(fpr)):
        return 0.5
    j = tpr - fpr
    return float(thr[int(np.nanargmax(j))])


def threshold_sweep(y_true: Sequence[int], score: Sequence[float],
                    thresholds: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> list[dict]:
    """Sensitivity/specificity/PPV/F1/accuracy and the confusion matrix at each threshold."""
    y = np.asarray(y_true).astype(int)
    s = np.asarray(score, dtype=np.float64)
    out = []
    for t in thresholds:
        cm = confusion(y, s >= t)
        out.append({"threshold": float(t), **binary_metrics_from_confusion(cm), "confusion": cm})
    return out


def multiclass_confusion(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> list[list[int]]:
    """Rows = true class, columns = predicted class."""
    m = np.zeros((n_classes, n_classes), dtype=int)
    for t, p in zip(np.asarray(y_true), np.asarray(y_pred)):
        m[int(t), int(p)] += 1
    return m.tolist()


# ---------------------------------------------------------------- regression (severity scores)
def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    """MAE, Pearson r and R^2 (1 - SS_res/SS_tot: can be negative for a poorly calibrated predictor)."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    mae = float(np.abs(y - p).mean()) if len(y) else float("nan")
    if len(y) > 1 and y.std() > 0 and p.std() > 0:
        r = float(np.corrcoef(y, p)[0, 1])
    else:
        r = float("nan")
    ss_tot = float(((y - y.mean()) ** 2).sum()) if len(y) else 0.0
    r2 = float(1 - ((y - p) ** 2).sum() / ss_tot) if ss_tot > 0 else float("nan")
    return {"mae": mae, "pearson_r": r, "r2": r2, "n": int(len(y))}


def mean_sd(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    return {"mean": float(v.mean()) if len(v) else float("nan"),
            "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"), "n": int(len(v))}


def jsonable(obj):
    """NaN/inf -> None and numpy scalars -> Python, recursively (model cards are strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return None if (math.isnan(f) or math.isinf(f)) else round(f, 6)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
