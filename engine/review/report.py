"""Batch review rows and exports: results.csv, results.json, report.html + thumbnails.

Research use only, not for diagnostic use: that sentence and the model names/versions appear in
every export (JSON header and rows, a CSV column on every row, the HTML banner, PNG metadata).

The rows are a stable contract (the Ray engine must reproduce them). ``results.json``::

    {
      "schema": "chestview-batch-results/1",
      "intended_use": "Research use only, not for diagnostic use",
      "app": {"name": "ChestView", "version": "0.1.0"},
      "deidentified": false,
      "input": {"path": "/data/folder" | "<de-identified>", "files_seen": 12},
      "models": [{"name", "version", "trained", "sha256", "label"}],     # union over rows
      "summary": {"studies", "series", "ok", "invalid", "unsupported", "failed",
                  "problem_files", "by_kind": {...}, "failures_by_reason": {reason: count}},
      "rows": [ROW, ...],            # sorted by (patient_id, study_date, study_uid, series_number, series_uid)
      "problems": [{"path": "relative/to/input", "reason": "..."}],   # files the index skipped
      "run": {...}                   # TIMING: generated_at, seconds, studies_per_minute, workers
    }

``ROW`` (one per series; keys always present, values null when unknown)::

    patient_id, patient_name, birth_date      identifiers; with --deidentify: a stable pseudonym
                                              ("ANON-" + 12 hex of an HMAC), "" and ""
    study_uid, study_date, study_description, accession_number ("" with --deidentify)
    series_uid, series_number, series_description, modality, kind ("xray"|"ct"|"other"),
    body_part, view_position, n_images
    status            "ok" | "invalid" (validity gate failed: scores greyed) | "unsupported" | "failed"
    valid             bool | null (null when failed before the gate)
    validity_reasons  [str];  ood_score  float | null
    score             float | null: X-ray = highest finding probability; CT = study probability
    top_label         str; positive_labels [str]
    probabilities     {label: float (6 decimals)};  thresholds {label: float}
    severity_extent (0-8), severity_opacity (0-6), ct_study_probability, lung_volume_ml: float | null
    severity_method   "zone-ridge" | "cohen-logit" | null (engine.results.Severity.method)
    brixia_global (0-18), zone_A ... zone_F (0-3): float | null; Brixia zones A/B/C right upper/middle/
                      lower, D/E/F left, as thirds of each lung's height (an approximation of the zones)
    ct_quant          CT HU quantification (engine.results.CTQuantification.to_dict) | null
    models            ["<name> <version> (trained|untrained)"];  device  str (TIMING-like: run environment)
    error             str | null (why this series failed; also counted in failures_by_reason)
    warnings          [str]
    thumbnail         "thumbs/<key>.png" | null (image | image + heatmap), heatmap_target, heatmap_slice
    intended_use      "Research use only, not for diagnostic use"
    timings_ms        TIMING: {"decode": ms, "analyze": ms, ...from StudyResult.timings_ms}

TIMING keys (``run``, ``timings_ms``, ``device`` — e.g. "cpu (2 threads, fp32)" — and HTML elements
with class ``t``) are the only things that may differ between an interrupted-and-resumed run and an
uninterrupted one, or between the local and the Ray engine; :func:`strip_timing` removes them.
"""
from __future__ import annotations

import csv
import hashlib
import hmac
import html
import io
import json
import math
import os
import re
import secrets
from pathlib import Path
from typing import Any, Iterable

from engine.review.journal import atomic_write_bytes, atomic_write_json, atomic_write_text
from engine.results import RESEARCH_USE, top_finding

RESULTS_SCHEMA = "chestview-batch-results/1"
TIMING_KEYS = ("run", "timings_ms", "device")   # what may differ between two runs of the same input
ROW_KEYS = (
    "patient_id", "patient_name", "birth_date", "study_uid", "study_date", "study_description",
    "accession_number", "series_uid", "series_number", "series_description", "modality", "kind",
    "body_part", "view_position", "n_images", "status", "valid", "validity_reasons", "ood_score",
    "score", "top_label", "positive_labels", "probabilities", "thresholds", "severity_extent",
    "severity_opacity", "ct_study_probability", "lung_volume_ml", "models", "device", "error",
    "warnings", "thumbnail", "heatmap_target", "heatmap_slice", "intended_use", "timings_ms", "ct_quant",
    "severity_method", "brixia_global", "zone_A", "zone_B", "zone_C", "zone_D", "zone_E", "zone_F",
)
ZONE_KEYS = tuple(f"zone_{z}" for z in "ABCDEF")   # Brixia zones (engine.ai.severity_zones.ZONE_NAMES)
DEID_INPUT = "<de-identified>"
_WORD = re.compile(r"[^\W_]+")   # a run of letters/digits (Unicode); '_', '^', '-' separate


