"""Evaluation of the X-ray DenseNet-121 (xray-densenet121; the v2 lung-input classifier has its own,
engine.training.evaluate_xray_lung): per-label metrics at validation-chosen thresholds, pooled and per
source (DeGrave et al., Nat Mach Intell 2021: pooled numbers hide source shortcuts), the 3-class
confusion, severity against the expert scores, shortcut and OOD probes, and the fp16 weights as shipped.

Thresholds use the validation split only; the test split is scored once, for the card.
Research use only, not for diagnostic use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine import metrics as M
from engine.training.eval_cards import write_xray_card
from engine.training.eval_model import forward_all, fp16_safe_rescale, progress_printer, round_fp16
from engine.training.eval_ood import ood_rates, xray_ood_inputs
from engine.training.eval_severity import fold_affine, severity_calibration, severity_eval
from engine.training.eval_shortcuts import feature_probes, pixel_baseline, scatter_features
from engine.training.eval_stats import report_block, sigmoid, softmax


def _xray_scores(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Probabilities the app shows: softmax over the 3-class COVID head, sigmoid for the two trained pathologies."""
    from engine.ai.models.densenet_xray import COVID_CLASSES, XRV_PATHOLOGIES

    npath = len(XRV_PATHOLOGIES)
    pc = softmax(logits[:, npath:npath + len(COVID_CLASSES)])
    out = {name: pc[:, j] for j, name in enumerate(COVID_CLASSES)}
    for name in ("Pneumonia", "Lung Opacity"):
        out[name] = sigmoid(logits[:, XRV_PATHOLOGIES.index(name)])
    return out


def _xray_truth(rows: list[dict[str, str]]) -> dict[str, np.ndarray]:
    """Binary truth per reported label; -1 = no label (excluded)."""
    lab = np.array([r["label"] for r in rows])
    t = {
        "COVID-19": (lab == "covid").astype(int),
        "Other pneumonia": np.where(lab == "other_pneumonia", 1, 0),
        "Normal": (lab == "normal").astype(int),
        "Pneumonia": np.where(np.isin(lab, ["covid", "other_pneumonia"]), 1, np.where(lab == "normal", 0, -1)),
        "Lung Opacity": np.where(lab == "normal", 0, 1),
    }
    return t


def xray_label_metrics(rows, scores, thresholds, labels) -> dict:
    """Pooled and per-source metrics for each label at its validation threshold."""
    truth = _xray_truth(rows)
    groups = np.array([r["patient_id"] for r in rows])
    src = np.array([r["source"] for r in rows])
    out: dict[str, Any] = {}
    for lab in labels:
        y, s = truth[lab], scores[lab]
        keep = y >= 0
        block = {"pooled": report_block(y[keep], s[keep], thresholds[lab], groups[keep])}
        for so in sorted(set(src)):
            k = keep & (src == so)
            if k.sum() == 0:
                continue
            block[so] = report_block(y[k], s[k], thresholds[lab], groups[k], sweep=False)
        out[lab] = block
    return out


