"""Evaluate the v2 lung-input X-ray classifier and the zone severity scorer; write their cards.

``python main.py evaluate-xray-lung --data ../shared/data --run runs/xray-lung --out resources/models``

What is measured, and why (issue "X-ray AI that holds up"; DESIGN.md section 4):
- where the archive shortcut cannot help: within one source (NIH pneumonia vs NIH normal; ieee8023
  COVID-19 vs other pneumonia) and on a source never trained on (figure1, held out completely);
- pooled numbers only beside those, never instead of them;
- leave-one-source-out for the heads on frozen features (the backbone saw both training sources:
  said so in the card);
- the source probe: how well a linear model on the pooled features tells ieee8023 from NIH among
  non-COVID images, v1 (full image) against v2 (lung-only), on the same test images;
- severity: repeated patient-grouped cross-validation over the 272 expert-scored images, against
  a constant predictor; switched on only if the model beats it with its 95% CI.
Operating thresholds are chosen on the validation split (specificity 0.90 on validation normals:
a model that says less), never on test. Patient-level bootstrap CIs throughout.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from engine import metrics as M

VERSION = "2.0.0"
SEV_VERSION = "2.0.0"
N_BOOT = 1000
TARGET_SPECIFICITY = 0.90
INTENDED_USE = "research use only, not for diagnostic use"
SEV_ALPHAS = (10.0, 100.0, 1000.0, 10000.0)


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def spec_threshold(y: np.ndarray, s: np.ndarray, spec: float = TARGET_SPECIFICITY) -> float:
    """Smallest threshold whose specificity on the negatives is at least ``spec``."""
    neg = np.sort(s[y == 0])
    if neg.size == 0:
        return 0.5
    k = min(len(neg) - 1, int(math.ceil(spec * len(neg))) - 1)
    return float(np.nextafter(neg[k], np.inf))


def block(y, s, thr, groups) -> dict:
    y, s = np.asarray(y).astype(int), np.asarray(s, dtype=np.float64)
    out = {"n": int(len(y)), "n_pos": int(y.sum()), "n_neg": int((1 - y).sum())}
    if len(set(y.tolist())) < 2:
        out["note"] = "one class only: AUC undefined"
        pos = s >= thr
        out["positive_rate"] = float(pos.mean()) if len(pos) else None
        return out
    rep = M.binary_report_ci(y, s, thr, groups=groups, n_boot=N_BOOT)
    out.update({k: rep.get(k) for k in ("auc", "sensitivity", "specificity", "ppv", "accuracy")})
    out["ci95"] = {k: rep["ci95"][k] for k in ("auc", "sensitivity", "specificity")}
    return out


# ----------------------------------------------------------------------------------------------
# Forward passes
# ----------------------------------------------------------------------------------------------

def forward(model, crops, masks, zones, idx, side: int, batch: int = 24):
    """Per image: opacity logit, pneumonia logit, covid logits, pooled feats, zone feature rows."""
    import torch
    import torch.nn.functional as F

    from engine.ai.models.densenet_xray import LUNG_OPACITY_INDEX, XRV_PATHOLOGIES
    from engine.ai.preprocess.xray_lung_input import normalise_crop, to_model
    from engine.ai.severity_zones import zone_features

    pj = XRV_PATHOLOGIES.index("Pneumonia")
    model.eval()
    op, pn, cv, pooled, zf = [], [], [], [], []
    with torch.inference_mode():
        for k in range(0, len(idx), batch):
            ii = idx[k:k + batch]
            norms = [normalise_crop(crops[i].astype(np.float32) / 255.0, masks[i].astype(bool)) for i in ii]
            x = torch.stack([to_model(n, side) for n in norms])
            fm = model.feature_map(x)
            out = model.head(fm)
            op.append(out["pathologies"][:, LUNG_OPACITY_INDEX].numpy())
            pn.append(out["pathologies"][:, pj].numpy())
            cv.append(out["covid"].numpy())
            pooled.append(F.adaptive_avg_pool2d(F.relu(fm), 1).flatten(1).numpy())
            fr = F.relu(fm).numpy()
            for j, i in enumerate(ii):
                zf.append(zone_features(fr[j], zones[i], norms[j]))
            print(f"[eval] forward {min(k + batch, len(idx))}/{len(idx)}", flush=True)
    return (np.concatenate(op), np.concatenate(pn), np.concatenate(cv), np.concatenate(pooled), np.stack(zf))


# ----------------------------------------------------------------------------------------------
# Classifier metrics
# ----------------------------------------------------------------------------------------------

def classifier_metrics(rows, ok, op, pn, cv, thr_op: float, thr_covid: float) -> dict:
    lab = np.array([r["label"] for r in rows])
    src = np.array([r["source"] for r in rows])
    split = np.array([r["split"] for r in rows])
    pid = np.array([r["patient_id"] for r in rows])
    p_op = sigmoid(op)
    p_cv = softmax(cv)[:, 0]
    y_op = (lab != "normal").astype(int)
    out: dict[str, Any] = {}
    te = ok & (split == "test")
    trainsrc = te & (src != "figure1")
    out["pooled_test_ieee8023_nih"] = {"Lung Opacity": block(y_op[trainsrc], p_op[trainsrc], thr_op, pid[trainsrc])}
    nih = te & (src == "nih_cxr8_talo")
    out["within_nih_test_pneumonia_vs_normal"] = {"Lung Opacity": block(y_op[nih], p_op[nih], thr_op, pid[nih])}
    ie = te & (src == "ieee8023")
    out["within_ieee8023_test_abnormal_vs_normal"] = {"Lung Opacity": block(y_op[ie], p_op[ie], thr_op, pid[ie])}
    cvp = ie & np.isin(lab, ["covid", "other_pneumonia"])
    out["within_ieee8023_test_covid_vs_other_pneumonia"] = {
        "COVID-19": block((lab[cvp] == "covid").astype(int), p_cv[cvp], thr_covid, pid[cvp])}
    f1 = ok & (src == "figure1")
    out["external_figure1_all_splits_never_trained"] = {
        "Lung Opacity": block(y_op[f1], p_op[f1], thr_op, pid[f1]),
        "COVID-19 (covid vs rest)": block((lab[f1] == "covid").astype(int), p_cv[f1], thr_covid, pid[f1])}
    return out


def loso_heads(rows, ok, feats) -> dict:
    """Leave-one-source-out on frozen features: fit a logistic opacity head on the other sources'
    train+val images, test on the held-out source (all its images)."""
    from engine.training.eval_stats import logreg_fit

    lab = np.array([r["label"] for r in rows])
    src = np.array([r["source"] for r in rows])
    split = np.array([r["split"] for r in rows])
    pid = np.array([r["patient_id"] for r in rows])
    y = (lab != "normal").astype(int)
    out = {}
    for held in ("nih_cxr8_talo", "ieee8023", "figure1"):
        tr = ok & (src != held) & (split != "test")
        te = ok & (src == held)
        if len(set(y[tr].tolist())) < 2:
            out[held] = {"note": "training sources have one class only: not estimable"}
            continue
        # per-source class balance, as in training
        w = np.ones(tr.sum())
        ys, ss = y[tr], src[tr]
        for s_ in set(ss.tolist()):
            for c in (0, 1):
                m = (ss == s_) & (ys == c)
                if m.any():
                    w[m] = 1.0 / m.sum()
        f = logreg_fit(feats[tr], y[tr], w * len(w) / w.sum(), l2=0.1)
        p = f(feats[te])
        out[held] = block(y[te], p, 0.5, pid[te])
        out[held]["trained_on"] = sorted(set(src[tr].tolist()))
    out["note"] = ("heads refitted on frozen v2 features; the backbone itself was fine-tuned on ieee8023 and NIH "
                   "training images, so only figure1 is a fully unseen source")
    return out


def source_probe(rows, sel: np.ndarray, feats: np.ndarray, folds: int = 5, seed: int = 0) -> dict:
    """Cross-validated AUC of a linear ieee8023-vs-NIH classifier on non-COVID images ``sel``."""
    from engine.training.eval_stats import logreg_fit

    src = np.array([r["source"] for r in rows])
    pid = np.array([r["patient_id"] for r in rows])
    idx = np.nonzero(sel & np.isin(src, ["ieee8023", "nih_cxr8_talo"]))[0]
    y = (src[idx] == "nih_cxr8_talo").astype(int)
    if len(set(y.tolist())) < 2:
        return {"note": "needs images of both sources", "n": int(len(y))}
    pats = np.unique(pid[idx])
    rs = np.random.RandomState(seed)
    fold_of = {p: k for k, p in enumerate(rs.permutation(pats))}
    f_id = np.array([fold_of[p] % folds for p in pid[idx]])
    s = np.zeros(len(idx))
    for k in range(folds):
        tr, te = f_id != k, f_id == k
        if len(set(y[tr].tolist())) < 2 or not te.any():
            continue
        s[te] = logreg_fit(feats[idx][tr], y[tr], None, l2=0.1)(feats[idx][te])
    lo, hi = M.bootstrap_ci(lambda ii: M.roc_auc(y[ii], s[ii]), len(y), groups=pid[idx], n_boot=N_BOOT)
    return {"auc": float(M.roc_auc(y, s)), "ci95": [lo, hi], "n": int(len(y)), "n_nih": int(y.sum())}


# ----------------------------------------------------------------------------------------------
# Severity cross-validation
# ----------------------------------------------------------------------------------------------

def severity_targets(data: Path, rows) -> dict[str, np.ndarray]:
    from engine.training.datasets import read_csv_rows, xray_dir

    d = xray_dir(data)
    at = {r["path"]: i for i, r in enumerate(rows)}
    n = len(rows)
    zone = np.full((n, 6), np.nan)
    glob_s = np.full(n, np.nan)
    glob_j = np.full(n, np.nan)
    ext = np.full(n, np.nan)
    opa = np.full(n, np.nan)
    for r in read_csv_rows(d / "brixia.csv"):
        i = at.get(r["path"])
        if i is None:
            continue
        zone[i] = [(float(r[f"S-{z}"]) + float(r[f"J-{z}"])) / 2.0 for z in "ABCDEF"]
        glob_s[i], glob_j[i] = float(r["S-Global"]), float(r["J-Global"])
    for r in read_csv_rows(d / "severity.csv"):
        i = at.get(r["path"])
        if i is None:
            continue
        ext[i], opa[i] = float(r["geographic_mean"]), float(r["opacity_mean"])
    return {"zone": zone, "global_s": glob_s, "global_j": glob_j, "extent": ext, "opacity": opa}


def _pearson(a, b) -> float:
    if len(a) < 3 or np.std(a) < 1e-12 or np.std(b) < 1e-12:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def severity_cv(rows, ok, zf: np.ndarray, tg: dict, repeats: int = 5, folds: int = 5, seed: int = 0) -> dict:
    """Repeated patient-grouped K-fold over all scored images (Brixia + Cohen).

    In each fold: alpha chosen by an inner split of the training Brixia images, zone ridge fitted on
    training Brixia images, Cohen lines fitted on training Cohen images; out-of-fold predictions
    averaged over repeats, then metrics with patient-bootstrap CIs; the constant predictor is the
    training-fold mean."""
    from engine.ai import severity_zones as SZ

    pid = np.array([r["patient_id"] for r in rows])
    is_b = ok & ~np.isnan(tg["zone"][:, 0])
    is_c = ok & ~np.isnan(tg["extent"])
    scored = np.nonzero(is_b | is_c)[0]
    n_s = len(scored)
    pred_g = np.zeros((repeats, len(rows)))
    pred_e = np.zeros((repeats, len(rows)))
    pred_o = np.zeros((repeats, len(rows)))
    const_e = np.zeros((repeats, len(rows)))
    const_o = np.zeros((repeats, len(rows)))
    const_g = np.zeros((repeats, len(rows)))
    alphas_used = []
    for rep in range(repeats):
        rs = np.random.RandomState(seed + rep)
        pats = np.unique(pid[scored])
        fold_of = {p: k % folds for k, p in enumerate(rs.permutation(pats))}
        fo = np.array([fold_of[pid[i]] for i in scored])
        for k in range(folds):
            tr, te = scored[fo != k], scored[fo == k]
            btr, ctr = tr[is_b[tr]], tr[is_c[tr]]
            # inner: choose alpha on a patient split of the training Brixia images
            inner = np.array([zlib.crc32(f"{pid[i]}|{rep}|{k}".encode()) % 4 == 0 for i in btr])
            best_a, best_mae = SEV_ALPHAS[0], np.inf
            for a in SEV_ALPHAS:
                if inner.sum() < 3 or (~inner).sum() < 10:
                    break
                mdl = SZ.fit(zf[btr[~inner]], tg["zone"][btr[~inner]], zf[ctr][:0], np.zeros(0), np.zeros(0), a)
                mae = np.abs(mdl.zone_scores(zf[btr[inner]]) - tg["zone"][btr[inner]]).mean()
                if mae < best_mae:
                    best_a, best_mae = a, mae
            alphas_used.append(best_a)
            mdl = SZ.fit(zf[btr], tg["zone"][btr], zf[ctr], tg["extent"][ctr], tg["opacity"][ctr], best_a)
            g = mdl.zone_scores(zf[te]).sum(-1)
            e, o = mdl.cohen(g)
            pred_g[rep, te], pred_e[rep, te], pred_o[rep, te] = g, e, o
            const_e[rep, te] = np.nanmean(tg["extent"][ctr])
            const_o[rep, te] = np.nanmean(tg["opacity"][ctr])
            const_g[rep, te] = np.nanmean(tg["zone"][btr].sum(-1))
    pg, pe, po = pred_g.mean(0), pred_e.mean(0), pred_o.mean(0)
    ce, co, cg = const_e.mean(0), const_o.mean(0), const_g.mean(0)
    out: dict[str, Any] = {"n_scored_images": int(n_s), "n_brixia": int(is_b.sum()), "n_cohen": int(is_c.sum()),
                           "repeats": repeats, "folds": folds, "alphas_chosen": sorted(set(alphas_used)),
                           "unit": "patient-grouped folds; patient bootstrap CIs"}
    ci = np.nonzero(is_c)[0]
    for name, pr, cst in (("geographic_extent", pe, ce), ("opacity", po, co)):
        y = tg["extent" if name == "geographic_extent" else "opacity"]
        yy, pp, cc, gg = y[ci], pr[ci], cst[ci], pid[ci]

        def mae_diff(ii, yy=yy, pp=pp, cc=cc):
            return float(np.abs(pp[ii] - yy[ii]).mean() - np.abs(cc[ii] - yy[ii]).mean())

        out[name] = {
            "mae": float(np.abs(pp - yy).mean()),
            "mae_ci95": list(M.bootstrap_ci(lambda ii: float(np.abs(pp[ii] - yy[ii]).mean()), len(yy), groups=gg,
                                            n_boot=N_BOOT)),
            "pearson_r": _pearson(pp, yy),
            "pearson_r_ci95": list(M.bootstrap_ci(lambda ii: _pearson(pp[ii], yy[ii]), len(yy), groups=gg,
                                                  n_boot=N_BOOT)),
            "constant_mae": float(np.abs(cc - yy).mean()),
            "mae_minus_constant": mae_diff(np.arange(len(yy))),
            "mae_minus_constant_ci95": list(M.bootstrap_ci(mae_diff, len(yy), groups=gg, n_boot=N_BOOT)),
            "cohen_et_al_reported": {"mae": 1.14 if name == "geographic_extent" else 0.78,
                                     "pearson_r": 0.81 if name == "geographic_extent" else None},
        }
    bi = np.nonzero(is_b)[0]
    ymean = tg["zone"][bi].sum(-1)
    gb = pid[bi]
    out["brixia_global"] = {
        "spearman_vs_senior": _spearman(pg[bi], tg["global_s"][bi]),
        "spearman_vs_senior_ci95": list(M.bootstrap_ci(lambda ii: _spearman(pg[bi][ii], tg["global_s"][bi][ii]),
                                                       len(bi), groups=gb, n_boot=N_BOOT)),
        "spearman_vs_junior": _spearman(pg[bi], tg["global_j"][bi]),
        "mae_vs_reader_mean": float(np.abs(pg[bi] - ymean).mean()),
        "constant_mae": float(np.abs(cg[bi] - ymean).mean()),
        "inter_reader_spearman": _spearman(tg["global_s"][bi], tg["global_j"][bi]),
        "inter_reader_mae": float(np.abs(tg["global_s"][bi] - tg["global_j"][bi]).mean()),
    }
    e_ok = out["geographic_extent"]["mae_minus_constant_ci95"][1]
    o_ok = out["opacity"]["mae_minus_constant_ci95"][1]
    out["enabled"] = bool(e_ok is not None and o_ok is not None and not math.isnan(e_ok) and not math.isnan(o_ok)
                          and e_ok < 0 and o_ok < 0)
    out["enable_rule"] = ("enabled only if the upper 95% CI of (model MAE - constant-predictor MAE) is below 0 for "
                          "both geographic extent and opacity")
    return out


def source_probe_v1(data: Path, rows, sel: np.ndarray) -> dict:
    """The same probe on the v1 model's features of the same images (full image, v1 preprocessing)."""
    import torch
    import torch.nn.functional as F

    from engine.training.datasets import load_gray01, xray_dir
    from engine.ai.models.registry import XRAY_MODEL, load_model
    from engine.ai.preprocess.xray import prepare_xray

    try:
        lm = load_model(XRAY_MODEL, version="1.0.0")
    except Exception as e:  # the v1 files may have been removed
        return {"note": f"v1 model not available ({e})"}
    d = xray_dir(data)
    feats = np.zeros((len(rows), 1024))
    idx = np.nonzero(sel)[0]
    with torch.inference_mode():
        for k in range(0, len(idx), 24):
            ii = idx[k:k + 24]
            x = torch.stack([prepare_xray(load_gray01(d / rows[i]["path"]), size=224)[0] for i in ii])
            fm = lm.module.feature_map(x)
            feats[ii] = F.adaptive_avg_pool2d(F.relu(fm), 1).flatten(1).numpy()
    return source_probe(rows, sel, feats)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------

