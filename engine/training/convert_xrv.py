"""Convert a user-supplied torchxrayvision ``densenet121-res224-all`` file to safetensors + model card.

torchxrayvision publishes that model as a *pickled whole module*. Unpickling runs whatever code the
pickle names, so the app never calls ``torch.load`` on it. This module reads the torch archive
itself (zip format: ``*/data.pkl`` + ``*/data/<key>``; also the legacy pre-1.6 stream format) with
a restricted unpickler that resolves only:

* ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` (replaced by our own numpy-based
  rebuilders), the ``torch.*Storage`` types (as dtype markers), ``collections.OrderedDict``,
  ``builtins.set``/``frozenset``, ``torch.Size``, ``torch`` dtypes, and
* classes from ``torch.nn.*``, ``torchvision.*``, ``torchxrayvision.*`` — reconstructed as inert
  placeholders that only collect their pickled state (no ``__init__``, no ``__setstate__`` of the
  real class ever runs).

Anything else (``os.system``, ``builtins.eval``, ``subprocess``...) is refused before it is called.
The weights go into our XRayDenseNet layout; the card says ``trained: false`` and
``source: torchxrayvision (user supplied)``: external weights, not evaluated by ChestView.

CLI: ``python main.py convert-xrv FILE [--out DIR] [--version V] [--dtype float16]``.
"""
from __future__ import annotations

import argparse
import io
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ModelError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}
_PLACEHOLDER_PREFIXES = ("torch.nn.", "torchvision.", "torchxrayvision.")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_MEMBER_BYTES = 1 << 30   # refuse archives claiming > 1 GiB for one storage (the real file is ~30 MB)


class UnsafePickleError(ModelError):
    """The file asks the unpickler for something outside the allow-list (possibly malicious)."""


class Placeholder:
    """Inert stand-in for an nn.Module (or any allowed class): stores pickled state, runs no code."""

    _qualname = "Placeholder"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}       # (dict, slotstate)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<inert {self._qualname}>"


_placeholder_classes: dict[str, type] = {}


def _placeholder(module: str, name: str) -> type:
    key = f"{module}.{name}"
    cls = _placeholder_classes.get(key)
    if cls is None:
        cls = type(name, (Placeholder,), {"_qualname": key, "__module__": "engine.training.convert_xrv.inert"})
        _placeholder_classes[key] = cls
    return cls


class _StorageRef:
    """A storage in the archive: where its bytes are and of what dtype."""

    def __init__(self, key: str, dtype: Any, numel: int | None) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel
        self.array: np.ndarray | None = None


def _np_dtype(dtype: Any) -> np.dtype:
    if dtype == "bfloat16":
        return np.dtype(np.uint16)
    return np.dtype(dtype)


def _rebuild_tensor_v2(storage: _StorageRef, offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                       backward_hooks: Any = None, metadata: Any = None):
    """Our own rebuild: a strided numpy view copied into a fresh torch tensor. Nothing from the file executes."""
    import torch

    if not isinstance(storage, _StorageRef) or storage.array is None:
        raise UnsafePickleError("tensor refers to a storage that is not in the archive")
    flat = storage.array
    if len(size) == 0:
        arr = flat[offset:offset + 1].reshape(())
    else:
        itemsize = flat.dtype.itemsize
        needed = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if all(size) else offset
        if needed > flat.size or offset < 0 or any(st < 0 for st in stride):
            raise UnsafePickleError("tensor view lies outside its storage (corrupt or crafted file)")
        arr = np.lib.stride_tricks.as_strided(flat[offset:], shape=tuple(size),
                                              strides=tuple(st * itemsize for st in stride), writeable=False)
    arr = np.array(arr, copy=True)
    if storage.dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).clone()
    return torch.from_numpy(arr)


def _rebuild_parameter(data: Any, requires_grad: bool = False, backward_hooks: Any = None, *rest: Any):
    return data


def _rebuild_parameter_with_state(data: Any, requires_grad: bool, backward_hooks: Any, state: Any = None):
    return data


