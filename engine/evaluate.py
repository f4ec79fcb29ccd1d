"""``python main.py evaluate MODEL_OR_RUN --data DIR [--split val|test] [--write-card]``.

Evaluates a training run folder (``run.json`` + ``best.safetensors``) or a shipped model
(``resources/models/<name>-<version>.json`` / ``.safetensors``) on the patient-level splits of
../shared/data, and with ``--write-card`` writes ``<name>-<version>.safetensors`` (fp16 when that
keeps the validation metrics) plus the JSON model card with ``trained: true``, the file's sha256,
metrics with 95% bootstrap CIs (patients resampled), per-source numbers, the validation-chosen
thresholds, severity agreement with the expert scores, shortcut probes and the OOD calibration.

Thresholds and every other choice use the validation split only; the X-ray test split is scored
once, for the card. The CT folder has no test split (held back by the project): CT numbers are
validation numbers and therefore optimistic. Research use only, not for diagnostic use.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine import metrics as M

XRAY_NAME, CT_NAME = "xray-densenet121", "ct-inception"
DEFAULT_VERSION = "1.0.0"
N_BOOT = 1000

XRAY_REFERENCES = [
    "Huang G, Liu Z, van der Maaten L, Weinberger KQ. Densely Connected Convolutional Networks. CVPR 2017.",
    "Cohen JP, Viviano JD, Bertin P, et al. TorchXRayVision: A library of chest X-ray datasets and models. "
    "MIDL 2022 (arXiv:2111.00595) - layout, preprocessing and pathology names.",
    "Cohen JP, Dao L, Roth K, et al. Predicting COVID-19 Pneumonia Severity on Chest X-ray With Deep Learning. "
    "Cureus 2020;12(7):e9448 (arXiv:2005.11856) - severity formula and expert scores.",
    "Cohen JP, Morrison P, Dao L. COVID-19 image data collection. arXiv:2003.11597 (2020).",
    "Wang X, Peng Y, Lu L, et al. ChestX-ray8. CVPR 2017 (NIH Clinical Center data).",
    "DeGrave AJ, Janizek JD, Lee S-I. AI for radiographic COVID-19 detection selects shortcuts over signal. "
    "Nat Mach Intell 2021;3:610-619 - why per-source metrics are reported.",
]
CT_REFERENCES = [
    "Szegedy C, et al. Going deeper with convolutions (GoogLeNet/Inception v1). CVPR 2015.",
    "Wang S, Kang B, Ma J, et al. A deep learning algorithm using CT images to screen for Corona Virus Disease "
    "(COVID-19). Eur Radiol 2021;31:6096-6104 (M-Inception; reported internal acc 89.5%, external 79.3%).",
    "Zhao J, Zhang Y, He X, Xie P. COVID-CT-Dataset: a CT scan dataset about COVID-19. arXiv:2003.13865 (2020).",
    "Li L, et al. Artificial intelligence distinguishes COVID-19 from community acquired pneumonia on chest CT "
    "(COVNet, max-pooled slice features). Radiology 2020;296:E65-E71.",
]
CT_COPYRIGHT = ("COVID-CT (UCSD-AI4H): \"The images are collected from COVID19-related papers from medRxiv, bioRxiv, "
                "NEJM, JAMA, Lancet, etc. CTs containing COVID-19 abnormalities are selected by reading the figure "
                "captions in the papers. All copyrights of the data belong to the authors and publishers of these "
                "papers.\" No licence granted; used for research only.")
XRAY_LICENCES = [
    "ieee8023/covid-chestxray-dataset: per-image licences (CC BY-NC-SA, CC BY 3.0/4.0, CC BY-NC-ND, CC BY-SA, "
    "'authorized for everyone', unspecified); metadata CC BY-NC-SA 4.0; severity scores CC BY-SA. Non-commercial "
    "and no-derivatives terms apply to some training images.",
    "Figure1 COVID-19 Chest X-ray Dataset Initiative (agchung): no licence stated; 'research purposes only'.",
    "NIH ChestX-ray8/14 (via muhammedtalo/COVID-19 re-hosting, no LICENSE): NIH states no restrictions, asks for "
    "attribution (NIH Clinical Center; Wang et al. CVPR 2017).",
]


# ---------------------------------------------------------------- model loading
def load_for_eval(target: str | Path):
    """(module fp32 eval, info dict) from a run folder, a card JSON or a safetensors next to its card."""
    import torch
    from safetensors.torch import load_file

    from engine.models import registry
    from engine.train import build_model

    p = Path(target)
    if p.is_dir() and (p / "run.json").is_file():
        run = json.loads((p / "run.json").read_text())
        w = p / "best.safetensors"
        if not w.is_file():
            raise FileNotFoundError(f"{w} missing: the run has not finished an epoch yet")
        model = build_model(run["kind"], run.get("variant", "googlenet"))
        if run["kind"] == "ct" and run.get("size"):
            model.input_size = int(run["size"])   # the CT cache and the app use the training size
        state = load_file(str(w))
        model.load_state_dict({k: v.float() for k, v in state.items() if not k.startswith("ood.")})
        return model.eval(), {"kind": run["kind"], "run": run, "run_dir": str(p), "source_file": str(w)}
    card_path = p if p.suffix == ".json" else p.with_suffix(".json")
    if not card_path.is_file():
        raise FileNotFoundError(f"{target}: neither a run folder (run.json) nor a model card (.json)")
    card = json.loads(card_path.read_text())
    state, _ = registry.read_weights(card_path.parent / card["file"], card.get("sha256", ""))
    model = registry.build_architecture(card)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    kind = "xray" if card["name"] == XRAY_NAME else "ct"
    run_dir = (card.get("training_data") or {}).get("run_dir")
    run = json.loads((Path(run_dir) / "run.json").read_text()) if run_dir and (Path(run_dir) / "run.json").is_file() \
        else {"kind": kind, "variant": (card.get("arch_params") or {}).get("variant", "googlenet")}
    return model.eval(), {"kind": kind, "run": run, "card": card, "source_file": str(card_path.parent / card["file"])}


def forward_all(model, x, kind: str, batch: int = 32, bf16: bool = False, progress: Callable | None = None):
    """Logits and pooled features (what the OOD gate sees) for a cached image tensor."""
    import torch

    from engine.models.ood import pooled_features

    logits: list = []
    feats: list = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(x), batch):
            xb = x[i:i + batch].float()
            if kind == "ct" and xb.shape[1] == 2:   # cached [grey, lung mask] (engine.datasets.encode_ct_slice)
                from engine.datasets import ct_batch_input

                xb = ct_batch_input(xb)
            elif kind == "ct" and xb.shape[1] == 1:
                xb = xb.expand(-1, 3, -1, -1)
            fmap = model.feature_map(xb)
            out = model.head(fmap)
            feats.append(pooled_features(fmap).float())
            if isinstance(out, dict):
                logits.append(torch.cat([out["pathologies"].float(), out["covid"].float()], 1))
            else:
                logits.append(out.float())
            if progress:
                progress(min(len(x), i + batch), len(x))
    return torch.cat(logits).numpy(), torch.cat(feats).numpy()


# ---------------------------------------------------------------- small helpers
def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def logreg_fit(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, l2: float = 1e-2,
               iters: int = 200) -> Callable[[np.ndarray], np.ndarray]:
    """Weighted L2 logistic regression (standardised inputs, LBFGS); returns predict_proba."""
    import torch

    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mu) / sd, dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.float64)
    wt = torch.tensor(np.ones(len(y)) if w is None else w / np.mean(w), dtype=torch.float64)
    coef = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([coef, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = xt @ coef + b
        loss = (wt * torch.nn.functional.binary_cross_entropy_with_logits(z, yt, reduction="none")).mean() \
            + l2 * (coef ** 2).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    c, bb = coef.detach().numpy(), float(b.detach())
    return lambda xn: sigmoid(((xn - mu) / sd) @ c + bb)


def report_block(y: np.ndarray, s: np.ndarray, thr: float, groups, extra_thresholds=(0.3, 0.5),
                 sweep: bool = True) -> dict:
    """Metrics at the operating point with CIs + a sweep incl. 0.3 / 0.5 / the operating point."""
    rep = M.binary_report_ci(y, s, thr, groups=groups, n_boot=N_BOOT)
    if not sweep:
        rep["sweep"] = M.threshold_sweep(y, s, sorted({*extra_thresholds, round(thr, 6)}))
        return rep
    ths = sorted({*extra_thresholds, 0.1, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9, round(thr, 6)})
    rep["sweep"] = M.threshold_sweep(y, s, ths)
    return rep


# ---------------------------------------------------------------- X-ray
def _xray_scores(logits: np.ndarray) -> dict[str, np.ndarray]:
    from engine.models.densenet_xray import COVID_CLASSES, XRV_PATHOLOGIES

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


def severity_calibration(rows, logits) -> dict | None:
    """Affine map z' = scale*z + shift of the Lung Opacity logit so that Cohen et al.'s fixed extent
    formula (0.8705 z' + 3.4137) fits the expert geographic extent on the *train-split* scored images.
    Folded into the classifier row, so the app's unchanged severity code gives calibrated scores;
    monotone (scale > 0), so Lung Opacity AUCs are unchanged. None if it cannot be fitted sensibly."""
    from engine.models.densenet_xray import LUNG_OPACITY_INDEX
    from engine.severity import GEO_INTERCEPT, GEO_SLOPE

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


def _severity_ok(sev: dict) -> bool:
    """Show severity scores only if they were calibrated and agree with held-out expert scores."""
    cal = sev.get("calibration") or {}
    r = (((sev.get("fixed_formula") or {}).get("held_out_val_test") or {}).get("geographic_extent") or {}).get("pearson_r")
    return bool("scale" in cal and r is not None and not np.isnan(r) and r >= 0.5)


def _fold_affine(model, j: int, a: float, b: float) -> None:
    import torch

    with torch.no_grad():
        model.classifier.weight[j] *= a
        model.classifier.bias[j] = a * model.classifier.bias[j] + b


def severity_eval(rows, logits, n_repeats: int = 50) -> dict:
    """Severity from the Lung Opacity logit vs the expert means (geographic 0-8, opacity 0-6)."""
    from engine.models.densenet_xray import LUNG_OPACITY_INDEX
    from engine.severity import geographic_extent, opacity
    from engine.splits import grouped_splits

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


def pixel_baseline(ds, seed: int = 0) -> dict:
    """Cheap shortcut probe: logistic regression on 32x32 pixels. COVID-vs-rest with and without
    source-balanced weights (the mitigation), and a source classifier (NIH vs web sources) on the
    non-COVID images — how much of the task is 'which archive does this image come from'."""
    import torch
    import torch.nn.functional as F

    from engine.datasets import source_balanced_weights

    small = F.adaptive_avg_pool2d(ds.x.float(), 32).flatten(1).numpy() / 1024.0
    rows = ds.rows
    tr, va = ds.indices("train"), ds.indices("val")
    y = np.array([r["label"] == "covid" for r in rows], dtype=int)
    src = np.array([r["source"] for r in rows])
    out: dict[str, Any] = {"features": "32x32 area-downsampled model input (1024 values), standardised"}
    for name, power in (("plain", 1.0), ("source_balanced", 0.5)):
        grp = [{"g": "other_pneumonia" if rows[i]["label"] == "other_finding" else rows[i]["label"],
                "source": rows[i]["source"]} for i in tr]
        w = source_balanced_weights(grp, label_key="g", power=power)
        f = logreg_fit(small[tr], y[tr], w * len(w), l2=0.05)
        p = f(small[va])
        out[f"covid_vs_rest_{name}"] = {
            "val_auc_pooled": M.roc_auc(y[va], p),
            "val_auc_ieee8023_only": M.roc_auc(y[va][src[va] == "ieee8023"], p[src[va] == "ieee8023"])}
    nc_tr = tr[y[tr] == 0]
    nc_va = va[y[va] == 0]
    ys = (src == "nih_cxr8_talo").astype(int)
    f = logreg_fit(small[nc_tr], ys[nc_tr], None, l2=0.05)
    out["source_classifier_nih_vs_web_on_non_covid"] = {"val_auc": M.roc_auc(ys[nc_va], f(small[nc_va])),
                                                        "n_val": int(len(nc_va))}
    return out


def feature_probes(feats: np.ndarray, ds, train_idx: np.ndarray | None = None) -> dict:
    """Linear probes on the trained network's pooled features (train -> val): how well the features
    encode the image *source* among non-COVID images, and the effect of source-balanced weighting
    on a COVID-vs-rest head refitted on the frozen features."""
    from engine.datasets import source_balanced_weights

    rows = ds.rows
    tr, va = (ds.indices("train") if train_idx is None else train_idx), ds.indices("val")
    y = np.array([r["label"] == "covid" for r in rows], dtype=int)
    src = np.array([r["source"] for r in rows])
    out: dict[str, Any] = {"n_train": int(len(tr))}
    nc_tr, nc_va = tr[y[tr] == 0], va[y[va] == 0]
    ys = (src == "nih_cxr8_talo").astype(int)
    f = logreg_fit(feats[nc_tr], ys[nc_tr], None, l2=0.1)
    out["source_classifier_nih_vs_web_on_non_covid"] = {"val_auc": M.roc_auc(ys[nc_va], f(feats[nc_va])),
                                                        "n_val": int(len(nc_va))}
    for name, power in (("plain", 1.0), ("source_balanced", 0.5)):
        grp = [{"g": "other_pneumonia" if rows[i]["label"] == "other_finding" else rows[i]["label"],
                "source": rows[i]["source"]} for i in tr]
        w = source_balanced_weights(grp, label_key="g", power=power)
        fp = logreg_fit(feats[tr], y[tr], w * len(w), l2=0.1)
        p = fp(feats[va])
        out[f"covid_head_refit_{name}"] = {
            "val_auc_pooled": M.roc_auc(y[va], p),
            "val_auc_ieee8023_only": M.roc_auc(y[va][src[va] == "ieee8023"], p[src[va] == "ieee8023"])}
    return out


def _dicom_gray01(path: str) -> np.ndarray:
    """What the X-ray model gets from a DICOM: engine.dicom.pixels.display_gray01 (fallback: pydicom VOI)."""
    try:
        from engine.dicom.pixels import display_gray01, load_frame

        return display_gray01(load_frame(path))
    except ImportError:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        ds = pydicom.dcmread(path)
        a = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
        a = (a - a.min()) / max(1e-6, float(a.max() - a.min()))
        return 1.0 - a if ds.PhotometricInterpretation == "MONOCHROME1" else a


def xray_ood_inputs(data: Path, max_ct: int = 60) -> dict[str, list]:
    """Out-of-distribution probes for the X-ray gate: the tibia radiograph, CT slices (PNG and DICOM)."""
    import torch

    from engine.datasets import ct_dir, load_gray01, read_csv_rows
    from engine.preprocess.xray import prepare_xray

    probes: dict[str, list] = {}
    try:
        from pydicom.data import get_testdata_file

        tib = get_testdata_file("RG3_UNCR.dcm")
        if tib:
            probes["tibia_radiograph_RG3_UNCR"] = [prepare_xray(_dicom_gray01(tib))[0]]
    except Exception as e:  # pydicom-data missing, decoder missing: report, do not fail
        probes["tibia_radiograph_RG3_UNCR"] = [f"unavailable: {e}"]
    d = ct_dir(data)
    if (d / "slices.csv").is_file():
        rows = read_csv_rows(d / "slices.csv")
        rs = np.random.RandomState(0)
        pick = rs.choice(len(rows), min(max_ct, len(rows)), replace=False)
        probes["ct_png_slices_as_xray"] = [prepare_xray(load_gray01(d / rows[i]["path"]))[0] for i in pick]
    dd = Path(data) / "dicom" if (Path(data) / "dicom").is_dir() else Path(data).parent / "dicom"
    cts = sorted(p for p in dd.rglob("*") if p.is_file() and "ct_" in str(p.relative_to(dd)).split("/")[0]
                 and (p.suffix.lower() == ".dcm" or p.suffix == ""))[:40] if dd.is_dir() else []
    ims = []
    for p in cts:
        try:
            ims.append(prepare_xray(_dicom_gray01(str(p)))[0])
        except Exception:
            continue
    if ims:
        probes["ct_dicom_slices_as_xray"] = ims
    return {k: (torch.stack(v) if v and not isinstance(v[0], str) else v) for k, v in probes.items()}


def ood_rates(model, kind: str, tensors, threshold: float, probes: dict, feats_by_split: dict,
              train_feats: np.ndarray | None = None) -> dict:
    from engine.models.ood import ood_score

    import torch

    out: dict[str, Any] = {}
    if train_feats is not None:
        ts = ood_score(torch.tensor(train_feats), tensors)
        out["training_score_quantiles"] = {str(q): float(np.quantile(ts, q)) for q in (0.01, 0.05, 0.5, 0.95, 0.99)}
    for name, f in feats_by_split.items():
        s = ood_score(torch.tensor(f), tensors)
        out[name] = {"n": int(len(s)), "rejected": int((s > threshold).sum()),
                     "rejection_rate": float((s > threshold).mean()), "median_score": float(np.median(s))}
    for name, x in probes.items():
        if isinstance(x, list):
            out[name] = {"error": x[0]}
            continue
        _, f = forward_all(model, x, kind)
        s = ood_score(torch.tensor(f), tensors)
        out[name] = {"n": int(len(s)), "rejected": int((s > threshold).sum()),
                     "rejection_rate": float((s > threshold).mean()), "median_score": float(np.median(s))}
    return out


def fp16_check(model, x, kind: str, logits32: np.ndarray) -> dict:
    """Round the weights to fp16 (as shipped) and compare validation outputs with fp32."""
    import copy

    import torch

    m16 = copy.deepcopy(model)
    with torch.no_grad():
        for p in m16.state_dict().values():
            if p.is_floating_point():
                p.copy_(p.half().float())
    l16, _ = forward_all(m16, x, kind)
    return {"max_abs_logit_diff": float(np.abs(l16 - logits32).max()), "logits16": l16}


def _progress(tag: str):
    last = [0.0]

    def f(i, n):
        if time.time() - last[0] > 20 or i == n:
            last[0] = time.time()
            print(f"[evaluate] {tag}: {i}/{n}", flush=True)
    return f


def fp16_safe_rescale(model, limit: float = 1e4) -> dict:
    """Make the X-ray DenseNet's BatchNorm buffers fit in fp16 without changing its function.

    With inputs in [-1024, 1024] the first BatchNorm's running variance reaches ~1e6, beyond fp16's
    65504 (it would become inf). conv0 -> norm0 is linear, so dividing conv0's weights and norm0's
    running mean by c, and its running variance by c^2, leaves the output unchanged (up to eps).
    """
    import torch

    feats = getattr(model, "features", None)
    if feats is None or not hasattr(feats, "conv0") or not hasattr(feats, "norm0"):
        return {}
    vmax = float(feats.norm0.running_var.max())
    if vmax <= limit:
        return {}
    c = float(2 ** np.ceil(0.5 * np.log2(vmax / limit)))
    with torch.no_grad():
        feats.conv0.weight /= c
        feats.norm0.running_mean /= c
        feats.norm0.running_var /= c * c
    return {"features.conv0/norm0": {"divided_by": c, "running_var_max_before": vmax}}


def _round_fp16(model):
    import copy

    import torch

    m16 = copy.deepcopy(model)
    with torch.no_grad():
        for p in m16.state_dict().values():
            if p.is_floating_point():
                p.copy_(p.half().float())
    return m16.eval()


def evaluate_xray(model, info: dict, data: Path, write_card: bool, out_dir: Path, version: str,
                  split: str, ood_quantile: float, max_train: int = 0) -> dict:
    import torch

    from engine.datasets import load_xray_set
    from engine.models.densenet_xray import COVID_CLASSES, LUNG_OPACITY_INDEX
    from engine.models.ood import fit_ood
    from engine.splits import check_no_patient_leak

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
    model = _round_fp16(model32)
    logits, feats = {}, {}
    for s in ("val", "test", "train"):
        if s == "test" and split != "test" and not write_card:
            continue
        logits[s], feats[s] = forward_all(model, ds.x[idx[s]], "xray", progress=_progress(s))
    rows = {s: [ds.rows[i] for i in idx[s]] for s in idx}
    calibration = severity_calibration(rows["train"], logits["train"])
    if calibration:
        a, b = calibration["scale"], calibration["shift"]
        for s in logits:
            logits[s][:, LUNG_OPACITY_INDEX] = a * logits[s][:, LUNG_OPACITY_INDEX] + b
        for m in (model, model32):
            _fold_affine(m, LUNG_OPACITY_INDEX, a, b)
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
                                  "trained_features": feature_probes(_scatter(feats, idx, len(ds)), ds,
                                                                     train_idx=idx["train"])}
    tensors, thr = fit_ood(feats["train"], quantile=ood_quantile)
    probes = xray_ood_inputs(data)
    ood = {"method": "Mahalanobis distance of pooled DenseNet features in a 32-component PCA basis "
                     "(engine.models.ood), threshold = training-score quantile",
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
        result["card"] = str(_write_xray_card(model if keep16 else model32, info, ds, thresholds, metrics, ood,
                                              tensors, out_dir, version,
                                              "float16" if keep16 else "float32", f16))
    return result


def _scatter(feats: dict, idx: dict, n: int) -> np.ndarray:
    d = next(iter(feats.values())).shape[1]
    out = np.zeros((n, d), dtype=np.float32)
    for s, f in feats.items():
        out[idx[s]] = f
    return out


def _counts(rows, keys=("source", "label", "split")) -> dict:
    from collections import Counter

    c = Counter(tuple(r[k] for k in keys) for r in rows)
    return {"/".join(k): v for k, v in sorted(c.items())}


_RUN_KEYS = ("config", "n_train", "started", "finished", "best_epoch", "epochs_run", "train_seconds", "stopped",
             "balance", "size", "seed", "init")


def _training_summary(info: dict) -> dict:
    """The run's settings and timing; for a progressive-resizing run also the earlier stage(s)."""
    run = info.get("run") or {}
    out = {k: run.get(k) for k in _RUN_KEYS if k in run} | {"run_dir": info.get("run_dir")}
    stages = []
    init = run.get("init")
    while init and (Path(init).parent / "run.json").is_file() and len(stages) < 5:
        prev = json.loads((Path(init).parent / "run.json").read_text())
        stages.append({k: prev.get(k) for k in _RUN_KEYS if k in prev} | {"run_dir": str(Path(init).parent)})
        init = prev.get("init")
    if stages:
        out["earlier_stages"] = stages
        out["total_train_seconds"] = float(run.get("train_seconds") or 0) + sum(
            float(st.get("train_seconds") or 0) for st in stages)
    return out


def _write_xray_card(model, info, ds, thresholds, metrics, ood, tensors, out_dir: Path, version: str,
                     dtype: str, f16: dict) -> Path:
    from engine.models import registry
    from engine.models.densenet_xray import COVID_CLASSES, XRV_PATHOLOGIES

    run = info.get("run") or {}
    trained = ["Pneumonia", "Lung Opacity"]
    card_thresholds = {"COVID-19": thresholds["COVID-19"], "Other pneumonia": thresholds["Other pneumonia"],
                       "Pneumonia": thresholds["Pneumonia"], "Lung Opacity": thresholds["Lung Opacity"]}
    card = dict(
        preprocessing={"text": "displayed grayscale in [0,1] (default VOI, MONOCHROME1 inverted; training JPEGs /255) "
                               "-> largest centred square -> resize to 224 (area) -> (2x-1)*1024, torchxrayvision "
                               "range; engine.preprocess.xray.prepare_xray, identical in training and inference",
                       "input_size": 224, "channels": 1, "range": [-1024, 1024], "function": "engine.preprocess.xray.prepare_xray"},
        thresholds=card_thresholds,
        outputs={"pathologies": {n: {"supported": n in trained, "threshold": card_thresholds.get(n)}
                                 for n in XRV_PATHOLOGIES},
                 "covid": {n: {"supported": True, "threshold": card_thresholds.get(n)} for n in COVID_CLASSES},
                 "note": "Only Pneumonia and Lung Opacity of the 18 torchxrayvision outputs were trained (the other 16 "
                         "had no labels and were masked out of the loss): they must never be shown as findings. "
                         "'Normal' is reported through the 3-class head but has no finding threshold."},
        severity={"enabled": _severity_ok(metrics.get("severity", {})), "logit": "Lung Opacity",
                  "enable_rule": "enabled only when the train-split calibration was applied and the held-out "
                                 "(val+test) Pearson r of the geographic extent is >= 0.5", "formula": "Cohen et al. 2020 constants (engine.severity)",
                  "evaluation": metrics.get("severity", {}),
                  "calibration": metrics.get("severity", {}).get("calibration"),
                  "caveat": "The Lung Opacity logit was trained as opacity present/absent on our labels, then affinely "
                            "calibrated (folded into the weights) on the train-split expert extent scores; check the "
                            "held-out numbers before trusting the 0-8 / 0-6 scores."},
        metrics=metrics,
        training_data={"folder": "shared/data/xray (labels.csv, severity.csv)", "split": "patient-level train/val/test as "
                       "given in labels.csv (~70/15/15, stratified by source and label); thresholds and epoch chosen "
                       "on val; test scored once for this card", "counts": _counts(ds.rows),
                       "label_mapping": {"COVID-19 head": "covid -> COVID-19, other_pneumonia -> Other pneumonia, "
                                         "normal -> Normal, other_finding masked",
                                         "Pneumonia": "covid+other_pneumonia positive, normal negative, other_finding masked",
                                         "Lung Opacity": "covid+other_pneumonia+other_finding positive, normal negative"},
                       "mitigation": "source-balanced sampling: classes equally likely, sources within a class drawn "
                                     "in proportion to sqrt(count); contrast/gamma and small affine augmentation",
                       "compute": "trained from random initialisation (no pretrained weights available) on a shared "
                                  "2-core CPU with bfloat16 autocast under a fixed wall-clock budget; best epoch by "
                                  "validation 0.5*AUC(COVID pooled) + 0.5*AUC(COVID within ieee8023)",
                       **_training_summary(info)},
        data_licences=XRAY_LICENCES,
        references=XRAY_REFERENCES,
        ood=ood,
        fp16_check={k: v for k, v in f16.items()},
        limitations=["Trained from scratch on ~950 images on a CPU for about an hour: far weaker than published models.",
                     "COVID-19 images come almost only from web/paper-figure sources and most normal/pneumonia images "
                     "from one NIH archive: pooled metrics overstate disease detection; read the per-source numbers "
                     "(ieee8023 is the only source with both COVID and non-COVID images).",
                     "No external test set was available here.",
                     "Severity (Cohen et al. formula on the Lung Opacity logit) is disabled unless it passed the "
                     "enable rule in 'severity'; see metrics.severity for the agreement with the expert scores."],
        evaluated_by="python main.py evaluate (engine/evaluate.py)",
        source=f"trained by ChestView (engine/train.py), run {run.get('started', '?')}",
    )
    state = {k: v for k, v in model.state_dict().items()}
    return _public(registry.write_card(out_dir, name=XRAY_NAME, version=version, state_dict=state, trained=True,
                               labels={"pathologies": list(XRV_PATHOLOGIES), "covid": list(COVID_CLASSES)},
                               architecture="XRayDenseNet", arch_params={}, dtype=dtype, ood_tensors=tensors,
                               **M.jsonable(card)))


def _public(card_path: Path) -> Path:
    """Shipped files are world-readable (the safetensors temp file is created 0600)."""
    card = json.loads(Path(card_path).read_text())
    for p in (Path(card_path), Path(card_path).parent / card["file"]):
        p.chmod(0o644)
    return Path(card_path)


# ---------------------------------------------------------------- CT
def _ct_source(r: dict) -> str:
    if r["label"] == "covid":
        return "covid_papers"
    return "medpix" if "medpix" in r["patient_id"] else "crawled"


CT_SELECTION_RULE = ("declared before training: the epoch with the highest validation slice AUC (earliest on ties; "
                     "engine.train.ct_task); operating threshold = Youden J on the validation slices")


def _ct_probe_input(gray01: np.ndarray, size: int):
    """A non-CT image through the CT preprocessing exactly as the app would (OOD probes)."""
    from engine.preprocess.ct_input import figure_lung_mask, prepare_ct_slice

    return prepare_ct_slice(gray01, figure_lung_mask(gray01), size)[0]


def _update_card_json(card_path: Path, **fields: Any) -> None:
    """Add keys to a written card (weights and their sha256 untouched), atomically."""
    card = json.loads(Path(card_path).read_text(encoding="utf-8"))
    card.update(M.jsonable(fields))
    tmp = Path(card_path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2), encoding="utf-8")
    tmp.replace(card_path)
    Path(card_path).chmod(0o644)