# ----------------------------------------------------------------------------------------------
# De-identification (PS3.15 E.1 Basic Profile: patient name, ID and birth date)
# ----------------------------------------------------------------------------------------------
def _deid_key() -> bytes:
    """HMAC key: $CHESTVIEW_DEID_KEY (hex, share it across a cluster) or a per-install secret."""
    env = os.environ.get("CHESTVIEW_DEID_KEY")
    if env:
        return bytes.fromhex(env) if re.fullmatch(r"(?:[0-9a-fA-F]{2})+", env) else env.encode()
    from engine.paths import user_data_dir

    p = user_data_dir() / "deid.key"
    if not p.exists():
        try:
            fd = os.open(str(p), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
        except FileExistsError:
            pass
    return p.read_bytes()


class Deidentifier:
    """Replaces patient name, ID and birth date with a stable pseudonym everywhere.

    The pseudonym is an HMAC of the Patient ID under a secret key, so the same patient gets the
    same pseudonym in every run on this installation, and IDs cannot be recovered by hashing
    guesses. ``scrub`` also removes those identifiers from free text (file paths, reasons).
    """

    def __init__(self, enabled: bool, patients: Iterable[Any] = (), key: bytes | None = None):
        self.enabled = bool(enabled)
        self._key = (key if key is not None else _deid_key()) if self.enabled else b""
        self._first: dict[str, list[tuple[str, str]]] = {}
        if self.enabled:
            self.learn(patients)

    def pseudonym(self, patient_id: str) -> str:
        if not self.enabled:
            return patient_id
        return "ANON-" + hmac.new(self._key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:12].upper()

    def learn(self, patients: Iterable[Any]) -> None:
        """Collect every identifier string of the indexed patients for ``scrub``.

        Indexed by their first word, so scrubbing stays linear in the text length for archives
        of any size (no regex alternation over every patient).
        """
        pairs: dict[str, str] = {}
        for p in patients:
            pid = str(getattr(p, "patient_id", "") or "").strip()
            if pid:
                pairs[pid] = self.pseudonym(pid)
            name = str(getattr(p, "patient_name", "") or "")
            for part in [name, name.replace("^", " ")] + re.split(r"[\^\s,]+", name):
                if len(part.strip()) >= 2:
                    pairs.setdefault(part.strip(), "[removed]")
            bd = str(getattr(p, "birth_date", "") or "").strip()
            if len(bd) >= 4:
                pairs.setdefault(bd, "[removed]")
        for ident, repl in pairs.items():
            m = _WORD.search(ident)
            if m is None:
                continue
            ident = ident[m.start():].lower()
            self._first.setdefault(m.group().lower(), []).append((ident, repl))
        for cands in self._first.values():
            cands.sort(key=lambda c: -len(c[0]))        # longest identifier first

    def scrub(self, text: Any) -> Any:
        """``text`` with every known identifier (whole words, any case) replaced."""
        if not self.enabled or not isinstance(text, str) or not text or not self._first:
            return text
        low = text.lower()
        out: list[str] = []
        i = 0
        for m in _WORD.finditer(text):
            if m.start() < i:
                continue
            for ident, repl in self._first.get(m.group().lower(), ()):
                end = m.start() + len(ident)
                if low.startswith(ident, m.start()) and (end >= len(text) or not text[end].isalnum()):
                    out += [text[i:m.start()], repl]
                    i = end
                    break
        out.append(text[i:])
        return "".join(out)


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------
def _r6(x: Any) -> float | None:
    if x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) or math.isinf(f) else round(f, 6)


def model_tag(m: Any) -> str:
    return f"{m.name} {m.version} ({'trained' if m.trained else 'untrained'})"


def series_key(series_uid: str) -> str:
    return hashlib.sha256(series_uid.encode("utf-8")).hexdigest()[:24]


def pick_heatmap(result: Any) -> Any:
    """The heatmap the report shows: the top finding's, else the first one."""
    hms = list(getattr(result, "heatmaps", None) or [])
    if not hms:
        return None
    top = max(result.findings, key=lambda f: f.probability).label if result.findings else None
    for h in hms:
        if h.target == top:
            return h
    return hms[0]