def run(data: Path, run_dir: Path, cache: Path, out_dir: Path, side: int, write: bool,
        lungseg_version: str = "1.0.0") -> dict:
    import torch
    from safetensors.torch import load_file

    from engine.ai import severity_zones as SZ
    from engine.ai.models.densenet_xray import XRayDenseNet
    from engine.training.train_xray_lung import load_cache

    torch.set_num_threads(2)
    rows, arr = load_cache(data, cache)
    ok = arr["ok"].astype(bool)
    model = XRayDenseNet()
    model.load_state_dict({k: v.float() for k, v in load_file(str(run_dir / "best.safetensors")).items()})
    model.eval()
    # the shipped model runs in fp16 storage: evaluate what ships
    for p in model.parameters():
        p.data = p.data.half().float()
    idx = np.nonzero(ok)[0]
    op_, pn_, cv_, pooled_, zf_ = forward(model, arr["crops"], arr["masks"], arr["zones"], idx, side)
    n = len(rows)
    op = np.zeros(n)
    pn = np.zeros(n)
    cv = np.zeros((n, 3))
    feats = np.zeros((n, pooled_.shape[1]))
    zf = np.zeros((n, 6, zf_.shape[-1]), np.float32)
    op[idx], pn[idx], cv[idx], feats[idx], zf[idx] = op_, pn_, cv_, pooled_, zf_
    lab = np.array([r["label"] for r in rows])
    src = np.array([r["source"] for r in rows])
    split = np.array([r["split"] for r in rows])
    va = ok & (split == "val") & (src != "figure1")
    thr_op = spec_threshold((lab[va] != "normal").astype(int), sigmoid(op[va]))
    cva = va & (src == "ieee8023") & np.isin(lab, ["covid", "other_pneumonia"])
    thr_cv = spec_threshold((lab[cva] == "covid").astype(int), softmax(cv[cva])[:, 0])
    res: dict[str, Any] = {"thresholds_from_validation": {"Lung Opacity": thr_op, "COVID-19": thr_cv}}
    res["validation"] = {
        "within_nih_val": block((lab[va & (src == "nih_cxr8_talo")] != "normal").astype(int),
                                sigmoid(op[va & (src == "nih_cxr8_talo")]), thr_op,
                                np.array([r["patient_id"] for r in rows])[va & (src == "nih_cxr8_talo")]),
        "within_ieee8023_val_covid_vs_other_pneumonia": block((lab[cva] == "covid").astype(int),
                                                              softmax(cv[cva])[:, 0], thr_cv,
                                                              np.array([r["patient_id"] for r in rows])[cva])}
    res["test"] = classifier_metrics(rows, ok, op, pn, cv, thr_op, thr_cv)
    res["loso_heads"] = loso_heads(rows, ok, feats)
    te_nc = ok & (split == "test") & (lab != "covid")
    res["source_probe_v2"] = source_probe(rows, te_nc, feats)
    res["source_probe_v1_same_images"] = source_probe_v1(data, rows, te_nc)
    res["segmentation_coverage"] = {s_: {"with_lungs": int((ok & (src == s_)).sum()), "total": int((src == s_).sum())}
                                    for s_ in sorted(set(src.tolist()))}
    tg = severity_targets(data, rows)
    res["severity_cv"] = severity_cv(rows, ok, zf, tg)
    # final severity model on all scored images (what ships); its numbers are the CV ones above
    is_b = ok & ~np.isnan(tg["zone"][:, 0])
    is_c = ok & ~np.isnan(tg["extent"])
    alpha = float(np.median(res["severity_cv"]["alphas_chosen"])) if res["severity_cv"]["alphas_chosen"] else 1000.0
    sev = SZ.fit(zf[is_b], tg["zone"][is_b], zf[is_c], tg["extent"][is_c], tg["opacity"][is_c], alpha)
    res["severity_final"] = {"alpha": alpha, "extent_line": sev.extent_ab, "opacity_line": sev.opacity_ab}
    (run_dir / "eval.json").write_text(json.dumps(res, indent=1, default=float))
    if write:
        from safetensors.numpy import save_file as save_np

        out_dir.mkdir(parents=True, exist_ok=True)
        sf = out_dir / f"xray-severity-{SEV_VERSION}.safetensors"
        save_np(sev.to_tensors(), str(sf))
        res["cards"] = [str(p) for p in write_cards(res, run_dir, out_dir, lungseg_version)]
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="main.py evaluate-xray-lung", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--run", required=True, help="training run folder with best.safetensors")
    p.add_argument("--cache", default="train-cache")
    p.add_argument("--out", default="resources/models")
    p.add_argument("--side", type=int, default=192)
    p.add_argument("--write", action="store_true", help="write weights (fp16) and cards into --out")
    p.add_argument("--cards-only", action="store_true",
                   help="rewrite the cards from the run's eval.json (no forward passes); needs a previous --write")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cards_only:
        res = json.loads((Path(a.run) / "eval.json").read_text())
        for p in write_cards(res, Path(a.run), Path(a.out), "1.0.0"):
            print(f"[evaluate] wrote {p}")
        return 0
    res = run(Path(a.data), Path(a.run), Path(a.cache), Path(a.out), a.side, a.write)
    print(json.dumps({k: res[k] for k in ("thresholds_from_validation", "source_probe_v2")}, indent=1, default=float))
    return 0



