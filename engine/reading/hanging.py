"""Default hanging protocol for chest work: which series goes first, which prior goes beside it.

Pure functions over ``engine.dicom.records`` (headers only; no pixels, no Qt), so the viewer and
tests share one rule set:

- Series of a study are ranked: a frontal chest radiograph (CR/DX, View Position PA or AP,
  PS3.3 C.8.11.5 / C.8.2.1) or an axial CT (Image Orientation (Patient), PS3.3 C.7.6.2.1.1) first;
  among axial CTs a lung reconstruction kernel, then thinner slices, then more images; laterals
  and other images next; derived/secondary reformats (Image Type, PS3.3 C.7.6.1.1.2) and
  localizers (Image Type LOCALIZER, PS3.3 C.8.2.1.1.1) last; objects without pixels never first.
- Priors: studies of the same Patient ID with a series of the same modality group (CR/DX/DR are
  one group: a DX prior of a CR study is a valid comparison) and an earlier Study Date/Time;
  the most recent first. Studies without a Study Date cannot be ordered and are never priors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from engine.dicom.records import IndexResult, PatientRecord, SeriesRecord, StudyRecord

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR"})
FRONTAL_VIEWS = frozenset({"PA", "AP"})
# Body Part Examined values of a chest study (PS3.16 CID 4031 defined terms)
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "CHEST_ABDOMEN", "CHESTABDOMEN", "CHEST_TO_PELVIS"})
# Window (centre, width) a chest CT is hung in: the lung preset of viewer.view.image_view.CT_PRESETS.
LUNG_WINDOW = (-600.0, 1500.0)
# Vendor lung (sharp, high-frequency) kernels: GE LUNG/BONEPLUS, Siemens B60-B80/Bl57-/Br59-/I70,
# Philips L/YA/YB/LUNG, Canon/Toshiba FC50-FC86 and "LUNG"; a description saying "lung" counts too.
_LUNG_KERNEL = re.compile(r"^(LUNG.*|BONEPLUS|B[6-8]\d\w?|BL5[7-9]\w?|BL6\d\w?|BR59\w?|BR6\d\w?|I7\d\w?|"
                          r"L|YA|YB|FC5\d|FC8[0-6])$")
_LOCALIZER_WORDS = re.compile(r"\b(scout|topogram|localizer|localiser|surview|scanogram|pilot|survey)\b", re.I)
_REFORMAT_WORDS = re.compile(r"\b(mpr|mip|minip|reformat\w*|cor(onal)?|sag(ittal)?|3d|vr|volume rendering)\b",
                             re.I)
_LATERAL_WORDS = re.compile(r"\b(lat|lateral)\b", re.I)
_FRONTAL_WORDS = re.compile(r"\b(pa|ap|frontal)\b", re.I)


def _image_type(se: SeriesRecord) -> list[str]:
    return [v.strip().upper() for v in (getattr(se, "image_type", "") or "").split("\\")]


def plane(se: SeriesRecord) -> str:
    """'axial' | 'coronal' | 'sagittal' | 'oblique' | '' from the slice normal (row x column
    direction cosines of Image Orientation (Patient), PS3.3 C.7.6.2.1.1): the patient axis the
    normal is closest to; 'oblique' when none is within about 30 degrees."""
    iop = next((i.image_orientation for i in se.instances if i.image_orientation), None)
    if iop is None or len(iop) != 6:
        return ""
    n = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    norm = float(np.linalg.norm(n))
    if norm < 1e-6:
        return ""
    n = np.abs(n / norm)
    k = int(np.argmax(n))
    if n[k] < 0.85:
        return "oblique"
    return ("sagittal", "coronal", "axial")[k]


def is_localizer(se: SeriesRecord) -> bool:
    """Scout/topogram: Image Type value 3 LOCALIZER (PS3.3 C.8.2.1.1.1) or a description saying so."""
    return "LOCALIZER" in _image_type(se) or bool(_LOCALIZER_WORDS.search(se.series_description or ""))


def is_reformat(se: SeriesRecord) -> bool:
    """A derived or secondary image (Image Type values 1-2, PS3.3 C.7.6.1.1.2: MPR, MIP, 3-D),
    a non-axial CT, or a description naming a reformat."""
    it = _image_type(se)
    if it and (it[0] == "DERIVED" or (len(it) > 1 and it[1] == "SECONDARY")) and \
            se.modality.upper() not in RADIOGRAPH_MODALITIES:
        return True
    if any(v in ("MPR", "REFORMATTED", "PROJECTION IMAGE", "MIP", "VOLUME") for v in it[2:]):
        return True
    if se.modality.upper() == "CT" and plane(se) in ("coronal", "sagittal", "oblique"):
        return True
    return bool(_REFORMAT_WORDS.search(se.series_description or ""))


def is_frontal(se: SeriesRecord) -> bool:
    """Frontal chest radiograph: View Position PA or AP (PS3.3 C.8.11.5); with no View Position,
    a description naming PA/AP/frontal and not lateral."""
    if se.modality.upper() not in RADIOGRAPH_MODALITIES:
        return False
    vp = (se.view_position or "").strip().upper()
    if vp:
        return vp in FRONTAL_VIEWS
    desc = se.series_description or ""
    return bool(_FRONTAL_WORDS.search(desc)) and not _LATERAL_WORDS.search(desc)


def has_lung_kernel(se: SeriesRecord) -> bool:
    kernels = [k.strip().upper() for k in (getattr(se, "convolution_kernel", "") or "").split("\\") if k.strip()]
    if any(_LUNG_KERNEL.match(k) for k in kernels):
        return True
    return bool(re.search(r"\blung\b", se.series_description or "", re.I))


def _slice_thickness(se: SeriesRecord) -> float:
    """Slice Thickness, else the spacing of the image positions along the normal (inf = unknown)."""
    st = getattr(se, "slice_thickness", None)
    if st:
        return float(st)
    pos = [i.image_position for i in se.instances if i.image_position]
    iop = next((i.image_orientation for i in se.instances if i.image_orientation), None)
    if len(pos) < 2 or iop is None or len(iop) != 6:
        return float("inf")
    n = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    d = np.diff(np.sort(np.asarray(pos, float) @ n))
    d = d[d > 1e-3]
    return float(np.median(d)) if d.size else float("inf")


def series_class(se: SeriesRecord) -> int:
    """0 chest target (frontal radiograph / axial CT), 1 other radiograph or CT, 2 other image,
    3 reformat, 4 localizer, 5 no pixels (SR, PR, KO, ...)."""
    if se.rows == 0 and not any(i.rows for i in se.instances):
        return 5
    if is_localizer(se):
        return 4
    mod = se.modality.upper()
    if mod in RADIOGRAPH_MODALITIES:
        return 0 if is_frontal(se) else 1
    if mod == "CT":
        if is_reformat(se):
            return 3
        return 0 if plane(se) in ("axial", "") and se.count > 1 else 1
    if is_reformat(se):
        return 3
    return 2


def series_rank_key(se: SeriesRecord) -> tuple:
    """Sort key, smaller = hung first (see the module docstring for the order)."""
    cls = series_class(se)
    mod = se.modality.upper()
    original = 0 if (_image_type(se) or [""])[0] == "ORIGINAL" else 1
    bp = (se.body_part or "").strip().upper()
    other_region = 1 if bp and bp not in CHEST_BODY_PARTS else 0
    if mod == "CT":
        # among reformats too, the axial one goes first (a coronal abdominal MPR is not a chest read)
        detail = (0 if plane(se) in ("axial", "") else 1, 0 if has_lung_kernel(se) else 1,
                  round(_slice_thickness(se), 2), -se.count)
    elif mod in RADIOGRAPH_MODALITIES:
        detail = (0, 0 if (se.view_position or "").upper() == "PA" else 1, 0.0, 0)
    else:
        detail = (0, 0, 0.0, -se.count)
    sn = se.series_number if se.series_number is not None else 10**9
    return (cls, other_region, *detail, original, sn, se.series_uid)


def rank_series(series: Iterable[SeriesRecord]) -> list[SeriesRecord]:
    """Series in hanging order, best first."""
    return sorted(series, key=series_rank_key)


def primary_series(study: StudyRecord, modality_group: str | None = None) -> SeriesRecord | None:
    """The series to hang first for ``study`` (optionally only from ``modality_group``), or None."""
    cands = [se for se in study.series if modality_group is None or modality_group_of(se.modality) == modality_group]
    cands = [se for se in rank_series(cands) if series_class(se) < 5]
    return cands[0] if cands else None


def modality_group_of(modality: str) -> str:
    """'XR' for CR/DX/DR (one radiograph group), else the modality itself."""
    m = (modality or "").upper()
    return "XR" if m in RADIOGRAPH_MODALITIES else m


def study_datetime_key(study: StudyRecord) -> tuple[str, str]:
    """(YYYYMMDD, HHMMSS.frac) for ordering; Study Time may lack seconds (PS3.5 TM)."""
    return ((study.study_date or "").strip()[:8], (study.study_time or "").strip().ljust(6, "0"))


def _patients(source: IndexResult | Sequence[PatientRecord]) -> list[PatientRecord]:
    return list(source.patients) if isinstance(source, IndexResult) else list(source)


def same_patient_studies(source: IndexResult | Sequence[PatientRecord], patient_id: str) -> list[StudyRecord]:
    """Every study of ``patient_id`` (exact Patient ID match; several PatientRecords may share an
    ID when names differ in spelling), each study once."""
    if not patient_id or patient_id.startswith("(no"):
        return []
    seen: dict[str, StudyRecord] = {}
    for p in _patients(source):
        if p.patient_id == patient_id:
            for st in p.studies:
                seen.setdefault(st.study_uid, st)
    return list(seen.values())


def find_priors(source: IndexResult | Sequence[PatientRecord], study: StudyRecord,
                modality_group: str) -> list[StudyRecord]:
    """Earlier studies of the same patient holding a ``modality_group`` series, most recent first."""
    cur = study_datetime_key(study)
    if not cur[0]:
        return []
    out = []
    for st in same_patient_studies(source, study.patient_id):
        key = study_datetime_key(st)
        if st.study_uid == study.study_uid or not key[0] or key >= cur:
            continue
        if primary_series(st, modality_group) is not None:
            out.append(st)
    return sorted(out, key=study_datetime_key, reverse=True)


@dataclass
class HangingPlan:
    """What to show where: ``series_uids[k]`` goes into viewport k of a rows x cols grid."""

    rows: int = 1
    cols: int = 1
    series_uids: list[str] = field(default_factory=list)
    study_uids: list[str] = field(default_factory=list)
    link_position: bool = False            # CT: scroll linked by anatomical position
    window: tuple[float, float] | None = None   # CT lung window for every viewport
    reason: str = ""                       # one line for the status bar


def default_hanging(source: IndexResult | Sequence[PatientRecord], study: StudyRecord,
                    with_prior: bool = True) -> HangingPlan:
    """The chest hanging of ``study``: its best series first; the most recent prior's best series
    of the same modality group beside it (1x2) when there is one."""
    first = primary_series(study)
    if first is None:
        return HangingPlan(reason="no displayable series in this study")
    group = modality_group_of(first.modality)
    plan = HangingPlan(series_uids=[first.series_uid], study_uids=[study.study_uid])
    if group == "CT" and series_class(first) == 0:
        plan.window = LUNG_WINDOW
    plan.reason = f"{first.modality} {first.series_description or ''}".strip()
    priors = find_priors(source, study, group) if with_prior else []
    if priors:
        prior = priors[0]
        pse = primary_series(prior, group)
        if pse is not None:
            plan.cols = 2
            plan.series_uids.append(pse.series_uid)
            plan.study_uids.append(prior.study_uid)
            plan.link_position = group == "CT"
            plan.reason += f"; prior of {_fmt_date(prior.study_date)} beside it"
    return plan


def _fmt_date(d: str) -> str:
    d = (d or "").strip()
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) >= 8 and d[:8].isdigit() else d


def nearest_position_index(positions: Sequence[float | None], target: float | None) -> int | None:
    """Index of the slice whose position along the normal is nearest ``target`` (mm): CT viewports
    are linked by patient position (Image Position (Patient), PS3.3 C.7.6.2.1.1), not by index.
    None when positions are unknown."""
    if target is None:
        return None
    valid = [(abs(float(p) - float(target)), k) for k, p in enumerate(positions) if p is not None]
    return min(valid)[1] if valid else None