def build_row(patient: Any, study: Any, series: Any, result: Any | None, *, error: str | None = None,
              deid: Deidentifier | None = None, thumbnail: str | None = None,
              timings_ms: dict[str, float] | None = None, warnings: Iterable[str] = ()) -> dict[str, Any]:
    """One results row for a series: from its StudyResult, or from ``error`` when it never got one."""
    deid = deid or Deidentifier(False)
    own_error = error
    pid = str(getattr(patient, "patient_id", "") or getattr(series, "patient_id", ""))
    row: dict[str, Any] = {k: None for k in ROW_KEYS}
    row.update(
        patient_id=deid.pseudonym(pid),
        patient_name="" if deid.enabled else str(getattr(patient, "patient_name", "") or ""),
        birth_date="" if deid.enabled else str(getattr(patient, "birth_date", "") or ""),
        study_uid=series.study_uid,
        study_date=str(getattr(study, "study_date", "") or ""),
        study_description=deid.scrub(str(getattr(study, "study_description", "") or "")),
        accession_number="" if deid.enabled else str(getattr(study, "accession_number", "") or ""),
        series_uid=series.series_uid,
        series_number=series.series_number,
        series_description=deid.scrub(series.series_description or ""),
        modality=series.modality, kind=series.kind, body_part=series.body_part or "",
        view_position=series.view_position or "", n_images=len(series.instances),
        validity_reasons=[], positive_labels=[], probabilities={}, thresholds={}, models=[],
        warnings=[deid.scrub(w) for w in warnings], thumbnail=thumbnail, intended_use=RESEARCH_USE,
        top_label="", device="",
    )
    timings = dict(timings_ms or {})
    if result is not None:
        v = result.validity
        probs = {f.label: _r6(f.probability) for f in result.findings}
        top = max(result.findings, key=lambda f: f.probability) if result.findings else None
        score = _r6(result.ct_study_probability) if result.ct_study_probability is not None else \
            (_r6(top.probability) if top is not None else None)
        hm = pick_heatmap(result)
        shown_top = top_finding(result)   # the panel's first finding: worklist and panel agree
        row.update(
            valid=bool(v.passed), validity_reasons=[deid.scrub(r) for r in v.reasons], ood_score=_r6(v.ood_score),
            score=score, top_label=shown_top.label if shown_top is not None else "",
            positive_labels=sorted(f.label for f in result.findings if f.positive),
            probabilities=probs, thresholds={f.label: _r6(f.threshold) for f in result.findings},
            severity_extent=_r6(result.severity.geographic_extent) if result.severity else None,
            severity_opacity=_r6(result.severity.opacity) if result.severity else None,
            ct_study_probability=_r6(result.ct_study_probability), lung_volume_ml=_r6(result.lung_volume_ml),
            models=[model_tag(m) for m in result.models], device=result.device or "",
            heatmap_target=hm.target if hm is not None and thumbnail else None,
            heatmap_slice=hm.slice_index if hm is not None and thumbnail else None,
        )
        row["warnings"] = list(dict.fromkeys(row["warnings"] + [deid.scrub(w) for w in result.warnings]))
        row.update(severity_columns(result.severity))
        q = getattr(result, "ct_quant", None)
        if q is not None:
            row["ct_quant"] = _ct_quant_row(q)
        error = error or result.error
        timings.update({k: round(float(t), 1) for k, t in (result.timings_ms or {}).items()})
    row["error"] = deid.scrub(error) if error else None
    row["timings_ms"] = {k: round(float(t), 1) for k, t in timings.items()}
    if is_unsupported(series, result, own_error):
        row["status"] = "unsupported"     # e.g. MR/MG: viewable, not analysed; ``error`` says why
    elif row["error"]:
        row["status"] = "failed"
    elif row["valid"] is False:
        row["status"] = "invalid"
    else:
        row["status"] = "ok"
    return row


def severity_columns(s: Any) -> dict[str, Any]:
    """Method, Brixia global and the six zone scores of a Severity (all null when absent)."""
    zs = dict(getattr(s, "zone_scores", None) or {}) if s is not None else {}
    out: dict[str, Any] = {"severity_method": (getattr(s, "method", None) or None) if s is not None else None,
                           "brixia_global": _r6(getattr(s, "brixia_global", None)) if s is not None else None}
    out.update({k: _r6(zs.get(k[-1])) for k in ZONE_KEYS})
    return out


