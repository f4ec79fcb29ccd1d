"""Model registry: JSON model cards + safetensors weights pinned by sha256 (DESIGN.md section 4).

``resources/models/<name>-<version>.json`` (the card) names ``<name>-<version>.safetensors`` and its
sha256. Weights load only from safetensors after the hash matches; pickles are never loaded.
No card -> a deterministic *untrained* model, labelled so everywhere, whose outputs are never
shown as findings. Tensors named ``ood.*`` in the weights file are the out-of-distribution
statistics (engine.ai.models.ood), not model parameters.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.errors import ModelError
from engine.paths import models_dir
from engine.results import RESEARCH_USE, ModelInfo

log = logging.getLogger(__name__)

XRAY_MODEL = "xray-densenet121"
CT_MODEL = "ct-inception"
KNOWN_MODELS = (XRAY_MODEL, CT_MODEL)
UNTRAINED_VERSION = "0.0.0"
UNTRAINED_NOTE = "untrained — no findings shown"
EXTERNAL_NOTE = "external weights, not evaluated by ChestView"
OOD_PREFIX = "ood."


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode, on its device) with the card it came from."""

    module: nn.Module
    card: dict[str, Any]
    info: ModelInfo
    ood: dict[str, torch.Tensor] = field(default_factory=dict)   # 'mean', 'components', 'variance', ...
    path: Path | None = None

    @property
    def trained(self) -> bool:
        return self.info.trained


# ---------------------------------------------------------------- hashing and cards

def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def display_name(name: str, arch_params: dict[str, Any] | None = None) -> str:
    if name == XRAY_MODEL:
        return "ChestView X-ray DenseNet-121"
    if name == CT_MODEL:
        variant = (arch_params or {}).get("variant", "googlenet")
        return "ChestView CT Inception v3" if variant == "inception_v3" else "ChestView CT Inception (GoogLeNet)"
    if name == "xray-severity":
        return "ChestView X-ray zone severity"
    if name == "xray-lungseg":
        return "ChestView X-ray lung U-Net"
    return f"ChestView {name}"


def model_label(card: dict[str, Any]) -> str:
    """Human label with name and version and, unless evaluated, why it shows no findings."""
    base = f"{display_name(card.get('name', '?'), card.get('arch_params'))} {card.get('version', '?')}"
    if card.get("trained"):
        return f"{base} (trained)"
    if str(card.get("source", "")).startswith("torchxrayvision"):
        return f"{base} ({EXTERNAL_NOTE}; no findings shown)"
    return f"{base} ({UNTRAINED_NOTE})"


