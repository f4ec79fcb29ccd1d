"""AI results of one patient over time: one point per study, ordered by Study Date/Time.

Pure functions (no Qt, no torch). Inputs are the engine's own objects: ``StudyRecord``s with a
``StudyResult`` per analysed series (the viewer), or the rows of a batch ``results.json``
(engine.review.report). Severity values are read from whatever the result carries, so the trend grows
with the engine: X-ray geographic extent 0-8 and opacity 0-6 (Cohen et al. 2020), Brixia zone
scores A-F 0-3 and their total 0-18 (Borghesi & Maroldi 2020), CT severity score 0-25 (Pan et al.,
Radiology 2020) and % opacity (engine.ai.ct_quant). Probabilities come only from trained models
(an untrained model's output is never a finding, viewer.ai.findings_panel).
"""
from __future__ import annotations

import datetime as _dt
import html
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from engine.dicom.records import StudyRecord

# metric -> (axis maximum, short label): the plot normalises each metric to its scale
SEVERITY_SCALES: dict[str, tuple[float, str]] = {
    "extent": (8.0, "Extent 0–8"),
    "opacity": (6.0, "Opacity 0–6"),
    "brixia": (18.0, "Brixia 0–18"),
    "ct_score": (25.0, "CT score 0–25"),
    "ct_opacity_pct": (100.0, "CT opacity %"),
}
ZONES = ("A", "B", "C", "D", "E", "F")


@dataclass
class TrendPoint:
    """One study of the patient: its analysed series and the numbers to plot."""

    study_uid: str
    study_date: str                      # YYYYMMDD (may be empty: such a point cannot be placed)
    study_time: str = ""
    series_uid: str = ""
    modality: str = ""
    description: str = ""
    valid: bool | None = None            # validity gate passed (None: no result)
    severity: dict[str, float] = field(default_factory=dict)       # SEVERITY_SCALES keys
    zones: dict[str, float] = field(default_factory=dict)          # Brixia A-F when present
    probabilities: dict[str, float] = field(default_factory=dict)  # trained findings only
    error: str | None = None

    @property
    def when(self) -> _dt.datetime | None:
        return study_datetime(self.study_date, self.study_time)


def study_datetime(date: str, time: str = "") -> _dt.datetime | None:
    """Study Date (DA, YYYYMMDD) and Time (TM, HHMMSS.FFFFFF, trailing parts optional), PS3.5 6.2."""
    d = (date or "").strip()
    if len(d) < 8 or not d[:8].isdigit():
        return None
    t = "".join(ch for ch in (time or "").split(".")[0] if ch.isdigit()).ljust(6, "0")[:6]
    try:
        return _dt.datetime(int(d[:4]), int(d[4:6]), int(d[6:8]), int(t[:2]) % 24, int(t[2:4]) % 60,
                            int(t[4:6]) % 60)
    except ValueError:
        return None


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v == v else None      # NaN -> None


def _zone_values(sev: Any) -> dict[str, float]:
    """Brixia zone scores from a Severity: a mapping by zone letter or a sequence A..F."""
    for name in ("zone_scores", "zones", "brixia_zones"):
        z = getattr(sev, name, None)
        if isinstance(z, Mapping):
            out = {str(k): v for k, v in ((k, _num(v)) for k, v in z.items()) if v is not None}
            if out:
                return out
        elif isinstance(z, Sequence) and not isinstance(z, str) and len(z) == 6:
            vals = [_num(getattr(v, "score", v)) for v in z]
            if all(v is not None for v in vals):
                return dict(zip(ZONES, vals))  # type: ignore[arg-type]
    return {}