def _ct_quant_row(q: Any) -> dict[str, Any]:
    """The JSON form of a CTQuantification without the timings (they differ run to run)."""
    d = q.to_dict()
    d.pop("timings_ms", None)
    return json.loads(json.dumps(d))     # tuples -> lists: the same row whether fresh or read back


def ct_quant_columns(row: dict[str, Any]) -> dict[str, Any]:
    """Flat CSV columns of a row's CT quantification: totals, then per lung/zone involved %."""
    q = row.get("ct_quant")
    if not q:
        return {}
    out: dict[str, Any] = {"ct:severity_score_0_25": q["severity_score"],
                           "ct:opacity_percent": q["total_opacity_percent"], "ct:ggo_ml": q["ggo_ml"],
                           "ct:consolidation_ml": q["consolidation_ml"], "ct:lung_ml": q["lung_volume_ml"],
                           "ct:emphysema_percent": q["total"]["emphysema_percent"]}
    for z in q["lungs"] + q["zones"]:
        key = f"{z['lung']} {z['zone']}"
        out[f"ct:{key} ml"] = z["volume_ml"]
        out[f"ct:{key} ggo%"] = z["ggo_percent"]
        out[f"ct:{key} consolidation%"] = z["consolidation_percent"]
    return out


def is_unsupported(series: Any, result: Any | None, error: str | None = None) -> bool:
    """A modality the AI does not read (header kind 'other'), analysed without a failure of ours."""
    return (not error and result is not None and getattr(result, "kind", "") == "unsupported"
            and getattr(series, "kind", "") == "other")


def row_sort_key(row: dict[str, Any]) -> tuple:
    sn = row.get("series_number")
    return (str(row.get("patient_id") or ""), str(row.get("study_date") or ""), str(row.get("study_uid") or ""),
            sn if isinstance(sn, int) else 10**9, str(row.get("series_uid") or ""))


# ----------------------------------------------------------------------------------------------
# Thumbnails
# ----------------------------------------------------------------------------------------------
def render_thumbnail(thumb: Any, heat: Any | None) -> Any:
    """uint8 gray thumbnail (+ float heatmap in image coords) -> RGB array: [image | image+heatmap]."""
    import numpy as np
    from PIL import Image

    g = np.asarray(thumb, dtype=np.uint8)
    rgb = np.repeat(g[:, :, None], 3, axis=2)
    if heat is None:
        return rgb
    from matplotlib import colormaps

    h = np.asarray(heat, dtype=np.float32)
    h = np.nan_to_num(h, nan=0.0)
    h = np.asarray(Image.fromarray(h, mode="F").resize((g.shape[1], g.shape[0]), Image.Resampling.BILINEAR))
    lo, hi = float(h.min()), float(h.max())
    h = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    col = colormaps["jet"](h)[:, :, :3] * 255.0
    a = (0.55 * h)[:, :, None]
    over = (rgb * (1.0 - a) + col * a).clip(0, 255).astype(np.uint8)
    gap = np.full((g.shape[0], 4, 3), 255, dtype=np.uint8)
    return np.concatenate([rgb, gap, over], axis=1)


def write_thumbnail(out_dir: str | Path, series_uid: str, decoded: Any, result: Any | None) -> str | None:
    """Write thumbs/<key>.png atomically; returns its path relative to ``out_dir``."""
    from PIL import Image, PngImagePlugin

    thumbs = list(getattr(decoded, "thumbs", None) or [])
    if not thumbs:
        return None
    hm = pick_heatmap(result) if result is not None else None
    idx = 0
    if hm is not None and hm.slice_index is not None:
        if 0 <= hm.slice_index < len(thumbs):
            idx = hm.slice_index
        else:
            hm = None
    elif len(thumbs) > 1:  # CT without a heatmap: the most suspicious scored slice, else the middle
        scores = [c for c in (getattr(result, "ct_slice_scores", None) or []) if 0 <= c.slice_index < len(thumbs)]
        idx = max(scores, key=lambda c: c.probability).slice_index if scores else len(thumbs) // 2
    img = render_thumbnail(thumbs[idx], hm.array if hm is not None else None)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", RESEARCH_USE)
    if result is not None and result.models:
        info.add_text("Software", "ChestView; " + "; ".join(model_tag(m) for m in result.models))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", pnginfo=info, optimize=False)
    rel = f"thumbs/{series_key(series_uid)}.png"
    atomic_write_bytes(Path(out_dir) / rel, buf.getvalue())
    return rel


