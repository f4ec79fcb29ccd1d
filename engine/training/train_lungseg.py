"""Train the chest X-ray lung U-Net: ``python -m engine.training.train_lungseg --data DIR --out runs/lungseg``.

Data: data/xray/lung_masks (V7 Labs masks on 432 ieee8023 images; 255 lung, 127 "ignore" =
devices or markup over the lung, excluded from the loss; patient-level split column). Images are
letterboxed and resized once with the inference preprocessing (engine/ai/preprocess/xray_lungs.py)
and cached as npz under the run folder; each epoch then augments for robustness to archives the
masks do not cover (NIH, DICOM CR/DX): affine, gamma, contrast, blur, noise, JPEG quality,
resolution down-up and burned-in text boxes. No inversion: MONOCHROME1 is inverted upstream
(engine.dicom.pixels), so an inverted image is an input error, left to the anatomy gate.
No horizontal flips either: the classes are the patient's right and left lung, fixed by position.

The model is selected on the validation split (mean Dice of both lungs); the test split is only
touched by engine.training.evaluate_lungseg. Research use only, not for diagnostic use.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import time
from pathlib import Path

import numpy as np

from engine.ai.preprocess.xray_lungs import SEG_SIZE, letterbox, normalise_intensity, split_lr_labels

IGNORE = 255


# ---------------------------------------------------------------- data

def read_mask_rows(data_root: Path) -> list[dict[str, str]]:
    with open(data_root / "xray" / "lung_masks.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_pair(data_root: Path, row: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """(gray01 float32, labels uint8 with 0/1/2 and IGNORE) at the image's own resolution."""
    from PIL import Image

    base = data_root / "xray"
    with Image.open(base / row["path"]) as im:
        gray = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    with Image.open(base / row["mask"]) as im:
        m = np.asarray(im.convert("L"))
    if m.shape != gray.shape:
        raise ValueError(f"mask {row['mask']} is {m.shape} but its image is {gray.shape}")
    lab = split_lr_labels(m >= 192)
    lab[(m > 63) & (m < 192)] = IGNORE
    return gray, lab


def build_cache(data_root: Path, cache: Path, size: int = SEG_SIZE) -> dict[str, np.ndarray]:
    """Letterboxed images (uint8), valid masks, labels, split and patient of every masked image."""
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    rows = read_mask_rows(data_root)
    imgs, valids, labs = [], [], []
    for row in rows:
        gray, lab = load_pair(data_root, row)
        img, valid, _ = letterbox(gray, size)
        lab_sq, _, _ = letterbox(lab.astype(np.float32), size, order=0)
        imgs.append(np.round(img * 255).astype(np.uint8))
        valids.append(valid)
        labs.append(lab_sq.astype(np.uint8))
    out = {"img": np.stack(imgs), "valid": np.stack(valids), "lab": np.stack(labs),
           "split": np.array([r["split"] for r in rows]), "patient": np.array([r["patient_id"] for r in rows]),
           "path": np.array([r["path"] for r in rows])}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".tmp.npz")
    np.savez_compressed(tmp, **out)
    tmp.replace(cache)
    return out


# ---------------------------------------------------------------- augmentation

def _affine(img: np.ndarray, valid: np.ndarray, lab: np.ndarray, rng: np.random.Generator):
    from scipy import ndimage

    n = img.shape[0]
    ang = math.radians(rng.uniform(-10, 10))
    s = rng.uniform(0.85, 1.15)
    aspect = rng.uniform(0.92, 1.08)
    shear = rng.uniform(-0.06, 0.06)
    rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    mat = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([1.0 / (s * aspect), 1.0 / (s / aspect)])
    c = np.array([n / 2, n / 2])
    shift = rng.uniform(-0.08, 0.08, size=2) * n
    off = c - mat @ (c + shift)
    a_img = ndimage.affine_transform(img, mat, off, order=1, mode="constant", cval=0.0)
    a_val = ndimage.affine_transform(valid.astype(np.float32), mat, off, order=1, mode="constant") > 0.5
    a_lab = ndimage.affine_transform(lab, mat, off, order=0, mode="constant", cval=0)
    return a_img, a_val, a_lab


def _text_boxes(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Burned-in annotations: letters, dates and markers in white or black, sometimes on a box."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    n = img.shape[0]
    chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/:.-"
    for _ in range(int(rng.integers(1, 4))):
        x, y = int(rng.integers(0, n - 20)), int(rng.integers(0, n - 10))
        text = "".join(rng.choice(list(chars), size=int(rng.integers(1, 9))))
        ink = 255 if rng.random() < 0.7 else 0
        if rng.random() < 0.3:
            w, h = int(rng.integers(10, 60)), int(rng.integers(8, 24))
            draw.rectangle([x, y, x + w, y + h], fill=255 - ink)
        draw.text((x + 1, y + 1), text, fill=ink, font_size=int(rng.integers(8, 22)))
    return np.asarray(pil, dtype=np.float32) / 255.0


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im, dtype=np.float32) / 255.0