def severity_metrics(result: Any) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics keyed like SEVERITY_SCALES, Brixia zones) from whatever ``result`` carries."""
    out: dict[str, float] = {}
    zones: dict[str, float] = {}
    sev = getattr(result, "severity", None)
    if sev is not None:
        for key, attr in (("extent", "geographic_extent"), ("opacity", "opacity")):
            v = _num(getattr(sev, attr, None))
            if v is not None:
                out[key] = v
        zones = _zone_values(sev)
        total = next((v for v in (_num(getattr(sev, n, None)) for n in ("brixia_global", "brixia_total",
                                                                         "brixia_score")) if v is not None), None)
        if total is None and len(zones) == 6:
            total = float(sum(zones.values()))
        if total is not None:
            out["brixia"] = total
    q = getattr(result, "ct_quant", None)
    if q is not None:
        v = _num(getattr(q, "severity_score", None))
        if v is not None:
            out["ct_score"] = v
        v = _num(getattr(q, "total_opacity_percent", None))
        if v is not None:
            out["ct_opacity_pct"] = v
    return out, zones


def trained_probabilities(result: Any) -> dict[str, float]:
    """Finding probabilities of trained models (plus the CT study probability when trained)."""
    trained = {(m.name, m.version) for m in (getattr(result, "models", None) or []) if m.trained}
    out = {f.label: float(f.probability) for f in (getattr(result, "findings", None) or [])
           if (f.model_name, f.model_version) in trained}
    ct = _num(getattr(result, "ct_study_probability", None))
    if ct is not None and not out and getattr(result, "kind", "") == "ct" and trained:
        out["CT study"] = ct
    return out


def point_from_result(study: StudyRecord, result: Any, series: Any = None) -> TrendPoint:
    sev, zones = severity_metrics(result)
    validity = getattr(result, "validity", None)
    return TrendPoint(
        study_uid=study.study_uid, study_date=study.study_date, study_time=study.study_time,
        series_uid=str(getattr(result, "series_uid", "") or getattr(series, "series_uid", "")),
        modality=str(getattr(result, "modality", "") or getattr(series, "modality", "")),
        description=str(getattr(series, "series_description", "") or ""),
        valid=None if validity is None else bool(validity.passed), severity=sev, zones=zones,
        probabilities=trained_probabilities(result), error=getattr(result, "error", None))


def order_points(points: Iterable[TrendPoint]) -> list[TrendPoint]:
    """By Study Date/Time; undated points cannot be placed on a time axis and are left out."""
    dated = [p for p in points if p.when is not None]
    return sorted(dated, key=lambda p: (p.when, p.study_uid))


def patient_trend(studies: Iterable[StudyRecord], results: Mapping[str, Any],
                  modality_group: str | None = None) -> list[TrendPoint]:
    """One point per study that has a result for one of its series (the hanging's best series
    wins, engine.reading.hanging), optionally only for one modality group ('XR' or 'CT')."""
    from engine.reading.hanging import modality_group_of, rank_series

    points = []
    for st in studies:
        for se in rank_series(st.series):
            if modality_group and modality_group_of(se.modality) != modality_group:
                continue
            r = results.get(se.series_uid)
            if r is not None and getattr(r, "kind", "") != "unsupported":
                points.append(point_from_result(st, r, se))
                break
    return order_points(points)


def series_to_analyse(studies: Iterable[StudyRecord], results: Mapping[str, Any],
                      modality_group: str) -> list[Any]:
    """The best series of each study of ``modality_group`` that has no result yet (what the viewer
    queues so the trend fills in), newest study first."""
    from engine.reading.hanging import primary_series, study_datetime_key

    out = []
    for st in sorted(studies, key=study_datetime_key, reverse=True):
        if any(se.series_uid in results for se in st.series):
            continue
        se = primary_series(st, modality_group)
        if se is not None and se.kind in ("xray", "ct"):
            out.append(se)
    return out


# -- batch results rows (engine.review.report) ---------------------------------------------------------
_ROW_STATUS_RANK = {"ok": 0, "invalid": 1, "failed": 2, "unsupported": 3}


def point_from_row(row: Mapping[str, Any]) -> TrendPoint:
    sev: dict[str, float] = {}
    for key, col in (("extent", "severity_extent"), ("opacity", "severity_opacity"),
                     ("brixia", "brixia_global"), ("brixia", "brixia_total"),
                     ("ct_score", "ct_severity_score"), ("ct_opacity_pct", "ct_opacity_percent"),
                     ("ct_opacity_pct", "ct_total_opacity_percent")):
        v = _num(row.get(col))
        if v is not None and key not in sev:
            sev[key] = v
    q = row.get("ct_quant")
    if isinstance(q, Mapping):
        for key, col in (("ct_score", "severity_score"), ("ct_opacity_pct", "total_opacity_percent")):
            v = _num(q.get(col))
            if v is not None:
                sev.setdefault(key, v)
    zones = {k: v for k, v in ((k, _num(row.get(f"zone_{k}"))) for k in ZONES) if v is not None}
    z = None if zones else (row.get("zone_scores") or row.get("brixia_zones"))
    if isinstance(z, Mapping):
        zones = {str(k): v for k, v in ((k, _num(v)) for k, v in z.items()) if v is not None}
    elif isinstance(z, Sequence) and not isinstance(z, str) and len(z) == 6:
        zones = {k: v for k, v in zip(ZONES, (_num(v) for v in z)) if v is not None}
    if "brixia" not in sev and len(zones) == 6:
        sev["brixia"] = float(sum(zones.values()))
    probs = {str(k): float(v) for k, v in (row.get("probabilities") or {}).items() if _num(v) is not None}
    return TrendPoint(study_uid=str(row.get("study_uid") or ""), study_date=str(row.get("study_date") or ""),
                      study_time=str(row.get("study_time") or ""), series_uid=str(row.get("series_uid") or ""),
                      modality=str(row.get("modality") or ""), description=str(row.get("series_description") or ""),
                      valid=row.get("valid"), severity=sev, zones=zones, probabilities=probs,
                      error=row.get("error"))


def trends_from_rows(rows: Iterable[Mapping[str, Any]], min_studies: int = 2) -> dict[str, list[TrendPoint]]:
    """Patient ID (as written in the rows: a pseudonym under --deidentify) -> ordered points, one per
    study (its best analysed series: status ok first, then the lowest series number), for patients
    with at least ``min_studies`` dated studies."""
    best: dict[tuple[str, str], Mapping[str, Any]] = {}
    for r in rows:
        if r.get("kind") not in ("xray", "ct") or r.get("status") == "unsupported":
            continue
        key = (str(r.get("patient_id") or ""), str(r.get("study_uid") or ""))
        rank = (_ROW_STATUS_RANK.get(str(r.get("status")), 9),
                r["series_number"] if isinstance(r.get("series_number"), int) else 10**9)
        old = best.get(key)
        if old is None or rank < (_ROW_STATUS_RANK.get(str(old.get("status")), 9),
                                  old["series_number"] if isinstance(old.get("series_number"), int) else 10**9):
            best[key] = r
    by_patient: dict[str, list[TrendPoint]] = {}
    for (pid, _), r in best.items():
        by_patient.setdefault(pid, []).append(point_from_row(r))
    out = {}
    for pid, pts in sorted(by_patient.items()):
        pts = order_points(pts)
        if len(pts) >= min_studies:
            out[pid] = pts
    return out


# -- a small inline SVG (the HTML report; no plotting library, no script) ------------------------
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")


def metric_series(points: Sequence[TrendPoint], max_probabilities: int = 4) -> list[tuple[str, str, float, list[float | None]]]:
    """(key, label, axis maximum, value per point) for every severity metric present, then the
    ``max_probabilities`` findings with the highest probability anywhere (scale 0-1)."""
    out = []
    for key, (mx, label) in SEVERITY_SCALES.items():
        vals = [p.severity.get(key) for p in points]
        if any(v is not None for v in vals):
            out.append((key, label, mx, vals))
    labels: dict[str, float] = {}
    for p in points:
        for k, v in p.probabilities.items():
            labels[k] = max(labels.get(k, 0.0), v)
    for k in sorted(labels, key=lambda k: -labels[k])[:max_probabilities]:
        out.append((f"p:{k}", f"P({k})", 1.0, [p.probabilities.get(k) for p in points]))
    return out


def trend_svg(points: Sequence[TrendPoint], width: int = 560, height: int = 200) -> str:
    """Lines of every metric, each normalised to its own scale (0 at the bottom, the scale's maximum
    at the top), on a time axis by study date."""
    pts = order_points(points)
    if not pts:
        return ""
    e = html.escape
    left, right, top, bottom = 36, 150, 10, 28
    pw, ph = width - left - right, height - top - bottom
    t0, t1 = pts[0].when.timestamp(), pts[-1].when.timestamp()   # type: ignore[union-attr]
    span = max(t1 - t0, 1.0)

    def x(p: TrendPoint) -> float:
        return left + (pw * (p.when.timestamp() - t0) / span if len(pts) > 1 else pw / 2)  # type: ignore[union-attr]

    def y(frac: float) -> float:
        return top + ph * (1.0 - max(0.0, min(1.0, frac)))

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
             f"viewBox='0 0 {width} {height}' role='img' aria-label='AI results by study date'>",
             f"<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='#fff' stroke='#bbb'/>"]
    for frac, lab in ((0.0, "0"), (0.5, "½"), (1.0, "max")):
        parts.append(f"<line x1='{left}' x2='{left + pw}' y1='{y(frac):.1f}' y2='{y(frac):.1f}' stroke='#eee'/>"
                     f"<text x='{left - 4}' y='{y(frac) + 4:.1f}' font-size='10' text-anchor='end'>{lab}</text>")
    for p in pts:
        parts.append(f"<text x='{x(p):.1f}' y='{height - 10}' font-size='10' text-anchor='middle'>"
                     f"{e(p.when.strftime('%Y-%m-%d'))}</text>")   # type: ignore[union-attr]
    for n, (key, label, mx, vals) in enumerate(metric_series(pts)):
        col = _COLOURS[n % len(_COLOURS)]
        xy = [(x(p), y(v / mx)) for p, v in zip(pts, vals) if v is not None]
        dash = " stroke-dasharray='4 3'" if key.startswith("p:") else ""
        if len(xy) > 1:
            parts.append(f"<polyline fill='none' stroke='{col}' stroke-width='2'{dash} points='"
                         + " ".join(f"{a:.1f},{b:.1f}" for a, b in xy) + "'/>")
        for (a, b), v in zip(xy, [v for v in vals if v is not None]):
            parts.append(f"<circle cx='{a:.1f}' cy='{b:.1f}' r='3.5' fill='{col}'><title>{e(label)}: "
                         f"{v:.3g}</title></circle>")
        ly = top + 12 + 14 * n
        parts.append(f"<line x1='{left + pw + 10}' x2='{left + pw + 26}' y1='{ly - 4}' y2='{ly - 4}' "
                     f"stroke='{col}' stroke-width='2'{dash}/><text x='{left + pw + 30}' y='{ly}' "
                     f"font-size='10'>{e(label)}</text>")
    parts.append("</svg>")
    return "".join(parts)


# -- priors held by a PACS (read-only C-FIND, engine.interop.network) ------------------------------
def remote_priors(matches: Iterable[Any], local_study_uids: set[str], current: StudyRecord) -> list[Any]:
    """Study-level matches (``StudyMatch``) of the current patient that are earlier than ``current``
    and not opened here, newest first; the same study from two peers is listed once."""
    cur = study_datetime(current.study_date, current.study_time)
    seen: dict[str, Any] = {}
    for m in matches:
        when = study_datetime(m.study_date, m.study_time)
        if m.study_uid in local_study_uids or m.study_uid in seen or when is None:
            continue
        if m.patient_id != current.patient_id or (cur is not None and when >= cur):
            continue
        seen[m.study_uid] = m
    return sorted(seen.values(), key=lambda m: study_datetime(m.study_date, m.study_time), reverse=True)


def query_pacs_priors(settings: Any, current: StudyRecord, local_study_uids: set[str],
                      cancel: Any = None) -> tuple[list[tuple[str, Any]], list[str]]:
    """C-FIND every configured peer for the current patient's studies (STUDY level, Patient ID
    match, PS3.4 C.6.2); returns ([(peer name, StudyMatch)] earlier and not opened here, newest
    first, [problems]). Read-only: nothing is retrieved. Blocking network I/O: worker threads."""
    from engine.interop.network import NetworkError, StudyQuery, find_studies

    found: list[tuple[str, Any]] = []
    problems: list[str] = []
    taken: set[str] = set(local_study_uids)
    for peer in getattr(settings, "peers", []) or []:
        try:
            matches = find_studies(settings, peer, StudyQuery(patient_id=current.patient_id), cancel)
        except (NetworkError, OSError, ValueError) as exc:
            problems.append(f"{peer.name}: {exc}")
            continue
        for m in remote_priors(matches, taken, current):
            taken.add(m.study_uid)
            found.append((peer.name, m))
    found.sort(key=lambda pm: study_datetime(pm[1].study_date, pm[1].study_time), reverse=True)
    return found, problems
