"""Zone-based X-ray severity: six Brixia zone scores, Cohen's geographic extent and opacity.

Method (small data, CPU): the v2 DenseNet-121 feature map of the lung-only input is pooled inside
each of the six lung zones (upper/middle/lower third of each lung's height, the first approximation
DESIGN.md section 4 names for the Brixia zones A-F), joined with the zone's grey-level statistics
of the equalised input, and a ridge regression maps each zone to its Brixia score (0-3, mean of the
two readers of Signoroni et al. 2021). The image's predicted Brixia global score (sum, 0-18) is
mapped to Cohen et al. 2020's geographic extent (0-8) and opacity (0-6) by a straight line fitted on
Cohen's 94 expert-scored images. Everything is a closed-form fit: it is re-fitted inside every
cross-validation fold (engine.severity_eval), never on the images it is scored on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ZONE_NAMES = ("A", "B", "C", "D", "E", "F")   # right upper/middle/lower, left upper/middle/lower (Brixia)
ZONE_TEXT = ("right upper", "right middle", "right lower", "left upper", "left middle", "left lower")
N_STATS = 5


def zone_weights(zones_raw: np.ndarray, fmap_hw: tuple[int, int]) -> np.ndarray:
    """Zone label image (RAW_SIDE², 0..6) -> (6, h, w) area fractions on the feature-map grid."""
    h, w = fmap_hw
    s = zones_raw.shape[0]
    out = np.zeros((6, h, w), np.float32)
    ys = (np.arange(s) * h // s)
    xs = (np.arange(s) * w // s)
    for z in range(6):
        m = (zones_raw == z + 1).astype(np.float32)
        acc = np.zeros((h, w), np.float32)
        np.add.at(acc, (ys[:, None].repeat(s, 1), xs[None, :].repeat(s, 0)), m)
        out[z] = acc / max(acc.sum(), 1e-6)
    return out


def zone_stats(norm01: np.ndarray, zones_raw: np.ndarray) -> np.ndarray:
    """(6, N_STATS) grey statistics of the equalised lung input per zone: mean, p25, p50, p75, p90."""
    out = np.zeros((6, N_STATS), np.float32)
    for z in range(6):
        v = norm01[zones_raw == z + 1]
        if v.size:
            out[z] = [v.mean(), *np.percentile(v, [25, 50, 75, 90])]
    return out


def zone_features(fmap: np.ndarray, zones_raw: np.ndarray, norm01: np.ndarray) -> np.ndarray:
    """(C, h, w) ReLU'd feature map + zones + equalised input -> (6, C + N_STATS + 6) zone rows."""
    wts = zone_weights(zones_raw, fmap.shape[1:])
    pooled = np.einsum("zhw,chw->zc", wts, np.maximum(fmap, 0.0))
    onehot = np.eye(6, dtype=np.float32)
    return np.concatenate([pooled, zone_stats(norm01, zones_raw), onehot], axis=1).astype(np.float32)


@dataclass
class ZoneSeverityModel:
    """Ridge on standardised zone rows + two straight lines to Cohen's scales."""

    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray
    intercept: float
    extent_ab: tuple[float, float]     # extent = a + b * global
    opacity_ab: tuple[float, float]
    alpha: float

    def zone_scores(self, rows: np.ndarray) -> np.ndarray:
        """(..., 6, F) -> (..., 6) Brixia zone scores clipped to 0-3."""
        z = (rows - self.mean) / self.std
        return np.clip(z @ self.coef + self.intercept, 0.0, 3.0)

    def cohen(self, global_score: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        g = np.asarray(global_score, dtype=np.float64)
        ext = np.clip(self.extent_ab[0] + self.extent_ab[1] * g, 0.0, 8.0)
        opa = np.clip(self.opacity_ab[0] + self.opacity_ab[1] * g, 0.0, 6.0)
        return ext, opa

    def to_tensors(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean.astype(np.float32), "std": self.std.astype(np.float32),
                "coef": self.coef.astype(np.float32),
                "scalars": np.array([self.intercept, *self.extent_ab, *self.opacity_ab, self.alpha], np.float64)}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray]) -> "ZoneSeverityModel":
        s = t["scalars"].astype(np.float64)
        return cls(t["mean"], t["std"], t["coef"], float(s[0]), (float(s[1]), float(s[2])),
                   (float(s[3]), float(s[4])), float(s[5]))


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Closed-form ridge on standardised features: (mean, std, coef, intercept)."""
    mu = x.mean(0)
    sd = x.std(0) + 1e-6
    z = (x - mu) / sd
    ym = float(y.mean())
    # dual form is cheaper when features outnumber samples
    if z.shape[1] > z.shape[0]:
        k = z @ z.T
        a = np.linalg.solve(k + alpha * np.eye(k.shape[0]), y - ym)
        coef = z.T @ a
    else:
        coef = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - ym))
    return mu, sd, coef, ym


def line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares y = a + b x (b >= 0: a larger Brixia burden never means a smaller Cohen score)."""
    if len(x) < 2 or np.std(x) < 1e-9:
        return float(np.mean(y)) if len(y) else 0.0, 0.0
    b, a = np.polyfit(x, y, 1)
    if b < 0:
        return float(np.mean(y)), 0.0
    return float(a), float(b)


