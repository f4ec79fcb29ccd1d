"""The small statistics every evaluation here uses: probabilities from logits, a weighted logistic
regression for linear probes, and a metrics block with patient-level bootstrap CIs.

CIs resample whole patients (engine.metrics.binary_report_ci): a patient contributes several images,
so resampling images would make the intervals too narrow. Research use only, not for diagnostic use.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from engine import metrics as M

N_BOOT = 1000


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def logreg_fit(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, l2: float = 1e-2,
               iters: int = 200) -> Callable[[np.ndarray], np.ndarray]:
    """Weighted L2 logistic regression (standardised inputs, LBFGS); returns predict_proba."""
    import torch

    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mu) / sd, dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.float64)
    wt = torch.tensor(np.ones(len(y)) if w is None else w / np.mean(w), dtype=torch.float64)
    coef = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([coef, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = xt @ coef + b
        loss = (wt * torch.nn.functional.binary_cross_entropy_with_logits(z, yt, reduction="none")).mean() \
            + l2 * (coef ** 2).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    c, bb = coef.detach().numpy(), float(b.detach())
    return lambda xn: sigmoid(((xn - mu) / sd) @ c + bb)


def report_block(y: np.ndarray, s: np.ndarray, thr: float, groups, extra_thresholds=(0.3, 0.5),
                 sweep: bool = True) -> dict:
    """Metrics at the operating point with CIs + a sweep incl. 0.3 / 0.5 / the operating point."""
    rep = M.binary_report_ci(y, s, thr, groups=groups, n_boot=N_BOOT)
    if not sweep:
        rep["sweep"] = M.threshold_sweep(y, s, sorted({*extra_thresholds, round(thr, 6)}))
        return rep
    ths = sorted({*extra_thresholds, 0.1, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9, round(thr, 6)})
    rep["sweep"] = M.threshold_sweep(y, s, ths)
    return rep
