"""engine.metrics against hand-computed confusion matrices, AUCs and regression numbers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine import metrics as M


def test_confusion_and_derived_metrics_by_hand():
    # truth:  1 1 1 1 0 0 0 0 0 0 ; predicted: 1 1 1 0 1 0 0 0 0 0 -> TP3 FN1 FP1 TN5
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]
    cm = M.confusion(y, p)
    assert cm == {"tp": 3, "fp": 1, "tn": 5, "fn": 1}
    m = M.binary_metrics_from_confusion(cm)
    assert m["accuracy"] == pytest.approx(8 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["ppv"] == pytest.approx(3 / 4)
    assert m["npv"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))


def test_undefined_metrics_are_nan_not_zero():
    m = M.binary_metrics_from_confusion({"tp": 0, "fp": 0, "tn": 4, "fn": 0})
    assert math.isnan(m["sensitivity"]) and math.isnan(m["ppv"])
    assert m["specificity"] == 1.0


def test_auc_by_hand_with_ties():
    # positives 0.9, 0.4 ; negatives 0.4, 0.1: pairs (0.9>0.4)=1 (0.9>0.1)=1 (0.4=0.4)=0.5 (0.4>0.1)=1 -> 3.5/4
    assert M.roc_auc([1, 1, 0, 0], [0.9, 0.4, 0.4, 0.1]) == pytest.approx(0.875)
    assert M.roc_auc([1, 0], [0.2, 0.8]) == pytest.approx(0.0)
    assert math.isnan(M.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_binary_report_threshold_is_inclusive_and_sweep_has_required_points():
    y = np.array([1, 1, 0, 0, 1])
    s = np.array([0.5, 0.3, 0.29, 0.6, 0.9])
    rep = M.binary_report(y, s, 0.5)
    assert rep["confusion"] == {"tp": 2, "fp": 1, "tn": 1, "fn": 1}
    sweep = {r["threshold"]: r for r in M.threshold_sweep(y, s, (0.3, 0.5))}
    assert sweep[0.3]["confusion"] == {"tp": 3, "fp": 1, "tn": 1, "fn": 0}
    assert sweep[0.5]["sensitivity"] == pytest.approx(2 / 3)


def test_youden_threshold_separates_perfectly_separable_scores():
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.35, 0.6, 0.7, 0.9]
    t = M.youden_threshold(y, s)
    assert 0.35 < t <= 0.6
    rep = M.binary_report(y, s, t)
    assert rep["sensitivity"] == 1.0 and rep["specificity"] == 1.0


def test_bootstrap_ci_contains_estimate_and_shrinks_with_more_data():
    rs = np.random.RandomState(0)

    def sample(n):
        y = rs.randint(0, 2, n)
        s = y * 0.8 + rs.normal(0, 0.6, n)
        return y, s

    y1, s1 = sample(60)
    r1 = M.binary_report_ci(y1, s1, 0.4, n_boot=300)
    lo, hi = r1["ci95"]["auc"]
    assert lo <= r1["auc"] <= hi and 0.0 <= lo < hi <= 1.0
    y2, s2 = sample(2000)
    r2 = M.binary_report_ci(y2, s2, 0.4, n_boot=300)
    lo2, hi2 = r2["ci95"]["auc"]
    assert (hi2 - lo2) < (hi - lo) / 2
    # the true AUC of this generating process is about 0.83
    assert lo2 < 0.83 < hi2 + 0.03


def test_grouped_bootstrap_resamples_patients_and_is_wider_for_correlated_images():
    rs = np.random.RandomState(1)
    n_pat = 40
    y_pat = rs.randint(0, 2, n_pat)
    s_pat = y_pat * 0.5 + rs.normal(0, 0.6, n_pat)
    # every patient contributes 10 (almost) identical images
    y = np.repeat(y_pat, 10)
    s = np.repeat(s_pat, 10) + rs.normal(0, 0.01, 10 * n_pat)
    groups = np.repeat(np.arange(n_pat), 10)
    img = M.binary_report_ci(y, s, 0.25, n_boot=300)
    pat = M.binary_report_ci(y, s, 0.25, groups=groups, n_boot=300)
    assert pat["bootstrap"]["unit"] == "patient"
    w_img = img["ci95"]["auc"][1] - img["ci95"]["auc"][0]
    w_pat = pat["ci95"]["auc"][1] - pat["ci95"]["auc"][0]
    assert w_pat > 1.8 * w_img


def test_multiclass_confusion_rows_are_truth():
    assert M.multiclass_confusion([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], 3) == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_regression_metrics_by_hand():
    y = [1.0, 2.0, 3.0, 4.0]
    p = [1.5, 2.0, 2.5, 5.0]
    m = M.regression_metrics(y, p)
    assert m["mae"] == pytest.approx((0.5 + 0 + 0.5 + 1) / 4)
    # SS_res = 0.25+0+0.25+1 = 1.5 ; SS_tot = 5 -> R^2 = 0.7
    assert m["r2"] == pytest.approx(0.7)
    assert m["pearson_r"] == pytest.approx(np.corrcoef(y, p)[0, 1])
    bad = M.regression_metrics(y, [10, 10, 10, 10])
    assert bad["r2"] < 0 and math.isnan(bad["pearson_r"])


def test_jsonable_strips_nan_and_numpy():
    out = M.jsonable({"a": np.float32(0.5), "b": float("nan"), "c": [np.int64(3)], "d": np.bool_(True)})
    assert out == {"a": 0.5, "b": None, "c": [3], "d": True}
