"""Index throughput (headers/s) against plain pydicom.dcmread of every file, in the same run.

    .venv/bin/python bench/bench_index.py [folder ...]

Default folders: the demo set (built into a temp folder) and ../shared/data/dicom when present.
Rows: index_path (default: bounded header walk, pydicom fallback), index_path reading every
header with pydicom (with and without specific_tags), dcmread(stop_before_pixels=True) of every
file, and dcmread of every file (full read, the baseline).
Each is the best of 3 runs (warm file cache). Saves nothing outside bench/results/.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.dicom import index as idx  # noqa: E402


def _files(root: Path) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.join(d, n) for n in names if not n.startswith(".")]
    return sorted(out)


def _best(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _dcmread_all(files: list[str], stop: bool) -> int:
    import pydicom

    n = 0
    for f in files:
        try:
            pydicom.dcmread(f, force=True, stop_before_pixels=stop)
            n += 1
        except Exception:
            pass
    return n


def bench(folder: Path) -> dict:
    files = _files(folder)
    res = idx.index_path(folder)
    n = sum(s.count for s in res.all_series())
    rows = {}
    rows["index_path (fast header walk)"] = _best(lambda: idx.index_path(folder))
    idx.USE_FAST_PATH = False
    rows["index_path via pydicom"] = _best(lambda: idx.index_path(folder))
    idx.USE_SPECIFIC_TAGS = True
    rows["index_path via pydicom specific_tags"] = _best(lambda: idx.index_path(folder))
    idx.USE_SPECIFIC_TAGS, idx.USE_FAST_PATH = False, True
    rows["dcmread stop_before_pixels"] = _best(lambda: _dcmread_all(files, True))
    rows["dcmread full (baseline)"] = _best(lambda: _dcmread_all(files, False))
    base = rows["dcmread full (baseline)"]
    print(f"\n{folder}  ({len(files)} files, {n} DICOM instances, {len(res.problems)} problems)")
    print(f"{'method':38s} {'seconds':>8s} {'headers/s':>10s} {'vs baseline':>12s}")
    for k, v in rows.items():
        print(f"{k:38s} {v:8.3f} {n / v:10.0f} {base / v:11.2f}x")
    return {"folder": str(folder), "files": len(files), "instances": n,
            "seconds": rows, "headers_per_s": {k: n / v for k, v in rows.items()}}


def main() -> None:
    warnings.simplefilter("ignore")
    folders = [Path(a) for a in sys.argv[1:]]
    tmp = None
    if not folders:
        from engine.demo.studies import build_demo

        tmp = tempfile.TemporaryDirectory()
        folders.append(build_demo(Path(tmp.name) / "demo"))
        shared = Path(os.environ.get("CHESTVIEW_SHARED_DATA", REPO.parent / "shared" / "data")) / "dicom"
        if shared.is_dir():
            folders.append(shared)
    results = [bench(f) for f in folders]
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_index.json").write_text(json.dumps(results, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
