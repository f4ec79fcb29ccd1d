"""Inception-family per-slice CT classifier after Wang et al. 2020 (M-Inception), DESIGN.md section 4.

torchvision ``inception_v3`` (299x299, ``Mixed_7c`` as the Grad-CAM layer) or ``googlenet``
(224x224, ``inception5b``) when CPU cost demands it; new head with 2 outputs
(non-COVID, COVID-19). Input: (N, 3, S, S) lung-windowed slices cropped to the lung ROI, scaled
to [-1, 1] (the grey value replicated in 3 channels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import googlenet, inception_v3

CT_CLASSES: list[str] = ["Non-COVID", "COVID-19"]


class CTInception(nn.Module):
    """``forward(x)`` returns raw logits (N, 2); ``feature_map`` gives the Grad-CAM layer output."""

    def __init__(self, variant: str = "googlenet", input_size: int | None = None) -> None:
        super().__init__()
        self.variant = variant
        if variant == "inception_v3":
            net = inception_v3(weights=None, aux_logits=False, init_weights=True, num_classes=len(CT_CLASSES))
            self.input_size = 299
            self.cam_layer = "Mixed_7c"
        elif variant == "googlenet":
            net = googlenet(weights=None, aux_logits=False, init_weights=True, num_classes=len(CT_CLASSES))
            self.input_size = 224
            self.cam_layer = "inception5b"
        else:
            raise ValueError(f"unknown CT variant {variant!r}; use 'googlenet' or 'inception_v3'")
        net.transform_input = False
        self.net = net
        if input_size:   # trained at another size (both networks pool adaptively); the card says which
            self.input_size = int(input_size)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        if self.variant == "inception_v3":
            for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                         "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                         "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]:
                x = getattr(n, name)(x)
            return x
        for name in ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b",
                     "maxpool3", "inception4a", "inception4b", "inception4c", "inception4d", "inception4e",
                     "maxpool4", "inception5a", "inception5b"]:
            x = getattr(n, name)(x)
        return x

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(fmap, 1).flatten(1)
        pooled = self.net.dropout(pooled)
        return self.net.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_map(x))