def _torch_size(*args: Any) -> tuple:
    return tuple(args[0]) if len(args) == 1 else tuple(args)


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, f: io.BufferedIOBase, load_storage: Any) -> None:
        super().__init__(f)
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor"):
            return _rebuild_tensor_v2
        if full == "torch._utils._rebuild_parameter":
            return _rebuild_parameter
        if full == "torch._utils._rebuild_parameter_with_state":
            return _rebuild_parameter_with_state
        if full == "collections.OrderedDict":
            return OrderedDict
        if full in ("builtins.set", "__builtin__.set"):
            return set
        if full in ("builtins.frozenset", "__builtin__.frozenset"):
            return frozenset
        if full == "torch.Size":
            return _torch_size
        if module == "torch" and name in _STORAGE_DTYPES:
            return ("__storage__", name)
        if module == "torch.storage" and name == "UntypedStorage":
            return ("__storage__", "UntypedStorage")
        if module == "torch" and name in ("float32", "float16", "float64", "bfloat16", "int64", "uint8", "bool"):
            return ("__dtype__", name)
        if full.startswith(_PLACEHOLDER_PREFIXES) and not name.startswith("_rebuild") and "." not in name:
            return _placeholder(module, name)
        raise UnsafePickleError(f"refused to load '{full}': not on the allow-list of a torchxrayvision model "
                                "file. The file may be malicious or is not a torchxrayvision model; nothing "
                                "from it was executed.")

    def persistent_load(self, pid: Any) -> Any:
        return self._load_storage(pid)


def _storage_dtype(storage_type: Any) -> Any:
    if isinstance(storage_type, tuple) and storage_type[0] == "__storage__":
        return _STORAGE_DTYPES[storage_type[1]]
    raise UnsafePickleError(f"unexpected storage type {storage_type!r} in the archive")


# ------------------------------------------------------------------ archive readers

def _load_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        pkl = sorted(n for n in names if n.endswith("/data.pkl") or n == "data.pkl")
        if not pkl:
            raise ModelError(f"{path.name}: torch archive without data.pkl; is this a torchxrayvision model file?")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = zf.read(f"{prefix}byteorder").decode().strip() or "little"
        cache: dict[str, _StorageRef] = {}

        def load_storage(pid: Any) -> _StorageRef:
            if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
                raise UnsafePickleError(f"unexpected persistent id {str(pid)[:80]!r}")
            _, stype, key, _location, numel = pid[:5]
            key = str(key)
            if key in cache:
                return cache[key]
            dtype = _storage_dtype(stype)
            member = f"{prefix}data/{key}"
            if member not in names:
                raise ModelError(f"{path.name}: storage {key} missing from the archive (truncated file?)")
            if zf.getinfo(member).file_size > MAX_MEMBER_BYTES:
                raise ModelError(f"{path.name}: storage {key} is implausibly large; refusing")
            raw = zf.read(member)
            nd = _np_dtype(dtype)
            arr = np.frombuffer(raw, dtype=nd.newbyteorder("<" if byteorder == "little" else ">"))
            ref = _StorageRef(key, dtype, numel)
            ref.array = arr.astype(nd.newbyteorder("="), copy=False)
            cache[key] = ref
            return ref

        with zf.open(pkl[0]) as f:
            return _SafeUnpickler(io.BufferedReader(f), load_storage).load()


