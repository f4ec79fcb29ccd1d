"""Validity gate run before any score is shown (DESIGN.md section 4).

Three kinds of checks, each recorded in ``Validity.checks`` with a reason a user can act on:
header (Modality PS3.3 C.7.3.1, Body Part Examined C.7.3.1, View Position C.8.11.5 for DX/CR),
pixel sanity (not blank, big enough, not saturated), and the model's out-of-distribution score
(engine.ai.models.ood). A failed gate greys the scores out; an untrained model has no calibrated
OOD check, which is said in the reasons.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.results import Validity

XRAY_MODALITIES = {"CR", "DX", "DR"}
CT_MODALITIES = {"CT"}
# PS3.16 CID 4031 "Common Anatomic Regions" values that contain the lungs (plus common free text).
CHEST_BODY_PARTS = {"", "CHEST", "THORAX", "LUNG", "LUNGS", "CHESTABDOMEN", "CHESTABDPELVIS", "CHEST_ABDOMEN",
                    "CHEST ABDOMEN", "THORAX ABDOMEN", "TORSO", "WHOLEBODY", "WHOLE BODY", "BREAST_CHEST",
                    "PORT CHEST", "CHEST PA", "CHEST AP", "PECHO", "TORAX", "THORAX_ABDOMEN"}
FRONTAL_VIEWS = {"", "PA", "AP", "AP SUPINE", "AP_SUPINE", "APS", "PA ERECT", "AP ERECT", "FRONTAL"}
MIN_SIDE_PX = 64


@dataclass
class GateBuilder:
    """Accumulates checks; ``build()`` gives the Validity. Informational notes do not fail the gate."""

    checks: dict[str, bool] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ood_score: float | None = None
    ood_threshold: float | None = None

    def check(self, name: str, ok: bool, reason_if_failed: str) -> bool:
        self.checks[name] = bool(ok)
        if not ok:
            self.reasons.append(reason_if_failed)
        return bool(ok)

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def passed(self) -> bool:
        return all(self.checks.values())

    def build(self) -> Validity:
        return Validity(passed=self.passed, reasons=self.reasons + self.notes, ood_score=self.ood_score,
                        ood_threshold=self.ood_threshold, checks=dict(self.checks))


def header_checks(gate: GateBuilder, kind: str, modality: str, body_part: str = "", view_position: str = "") -> None:
    """Modality / body part / view from the header (values compared case-insensitively, stripped)."""
    mod = (modality or "").strip().upper()
    bp = (body_part or "").strip().upper()
    vp = (view_position or "").strip().upper()
    allowed = XRAY_MODALITIES if kind == "xray" else CT_MODALITIES
    gate.check("modality", mod in allowed,
               f"Modality is {mod or '(empty)'}; this model reads {'/'.join(sorted(allowed))} images only.")
    gate.check("body_part", bp in CHEST_BODY_PARTS or "CHEST" in bp or "THORA" in bp or "LUNG" in bp,
               f"Body Part Examined is {bp}, not chest: the model was trained on chest images only, so its "
               "scores would be meaningless here.")
    if kind == "xray":
        frontal = vp in FRONTAL_VIEWS or vp.startswith(("PA", "AP"))
        gate.check("view", frontal,
                   f"View Position is {vp}: the model reads frontal (PA/AP) chest radiographs only; "
                   "open the frontal image of this study instead.")


def pixel_checks_2d(gate: GateBuilder, gray01: np.ndarray) -> None:
    """Sanity of the displayed image the model will see: size, not blank, not mostly saturated."""
    rows, cols = gray01.shape[:2]
    gate.check("pixel_size", min(rows, cols) >= MIN_SIDE_PX and max(rows, cols) <= 8 * min(rows, cols),
               f"Image is {rows}x{cols} pixels: too small or too elongated for a chest radiograph "
               f"(need at least {MIN_SIDE_PX} px a side).")
    sub = gray01[:: max(1, rows // 256), :: max(1, cols // 256)].astype(np.float32)
    gate.check("pixel_not_constant", float(sub.std()) > 1e-3,
               "Image is blank (all pixels nearly the same value); check the window or the file.")
    saturated = float(np.mean((sub <= 0.002) | (sub >= 0.998)))
    gate.check("pixel_not_saturated", saturated < 0.8,
               f"{saturated:.0%} of the image is pure black or white: the default window clips it, so the "
               "model would see almost no anatomy. Check the VOI window / Rescale tags.")


def volume_checks(gate: GateBuilder, hu: np.ndarray, direction: tuple[float, ...] | None) -> None:
    """CT volume sanity: in-plane size, HU range containing air and soft tissue, axial orientation."""
    z, rows, cols = hu.shape
    gate.check("pixel_size", min(rows, cols) >= MIN_SIDE_PX,
               f"CT slices are {rows}x{cols} pixels; need at least {MIN_SIDE_PX} px a side.")
    sub = hu[:: max(1, z // 16), :: 4, :: 4]
    lo, hi = float(np.min(sub)), float(np.max(sub))
    gate.check("hu_range", lo < -500 and hi > -100,
               f"CT values span {lo:.0f}..{hi:.0f} HU: no air/soft tissue contrast (missing Rescale "
               "Slope/Intercept, or not a CT of a body).")
    if direction is not None and len(direction) == 9:
        normal = np.asarray(direction[6:9], dtype=float)
        axial = abs(normal[2]) / max(np.linalg.norm(normal), 1e-9) > 0.8
        gate.check("axial", axial, "The CT series is not axial (Image Orientation Patient); the model reads "
                   "axial slices only: use the axial reconstruction of this study.")


def ood_check(gate: GateBuilder, score: float | None, threshold: float | None, trained: bool) -> None:
    """Record the OOD verdict, or say plainly why there is none."""
    if not trained:
        gate.note("No out-of-distribution check: the model is untrained (no evaluated model card), "
                  "so no findings are shown.")
        return
    if score is None or threshold is None:
        gate.note("No out-of-distribution check: the model card has no calibrated OOD statistics.")
        return
    gate.ood_score, gate.ood_threshold = float(score), float(threshold)
    gate.check("ood", score <= threshold,
               f"Image looks unlike the training images (out-of-distribution score {score:.2f} > "
               f"threshold {threshold:.2f}); scores are unreliable for it.")


# ------------------------------------------------------------------------------------------------
# CT series gate: what may be quantified as a chest CT volume (engine.ai.ct_quant)
# ------------------------------------------------------------------------------------------------
CT_IMAGE_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
# Projection radiography storage classes (PS3.4 B.5): CR, DX (presentation/processing), digital X-ray
PROJECTION_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
                          "1.2.840.10008.5.1.4.1.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.2",
                          "1.2.840.10008.5.1.4.1.1.1.2.1", "1.2.840.10008.5.1.4.1.1.1.3",
                          "1.2.840.10008.5.1.4.1.1.1.3.1", "1.2.840.10008.5.1.4.1.1.12.1",
                          "1.2.840.10008.5.1.4.1.1.12.2"}
PHANTOM_MANUFACTURER = "ChestView synthetic phantom"     # engine.demo.phantom.write_phantom_series
MIN_VOLUME_SLICES = 10


@dataclass
class CTSeriesFacts:
    """What the CT gate learnt about a series: analyse as a volume, or slice by slice only."""

    quantify: bool               # >= MIN_VOLUME_SLICES contiguous axial slices and nothing refused
    is_phantom: bool
    contiguous_slices: int


def _ct_header(vol, series) -> object | None:
    """First source header of the series (for ImageType, SOP Class, Manufacturer), or None."""
    from engine.dicom.pixels import read_header

    paths = list(getattr(vol, "instance_paths", None) or [])
    if not paths and series is not None and getattr(series, "instances", None):
        paths = [series.instances[0].path]
    if not paths:
        return None
    try:
        return read_header(paths[0])
    except Exception:  # noqa: BLE001 - a header we cannot re-read leaves the checks to the pixels
        return None


def ct_series_checks(gate: GateBuilder, vol, series=None) -> CTSeriesFacts:
    """Refuse projection images and scouts fed as CT; decide volume vs slice-only analysis.

    ImageType value 3 LOCALIZER marks a scout (PS3.3 C.8.2.1.1.1); CR/DX SOP classes are
    radiographs, not CT slices. Quantification needs at least MIN_VOLUME_SLICES contiguous slices
    (engine.ai.ct_quant.longest_contiguous_run); fewer are scored by the slice classifier only, said
    in the notes. The synthetic phantom is analysed and labelled as the demo.
    """
    from engine.ai.ct_quant import longest_contiguous_run

    ds = _ct_header(vol, series)
    image_type = [str(v).upper() for v in (getattr(ds, "ImageType", None) or [])] if ds is not None else []
    sop = str(getattr(ds, "SOPClassUID", "") or "") if ds is not None else ""
    maker = str(getattr(ds, "Manufacturer", "") or "") if ds is not None else ""
    gate.check("ct_not_projection", sop not in PROJECTION_SOP_CLASSES,
               "This is a projection radiograph (CR/DX storage), not CT slices: open it as a chest X-ray.")
    gate.check("ct_not_localizer", "LOCALIZER" not in image_type,
               "This is a CT scout/localizer (ImageType LOCALIZER), a projection image: open the axial "
               "series of the study instead.")
    n = int(vol.hu.shape[0])
    positions = list(getattr(vol, "positions", None) or [])
    run = longest_contiguous_run(positions) if len(positions) == n and n > 1 else n
    is_phantom = maker == PHANTOM_MANUFACTURER
    if is_phantom:
        gate.note("Synthetic demo phantom (not a patient): analysed to demonstrate the method.")
    quantify = run >= MIN_VOLUME_SLICES and gate.passed
    if run < MIN_VOLUME_SLICES:
        gate.note(f"Only {run} contiguous slice(s): HU quantification needs a volume of at least "
                  f"{MIN_VOLUME_SLICES}; slice classifier only (slice-level scores, no lung/zone numbers).")
    return CTSeriesFacts(quantify=quantify, is_phantom=is_phantom, contiguous_slices=run)


# ------------------------------------------------------------------------------------------------
# X-ray anatomy gate: two plausible lungs, frontal view, adult human (DESIGN.md section 4: a gate
# built on the classifier's own features cannot see what the classifier ignores)
# ------------------------------------------------------------------------------------------------
# Plausible ranges of the lung segmentation (engine.ai.preprocess.xray_lungs) on a frontal adult chest
# radiograph. Calibrated on the train/val reference masks (V7, ieee8023) and on the segmentation of
# the NIH train images, never on test: ``python -m engine.training.evaluate_lungseg gate --data DIR --calibrate``
# prints the percentiles; each limit lies outside the observed range with a margin.
# Measured (min / 0.5th pct | 99.5th pct / max; reference masks n=356, NIH-train segmentation n=120,
# ieee8023-val segmentation n=66): one lung's area 0.045 / 0.066 | 0.317 / 0.330; largest-piece share
# 0.682 (one reference mask) / 0.927 | 1; height/width 1.02 / 1.11 | 2.85 / 2.91; smaller/larger area
# 0.486 / 0.521; centre row difference | 0.266 / 0.273 of the lung height; column overlap | 0.003 / 0.067;
# confidence 0.913 / 0.924 |; grey contrast -0.028 / 0.015 |. Refused inputs for contrast: the dog
# DX and the tibia segment with confidence 0.87 and 0.86; a horizontally stretched half chest with
# column overlap 0.23.
LUNG_AREA_RANGE = (0.03, 0.42)       # one lung, fraction of the image
LUNGS_AREA_MIN = 0.08                # both lungs, fraction of the image
LUNG_DOMINANT_MIN = 0.75             # largest piece / all of one lung's pixels
LUNG_HW_RANGE = (0.8, 3.6)           # one lung's height / width
LUNG_AREA_RATIO_MIN = 0.30           # smaller lung / larger lung
LUNG_CENTRE_DY_MAX = 0.40            # |centre row difference| / mean lung height
LUNG_X_OVERLAP_MAX = 0.15            # overlap of the two lungs' column ranges / narrower lung width
SEG_CONFIDENCE_MIN = 0.89            # mean max-class probability over the lung pixels
LUNG_CONTRAST_MIN = -0.04            # median grey around the lungs minus median grey inside them
# Adult lungs side by side are wider than this (the adult thorax on a PA radiograph is typically
# 25-30 cm wide); Imager Pixel Spacing includes the ~1.1 geometric magnification, which only makes
# the limit more lenient. Used for a note only (see anatomy_checks).
ADULT_LUNGS_WIDTH_MIN_MM = 170.0
ADULT_AGE_MIN_YEARS = 16.0
HUMAN_SPECIES = ("HOMO SAPIENS", "HUMAN", "337915000")   # SNOMED CT 337915000 = Homo sapiens
VETERINARY_WORDS = {"CANINE", "FELINE", "EQUINE", "BOVINE", "PORCINE", "OVINE", "CAPRINE", "AVIAN", "DOG",
                    "CAT", "HORSE", "VETERINARY", "VET", "K9", "LEPORINE", "MURINE", "RODENT"}
LATERAL_WORDS = {"LATERAL", "LAT", "LL", "RL", "LLD", "RLD"}
LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "LLD", "RLD", "XTABLE", "CROSS-TABLE LATERAL"}


@dataclass(frozen=True)
class AnatomyHeader:
    """Header facts for the anatomy gate (all optional: JPEGs and sparse headers have none)."""

    species: str = ""                      # Patient Species Description (0010,2201), PS3.3 C.7.1.1
    species_code: str = ""                 # Patient Species Code Sequence (0010,2202): value + meaning
    breed: str = ""                        # Patient Breed Description (0010,2292)
    age_years: float | None = None         # Patient's Age (0010,1010), AS value representation (PS3.5)
    view_position: str = ""                # View Position (0018,5101), PS3.3 C.8.11.5
    patient_orientation: tuple[str, ...] = ()   # Patient Orientation (0020,0020), PS3.3 C.7.6.1.1.1
    descriptions: str = ""                 # Acquisition Device Processing Description (0018,1400),
                                           # Protocol Name, Series Description: free text, upper case
    pixel_spacing_mm: tuple[float, float] | None = None   # (row, col) spacing at the detector


def _age_years(value: str) -> float | None:
    """AS value 'nnnD|W|M|Y' (PS3.5 table 6.2-1) -> years; None when absent or malformed."""
    v = (value or "").strip().upper()
    if len(v) != 4 or not v[:3].isdigit() or v[3] not in "DWMY":
        return None
    return int(v[:3]) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[v[3]]


def read_anatomy_header(path: str, pixel_spacing: tuple[float, float] | None = None) -> AnatomyHeader:
    """Read the few header elements the anatomy gate uses (no pixel data). Unreadable -> empty facts:
    the file was already decoded through the sandbox, so the image checks still run."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # pydicom raises many types on damaged headers (DESIGN.md section 5)
        return AnatomyHeader(pixel_spacing_mm=pixel_spacing)
    code = ""
    for item in getattr(ds, "PatientSpeciesCodeSequence", None) or []:
        code += f" {getattr(item, 'CodeValue', '')} {getattr(item, 'CodeMeaning', '')}"
    orient = getattr(ds, "PatientOrientation", None) or []
    orient = (orient,) if isinstance(orient, str) else tuple(str(v) for v in orient)
    texts = [str(getattr(ds, k, "") or "") for k in ("AcquisitionDeviceProcessingDescription", "ProtocolName",
                                                     "SeriesDescription")]
    return AnatomyHeader(species=str(getattr(ds, "PatientSpeciesDescription", "") or "").strip().upper(),
                         species_code=code.strip().upper(),
                         breed=str(getattr(ds, "PatientBreedDescription", "") or "").strip().upper(),
                         age_years=_age_years(str(getattr(ds, "PatientAge", "") or "")),
                         view_position=str(getattr(ds, "ViewPosition", "") or "").strip().upper(),
                         patient_orientation=orient, descriptions=" ".join(texts).upper(),
                         pixel_spacing_mm=pixel_spacing)


