"""Plain dataclasses the engine returns; the viewer and reports only render them (DESIGN.md 6, napari habit)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
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
    """Cohen et al. 2020 severity from the raw 'Lung Opacity' logit."""

    geographic_extent: float     # 0-8
    opacity: float               # 0-6
    lung_opacity_logit: float
    model_name: str
    model_version: str


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
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None     # set when analysis failed; other fields may be empty
    warnings: list[str] = field(default_factory=list)
    device: str = "cpu"
    intended_use: str = RESEARCH_USE

    def to_json_dict(self, include_heatmaps: bool = False) -> dict[str, Any]:
        """JSON-safe dict; heatmap arrays are dropped unless asked (they are large)."""
        d = asdict(self)
        if include_heatmaps:
            for h, src in zip(d["heatmaps"], self.heatmaps):
                h["array"] = src.array.tolist()
        else:
            d["heatmaps"] = [
                {k: v for k, v in h.items() if k != "array"} | {"shape": list(src.array.shape)}
                for h, src in zip(d["heatmaps"], self.heatmaps)
            ]
        return d