def augment(img8: np.ndarray, valid: np.ndarray, lab: np.ndarray, rng: np.random.Generator):
    """One training sample: (uint8 image, valid, labels) -> (model input float32, labels)."""
    from PIL import Image
    from scipy import ndimage

    img = img8.astype(np.float32) / 255.0
    if rng.random() < 0.9:
        img, valid, lab = _affine(img, valid, lab, rng)
    n = img.shape[0]
    if rng.random() < 0.3:                                   # acquisition / web resolution
        small = max(16, int(n * rng.uniform(0.25, 0.7)))
        pil = Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8))
        img = np.asarray(pil.resize((small, small), Image.BILINEAR).resize((n, n), Image.BILINEAR),
                         dtype=np.float32) / 255.0
    if rng.random() < 0.3:
        img = ndimage.gaussian_filter(img, rng.uniform(0.5, 1.8))
    if rng.random() < 0.8:                                   # detector response / VOI differences
        img = np.clip(img, 0, 1) ** math.exp(rng.uniform(-0.5, 0.5))
        img = (img - 0.5) * rng.uniform(0.7, 1.3) + 0.5 + rng.uniform(-0.1, 0.1)
    if rng.random() < 0.4:
        img = _text_boxes(img, rng)
    if rng.random() < 0.4:
        img = img + rng.normal(0, rng.uniform(0.005, 0.04), img.shape).astype(np.float32)
    if rng.random() < 0.4:
        img = _jpeg(img, int(rng.integers(15, 90)))
    img = np.where(valid, np.clip(img, 0, 1), 0.0)
    return normalise_intensity(img, valid), lab


# ---------------------------------------------------------------- training

def dice_scores(pred: np.ndarray, lab: np.ndarray) -> tuple[float, float, float]:
    """Dice (right, left, both lungs) of label images, ignoring IGNORE pixels."""
    keep = lab != IGNORE
    out = []
    for cls in (1, 2, None):
        p = (pred > 0) if cls is None else (pred == cls)
        t = (lab > 0) & (lab != IGNORE) if cls is None else (lab == cls)
        p, t = p & keep, t & keep
        denom = p.sum() + t.sum()
        out.append(1.0 if denom == 0 else 2.0 * float((p & t).sum()) / float(denom))
    return out[0], out[1], out[2]


def loss_fn(logits, target):
    """Cross-entropy + soft Dice of the two lung classes (Milletari et al., V-Net, 2016): the
    Dice term keeps the thin costophrenic angles from being traded away for background pixels."""
    import torch
    import torch.nn.functional as F

    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    keep = (target != IGNORE).unsqueeze(1).float()
    prob = logits.float().softmax(1) * keep
    onehot = F.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * keep
    inter = (prob * onehot).sum((0, 2, 3))[1:]
    denom = (prob + onehot).sum((0, 2, 3))[1:]
    dice = (2 * inter + 1) / (denom + 1)
    return ce + (1 - dice.mean())


def validate(model, data: dict[str, np.ndarray], idx: np.ndarray, batch: int = 16) -> float:
    import torch

    model.eval()
    scores = []
    with torch.no_grad():
        for i in range(0, len(idx), batch):
            j = idx[i:i + batch]
            x = np.stack([normalise_intensity(data["img"][k].astype(np.float32) / 255, data["valid"][k]) for k in j])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = model(torch.from_numpy(x)[:, None]).float().argmax(1).numpy()
            scores += [dice_scores(p, data["lab"][k])[:2] for p, k in zip(pred, j)]
    model.train()
    return float(np.mean(scores))


def train(data_root: Path, out: Path, *, budget_s: float = 22 * 60, batch: int = 8, lr: float = 2e-3,
          threads: int = 2, seed: int = 0, base: int = 16, levels: int = 5) -> Path:
    import torch
    from safetensors.torch import save_file

    from engine.ai.models.lung_unet import LungUNet

    t0 = time.time()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    data = build_cache(data_root, out / f"cache-{SEG_SIZE}.npz")
    tr = np.flatnonzero(data["split"] == "train")
    va = np.flatnonzero(data["split"] == "val")
    print(f"cache ready in {time.time() - t0:.0f}s: train {len(tr)}, val {len(va)}", flush=True)
    model = LungUNet(base=base, levels=levels)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    run = {"architecture": "LungUNet", "arch_params": {"base": base, "levels": levels}, "size": SEG_SIZE,
           "batch": batch, "lr": lr, "budget_s": budget_s, "seed": seed, "threads": threads,
           "n_train": int(len(tr)), "n_val": int(len(va)), "history": []}
    best, epoch, t_train = -1.0, 0, time.time()
    while time.time() - t0 < budget_s:
        epoch += 1
        perm = rng.permutation(tr)
        losses = []
        for i in range(0, len(perm) - batch + 1, batch):
            frac = min(1.0, (time.time() - t_train) / max(1.0, budget_s - (t_train - t0)))
            for g in opt.param_groups:
                g["lr"] = lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
            xs, ys = zip(*(augment(data["img"][k], data["valid"][k], data["lab"][k], rng) for k in perm[i:i + batch]))
            x = torch.from_numpy(np.stack(xs))[:, None]
            y = torch.from_numpy(np.stack(ys).astype(np.int64))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if time.time() - t0 > budget_s:
                break
        vd = validate(model, data, va)
        run["history"].append({"epoch": epoch, "loss": float(np.mean(losses)), "val_dice": vd,
                               "elapsed_s": round(time.time() - t0)})
        print(f"epoch {epoch} loss {np.mean(losses):.4f} val dice {vd:.4f} ({time.time() - t0:.0f}s)", flush=True)
        if vd > best:
            best = vd
            run["best_epoch"], run["best_val_dice"] = epoch, vd
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(out / "best.tmp.safetensors"))
            (out / "best.tmp.safetensors").replace(out / "best.safetensors")
        tmp = out / "run.tmp.json"
        tmp.write_text(json.dumps(run, indent=2))
        tmp.replace(out / "run.json")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the shared data folder holding xray/lung_masks.csv")
    ap.add_argument("--out", required=True, help="run folder (git-ignored, e.g. runs/lungseg)")
    ap.add_argument("--budget-min", type=float, default=22.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--base", type=int, default=16, help="channels of the first U-Net level")
    a = ap.parse_args(argv)
    train(Path(a.data), Path(a.out), budget_s=a.budget_min * 60, batch=a.batch, lr=a.lr, threads=a.threads,
          base=a.base)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