def _words(text: str) -> set[str]:
    import re

    return set(re.split(r"[^A-Z0-9]+", text.upper())) - {""}


def header_anatomy_checks(gate: GateBuilder, header: AnatomyHeader) -> None:
    """Species, age and projection from the header. Only stated facts refuse; absence passes."""
    species = f"{header.species} {header.species_code}".strip()
    human = not species or any(h in species for h in HUMAN_SPECIES)
    vet_words = sorted(_words(header.descriptions) & VETERINARY_WORDS)
    animal = (f"Patient Species {species}" if not human else f"Patient Breed {header.breed}" if header.breed
              else f"'{vet_words[0].lower()}' in the acquisition/protocol description" if vet_words else "")
    gate.check("species_human", not animal,
               f"The header describes an animal, not a person ({animal}): ChestView's X-ray models were "
               "trained on human chest radiographs only.")
    if header.age_years is not None:
        gate.check("adult", header.age_years >= ADULT_AGE_MIN_YEARS,
                   f"Patient's Age (0010,1010) is under {ADULT_AGE_MIN_YEARS:.0f} years: the models were "
                   "trained on adult chest radiographs and are not valid for children.")
    vp = header.view_position
    lateral_text = sorted(_words(header.descriptions) & LATERAL_WORDS)
    row_dir = header.patient_orientation[0][:1].upper() if header.patient_orientation else ""
    why = (f"View Position is {vp}" if vp in LATERAL_VIEWS else
           f"the acquisition/protocol description says '{lateral_text[0].lower()}'" if lateral_text else
           f"Patient Orientation (0020,0020) rows run {row_dir} (front-back)" if row_dir in ("A", "P") else "")
    lateral = bool(why)
    gate.check("frontal_projection", not lateral,
               f"This is a lateral radiograph ({why}): the models read frontal (PA/AP) chest radiographs "
               "only; open the frontal image of this study instead.")


