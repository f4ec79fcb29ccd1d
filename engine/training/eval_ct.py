"""Evaluation of the CT Inception (ct-inception) on the COVID-CT slices (Zhao et al., arXiv:2003.13865):
slice and patient-level metrics, the brightness and source shortcuts, OOD rejection, fp16, and on the
written card the app pipeline's specificity on real CT (engine.training.ct_checks).

The CT folder has no test split (held back by the project): epoch and threshold are chosen on val and
the numbers are on that same val split, so they are optimistic. Research use only.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engine import metrics as M
from engine.training.eval_cards import CT_SELECTION_RULE, update_card_json, write_ct_card
from engine.training.eval_model import CT_NAME, forward_all, fp16_check, progress_printer
from engine.training.eval_ood import ct_ood_inputs, ood_rates
from engine.training.eval_stats import N_BOOT, logreg_fit, report_block, softmax


def _ct_source(r: dict) -> str:
    """COVID slices come from paper figures, non-COVID ones from MedPix or crawled pages (the shortcut risk)."""
    if r["label"] == "covid":
        return "covid_papers"
    return "medpix" if "medpix" in r["patient_id"] else "crawled"


def _ct_specificity(data: Path, out_dir: Path, version: str) -> dict:
    """engine.training.ct_checks.specificity_check with the card just written (loaded through the registry)."""
    from engine.training.ct_checks import specificity_check
    from engine.ai.models import registry

    dicom = data / "dicom" if (data / "dicom").is_dir() else data.parent / "dicom"
    if not dicom.is_dir():
        return {"error": f"{dicom} not found: specificity check not run"}
    old = os.environ.get("CHESTVIEW_MODELS")
    os.environ["CHESTVIEW_MODELS"] = str(out_dir)
    try:
        registry.clear_cache()
        lm = registry.load_model(CT_NAME)
        if lm.info.version != version:
            return {"error": f"the registry loads {CT_NAME} {lm.info.version}, not {version}: check not run"}
        res = specificity_check(dicom)
        res["model"] = {"name": lm.info.name, "version": lm.info.version, "sha256": lm.info.sha256}
        return res
    finally:
        if old is None:
            os.environ.pop("CHESTVIEW_MODELS", None)
        else:
            os.environ["CHESTVIEW_MODELS"] = old
        registry.clear_cache()


def evaluate_ct(model, info: dict, data: Path, write_card: bool, out_dir: Path, version: str,
                ood_quantile: float, top_k: int = 3) -> dict:
    """Everything the CT card reports on the validation slices (the card when ``write_card``)."""
    from engine.training.ct_checks import brightness_shortcut, crop_brightness
    from engine.training.datasets import load_ct_set
    from engine.ai.models.ood import fit_ood
    from engine.training.splits import check_no_patient_leak

    size = int(getattr(model, "input_size", 224))
    ds = load_ct_set(data, size=size)
    check_no_patient_leak(ds.rows)
    tr, va = ds.indices("train"), ds.indices("val")
    lv, fv = forward_all(model, ds.x[va], "ct", progress=progress_printer("val"))
    lt, ft = forward_all(model, ds.x[tr], "ct", progress=progress_printer("train"))
    rows = [ds.rows[i] for i in va]
    y = np.array([r["label"] == "covid" for r in rows], dtype=int)
    p = softmax(lv)[:, 1]
    groups = np.array([r["patient_id"] for r in rows])
    thr = M.youden_threshold(y, p)
    src = np.array([_ct_source(r) for r in rows])
    slice_block = {"pooled": report_block(y, p, thr, groups)}
    for s in sorted(set(src)):
        k = src == s
        slice_block[s] = report_block(y[k], p[k], thr, groups[k], sweep=False)
    # patient level = the app's study score: mean of the top-k slice probabilities
    pats = sorted(set(groups))
    pp = np.array([np.mean(sorted(p[groups == g], reverse=True)[:top_k]) for g in pats])
    py = np.array([y[groups == g][0] for g in pats])
    metrics = {"label": "VALIDATION split, used for model selection and the threshold: optimistic",
               "split_note": "The CT folder has no test split (the official test split is held back by the project): "
                             "epoch and threshold were chosen on val and the numbers below are on that same val split, "
                             "so they are optimistic.",
               "selection_rule": CT_SELECTION_RULE,
               "threshold_rule": "Youden J on the validation slices",
               "val": {"slice": slice_block,
                       "patient_top3_mean": report_block(py, pp, thr, np.array(pats))}}
    # brightness shortcut: the crop's mean grey level alone, and how much the score follows it
    metrics["brightness_shortcut"] = {"val": brightness_shortcut(y, p, crop_brightness(ds.x[va]), groups, N_BOOT),
                                      "brightness": "mean grey level of the lung-window lung crop before "
                                                    "normalisation (engine.training.ct_checks.crop_brightness)"}
    # shortcut probe: can the features tell the non-COVID sources (MedPix PNG vs crawled JPEG) apart?
    rows_tr = [ds.rows[i] for i in tr]
    ytr = np.array([r["label"] == "covid" for r in rows_tr], dtype=int)
    s_tr = np.array([_ct_source(r) for r in rows_tr])
    nc_tr, nc_va = ytr == 0, y == 0
    f = logreg_fit(ft[nc_tr], (s_tr[nc_tr] == "medpix").astype(int), None, l2=0.1)
    metrics["shortcut_probes"] = {"source_classifier_medpix_vs_crawled_on_non_covid": {
        "val_auc": M.roc_auc((src[nc_va] == "medpix").astype(int), f(fv[nc_va])), "n_val": int(nc_va.sum())}}
    tensors, othr = fit_ood(ft, quantile=ood_quantile)
    probes = ct_ood_inputs(data, size)
    ood = {"method": "Mahalanobis distance of pooled GoogLeNet features in a 32-component PCA basis "
                     "(engine.ai.models.ood); the app uses the median over the scored slices",
           "threshold": othr, "quantile": ood_quantile, "fitted_on": f"{len(ft)} training slices",
           "rejection": ood_rates(model, "ct", tensors, othr, probes, {"val_slices": fv}, ft)}
    f16 = fp16_check(model, ds.x[va], "ct", lv)
    p16 = softmax(f16.pop("logits16"))[:, 1]
    f16["val_auc_fp32_vs_fp16"] = [M.roc_auc(y, p), M.roc_auc(y, p16)]
    dtype = "float16" if abs(f16["val_auc_fp32_vs_fp16"][0] - f16["val_auc_fp32_vs_fp16"][1]) < 0.005 else "float32"
    result = {"kind": "ct", "thresholds": {"COVID-19": thr}, "metrics": metrics, "ood": ood, "fp16": f16}
    if write_card:
        card_path = write_ct_card(model, info, ds.rows, thr, metrics, ood, tensors, f16, out_dir, version,
                                  size, top_k, dtype)
        spec = _ct_specificity(data, out_dir, version)
        update_card_json(card_path, specificity_check=spec)
        result["specificity_check"] = spec
        result["card"] = str(card_path)
    return result
