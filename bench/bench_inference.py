"""Inference latency: X-ray DenseNet-121 (inference, + Grad-CAM), CT study on the demo phantom, throughput.

Run: ``.venv/bin/python bench/bench_inference.py [--repeats N] [--quick]``. Prints a table with
ratios against a baseline measured in the same run (fp32 eager DenseNet-121, batch 1) and writes
``bench/results/bench_inference.json``. Models are untrained stand-ins unless cards exist (latency
does not depend on the weights). Batch 64 and CUDA rows print 'n/a without CUDA' on CPU machines.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed(fn, repeats: int, warmup: int = 1, sync=None) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and CT slices (smoke run)")
    args = ap.parse_args(argv)
    reps = 2 if args.quick else args.repeats

    import numpy as np
    import torch

    from engine.ai.analysis import Analyzer
    from engine.dicom.records import SeriesRecord
    from engine.ai.explain.gradcam import cams_from_fmap
    from engine.ai.models.devices import autocast, pick_device
    from engine.ai.models.registry import CT_MODEL, XRAY_MODEL, load_model
    from engine.demo.phantom import PhantomGeometry, phantom_volume
    from engine.ai.preprocess.lung_roi import segment_lungs

    cpu = pick_device("cpu")
    rows: list[tuple[str, float | None, str]] = []   # (what, seconds, unit note)
    xr = load_model(XRAY_MODEL)
    net = xr.module
    x1 = torch.rand(1, 1, 224, 224) * 2048 - 1024
    x8 = torch.rand(8, 1, 224, 224) * 2048 - 1024

    def infer(x):
        with torch.inference_mode():
            return net.head(net.feature_map(x))

    base = timed(lambda: infer(x1), reps)
    rows.append(("X-ray DenseNet-121 inference, fp32, batch 1 (baseline)", base, "per image"))

    def infer_cam():
        with torch.no_grad():
            fmap = net.feature_map(x1)
        cams_from_fmap(net.head, fmap, [lambda o: o["pathologies"][:, 16], lambda o: o["covid"][:, 0]])

    rows.append(("X-ray inference + Grad-CAM (2 targets, autograd on feature map)", timed(infer_cam, reps), "per image"))

    def full_backprop_cam():
        xx = x1.clone().requires_grad_(True)
        with torch.enable_grad():
            out = net(xx)["pathologies"][:, 16].sum()
            torch.autograd.grad(out, xx)

    rows.append(("X-ray inference + backprop to the input (what hook-based CAM costs)",
                 timed(full_backprop_cam, max(1, reps // 2)), "per image"))
    t8 = timed(lambda: infer(x8), max(1, reps // 2))
    rows.append(("X-ray inference, fp32, batch 8", t8 / 8, "per image"))
    bf16 = types.SimpleNamespace(device=torch.device("cpu"), autocast_dtype=torch.bfloat16)

    def infer_bf16():
        with torch.inference_mode(), autocast(bf16):
            net.head(net.feature_map(x1))

    rows.append(("X-ray inference, CPU autocast bf16, batch 1", timed(infer_bf16, reps), "per image"))

    # GPU rows
    if torch.cuda.is_available():
        gpu = pick_device("cuda")
        gnet = load_model(XRAY_MODEL, device=gpu.device).module
        sync = torch.cuda.synchronize
        for bs in (1, 8, 64):
            xg = (torch.rand(bs, 1, 224, 224, device=gpu.device) * 2048 - 1024)

            def g(xg=xg):
                with torch.inference_mode(), autocast(gpu):
                    gnet.head(gnet.feature_map(xg))

            rows.append((f"X-ray inference, CUDA autocast fp16, batch {bs}", timed(g, reps * 4, 3, sync) / bs, "per image"))
    else:
        for bs in (1, 8, 64):
            rows.append((f"X-ray inference, CUDA autocast fp16, batch {bs}", None, "n/a without CUDA"))

    # CT: lung ROI and whole study on the demo phantom (120 x 512 x 512)
    geom = PhantomGeometry()
    hu = phantom_volume(geom)
    spacing = (geom.slice_mm, geom.pixel_mm, geom.pixel_mm)
    rows.append(("CT lung ROI, 120x512x512 phantom", timed(lambda: segment_lungs(hu, spacing), max(1, reps // 2)),
                 "per study"))
    load_model(CT_MODEL)
    vol = types.SimpleNamespace(hu=hu, spacing=spacing, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), warnings=[],
                                positions=[geom.z_of(k) for k in range(geom.n_slices)])
    series = SeriesRecord("bench", "bench", "bench", "CT", body_part="CHEST")
    n_slices = 8 if args.quick else 48
    an = Analyzer("cpu", ct_max_slices=n_slices)
    res = an.analyze_volume(series, vol, want_heatmaps=False)
    ct_t = timed(lambda: an.analyze_volume(series, vol, want_heatmaps=False), 1, warmup=0)
    rows.append((f"CT study (lung ROI + {int(res.timings_ms.get('slices_scored', 0))} GoogLeNet slices, batch 16)",
                 ct_t, "per study"))
    ct_net = load_model(CT_MODEL).module
    xs = torch.rand(16, 3, 224, 224) * 2 - 1
    with torch.inference_mode():
        s16 = timed(lambda: ct_net(xs), 1)
    rows.append(("CT GoogLeNet slice inference, batch 16", s16 / 16, "per slice"))

    print(f"device: {cpu.name}; torch {torch.__version__}; repeats {reps} (median)")
    print(f"{'what':<80} {'ms':>9} {'ratio':>7}  unit")
    out = []
    for what, sec, unit in rows:
        if sec is None:
            print(f"{what:<80} {'n/a':>9} {'':>7}  {unit}")
            out.append({"what": what, "ms": None, "ratio_vs_baseline": None, "unit": unit})
            continue
        ratio = sec / base
        print(f"{what:<80} {sec * 1000:9.1f} {ratio:7.2f}  {unit}")
        out.append({"what": what, "ms": round(sec * 1000, 2), "ratio_vs_baseline": round(ratio, 3), "unit": unit})
    ips1, ips8 = 1.0 / base, 8.0 / t8
    print(f"images/s on CPU: batch 1 {ips1:.1f}, batch 8 {ips8:.1f}, batch 64 n/a without CUDA"
          if not torch.cuda.is_available() else f"images/s on CPU: batch 1 {ips1:.1f}, batch 8 {ips8:.1f}")
    res_dir = REPO / "bench" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / "bench_inference.json").write_text(json.dumps({"device": cpu.name, "rows": out}, indent=1))
    del np
    return 0


if __name__ == "__main__":
    sys.exit(main())