# ----------------------------------------------------------------------------------------------
# Summary and exports
# ----------------------------------------------------------------------------------------------
def _norm_reason(reason: str) -> str:
    reason = re.sub(r"\s+", " ", str(reason)).strip()
    return reason[:160]


def summarize(rows: list[dict[str, Any]], problems: list[dict[str, str]]) -> dict[str, Any]:
    by_status = {s: 0 for s in ("ok", "invalid", "unsupported", "failed")}
    by_kind: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
        if r.get("error") and r["status"] == "failed":
            k = _norm_reason(r["error"])
            reasons[k] = reasons.get(k, 0) + 1
    for p in problems:
        k = _norm_reason(p["reason"])
        reasons[k] = reasons.get(k, 0) + 1
    return {"studies": len({r["study_uid"] for r in rows}), "series": len(rows), **by_status,
            "problem_files": len(problems), "by_kind": dict(sorted(by_kind.items())),
            "failures_by_reason": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))}


def collect_models(records_models: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[tuple, dict[str, Any]] = {}
    for m in records_models:
        seen[(m.get("name"), m.get("version"))] = m
    return [seen[k] for k in sorted(seen, key=lambda k: (str(k[0]), str(k[1])))]


def build_results(rows: list[dict[str, Any]], problems: list[dict[str, str]], models: list[dict[str, Any]], *,
                  input_path: str, files_seen: int, deidentified: bool, run: dict[str, Any]) -> dict[str, Any]:
    from engine import __version__

    rows = sorted(rows, key=row_sort_key)
    problems = sorted(problems, key=lambda p: (p["path"], p["reason"]))
    return {
        "schema": RESULTS_SCHEMA, "intended_use": RESEARCH_USE,
        "app": {"name": "ChestView", "version": __version__}, "deidentified": bool(deidentified),
        "input": {"path": DEID_INPUT if deidentified else input_path, "files_seen": int(files_seen)},
        "models": models, "summary": summarize(rows, problems), "rows": rows, "problems": problems, "run": run,
    }


CSV_FIXED = ["patient_id", "patient_name", "birth_date", "study_uid", "study_date", "accession_number",
             "series_uid", "series_number", "modality", "kind", "series_description", "n_images", "status",
             "valid", "validity_reasons", "ood_score", "score", "top_label", "positive_labels",
             "severity_extent", "severity_opacity", "severity_method", "brixia_global", *ZONE_KEYS,
             "ct_study_probability", "lung_volume_ml", "models",
             "device", "error", "warnings", "thumbnail", "intended_use"]


def to_csv(results: dict[str, Any]) -> str:
    """One line per series; probabilities as ``p:<label>`` columns; timing columns last (``ms:*``)."""
    rows = results["rows"]
    labels = sorted({lab for r in rows for lab in r["probabilities"]})
    tkeys = sorted({k for r in rows for k in r["timings_ms"]})
    ct_cols = {r["series_uid"]: ct_quant_columns(r) for r in rows}
    ckeys = list(dict.fromkeys(k for c in ct_cols.values() for k in c))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIXED + [f"p:{lab}" for lab in labels] + ckeys + [f"ms:{k}" for k in tkeys])
    for r in rows:
        vals = []
        for k in CSV_FIXED:
            v = r.get(k)
            if isinstance(v, list):
                v = "; ".join(str(x) for x in v)
            elif v is None:
                v = ""
            vals.append(v)
        vals += ["" if r["probabilities"].get(lab) is None else r["probabilities"][lab] for lab in labels]
        vals += [ct_cols[r["series_uid"]].get(k, "") for k in ckeys]
        vals += ["" if k not in r["timings_ms"] else r["timings_ms"][k] for k in tkeys]
        w.writerow(vals)
    return buf.getvalue()


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None or x == "":
        return ""
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.2em;color:#222;background:#fafafa}
.ruo{background:#7a1f1f;color:#fff;padding:.5em .8em;font-weight:600;border-radius:4px}
h1{font-size:1.4em;margin:.4em 0} h2{font-size:1.1em;margin-top:1.4em}
table{border-collapse:collapse;background:#fff;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 6px;vertical-align:middle}
th{background:#eee;position:sticky;top:0;cursor:pointer;white-space:nowrap}
th.asc::after{content:" \\25B2"} th.desc::after{content:" \\25BC"}
tr.invalid td.sc,tr.invalid td.sev{color:#999;font-style:italic}
tr.failed{background:#fff0f0} tr.unsupported{color:#777}
.st{font-weight:600} tr.ok .st{color:#176b2c} tr.invalid .st{color:#a06000} tr.failed .st{color:#b00020}
td{max-width:280px} td.vr{min-width:180px;font-size:12px}
img.th{height:110px;display:block}
.models li{margin:.1em 0} .small{font-size:12px;color:#555}
.sum td:first-child{font-weight:600}
"""

_JS = """
(function(){
  var t=document.getElementById('rows'); if(!t) return;
  var hs=t.tHead.rows[0].cells;
  function key(td, num){var v=td.getAttribute('data-v'); if(v===null) v=td.textContent;
    if(num){var f=parseFloat(v); return isNaN(f)? -Infinity : f;} return v.toLowerCase();}
  function sortBy(i, dir){
    var num=hs[i].getAttribute('data-num')==='1', b=t.tBodies[0];
    var rs=Array.prototype.slice.call(b.rows);
    rs.sort(function(a,c){var x=key(a.cells[i],num), y=key(c.cells[i],num);
      return (x<y?-1:x>y?1:0)*dir;});
    rs.forEach(function(r){b.appendChild(r);});
    for(var j=0;j<hs.length;j++) hs[j].className='';
    hs[i].className = dir>0?'asc':'desc';
  }
  for(var i=0;i<hs.length;i++)(function(i){hs[i].addEventListener('click',function(){
    sortBy(i, hs[i].className==='desc'?1:-1);});})(i);
  var d=t.getAttribute('data-default'); if(d!==null) sortBy(parseInt(d,10),-1);
})();
"""


def _ct_quant_cell(r: dict[str, Any]) -> str:
    """CT severity score (zones), opacity burden and the per-zone involved % as a small table."""
    q = r.get("ct_quant")
    if not q:
        return "<td class='sev' data-v=''></td>"
    e = html.escape
    zones = "".join(f"<tr><td>{e(z['lung'])} {e(z['zone'])}</td><td>{z['ggo_percent']:.1f}</td>"
                    f"<td>{z['consolidation_percent']:.1f}</td></tr>" for z in q["zones"])
    return (f"<td class='sev' data-v='{q['severity_score']}'><b>{q['severity_score']}</b>/25 "
            f"<span class='small'>(zones, approx.)</span><br>opacity {q['total_opacity_percent']:.2f}% · "
            f"GGO {q['ggo_ml']:.1f} mL · cons. {q['consolidation_ml']:.1f} mL"
            + (" · <b>demo phantom</b>" if q.get("is_phantom") else "")
            + f"<table class='small'><tr><th>zone</th><th>GGO %</th><th>cons. %</th></tr>{zones}</table></td>")


# Zone score colours at 0, 1, 2, 3 (the viewer's zone table uses the same stops, viewer.ai.zone_overlay).
_ZONE_STOPS = ((80, 200, 120), (240, 215, 60), (250, 145, 40), (235, 55, 55))


def _zone_bg(v: float | None, greyed: bool) -> str:
    if v is None or greyed:
        return "#ddd"
    x = max(0.0, min(3.0, float(v)))
    i = min(int(x), 2)
    t = x - i
    a, b = _ZONE_STOPS[i], _ZONE_STOPS[i + 1]
    return "#" + "".join(f"{round(p + (q - p) * t):02x}" for p, q in zip(a, b))


def _zone_cell(r: dict[str, Any]) -> str:
    """Brixia global and a 2x3 grid (columns patient right / left as on a PA image, rows upper /
    middle / lower), each zone 0-3 with one decimal; grey when the validity gate failed."""
    g = r.get("brixia_global")
    zones = {k[-1]: r.get(k) for k in ZONE_KEYS}
    if g is None and all(v is None for v in zones.values()):
        return "<td class='sev' data-v=''></td>"
    greyed = r.get("valid") is False

    def cell(z: str) -> str:
        v = zones[z]
        return (f"<td style='background:{_zone_bg(v, greyed)};text-align:center;padding:0 4px'>"
                f"{z}&nbsp;{'' if v is None else f'{float(v):.1f}'}</td>")

    grid = "".join(f"<tr><td>{name}</td>{cell(a)}{cell(b)}</tr>"
                   for name, a, b in (("upper", "A", "D"), ("middle", "B", "E"), ("lower", "C", "F")))
    return (f"<td class='sev' data-v='{'' if g is None else g}'><b>{_fmt(g, 1)}</b>/18 "
            f"<span class='small'>({html.escape(str(r.get('severity_method') or ''))})</span>"
            f"<table class='small bz'><tr><th></th><th>R</th><th>L</th></tr>{grid}</table>"
            "<span class='small'>thirds approximation of the Brixia zones</span></td>")


def trend_section(rows: list[dict[str, Any]]) -> str:
    """Per patient with two or more dated studies: an inline SVG of severity and probabilities by
    study date and the values as a table (engine.reading.priors). Patients appear under the ID the rows
    carry, which is the pseudonym under --deidentify; names are never shown here."""
    from engine.reading.priors import metric_series, trend_svg, trends_from_rows

    trends = trends_from_rows(rows)
    if not trends:
        return ""
    e = html.escape
    parts = ["<h2>Trends (patients with two or more studies)</h2>"]
    for pid, pts in trends.items():
        series = metric_series(pts)
        head = "".join(f"<th>{e(label)}</th>" for _, label, _, _ in series)
        body = "".join(
            f"<tr><td>{e(p.when.strftime('%Y-%m-%d'))}</td><td>{e(p.modality)}</td>"   # type: ignore[union-attr]
            f"<td>{'' if p.valid is None else ('passed' if p.valid else 'failed')}</td>"
            + "".join(f"<td>{'' if vals[k] is None else _fmt(float(vals[k]), 3 if mx <= 1 else 1)}</td>"
                      for _, _, mx, vals in series) + "</tr>" for k, p in enumerate(pts))
        parts.append(f"<div class='trend'><h3>{e(pid)} — {len(pts)} studies</h3>{trend_svg(pts)}"
                     f"<table><tr><th>study date</th><th>modality</th><th>validity</th>{head}</tr>{body}</table>"
                     "<p class='small'>Each line on its own scale (0 at the bottom, the scale's maximum at the "
                     "top); dashed lines are probabilities. Results of a failed image check are not findings.</p></div>")
    return "\n".join(parts)


def to_html(results: dict[str, Any]) -> str:
    """Self-contained page (no CDN): banner, models, summary, sortable table, failures."""
    e = html.escape
    rows, s = results["rows"], results["summary"]
    models = results["models"]
    mlist = "".join(
        f"<li>{e(m.get('label') or m.get('name', ''))} — <code>{e(str(m.get('name')))} {e(str(m.get('version')))}</code>"
        f"{'' if m.get('trained') else ' <b>(untrained: scores are not findings)</b>'}"
        f" <span class='small'>sha256 {e(str(m.get('sha256', ''))[:12])}</span></li>" for m in models) or \
        "<li>no model ran (no analysable series)</li>"
    cols = [("Image", 0), ("Patient", 0), ("Study date", 0), ("Modality", 0), ("Series", 0), ("Status", 0),
            ("Validity", 0), ("Score", 1), ("Top finding", 0), ("Extent 0-8", 1), ("Opacity 0-6", 1),
            ("Brixia 0-18 (zones)", 1),
            ("CT quant (zones)", 1), ("Positive", 0), ("Models", 0), ("Error / warnings", 0), ("Time s", 1)]
    head = "".join(f"<th data-num='{n}'>{e(c)}</th>" for c, n in cols)
    body = []
    for r in rows:
        img = f"<img class='th' src='{e(r['thumbnail'])}' alt='thumbnail'>" if r.get("thumbnail") else ""
        hm = ""
        if r.get("heatmap_target"):
            hm = f"<div class='small'>heatmap: {e(str(r['heatmap_target']))}" + \
                 (f", slice {r['heatmap_slice']}" if r.get("heatmap_slice") is not None else "") + "</div>"
        validity = "" if r["valid"] is None else ("passed" if r["valid"] else "failed: " + "; ".join(r["validity_reasons"]))
        vsort = "" if r["valid"] is None else ("1" if r["valid"] else "0")
        total_s = sum(v for k, v in r["timings_ms"].items() if k in ("decode", "analyze")) / 1000.0
        pname = f"<br><span class='small'>{e(r['patient_name'])}</span>" if r.get("patient_name") else ""
        errs = "; ".join(([r["error"]] if r.get("error") else []) + list(r.get("warnings") or []))
        cells = [
            f"<td>{img}{hm}</td>",
            f"<td>{e(r['patient_id'])}{pname}</td>",
            f"<td>{e(r['study_date'] or '')}</td>",
            f"<td>{e(r['modality'])}<br><span class='small'>{e(r['kind'])}</span></td>",
            f"<td data-v='{e(str(r['series_number'] if r['series_number'] is not None else ''))}'>"
            f"{e(r['series_description'] or '')}<br><span class='small'>{r['n_images']} image(s)</span></td>",
            f"<td class='st'>{e(r['status'])}</td>",
            f"<td class='vr' data-v='{vsort}'>{e(validity)}</td>",
            f"<td class='sc' data-v='{'' if r['score'] is None else r['score']}'>{_fmt(r['score'])}</td>",
            f"<td>{e(r['top_label'] or '')}</td>",
            f"<td class='sev' data-v='{'' if r['severity_extent'] is None else r['severity_extent']}'>{_fmt(r['severity_extent'], 2)}</td>",
            f"<td class='sev' data-v='{'' if r['severity_opacity'] is None else r['severity_opacity']}'>{_fmt(r['severity_opacity'], 2)}</td>",
            _zone_cell(r),
            _ct_quant_cell(r),
            f"<td>{e(', '.join(r['positive_labels']))}</td>",
            f"<td class='small'>{e('; '.join(r['models']))}</td>",
            f"<td class='small'>{e(errs)}</td>",
            f"<td class='t' data-v='{total_s:.3f}'>{total_s:.2f}</td>",
        ]
        body.append(f"<tr class='{e(r['status'])}' data-uid='{e(r['series_uid'])}'>{''.join(cells)}</tr>")
    sumrows = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in
                      [("studies", s["studies"]), ("series", s["series"]), ("ok (gate passed)", s["ok"]),
                       ("invalid (validity gate failed)", s["invalid"]), ("unsupported modality", s["unsupported"]),
                       ("failed", s["failed"]), ("problem files (not indexed)", s["problem_files"])])
    reasons = "".join(f"<tr><td>{v}</td><td>{e(k)}</td></tr>" for k, v in s["failures_by_reason"].items()) or \
        "<tr><td colspan='2'>none</td></tr>"
    probs = "".join(f"<tr><td>{e(p['path'])}</td><td>{e(p['reason'])}</td></tr>" for p in results["problems"]) or \
        "<tr><td colspan='2'>none</td></tr>"
    run = results.get("run", {})
    inp = results["input"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ChestView batch review</title>
<style>{_CSS}</style></head><body>
<div class="ruo">{e(RESEARCH_USE)}</div>
<h1>ChestView batch review</h1>
<p class="small">Input: <code>{e(str(inp['path']))}</code> — {inp['files_seen']} file(s) seen.
{'De-identified: patient names, IDs and birth dates replaced by pseudonyms.' if results['deidentified'] else ''}
ChestView {e(results['app']['version'])}. <span class="t">Generated {e(str(run.get('generated_at', '')))},
{_fmt(run.get('seconds'), 1)} s this run.</span></p>
<h2>Models</h2><ul class="models">{mlist}</ul>
<h2>Summary</h2><table class="sum">{sumrows}</table>
<h2>Failures by reason</h2><table><tr><th>count</th><th>reason</th></tr>{reasons}</table>
<h2>Series (click a column to sort; default: score, highest first)</h2>
<table id="rows" data-default="7"><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
{trend_section(rows)}
<h2>Files that could not be indexed</h2><table><tr><th>file</th><th>reason</th></tr>{probs}</table>
<p class="ruo">{e(RESEARCH_USE)}. Scores of untrained models or of series that failed the validity gate are not findings.</p>
<script>{_JS}</script>
</body></html>
"""


def write_reports(out_dir: str | Path, results: dict[str, Any]) -> dict[str, Path]:
    """results.json, results.csv and report.html, each written atomically."""
    out = Path(out_dir)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "html": out / "report.html"}
    atomic_write_json(paths["json"], results)
    atomic_write_text(paths["csv"], to_csv(results))
    atomic_write_text(paths["html"], to_html(results))
    return paths


def strip_timing(obj: Any) -> Any:
    """results.json content without TIMING keys (to compare two runs)."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def load_results(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text("utf-8"))