def _ct_specificity(data: Path, out_dir: Path, version: str) -> dict:
    """engine.ct_checks.specificity_check with the card just written (loaded through the registry)."""
    import os

    from engine.ct_checks import specificity_check
    from engine.models import registry

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
    import torch

    from engine.ct_checks import brightness_shortcut, crop_brightness
    from engine.ct_verdict import MIN_OPACITY_PERCENT
    from engine.datasets import load_ct_set, xray_dir
    from engine.models.inception_ct import CT_CLASSES
    from engine.models.ood import fit_ood
    from engine.preprocess.ct_input import NORM_PERCENTILES, PREPROCESSING_ID
    from engine.splits import check_no_patient_leak

    size = int(getattr(model, "input_size", 224))
    ds = load_ct_set(data, size=size)
    check_no_patient_leak(ds.rows)
    tr, va = ds.indices("train"), ds.indices("val")
    lv, fv = forward_all(model, ds.x[va], "ct", progress=_progress("val"))
    lt, ft = forward_all(model, ds.x[tr], "ct", progress=_progress("train"))
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
                                                    "normalisation (engine.ct_checks.crop_brightness)"}
    # shortcut probe: can the features tell the non-COVID sources (MedPix PNG vs crawled JPEG) apart?
    rows_tr = [ds.rows[i] for i in tr]
    ytr = np.array([r["label"] == "covid" for r in rows_tr], dtype=int)
    s_tr = np.array([_ct_source(r) for r in rows_tr])
    nc_tr, nc_va = ytr == 0, y == 0
    f = logreg_fit(ft[nc_tr], (s_tr[nc_tr] == "medpix").astype(int), None, l2=0.1)
    metrics["shortcut_probes"] = {"source_classifier_medpix_vs_crawled_on_non_covid": {
        "val_auc": M.roc_auc((src[nc_va] == "medpix").astype(int), f(fv[nc_va])), "n_val": int(nc_va.sum())}}
    tensors, othr = fit_ood(ft, quantile=ood_quantile)
    probes: dict[str, Any] = {}
    xd = xray_dir(data)
    if (xd / "labels.csv").is_file():
        from engine.datasets import load_gray01, read_csv_rows

        xr = read_csv_rows(xd / "labels.csv")
        pick = np.random.RandomState(0).choice(len(xr), 60, replace=False)
        probes["xrays_as_ct_slices"] = torch.stack([_ct_probe_input(load_gray01(xd / xr[i]["path"]), size)
                                                    for i in pick])
    ood = {"method": "Mahalanobis distance of pooled GoogLeNet features in a 32-component PCA basis "
                     "(engine.models.ood); the app uses the median over the scored slices",
           "threshold": othr, "quantile": ood_quantile, "fitted_on": f"{len(ft)} training slices",
           "rejection": ood_rates(model, "ct", tensors, othr, probes, {"val_slices": fv}, ft)}
    f16 = fp16_check(model, ds.x[va], "ct", lv)
    p16 = softmax(f16.pop("logits16"))[:, 1]
    f16["val_auc_fp32_vs_fp16"] = [M.roc_auc(y, p), M.roc_auc(y, p16)]
    dtype = "float16" if abs(f16["val_auc_fp32_vs_fp16"][0] - f16["val_auc_fp32_vs_fp16"][1]) < 0.005 else "float32"
    result = {"kind": "ct", "thresholds": {"COVID-19": thr}, "metrics": metrics, "ood": ood, "fp16": f16}
    if write_card:
        from engine.models import registry

        run = info.get("run") or {}
        card = dict(
            preprocessing={"id": PREPROCESSING_ID,
                           "function": "engine.preprocess.ct_input.prepare_ct_slice (training: "
                                       "engine.datasets.encode_ct_slice + ct_batch_input; app: "
                                       "engine.analysis.Analyzer._ct_input)",
                           "text": "lung-window grey [0,1] (DICOM: HU -> window -600/1500; COVID-CT figures: PNG/255, "
                                   "already windowed) -> lung mask (DICOM: the slice of the 3-D lung ROI; figures: "
                                   "2-D threshold + components, engine.preprocess.ct_input.figure_lung_mask), closed "
                                   "and hole-filled the same way -> crop to the mask box + 6% margin -> resize -> "
                                   f"per-lung percentile normalisation ({NORM_PERCENTILES[0]:g}th..{NORM_PERCENTILES[1]:g}th "
                                   "percentile of the lung pixels -> [0,1]) -> outside the lungs set to the minimum "
                                   "-> x*2-1, grey replicated in 3 channels",
                           "training_augmentation": "affine (rotation +-10 deg, zoom 0.9-1.1, shift 6%, horizontal "
                                                    "flip) on grey and mask together; re-rendering of the crop before "
                                                    "normalisation: random window centre/width, gamma 0.6-1.6, "
                                                    "resolution 35-90% down and up, Gaussian blur, noise, 8-bit "
                                                    "quantisation or JPEG quality 25-95 (engine.preprocess.ct_input)",
                           "input_size": size, "channels": 3, "range": [-1, 1], "lung_window": [-600, 1500]},
            thresholds={"COVID-19": thr},
            aggregation={"method": "mean of top-k slice probabilities", "k": top_k},
            study_verdict={"module": "engine.ct_verdict", "min_opacity_percent": MIN_OPACITY_PERCENT,
                           "rule": "COVID-19 flag only when the study probability >= threshold AND ground glass + "
                                   "consolidation (engine.ct_quant total_opacity_percent) >= min_opacity_percent of "
                                   "the lung volume; never on a single slice or without a measured lung volume "
                                   "(single slices: 'slice classifier only, no volume')",
                           "threshold_justification": "1% of lung volume = one lobe (about a fifth of the lungs) at "
                                                      "the CT-severity-score 1/2 boundary of 5% involvement (Pan et al. "
                                                      "Radiology 2020; Chung et al. Radiology 2020); fixed before the "
                                                      "specificity check, not tuned on it"},
            metrics=metrics,
            training_data={"folder": "shared/data/ct (slices.csv)", "split": "official COVID-CT patient-level "
                           "train/val (the official test split is held back); training on train only, selection "
                           "and threshold on val", "counts": _counts(ds.rows, ("label", "split")),
                           "mitigation": "lung mask + per-lung intensity normalisation (removes overall brightness, "
                                         "window and everything outside the lungs), rendering augmentation so figure "
                                         "and DICOM renderings overlap, sqrt source-balanced sampling over "
                                         "covid/medpix/crawled",
                           "compute": "GoogLeNet initialised from ct-inception 1.0.0, fine-tuned on a shared 2-core "
                                      "CPU (1 torch thread) under a fixed wall-clock budget",
                           "selection_rule": CT_SELECTION_RULE,
                           **_training_summary(info)},
            data_licences=[CT_COPYRIGHT],
            references=CT_REFERENCES + [
                "Pan F, Ye T, Sun P, et al. Time course of lung changes at chest CT during recovery from coronavirus "
                "disease 2019 (COVID-19). Radiology 2020;295:715-721 (CT severity score).",
                "Chung M, Bernheim A, Mei X, et al. CT imaging features of 2019 novel coronavirus (2019-nCoV). "
                "Radiology 2020;295:202-207."],
            ood=ood, fp16_check=f16,
            limitations=["Trained on 2-D slices cut from paper figures (no HU, varied windows), applied to HU "
                         "volumes at inference; the shared preprocessing narrows but does not remove this gap and "
                         "the validation numbers do not measure it (see specificity_check).",
                         "COVID slices come from papers (PNG), non-COVID from MedPix/crawled pages: source shortcut risk.",
                         "Validation-only numbers (used for selection: optimistic); the official test split is held back.",
                         "The study verdict needs the HU quantification of a volume: single slices are never flagged."],
            evaluated_by="python main.py evaluate (engine/evaluate.py)",
            source=f"trained by ChestView (engine/train.py), run {run.get('started', '?')}",
        )
        card_path = _public(registry.write_card(
            out_dir, name=CT_NAME, version=version, state_dict=dict(model.state_dict()), trained=True,
            labels={"classes": list(CT_CLASSES)}, architecture="CTInception",
            arch_params={"variant": getattr(model, "variant", "googlenet"), "input_size": size}, dtype=dtype,
            ood_tensors=tensors, **M.jsonable(card)))
        spec = _ct_specificity(data, out_dir, version)
        _update_card_json(card_path, specificity_check=spec)
        result["specificity_check"] = spec
        result["card"] = str(card_path)
    return result