def evaluate_xray(model, info: dict, data: Path, write_card: bool, out_dir: Path, version: str,
                  split: str, ood_quantile: float, max_train: int = 0) -> dict:
    """Everything the X-ray card reports, computed with the fp16-rounded weights (the card when ``write_card``)."""
    import torch

    from engine.training.datasets import load_xray_set
    from engine.ai.models.densenet_xray import COVID_CLASSES, LUNG_OPACITY_INDEX
    from engine.ai.models.ood import fit_ood
    from engine.training.splits import check_no_patient_leak

    ds = load_xray_set(data, size=224)
    check_no_patient_leak(ds.rows)
    idx = {s: ds.indices(s) for s in ("train", "val", "test")}
    if max_train and len(idx["train"]) > max_train:
        # CPU budget: a random subset of training images (all severity-scored ones kept) for the OOD fit,
        # the severity fit and the probes; val and test are always complete.
        tr = idx["train"]
        scored = np.array([bool(ds.rows[i].get("geographic_mean")) for i in tr])
        rest = np.random.RandomState(0).permutation(tr[~scored])[:max(0, max_train - int(scored.sum()))]
        idx["train"] = np.sort(np.concatenate([tr[scored], rest]))
    # Score the weights as shipped: fp16-rounded (upcast to fp32 like the registry does); compare with
    # the fp32 weights on a few validation images.
    model32 = model
    x_chk = ds.x[idx["val"][:16]].float()
    with torch.no_grad():
        before = model32(x_chk)["covid"]
    rescaled = fp16_safe_rescale(model32)
    with torch.no_grad():
        rescale_diff = float((model32(x_chk)["covid"] - before).abs().max())
    model = round_fp16(model32)
    logits, feats = {}, {}
    for s in ("val", "test", "train"):
        if s == "test" and split != "test" and not write_card:
            continue
        logits[s], feats[s] = forward_all(model, ds.x[idx[s]], "xray", progress=progress_printer(s))
    rows = {s: [ds.rows[i] for i in idx[s]] for s in idx}
    calibration = severity_calibration(rows["train"], logits["train"])
    if calibration:
        a, b = calibration["scale"], calibration["shift"]
        for s in logits:
            logits[s][:, LUNG_OPACITY_INDEX] = a * logits[s][:, LUNG_OPACITY_INDEX] + b
        for m in (model, model32):
            fold_affine(m, LUNG_OPACITY_INDEX, a, b)
    labels = ["COVID-19", "Other pneumonia", "Pneumonia", "Lung Opacity"]
    sv = _xray_scores(logits["val"])
    tv = _xray_truth(rows["val"])
    thresholds = {}
    for lab in labels:
        k = tv[lab] >= 0
        thresholds[lab] = M.youden_threshold(tv[lab][k], sv[lab][k])
    metrics: dict[str, Any] = {"threshold_rule": "Youden J (sensitivity + specificity - 1) on the validation split"}
    for s in ("val", "test"):
        if s not in logits:
            continue
        sc = _xray_scores(logits[s])
        metrics[s] = xray_label_metrics(rows[s], sc, thresholds, labels)
        ytrue = np.array([{"covid": 0, "other_pneumonia": 1, "normal": 2}.get(r["label"], -1) for r in rows[s]])
        pred = np.stack([sc[c] for c in COVID_CLASSES], 1).argmax(1)
        k = ytrue >= 0
        metrics[s]["three_class"] = {"classes": COVID_CLASSES, "rows_true_cols_pred": True,
                                     "confusion": M.multiclass_confusion(ytrue[k], pred[k], 3),
                                     "accuracy": float((ytrue[k] == pred[k]).mean()), "n": int(k.sum())}
    all_rows = [ds.rows[i] for s in ("train", "val", "test") if s in logits for i in idx[s]]
    all_logits = np.concatenate([logits[s] for s in ("train", "val", "test") if s in logits])
    metrics["severity"] = severity_eval(all_rows, all_logits)
    metrics["severity"]["calibration"] = calibration or {"note": "not applied (too few scored train images or "
                                                                 "no positive association)"}
    metrics["shortcut_probes"] = {"pixel_baseline": pixel_baseline(ds),
                                  "trained_features": feature_probes(scatter_features(feats, idx, len(ds)), ds,
                                                                     train_idx=idx["train"])}
    tensors, thr = fit_ood(feats["train"], quantile=ood_quantile)
    probes = xray_ood_inputs(data)
    ood = {"method": "Mahalanobis distance of pooled DenseNet features in a 32-component PCA basis "
                     "(engine.ai.models.ood), threshold = training-score quantile",
           "threshold": thr, "quantile": ood_quantile, "fitted_on": f"{len(feats['train'])} training X-rays"
                                                                           " (fp16 weights)",
           "rejection": ood_rates(model, "xray", tensors, thr, probes,
                                  {f"{s}_xrays": feats[s] for s in ("val", "test") if s in feats}, feats["train"])}
    n_cmp = min(48, len(idx["val"]))
    l32, _ = forward_all(model32, ds.x[idx["val"][:n_cmp]], "xray")
    diff = float(np.abs(l32 - logits["val"][:n_cmp]).max())
    p32, p16 = _xray_scores(l32), _xray_scores(logits["val"][:n_cmp])
    f16 = {"compared_on": f"first {n_cmp} validation images", "max_abs_logit_diff": diff,
           "max_abs_prob_diff": max(float(np.abs(p32[k] - p16[k]).max()) for k in labels),
           "note": "all metrics in this card are computed with the fp16-rounded weights as shipped",
           "rescaled_for_fp16": rescaled, "rescale_max_abs_logit_change_fp32": rescale_diff}
    keep16 = f16["max_abs_prob_diff"] < 0.01
    result = {"kind": "xray", "thresholds": thresholds, "metrics": metrics, "ood": ood, "fp16": f16}
    if write_card:
        result["card"] = str(write_xray_card(model if keep16 else model32, info, ds, thresholds, metrics, ood,
                                             tensors, out_dir, version,
                                             "float16" if keep16 else "float32", f16))
    return result
