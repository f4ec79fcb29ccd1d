"""Checks the CT model card records beyond validation metrics (engine.training.eval_ct.evaluate_ct).

* ``brightness_shortcut``: can the mean grey level of the lung crop alone separate the classes,
  and does the model's score follow it? (The v1 model's did: Spearman 0.59.) AUCs and the
  Spearman correlation come with patient-level bootstrap 95% CIs (whole patients resampled,
  engine.metrics.bootstrap_ci), since a patient contributes several adjacent slices.
* ``specificity_check``: the app's own pipeline (engine.ai.analysis.Analyzer: DICOM decode, HU, 3-D
  lung ROI, shared preprocessing, classifier, study verdict) on the real CT in ../shared/data/dicom
  and on the demo phantom. Series that cannot be COVID-19 must not be flagged; the others are
  reported with their raw classifier scores.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engine import metrics as M

# (path under shared/data/dicom, expected, why). "negative": must not be flagged; "report": label unknown.
SPECIFICITY_ITEMS: tuple[tuple[str, str, str], ...] = (
    ("ct_lungpetctdx_1", "negative", "TCIA Lung-PET-CT-Dx lung-cancer chest CT acquired in 2007 (cannot be COVID-19)"),
    ("ct_wg04_ct1_transfer_syntaxes/CT1_UNC_explicitLE.dcm", "negative", "NEMA WG-04 CT1 test image (pre-2019)"),
    ("ct_wg04_ct1_transfer_syntaxes/CT1_RLE.dcm", "negative", "NEMA WG-04 CT1, RLE"),
    ("ct_wg04_ct1_transfer_syntaxes/CT1_J2KR.dcm", "negative", "NEMA WG-04 CT1, JPEG 2000 lossless"),
    ("ct_wg04_ct1_transfer_syntaxes/CT1_J2KI.dcm", "negative", "NEMA WG-04 CT1, JPEG 2000 lossy"),
    ("ct_wg04_ct1_transfer_syntaxes/CT1_JPLL.dcm", "negative", "NEMA WG-04 CT1, JPEG lossless"),
    ("ct_wg04_ct1_transfer_syntaxes/CT1_JLSL.dcm", "negative", "NEMA WG-04 CT1, JPEG-LS lossless"),
    ("ct_wg04_ct1_transfer_syntaxes/CT1_JLSN.dcm", "negative", "NEMA WG-04 CT1, JPEG-LS near-lossless"),
    ("ct_orthanc_ge_hispeed_chest_jpegll.dcm", "report", "GE HiSpeed chest slice (Orthanc test data; label unknown)"),
    ("ct_orthanc_ge_brightspeed_lung.dcm", "report", "GE BrightSpeed lung slice (Orthanc test data; label unknown)"),
    ("ct_covid19nysbu_1/axial_chest_ax.dcm", "report", "NY-SBU COVID-19 collection axial slice; label unknown"),
    ("ct_covid19nysbu_2_toshiba_axial.dcm", "report", "NY-SBU COVID-19 collection axial slice; label unknown"),
)


# ---------------------------------------------------------------- brightness shortcut
def crop_brightness(x_cached) -> np.ndarray:
    """Mean grey level in [0, 1] of each cached lung crop (channel 0 of engine.training.datasets' CT cache,
    the lung-window crop *before* normalisation: what a brightness shortcut could use)."""
    return x_cached[:, 0].float().mean(dim=(1, 2)).numpy().astype(np.float64)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).statistic)


def brightness_shortcut(y: Sequence[int], score: Sequence[float], brightness: Sequence[float],
                        groups: Sequence[str], n_boot: int = 1000) -> dict[str, Any]:
    """AUC of the model and of crop brightness alone, and Spearman(score, brightness), with CIs."""
    y = np.asarray(y, dtype=int)
    s = np.asarray(score, dtype=np.float64)
    b = np.asarray(brightness, dtype=np.float64)
    g = np.asarray(groups)

    def ci(stat) -> list[float]:
        return list(M.bootstrap_ci(stat, len(y), groups=g, n_boot=n_boot))

    return {
        "model_auc": M.roc_auc(y, s), "model_auc_ci95": ci(lambda i: M.roc_auc(y[i], s[i])),
        "brightness_auc": M.roc_auc(y, b), "brightness_auc_ci95": ci(lambda i: M.roc_auc(y[i], b[i])),
        "brightness_auc_note": "AUC of the mean lung-crop grey level alone (brighter = COVID-19); "
                               "0.5 = no information, below 0.5 = darker crops are COVID-19",
        "spearman_score_vs_brightness": _spearman(s, b),
        "spearman_ci95": ci(lambda i: _spearman(s[i], b[i])),
        "n": int(len(y)), "n_patients": int(len(set(g.tolist()))),
        "bootstrap": {"n_boot": n_boot, "unit": "patient"},
    }


# ---------------------------------------------------------------- specificity on real CT
def _series_of(path: Path):
    from engine.dicom.index import index_path

    return [s for s in index_path(path).all_series() if s.kind == "ct"]


def _row(res, name: str, expected: str, why: str) -> dict[str, Any]:
    v = getattr(res, "ct_verdict", None)
    slices = [float(s.probability) for s in (res.ct_slice_scores or [])]
    q = getattr(res, "ct_quant", None)
    return {
        "item": name, "expected": expected, "why": why, "n_slices_scored": len(slices),
        "classifier_study_probability": res.ct_study_probability,
        "classifier_max_slice_probability": max(slices) if slices else None,
        "threshold": getattr(v, "classifier_threshold", None),
        "classifier_above_threshold": (None if v is None or v.classifier_threshold is None
                                       or res.ct_study_probability is None
                                       else bool(res.ct_study_probability >= v.classifier_threshold)),
        "opacity_percent": None if q is None else float(q.total_opacity_percent),
        "verdict_flag": bool(getattr(v, "flag", False)),
        "verdict_basis": getattr(v, "basis", None),
        "verdict_reasons": list(getattr(v, "reasons", []) or []),
        "gate_passed": bool(res.validity.passed), "gate_reasons": list(res.validity.reasons),
        "error": res.error,
    }


def specificity_check(dicom_root: str | Path, *, include_phantom: bool = True,
                      items: Sequence[tuple[str, str, str]] = SPECIFICITY_ITEMS) -> dict[str, Any]:
    """Run the app's CT analysis (the model the registry loads now) on each item; see module docstring."""
    from engine.ai.analysis import Analyzer

    root = Path(dicom_root)
    an = Analyzer()
    rows: list[dict[str, Any]] = []
    for rel, expected, why in items:
        p = root / rel
        if not p.exists():
            rows.append({"item": rel, "expected": expected, "why": why, "error": "not present"})
            continue
        for s in _series_of(p):
            rows.append(_row(an.analyze(s, want_heatmaps=False), rel, expected, why))
    if include_phantom:
        from engine.demo.phantom import write_phantom_series

        with tempfile.TemporaryDirectory(prefix="chestview-phantom-") as td:
            write_phantom_series(Path(td) / "CT_PHANTOM")
            for s in _series_of(Path(td) / "CT_PHANTOM"):
                rows.append(_row(an.analyze(s, want_heatmaps=False), "demo CT phantom", "report",
                                 "synthetic phantom with a GGO and a consolidation lesion (engine.demo.phantom)"))
    negatives = [r for r in rows if r["expected"] == "negative"]
    must = [r for r in negatives if r.get("classifier_study_probability") is not None and not r.get("error")]
    return {"items": rows,
            "negatives_flagged": sum(r["verdict_flag"] for r in must), "negatives_checked": len(must),
            "negatives_not_scored": len(negatives) - len(must),
            "negatives_above_classifier_threshold": sum(bool(r["classifier_above_threshold"]) for r in must),
            # an item that could not be scored is a failed check, not a pass
            "passed": bool(must) and len(must) == len(negatives) and not any(r["verdict_flag"] for r in must),
            "rule": "no series that cannot be COVID-19 (lung-cancer CT from 2007, NEMA WG-04 CT1) may be flagged "
                    "by the shipped model + study verdict (engine.ai.ct_verdict)"}
