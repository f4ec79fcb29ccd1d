"""Ray engine throughput: studies per minute against the number of workers, with the local
engine on the same folder as the baseline in the same run.

    .venv/bin/python bench/bench_ray.py [--studies N] [--workers 1 2 ...]

The folder is N copies of the demo chest radiograph (each its own study, 4x downsampled like the
batch tests) plus the demo CT phantom. Per-stage costs (index per file, decode per series,
inference per X-ray / per CT) are printed too: docs/SCALING.md extrapolates from them.
Saves JSON into bench/results/. Research use only.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _folder(root: Path, n: int) -> Path:
    from engine.demo.studies import build_demo
    from tests.test_batch import _xray_folder

    demo = root / "demo"
    build_demo(demo)
    inp = _xray_folder(demo, root / "in", n)
    ct = next(p for p in demo.iterdir() if p.is_dir() and "CT" in p.name.upper())
    shutil.copytree(ct, inp / "ct")
    return inp


def _stage_costs(inp: Path) -> dict:
    from engine.ai.analysis import default_analyzer
    from engine.dicom.index import index_path
    from engine.dicom.safe_decode import decode_series

    t = time.perf_counter()
    idx = index_path(inp)
    index_ms_per_file = (time.perf_counter() - t) * 1000 / max(1, idx.files_seen)
    series = idx.all_series()
    xr = next(s for s in series if s.kind == "xray")
    ct = next(s for s in series if s.kind == "ct")
    out = {"index_ms_per_file": index_ms_per_file}
    for name, se in (("xray", xr), ("ct", ct)):
        t = time.perf_counter()
        decode_series(se)
        out[f"decode_ms_{name}"] = (time.perf_counter() - t) * 1000
    an = default_analyzer()
    an.analyze(xr)                                 # warm-up
    for name, se in (("xray", xr), ("ct", ct)):
        t = time.perf_counter()
        an.analyze(se)
        out[f"analyze_ms_{name}"] = (time.perf_counter() - t) * 1000
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=12)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    a = ap.parse_args()
    import ray

    from engine.review.batch import BatchOptions, run_batch
    from engine.review.ray_batch import run_batch_ray

    tmp = Path(tempfile.mkdtemp(prefix="chestview-bench-ray-"))
    try:
        inp = _folder(tmp, a.studies)
        n = a.studies + 2
        rows = []
        t = time.perf_counter()
        run_batch(BatchOptions(inp, tmp / "local", workers=1))
        base = n / (time.perf_counter() - t) * 60
        rows.append({"engine": "local (baseline)", "workers": 1, "studies_per_min": base, "ratio": 1.0})
        for w in a.workers:
            ray.init(num_cpus=max(2, w + 1), include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
            try:
                t = time.perf_counter()
                run_batch_ray(BatchOptions(inp, tmp / f"ray{w}"), decode_actors=1, infer_actors=w)
                spm = n / (time.perf_counter() - t) * 60
            finally:
                ray.shutdown()
            rows.append({"engine": "ray", "workers": w, "studies_per_min": spm, "ratio": spm / base})
        costs = _stage_costs(inp)
        print(f"{'engine':<18}{'inference actors':>18}{'studies/min':>14}{'vs local':>10}")
        for r in rows:
            print(f"{r['engine']:<18}{r['workers']:>18}{r['studies_per_min']:>14.1f}{r['ratio']:>10.2f}")
        print("per-stage costs (ms):", {k: round(v, 1) for k, v in costs.items()})
        (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
        (REPO / "bench" / "results" / "bench_ray.json").write_text(json.dumps({"rows": rows, "stage_costs": costs,
                                                                               "studies": n}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
