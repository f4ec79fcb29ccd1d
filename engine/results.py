"""Plain dataclasses the engine returns; the viewer and reports only render them (DESIGN.md 6, napari habit)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

RESEARCH_USE = "Research use only, not for diagnostic use"


@dataclass
class Heatmap:
    """Grad-CAM as data: float32 in [0, 1], shape (rows, cols) of the *displayed* image (or slice)."""

    target: str                  # finding label or "severity"
    array: np.ndarray            # float32 (rows, cols), in displayed-image pixel coordinates
    model_name: str
    model_version: str
    slice_index: int | None = None   # CT: index into the sorted volume (axial), None for X-ray
    hidden_by_default: bool = False  # shown only when asked: its finding is not positive or the gate failed


@dataclass
class Finding:
    label: str
    probability: float           # sigmoid/softmax output in [0, 1]
    threshold: float             # model's operating threshold for this label
    positive: bool               # probability >= threshold and the model is trained and the gate passed
    model_name: str
    model_version: str


@dataclass
class Severity:
    """Radiograph severity: Cohen et al. 2020 geographic extent (0-8) and opacity (0-6), and, from the
    zone scorer (engine.ai.severity_zones), the six Brixia zone scores (0-3; A/B/C right upper/middle/
    lower, D/E/F left; thirds of each lung's height) and their sum (0-18)."""

    geographic_extent: float     # 0-8
    opacity: float               # 0-6
    lung_opacity_logit: float | None
    model_name: str
    model_version: str
    zone_scores: dict[str, float] = field(default_factory=dict)   # "A".."F" -> 0-3
    brixia_global: float | None = None                            # 0-18
    method: str = "cohen-logit"  # "cohen-logit" (Cohen et al. formula) | "zone-ridge" (engine.ai.severity_zones)
    # zone -> (top, left, bottom, right) in displayed-image pixels (bottom/right exclusive), where to draw
    # each zone's score on the image (a Brixia-style grid over the segmented lungs)
    zone_boxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)


@dataclass
class Validity:
    """Validity gate verdict: scores are shown greyed with ``reasons`` when ``passed`` is False."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    ood_score: float | None = None
    ood_threshold: float | None = None
    checks: dict[str, bool] = field(default_factory=dict)


@dataclass
class ModelInfo:
    name: str
    version: str
    trained: bool                # False -> labelled "untrained" everywhere, never shown as a finding
    sha256: str
    intended_use: str = RESEARCH_USE
    label: str = ""              # human label shown in UI/exports, e.g. "ChestView X-ray DenseNet-121 v1.0 (trained)"


@dataclass
class CTSliceScore:
    slice_index: int
    z_mm: float
    probability: float


@dataclass
class CTZoneStats:
    """HU classes of one lung or zone (engine.ai.ct_quant); percentages of the region's lung volume."""

    lung: str                    # "right" | "left" | "both"
    zone: str                    # "upper" | "middle" | "lower" | "whole" (zones are thirds, not lobes)
    volume_ml: float
    emphysema_percent: float     # < -950 HU
    normal_percent: float        # -950 to -700 HU
    ggo_percent: float           # -700 to -300 HU, vessel rims and thin structures excluded
    consolidation_percent: float  # -300 to +50 HU, structures thinner than 10 mm excluded
    excluded_percent: float      # vessels, airway walls, > +50 HU (not an opacity class)
    ggo_ml: float
    consolidation_ml: float
    involved_percent: float      # ggo + consolidation
    z_range_mm: tuple[float, float] = (0.0, 0.0)


@dataclass
class CTSeverityRegion:
    """One of the 5 scored regions of the CT severity score (zones standing in for a lobe)."""

    name: str
    zones: list[str]
    involved_percent: float
    points: int                  # 0-5 (Pan et al. 2020)


