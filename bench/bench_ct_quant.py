"""CT HU quantification (engine.ai.ct_quant) on a 300-slice chest CT, and the whole CT pipeline.

    .venv/bin/python bench/bench_ct_quant.py [--slices 300] [--no-pipeline]

Volume: the synthetic phantom (engine.demo.phantom) at 300 x 512 x 512, 1 mm slices, written as a
DICOM series to a temporary folder. Rows, each timed in this run:

* baseline: plain HU thresholding of the same volume inside the same lung mask (five band
  counts, no airway removal, no left/right, no vessel filter) — what a first implementation does;
* ct_quant: quantify_ct (airways, sides, zones, classes with vessel exclusion, score), with its
  ratio to the baseline and its peak traced memory (tracemalloc sees numpy's buffers);
* pipeline: engine.ai.analysis.analyze on the written series (sandboxed load, lung ROI,
  quantification, slice classifier on up to 48 slices, no heatmaps): the goal is <= 20 s on CPU.

Prints a table and writes bench/results/ct_quant.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _baseline(hu: np.ndarray, lung: np.ndarray, f: int) -> dict[str, int]:
    """Band counts on the same block grid and mask, nothing else."""
    from engine.ai.ct_quant import _make_grid

    g = _make_grid(hu, (1.0, 1.0, 1.0), f, None, None).hu
    v = g[lung]
    return {"emphysema": int(np.count_nonzero(v < -950)), "normal": int(np.count_nonzero((v >= -950) & (v < -700))),
            "ggo": int(np.count_nonzero((v >= -700) & (v < -300))),
            "consolidation": int(np.count_nonzero((v >= -300) & (v <= 50))), "total": int(v.size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--no-pipeline", action="store_true", help="skip the full analysis (no model load)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from engine.demo import phantom as ph
    from engine.ai.ct_quant import quantify_ct
    from engine.ai.preprocess.lung_roi import segment_lungs

    slice_mm = 300.0 / args.slices
    geom = ph.PhantomGeometry(n_slices=args.slices, size=512, pixel_mm=0.7, slice_mm=slice_mm)
    spacing = (geom.slice_mm, geom.pixel_mm, geom.pixel_mm)
    t = time.perf_counter()
    vol = ph.phantom_volume(geom)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    roi = segment_lungs(vol, spacing)
    roi_s = time.perf_counter() - t
    base_times, quant_times = [], []
    for _ in range(2):
        t = time.perf_counter()
        counts = _baseline(vol, roi.mask, roi.factor)
        base_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        q = quantify_ct(vol, spacing, roi, is_phantom=True)
        quant_times.append(time.perf_counter() - t)
    tracemalloc.start()
    quantify_ct(vol, spacing, roi, is_phantom=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    truth = ph.phantom_truth(geom)
    out = {
        "volume": list(vol.shape), "spacing_mm": list(spacing), "phantom_seconds": round(gen_s, 2),
        "lung_roi_s": round(roi_s, 2), "baseline_threshold_s": round(min(base_times), 3),
        "ct_quant_s": round(min(quant_times), 3), "ratio_ct_quant_to_baseline": round(min(quant_times) / min(base_times), 1),
        "ct_quant_peak_traced_mib": round(peak / 2**20, 1), "volume_mib": round(vol.nbytes / 2**20, 1),
        "ggo_ml": q.ggo_ml, "ggo_truth_ml": round(truth.ggo_ml, 2), "consolidation_ml": q.consolidation_ml,
        "consolidation_truth_ml": round(truth.consolidation_ml, 2),
        "baseline_ggo_ml_unfiltered": round(counts["ggo"] * np.prod(q.grid_spacing_mm) / 1000.0, 2),
        "baseline_consolidation_ml_unfiltered": round(counts["consolidation"] * np.prod(q.grid_spacing_mm) / 1000.0, 2),
    }
    if not args.no_pipeline:
        from engine.ai.analysis import Analyzer
        from engine.dicom.index import index_path

        with tempfile.TemporaryDirectory() as d:
            ph.write_phantom_series(d, geom)
            del vol
            series = index_path(d).all_series()[0]
            an = Analyzer("cpu")
            t = time.perf_counter()
            res = an.analyze(series, want_heatmaps=False)
            out["pipeline_s"] = round(time.perf_counter() - t, 2)
            out["pipeline_timings_ms"] = {k: round(v, 1) for k, v in res.timings_ms.items()}
            out["pipeline_error"] = res.error
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    for k, v in out.items():
        print(f"{k:40s} {v}")
    res_dir = REPO / "bench" / "results"
    res_dir.mkdir(exist_ok=True)
    (res_dir / "ct_quant.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