# ---------------------------------------------------------------- CLI
def evaluate(target: str, data: str, *, split: str = "val", write_card: bool = False, out_dir: str | None = None,
             version: str = DEFAULT_VERSION, ood_quantile: float = 0.99, threads: int = 2,
             max_train: int = 0) -> dict:
    import torch

    from engine.paths import models_dir

    torch.set_num_threads(threads)
    model, info = load_for_eval(target)
    out = Path(out_dir) if out_dir else models_dir()
    if info["kind"] == "xray":
        res = evaluate_xray(model, info, Path(data), write_card, out, version, split, ood_quantile, max_train)
    else:
        res = evaluate_ct(model, info, Path(data), write_card, out, version, ood_quantile)
    return M.jsonable(res)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chestview evaluate", description="Evaluate a model or training run and "
                                "(with --write-card) write its weights + model card. Research use only.")
    p.add_argument("model", help="run folder (with run.json) or model card/safetensors in resources/models")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--split", choices=["val", "test"], default="val",
                   help="X-ray split to report (test is also scored when writing a card); CT has val only")
    p.add_argument("--write-card", action="store_true", help="write <name>-<version>.safetensors + .json")
    p.add_argument("--out", help="models folder for --write-card (default resources/models or $CHESTVIEW_MODELS)")
    p.add_argument("--version", default=DEFAULT_VERSION)
    p.add_argument("--ood-quantile", type=float, default=0.99)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-train", type=int, default=0,
                   help="X-ray: use at most N training images for the OOD fit / probes (0 = all; CPU budget)")
    p.add_argument("--json", help="also write the full result JSON here")
    return p


