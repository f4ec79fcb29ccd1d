"""What the viewer shows about a series, read from the header of its first instance.

``SeriesMeta`` is plain data (no pydicom, no Qt): the sandboxed decoder builds it in its own process
(engine.dicom.safe_decode.bounded_series_meta), so the viewer shows its first image without
importing pydicom. Dates and person names are formatted for display (PS3.5 6.2: DA, PN).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SeriesMeta:
    """Header facts the annotations need (read once per series from the first instance)."""

    patient_name: str = ""
    patient_id: str = ""
    patient_sex: str = ""
    patient_age: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    institution: str = ""
    modality: str = ""
    series_number: str = ""
    series_description: str = ""
    slice_thickness: float | None = None
    kvp: str = ""
    row_dir: tuple[float, float, float] | None = None   # patient-space direction of increasing column
    col_dir: tuple[float, float, float] | None = None   # patient-space direction of increasing row
    patient_orientation: tuple[str, str] | None = None  # (0020,0020) for projection images
    series_uid: str = ""
    frame_of_reference_uid: str = ""        # (0020,0052): viewports link by patient position within one
    frame_time_ms: float | None = None      # (0018,1063) Frame Time, or the mean Frame Time Vector
    cine_rate: float | None = None          # (0008,2144) Recommended Display Frame Rate / (0018,0040)
    pixel_padding: tuple[float, float | None] | None = None   # (0028,0120) and (0028,0121), stored units
    extra: dict = field(default_factory=dict)


def format_date(d: str) -> str:
    d = (d or "").strip()
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else d


def format_person_name(n: str) -> str:
    """PN 'Family^Given^Middle^Prefix^Suffix' -> 'FAMILY, Given Middle' (PS3.5 6.2.1). Only the
    first (alphabetic) of the '='-separated component groups is shown."""
    text = str(n or "").split("=")[0]
    parts = [p.strip() for p in text.split("^")]
    if not parts or not parts[0]:
        rest = " ".join(p for p in parts[1:3] if p)
        return rest or text
    rest = " ".join(p for p in parts[1:3] if p)
    return f"{parts[0].upper()}, {rest}" if rest else parts[0].upper()


def display_text(value: object) -> str:
    """A header string for display: '^'-separated components (PN-style, used by some vendors in LO
    values such as Study Description 'Thorax^AThoraxRoutine': body region ^ protocol) shown as
    'Thorax · AThoraxRoutine', empty components dropped, multi-values joined with ' / '."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return " / ".join(t for t in (display_text(v) for v in value) if t)
    text = str(value).strip()
    if "^" not in text:
        return text
    return " · ".join(p.strip() for p in text.split("^") if p.strip())


def _frame_time_ms(ds) -> float | None:
    """Frame Time (0018,1063) in ms, else the mean of the non-zero Frame Time Vector (0018,1065)
    entries (its first entry is 0 by definition, PS3.3 C.7.6.5.1.2)."""
    try:
        ft = getattr(ds, "FrameTime", None)
        if ft not in (None, "") and float(ft) > 0:
            return float(ft)
        vec = getattr(ds, "FrameTimeVector", None)
        if vec not in (None, ""):
            seq = list(vec) if isinstance(vec, (list, tuple)) or type(vec).__name__ == "MultiValue" else [vec]
            vals = [float(v) for v in seq if float(v) > 0]
            if vals:
                return float(sum(vals) / len(vals))
    except (TypeError, ValueError):
        pass
    return None


def _cine_rate(ds) -> float | None:
    for kw in ("RecommendedDisplayFrameRate", "CineRate"):
        try:
            v = getattr(ds, kw, None)
            if v not in (None, "") and float(v) > 0:
                return float(v)
        except (TypeError, ValueError):
            continue
    return None


def _padding(ds) -> tuple[float, float | None] | None:
    try:
        v = getattr(ds, "PixelPaddingValue", None)
        if v in (None, ""):
            return None
        lim = getattr(ds, "PixelPaddingRangeLimit", None)
        return float(v), (float(lim) if lim not in (None, "") else None)
    except (TypeError, ValueError):
        return None


def meta_from_dataset(ds) -> SeriesMeta:
    """Build SeriesMeta from a pydicom Dataset (missing tags become empty strings)."""
    def g(kw, default=""):
        v = getattr(ds, kw, default)
        return default if v is None else v

    m = SeriesMeta(
        patient_name=format_person_name(str(g("PatientName"))), patient_id=str(g("PatientID")),
        patient_sex=str(g("PatientSex")), patient_age=str(g("PatientAge")),
        study_date=format_date(str(g("StudyDate"))), study_time=str(g("StudyTime"))[:6],
        study_description=display_text(g("StudyDescription")), institution=display_text(g("InstitutionName")),
        modality=str(g("Modality")), series_number=str(g("SeriesNumber")),
        series_description=display_text(g("SeriesDescription")), kvp=str(g("KVP")),
        series_uid=str(g("SeriesInstanceUID")), frame_of_reference_uid=str(g("FrameOfReferenceUID")), frame_time_ms=_frame_time_ms(ds), cine_rate=_cine_rate(ds),
        pixel_padding=_padding(ds),
    )
    try:
        st = g("SliceThickness", None)
        m.slice_thickness = float(st) if st not in (None, "") else None
    except (TypeError, ValueError):
        m.slice_thickness = None
    iop = g("ImageOrientationPatient", None)
    try:
        if iop is not None and len(iop) == 6:
            m.row_dir = tuple(float(x) for x in iop[:3])  # type: ignore[assignment]
            m.col_dir = tuple(float(x) for x in iop[3:])  # type: ignore[assignment]
    except (TypeError, ValueError):
        pass
    po = g("PatientOrientation", None)
    try:
        if po is not None and len(po) == 2 and all(str(x) for x in po):
            m.patient_orientation = (str(po[0]), str(po[1]))
    except TypeError:
        pass
    return m
