"""Small U-Net for chest X-ray lung segmentation (Ronneberger et al., U-Net, MICCAI 2015).

Three output classes: background, right lung, left lung (the patient's sides; on a standard
frontal view the patient's right lung is on the image's left). Predicting the two lungs as
separate classes, rather than one "lung" class split afterwards by connected components, keeps
the split correct when the two lung fields touch across the mediastinum in the mask (low-contrast
AP supine images) or when one lung is partly whited out and falls apart into pieces.

BatchNorm, not GroupNorm: the model is trained with batches of 8-16 and used in eval mode, where
BatchNorm folds into a per-channel affine map and costs nothing at inference.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

LUNG_CLASSES = ("background", "right lung", "left lung")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class LungUNet(nn.Module):
    """U-Net with ``levels`` resolutions (channels base, 2*base, ...); input (N, 1, H, W), H and W
    divisible by 2**(levels-1); output raw logits (N, n_classes, H, W)."""

    def __init__(self, base: int = 16, levels: int = 5, n_classes: int = len(LUNG_CLASSES)) -> None:
        super().__init__()
        chans = [base * 2 ** i for i in range(levels)]
        self.down = nn.ModuleList()
        cin = 1
        for c in chans:
            self.down.append(_block(cin, c))
            cin = c
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for c_hi, c_lo in zip(reversed(chans[:-1]), reversed(chans[1:])):
            self.up.append(nn.ConvTranspose2d(c_lo, c_hi, 2, stride=2))
            self.fuse.append(_block(2 * c_hi, c_hi))
        self.head = nn.Conv2d(chans[0], n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, blk in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = blk(x)
            skips.append(x)
        x = skips.pop()
        for up, fuse in zip(self.up, self.fuse):
            x = fuse(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)
