"""Model zoo: every architecture builds, runs forward/backward, learns a tiny task;
DeLong's test agrees with brute-force AUCs and detects a real difference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.training.zoo.architectures import ZOO, DeTraC, count_flops, count_parameters
from engine.training.zoo.significance import bootstrap_auc_difference, delong_covariance, delong_test


def _brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1][:, None], s[y == 0][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_architecture_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    spec = ZOO[name]
    model = spec.build()
    model.train()
    x = torch.randn(2, 1, 64, 64) * 500
    out = model(x)
    n_out = len(spec.classes) * (2 if spec.decomposition else 1)
    assert out.shape == (2, n_out)
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert torch.isfinite(out).all()
    assert count_parameters(model) > 10_000


def test_flops_counted() -> None:
    assert count_flops(ZOO["covidnet-wang"].build(), 64) > 1e6


def _bright_square_task(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g) * 100
    y = torch.randint(0, 2, (n,), generator=g)
    for i in range(n):
        if y[i]:
            r, c = torch.randint(0, size - 8, (2,), generator=g).tolist()
            x[i, 0, r:r + 8, c:c + 8] += 900
    return x, y


@pytest.mark.parametrize("name", ["cnn22-alasfoor", "covidnet-wang"])
def test_learns_tiny_task(name: str) -> None:
    torch.manual_seed(0)
    spec = ZOO[name]
    model = spec.build()
    x, y = _bright_square_task(96, size=48)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    model.eval()
    xt, yt = _bright_square_task(64, size=48, seed=1)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    assert acc >= 0.8, f"{name} failed to learn the bright-square task (acc {acc:.2f})"


def test_detrac_compose_sums_subclasses() -> None:
    m = DeTraC(num_classes=6, k=2)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 0.0, 0.0, 0.0, 0.0]])
    p = m.compose(logits)
    assert p.shape == (2, 3)
    assert torch.allclose(p.sum(1), torch.ones(2))
    assert torch.allclose(p[0], torch.full((3,), 1 / 3))
    assert p[1, 0] > 0.95


def test_delong_matches_brute_force_auc() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 150)
    a = y + rng.normal(0, 1, 150)
    b = np.round(y + rng.normal(0, 1.5, 150), 1)      # ties exercise the midranks
    aucs, cov = delong_covariance(y, np.vstack([a, b]))
    assert aucs[0] == pytest.approx(_brute_auc(y, a))
    assert aucs[1] == pytest.approx(_brute_auc(y, b))
    assert cov[0, 0] > 0 and cov[1, 1] > 0


def test_delong_detects_difference_and_not_noise() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 400)
    good = y + rng.normal(0, 0.7, 400)
    bad = y + rng.normal(0, 3.0, 400)
    assert delong_test(y, good, bad).p_value < 0.01
    same = delong_test(y, good, good + rng.normal(0, 1e-3, 400))
    assert same.p_value > 0.05
    diff, lo, hi = bootstrap_auc_difference(y, good, bad, n_boot=200)
    assert lo > 0 and diff > lo and hi > diff
