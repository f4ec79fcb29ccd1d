"""Validity gate run before any score is shown (DESIGN.md section 4).

Three kinds of checks, each recorded in ``Validity.checks`` with a reason a user can act on:
header (Modality PS3.3 C.7.3.1, Body Part Examined C.7.3.1, View Position C.8.11.5 for DX/CR),
pixel sanity (not blank, big enough, not saturated), and the model's out-of-distribution score
(engine.models.ood). A failed gate greys the scores out; an untrained model has no calibrated
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
