"""Out-of-distribution probes: images the models must refuse, scored by the OOD gate
(engine.ai.models.ood, Mahalanobis distance of pooled features; Lee et al., NeurIPS 2018).

The X-ray gate is shown a tibia radiograph and CT slices (PNG and DICOM); the CT gate is shown chest
X-rays pushed through the CT preprocessing. Every probe goes through the app's own preprocessing, so
the rejection rates in the card are the app's. Research use only, not for diagnostic use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.training.eval_model import forward_all


def dicom_gray01(path: str) -> np.ndarray:
    """What the X-ray model gets from a DICOM: engine.dicom.display.display_gray01 (fallback: pydicom VOI)."""
    try:
        from engine.dicom.display import display_gray01
        from engine.dicom.pixels import load_frame

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

    from engine.training.datasets import ct_dir, load_gray01, read_csv_rows
    from engine.ai.preprocess.xray import prepare_xray

    probes: dict[str, list] = {}
    try:
        from pydicom.data import get_testdata_file

        tib = get_testdata_file("RG3_UNCR.dcm")
        if tib:
            probes["tibia_radiograph_RG3_UNCR"] = [prepare_xray(dicom_gray01(tib))[0]]
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
            ims.append(prepare_xray(dicom_gray01(str(p)))[0])
        except Exception:
            continue
    if ims:
        probes["ct_dicom_slices_as_xray"] = ims
    return {k: (torch.stack(v) if v and not isinstance(v[0], str) else v) for k, v in probes.items()}


def ood_rates(model, kind: str, tensors, threshold: float, probes: dict, feats_by_split: dict,
              train_feats: np.ndarray | None = None) -> dict:
    """Rejection rate and median OOD score per feature set (``feats_by_split``) and per probe image set
    at ``threshold``; with ``train_feats`` also the training score quantiles the threshold came from."""
    from engine.ai.models.ood import ood_score

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


def _ct_probe_input(gray01: np.ndarray, size: int):
    """A non-CT image through the CT preprocessing exactly as the app would (OOD probes)."""
    from engine.ai.preprocess.ct_input import figure_lung_mask, prepare_ct_slice

    return prepare_ct_slice(gray01, figure_lung_mask(gray01), size)[0]


def ct_ood_inputs(data: Path, size: int) -> dict[str, Any]:
    """Out-of-distribution probes for the CT gate: 60 chest X-rays of ../shared/data/xray as CT slices."""
    import torch

    from engine.training.datasets import xray_dir

    probes: dict[str, Any] = {}
    xd = xray_dir(data)
    if (xd / "labels.csv").is_file():
        from engine.training.datasets import load_gray01, read_csv_rows

        xr = read_csv_rows(xd / "labels.csv")
        pick = np.random.RandomState(0).choice(len(xr), 60, replace=False)
        probes["xrays_as_ct_slices"] = torch.stack([_ct_probe_input(load_gray01(xd / xr[i]["path"]), size)
                                                    for i in pick])
    return probes