# ----------------------------------------------------------------------------------------------
# Cards
# ----------------------------------------------------------------------------------------------

REPORT_RULE = ("a label is reported (gets an operating threshold) only if its within-source AUC on the "
               "validation split has a lower 95% CI bound above 0.60; decided before the test split was scored")


def _reported(val_block: dict) -> bool:
    lo = (val_block.get("ci95") or {}).get("auc", [None, None])[0]
    return lo is not None and not (isinstance(lo, float) and math.isnan(lo)) and lo > 0.60


def write_cards(res: dict, run_dir: Path, out_dir: Path, lungseg_version: str) -> list[Path]:
    """Classifier card (via engine.ai.models.registry.write_card) and severity card, from ``res``."""
    import torch
    from safetensors.torch import load_file

    from engine.ai.models.densenet_xray import COVID_CLASSES, XRV_PATHOLOGIES
    from engine.ai.models.registry import XRAY_MODEL, sha256_file, write_card

    v1 = {}
    v1p = out_dir / "xray-densenet121-1.0.0.json"
    if v1p.is_file():
        v1 = json.loads(v1p.read_text())
    hist = json.loads((run_dir / "history.json").read_text()) if (run_dir / "history.json").is_file() else {}
    thr = res["thresholds_from_validation"]
    val = res["validation"]
    thresholds = {}
    if _reported(val["within_nih_val"]):
        thresholds["Lung Opacity"] = round(float(thr["Lung Opacity"]), 6)
    if _reported(val["within_ieee8023_val_covid_vs_other_pneumonia"]):
        thresholds["COVID-19"] = round(float(thr["COVID-19"]), 6)
    sev = res["severity_cv"]
    state = {k: v.float() for k, v in load_file(str(run_dir / "best.safetensors")).items()}
    sev_file = out_dir / f"xray-severity-{SEV_VERSION}.safetensors"
    card_path = write_card(
        out_dir, name=XRAY_MODEL, version=VERSION, state_dict=state, trained=True, dtype="float16",
        labels={"pathologies": list(XRV_PATHOLOGIES), "covid": list(COVID_CLASSES)},
        architecture="XRayDenseNet", arch_params={},
        thresholds=thresholds,
        report_rule=REPORT_RULE,
        preprocessing={
            "text": ("displayed grey [0,1] (default VOI, MONOCHROME1 inverted; training JPEGs /255) -> lung "
                     f"segmentation (xray-lungseg {lungseg_version}) -> square box around both lungs + 6% margin "
                     "-> 256 px -> histogram equalisation over the box -> black outside the soft-edged lung mask "
                     "-> 192 px -> (2x-1)*1024"),
            "input_size": 192, "raw_side": 256, "channels": 1, "range": [-1024, 1024],
            "function": "engine.ai.preprocess.xray_lung_input.lung_model_input",
            "requires": f"xray-lungseg {lungseg_version}"},
        metrics={"validation": val, "test": res["test"], "leave_one_source_out_heads": res["loso_heads"],
                 "source_probe": {"v2_lung_input": res["source_probe_v2"],
                                  "v1_full_image_same_images": res.get("source_probe_v1_same_images"),
                                  "what": "5-fold patient-grouped CV AUC of a linear ieee8023-vs-NIH classifier on "
                                          "pooled features of non-COVID test images (0.5 = the features do not "
                                          "tell the archives apart)"},
                 "segmentation_coverage": res["segmentation_coverage"]},
        training_data={
            "folder": "shared/data/xray (labels.csv); figure1 held out completely (external source)",
            "split": "patient-level train/val/test from labels.csv; selection and thresholds on val; test scored once",
            "sampling": "source ~ sqrt(size), then abnormal/normal 50:50 within the source",
            "covid_head": "trained on ieee8023 images only (COVID-19 vs other pneumonia vs normal)",
            "init": "ChestView xray-densenet121 1.0.0 weights; conv0..transition1 frozen",
            "run": hist},
        data_licences=v1.get("data_licences", []) + [
            "V7 Labs COVID-19 X-ray lung masks (CC BY 4.0) for the lung segmentation that builds the input.",
            "Brixia-score annotations (CC BY-NC-SA 4.0) for the severity scorer."],
        references=v1.get("references", []) + [
            "Signoroni A, et al. BS-Net: learning COVID-19 pneumonia severity on a large chest X-ray dataset. "
            "Medical Image Analysis 2021;71:102046.",
            "Borghesi A, Maroldi R. COVID-19 outbreak in Italy: experimental chest X-ray scoring system. "
            "Radiol Med 2020;125:509-513.",
            "DeGrave AJ, Janizek JD, Lee S-I. AI for radiographic COVID-19 detection selects shortcuts over "
            "signal. Nat Mach Intell 2021;3:610-619."],
        severity={"enabled": bool(sev["enabled"]), "model": f"xray-severity {SEV_VERSION}",
                  "file": sev_file.name, "cv": sev},
        intended_use=INTENDED_USE,
        evaluated_by="python main.py evaluate-xray-lung (engine/training/evaluate_xray_lung.py)",
        source=f"trained by ChestView (engine/training/train_xray_lung.py), {hist.get('steps', '?')} steps on a 2-core CPU",
        limitations=[
            "Trained on a CPU for under an hour on ~900 images from two archives; far weaker than published models.",
            "Only 'Lung Opacity' (abnormal vs normal) is reported when its within-source validation AUC supports "
            "it; COVID-19 is reported only if its within-ieee8023 validation AUC does (see report_rule).",
            "Within-source numbers rest on small groups (ieee8023 has 3 normal test images): wide CIs.",
            "The severity scorer's zones are thirds of each lung's height, not Brixia's anatomical landmarks.",
            "Severity is scored only when Lung Opacity is positive: the scorer learnt from COVID-19 pneumonia "
            "radiographs only and has no normal reference (it gives a normal demo CR extent 3.1/8).",
            "Children, lateral views, and devices covering the lungs were not studied."],
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    sev_card = {
        "name": "xray-severity", "version": SEV_VERSION, "architecture": "ZoneRidge",
        "file": sev_file.name, "sha256": sha256_file(sev_file), "trained": True, "enabled": bool(sev["enabled"]),
        "depends_on": [f"{XRAY_MODEL} {VERSION}", f"xray-lungseg {lungseg_version}"],
        "method": ("ReLU feature map of xray-densenet121 2.0.0 pooled inside each of 6 lung zones (thirds of each "
                   "lung's height; A/B/C right upper/middle/lower, D/E/F left) + the zone's grey statistics -> "
                   "ridge regression to the Brixia zone score (0-3, mean of 2 readers); the sum (0-18) -> straight "
                   "lines to Cohen's geographic extent (0-8) and opacity (0-6) fitted on Cohen's 94 images"),
        "final_fit": res.get("severity_final"),
        "metrics": sev,
        "training_data": "shared/data/xray brixia.csv (178 images) + severity.csv (94 images), all ieee8023",
        "intended_use": INTENDED_USE,
        "data_licences": ["Brixia-score annotations: CC BY-NC-SA 4.0; 'should not be used for medical purposes'.",
                          "Cohen et al. severity scores: CC BY-SA.", "Images: ieee8023 per-image licences."],
        "references": ["Signoroni A, et al. Medical Image Analysis 2021;71:102046 (BS-Net, Brixia score).",
                       "Cohen JP, et al. Cureus 2020;12(7):e9448 (geographic extent and opacity scores)."],
        "evaluated_by": "python main.py evaluate-xray-lung (engine/training/evaluate_xray_lung.py)",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    sp = out_dir / f"xray-severity-{SEV_VERSION}.json"
    tmp = sp.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(sev_card, indent=2, default=float))
    tmp.replace(sp)
    return [card_path, sp]


if __name__ == "__main__":
    sys.exit(cli_main())