def _load_legacy(path: Path) -> Any:
    """Pre-1.6 torch stream: magic, protocol, sys_info, object pickle, storage keys, raw storages."""
    with open(path, "rb") as f:
        def small_load() -> Any:
            return _SafeUnpickler(f, lambda pid: (_ for _ in ()).throw(UnsafePickleError("storage in header"))).load()

        magic = small_load()
        if magic != _LEGACY_MAGIC:
            raise ModelError(f"{path.name} is not a torch model file (neither zip archive nor legacy format)")
        small_load()   # protocol version
        small_load()   # sys info
        refs: dict[str, _StorageRef] = {}

        def load_storage(pid: Any) -> Any:
            if (isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "module" and isinstance(pid[1], type)
                    and issubclass(pid[1], Placeholder)):
                return pid[1]   # legacy files name each module class with its source (only compared, never run)
            if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
                raise UnsafePickleError(f"unexpected persistent id {str(pid)[:80]!r}")
            _, stype, key, _location, numel, view_meta = (list(pid) + [None] * 6)[:6]
            if view_meta is not None:
                raise ModelError(f"{path.name}: storage views are not supported; re-save the model with a recent torch")
            key = str(key)
            if key not in refs:
                refs[key] = _StorageRef(key, _storage_dtype(stype), int(numel))
            return refs[key]

        pending: list[tuple] = []

        def deferred(storage: _StorageRef, *args: Any) -> tuple:
            pending.append((storage, args))
            return ("__tensor__", len(pending) - 1)

        class _Legacy(_SafeUnpickler):
            def find_class(self, module: str, name: str) -> Any:
                if f"{module}.{name}" == "torch._utils._rebuild_tensor_v2":
                    return deferred
                return super().find_class(module, name)

        obj = _Legacy(f, load_storage).load()
        keys = _SafeUnpickler(f, lambda pid: None).load()
        for key in keys:
            ref = refs.get(str(key))
            if ref is None:
                raise ModelError(f"{path.name}: unknown storage key {key}")
            n = int.from_bytes(f.read(8), "little", signed=True)
            nd = _np_dtype(ref.dtype)
            if n < 0 or n * nd.itemsize > MAX_MEMBER_BYTES:
                raise ModelError(f"{path.name}: storage {key} is implausibly large; refusing")
            raw = f.read(n * nd.itemsize)
            if len(raw) != n * nd.itemsize:
                raise ModelError(f"{path.name}: truncated file")
            ref.array = np.frombuffer(raw, dtype=nd.newbyteorder("<")).astype(nd, copy=False)
        tensors = [_rebuild_tensor_v2(s, *a) for s, a in pending]
        return _resolve_deferred(obj, tensors, set())


def _resolve_deferred(obj: Any, tensors: list, seen: set[int]) -> Any:
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__tensor__":
        return tensors[obj[1]]
    if id(obj) in seen:
        return obj
    seen.add(id(obj))
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _resolve_deferred(obj[k], tensors, seen)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            obj[i] = _resolve_deferred(v, tensors, seen)
    elif isinstance(obj, Placeholder):
        for k, v in list(obj.__dict__.items()):
            obj.__dict__[k] = _resolve_deferred(v, tensors, seen)
    return obj


def safe_load(path: str | Path) -> Any:
    """Restricted-unpickle a torch file (zip or legacy) into placeholders, tensors and containers."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p} not found")
    try:
        if zipfile.is_zipfile(p):
            return _load_zip(p)
        return _load_legacy(p)
    except ModelError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ModelError(f"{p.name} could not be read as a torch model file: {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------ placeholders -> state dict

def collect_state(root: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Walk an inert module tree like ``nn.Module.state_dict``: (flat tensors, root attributes)."""
    import torch

    state: dict[str, Any] = {}

    def walk(mod: Any, prefix: str, depth: int) -> None:
        if depth > 64 or not isinstance(mod, Placeholder):
            return
        d = mod.__dict__
        for k, v in (d.get("_parameters") or {}).items():
            if isinstance(v, torch.Tensor):
                state[prefix + k] = v
        skip = d.get("_non_persistent_buffers_set") or set()
        for k, v in (d.get("_buffers") or {}).items():
            if isinstance(v, torch.Tensor) and k not in skip:
                state[prefix + k] = v
        for k, child in (d.get("_modules") or {}).items():
            walk(child, f"{prefix}{k}.", depth + 1)

    if isinstance(root, dict) and all(isinstance(k, str) for k in root):   # a bare state dict
        state = {k: v for k, v in root.items() if isinstance(v, torch.Tensor)}
        return state, {}
    if not isinstance(root, Placeholder):
        raise ModelError("the file does not contain a model (expected a pickled torchxrayvision DenseNet)")
    walk(root, "", 0)
    attrs = {k: v for k, v in root.__dict__.items() if not k.startswith("_")}
    return state, attrs


