"""``python main.py train xray|ct --data DIR --out DIR [--epochs N --size S --resume ...]``.

CPU-first training (2 shared cores; a GPU is used when present): images are preprocessed once
with exactly the inference preprocessing and cached (engine.training.datasets), then the loop trains with
radiograph-appropriate augmentation (small rotation/scale/shift, contrast/gamma; for CT the lung
crop is re-rendered before the shared per-lung normalisation, engine.ai.preprocess.ct_input, with
horizontal flips since COVID-vs-non-COVID is laterality-free), source-balanced sampling, a wall-clock
budget, early stopping and model selection on the validation split, deterministic seeds and a
resumable checkpoint every epoch. The X-ray test split is never touched here.
Research use only, not for diagnostic use.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass
class TrainConfig:
    epochs: int = 12
    batch: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    budget_s: float = 0.0          # wall-clock budget (0 = none); stops after the epoch that exceeds it
    patience: int = 5              # epochs without val improvement before early stop
    seed: int = 0
    threads: int = 2
    samples_per_epoch: int = 0     # 0 = size of the training set
    log_every: int = 10
    bf16: bool = False             # CPU autocast to bfloat16 (AVX512-BF16/AMX CPUs: ~1.4x faster here)
    extra: dict = field(default_factory=dict)


def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, warmup: int, base: float, time_frac: float = 0.0) -> float:
    """Linear warm-up then cosine decay to 2% of ``base``. Progress is the larger of the step
    fraction and ``time_frac`` (elapsed / wall budget), so a budget-limited run still anneals."""
    if step < warmup:
        return base * (step + 1) / max(1, warmup)
    p = max((step - warmup) / max(1, total - warmup), time_frac)
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def augment_batch(x, *, rot_deg: float = 7.0, scale: tuple[float, float] = (0.92, 1.10), shift: float = 0.06,
                  gamma: tuple[float, float] = (0.75, 1.35), contrast: float = 0.10, hflip: bool = False,
                  value_range: tuple[float, float] = (-1024.0, 1024.0), generator=None):
    """Random affine + gamma/contrast on a (N, C, H, W) batch in ``value_range``.

    Radiograph-appropriate: small rotations/shifts/zoom as from patient positioning, gamma and
    contrast as from exposure/processing differences between sites. No vertical flips; horizontal
    flips only when asked (CT), since chest X-ray anatomy is not left-right symmetric.
    """
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    g = generator

    def u(lo, hi):
        return torch.rand(n, generator=g) * (hi - lo) + lo

    ang = u(-rot_deg, rot_deg) * math.pi / 180.0
    sc = u(*scale)
    tx, ty = u(-shift, shift), u(-shift, shift)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    if hflip:
        flip = (torch.rand(n, generator=g) < 0.5).float() * -2 + 1
        theta[:, 0, 0] *= flip
        theta[:, 1, 0] *= flip
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    lo, hi = value_range
    z = ((x - lo) / (hi - lo)).clamp(0, 1)
    z = z ** u(*gamma).view(n, 1, 1, 1)
    c = u(1 - contrast, 1 + contrast).view(n, 1, 1, 1)
    b = u(-contrast / 2, contrast / 2).view(n, 1, 1, 1)
    z = ((z - 0.5) * c + 0.5 + b).clamp(0, 1)
    return z * (hi - lo) + lo


def save_checkpoint(path: Path, model, opt, hist: dict, epoch: int) -> None:
    """Resumable checkpoint without pickles: tensors in safetensors, the rest in a JSON sidecar.

    Written atomically (temp + rename), tensors first, so a killed run leaves the previous pair
    or the new one."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{name}"] = v.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    np_state = np.random.get_state()
    tensors["rng.numpy_keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    meta = {"hist": hist, "epoch": epoch, "param_groups": osd["param_groups"],
            "opt_scalars": {str(pid): {n: v for n, v in st.items() if not torch.is_tensor(v)}
                            for pid, st in osd["state"].items()},
            "numpy_rng": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    tmp_meta = path.with_suffix(".json.tmp")
    tmp_meta.write_text(json.dumps(meta, default=float))
    tmp_meta.replace(path.with_suffix(".json"))


def load_checkpoint(path: Path) -> dict:
    """Inverse of :func:`save_checkpoint` (safetensors + JSON; never unpickles)."""
    from safetensors.torch import load_file

    t = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    model = {k[len("model."):]: v for k, v in t.items() if k.startswith("model.")}
    state: dict = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, sc in meta.get("opt_scalars", {}).items():
        state.setdefault(int(pid), {}).update(sc)
    name, pos, has_gauss, cached = meta["numpy_rng"]
    np_rng = (name, t["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached)
    return {"model": model, "opt": {"state": state, "param_groups": meta["param_groups"]}, "hist": meta["hist"],
            "epoch": meta["epoch"], "torch_rng": t["rng.torch"], "np_rng": np_rng}


def fit(model, x_train, loss_fn: Callable, evaluate: Callable, cfg: TrainConfig, out: Path,
        weights: np.ndarray | None = None, augment: Callable | None = None, resume: bool = False,
        log: Callable[[str], None] = print) -> dict:
    """Generic loop. ``loss_fn(model, xb, idx)`` -> scalar loss for training rows ``idx``;
    ``evaluate(model)`` -> (score to maximise, metrics dict). Writes ``out/last.safetensors`` (+ .json) every epoch
    (resumable) and ``out/best.safetensors`` (fp32) whenever the val score improves."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    device = next(model.parameters()).device
    n = len(x_train)
    per_epoch = cfg.samples_per_epoch or n
    steps_per_epoch = max(1, per_epoch // cfg.batch)
    total = steps_per_epoch * cfg.epochs
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    hist: dict = {"epochs": [], "best_score": -math.inf, "best_epoch": -1, "config": asdict(cfg),
                  "train_seconds": 0.0, "stopped": ""}
    start_epoch = 0
    ck = out / "last.safetensors"
    if resume and ck.is_file() and ck.with_suffix(".json").is_file():
        state = load_checkpoint(ck)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        hist = state["hist"]
        start_epoch = state["epoch"] + 1
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["np_rng"])
        log(f"[train] resumed from {ck} at epoch {start_epoch}")
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + start_epoch)
    w = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
    no_improve = 0
    if hist["epochs"]:
        no_improve = hist["epochs"][-1]["epoch"] - hist["best_epoch"]
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        model.train()
        if w is not None:
            order = torch.multinomial(w, steps_per_epoch * cfg.batch, replacement=True, generator=gen)
        else:
            order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(
                steps_per_epoch * cfg.batch / n))])[:steps_per_epoch * cfg.batch]
        run_loss = 0.0
        for s in range(steps_per_epoch):
            step = epoch * steps_per_epoch + s
            for gp in opt.param_groups:
                gp["lr"] = lr_at(step, total, warm, cfg.lr,
                                 (hist["train_seconds"] + time.time() - t0) / cfg.budget_s if cfg.budget_s else 0.0)
            idx = order[s * cfg.batch:(s + 1) * cfg.batch]
            xb = x_train[idx].float()
            if augment is not None:
                xb = augment(xb, generator=gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = loss_fn(model, xb.to(device), idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run_loss += float(loss.detach())
            if cfg.log_every and (s + 1) % cfg.log_every == 0:
                el = time.time() - t0
                log(f"[train] epoch {epoch + 1}/{cfg.epochs} step {s + 1}/{steps_per_epoch} "
                    f"loss {run_loss / (s + 1):.4f} {(s + 1) * cfg.batch / el:.1f} img/s")
        model.eval()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            score, metrics = evaluate(model)
        dt = time.time() - t0
        hist["train_seconds"] += dt
        rec = {"epoch": epoch + 1, "loss": run_loss / steps_per_epoch, "val_score": score,
               "val": metrics, "seconds": round(dt, 1)}
        hist["epochs"].append(rec)
        improved = score > hist["best_score"]
        if improved:
            hist["best_score"], hist["best_epoch"] = score, epoch + 1
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                      str(out / "best.safetensors"))
            no_improve = 0
        else:
            no_improve += 1
        best_note = "(best)" if improved else "(best %.4f @ %d)" % (hist["best_score"], hist["best_epoch"])
        log(f"[train] epoch {epoch + 1} done in {dt:.0f}s: loss {rec['loss']:.4f} val score {score:.4f} "
            f"{best_note} "
            + " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
        save_checkpoint(ck, model, opt, hist, epoch)
        (out / "history.json").write_text(json.dumps(hist, indent=1, default=float))
        if no_improve >= cfg.patience:
            hist["stopped"] = f"early stop: no val improvement for {cfg.patience} epochs"
            break
        if cfg.budget_s and hist["train_seconds"] > cfg.budget_s:
            hist["stopped"] = f"wall-clock budget of {cfg.budget_s:.0f}s reached"
            break
    else:
        hist["stopped"] = hist["stopped"] or "all epochs run"
    log(f"[train] {hist['stopped']}; best val score {hist['best_score']:.4f} at epoch {hist['best_epoch']}")
    (out / "history.json").write_text(json.dumps(hist, indent=1, default=float))
    return hist


# ---------------------------------------------------------------- task definitions
def predict(model, x, batch: int = 32, key: str | None = None):
    """Forward in batches without gradients; returns logits (dict of tensors for the X-ray model)."""
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            o = model(x[i:i + batch].float())
            outs.append(o if key is None else o[key])
    if isinstance(outs[0], dict):
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return torch.cat(outs)


def xray_task(ds, cfg: TrainConfig, balance: str):
    """Loss, evaluation, sampling weights for the X-ray model on ``ds`` (an ImageSet)."""
    import torch
    import torch.nn.functional as F

    from engine import metrics as M
    from engine.training.datasets import source_balanced_weights, xray_targets

    tr, va = ds.indices("train"), ds.indices("val")
    rows_tr = [ds.rows[i] for i in tr]
    cov, ptgt, pmask = xray_targets(rows_tr)
    power = {"source": 0.5, "none": 1.0}[balance]
    # other_finding (5 ARDS/lipoid images) is sampled with the other non-COVID abnormal images
    grp = [{"g": "other_pneumonia" if r["label"] == "other_finding" else r["label"], "source": r["source"]}
           for r in rows_tr]
    weights = source_balanced_weights(grp, label_key="g", power=power)

    def loss_fn(model, xb, idx):
        out = model(xb)
        c = cov[idx]
        keep = c >= 0
        out = {k: v.float() for k, v in out.items()}
        l_cov = F.cross_entropy(out["covid"][keep], c[keep], label_smoothing=0.05) if keep.any() else 0.0
        m = pmask[idx]
        bce = F.binary_cross_entropy_with_logits(out["pathologies"], ptgt[idx], reduction="none")
        l_path = (bce * m).sum() / m.sum().clamp(min=1)
        return l_cov + 0.5 * l_path

    xv = ds.x[va]
    rows_va = [ds.rows[i] for i in va]
    y_cov = np.array([r["label"] == "covid" for r in rows_va], dtype=int)
    src = np.array([r["source"] for r in rows_va])

    def evaluate(model):
        out = predict(model, xv)
        p = torch.softmax(out["covid"].float(), 1)[:, 0].numpy()
        auc_all = M.roc_auc(y_cov, p)
        sel = src == "ieee8023"
        auc_ieee = M.roc_auc(y_cov[sel], p[sel])
        return 0.5 * auc_all + 0.5 * auc_ieee, {"auc_covid": auc_all, "auc_covid_ieee8023": auc_ieee}

    return ds.x[tr], loss_fn, evaluate, weights


def ct_task(ds, cfg: TrainConfig, balance: str):
    """Loss, evaluation and sampling weights for the CT slice classifier.

    ``ds.x`` holds (N, 2, S, S) [lung-window grey crop, lung mask] (engine.training.datasets.encode_ct_slice);
    training batches are re-rendered and normalised by ``augment_ct_batch``, validation batches only
    normalised (``ct_batch_input``), i.e. exactly what the app feeds the model. Selection rule, fixed
    before training: the epoch with the highest validation slice AUC (earliest on ties).
    """
    import torch
    import torch.nn.functional as F

    from engine import metrics as M
    from engine.training.datasets import ct_batch_input, ct_targets, source_balanced_weights

    tr, va = ds.indices("train"), ds.indices("val")
    rows_tr = [ds.rows[i] for i in tr]
    y = ct_targets(rows_tr)
    weights = source_balanced_weights(rows_tr, power={"source": 0.5, "none": 1.0}[balance])
    xv = ct_batch_input(ds.x[va])
    yv = ct_targets([ds.rows[i] for i in va]).numpy()

    def loss_fn(model, xb, idx):
        return F.cross_entropy(model(xb).float(), y[idx], label_smoothing=0.05)

    def evaluate(model):
        logits = predict(model, xv)
        p = torch.softmax(logits.float(), 1)[:, 1].numpy()
        auc = M.roc_auc(yv, p)
        return auc, {"auc_covid": auc, "acc@0.5": float(((p >= 0.5) == yv).mean())}

    return ds.x[tr], loss_fn, evaluate, weights


def build_model(kind: str, variant: str = "googlenet"):
    if kind == "xray":
        from engine.ai.models.densenet_xray import XRayDenseNet

        return XRayDenseNet()
    from engine.ai.models.inception_ct import CTInception

    return CTInception(variant)


def run_training(kind: str, data: str, out: str, *, epochs: int | None = None, size: int | None = None,
                 batch: int = 16, lr: float = 1e-3, budget_min: float = 0.0, patience: int = 5,
                 seed: int = 0, threads: int = 2, resume: bool = False, balance: str = "source",
                 variant: str = "googlenet", bf16: bool = False, log_every: int = 10,
                 init: str | None = None, samples_per_epoch: int = 0,
                 log: Callable[[str], None] = print) -> dict:
    import torch

    from engine.training.datasets import load_ct_set, load_xray_set
    from engine.training.splits import check_no_patient_leak

    set_seed(seed)
    torch.set_num_threads(threads)
    model = build_model(kind, variant)
    full = 224 if kind == "xray" else model.input_size
    size = size or full
    if kind == "ct":
        model.input_size = size   # recorded in the card (arch_params.input_size); the app feeds this size
    # CT caches the crop before normalisation at the training size itself (a mask is not area-averaged)
    ds = load_xray_set(data, size=full) if kind == "xray" else load_ct_set(data, size=size)
    if kind == "xray" and size != full:
        # progressive resizing: a low-resolution stage (area-downsampled cache of exactly the inference
        # preprocessing) followed by a stage at the inference size started with --init
        import torch.nn.functional as F

        ds.x = F.interpolate(ds.x.float(), size=(size, size), mode="area").to(torch.float16)
        ds.size = size
    if init:
        from safetensors.torch import load_file

        state = load_file(str(init))
        model.load_state_dict({k: v.float() for k, v in state.items() if not k.startswith("ood.")})
        log(f"[train] initialised from {init}")
    check_no_patient_leak(ds.rows)
    cfg = TrainConfig(epochs=epochs or (12 if kind == "xray" else 30), batch=batch, lr=lr,
                      budget_s=budget_min * 60, patience=patience, seed=seed, threads=threads,
                      bf16=bf16, log_every=log_every, samples_per_epoch=samples_per_epoch,
                      extra={"kind": kind, "size": size, "balance": balance, "variant": variant,
                             "data": str(Path(data).resolve())})
    task = xray_task if kind == "xray" else ct_task
    x_tr, loss_fn, evaluate, weights = task(ds, cfg, balance)
    if kind == "xray":
        aug = lambda xb, generator=None: augment_batch(xb, generator=generator)  # noqa: E731
    else:
        from engine.ai.preprocess.ct_input import augment_ct_batch

        render_rng = np.random.default_rng(seed)
        aug = lambda xb, generator=None: augment_ct_batch(xb, render_rng, generator)  # noqa: E731
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    run_info = {"kind": kind, "variant": variant, "size": size, "balance": balance, "seed": seed, "init": init,
                "data": str(Path(data).resolve()), "config": asdict(cfg),
                "n_train": int(len(x_tr)), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (outp / "run.json").write_text(json.dumps(run_info, indent=1))
    log(f"[train] {kind}: {len(x_tr)} training images, size {size}, balance={balance}, "
        f"epochs {cfg.epochs}, budget {budget_min:.0f} min, {threads} threads")
    hist = fit(model, x_tr, loss_fn, evaluate, cfg, outp, weights=weights, augment=aug, resume=resume, log=log)
    run_info.update({"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "best_epoch": hist["best_epoch"], "best_val_score": hist["best_score"],
                     "epochs_run": len(hist["epochs"]), "train_seconds": hist["train_seconds"],
                     "stopped": hist["stopped"]})
    (outp / "run.json").write_text(json.dumps(run_info, indent=1))
    return hist


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chestview train", description="Train the X-ray or CT model on real data "
                                "(research use only). Writes checkpoints and best.safetensors into --out; "
                                "run `main.py evaluate OUT --data DIR --write-card` afterwards.")
    p.add_argument("kind", choices=["xray", "ct"])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data"),
                   help="shared/data folder (or its xray/ or ct/ subfolder)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, history.json, best.safetensors)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--size", type=int, help="input size (default 224; must match inference)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--budget-min", type=float, default=0.0, help="wall-clock budget in minutes (0 = none)")
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    p.add_argument("--balance", choices=["source", "none"], default="source",
                   help="source-balanced sampling (shortcut mitigation) or plain class frequencies")
    p.add_argument("--init", help="start from these weights (safetensors), e.g. a low-resolution stage's best")
    p.add_argument("--samples-per-epoch", type=int, default=0, help="images per epoch (0 = training set size)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (faster on CPUs with AVX512-BF16/AMX)")
    p.add_argument("--log-every", type=int, default=10, help="progress line every N steps")
    p.add_argument("--variant", choices=["googlenet", "inception_v3"], default="googlenet", help="CT network")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    run_training(a.kind, a.data, a.out, epochs=a.epochs, size=a.size, batch=a.batch, lr=a.lr,
                 budget_min=a.budget_min, patience=a.patience, seed=a.seed, threads=a.threads,
                 resume=a.resume, balance=a.balance, variant=a.variant, bf16=a.bf16, log_every=a.log_every,
                 init=a.init, samples_per_epoch=a.samples_per_epoch,
                 log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
