"""Training/evaluation datasets built from ../shared/data CSVs (never copied into the repo).

Images are decoded and passed through exactly the inference preprocessing once
(``engine.ai.preprocess.xray.prepare_xray`` on jpeg/255; for CT slices the lung mask and crop of
``engine.ai.preprocess.ct_input``, kept before its final normalisation so training can re-render it) and cached as float16 tensors in a git-ignored cache folder, so every epoch on a 2-core
CPU costs only the network. Splits are the patient-level ones given in the CSVs.
"""
from __future__ import annotations

import csv
import json
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CACHE_VERSION = "2"  # 2: safetensors + JSON (no pickles anywhere)
XRAY_LABELS = ["covid", "other_pneumonia", "normal", "other_finding"]
# covid head order = engine.ai.models.densenet_xray.COVID_CLASSES ("COVID-19", "Other pneumonia", "Normal")
XRAY_TO_COVID_HEAD = {"covid": 0, "other_pneumonia": 1, "normal": 2, "other_finding": -1}
# Pathology outputs our labels support (torchxrayvision names). Positives/negatives per label;
# everything else is masked out of the loss (no label = no gradient).
SUPPORTED_PATHOLOGIES: dict[str, dict[str, list[str]]] = {
    # COVID-19 is a (viral) pneumonia; torchxrayvision's COVID set is also Pneumonia-positive.
    "Pneumonia": {"pos": ["covid", "other_pneumonia"], "neg": ["normal"]},
    # ARDS / lipoid pneumonia (other_finding) are opacities too; this logit feeds the severity formula.
    "Lung Opacity": {"pos": ["covid", "other_pneumonia", "other_finding"], "neg": ["normal"]},
}
CT_LABELS = ["non_covid", "covid"]  # index = CTInception output (Non-COVID, COVID-19)


