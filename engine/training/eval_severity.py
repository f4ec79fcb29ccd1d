"""Severity from the X-ray DenseNet's Lung Opacity logit against the expert scores of severity.csv.

Cohen et al., Cureus 2020;12(7):e9448 (arXiv:2005.11856) map the Lung Opacity logit to the
geographic extent (0-8) and opacity (0-6) scores with fixed linear constants (engine.ai.severity).
Our logit is calibrated on the train split, folded into the classifier row, and judged on the
held-out images and by Cohen et al.'s repeated patient-grouped linear fits. Research use only.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from engine import metrics as M


def severity_calibration(rows, logits) -> dict | None:
    """Affine map z' = scale*z + shift of the Lung Opacity logit so that Cohen et al.'s fixed extent
    formula (0.8705 z' + 3.4137) fits the expert geographic extent on the *train-split* scored images.
    Folded into the classifier row, so the app's unchanged severity code gives calibrated scores;
    monotone (scale > 0), so Lung Opacity AUCs are unchanged. None if it cannot be fitted sensibly."""
    from engine.ai.models.densenet_xray import LUNG_OPACITY_INDEX
    from engine.ai.severity import GEO_INTERCEPT, GEO_SLOPE

    idx = [i for i, r in enumerate(rows) if r.get("geographic_mean") and r["split"] == "train"]
    if len(idx) < 10:
        return None
    z = logits[idx, LUNG_OPACITY_INDEX].astype(np.float64)
    geo = np.array([float(rows[i]["geographic_mean"]) for i in idx])
    if z.std() < 1e-6:
        return None
    alpha, beta = np.polyfit(z, geo, 1)
    if alpha <= 0:
        return None
    return {"scale": float(alpha / GEO_SLOPE), "shift": float((beta - GEO_INTERCEPT) / GEO_SLOPE),
            "fitted_on": f"{len(idx)} train-split images of severity.csv (geographic extent)",
            "pearson_r_train": float(np.corrcoef(z, geo)[0, 1])}


def severity_ok(sev: dict) -> bool:
    """Show severity scores only if they were calibrated and agree with held-out expert scores."""
    cal = sev.get("calibration") or {}
    r = (((sev.get("fixed_formula") or {}).get("held_out_val_test") or {}).get("geographic_extent") or {}).get("pearson_r")
    return bool("scale" in cal and r is not None and not np.isnan(r) and r >= 0.5)


def fold_affine(model, j: int, a: float, b: float) -> None:
    """Replace classifier row j by z -> a*z + b (severity_calibration), so the app needs no extra step."""
    import torch

    with torch.no_grad():
        model.classifier.weight[j] *= a
        model.classifier.bias[j] = a * model.classifier.bias[j] + b


def severity_eval(rows, logits, n_repeats: int = 50) -> dict:
    """Severity from the Lung Opacity logit vs the expert means (geographic 0-8, opacity 0-6)."""
    from engine.ai.models.densenet_xray import LUNG_OPACITY_INDEX
    from engine.ai.severity import geographic_extent, opacity
    from engine.training.splits import grouped_splits

    idx = [i for i, r in enumerate(rows) if r.get("geographic_mean")]
    if not idx:
        return {}
    z = logits[idx, LUNG_OPACITY_INDEX]
    geo = np.array([float(rows[i]["geographic_mean"]) for i in idx])
    opa = np.array([float(rows[i]["opacity_mean"]) for i in idx])
    split = np.array([rows[i]["split"] for i in idx])
    pid = [rows[i]["patient_id"] for i in idx]
    pg = np.array([geographic_extent(v) for v in z])
    po = np.array([opacity(v) for v in z])
    out: dict[str, Any] = {
        "n_images": len(idx), "by_split": {s: int((split == s).sum()) for s in ("train", "val", "test")},
        "fixed_formula": {"note": "Cohen et al.'s constants applied to the shipped Lung Opacity logit (after the "
                                  "train-split calibration below, when applied): what the app shows"},
    }
    for name, sel in [("held_out_val_test", split != "train"), ("all_94", np.ones(len(idx), bool))]:
        out["fixed_formula"][name] = {"geographic_extent": M.regression_metrics(geo[sel], pg[sel]),
                                      "opacity": M.regression_metrics(opa[sel], po[sel])}
    # Cohen et al.: linear regression from the logit, repeated random patient-grouped splits.
    reps: dict[str, dict[str, list[float]]] = {"geographic_extent": {"mae": [], "pearson_r": [], "r2": []},
                                              "opacity": {"mae": [], "pearson_r": [], "r2": []}}
    for tr, te in grouped_splits(pid, n_repeats, 0.2, seed=0):
        for name, target in (("geographic_extent", geo), ("opacity", opa)):
            a, b = np.polyfit(z[tr], target[tr], 1)
            m = M.regression_metrics(target[te], a * z[te] + b)
            for k in reps[name]:
                reps[name][k].append(m[k])
    out["linear_fit_repeated_splits"] = {
        "protocol": f"{n_repeats} random patient-grouped 80/20 splits of the {len(idx)} scored images; "
                    "linear fit of expert score on the Lung Opacity logit on the 80%, metrics on the 20% "
                    "(Cohen et al. style). The network saw the train-split images' class labels (not their "
                    "severity scores) during training.",
        **{name: {k: M.mean_sd(v) for k, v in d.items()} for name, d in reps.items()}}
    a, b = np.polyfit(z[split == "train"], geo[split == "train"], 1) if (split == "train").sum() > 2 else (np.nan, np.nan)
    out["train_split_fit"] = {"geographic_extent": {"slope": float(a), "intercept": float(b)}}
    if not np.isnan(a):
        sel = split != "train"
        out["train_split_fit"]["held_out_val_test"] = M.regression_metrics(geo[sel], np.clip(a * z[sel] + b, 0, 8))
    out["reference"] = "Cohen et al. 2020: MAE 1.14 (extent), 0.78 (opacity); Pearson r 0.81 (extent)"
    return out