def fit(zone_x: np.ndarray, zone_y: np.ndarray, cohen_zone_x: np.ndarray, cohen_extent: np.ndarray,
        cohen_opacity: np.ndarray, alpha: float) -> ZoneSeverityModel:
    """``zone_x`` (n_brixia, 6, F), ``zone_y`` (n_brixia, 6); ``cohen_zone_x`` (n_cohen, 6, F)."""
    f = zone_x.shape[-1]
    mu, sd, coef, b0 = ridge_fit(zone_x.reshape(-1, f), zone_y.reshape(-1), alpha)
    m = ZoneSeverityModel(mu, sd, coef, b0, (0.0, 0.0), (0.0, 0.0), alpha)
    g = m.zone_scores(cohen_zone_x).sum(-1) if len(cohen_zone_x) else np.zeros(0)
    m.extent_ab = line_fit(g, cohen_extent)
    m.opacity_ab = line_fit(g, cohen_opacity)
    return m


# ----------------------------------------------------------------------------------------------
# Loading (safetensors + card with pinned sha256, as engine.ai.models.registry) and inference
# ----------------------------------------------------------------------------------------------

SEVERITY_MODEL = "xray-severity"
_loaded: dict[str, tuple[ZoneSeverityModel, dict]] = {}


def load_severity_model() -> tuple[ZoneSeverityModel, dict] | None:
    """The newest ``xray-severity`` card's model, or None when there is none. Refuses a file whose
    sha256 differs from the card's (engine.ai.models.registry.read_weights)."""
    from engine.ai.models.registry import find_card, read_weights
    found = find_card(SEVERITY_MODEL)
    if found is None:
        return None
    path, card = found
    key = f"{path}:{card.get('sha256')}"
    if key not in _loaded:
        state, _ = read_weights(path.parent / str(card["file"]), str(card.get("sha256", "")))
        _loaded.clear()
        _loaded[key] = (ZoneSeverityModel.from_tensors({k: v.double().numpy() if k == "scalars" else v.float().numpy()
                                                        for k, v in state.items()}), card)
    return _loaded[key]


def zone_severity(fmap1: np.ndarray, zones_raw: np.ndarray, norm01: np.ndarray, model: ZoneSeverityModel,
                  model_name: str, model_version: str):
    """One image's (C, h, w) feature map -> engine.results.Severity with zone scores."""
    from engine.results import Severity

    rows = zone_features(np.asarray(fmap1, np.float32), zones_raw, norm01)
    present = np.array([(zones_raw == z + 1).any() for z in range(6)])
    zs = model.zone_scores(rows)
    zs = np.where(present, zs, 0.0)
    g = float(zs.sum())
    ext, opa = model.cohen(g)
    return Severity(geographic_extent=float(ext), opacity=float(opa), lung_opacity_logit=None,
                    model_name=model_name, model_version=model_version,
                    zone_scores={n: round(float(v), 3) for n, v in zip(ZONE_NAMES, zs)},
                    brixia_global=round(g, 3), method="zone-ridge")
