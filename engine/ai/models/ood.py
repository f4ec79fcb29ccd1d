"""Out-of-distribution score: Mahalanobis distance of pooled penultimate features in a PCA basis.

Fitted on the training images' features (``fit_ood``, called by the trainer); stored as tensors
``ood.mean`` (D,), ``ood.components`` (K, D), ``ood.variance`` (K,) and ``ood.residual_variance``
(scalar, variance per dimension of what the K components do not explain) inside the model's
safetensors file, with the threshold in the card (``ood.threshold``). The score is the RMS of the
whitened coordinates (K components plus the residual as one extra term), so in-distribution images
score about 1 and the calibrated threshold is the training score's ``quantile``.
This plays the role of Chester's autoencoder SSIM gate (DESIGN.md section 4) without a second model.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-6


def pooled_features(fmap: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) feature map -> (N, C) global average of ReLU(features): what the linear heads see."""
    return F.adaptive_avg_pool2d(F.relu(fmap.float()), 1).flatten(1)


def fit_ood(features: np.ndarray, quantile: float = 0.99,
            n_components: int = 32) -> tuple[dict[str, torch.Tensor], float]:
    """PCA + variances from training features (N, D) -> (tensors without the 'ood.' prefix, threshold)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"fit_ood needs (N>=3, D) features, got {x.shape}")
    mean = x.mean(axis=0)
    xc = x - mean
    k = int(max(1, min(n_components, x.shape[0] - 1, x.shape[1])))
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    comps = vt[:k]
    var = np.maximum(s[:k] ** 2 / (x.shape[0] - 1), EPS)
    resid = xc - (xc @ comps.T) @ comps
    dims_left = max(1, x.shape[1] - k)
    rvar = max(float((resid ** 2).sum(axis=1).mean() / dims_left), EPS)
    tensors = {"mean": torch.tensor(mean, dtype=torch.float32),
               "components": torch.tensor(comps, dtype=torch.float32),
               "variance": torch.tensor(var, dtype=torch.float32),
               "residual_variance": torch.tensor(rvar, dtype=torch.float32)}
    scores = ood_score(torch.tensor(x, dtype=torch.float32), tensors)
    threshold = float(np.quantile(scores, quantile))
    return tensors, threshold


def ood_score(features: torch.Tensor, tensors: dict[str, torch.Tensor]) -> np.ndarray:
    """(N, D) pooled features -> (N,) score (about 1 in distribution; larger = further out)."""
    f = features.float().to(tensors["mean"].device)
    xc = f - tensors["mean"]
    comps = tensors["components"]
    proj = xc @ comps.T
    terms = (proj ** 2 / tensors["variance"].clamp_min(EPS)).sum(dim=1)
    k = comps.shape[0]
    n_terms = k
    if "residual_variance" in tensors:
        resid = xc - proj @ comps
        dims_left = max(1, comps.shape[1] - k)
        terms = terms + (resid ** 2).sum(dim=1) / dims_left / tensors["residual_variance"].clamp_min(EPS)
        n_terms += 1
    return torch.sqrt(terms / n_terms).cpu().numpy().astype(np.float64)


def has_ood(tensors: dict[str, torch.Tensor]) -> bool:
    return all(k in tensors for k in ("mean", "components", "variance"))