def lung_features(lungs, gray01: np.ndarray | None = None) -> dict[str, float]:
    """Scalar descriptors of a lung segmentation (engine.ai.preprocess.xray_lungs.XrayLungs) used by the
    anatomy gate and its calibration; NaN where a lung is missing."""
    r, l = lungs.right, lungs.left
    nan = float("nan")
    f: dict[str, float] = {"area_right": r.area_fraction, "area_left": l.area_fraction,
                           "area_both": r.area_fraction + l.area_fraction,
                           "dominant_right": r.dominant_fraction, "dominant_left": l.dominant_fraction,
                           "confidence": float(lungs.confidence)}
    both = r.bbox is not None and l.bbox is not None
    f["hw_right"] = r.height / max(r.width, 1) if r.bbox else nan
    f["hw_left"] = l.height / max(l.width, 1) if l.bbox else nan
    f["area_ratio"] = min(r.area_px, l.area_px) / max(r.area_px, l.area_px) if both else nan
    if both:
        h = (r.height + l.height) / 2.0
        f["centre_dy"] = abs(r.centroid[0] - l.centroid[0]) / max(h, 1.0)
        f["x_order"] = (l.centroid[1] - r.centroid[1]) / lungs.shape[1]
        ov = min(r.bbox[3], l.bbox[3]) - max(r.bbox[1], l.bbox[1])
        f["x_overlap"] = max(0, ov) / max(1, min(r.width, l.width))
        f["width_px"] = float(max(r.bbox[3], l.bbox[3]) - min(r.bbox[1], l.bbox[1]))
    else:
        f.update(centre_dy=nan, x_order=nan, x_overlap=nan, width_px=nan)
    f["contrast"] = _lung_contrast(lungs, gray01) if gray01 is not None and both else nan
    return f


