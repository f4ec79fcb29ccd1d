"""Evaluate the lung U-Net and write its card: ``python -m engine.training.evaluate_lungseg RUN --data DIR --write-card``.

Dice is measured at each image's own resolution through the app's inference path
(engine.ai.preprocess.xray_lungs.segment_lungs_xray), against the V7 masks with their "ignore"
pixels (127) left out, for the right lung, the left lung and both lungs as one mask. 95% CIs
resample patients (engine.metrics.bootstrap_ci). The validation split chose the epoch and the
weight precision; the test split is scored once, for the card. Research use only, not for
diagnostic use.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from engine import metrics as M
from engine.ai.preprocess.xray_lungs import PCT_HI, PCT_LO, SEG_MODEL, SEG_SIZE
from engine.training.train_lungseg import IGNORE, dice_scores, load_pair, read_mask_rows

DEFAULT_VERSION = "1.0.0"
N_BOOT = 1000
REFERENCES = [
    "Ronneberger O, Fischer P, Brox T. U-Net: Convolutional Networks for Biomedical Image Segmentation. "
    "MICCAI 2015 (arXiv:1505.04597).",
    "Milletari F, Navab N, Ahmadi S-A. V-Net (soft Dice loss). 3DV 2016 (arXiv:1606.04797).",
    "V7 Labs. COVID-19 X-ray dataset (lung masks), github.com/v7labs/covid-19-xray-dataset @ 51fca0d.",
    "Cohen JP, Morrison P, Dao L. COVID-19 image data collection. arXiv:2003.11597 (2020).",
    "Signoroni A, et al. BS-Net: learning COVID-19 pneumonia severity on a large chest X-ray dataset. "
    "Med Image Anal 2021;102046 (Brixia zones A-F; here approximated by thirds of each lung's height).",
]
LICENCES = [
    "V7 Labs lung masks: CC BY 4.0 (README 'CC4.0').",
    "ieee8023/covid-chestxray-dataset images: per-image licences (CC BY-NC-SA, CC BY 3.0/4.0, CC BY-NC-ND, "
    "CC BY-SA, 'authorized for everyone', unspecified); metadata CC BY-NC-SA 4.0. Non-commercial and "
    "no-derivatives terms apply to some training images.",
]


def load_run(run: Path):
    """(LungUNet fp32 in eval mode, run.json dict) from a training run folder."""
    from safetensors.torch import load_file

    from engine.ai.models.lung_unet import LungUNet

    info = json.loads((run / "run.json").read_text())
    model = LungUNet(**info["arch_params"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in load_file(str(run / "best.safetensors")).items()})
    return model.eval(), info


def score_split(model, data_root: Path, split: str) -> list[dict[str, Any]]:
    """Per image Dice (right, left, both) at full resolution, through the app's inference path."""
    from engine.ai.preprocess.xray_lungs import segment_lungs_xray

    out = []
    for row in read_mask_rows(data_root):
        if row["split"] != split:
            continue
        gray, lab = load_pair(data_root, row)
        pred = segment_lungs_xray(gray, model).labels
        r, l, b = dice_scores(pred, lab)
        out.append({"path": row["path"], "patient": row["patient_id"], "right": r, "left": l, "both": b,
                    "ignored_px": int((lab == IGNORE).sum())})
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean Dice per structure with patient-level 95% bootstrap CIs, median and worst image."""
    groups = [r["patient"] for r in rows]
    res: dict[str, Any] = {"n_images": len(rows), "n_patients": len(set(groups))}
    for key in ("right", "left", "both"):
        v = np.array([r[key] for r in rows])
        lo, hi = M.bootstrap_ci(lambda idx: float(v[idx].mean()), len(v), groups=groups, n_boot=N_BOOT)
        res[key] = {"mean": round(float(v.mean()), 4), "ci95": [round(lo, 4), round(hi, 4)],
                    "median": round(float(np.median(v)), 4), "min": round(float(v.min()), 4),
                    "fraction_below_0.8": round(float((v < 0.8).mean()), 4)}
    res["bootstrap"] = {"n_boot": N_BOOT, "unit": "patient"}
    return res


def _fp16_roundtrip(model):
    import copy

    m = copy.deepcopy(model)
    for p in list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]:
        p.data = p.data.half().float()
    return m


def write_card(run: Path, data_root: Path, version: str = DEFAULT_VERSION, out_dir: Path | None = None) -> Path:
    """Score val (fp32 and fp16), then test once, and write weights + card through the registry."""
    from engine.ai.models import registry
    from engine.ai.models.lung_unet import LUNG_CLASSES
    from engine.paths import models_dir
    from engine.results import RESEARCH_USE

    model, info = load_run(run)
    val32 = summarise(score_split(model, data_root, "val"))
    model16 = _fp16_roundtrip(model)
    val16 = summarise(score_split(model16, data_root, "val"))
    fp16_ok = val16["both"]["mean"] >= val32["both"]["mean"] - 0.002
    chosen = model16 if fp16_ok else model
    test = summarise(score_split(chosen, data_root, "test"))
    print(f"val fp32 {val32['both']['mean']} fp16 {val16['both']['mean']}; test {json.dumps(test)}", flush=True)
    card = {
        "task": "segmentation",
        "preprocessing": {
            "input": "displayed grayscale in [0,1] (engine.dicom.pixels: VOI applied, MONOCHROME1 inverted) "
                     "or 8-bit JPEG / 255",
            "steps": [f"letterbox: zero-pad to a centred square, resize to {SEG_SIZE} (area when shrinking)",
                      f"per-image percentile stretch p{PCT_LO:g}-p{PCT_HI:g} over non-padding pixels to [0,1], "
                      "then (x - 0.5) / 0.25"],
            "code": "engine/ai/preprocess/xray_lungs.py seg_input",
            "size": SEG_SIZE,
        },
        "postprocessing": "softmax resampled bilinearly to the image, argmax; per lung, pieces under 15% of its "
                          "largest piece dropped and holes filled; zones A-F = thirds of each lung's height",
        "metrics": {"dice": {"val_fp32": val32, "val_chosen": val16 if fp16_ok else val32, "test": test},
                    "split_note": "epoch chosen on val (mean Dice of the two lungs at 256 px); val and test "
                                  "Dice at full image resolution through segment_lungs_xray; test scored once",
                    "domain_note": "all masks are ieee8023 COVID-19 images (web, paper figures); no masks exist "
                                   "here for NIH or DICOM radiographs: check the overlays and the anatomy gate's "
                                   "pass rates (anatomy_gate) for those"},
        "training_data": {"masks": "data/xray/lung_masks.csv (V7 Labs on ieee8023)", "classes": list(LUNG_CLASSES),
                          "left_right": "from the masks' connected components by image x position "
                                        "(patient's right = image left)",
                          "ignore_label": "127 (devices/markup over the lung) excluded from the loss and Dice",
                          "n_train": info["n_train"], "n_val": info["n_val"], "n_test": test["n_images"],
                          "split": "patient-level train/val/test column of lung_masks.csv",
                          "run": {k: info[k] for k in ("batch", "lr", "budget_s", "seed", "threads")
                                  if k in info} | {"best_epoch": info.get("best_epoch"),
                                                   "epochs": len(info.get("history", []))},
                          "augmentation": "affine (rot 10 deg, scale 0.85-1.15, aspect, shear, shift 8%), "
                                          "resolution down-up, blur, gamma, contrast, burned-in text, noise, "
                                          "JPEG quality 15-90; no flips, no inversion"},
        "data_licences": LICENCES,
        "references": REFERENCES,
        "intended_use": RESEARCH_USE + " Lung fields and zones for lung-restricted X-ray analysis and the "
                                       "anatomy gate; adult frontal chest radiographs.",
        "evaluated_by": "engine/training/evaluate_lungseg.py",
        "source": f"trained by engine/training/train_lungseg.py from random initialisation ({run.name})",
    }
    old = registry.find_card(SEG_MODEL, version, out_dir or models_dir())
    if old is not None and "anatomy_gate" in old[1]:
        card["anatomy_gate"] = old[1]["anatomy_gate"]
    state = {k: v for k, v in chosen.state_dict().items()}
    return registry.write_card(out_dir or models_dir(), name=SEG_MODEL, version=version, state_dict=state,
                               trained=True, labels={"classes": list(LUNG_CLASSES)}, architecture="LungUNet",
                               arch_params=info["arch_params"], dtype="float16" if fp16_ok else "float32", **card)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="training run folder (run.json + best.safetensors)")
    ap.add_argument("--data", required=True, help="the shared data folder")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--write-card", action="store_true", help="score val and test and write weights + card")
    ap.add_argument("--version", default=DEFAULT_VERSION)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if a.write_card:
        print(write_card(Path(a.run), Path(a.data), a.version))
        return 0
    model, _ = load_run(Path(a.run))
    print(json.dumps(summarise(score_split(model, Path(a.data), a.split)), indent=1))
    return 0




# ---------------------------------------------------------------- anatomy gate: calibration and rates

GATE_FEATURES = ("area_right", "area_left", "area_both", "dominant_right", "dominant_left", "hw_right",
                 "hw_left", "area_ratio", "centre_dy", "x_overlap", "confidence", "contrast")


def _labels_csv(data_root: Path) -> list[dict[str, str]]:
    import csv

    with open(data_root / "xray" / "labels.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _percentiles(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for k in GATE_FEATURES:
        v = np.array([r[k] for r in rows], dtype=float)
        v = v[~np.isnan(v)]
        if v.size:
            q = np.percentile(v, [0, 0.5, 1, 5, 50, 95, 99, 99.5, 100])
            out[k] = dict(zip(("min", "p0.5", "p1", "p5", "p50", "p95", "p99", "p99.5", "max"),
                              (round(float(x), 4) for x in q)))
    return out


def calibrate_gate(data_root: Path, model=None, n_nih: int = 120) -> dict[str, Any]:
    """Feature percentiles on train/val reference masks and on the segmentation of NIH train images
    (never test): the ranges the constants in engine.ai.validity were set from."""
    from engine.training.datasets import load_gray01
    from engine.ai.preprocess.xray_lungs import lungs_from_labels, segment_lungs_xray
    from engine.ai.validity import lung_features

    ref = []
    for row in read_mask_rows(data_root):
        if row["split"] in ("train", "val"):
            gray, lab = load_pair(data_root, row)
            ref.append(lung_features(lungs_from_labels(np.where(lab == IGNORE, 0, lab)), gray))
    nih_rows = [r for r in _labels_csv(data_root) if r["source"] == "nih_cxr8_talo" and r["split"] == "train"]
    pred = [lung_features(segment_lungs_xray(g, model), g)
            for g in (load_gray01(data_root / "xray" / r["path"]) for r in nih_rows[:n_nih])]
    seg_ieee = []
    for row in read_mask_rows(data_root):
        if row["split"] == "val":
            gray, _ = load_pair(data_root, row)
            seg_ieee.append(lung_features(segment_lungs_xray(gray, model), gray))
    return {"reference_masks_train_val": _percentiles(ref), "segmentation_nih_train": _percentiles(pred),
            "segmentation_ieee8023_val": _percentiles(seg_ieee),
            "n": {"reference": len(ref), "nih_train": len(pred), "ieee8023_val": len(seg_ieee)}}


def _gate_one(gray: np.ndarray, model, header=None) -> tuple[bool, list[str]]:
    from engine.ai.preprocess.xray_lungs import segment_lungs_xray
    from engine.ai.validity import GateBuilder, anatomy_checks

    gate = GateBuilder()
    anatomy_checks(gate, segment_lungs_xray(gray, model), gray, header)
    return gate.passed, [k for k, ok in gate.checks.items() if not ok]


def gate_rates(data_root: Path, model=None) -> dict[str, Any]:
    """Anatomy-gate pass rates on test-split frontal chest radiographs and the DICOM CRs, and the
    verdicts on the images it must refuse."""
    from collections import Counter

    from pydicom.data import get_testdata_file

    from engine.training.datasets import load_gray01
    from engine.dicom.display import display_gray01
    from engine.dicom.pixels import load_frame
    from engine.ai.validity import read_anatomy_header

    out: dict[str, Any] = {}
    rows = [r for r in _labels_csv(data_root) if r["split"] == "test"]
    for source in ("nih_cxr8_talo", "ieee8023", "figure1"):
        verdicts = [_gate_one(load_gray01(data_root / "xray" / r["path"]), model) for r in rows if r["source"] == source]
        fails = Counter(k for ok, ks in verdicts if not ok for k in ks)
        out[f"{source}_test"] = {"n": len(verdicts), "pass_rate": round(sum(ok for ok, _ in verdicts) / max(1, len(verdicts)), 4),
                                 "failed_checks": dict(fails)}

    def dicom(path) -> tuple[bool, list[str]]:
        frame = load_frame(path)
        g = display_gray01(frame)
        g = g.mean(axis=2) if g.ndim == 3 else g
        return _gate_one(g.astype(np.float32), model, read_anatomy_header(str(path), frame.pixel_spacing))

    crs = {n: dicom(data_root / "dicom" / n) for n in ("xray_wg04_rg1_j2ki.dcm", "xray_barre_crmono1chest.dcm",
                                                         "xray_siim_1.dcm")}
    rg1 = get_testdata_file("RG1_UNCR.dcm")
    if rg1:
        crs["pydicom-data RG1_UNCR.dcm (demo)"] = dicom(rg1)
    out["dicom_cr"] = {"n": len(crs), "pass_rate": round(sum(ok for ok, _ in crs.values()) / len(crs), 4),
                       "verdicts": {k: ("pass" if ok else "refused: " + ", ".join(ks)) for k, (ok, ks) in crs.items()}}
    refuse = {"dog thorax DX (highdicom)": data_root / "dicom" / "other_highdicom_dog_thorax_dx.dcm",
              "CT slice as X-ray": data_root / "dicom" / "ct_orthanc_ge_brightspeed_lung.dcm"}
    rg3 = get_testdata_file("RG3_UNCR.dcm")
    if rg3:
        refuse["tibia (pydicom-data RG3)"] = Path(rg3)
    must = {k: dicom(p) for k, p in refuse.items()}
    siim = display_gray01(load_frame(data_root / "dicom" / "xray_siim_1.dcm")).astype(np.float32)
    must["inverted radiograph (SIIM)"] = _gate_one(1.0 - siim, model)
    must["blank image"] = _gate_one(np.zeros((512, 512), np.float32), model)
    must["half radiograph stretched (one lung, lateral-like)"] = _gate_one(
        np.repeat(siim[:, : siim.shape[1] // 2], 2, axis=1), model)
    out["must_refuse"] = {k: ("pass (WRONG)" if ok else "refused: " + ", ".join(ks)) for k, (ok, ks) in must.items()}
    return out


def update_card_fields(fields: dict[str, Any], version: str = DEFAULT_VERSION) -> Path:
    """Add/replace card keys that do not depend on the weights (the sha256 pin stays valid); atomic."""
    from engine.ai.models import registry

    found = registry.find_card(SEG_MODEL, version)
    if found is None:
        raise FileNotFoundError(f"no {SEG_MODEL} {version} card: run with --write-card first")
    path, card = found
    card.update(fields)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2), encoding="utf-8")
    tmp.replace(path)
    registry.clear_cache()
    return path


def gate_main(argv: list[str] | None = None) -> int:
    """``python -m engine.training.evaluate_lungseg gate --data DIR [--calibrate] [--rates]`` on the shipped model."""
    import torch

    from engine.ai import validity as V
    from engine.ai.preprocess.xray_lungs import load_lungseg

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--calibrate", action="store_true", help="print feature percentiles (train/val, NIH train)")
    ap.add_argument("--rates", action="store_true", help="pass rates on test + DICOM; written into the card")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = load_lungseg()
    if a.calibrate:
        cal = calibrate_gate(Path(a.data), model)
        print(json.dumps(cal, indent=1))
        Path("runs").mkdir(exist_ok=True)
        Path("runs/lungseg-gate-calibration.json").write_text(json.dumps(cal, indent=1))
    if a.rates:
        rates = gate_rates(Path(a.data), model)
        print(json.dumps(rates, indent=1))
        thresholds = {k: getattr(V, k) for k in ("LUNG_AREA_RANGE", "LUNGS_AREA_MIN", "LUNG_DOMINANT_MIN",
                                                 "LUNG_HW_RANGE", "LUNG_AREA_RATIO_MIN", "LUNG_CENTRE_DY_MAX",
                                                 "LUNG_X_OVERLAP_MAX", "SEG_CONFIDENCE_MIN", "LUNG_CONTRAST_MIN",
                                                 "ADULT_LUNGS_WIDTH_MIN_MM", "ADULT_AGE_MIN_YEARS")}
        print(update_card_fields({"anatomy_gate": {
            "code": "engine/ai/validity.py anatomy_checks", "thresholds": thresholds,
            "calibration": "thresholds set from feature percentiles of the train/val reference masks and of the "
                           "segmentation of NIH train and ieee8023 val images (engine/training/evaluate_lungseg.py "
                           "calibrate_gate); test images only measured here",
            "pass_rates": {k: v for k, v in rates.items() if k != "must_refuse"},
            "must_refuse": rates["must_refuse"]}}))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(gate_main(sys.argv[2:]) if sys.argv[1:2] == ["gate"] else main())
