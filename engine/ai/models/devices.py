"""Where models run: CUDA with autocast fp16 when available, CPU fp32 otherwise.

``CHESTVIEW_DEVICE=cpu|cuda`` overrides the choice (tests, deployments). On CPU the torch thread
count is set once to the number of physical cores (hyper-threads slow convolutions down) unless
the user set ``OMP_NUM_THREADS`` / ``CHESTVIEW_THREADS``.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

import torch

from engine.cpu import physical_cores

_lock = threading.Lock()
_threads_configured = False
_warmed: set[tuple[int, str, tuple[int, ...]]] = set()


@dataclass(frozen=True)
class DeviceConfig:
    device: torch.device
    autocast_dtype: torch.dtype | None   # None -> plain fp32

    @property
    def name(self) -> str:
        """Human description, e.g. 'cuda:0 (NVIDIA H100, autocast fp16)' or 'cpu (2 threads, fp32)'."""
        if self.device.type == "cuda":
            idx = self.device.index or 0
            amp = f"autocast {str(self.autocast_dtype).replace('torch.', '')}" if self.autocast_dtype else "fp32"
            return f"cuda:{idx} ({torch.cuda.get_device_name(idx)}, {amp})"
        amp = f"autocast {str(self.autocast_dtype).replace('torch.', '')}" if self.autocast_dtype else "fp32"
        return f"cpu ({torch.get_num_threads()} threads, {amp})"


def configure_threads() -> int:
    """Set torch's intra-op threads once: CHESTVIEW_THREADS, else leave OMP_NUM_THREADS alone, else physical cores."""
    global _threads_configured
    with _lock:
        if not _threads_configured:
            env = os.environ.get("CHESTVIEW_THREADS")
            if env and env.isdigit() and int(env) > 0:
                torch.set_num_threads(int(env))
            elif not os.environ.get("OMP_NUM_THREADS"):
                torch.set_num_threads(physical_cores())
            _threads_configured = True
    return torch.get_num_threads()


def pick_device(prefer: str | None = None) -> DeviceConfig:
    """CUDA + autocast fp16 when a GPU is usable, else CPU fp32. ``prefer`` / CHESTVIEW_DEVICE force one."""
    want = (prefer or os.environ.get("CHESTVIEW_DEVICE") or "auto").lower()
    if want in ("auto", "cuda", "gpu") and torch.cuda.is_available():
        return DeviceConfig(torch.device("cuda", 0), torch.float16)
    configure_threads()
    return DeviceConfig(torch.device("cpu"), None)


def autocast(cfg: DeviceConfig):
    """Context manager: autocast in cfg's dtype, or nothing for fp32."""
    if cfg.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=cfg.device.type, dtype=cfg.autocast_dtype)


def warm_up(module: torch.nn.Module, input_shape: tuple[int, ...], cfg: DeviceConfig) -> None:
    """One throw-away forward per (model, device, shape) so the first real study is not slow (cuDNN autotune, allocator)."""
    key = (id(module), str(cfg.device), tuple(input_shape))
    with _lock:
        if key in _warmed:
            return
        _warmed.add(key)
    with torch.inference_mode(), autocast(cfg):
        module(torch.zeros(input_shape, device=cfg.device))
    if cfg.device.type == "cuda":
        torch.cuda.synchronize(cfg.device)


def to_float32(obj):
    """Recursively cast autocast outputs (fp16/bf16 tensors in dicts/tuples) to fp32 on CPU-friendly dtype."""
    if isinstance(obj, torch.Tensor):
        return obj.float()
    if isinstance(obj, dict):
        return {k: to_float32(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_float32(v) for v in obj)
    return obj
