"""Train the v2 X-ray classifier on lung-only inputs (``python main.py train xray-lung ...``).

Design (issue "X-ray AI that holds up", DESIGN.md section 4), chosen because the v1 model learnt
the archive instead of the lungs:
- inputs: engine.ai.preprocess.xray_lung_input (segmented lungs, equalised, black outside);
- augmentations on the raw crop that erase archive cues: blur, resolution loss, JPEG quality,
  noise, burned-in text and markers, segmentation-edge jitter; then a small affine;
- per-source class balance: every training source contributes abnormal and normal images equally
  (sampling), so "which archive" carries no label information in expectation;
- the COVID-19 head is trained only inside the one source that has COVID-19 *and* other
  pneumonia *and* normal images (ieee8023), so it cannot use the archive at all;
- figure1 is held out completely: an external source for the card ("train without figure1, test
  on figure1"); the test split of the others is never read here;
- selection on a pre-declared validation metric: within-NIH Lung Opacity AUC (pneumonia vs normal
  from one hospital), the one comparison the archive cannot explain.
Starts from the v1 weights (our own, trained on the same images); conv0..transition1 frozen.
Research use only, not for diagnostic use.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

HELD_OUT_SOURCES = ("figure1",)
COVID_HEAD_SOURCE = "ieee8023"
CACHE_NAME = "xray-lung-v2"


# ----------------------------------------------------------------------------------------------
# Cache: raw lung crops (uint8) + masks + zones for every labelled image
# ----------------------------------------------------------------------------------------------

def build_cache(data: Path, out: Path, lungs_fn: Callable, log: Callable[[str], None] = print) -> Path:
    """Run the segmentation once per image and store ``crop_raw`` outputs (uint8) in safetensors."""
    import torch
    from safetensors.torch import save_file

    from engine.training.datasets import load_gray01, read_csv_rows, xray_dir
    from engine.ai.preprocess.xray_lung_input import RAW_SIDE, crop_raw

    d = xray_dir(data)
    rows = read_csv_rows(d / "labels.csv")
    n = len(rows)
    crops = np.zeros((n, RAW_SIDE, RAW_SIDE), np.uint8)
    masks = np.zeros((n, RAW_SIDE, RAW_SIDE), np.uint8)
    zones = np.zeros((n, RAW_SIDE, RAW_SIDE), np.uint8)
    ok = np.zeros(n, np.uint8)
    t0 = time.time()
    for i, r in enumerate(rows):
        g = load_gray01(d / r["path"])
        try:
            lungs = lungs_fn(g)
            c, m, z, _ = crop_raw(g, lungs.mask, lungs.zones)
            crops[i] = np.round(c * 255).astype(np.uint8)
            masks[i] = m.astype(np.uint8)
            zones[i] = z if z is not None else 0
            ok[i] = 1
        except ValueError:
            pass  # no lungs found: recorded as not ok, left out of training
        if (i + 1) % 100 == 0:
            log(f"[cache] {i + 1}/{n} images ({time.time() - t0:.0f} s)")
    out.mkdir(parents=True, exist_ok=True)
    f = out / f"{CACHE_NAME}.safetensors"
    tmp = f.with_suffix(".tmp")
    save_file({"crops": torch.from_numpy(crops), "masks": torch.from_numpy(masks),
               "zones": torch.from_numpy(zones), "ok": torch.from_numpy(ok)}, str(tmp))
    tmp.replace(f)
    f.with_suffix(".json").write_text(json.dumps({"paths": [r["path"] for r in rows]}))
    log(f"[cache] done: {int(ok.sum())}/{n} with lungs, {time.time() - t0:.0f} s")
    return f


def load_cache(data: Path, cache: Path) -> tuple[list[dict[str, str]], dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    from engine.training.datasets import read_csv_rows, xray_dir

    rows = read_csv_rows(xray_dir(data) / "labels.csv")
    f = cache / f"{CACHE_NAME}.safetensors"
    meta = json.loads(f.with_suffix(".json").read_text())
    if meta["paths"] != [r["path"] for r in rows]:
        raise ValueError(f"{f} was built from another labels.csv: delete it and rebuild")
    return rows, load_file(str(f))


# ----------------------------------------------------------------------------------------------
# Augmentation on the raw crop: erase archive cues
# ----------------------------------------------------------------------------------------------

def augment_raw(crop01: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Archive-cue augmentations on a raw crop [0,1] and its binary mask (both RAW_SIDE)."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    x = crop01.astype(np.float32)
    s = x.shape[0]
    if rng.random() < 0.5:  # resolution loss (small archives, thumbnails)
        f = rng.uniform(0.35, 0.9)
        im = Image.fromarray(np.round(x * 255).astype(np.uint8))
        im = im.resize((max(16, int(s * f)),) * 2, Image.BILINEAR).resize((s, s), Image.BILINEAR)
        x = np.asarray(im, np.float32) / 255.0
    if rng.random() < 0.4:
        x = ndimage.gaussian_filter(x, sigma=rng.uniform(0.4, 1.8))
    if rng.random() < 0.4:  # burned-in text / arrows / markers, as on web and paper figures
        im = Image.fromarray(np.round(x * 255).astype(np.uint8))
        dr = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = int(rng.integers(0, s - 20)), int(rng.integers(0, s - 12))
            val = int(rng.choice([0, 255]))
            if rng.random() < 0.5:
                dr.text((x0, y0), "".join(chr(int(c)) for c in rng.integers(65, 91, size=int(rng.integers(1, 5)))), fill=val)
            else:
                dr.line([(x0, y0), (x0 + int(rng.integers(8, 30)), y0 + int(rng.integers(-15, 15)))], fill=val,
                        width=int(rng.integers(1, 4)))
        x = np.asarray(im, np.float32) / 255.0
    if rng.random() < 0.3:
        x = x + rng.normal(0, rng.uniform(0.005, 0.03), x.shape).astype(np.float32)
    if rng.random() < 0.5:  # JPEG quality
        im = Image.fromarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(25, 95)))
        buf.seek(0)
        x = np.asarray(Image.open(buf).convert("L"), np.float32) / 255.0
    m = mask.astype(bool)
    if rng.random() < 0.5:  # segmentation-edge jitter
        it = int(rng.integers(1, 6))
        m = ndimage.binary_dilation(m, iterations=it) if rng.random() < 0.5 else ndimage.binary_erosion(m, iterations=it)
    return np.clip(x, 0, 1), m


def affine_batch(x, rng: np.random.Generator, rot_deg: float = 7.0, scale=(0.92, 1.08), shift: float = 0.05):
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    a = torch.tensor(rng.uniform(-rot_deg, rot_deg, n) * math.pi / 180, dtype=torch.float32)
    sc = torch.tensor(rng.uniform(*scale, n), dtype=torch.float32)
    tx = torch.tensor(rng.uniform(-shift, shift, n), dtype=torch.float32)
    ty = torch.tensor(rng.uniform(-shift, shift, n), dtype=torch.float32)
    th = torch.zeros(n, 2, 3)
    th[:, 0, 0], th[:, 0, 1], th[:, 0, 2] = torch.cos(a) / sc, -torch.sin(a) / sc, tx
    th[:, 1, 0], th[:, 1, 1], th[:, 1, 2] = torch.sin(a) / sc, torch.cos(a) / sc, ty
    grid = F.affine_grid(th, list(x.shape), align_corners=False)
    # pad with the model's black (-1024): outside the lungs is black already
    return F.grid_sample(x + 1024.0, grid, align_corners=False, padding_mode="zeros") - 1024.0


# ----------------------------------------------------------------------------------------------
# Targets and sampling
# ----------------------------------------------------------------------------------------------

def targets(rows: list[dict[str, str]]):
    """(opacity (N,) float: 1 abnormal / 0 normal; pneumonia (N,) float with NaN = masked;
    covid (N,) long: 0 COVID-19, 1 other pneumonia, 2 normal, -1 = masked (outside ieee8023))."""
    op = np.array([0.0 if r["label"] == "normal" else 1.0 for r in rows], np.float32)
    pn = np.array([np.nan if r["label"] == "other_finding" else (0.0 if r["label"] == "normal" else 1.0)
                   for r in rows], np.float32)
    cmap = {"covid": 0, "other_pneumonia": 1, "normal": 2}
    cv = np.array([cmap.get(r["label"], -1) if r["source"] == COVID_HEAD_SOURCE else -1 for r in rows], np.int64)
    return op, pn, cv


def balanced_sampler(rows: list[dict[str, str]], idx: np.ndarray, rng: np.random.Generator):
    """Yield training indices: source ~ sqrt(size), then abnormal/normal 50:50, then uniform."""
    cells: dict[str, dict[int, list[int]]] = {}
    for i in idx:
        r = rows[i]
        cells.setdefault(r["source"], {}).setdefault(0 if r["label"] == "normal" else 1, []).append(int(i))
    srcs = sorted(cells)
    ps = np.array([math.sqrt(sum(len(v) for v in cells[s].values())) for s in srcs])
    ps /= ps.sum()
    while True:
        s = srcs[int(rng.choice(len(srcs), p=ps))]
        cls = list(cells[s])
        c = cls[int(rng.integers(len(cls)))]
        yield cells[s][c][int(rng.integers(len(cells[s][c])))]


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

FROZEN_PREFIXES = ("features.conv0", "features.norm0", "features.denseblock1", "features.transition1")


def build_model(init: Path | None):
    import torch

    from engine.ai.models.densenet_xray import XRayDenseNet

    m = XRayDenseNet()
    if init is not None and init.is_file():
        from safetensors.torch import load_file

        sd = {k: v.float() for k, v in load_file(str(init)).items()}
        missing, unexpected = m.load_state_dict(sd, strict=False)
        print(f"[train] init from {init.name}: {len(missing)} missing, {len(unexpected)} unexpected keys", flush=True)
    for n, p in m.named_parameters():
        if n.startswith(FROZEN_PREFIXES):
            p.requires_grad_(False)
    return m


def model_inputs(crops: np.ndarray, masks: np.ndarray, idx, rng: np.random.Generator | None, side: int):
    import torch

    from engine.ai.preprocess.xray_lung_input import normalise_crop, to_model

    xs = []
    for i in idx:
        c = crops[i].astype(np.float32) / 255.0
        m = masks[i].astype(bool)
        if rng is not None:
            c, m = augment_raw(c, m, rng)
        xs.append(to_model(normalise_crop(c, m), side))
    return torch.stack(xs)


def predict(model, crops, masks, idx, side: int, batch: int = 32):
    """(opacity logit, pneumonia logit, covid logits (N,3), pooled features (N,1024)) for rows ``idx``."""
    import torch
    import torch.nn.functional as F

    from engine.ai.models.densenet_xray import LUNG_OPACITY_INDEX, XRV_PATHOLOGIES

    pj = XRV_PATHOLOGIES.index("Pneumonia")
    model.eval()
    ops, pns, cvs, fs = [], [], [], []
    with torch.inference_mode():
        for k in range(0, len(idx), batch):
            x = model_inputs(crops, masks, idx[k:k + batch], None, side)
            fm = model.feature_map(x)
            out = model.head(fm)
            ops.append(out["pathologies"][:, LUNG_OPACITY_INDEX].numpy())
            pns.append(out["pathologies"][:, pj].numpy())
            cvs.append(out["covid"].numpy())
            fs.append(F.adaptive_avg_pool2d(F.relu(fm), 1).flatten(1).numpy())
    return np.concatenate(ops), np.concatenate(pns), np.concatenate(cvs), np.concatenate(fs)


def auc(y: np.ndarray, s: np.ndarray) -> float:
    from engine.metrics import roc_auc

    return float(roc_auc(y, s))


def val_metric(rows, op_logit: np.ndarray, idx: np.ndarray) -> float:
    """Pre-declared selection metric: within-NIH Lung Opacity AUC on the validation split."""
    sel = [k for k, i in enumerate(idx) if rows[i]["source"] == "nih_cxr8_talo"]
    y = np.array([0 if rows[idx[k]]["label"] == "normal" else 1 for k in sel])
    return auc(y, op_logit[sel])


def train(data: Path, cache: Path, out: Path, *, init: Path | None, budget_s: float, side: int, batch: int,
          lr: float, threads: int, seed: int, eval_every: int) -> dict:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from engine.ai.models.densenet_xray import LUNG_OPACITY_INDEX, XRV_PATHOLOGIES

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    rows, arr = load_cache(data, cache)
    crops, masks, ok = arr["crops"], arr["masks"], arr["ok"].astype(bool)
    op_t, pn_t, cv_t = targets(rows)
    tr = np.array([i for i, r in enumerate(rows) if r["split"] == "train" and ok[i]
                   and r["source"] not in HELD_OUT_SOURCES])
    va = np.array([i for i, r in enumerate(rows) if r["split"] == "val" and ok[i]
                   and r["source"] not in HELD_OUT_SOURCES])
    model = build_model(init)
    head_names = ("classifier", "covid_head")
    params = [{"params": [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(head_names)],
               "lr": lr},
              {"params": [p for n, p in model.named_parameters() if n.startswith(head_names)], "lr": lr * 5}]
    opt = torch.optim.AdamW(params, weight_decay=1e-4)
    pj = XRV_PATHOLOGIES.index("Pneumonia")
    sampler = balanced_sampler(rows, tr, rng)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "train.log", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    log(f"[train] {len(tr)} train / {len(va)} val images; side {side}; budget {budget_s:.0f} s")
    t0 = time.time()
    step, best, hist = 0, -1.0, []
    base = [g["lr"] for g in opt.param_groups]
    while True:
        el = time.time() - t0
        if el > budget_s:
            break
        frac = min(1.0, el / budget_s)
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * (0.03 + 0.97 * 0.5 * (1 + math.cos(math.pi * frac))) * min(1.0, (step + 1) / 20)
        model.train()
        for mod in model.modules():  # frozen BatchNorms keep their running statistics
            if isinstance(mod, torch.nn.BatchNorm2d) and not any(p.requires_grad for p in mod.parameters()):
                mod.eval()
        bi = np.array([next(sampler) for _ in range(batch)])
        x = affine_batch(model_inputs(crops, masks, bi, rng, side), rng)
        out_ = model(x)
        lo = out_["pathologies"][:, LUNG_OPACITY_INDEX]
        loss = F.binary_cross_entropy_with_logits(lo, torch.from_numpy(op_t[bi]))
        pmask = ~np.isnan(pn_t[bi])
        if pmask.any():
            loss = loss + F.binary_cross_entropy_with_logits(out_["pathologies"][torch.from_numpy(pmask), pj],
                                                             torch.from_numpy(pn_t[bi][pmask]))
        cmask = cv_t[bi] >= 0
        if cmask.any():
            loss = loss + 0.5 * F.cross_entropy(out_["covid"][torch.from_numpy(cmask)], torch.from_numpy(cv_t[bi][cmask]),
                                                weight=torch.tensor([1.0, 2.0, 4.0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 10 == 0:
            log(f"[train] step {step} loss {loss.item():.3f} {step * batch / (time.time() - t0):.2f} img/s")
        if step % eval_every == 0 or time.time() - t0 > budget_s:
            op, _, _, _ = predict(model, crops, masks, va, side)
            m = val_metric(rows, op, va)
            hist.append({"step": step, "seconds": round(time.time() - t0), "val_nih_opacity_auc": m})
            log(f"[train] step {step}: val within-NIH opacity AUC {m:.3f} (best {best:.3f})")
            if m > best:
                best = m
                sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
                save_file(sd, str(out / "best.tmp"))
                (out / "best.tmp").replace(out / "best.safetensors")
            (out / "history.json").write_text(json.dumps({"hist": hist, "best": best, "side": side, "batch": batch,
                                                           "lr": lr, "seed": seed, "steps": step,
                                                           "frozen": list(FROZEN_PREFIXES),
                                                           "held_out_sources": list(HELD_OUT_SOURCES)}, indent=1))
    log(f"[train] done: {step} steps, best val within-NIH opacity AUC {best:.3f}")
    return {"best": best, "steps": step}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="main.py train-xray-lung", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="shared/data (or shared/data/xray)")
    p.add_argument("--cache", default="train-cache", help="folder for the lung-crop cache (git-ignored)")
    p.add_argument("--out", required=True)
    p.add_argument("--init", default="",
                   help="safetensors to start from; the shipped 2.0.0 started from the 1.0.0 weights "
                        "(git show d6236cb:resources/models/xray-densenet121-1.0.0.safetensors > v1.safetensors)")
    p.add_argument("--budget-min", type=float, default=45.0)
    p.add_argument("--side", type=int, default=192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=60)
    p.add_argument("--build-cache-only", action="store_true")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    data, cache = Path(a.data), Path(a.cache)
    if not (cache / f"{CACHE_NAME}.safetensors").is_file():
        from engine.ai.preprocess.xray_lungs import segment_lungs_xray

        build_cache(data, cache, segment_lungs_xray)
    if a.build_cache_only:
        return 0
    train(data, cache, Path(a.out), init=Path(a.init) if a.init else None, budget_s=a.budget_min * 60,
          side=a.side, batch=a.batch, lr=a.lr, threads=a.threads, seed=a.seed, eval_every=a.eval_every)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
