"""Architectures of the five source papers, rebuilt from their descriptions (docs/zoo).

Every model takes the same input as our DenseNet-121: (N, 1, S, S) float in [-1024, 1024]
(engine.ai.preprocess.xray.prepare_xray) and returns raw logits (N, C). ``ZOO`` maps a registry name
to a ``ZooSpec`` with the paper, the class set and where we departed from the paper.
No ImageNet weights can be downloaded here: models the papers fine-tuned from ImageNet start
from scratch (or from our own chest-trained DenseNet features where said).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, vgg16_bn

BINARY = ["not-COVID", "COVID-19"]
THREE = ["COVID-19", "Other pneumonia", "Normal"]


class _Scale(nn.Module):
    """[-1024, 1024] -> [-1, 1]: the zoo's CNNs were designed for unit-range inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / 1024.0


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _FeaturesClassifier(nn.Module):
    """``features`` -> feature map (the Grad-CAM layer) -> ``classifier``: the split every zoo
    model exposes, like our DenseNet-121 and CT Inception."""

    features: nn.Module
    classifier: nn.Module

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.classifier(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_map(x))


class VGG16Binary(nn.Module):
    """Szalay, Jakab, Szegedi: VGG-16 transfer learning, COVID-19 vs not-COVID.

    Departure: no ImageNet weights here, so from scratch with batch norm (vgg16_bn) so that a
    16-layer plain network trains at all; 1-channel first conv; 2-way head.
    """

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        net = vgg16_bn(weights=None, num_classes=num_classes)
        net.features[0] = nn.Conv2d(1, 64, 3, padding=1)
        self.scale = _Scale()
        self.features = net.features
        self.pool = net.avgpool
        self.classifier = net.classifier

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.scale(x))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(f), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_map(x))


class AlAsfoorCNN(_FeaturesClassifier):
    """Al-Asfoor and Abed: 22-layer CNN, 224x224 input, four repeated conv/BN/ReLU/pool blocks,
    two fully connected layers with dropout, softmax over COVID-19 / normal / pneumonia.

    Layer count: input, 4 x (conv, BN, ReLU, pool) = 16, flatten, FC, ReLU, dropout, FC, softmax = 22.
    Channel widths (32-64-128-256) are not given in the paper; ours.
    """

    def __init__(self, num_classes: int = 3, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = [_Scale()]
        cin = 1
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(cin * 16, 256),
                                        nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(256, num_classes))


class _RowLSTMHead(nn.Module):
    """Reads a (N, C, H, W) feature map row by row (H steps of C*W... pooled to C) with an LSTM/GRU."""

    def __init__(self, channels: int, hidden: int, num_classes: int, cell: str = "lstm") -> None:
        super().__init__()
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(channels, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        seq = f.mean(dim=3).transpose(1, 2)          # (N, H, C): one step per feature-map row
        out, _ = self.rnn(seq)
        return self.fc(out[:, -1])


class IslamCNNLSTM(_FeaturesClassifier):
    """Islam et al. (as reviewed by Clark et al.): 12 convolutional layers, 5 pooling layers,
    1 fully connected layer and an LSTM over the feature map's rows, softmax over 3 classes.

    Departure: BN after each conv (from-scratch training); the FC follows the LSTM.
    """

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        plan = [(1, 32), (32, 32), "P", (32, 64), (64, 64), "P", (64, 128), (128, 128), "P",
                (128, 128), (128, 256), "P", (256, 256), (256, 256), "P", (256, 256), (256, 256)]
        layers: list[nn.Module] = [_Scale()]
        for p in plan:
            layers.append(nn.MaxPool2d(2) if p == "P" else _conv_bn(*p))
        self.features = nn.Sequential(*layers)
        self.classifier = _RowLSTMHead(256, 128, num_classes, "lstm")


class BargaviCNNRNN(nn.Module):
    """Bargavi and Kumar: pretrained-CNN features fed to an RNN (LSTM or GRU), softmax.

    Substitute for the ImageNet CNN: our DenseNet-121 feature extractor (chest-trained weights are
    loaded into it by engine.training.compare when a trained card exists), frozen; a GRU reads its rows.
    """

    def __init__(self, num_classes: int = 3, cell: str = "gru") -> None:
        super().__init__()
        from engine.ai.models.densenet_xray import XRayDenseNet

        self.backbone = XRayDenseNet().features
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.classifier = _RowLSTMHead(1024, 128, num_classes, cell)

    def train(self, mode: bool = True) -> "BargaviCNNRNN":
        super().train(mode)
        self.backbone.eval()                          # frozen features: keep BN statistics fixed
        return self

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.backbone(x))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.classifier(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_map(x))


