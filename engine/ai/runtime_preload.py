"""Map torch's shared libraries into this process with the GIL released, before ``import torch``.

Why: when the models run in the viewer's own process (``CHESTVIEW_AI_PROCESS=0``, or no AI process
could be started: engine.ai.host), ``import torch`` on a worker thread would hold the GIL while it
dlopens hundreds of MB of libraries, and the GUI thread would freeze for 0.2-0.9 s at the first
analysis (bench/bench_viewer_start.py). engine.ai.host.run_here calls :func:`preload_model_runtime`
before any model work in the calling process.
"""
from __future__ import annotations

import threading

_TORCH_LIBS = ("libc10.so", "libtorch_cpu.so", "libtorch.so", "libtorch_python.so")
# The CUDA component wheels ``import torch`` loads itself with ctypes.CDLL (torch/__init__.py
# ``_preload_cuda_deps``), in its order: libcublasLt before libcublas.
_CUDA_DEPS = (("cublas", "libcublasLt.so.*[0-9]"), ("cublas", "libcublas.so.*[0-9]"),
              ("cudnn", "libcudnn.so.*[0-9]"), ("cuda_nvrtc", "libnvrtc.so.*[0-9]"),
              ("cuda_nvrtc", "libnvrtc-builtins.so.*[0-9]"), ("cuda_runtime", "libcudart.so.*[0-9]"),
              ("cuda_cupti", "libcupti.so.*[0-9]"), ("cufft", "libcufft.so.*[0-9]"),
              ("curand", "libcurand.so.*[0-9]"), ("nvjitlink", "libnvJitLink.so.*[0-9]"),
              ("cusparse", "libcusparse.so.*[0-9]"), ("cusparselt", "libcusparseLt.so.*[0-9]"),
              ("cusolver", "libcusolver.so.*[0-9]"), ("nccl", "libnccl.so.*[0-9]"),
              ("nvshmem", "libnvshmem_host.so.*[0-9]"), ("cufile", "libcufile.so.*[0-9]"),
              ("nvtx", "libnvToolsExt.so.*[0-9]"))
# Native libraries of the packages the analysis imports next (torchvision.models imports
# torch._dynamo, which imports triton): the import system and torch.ops.load_library dlopen them
# with the GIL held (0.2-0.5 s each on a 2-core machine).
_EXTENSIONS = ("triton/_C/libtriton.so", "torchvision/_C_stable.so", "torchvision/_C.so",
               "torchvision/image_stable.so", "torchvision/image.so")
_preload_lock = threading.Lock()
_preloaded = False


def torch_preload_plan(torch_dir: str) -> list[tuple[str, bool, bool]]:
    """(library path, RTLD_GLOBAL, only with CUDA) in the order ``import torch`` loads them.

    First ``lib/libtorch_global_deps.so`` (global, as torch does), then the CUDA component wheels
    found beside torch (``nvidia/<name>/lib``, ``nvidia/cuXX/lib``: local, as torch's
    ``ctypes.CDLL``; torch loads them only when its global deps pulled in libcudart), then
    ``_TORCH_LIBS``, then ``_EXTENSIONS`` (local, as the import system). Missing files are left
    out; nothing is loaded here.
    """
    import glob
    import os

    libdir = os.path.join(torch_dir, "lib")
    site = os.path.dirname(torch_dir)
    plan = []
    deps = os.path.join(libdir, "libtorch_global_deps.so")
    if os.path.exists(deps):
        plan.append((deps, True, False))
    for folder, pattern in _CUDA_DEPS:
        found = (sorted(glob.glob(os.path.join(site, "nvidia", folder, "lib", pattern)))
                 + sorted(glob.glob(os.path.join(site, "nvidia", "cu[0-9]*", "lib", pattern)))
                 + sorted(glob.glob(os.path.join(site, folder, "lib", pattern))))
        if found:
            plan.append((found[0], False, True))
    plan += [(os.path.join(libdir, n), True, False) for n in _TORCH_LIBS if os.path.exists(os.path.join(libdir, n))]
    plan += [(os.path.join(site, n), False, False) for n in _EXTENSIONS if os.path.exists(os.path.join(site, n))]
    return plan


def _torch_imported() -> bool:
    import sys

    return "torch" in sys.modules


def preload_model_runtime() -> None:
    """Map torch's shared libraries into the process with the GIL released, before ``import torch``.

    ``import torch`` dlopens libtorch_global_deps, the CUDA component libraries (cuBLAS, cuDNN:
    hundreds of MB) and libtorch_cpu, and the model imports triton's and torchvision's native
    libraries, through ctypes.CDLL and the import system, which hold the GIL for each whole call:
    the viewer's GUI thread froze for 0.2-0.9 s at the first analysis (bench/bench_viewer_start.py).
    Calling libc's dlopen(3) through a ctypes *function* releases the GIL, so the same work
    happens while the GUI keeps running, in torch's order
    (:func:`torch_preload_plan`); the later import finds the libraries already loaded (dlopen is
    reference counted). Linux only, best effort, idempotent, thread-safe (a second caller waits,
    without the GIL, for the first).
    """
    global _preloaded
    import sys

    if _preloaded or _torch_imported() or not sys.platform.startswith("linux"):
        return
    with _preload_lock:   # held until the libraries are mapped: a second caller waits for them
        if _preloaded:
            return
        try:
            import ctypes
            import importlib.util
            import os

            spec = importlib.util.find_spec("torch")
            if spec is None or not spec.origin:
                return
            libc = ctypes.CDLL(None)
            libc.dlopen.restype = ctypes.c_void_p
            libc.dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
            cuda = None
            for path, is_global, needs_cuda in torch_preload_plan(os.path.dirname(spec.origin)):
                if needs_cuda:
                    if cuda is None:   # torch loads them only when its global deps pulled in libcudart
                        with open("/proc/self/maps") as fh:
                            cuda = "libcudart.so" in fh.read()
                    if not cuda:
                        continue
                libc.dlopen(path.encode(), os.RTLD_NOW | (os.RTLD_GLOBAL if is_global else os.RTLD_LOCAL))
        except Exception:  # noqa: BLE001 - an optimisation only: import torch loads them anyway
            pass
        finally:
            _preloaded = True
