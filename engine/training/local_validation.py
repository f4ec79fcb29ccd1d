"""Local validation: check the shipped model on a site's own labelled images before trusting it.

``python main.py evaluate --model xray|ct --labels FILE.csv [--images DIR] [--out DIR]``

The CSV has a header with ``path`` and ``label`` and optionally ``patient_id`` and ``source``.
``path`` is an image file (JPEG/PNG), a DICOM file, or a folder (a DICOM series or study), relative
to ``--images`` (default: the CSV's folder). Every row runs through *the app's own pipeline*:
DICOM is indexed and analysed with engine.ai.analysis.analyze exactly as the viewer and the batch
review do; a JPEG/PNG is first wrapped, pixels untouched, into a DICOM Secondary Capture (Modality
DX, Body Part CHEST) in a temporary folder so that it takes the same path. Nothing is written next
to the inputs.

Written to ``--out``: ``validation.json`` and ``validation.html`` (ROC plot, calibration, per-source
table, gate rejections, bad rows). AUC with patient-level bootstrap 95% CIs; sensitivity and
specificity at the model card's operating threshold; calibration (10 reliability bins, Brier
score). Bad rows (missing file, unreadable, unknown label) are listed with a reason, never fatal.
Research use only, not for diagnostic use.
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import metrics as M

POSITIVE = {"1", "true", "yes", "positive", "pos", "abnormal", "opacity", "lung opacity", "pneumonia", "covid",
            "covid-19", "covid19", "other_pneumonia", "other pneumonia", "other_finding", "consolidation"}
NEGATIVE = {"0", "false", "no", "negative", "neg", "normal", "no finding", "no_finding", "non_covid", "noncovid",
            "non-covid"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
DEFAULT_FINDING = {"xray": "Lung Opacity", "ct": "COVID-19"}
N_BOOT = 1000


@dataclass
class RowOutcome:
    row: int
    path: str
    label: int | None
    patient_id: str
    source: str
    score: float | None = None
    threshold: float | None = None
    positive: bool | None = None
    gate_passed: bool | None = None
    gate_reasons: list[str] = field(default_factory=list)
    error: str | None = None


def parse_label(text: str) -> int | None:
    t = (text or "").strip().lower()
    if t in POSITIVE:
        return 1
    if t in NEGATIVE:
        return 0
    return None


def _image_to_dicom(path: Path, out_dir: Path, n: int) -> Path:
    """Wrap an 8-bit image into a Secondary Capture (PS3.3 A.8) with Modality DX and Body Part CHEST,
    so that it goes through the app's DICOM pipeline unchanged. Pixels are the image's own grey."""
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    with Image.open(path) as im:
        a = np.asarray(im.convert("L"), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = f"LV{n:06d}"
    ds.PatientName = f"LOCAL^VALIDATION{n}"
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ConversionType = "WSD"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = a.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    # PS3.3 C.11.2.1.2.1 linear VOI with C=128, W=256 displays x as exactly x/255: the image as a
    # JPEG viewer shows it and as training read it (engine.training.datasets.load_gray01)
    ds.WindowCenter = 128
    ds.WindowWidth = 256
    ds.PixelData = a.tobytes()
    out = out_dir / f"img{n:06d}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def _series_for(path: Path, kind: str):
    """The series to analyse under ``path``: the largest series of the wanted kind."""
    from engine.dicom.index import index_path

    res = index_path(path)
    cands = [s for s in res.all_series() if s.kind == kind]
    if not cands:
        reasons = "; ".join(sorted({p.reason for p in res.problems})[:2])
        found = sorted({s.modality for s in res.all_series()})
        raise ValueError(f"no {'X-ray (CR/DX)' if kind == 'xray' else 'CT'} series found"
                         + (f" (found modality {', '.join(found)})" if found else "")
                         + (f": {reasons}" if reasons else ""))
    return max(cands, key=lambda s: s.count)


def _score(result, finding: str, kind: str) -> tuple[float | None, float | None, bool | None]:
    for f in result.findings:
        if f.label == finding:
            return float(f.probability), float(f.threshold), bool(f.positive)
    if kind == "ct" and result.ct_study_probability is not None:
        return float(result.ct_study_probability), None, None
    return None, None, None


def run_rows(csv_path: Path, images: Path | None, kind: str, finding: str, analyzer=None,
             progress=print) -> list[RowOutcome]:
    from engine.ai.analysis import default_analyzer

    an = analyzer or default_analyzer()
    base = images or csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        if "path" not in cols or "label" not in cols:
            raise SystemExit(f"{csv_path}: the header must have 'path' and 'label' columns (found: "
                             f"{', '.join(reader.fieldnames or []) or 'none'})")
        rows = list(reader)
    out: list[RowOutcome] = []
    with tempfile.TemporaryDirectory(prefix="chestview-lv-") as tmp:
        for n, r in enumerate(rows, start=2):  # line numbers as a spreadsheet shows them
            rel = (r.get(cols["path"]) or "").strip()
            lab_txt = r.get(cols["label"]) or ""
            o = RowOutcome(n, rel, parse_label(lab_txt), (r.get(cols.get("patient_id", ""), "") or "").strip()
                           or f"row{n}", (r.get(cols.get("source", ""), "") or "").strip() or "(none)")
            out.append(o)
            if o.label is None:
                o.error = (f"unknown label {lab_txt!r}: use one of {', '.join(sorted(NEGATIVE)[:4])}… for negatives "
                           f"or {', '.join(sorted(POSITIVE)[:4])}… for positives")
                continue
            p = Path(rel) if os.path.isabs(rel) else base / rel
            if not rel or not p.exists():
                o.error = "file or folder not found"
                continue
            try:
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                    if kind != "xray":
                        raise ValueError("plain images can only be validated against the X-ray model")
                    sub = Path(tmp) / f"r{n}"
                    sub.mkdir()
                    p = _image_to_dicom(p, sub, n)
                series = _series_for(p, kind)
                res = an.analyze(series, want_heatmaps=False)
            except (ValueError, OSError) as e:
                o.error = f"unreadable: {e}"
                continue
            if res.error:
                o.error = res.error
                continue
            o.gate_passed = bool(res.validity.passed)
            o.gate_reasons = list(res.validity.reasons)
            o.score, o.threshold, o.positive = _score(res, finding, kind)
            if o.score is None and o.gate_passed:
                o.error = f"the model reported no '{finding}' score"
            if progress and (len(out) % 25 == 0):
                progress(f"[validate] {len(out)}/{len(rows)} rows")
    return out


def _calibration(y: np.ndarray, s: np.ndarray, bins: int = 10) -> dict:
    edges = np.linspace(0, 1, bins + 1)
    out = []
    for k in range(bins):
        m = (s >= edges[k]) & ((s < edges[k + 1]) if k < bins - 1 else (s <= 1))
        if m.any():
            out.append({"bin": [float(edges[k]), float(edges[k + 1])], "n": int(m.sum()),
                        "mean_score": float(s[m].mean()), "observed_rate": float(y[m].mean())})
    return {"bins": out, "brier": float(np.mean((s - y) ** 2)) if len(y) else None}


def summarise(outcomes: list[RowOutcome], model_label: str, finding: str) -> dict[str, Any]:
    scored = [o for o in outcomes if o.error is None and o.score is not None and o.gate_passed]
    y = np.array([o.label for o in scored], dtype=int)
    s = np.array([o.score for o in scored], dtype=np.float64)
    g = np.array([o.patient_id for o in scored])
    thr = next((o.threshold for o in scored if o.threshold is not None), None)
    res: dict[str, Any] = {"model": model_label, "finding": finding, "n_rows": len(outcomes),
                           "n_scored": len(scored), "threshold": thr}
    if len(set(y.tolist())) == 2:
        rep = M.binary_report_ci(y, s, thr if thr is not None else 0.5, groups=g, n_boot=N_BOOT)
        res["overall"] = {k: rep.get(k) for k in ("auc", "sensitivity", "specificity", "ppv", "npv", "accuracy")}
        res["overall"]["ci95"] = rep["ci95"]
        fpr, tpr, _ = M.roc_curve(y, s)
        res["roc"] = {"fpr": [float(v) for v in fpr], "tpr": [float(v) for v in tpr]}
    else:
        res["overall"] = {"note": "AUC needs both positive and negative rows that passed the gate"}
    res["calibration"] = _calibration(y, s)
    per: dict[str, Any] = {}
    for src in sorted({o.source for o in outcomes}):
        os_ = [o for o in outcomes if o.source == src]
        sc = [o for o in os_ if o in scored]
        ys = np.array([o.label for o in sc], dtype=int)
        ss = np.array([o.score for o in sc])
        blk: dict[str, Any] = {"rows": len(os_), "scored": len(sc),
                               "gate_rejected": sum(1 for o in os_ if o.error is None and o.gate_passed is False),
                               "bad_rows": sum(1 for o in os_ if o.error is not None)}
        if len(set(ys.tolist())) == 2:
            rep = M.binary_report_ci(ys, ss, thr if thr is not None else 0.5,
                                     groups=np.array([o.patient_id for o in sc]), n_boot=N_BOOT)
            blk.update({"auc": rep["auc"], "auc_ci95": rep["ci95"]["auc"], "sensitivity": rep["sensitivity"],
                        "specificity": rep["specificity"]})
        per[src] = blk
    res["per_source"] = per
    reasons: dict[str, int] = {}
    for o in outcomes:
        if o.error is None and o.gate_passed is False:
            for r in o.gate_reasons[:1] or ["(no reason given)"]:
                reasons[r] = reasons.get(r, 0) + 1
    res["gate_rejections"] = {"count": sum(reasons.values()), "by_reason": reasons}
    res["bad_rows"] = [{"row": o.row, "path": o.path, "reason": o.error} for o in outcomes if o.error is not None]
    res["rows"] = [{"row": o.row, "path": o.path, "label": o.label, "source": o.source, "score": o.score,
                    "positive": o.positive, "gate_passed": o.gate_passed, "error": o.error} for o in outcomes]
    return res


def _roc_png(res: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(8, 3.8), dpi=90)
    roc = res.get("roc")
    if roc:
        ax[0].plot(roc["fpr"], roc["tpr"], lw=2)
    ax[0].plot([0, 1], [0, 1], "k--", lw=0.8)
    auc = (res.get("overall") or {}).get("auc")
    ax[0].set_title(f"ROC ({res['finding']})" + (f": AUC {auc:.3f}" if isinstance(auc, float) else ""))
    ax[0].set_xlabel("1 - specificity")
    ax[0].set_ylabel("sensitivity")
    cb = res["calibration"]["bins"]
    ax[1].plot([0, 1], [0, 1], "k--", lw=0.8)
    if cb:
        ax[1].plot([b["mean_score"] for b in cb], [b["observed_rate"] for b in cb], "o-")
    ax[1].set_title("calibration")
    ax[1].set_xlabel("mean predicted probability")
    ax[1].set_ylabel("observed positive rate")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_outputs(res: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    jp, hp = out / "validation.json", out / "validation.html"
    tmp = jp.with_suffix(".tmp")
    tmp.write_text(json.dumps(M.jsonable(res) if hasattr(M, "jsonable") else res, indent=1, default=float))
    tmp.replace(jp)
    e = html.escape
    ov = res.get("overall") or {}

    def f3(v):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    ci = (ov.get("ci95") or {}).get("auc") or [None, None]
    src_rows = "".join(
        f"<tr><td>{e(k)}</td><td>{v['rows']}</td><td>{v['scored']}</td><td>{v['gate_rejected']}</td>"
        f"<td>{v['bad_rows']}</td><td>{f3(v.get('auc'))} ({f3((v.get('auc_ci95') or [None])[0])}–"
        f"{f3((v.get('auc_ci95') or [None, None])[1])})</td><td>{f3(v.get('sensitivity'))}</td>"
        f"<td>{f3(v.get('specificity'))}</td></tr>" for k, v in res["per_source"].items())
    bad = "".join(f"<tr><td>{b['row']}</td><td>{e(b['path'])}</td><td>{e(b['reason'])}</td></tr>"
                  for b in res["bad_rows"]) or "<tr><td colspan=3>none</td></tr>"
    gate = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in res["gate_rejections"]["by_reason"].items()) \
        or "<tr><td colspan=2>none</td></tr>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>ChestView local validation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:3px 8px;text-align:left}}.ruo{{background:#fee;padding:6px}}</style></head><body>
<h1>Local validation: {e(res['model'])}</h1>
<p class="ruo">Research use only, not for diagnostic use.</p>
<p>Finding <b>{e(res['finding'])}</b>; {res['n_rows']} rows, {res['n_scored']} scored (gate passed, readable);
operating threshold from the model card: {f3(res['threshold'])}.</p>
<h2>Overall</h2><p>AUC {f3(ov.get('auc'))} (95% CI {f3(ci[0])}–{f3(ci[1])}, patient bootstrap);
sensitivity {f3(ov.get('sensitivity'))}; specificity {f3(ov.get('specificity'))};
Brier score {f3(res['calibration']['brier'])}. {e(ov.get('note', ''))}</p>
<img alt="ROC and calibration" src="data:image/png;base64,{_roc_png(res)}">
<h2>Per source</h2><table><tr><th>source</th><th>rows</th><th>scored</th><th>gate rejected</th><th>bad rows</th>
<th>AUC (95% CI)</th><th>sensitivity</th><th>specificity</th></tr>{src_rows}</table>
<h2>Gate rejections</h2><table><tr><th>reason</th><th>count</th></tr>{gate}</table>
<h2>Bad rows</h2><table><tr><th>CSV line</th><th>path</th><th>reason</th></tr>{bad}</table>
</body></html>"""
    tmp = hp.with_suffix(".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(hp)
    return jp, hp


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chestview evaluate --labels", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["xray", "ct"], default="xray")
    p.add_argument("--labels", required=True, help="CSV with path,label[,patient_id,source]")
    p.add_argument("--images", help="folder the CSV's paths are relative to (default: the CSV's folder)")
    p.add_argument("--finding", help="which output to validate (default: Lung Opacity for xray, COVID-19 for ct)")
    p.add_argument("--out", default="validation", help="folder for validation.json and validation.html")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from engine.ai.models.registry import CT_MODEL, XRAY_MODEL, find_card, model_label

    csv_path = Path(a.labels)
    if not csv_path.is_file():
        print(f"error: {csv_path} not found", file=sys.stderr)
        return 2
    finding = a.finding or DEFAULT_FINDING[a.model]
    found = find_card(XRAY_MODEL if a.model == "xray" else CT_MODEL)
    label = model_label(found[1]) if found else "untrained model"
    t0 = time.time()
    outcomes = run_rows(csv_path, Path(a.images) if a.images else None, a.model, finding)
    res = summarise(outcomes, label, finding)
    jp, hp = write_outputs(res, Path(a.out))
    ov = res.get("overall") or {}
    ci = (ov.get("ci95") or {}).get("auc")
    print(f"[validate] {label}, finding {finding}: {res['n_scored']}/{res['n_rows']} rows scored; "
          f"AUC {ov.get('auc')} CI {ci}; sensitivity {ov.get('sensitivity')}, specificity {ov.get('specificity')} "
          f"at threshold {res['threshold']}; gate rejected {res['gate_rejections']['count']}; "
          f"bad rows {len(res['bad_rows'])}")
    for b in res["bad_rows"][:20]:
        print(f"[validate] bad row {b['row']}: {b['reason']}")
    print(f"[validate] wrote {jp} and {hp} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
