"""Display speed: render_display frames/s on a 512x512 CT slice against a naive baseline, plus
CT volume loading with engine.dicom.volume (pydicom) against SimpleITK's ImageSeriesReader.

    .venv/bin/python bench/bench_pixels.py

Naive baseline = what a first implementation does per slice change: pydicom's
apply_modality_lut + apply_voi_lut (float64) and a float -> uint8 conversion.
Rows: render_display with the default window and during a window drag (a new window each
frame), and the unfused float32 path (apply_voi, then *255, rint, uint8) for comparison.
Saves nothing outside bench/results/.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.dicom import display as dp  # noqa: E402
from engine.dicom import pixels as px  # noqa: E402


def _rate(fn, min_time: float = 1.0) -> float:
    """Calls per second (at least min_time seconds, best of 3 blocks)."""
    fn()
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time / 3:
                break
        best = max(best, n / dt)
    return best


def bench_display(path: str) -> dict:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    frame = px.load_frame(path)
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array

    def naive():
        hu = apply_modality_lut(arr, ds)
        v = apply_voi_lut(hu, ds, index=0)
        lo, hi = float(v.min()), float(v.max())
        return ((v - lo) / (hi - lo or 1) * 255).astype(np.uint8)

    drag = {"c": -600.0}

    def dragging():  # a new window every frame
        drag["c"] += 1.0
        return dp.render_display(frame, drag["c"], 1500.0)

    def float_path():
        y = dp.apply_voi(frame.values, frame.window[0], frame.window[1], frame.voi_function)
        return np.rint(y * 255.0).astype(np.uint8)

    load_ms = 1000.0 / _rate(lambda: px.load_frame(path))
    rows = {
        "naive pydicom LUTs (baseline)": _rate(naive),
        "render_display default window": _rate(lambda: dp.render_display(frame)),
        "render_display window drag": _rate(dragging),
        "apply_voi + rint (unfused)": _rate(float_path),
    }
    base = rows["naive pydicom LUTs (baseline)"]
    print(f"\nload_frame (read + decode + Modality LUT) of {Path(path).name}: {load_ms:.1f} ms")
    print(f"render_display on {Path(path).name} {frame.values.shape}")
    print(f"{'method':34s} {'frames/s':>9s} {'vs baseline':>12s}")
    for k, v in rows.items():
        print(f"{k:34s} {v:9.0f} {v / base:11.1f}x")
    rows["load_frame ms"] = load_ms
    return rows


def bench_volume(folder: Path) -> dict:
    from engine.dicom.index import index_path
    from engine.dicom.volume import load_volume

    series = max(index_path(folder).all_series(), key=lambda s: s.count)
    out = {}

    def ours():
        return load_volume(series)

    t = time.perf_counter()
    v = ours()
    out["engine.dicom.volume (pydicom)"] = min(time.perf_counter() - t, _time(ours))
    try:
        import SimpleITK as sitk

        def sitk_read():
            r = sitk.ImageSeriesReader()
            names = r.GetGDCMSeriesFileNames(str(folder))
            r.SetFileNames(names)
            img = r.Execute()
            return sitk.GetArrayFromImage(img)

        a = sitk_read()
        out["SimpleITK ImageSeriesReader"] = _time(sitk_read)
        same = a.shape == v.hu.shape and np.array_equal(np.sort(a.reshape(len(a), -1).sum(1)),
                                                         np.sort(v.hu.reshape(len(v.hu), -1).sum(1)))
    except Exception as exc:  # SimpleITK absent or failing: say so
        same = f"SimpleITK failed: {exc}"
    print(f"\nCT volume {folder.name}: {v.hu.shape}, same voxels as SimpleITK: {same}")
    print(f"{'reader':34s} {'seconds':>8s} {'slices/s':>9s}")
    for k, sec in out.items():
        print(f"{k:34s} {sec:8.3f} {v.hu.shape[0] / sec:9.0f}")
    return out


def _time(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    warnings.simplefilter("ignore")
    from engine.demo.phantom import PhantomGeometry, write_phantom_series

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        ct = Path(tmp) / "CT"
        write_phantom_series(ct, PhantomGeometry())
        results["display_phantom"] = bench_display(str(ct / "CT_0050.dcm"))
        results["volume_phantom"] = bench_volume(ct)
    shared = Path(os.environ.get("CHESTVIEW_SHARED_DATA", REPO.parent / "shared" / "data")) / "dicom"
    if (shared / "ct_lungpetctdx_1").is_dir():
        first = sorted((shared / "ct_lungpetctdx_1").iterdir())[0]
        results["display_lungpetctdx"] = bench_display(str(first))
        results["volume_lungpetctdx"] = bench_volume(shared / "ct_lungpetctdx_1")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_pixels.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
