"""COVID-19 pneumonia severity from the X-ray model's "Lung Opacity" logit (Cohen et al. 2020).

Cohen JP et al., "Predicting COVID-19 Pneumonia Severity on Chest X-ray With Deep Learning",
Cureus 12(7): e9448 (2020). A linear regression from the raw (pre-sigmoid) "Lung Opacity" output
of torchxrayvision's DenseNet-121 to the mean of 3 expert raters on 94 images: geographic extent
(0-8) and opacity (0-6). Reported MAE 1.14 (extent) and 0.78 (opacity); Pearson r 0.81 (extent).
The constants below are theirs, copied exactly (DESIGN.md section 4).
"""
from __future__ import annotations

from dataclasses import dataclass

GEO_SLOPE = 0.8705248236656189
GEO_INTERCEPT = 3.4137437
GEO_MAX = 8.0
OPACITY_SLOPE = 0.5484423041343689
OPACITY_INTERCEPT = 2.5535977
OPACITY_MAX = 6.0

REFERENCE = ("Cohen JP, Dao L, Roth K, et al. Predicting COVID-19 Pneumonia Severity on Chest X-ray "
             "With Deep Learning. Cureus. 2020;12(7):e9448. doi:10.7759/cureus.9448")


def _clamp(v: float, lo: float, hi: float) -> float:
    return float(min(max(v, lo), hi))


def geographic_extent_linear(z):
    """Unclamped extent; use this (not the clamped score) as the Grad-CAM target: clamp kills gradients.

    Works on floats and on torch tensors alike.
    """
    return GEO_SLOPE * z + GEO_INTERCEPT


def opacity_linear(z):
    """Unclamped opacity score (floats or tensors)."""
    return OPACITY_SLOPE * z + OPACITY_INTERCEPT


def geographic_extent(z: float) -> float:
    """Geographic extent score, 0-8 (sum over both lungs of 0-4 involvement)."""
    return _clamp(geographic_extent_linear(float(z)), 0.0, GEO_MAX)


def opacity(z: float) -> float:
    """Opacity score, 0-6 (sum over both lungs of 0-3 opacity degree)."""
    return _clamp(opacity_linear(float(z)), 0.0, OPACITY_MAX)


@dataclass(frozen=True)
class SeverityScores:
    """Plain numbers before they are labelled with a model (engine.results.Severity)."""

    geographic_extent: float
    opacity: float
    lung_opacity_logit: float


def severity_from_logit(z: float) -> SeverityScores:
    return SeverityScores(geographic_extent(z), opacity(z), float(z))


def to_result(z: float, model_name: str, model_version: str):
    """The engine.results.Severity for a logit and the model that produced it."""
    from engine.results import Severity

    s = severity_from_logit(z)
    return Severity(geographic_extent=s.geographic_extent, opacity=s.opacity,
                    lung_opacity_logit=s.lung_opacity_logit, model_name=model_name,
                    model_version=model_version)
