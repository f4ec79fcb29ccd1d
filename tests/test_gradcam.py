"""Grad-CAM localisation on a tiny model trained in the test to detect a bright square (engine.ai.explain.gradcam)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.ai.explain.gradcam import cams_from_fmap, ct_heatmap, gradcam, normalise, xray_heatmap
from engine.ai.preprocess.xray import prepare_xray

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32


class TinyNet(nn.Module):
    """Same interface as XRayDenseNet/CTInception: feature_map (in-place ReLU, like torchvision) + head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(inplace=True),
                                      nn.Conv2d(16, 16, 3, padding=1))
        self.fc = nn.Linear(16, 1)

    def feature_map(self, x):
        return self.features(x)

    def head(self, fmap):
        return self.fc(F.adaptive_avg_pool2d(F.relu(fmap), 1).flatten(1))

    def forward(self, x):
        return self.head(self.feature_map(x))


def _batch(rng, n):
    x = rng.normal(0.0, 0.1, size=(n, 1, SIZE, SIZE)).astype(np.float32)
    y = rng.integers(0, 2, size=n).astype(np.float32)
    boxes = []
    for i in range(n):
        r, c = rng.integers(0, SIZE - 8, size=2)
        boxes.append((r, c))
        if y[i]:
            x[i, 0, r:r + 8, c:c + 8] += 1.0
    return torch.from_numpy(x), torch.from_numpy(y), boxes


@pytest.fixture(scope="module")
def trained_tiny():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = TinyNet()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(150):
        x, y, _ = _batch(rng, 32)
        loss = F.binary_cross_entropy_with_logits(net(x)[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    opt.zero_grad(set_to_none=True)
    x, y, _ = _batch(rng, 200)
    with torch.no_grad():
        acc = float(((net(x)[:, 0] > 0).float() == y).float().mean())
    assert acc > 0.95, f"tiny model did not learn the square ({acc:.2f})"
    return net


def test_cam_peak_inside_square(trained_tiny):
    rng = np.random.default_rng(42)
    hits = 0
    n = 20
    x = torch.from_numpy(rng.normal(0.0, 0.1, size=(n, 1, SIZE, SIZE)).astype(np.float32))
    boxes = []
    for i in range(n):
        r, c = rng.integers(0, SIZE - 8, size=2)
        x[i, 0, r:r + 8, c:c + 8] += 1.0
        boxes.append((r, c))
    (cams,) = gradcam(trained_tiny, x, [lambda o: o[:, 0]])
    assert cams.shape == (n, SIZE, SIZE) and cams.dtype == np.float32
    assert float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0
    for i, (r, c) in enumerate(boxes):
        pr, pc = np.unravel_index(np.argmax(cams[i]), cams[i].shape)
        # one feature-map cell (stride 2) of slack around the square
        hits += int(r - 2 <= pr < r + 10 and c - 2 <= pc < c + 10)
        assert cams[i].max() > 0.8     # normalised to 1 at feature-map resolution, then bilinear
    assert hits >= 18, f"CAM peak inside the square for only {hits}/{n} images"


def test_in_place_relu_model_does_not_break_and_params_untouched(trained_tiny):
    x = torch.zeros(1, 1, SIZE, SIZE)
    before = [p.detach().clone() for p in trained_tiny.parameters()]
    with torch.no_grad():
        fmap = trained_tiny.feature_map(x)
    cams = cams_from_fmap(trained_tiny.head, fmap, [lambda o: o[:, 0], lambda o: -o[:, 0]])
    assert len(cams) == 2 and cams[0].shape == fmap.shape[:1] + fmap.shape[2:]
    assert all(p.grad is None for p in trained_tiny.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, trained_tiny.parameters()))


def test_normalise_per_image():
    c = torch.tensor([[[0.0, 2.0], [1.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    n = normalise(c)
    assert n[0].tolist() == [[0.0, 0.5], [0.25, 1.0]]
    assert n[1].abs().sum() == 0


def test_xray_heatmap_back_to_displayed_coordinates():
    gray = np.zeros((300, 200), np.float32)          # taller than wide: crop rows 50..250
    _, geom = prepare_xray(gray)
    cam = np.zeros((224, 224), np.float32)
    cam[:112, :112] = 1.0                             # top-left quarter of the model input
    hm = xray_heatmap(cam, geom)
    assert hm.shape == (300, 200)
    assert hm[:50].max() == 0 and hm[250:].max() == 0        # outside the crop
    assert hm[60, 10] == pytest.approx(1.0) and hm[240, 190] == pytest.approx(0.0)


def test_ct_heatmap_undo_roi_crop():
    cam = np.ones((7, 7), np.float32)
    hm = ct_heatmap(cam, (10, 40, 20, 80), (64, 100))
    assert hm.shape == (64, 100)
    assert hm[10:40, 20:80].min() == pytest.approx(1.0)
    assert hm.sum() == pytest.approx(30 * 60)
