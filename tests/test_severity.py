"""Cohen et al. 2020 severity constants and clamping (engine.ai.severity)."""
from __future__ import annotations

import pytest
import torch

from engine.ai import severity as sv


def test_published_constants_exact():
    assert sv.GEO_SLOPE == 0.8705248236656189
    assert sv.GEO_INTERCEPT == 3.4137437
    assert sv.OPACITY_SLOPE == 0.5484423041343689
    assert sv.OPACITY_INTERCEPT == 2.5535977
    assert (sv.GEO_MAX, sv.OPACITY_MAX) == (8.0, 6.0)


@pytest.mark.parametrize("z", [-3.0, -1.0, 0.0, 0.5, 2.0])
def test_linear_in_range(z):
    s = sv.severity_from_logit(z)
    geo = 0.8705248236656189 * z + 3.4137437
    op = 0.5484423041343689 * z + 2.5535977
    assert s.geographic_extent == pytest.approx(min(max(geo, 0), 8))
    assert s.opacity == pytest.approx(min(max(op, 0), 6))
    assert s.lung_opacity_logit == z


def test_clamped_at_both_ends():
    assert sv.geographic_extent(-100) == 0.0 and sv.opacity(-100) == 0.0
    assert sv.geographic_extent(100) == 8.0 and sv.opacity(100) == 6.0
    # zero crossing of the extent line: z = -intercept/slope
    z0 = -sv.GEO_INTERCEPT / sv.GEO_SLOPE
    assert sv.geographic_extent(z0 + 1e-6) == pytest.approx(0.0, abs=1e-5)


def test_unclamped_linear_keeps_gradient_for_gradcam():
    z = torch.tensor([50.0, -50.0], requires_grad=True)   # far outside the clamp range
    sv.geographic_extent_linear(z).sum().backward()
    assert torch.allclose(z.grad, torch.full((2,), sv.GEO_SLOPE))
    clamped = torch.tensor([50.0], requires_grad=True)
    torch.clamp(sv.geographic_extent_linear(clamped), 0, 8).sum().backward()
    assert clamped.grad.item() == 0.0    # why Grad-CAM must use the unclamped output


def test_to_result_labels_model():
    r = sv.to_result(1.0, "xray-densenet121", "1.0.0")
    assert (r.model_name, r.model_version) == ("xray-densenet121", "1.0.0")
    assert r.geographic_extent == pytest.approx(0.8705248236656189 + 3.4137437)
