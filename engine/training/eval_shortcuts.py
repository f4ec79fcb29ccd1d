"""Shortcut probes for the X-ray DenseNet: how much of "COVID-19 or not" is "which archive is this
image from" (DeGrave et al., Nat Mach Intell 2021;3:610-619).

The same linear probes run on two inputs: 32x32 pixels (a cheap baseline no network needs) and the
trained network's pooled features. Each fits a source classifier (NIH vs web sources) on the
non-COVID images, and a COVID-vs-rest head with and without source-balanced weights (the
mitigation used in training). Fitted on train, scored on val. Research use only.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from engine import metrics as M
from engine.training.eval_stats import logreg_fit

SOURCE_PROBE = "source_classifier_nih_vs_web_on_non_covid"


def linear_probes(x: np.ndarray, ds, train_idx: np.ndarray, *, l2: float,
                  head_key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(source probe, {``head_key``_plain, ``head_key``_source_balanced}) for the features ``x`` (one row
    per image of ``ds``): linear models fitted on ``train_idx``, AUCs on the validation split."""
    from engine.training.datasets import source_balanced_weights

    rows = ds.rows
    tr, va = train_idx, ds.indices("val")
    y = np.array([r["label"] == "covid" for r in rows], dtype=int)
    src = np.array([r["source"] for r in rows])
    nc_tr, nc_va = tr[y[tr] == 0], va[y[va] == 0]
    ys = (src == "nih_cxr8_talo").astype(int)
    f = logreg_fit(x[nc_tr], ys[nc_tr], None, l2=l2)
    source = {"val_auc": M.roc_auc(ys[nc_va], f(x[nc_va])), "n_val": int(len(nc_va))}
    heads: dict[str, Any] = {}
    for name, power in (("plain", 1.0), ("source_balanced", 0.5)):
        grp = [{"g": "other_pneumonia" if rows[i]["label"] == "other_finding" else rows[i]["label"],
                "source": rows[i]["source"]} for i in tr]
        w = source_balanced_weights(grp, label_key="g", power=power)
        p = logreg_fit(x[tr], y[tr], w * len(w), l2=l2)(x[va])
        heads[f"{head_key}_{name}"] = {
            "val_auc_pooled": M.roc_auc(y[va], p),
            "val_auc_ieee8023_only": M.roc_auc(y[va][src[va] == "ieee8023"], p[src[va] == "ieee8023"])}
    return source, heads


def pixel_baseline(ds) -> dict:
    """The probes on 32x32 area-downsampled pixels: what is learnable with no network at all."""
    import torch.nn.functional as F

    small = F.adaptive_avg_pool2d(ds.x.float(), 32).flatten(1).numpy() / 1024.0
    source, heads = linear_probes(small, ds, ds.indices("train"), l2=0.05, head_key="covid_vs_rest")
    return {"features": "32x32 area-downsampled model input (1024 values), standardised", **heads,
            SOURCE_PROBE: source}


def feature_probes(feats: np.ndarray, ds, train_idx: np.ndarray | None = None) -> dict:
    """The probes on the trained network's pooled features: how well they encode the image *source*,
    and the effect of source-balanced weighting on a COVID-vs-rest head refitted on the frozen features."""
    tr = ds.indices("train") if train_idx is None else train_idx
    source, heads = linear_probes(feats, ds, tr, l2=0.1, head_key="covid_head_refit")
    return {"n_train": int(len(tr)), SOURCE_PROBE: source, **heads}


def scatter_features(feats: dict[str, np.ndarray], idx: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Per-split feature arrays back into one (n, d) array indexed like the dataset (rows not scored stay 0)."""
    d = next(iter(feats.values())).shape[1]
    out = np.zeros((n, d), dtype=np.float32)
    for s, f in feats.items():
        out[idx[s]] = f
    return out