@dataclass
class CTQuantification:
    """CT quantification in HU per lung and zone (engine.ai.ct_quant); ``labels`` is the opacity map."""

    method: str
    version: str
    lungs: list[CTZoneStats]                 # right, left
    zones: list[CTZoneStats]                 # right upper/middle/lower, left upper/middle/lower
    total: CTZoneStats
    severity_regions: list[CTSeverityRegion]
    severity_score: int                      # 0-25, an approximation (zones, not lobes)
    severity_note: str
    total_opacity_percent: float             # (GGO + consolidation) / lung volume, both lungs
    ggo_ml: float
    consolidation_ml: float
    lung_volume_ml: float                    # trachea and main bronchi removed
    airway_removed_ml: float = 0.0
    thresholds: dict[str, Any] = field(default_factory=dict)
    grid_spacing_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    warnings: list[str] = field(default_factory=list)
    is_phantom: bool = False
    labels: np.ndarray | None = None         # uint8 (z, ceil(y/f), ceil(x/f)): 0 none, 1 GGO, 2 consolidation
    label_factor: int = 1                    # in-plane block size of ``labels`` on the source grid
    shape: tuple[int, int, int] = (0, 0, 0)  # source volume (z, y, x)
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict without the label array (its shape and block size are kept)."""
        d = asdict(replace(self, labels=None))
        d["labels"] = None if self.labels is None else {"shape": list(self.labels.shape),
                                                        "factor": int(self.label_factor)}
        return d


@dataclass
class StudyResult:
    """What analyze() returns for one series; the single object GUI, batch, report and SR export share."""

    study_uid: str
    series_uid: str
    modality: str                # "CR"/"DX" (X-ray) or "CT"
    kind: str                    # "xray" | "ct" | "unsupported"
    validity: Validity
    findings: list[Finding] = field(default_factory=list)
    severity: Severity | None = None
    heatmaps: list[Heatmap] = field(default_factory=list)
    models: list[ModelInfo] = field(default_factory=list)
    ct_study_probability: float | None = None
    ct_slice_scores: list[CTSliceScore] = field(default_factory=list)
    lung_volume_ml: float | None = None
    ct_quant: CTQuantification | None = None     # HU quantification (engine.ai.ct_quant); None if not run
    ct_verdict: Any = None       # engine.ai.ct_verdict.CTVerdict: COVID-19 flag from classifier + HU burden
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None     # set when analysis failed; other fields may be empty
    warnings: list[str] = field(default_factory=list)
    device: str = "cpu"
    intended_use: str = RESEARCH_USE

    def to_json_dict(self, include_heatmaps: bool = False) -> dict[str, Any]:
        """JSON-safe dict; heatmap arrays are dropped unless asked (they are large)."""
        d = asdict(replace(self, ct_quant=None))     # the label volume is never deep-copied
        d["ct_quant"] = self.ct_quant.to_dict() if self.ct_quant is not None else None
        if include_heatmaps:
            for h, src in zip(d["heatmaps"], self.heatmaps):
                h["array"] = src.array.tolist()
        else:
            d["heatmaps"] = [
                {k: v for k, v in h.items() if k != "array"} | {"shape": list(src.array.shape)}
                for h, src in zip(d["heatmaps"], self.heatmaps)
            ]
        return d


def finding_rank(f: Finding) -> tuple[bool, float]:
    """Sort key of findings as the viewer's findings panel lists them: positives (at or above the
    model's operating threshold) first, then by probability, highest first."""
    return (not f.positive, -float(f.probability))


def top_finding(result: StudyResult) -> Finding | None:
    """The finding shown first in the findings panel and named "top finding" in the batch
    worklist and report: only findings of trained models (an untrained model's outputs are never
    findings, README "AI findings"), ranked by ``finding_rank``."""
    trained = {(m.name, m.version) for m in result.models if m.trained}
    shown = [f for f in result.findings if (f.model_name, f.model_version) in trained]
    return min(shown, key=finding_rank) if shown else None