class PEPX(nn.Module):
    """COVID-Net's projection-expansion-projection-extension block (Wang and Wong 2020):
    1x1 projection -> 1x1 expansion -> 3x3 depthwise -> 1x1 projection -> 1x1 extension."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        mid = max(cout // 4, 8)
        self.block = nn.Sequential(
            _conv_bn(cin, mid // 2, 1), _conv_bn(mid // 2, mid, 1),
            _conv_bn(mid, mid, 3, stride=stride, groups=mid),
            _conv_bn(mid, mid // 2, 1), nn.Conv2d(mid // 2, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if cin == cout and stride == 1 else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.block(x) + self.skip(x))


class COVIDNetSmall(_FeaturesClassifier):
    """COVID-Net-style network: a 7x7 stem and four stages of PEPX blocks with long-range
    (1x1 projected) shortcuts, 3 classes. Departure: fewer blocks per stage than COVID-Net
    (2-2-3-2 instead of 3-4-6-3) and 224 input instead of 480, to train on CPU."""

    def __init__(self, num_classes: int = 3, widths: tuple[int, ...] = (64, 128, 256, 512),
                 depths: tuple[int, ...] = (2, 2, 3, 2)) -> None:
        super().__init__()
        stages: list[nn.Module] = [_Scale(), _conv_bn(1, 32, 7, stride=2), nn.MaxPool2d(2)]
        cin = 32
        for i, (w, d) in enumerate(zip(widths, depths)):
            for j in range(d):
                stages.append(PEPX(cin, w, stride=2 if (j == 0 and i > 0) else 1))
                cin = w
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 256),
                                        nn.ReLU(inplace=True), nn.Linear(256, num_classes))


class DeTraC(nn.Module):
    """DeTraC (Abbas et al.): class decomposition, transfer, class composition.

    ``num_classes`` outputs are *sub-classes* (k per original class, found by k-means on deep
    features of the training images, engine.training.compare does that); ``compose`` sums sub-class
    probabilities back to the original classes. Backbone: ResNet-18 from scratch (the paper
    transferred ImageNet AlexNet/ResNet; not available here).
    """

    def __init__(self, num_classes: int = 6, k: int = 2) -> None:
        super().__init__()
        net = resnet18(weights=None, num_classes=num_classes)
        net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        self.k = k
        self.scale = _Scale()
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2,
                                  net.layer3, net.layer4)
        self.fc = net.fc

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.scale(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.feature_map(x), 1).flatten(1)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(f, 1).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_map(x))

    def compose(self, sub_logits: torch.Tensor) -> torch.Tensor:
        """Sub-class logits (N, C*k) -> class probabilities (N, C) by summing each class's k parts."""
        p = sub_logits.softmax(dim=1)
        return p.view(p.shape[0], -1, self.k).sum(dim=2)


@dataclass(frozen=True)
class ZooSpec:
    name: str
    build: Callable[[], nn.Module]
    classes: list[str]
    paper: str
    reported: dict[str, float] = field(default_factory=dict)   # the paper's own figures (other data!)
    departures: str = ""
    decomposition: bool = False


ZOO: dict[str, ZooSpec] = {
    "vgg16-szalay": ZooSpec(
        "vgg16-szalay", lambda: VGG16Binary(2), BINARY,
        "Szalay, Jakab, Szegedi: COVID-19 detection from chest X-ray with VGG-16 transfer learning",
        {}, "from scratch with BN (no ImageNet weights); hyperparameter search replaced by our shared budget"),
    "cnn22-alasfoor": ZooSpec(
        "cnn22-alasfoor", lambda: AlAsfoorCNN(3), THREE,
        "Al-Asfoor and Abed: 22-layer CNN for COVID-19 / normal / pneumonia", {},
        "channel widths and FC size not published; ours (32-64-128-256, FC 256); epochs set by the shared budget"),
    "cnnlstm-islam": ZooSpec(
        "cnnlstm-islam", lambda: IslamCNNLSTM(3), THREE,
        "Islam et al. CNN-LSTM (as reviewed by Clark et al.)", {},
        "BN added; LSTM reads pooled feature-map rows; FC after the LSTM"),
    "cnnrnn-bargavi": ZooSpec(
        "cnnrnn-bargavi", lambda: BargaviCNNRNN(3, "gru"), THREE,
        "Bargavi and Kumar: CNN-RNN hybrid (pretrained CNN features into LSTM/GRU)", {},
        "backbone = our chest-trained DenseNet-121 features (frozen) instead of an ImageNet CNN; GRU"),
    "covidnet-wang": ZooSpec(
        "covidnet-wang", lambda: COVIDNetSmall(3), THREE,
        "Wang and Wong: COVID-Net (PEPX blocks)", {},
        "reduced depth (2-2-3-2 PEPX) and input size; from scratch"),
    "detrac-abbas": ZooSpec(
        "detrac-abbas", lambda: DeTraC(6, 2), THREE,
        "Abbas et al.: DeTraC (decompose, transfer, compose)", {},
        "ResNet-18 from scratch instead of ImageNet transfer; k=2 sub-classes per class", decomposition=True),
}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, size: int) -> int:
    """Forward FLOPs for one (1, 1, size, size) image via torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 1, size, size))
    return int(fc.get_total_flops())