def _lung_contrast(lungs, gray01: np.ndarray) -> float:
    """Median grey of the non-lung pixels inside the lungs' box (mediastinum, ribs, diaphragm) minus the
    median inside the lungs: positive on a correctly displayed radiograph (air is dark), negative on a
    negative image (wrong MONOCHROME1/2 or Presentation LUT Shape, PS3.3 C.7.6.3.1.2 / C.11.6)."""
    t, le, b, ri = lungs.lung_bbox()
    m = lungs.mask[t:b, le:ri]
    g = np.asarray(gray01, dtype=np.float32)[t:b, le:ri]
    step = max(1, int(np.sqrt(m.size / 250_000)))
    m, g = m[::step, ::step], g[::step, ::step]
    if m.all() or not m.any():
        return float("nan")
    return float(np.median(g[~m]) - np.median(g[m]))


def anatomy_checks(gate: GateBuilder, lungs, gray01: np.ndarray | None = None,
                   header: AnatomyHeader | None = None) -> dict[str, float]:
    """Refuse radiographs that are not frontal adult human chests, from the header and from the lung
    segmentation. Returns the measured features (for the result's notes and for calibration)."""
    if header is not None:
        header_anatomy_checks(gate, header)
    f = lung_features(lungs, gray01)
    r, l = lungs.right, lungs.left
    found = [s for s in (r, l) if s.area_fraction >= LUNG_AREA_RANGE[0]]
    if len(found) < 2:
        area = r.area_fraction + l.area_fraction
        what = ("no lung-like region" if area < 0.005 else
                f"one lung-like region covering {area:.0%} of the image" if found else
                f"only small lung-like regions covering {area:.0%} of the image")
        gate.check("two_lungs", False,
                   f"No two lungs found: the segmentation found {what} — is this a frontal chest "
                   "radiograph? Scores are not shown for images without two recognisable lungs.")
        return f
    gate.check("two_lungs", True, "")
    sizes_ok = all(LUNG_AREA_RANGE[0] <= s.area_fraction <= LUNG_AREA_RANGE[1] for s in (r, l)) \
        and f["area_both"] >= LUNGS_AREA_MIN and f["area_ratio"] >= LUNG_AREA_RATIO_MIN
    gate.check("lung_size", sizes_ok,
               f"Implausible lung sizes: right lung {r.area_fraction:.0%}, left lung {l.area_fraction:.0%} of "
               f"the image (expected {LUNG_AREA_RANGE[0]:.0%}-{LUNG_AREA_RANGE[1]:.0%} each, neither less than "
               f"{LUNG_AREA_RATIO_MIN:.0%} of the other). Is the whole chest on the image?")
    pieces = [s for s in (r, l) if s.dominant_fraction < LUNG_DOMINANT_MIN]
    gate.check("lung_single_region", not pieces,
               "The " + " and ".join(f"{s.side} lung" for s in pieces) + " falls apart into several separate "
               "regions: no coherent lung field was found — is this a chest radiograph?")
    placed = f["x_order"] > 0 and f["centre_dy"] <= LUNG_CENTRE_DY_MAX and f["x_overlap"] <= LUNG_X_OVERLAP_MAX
    gate.check("lungs_side_by_side", placed,
               "The two lung fields are not side by side at similar heights (centres "
               f"{f['centre_dy']:.0%} of the lung height apart vertically, column ranges overlapping "
               f"{f['x_overlap']:.0%}): this is not a frontal chest view (lateral or rotated image?).")
    shape_bad = [s.side for s in (r, l) if not LUNG_HW_RANGE[0] <= s.height / max(s.width, 1) <= LUNG_HW_RANGE[1]]
    gate.check("lung_shape", not shape_bad,
               "Implausible lung shape: the " + " and ".join(f"{sd} lung" for sd in shape_bad) + " is "
               f"not {LUNG_HW_RANGE[0]:g}-{LUNG_HW_RANGE[1]:g} times as tall as wide, as lungs are on a "
               "frontal chest radiograph.")
    gate.check("segmentation_confidence", f["confidence"] >= SEG_CONFIDENCE_MIN,
               f"The lung segmentation is unsure of the lung borders (mean confidence {f['confidence']:.2f}, "
               f"needs {SEG_CONFIDENCE_MIN:.2f}): the image may not be a chest radiograph, or be of very "
               "poor quality.")
    if not np.isnan(f["contrast"]):
        gate.check("lungs_dark", f["contrast"] > LUNG_CONTRAST_MIN,
                   "The lung fields are brighter than the mediastinum and chest wall around them: the image "
                   "looks inverted (a negative). Check Photometric Interpretation / Presentation LUT Shape "
                   "or the viewer's invert setting.")
    if header is not None and header.pixel_spacing_mm is not None and not np.isnan(f["width_px"]):
        # A note, not a refusal: pixel spacing is often wrong on resized secondary images (the SIIM
        # CR in shared/data states 0.168 mm on a 1024-pixel downsample, giving 13 cm-wide lungs).
        width_mm = f["width_px"] * float(header.pixel_spacing_mm[1])
        if 1.0 < width_mm < ADULT_LUNGS_WIDTH_MIN_MM:
            gate.note(f"The two lungs measure {width_mm:.0f} mm across by the header's pixel spacing; an adult "
                      f"chest is wider than {ADULT_LUNGS_WIDTH_MIN_MM:.0f} mm. If this is a child or the spacing "
                      "is right, the scores do not apply (the models were trained on adults).")
    return f