def _headline(res: dict) -> str:
    lines = []
    m = res["metrics"]
    for s in ("val", "test"):
        if s not in m:
            continue
        if res["kind"] == "xray":
            for lab, block in m[s].items():
                if lab == "three_class":
                    continue
                pooled = block["pooled"]
                ci = pooled["ci95"]["auc"]
                lines.append(f"{s:4s} {lab:16s} AUC {pooled['auc']} CI {ci} sens {pooled['sensitivity']} "
                             f"spec {pooled['specificity']} @thr {pooled['threshold']}")
        else:
            for lvl, block in m[s].items():
                b = block.get("pooled", block)
                lines.append(f"{s:4s} {lvl:18s} AUC {b['auc']} CI {b['ci95']['auc']} acc {b['accuracy']} "
                             f"sens {b['sensitivity']} spec {b['specificity']}")
    return "\n".join(lines)


def cli_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--labels" in argv or any(a.startswith("--labels=") for a in argv):
        from engine.local_validation import cli_main as local_main  # a site's own labelled data

        return local_main(argv)
    a = build_parser().parse_args(argv)
    t0 = time.time()
    res = evaluate(a.model, a.data, split=a.split, write_card=a.write_card, out_dir=a.out, version=a.version,
                   ood_quantile=a.ood_quantile, threads=a.threads, max_train=a.max_train)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(_headline(res))
    print("[evaluate] OOD rejection: " + json.dumps({k: v.get("rejection_rate", v.get("error"))
                                                     for k, v in res["ood"]["rejection"].items()
                                                     if k != "training_score_quantiles"}))
    if res.get("card"):
        print(f"[evaluate] wrote {res['card']}")
    print(f"[evaluate] done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
