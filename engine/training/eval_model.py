"""Loading a run or a shipped model for evaluation and running it over cached image tensors,
including the fp16 rounding the shipped weights go through (resources/models stores float16 when
that keeps the validation metrics; engine.ai.models.registry upcasts to fp32 on load).
Research use only, not for diagnostic use.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

XRAY_NAME, CT_NAME = "xray-densenet121", "ct-inception"


def load_for_eval(target: str | Path):
    """(module fp32 eval, info dict) from a run folder, a card JSON or a safetensors next to its card."""
    from safetensors.torch import load_file

    from engine.ai.models import registry
    from engine.training.train import build_model

    p = Path(target)
    if p.is_dir() and (p / "run.json").is_file():
        run = json.loads((p / "run.json").read_text())
        w = p / "best.safetensors"
        if not w.is_file():
            raise FileNotFoundError(f"{w} missing: the run has not finished an epoch yet")
        model = build_model(run["kind"], run.get("variant", "googlenet"))
        if run["kind"] == "ct" and run.get("size"):
            model.input_size = int(run["size"])   # the CT cache and the app use the training size
        state = load_file(str(w))
        model.load_state_dict({k: v.float() for k, v in state.items() if not k.startswith("ood.")})
        return model.eval(), {"kind": run["kind"], "run": run, "run_dir": str(p), "source_file": str(w)}
    card_path = p if p.suffix == ".json" else p.with_suffix(".json")
    if not card_path.is_file():
        raise FileNotFoundError(f"{target}: neither a run folder (run.json) nor a model card (.json)")
    card = json.loads(card_path.read_text())
    state, _ = registry.read_weights(card_path.parent / card["file"], card.get("sha256", ""))
    model = registry.build_architecture(card)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    kind = "xray" if card["name"] == XRAY_NAME else "ct"
    run_dir = (card.get("training_data") or {}).get("run_dir")
    run = json.loads((Path(run_dir) / "run.json").read_text()) if run_dir and (Path(run_dir) / "run.json").is_file() \
        else {"kind": kind, "variant": (card.get("arch_params") or {}).get("variant", "googlenet")}
    return model.eval(), {"kind": kind, "run": run, "card": card, "source_file": str(card_path.parent / card["file"])}


def forward_all(model, x, kind: str, batch: int = 32, bf16: bool = False, progress: Callable | None = None):
    """Logits and pooled features (what the OOD gate sees) for a cached image tensor."""
    import torch

    from engine.ai.models.ood import pooled_features

    logits: list = []
    feats: list = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(x), batch):
            xb = x[i:i + batch].float()
            if kind == "ct" and xb.shape[1] == 2:   # cached [grey, lung mask] (engine.training.datasets.encode_ct_slice)
                from engine.training.datasets import ct_batch_input

                xb = ct_batch_input(xb)
            elif kind == "ct" and xb.shape[1] == 1:
                xb = xb.expand(-1, 3, -1, -1)
            fmap = model.feature_map(xb)
            out = model.head(fmap)
            feats.append(pooled_features(fmap).float())
            if isinstance(out, dict):
                logits.append(torch.cat([out["pathologies"].float(), out["covid"].float()], 1))
            else:
                logits.append(out.float())
            if progress:
                progress(min(len(x), i + batch), len(x))
    return torch.cat(logits).numpy(), torch.cat(feats).numpy()


def progress_printer(tag: str) -> Callable[[int, int], None]:
    """A forward_all progress callback that prints at most every 20 s (and at the end)."""
    last = [0.0]

    def f(i, n):
        if time.time() - last[0] > 20 or i == n:
            last[0] = time.time()
            print(f"[evaluate] {tag}: {i}/{n}", flush=True)
    return f


# ---------------------------------------------------------------- fp16 as shipped
def fp16_check(model, x, kind: str, logits32: np.ndarray) -> dict:
    """Round the weights to fp16 (as shipped) and compare validation outputs with fp32."""
    import copy

    import torch

    m16 = copy.deepcopy(model)
    with torch.no_grad():
        for p in m16.state_dict().values():
            if p.is_floating_point():
                p.copy_(p.half().float())
    l16, _ = forward_all(m16, x, kind)
    return {"max_abs_logit_diff": float(np.abs(l16 - logits32).max()), "logits16": l16}


def fp16_safe_rescale(model, limit: float = 1e4) -> dict:
    """Make the X-ray DenseNet's BatchNorm buffers fit in fp16 without changing its function.

    With inputs in [-1024, 1024] the first BatchNorm's running variance reaches ~1e6, beyond fp16's
    65504 (it would become inf). conv0 -> norm0 is linear, so dividing conv0's weights and norm0's
    running mean by c, and its running variance by c^2, leaves the output unchanged (up to eps).
    """
    import torch

    feats = getattr(model, "features", None)
    if feats is None or not hasattr(feats, "conv0") or not hasattr(feats, "norm0"):
        return {}
    vmax = float(feats.norm0.running_var.max())
    if vmax <= limit:
        return {}
    c = float(2 ** np.ceil(0.5 * np.log2(vmax / limit)))
    with torch.no_grad():
        feats.conv0.weight /= c
        feats.norm0.running_mean /= c
        feats.norm0.running_var /= c * c
    return {"features.conv0/norm0": {"divided_by": c, "running_var_max_before": vmax}}


def round_fp16(model):
    """A copy of ``model`` whose floating-point weights and buffers went through fp16 (as shipped), in eval mode."""
    import copy

    import torch

    m16 = copy.deepcopy(model)
    with torch.no_grad():
        for p in m16.state_dict().values():
            if p.is_floating_point():
                p.copy_(p.half().float())
    return m16.eval()