def _version_key(v: str) -> tuple:
    parts = re.split(r"[.\-+]", v)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def list_cards(directory: str | Path | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """All readable cards in the models folder (broken JSON is logged and skipped)."""
    d = Path(directory) if directory is not None else models_dir()
    out: list[tuple[Path, dict[str, Any]]] = []
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        try:
            card = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            log.warning("model card %s unreadable: %s", p.name, e)
            continue
        if isinstance(card, dict) and card.get("name") and card.get("file"):
            out.append((p, card))
    return out


def find_card(name: str, version: str | None = None,
              directory: str | Path | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The card to use for ``name``: an exact version if given, else trained before untrained, then newest."""
    cands = [(p, c) for p, c in list_cards(directory) if c.get("name") == name]
    if version is not None:
        cands = [(p, c) for p, c in cands if str(c.get("version")) == version]
    if not cands:
        return None
    cands.sort(key=lambda pc: (bool(pc[1].get("trained")), _version_key(str(pc[1].get("version", "")))))
    return cands[-1]


def default_card(name: str) -> dict[str, Any]:
    """The card an untrained model carries (nothing on disk)."""
    from engine.ai.models.densenet_xray import COVID_CLASSES, XRV_PATHOLOGIES
    from engine.ai.models.inception_ct import CT_CLASSES

    if name == XRAY_MODEL:
        labels: dict[str, Any] = {"pathologies": list(XRV_PATHOLOGIES), "covid": list(COVID_CLASSES)}
        arch, params = "XRayDenseNet", {}
    elif name == CT_MODEL:
        labels, arch, params = {"classes": list(CT_CLASSES)}, "CTInception", {"variant": "googlenet"}
    else:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")
    return {"name": name, "version": UNTRAINED_VERSION, "architecture": arch, "arch_params": params,
            "file": None, "sha256": "", "dtype": "float32", "trained": False, "labels": labels,
            "thresholds": {}, "metrics": {}, "intended_use": RESEARCH_USE, "ood": {},
            "source": "random initialisation (seed 0): no weights found in " + str(models_dir())}


def build_architecture(card: dict[str, Any]) -> nn.Module:
    arch = card.get("architecture")
    params = dict(card.get("arch_params") or {})
    if arch == "XRayDenseNet" or (arch is None and card.get("name") == XRAY_MODEL):
        from engine.ai.models.densenet_xray import XRayDenseNet

        return XRayDenseNet()
    if arch == "CTInception" or (arch is None and card.get("name") == CT_MODEL):
        from engine.ai.models.inception_ct import CTInception

        return CTInception(variant=params.get("variant", "googlenet"), input_size=params.get("input_size"))
    if arch == "LungUNet":
        from engine.ai.models.lung_unet import LungUNet

        return LungUNet(base=int(params.get("base", 16)), levels=int(params.get("levels", 5)))
    raise ModelError(f"model card {card.get('name')!r}: unknown architecture {arch!r} "
                     "(expected 'XRayDenseNet' or 'CTInception'); update ChestView or fix the card")


def info_from_card(card: dict[str, Any], sha256: str = "") -> ModelInfo:
    return ModelInfo(name=str(card["name"]), version=str(card.get("version", "")),
                     trained=bool(card.get("trained")), sha256=sha256 or str(card.get("sha256", "")),
                     intended_use=str(card.get("intended_use") or RESEARCH_USE), label=model_label(card))


# ---------------------------------------------------------------- loading

_cache: dict[tuple[str, str, str | None, str], LoadedModel] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget loaded models (tests, or after new weights were written)."""
    with _cache_lock:
        _cache.clear()


def read_weights(path: Path, expected_sha256: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Hash-check then load a safetensors file: (model state dict, ood tensors without the prefix)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"model weights {path} are missing; reinstall ChestView or remove the card "
                         f"{path.with_suffix('.json').name} to fall back to the untrained model")
    actual = sha256_file(path)
    if not expected_sha256 or actual.lower() != expected_sha256.lower():
        raise ModelError(f"model weights {path.name} fail their integrity check: the card pins sha256 "
                         f"{expected_sha256 or '(none)'} but the file has {actual}. The file is corrupt or was "
                         "replaced; restore it from the ChestView release (or re-run training/evaluation, "
                         "which rewrites file and card together). It was not loaded.")
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise ModelError(f"model weights {path.name} are not a valid safetensors file ({e}); restore the file") from e
    state = {k: v for k, v in tensors.items() if not k.startswith(OOD_PREFIX)}
    ood = {k[len(OOD_PREFIX):]: v.float() for k, v in tensors.items() if k.startswith(OOD_PREFIX)}
    return state, ood


def _untrained_module(card: dict[str, Any]) -> nn.Module:
    """Deterministic random weights (seed 0) without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_architecture(card)


def _load_uncached(name: str, version: str | None, directory: Path) -> LoadedModel:
    found = find_card(name, version, directory)
    if found is None:
        if version is not None:
            raise ModelError(f"no model card for {name} version {version} in {directory}")
        card = default_card(name)
        module = _untrained_module(card)
        return LoadedModel(module.eval(), card, info_from_card(card), {}, None)
    card_path, card = found
    wpath = card_path.parent / str(card["file"])
    state, ood = read_weights(wpath, str(card.get("sha256", "")))
    module = build_architecture(card)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}  # fp16 files upcast for CPU
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"model weights {wpath.name} do not match architecture {card.get('architecture')} "
                         f"{card.get('arch_params') or ''}: {str(e)[:400]}; the card and file disagree — "
                         "rewrite them together") from e
    return LoadedModel(module.eval(), card, info_from_card(card, sha256_file(wpath)), ood, wpath)


def load_model(name: str, version: str | None = None, device: torch.device | str | None = None) -> LoadedModel:
    """Load (once per process and device) the best card's model for ``name``, or the untrained stand-in."""
    directory = models_dir()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = (name, str(directory.resolve()), version, str(dev))
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            return hit
        lm = _load_uncached(name, version, directory)
        if dev.type != "cpu":
            lm.module.to(dev)
            lm.ood = {k: v.to(dev) for k, v in lm.ood.items()}
        for p in lm.module.parameters():
            p.requires_grad_(False)   # Grad-CAM differentiates w.r.t. the feature map only
        _cache[key] = lm
        return lm


def list_model_infos() -> list[ModelInfo]:
    """One ModelInfo per known model (the card that would be used, or the untrained stand-in); loads nothing."""
    out = []
    for name in KNOWN_MODELS:
        found = find_card(name)
        out.append(info_from_card(found[1] if found else default_card(name)))
    return out


# ---------------------------------------------------------------- writing

def write_card(directory: str | Path, *, name: str, version: str, state_dict: dict[str, torch.Tensor],
               trained: bool, labels: dict[str, list[str]], architecture: str | None = None,
               arch_params: dict[str, Any] | None = None, dtype: str = "float32",
               ood_tensors: dict[str, torch.Tensor] | None = None, **card_fields: Any) -> Path:
    """Write ``<name>-<version>.safetensors`` + ``.json`` together, the card pinning the file's sha256.

    ``card_fields`` carries the remaining card keys (preprocessing, thresholds, metrics,
    training_data, data_licences, references, ood, evaluated_by, source, ...). Returns the card path.
    """
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    want = torch.float16 if dtype == "float16" else torch.float32
    tensors = {k: (v.detach().to("cpu", want) if v.is_floating_point() else v.detach().cpu()).contiguous()
               for k, v in state_dict.items()}
    for k, v in (ood_tensors or {}).items():
        key = k if k.startswith(OOD_PREFIX) else OOD_PREFIX + k
        tensors[key] = torch.as_tensor(v).detach().to("cpu", torch.float32).contiguous()
    stem = f"{name}-{version}"
    wpath, cpath = d / f"{stem}.safetensors", d / f"{stem}.json"
    tmp = wpath.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"name": name, "version": version})
    tmp.replace(wpath)
    if architecture is None:
        architecture = {XRAY_MODEL: "XRayDenseNet", CT_MODEL: "CTInception"}.get(name, name)
    card: dict[str, Any] = {
        "name": name, "version": version, "architecture": architecture, "arch_params": arch_params or {},
        "file": wpath.name, "sha256": sha256_file(wpath), "dtype": dtype, "trained": bool(trained),
        "labels": labels, "thresholds": {}, "metrics": {}, "training_data": {}, "data_licences": [],
        "intended_use": RESEARCH_USE, "references": [], "ood": {},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "evaluated_by": None,
    }
    card.update(card_fields)
    ctmp = cpath.with_suffix(".json.tmp")
    ctmp.write_text(json.dumps(card, indent=2, sort_keys=False), encoding="utf-8")
    ctmp.replace(cpath)
    clear_cache()
    return cpath