def default_cache_dir() -> Path:
    """``$CHESTVIEW_CACHE`` or ``<repo>/.cache/chestview`` (git-ignored)."""
    env = os.environ.get("CHESTVIEW_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".cache" / "chestview"


@dataclass
class ImageSet:
    """Cached images plus per-image metadata (one row per image, aligned with ``x``)."""

    kind: str                      # 'xray' | 'ct'
    x: "object"                    # torch.Tensor float16 (N, 1, S, S) in model input range
    rows: list[dict[str, str]]
    size: int
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list[str]:
        return [r[name] for r in self.rows]

    def indices(self, split: str | None = None, source: str | None = None) -> np.ndarray:
        return np.array([i for i, r in enumerate(self.rows)
                         if (split is None or r["split"] == split)
                         and (source is None or r.get("source") == source)], dtype=np.int64)


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def xray_dir(data: str | Path) -> Path:
    """Accept ``.../data`` or ``.../data/xray``."""
    p = Path(data)
    return p / "xray" if (p / "xray" / "labels.csv").is_file() else p


def ct_dir(data: str | Path) -> Path:
    p = Path(data)
    return p / "ct" if (p / "ct" / "slices.csv").is_file() else p


def load_gray01(path: Path) -> np.ndarray:
    """8-bit image -> float32 [0,1] (jpeg/255: what the viewer shows, as prepare_xray expects)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def _cache_file(kind: str, csv_path: Path, size: int, cache_dir: Path | None) -> Path:
    h = hashlib.sha256(csv_path.read_bytes()).hexdigest()[:12]
    d = cache_dir or default_cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{kind}-{size}-{h}-v{CACHE_VERSION}.safetensors"


def _build(kind: str, csv_path: Path, rows: list[dict[str, str]], size: int, encode, cache_dir: Path | None,
           progress: bool, channels: int = 1) -> ImageSet:
    import torch

    from safetensors.torch import load_file, save_file

    cf = _cache_file(kind, csv_path, size, cache_dir)
    meta_f = cf.with_suffix(".json")
    if cf.is_file() and meta_f.is_file():
        try:
            meta = json.loads(meta_f.read_text())
            if meta["paths"] == [r["path"] for r in rows]:
                return ImageSet(kind, load_file(str(cf))["x"], rows, size, meta.get("info", {}))
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt
    x = torch.empty((len(rows), channels, size, size), dtype=torch.float16)
    info: dict = {"fallback_crops": 0}
    for i, r in enumerate(rows):
        t, extra = encode(csv_path.parent / r["path"])
        x[i] = t.to(torch.float16)
        if extra:
            info["fallback_crops"] += 1
        if progress and (i + 1) % 200 == 0:
            print(f"[cache] {kind}: {i + 1}/{len(rows)} images", flush=True)
    tmp = cf.with_suffix(".tmp")
    save_file({"x": x.contiguous()}, str(tmp))
    tmp.replace(cf)
    tmp_meta = meta_f.with_suffix(".json.tmp")
    tmp_meta.write_text(json.dumps({"paths": [r["path"] for r in rows], "info": info}))
    tmp_meta.replace(meta_f)
    return ImageSet(kind, x, rows, size, info)


def encode_xray(path: Path, size: int = 224):
    """jpeg/255 -> prepare_xray -> (1, size, size) in [-1024, 1024]."""
    from engine.ai.preprocess.xray import prepare_xray

    t, _ = prepare_xray(load_gray01(path), size=size)
    return t, False


def encode_ct_slice(path: Path, size: int = 224):
    """PNG/255 -> 2-D figure lung mask -> ``lung_crop`` -> (2, size, size) [grey in [0,1], lung mask].

    The cache keeps the crop *before* ``normalise_lung`` so training can re-render it
    (engine.ai.preprocess.ct_input.augment_ct_batch); ``ct_batch_input`` finishes it exactly as
    ``prepare_ct_slice`` does in the app.
    """
    import torch

    from engine.ai.preprocess.ct_input import figure_lung_mask, lung_crop

    g = load_gray01(path)
    mask = figure_lung_mask(g)
    gs, ms, _ = lung_crop(g, mask, size)
    return torch.stack([gs, ms]), mask is None


def ct_batch_input(x):
    """Cached (N, 2, S, S) [grey, mask] -> model input (N, 3, S, S) without augmentation."""
    from engine.ai.preprocess.ct_input import normalise_lung

    return normalise_lung(x[:, 0].float(), x[:, 1].float())


def load_xray_set(data: str | Path, size: int = 224, cache_dir: Path | None = None,
                  progress: bool = True) -> ImageSet:
    d = xray_dir(data)
    csv_path = d / "labels.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path} not found: pass --data pointing at shared/data or shared/data/xray")
    rows = read_csv_rows(csv_path)
    sev = {r["path"]: r for r in read_csv_rows(d / "severity.csv")} if (d / "severity.csv").is_file() else {}
    for r in rows:
        s = sev.get(r["path"])
        r["geographic_mean"] = s["geographic_mean"] if s else ""
        r["opacity_mean"] = s["opacity_mean"] if s else ""
    return _build("xray", csv_path, rows, size, lambda p: encode_xray(p, size), cache_dir, progress)


def load_ct_set(data: str | Path, size: int = 224, cache_dir: Path | None = None,
                progress: bool = True) -> ImageSet:
    d = ct_dir(data)
    csv_path = d / "slices.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path} not found: pass --data pointing at shared/data or shared/data/ct")
    rows = read_csv_rows(csv_path)
    for r in rows:
        r.setdefault("source", "covidct-" + ("paper" if r["label"] == "covid" else
                                             ("medpix" if "medpix" in r["patient_id"] else "crawled")))
    return _build("ct-lung", csv_path, rows, size, lambda p: encode_ct_slice(p, size), cache_dir, progress,
                  channels=2)


def xray_targets(rows: list[dict[str, str]]):
    """(covid_idx (N,) long with -1 = masked, path_targets (N, 18) float, path_mask (N, 18) float)."""
    import torch

    from engine.ai.models.densenet_xray import XRV_PATHOLOGIES

    n = len(rows)
    cov = torch.tensor([XRAY_TO_COVID_HEAD[r["label"]] for r in rows], dtype=torch.long)
    tgt = torch.zeros((n, len(XRV_PATHOLOGIES)))
    mask = torch.zeros((n, len(XRV_PATHOLOGIES)))
    for name, rule in SUPPORTED_PATHOLOGIES.items():
        j = XRV_PATHOLOGIES.index(name)
        for i, r in enumerate(rows):
            if r["label"] in rule["pos"]:
                tgt[i, j], mask[i, j] = 1.0, 1.0
            elif r["label"] in rule["neg"]:
                mask[i, j] = 1.0
    return cov, tgt, mask


def ct_targets(rows: list[dict[str, str]]):
    import torch

    return torch.tensor([CT_LABELS.index(r["label"]) for r in rows], dtype=torch.long)


def source_balanced_weights(rows: list[dict[str, str]], label_key: str = "label", source_key: str = "source",
                            power: float = 0.5) -> np.ndarray:
    """Per-image sampling weights: classes equally likely; within a class, source s drawn with
    probability proportional to n_s**power (power 0.5 = square-root tempering; 1 = as in the data,
    0 = every source equal). Counters the source/class confounding of these sets (README)."""
    from collections import Counter

    cell = Counter((r[label_key], r.get(source_key, "")) for r in rows)
    labels = sorted({r[label_key] for r in rows})
    w = np.zeros(len(rows))
    for lab in labels:
        srcs = {s: c for (l_, s), c in cell.items() if l_ == lab}
        z = sum(c ** power for c in srcs.values())
        for i, r in enumerate(rows):
            if r[label_key] == lab:
                c = srcs[r.get(source_key, "")]
                w[i] = (c ** power / z) / c / len(labels)
    return w / w.sum()
