"""DenseNet-121 in torchxrayvision's layout (DESIGN.md section 4).

1 input channel, 224x224, input range [-1024, 1024], ``features.norm5`` as the Grad-CAM layer,
``classifier = Linear(1024, 18)`` over torchxrayvision's pathology names, plus our extra
``covid_head = Linear(1024, 3)`` (COVID-19 / other pneumonia / normal).
State-dict keys of ``features.*`` and ``classifier.*`` match torchxrayvision's
``densenet121-res224-all`` so its weights load after a safe conversion.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import densenet121

XRV_PATHOLOGIES: list[str] = [
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema",
    "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule",
    "Mass", "Hernia", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
]
LUNG_OPACITY_INDEX = XRV_PATHOLOGIES.index("Lung Opacity")  # 16
COVID_CLASSES: list[str] = ["COVID-19", "Other pneumonia", "Normal"]
INPUT_SIZE = 224


class XRayDenseNet(nn.Module):
    """``forward(x)`` takes (N, 1, 224, 224) float in [-1024, 1024]; returns a dict of raw logits."""

    def __init__(self) -> None:
        super().__init__()
        base = densenet121(weights=None, num_classes=len(XRV_PATHOLOGIES))
        base.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.features = base.features
        self.classifier = base.classifier
        self.covid_head = nn.Linear(1024, len(COVID_CLASSES))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Output of ``features.norm5`` (before the final ReLU): (N, 1024, 7, 7) at 224."""
        return self.features(x)

    def head(self, fmap: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = F.adaptive_avg_pool2d(F.relu(fmap), 1).flatten(1)
        return {"pathologies": self.classifier(pooled), "covid": self.covid_head(pooled)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.feature_map(x))
