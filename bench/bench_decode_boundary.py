"""Cost of the untrusted-decode boundary: in-process decode (the baseline) vs the sandboxed child.

    nice -n 10 .venv/bin/python bench/bench_decode_boundary.py

Rows, each measured in this run (median of repeats, after one warm-up call):
* in-process ``engine.dicom.pixels.load_frame`` / ``engine.dicom.volume.load_volume``;
* the boundary (``engine.dicom.safe_decode.bounded_load_frame`` / ``bounded_load_volume``) with the
  decoded arrays returned through /dev/shm;
* the boundary with the arrays pickled through the pipe instead (what shared memory saves).
Files: pydicom's CT_small (128x128), a 512x512 CT slice and the 1955x1841 JPEG 2000 CR and
64-slice CT series of ../shared/data when present. Prints ratios boundary / in-process.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def main() -> None:
    from pydicom.data import get_testdata_file

    import engine.dicom.safe_decode as sd
    from engine.dicom.index import index_path
    from engine.dicom.pixels import load_frame
    from engine.dicom.volume import load_volume

    shared = REPO.parent / "shared" / "data" / "dicom"
    frames = [("CT_small 128x128", Path(get_testdata_file("CT_small.dcm")))]
    if shared.is_dir():
        frames += [("CT slice 512x512", shared / "ct_orthanc_ge_brightspeed_lung.dcm"),
                   ("CR J2K 1955x1841", shared / "xray_wg04_rg1_j2ki.dcm")]
    series = []
    if (shared / "ct_lungpetctdx_1").is_dir():
        series.append(("CT 64x512x512", index_path(shared / "ct_lungpetctdx_1").all_series()[0]))

    print(f"{'case':24s} {'in-process ms':>14s} {'boundary ms':>12s} {'ratio':>6s} {'pipe ms':>9s} {'ratio':>6s}")
    for label, path in frames:
        base = _median_ms(lambda: load_frame(path), 7)
        shm = _median_ms(lambda: sd.bounded_load_frame(path), 7)
        real = sd._shm_usable
        sd._shm_usable = lambda: False          # the same boundary, arrays through the pipe
        try:
            pipe = _median_ms(lambda: sd.bounded_load_frame(path), 7)
        finally:
            sd._shm_usable = real
        print(f"{label:24s} {base:14.1f} {shm:12.1f} {shm / base:6.2f} {pipe:9.1f} {pipe / base:6.2f}")
    for label, se in series:
        base = _median_ms(lambda: load_volume(se), 3)
        shm = _median_ms(lambda: sd.bounded_load_volume(se), 3)
        real = sd._shm_usable
        sd._shm_usable = lambda: False
        try:
            pipe = _median_ms(lambda: sd.bounded_load_volume(se), 3)
        finally:
            sd._shm_usable = real
        print(f"{label:24s} {base:14.1f} {shm:12.1f} {shm / base:6.2f} {pipe:9.1f} {pipe / base:6.2f}")
    t0 = time.perf_counter()
    sd.shutdown_boundary()
    pool = sd.boundary_pool("background")
    pool.submit(len, "").result()
    print(f"\nstart of a fresh boundary child (forkserver already running): "
          f"{(time.perf_counter() - t0) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