_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def to_xray_densenet_state(state: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Map xrv keys onto XRayDenseNet (``norm.1`` -> ``norm1`` as torchvision does); zero COVID head."""
    import torch

    from engine.ai.models.densenet_xray import XRayDenseNet

    with torch.device("meta"):   # shapes only: no memory, no init cost
        ref = XRayDenseNet().state_dict()
    out: dict[str, Any] = {}
    notes: list[str] = []
    for k, v in state.items():
        m = _LEGACY_KEY.match(k)
        if m:
            k = m.group(1) + m.group(2)
        if k.startswith("module."):
            k = k[len("module."):]
        if k in ref:
            if tuple(v.shape) != tuple(ref[k].shape):
                raise ModelError(f"weight {k} has shape {tuple(v.shape)}, DenseNet-121 (torchxrayvision "
                                 f"layout) needs {tuple(ref[k].shape)}: this is not a densenet121-res224 model")
            out[k] = v.float() if v.is_floating_point() else v
        else:
            notes.append(f"ignored {k}")
    missing = [k for k in ref if k not in out and not k.startswith("covid_head.")]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise ModelError(f"the file lacks {len(missing)} DenseNet-121 weights (e.g. {missing[:3]}); "
                         "is it torchxrayvision's densenet121-res224-all?")
    for k, v in ref.items():
        if k not in out:
            out[k] = torch.zeros(v.shape, dtype=v.dtype)   # covid head (unused: no 'covid' labels) and BN counters
    return out, notes


def convert(src_pt: str | Path, out_dir: str | Path, version: str = "xrv-res224-all",
            dtype: str = "float32") -> Path:
    """Convert the file safely; write ``xray-densenet121-<version>.safetensors`` + card. Returns the card path."""
    import torch

    from engine.ai.models.densenet_xray import XRV_PATHOLOGIES
    from engine.ai.models.registry import EXTERNAL_NOTE, XRAY_MODEL, sha256_file, write_card

    src = Path(src_pt)
    root = safe_load(src)
    state, attrs = collect_state(root)
    mapped, notes = to_xray_densenet_state(state)
    pathologies = attrs.get("pathologies")
    if isinstance(pathologies, (list, tuple)) and len(pathologies) == len(XRV_PATHOLOGIES):
        if list(pathologies) != list(XRV_PATHOLOGIES):
            raise ModelError(f"the model's pathology list {list(pathologies)} differs from torchxrayvision's "
                             "default 18; only densenet121-res224-all is supported")
    thresholds: dict[str, float] = {}
    op = attrs.get("op_threshs")
    if isinstance(op, torch.Tensor) and op.numel() == len(XRV_PATHOLOGIES):
        thresholds = {n: float(t) for n, t in zip(XRV_PATHOLOGIES, op.tolist()) if np.isfinite(t)}
    card = write_card(
        out_dir, name=XRAY_MODEL, version=version, state_dict=mapped, trained=False,
        labels={"pathologies": list(XRV_PATHOLOGIES), "covid": []}, architecture="XRayDenseNet",
        dtype=dtype, source="torchxrayvision (user supplied)",
        source_file={"name": src.name, "sha256": sha256_file(src)},
        note=f"{EXTERNAL_NOTE}. Converted with a restricted unpickler (no code from the file ran). "
             "The COVID head is zero (not part of torchxrayvision's model).",
        preprocessing={"text": "torchxrayvision: displayed grey [0,1] -> (2x-1)*1024, centre square crop, "
                               "resize 224", "input_size": 224, "range": [-1024, 1024]},
        operating_thresholds_from_source=thresholds,
        references=["Cohen JP et al. TorchXRayVision: A library of chest X-ray datasets and models. MIDL 2022.",
                    "Huang G et al. Densely Connected Convolutional Networks. CVPR 2017."],
        conversion_notes=notes[:50], evaluated_by=None,
    )
    return card


def cli_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="chestview convert-xrv", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="torchxrayvision densenet121-res224-all .pt/.pth file (user supplied)")
    ap.add_argument("--out", default=None, help="models folder (default: ChestView's models folder)")
    ap.add_argument("--version", default="xrv-res224-all")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    args = ap.parse_args(argv)
    from engine.paths import models_dir

    try:
        card = convert(args.src, args.out or models_dir(), version=args.version, dtype=args.dtype)
    except ModelError as e:
        print(f"convert-xrv: {e}", file=sys.stderr)
        return 2
    print(f"wrote {card} (external weights, not evaluated by ChestView: shown as untrained until evaluated)")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
