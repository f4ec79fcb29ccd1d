"""Study verdict for chest CT: the slice classifier's study probability checked against the HU burden.

The slice classifier was trained on 8-bit figure slices from papers (engine.training.train, COVID-CT); on
real scanner data its score alone is not specific (the v1 model called a 2007 lung-cancer CT
COVID-19 positive at 0.77). HU quantification (engine.ai.ct_quant) means the same on every scanner
(DESIGN.md section 4), so a COVID-19 flag additionally requires that the lungs actually hold a
non-negligible volume of ground glass or consolidation:

* **volume with quantification**: flag = classifier probability >= threshold AND
  ``total_opacity_percent`` >= ``MIN_OPACITY_PERCENT``;
* **no volume** (a single slice, too few slices, quantification refused, no lungs): never a flag.
  A single slice keeps its classifier score, labelled "slice classifier only, no volume";
* an untrained model or a failed validity gate never flags.

``MIN_OPACITY_PERCENT`` = 1% of the lung volume, from the CT severity score (Pan et al., Radiology
2020;295:715; Chung et al., Radiology 2020;295:202): a lobe is about a fifth of the lung volume
and a lobe score of 1 means < 5% of that lobe involved, so 1% of the total lung volume is the
involvement of one lobe at the score-1/score-2 boundary. Less than that is trace involvement that
vessels, partial volume and dependent density in normal lungs can produce with HU bands, and
is below what a radiologist would call a COVID-19 pneumonia pattern. It was fixed from this argument
and checked on the demo phantom (engine.demo.phantom.phantom_truth: its GGO + consolidation lesions are
1.9% of the lung volume, so they clear it), never tuned on the real CT series used as the
specificity check.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MIN_OPACITY_PERCENT = 1.0
BASIS_COMBINED = "slice classifier + HU quantification"
BASIS_SLICE_ONLY = "slice classifier only, no volume"
BASIS_NONE = "no trained classifier"


@dataclass
class CTVerdict:
    """Whether the study is flagged as showing a COVID-19 pattern, and on what grounds."""

    flag: bool
    basis: str                               # one of the BASIS_* strings
    classifier_probability: float | None
    classifier_threshold: float | None
    opacity_percent: float | None            # GGO + consolidation, % of lung volume (engine.ai.ct_quant)
    min_opacity_percent: float = MIN_OPACITY_PERCENT
    reasons: list[str] = field(default_factory=list)


def ct_verdict(probability: float | None, threshold: float | None, quant: Any | None, *,
               is_volume: bool, gate_passed: bool = True, trained: bool = True) -> CTVerdict:
    """Combine the study probability with the quantification (``engine.results.CTQuantification`` or None).

    ``is_volume``: the series was analysed as a volume (enough slices for quantification);
    False for single slices.
    """
    opacity = _opacity(quant)
    v = CTVerdict(False, BASIS_COMBINED if is_volume else BASIS_SLICE_ONLY, probability, threshold, opacity)
    if not trained or threshold is None:
        v.basis = BASIS_NONE
        v.reasons.append("No trained CT classifier: no COVID-19 verdict.")
        return v
    if probability is None:
        v.reasons.append("No slice was scored (no lungs found in this series): no COVID-19 verdict.")
        return v
    above = probability >= threshold
    if not is_volume:
        v.reasons.append("A single slice is not a volume: the HU burden cannot be measured, so the classifier "
                         "score is shown but never flagged. Open the full axial series for a verdict.")
        return v
    if opacity is None:
        v.reasons.append("The HU quantification did not run on this series (too few slices or no lungs): "
                         "no COVID-19 flag without a measured opacity burden.")
        return v
    if not gate_passed:
        v.reasons.append("The validity gate failed: no flag.")
        return v
    if not above:
        v.reasons.append(f"Classifier probability {probability:.2f} is below its threshold {threshold:.2f}.")
        return v
    if opacity < MIN_OPACITY_PERCENT:
        v.reasons.append(f"Classifier probability {probability:.2f} is above its threshold, but ground glass + "
                         f"consolidation is only {opacity:.2f}% of the lung volume (< {MIN_OPACITY_PERCENT:g}%): "
                         "no pneumonia burden, no flag.")
        return v
    v.flag = True
    v.reasons.append(f"Classifier probability {probability:.2f} >= {threshold:.2f} and ground glass + "
                     f"consolidation {opacity:.2f}% of the lung volume (>= {MIN_OPACITY_PERCENT:g}%).")
    return v


def _opacity(quant: Any | None) -> float | None:
    """``total_opacity_percent`` of a quantification with lungs, else None."""
    if quant is None:
        return None
    vol = getattr(quant, "lung_volume_ml", None)
    if vol is not None and float(vol) <= 0.0:
        return None
    val = getattr(quant, "total_opacity_percent", None)
    return None if val is None else float(val)
