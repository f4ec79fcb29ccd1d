"""Batch review throughput (studies per minute) and peak memory (RSS of the whole process tree).

Baseline, measured in the same run: the naive loop — index, then ``engine.ai.analysis.analyze`` on
every series one after the other in one process (no decode children, no journal, no report).
Against it: ``engine.review.batch.run_batch`` with 1 and 2 decode workers (decode in limited child
processes while the parent runs inference; journal, thumbnails and report included).

Each configuration runs in a fresh subprocess (cold start included: imports and model loading are
part of what a user waits for) on the same folder: real full-size CR radiographs from the demo
(chest uncompressed / JPEG 2000 lossless / lossy, and tibia, in turn, given new UIDs so each is its
own study), and with ``--ct`` also the CT phantom.

    .venv/bin/python bench/bench_batch.py [--studies 8] [--repeat 3] [--ct] [--device cpu|cuda]

Prints a table; writes bench/results/bench_batch.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_folder(root: Path, n: int, with_ct: bool) -> Path:
    """n X-ray studies (real CR pixels from the demo, new UIDs) [+ the demo CT phantom]."""
    import pydicom
    from pydicom.uid import generate_uid

    from engine.demo.studies import ensure_demo

    demo = ensure_demo()
    # uncompressed, JPEG 2000 lossless and lossy chest CRs and a tibia (the gate fails), in turn:
    # archives hold compressed images, and decoding them is where a decode pool pays off
    srcs = sorted((demo / "CR_CHEST").glob("*.dcm")) + [demo / "CR_TIBIA" / "CR_01_UNCR.dcm"]
    for i in range(n):
        ds = pydicom.dcmread(srcs[i % len(srcs)])
        ent = ["chestview-bench-batch", str(i)]
        ds.StudyInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.8.498.", entropy_srcs=ent + ["st"])
        ds.SeriesInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.8.498.", entropy_srcs=ent + ["se"])
        ds.SOPInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.8.498.", entropy_srcs=ent + ["sop"])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = f"BENCH-{i:03d}"
        d = root / f"study{i:03d}"
        d.mkdir(parents=True, exist_ok=True)
        ds.save_as(d / "cr.dcm", enforce_file_format=True)
    if with_ct:
        import shutil

        shutil.copytree(demo / "CT_PHANTOM", root / "ct")
    return root


# -- the measured programs (run in a child process) ------------------------------------------------
def _baseline(folder: str) -> dict:
    from engine.ai.analysis import analyze
    from engine.dicom.index import index_path

    t0 = time.perf_counter()
    idx = index_path(folder)
    studies = 0
    for p in idx.patients:
        for st in p.studies:
            for se in st.series:
                analyze(se)
            studies += 1
    return {"studies": studies, "seconds": time.perf_counter() - t0}


def _local(folder: str, out: str, workers: int) -> dict:
    from engine.review.batch import BatchOptions, run_batch

    t0 = time.perf_counter()
    s = run_batch(BatchOptions(Path(folder), Path(out), workers=workers))
    return {"studies": s.studies_done, "seconds": time.perf_counter() - t0}


def _child(argv: list[str]) -> None:
    mode, folder = argv[0], argv[1]
    res = _baseline(folder) if mode == "baseline" else _local(folder, argv[2], int(argv[3]))
    print("RESULT " + json.dumps(res), flush=True)


# -- the harness ---------------------------------------------------------------------------------
def _tree_sample(pid: int, cpu: dict[int, float]) -> int:
    """RSS of the process tree now; records each process's CPU seconds (last seen) in ``cpu``."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
            t = q.cpu_times()
            cpu[q.pid] = t.user + t.system
        except psutil.Error:
            pass
    return total


def measure(args: list[str], env: dict) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    peak = [0]
    cpu: dict[int, float] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_sample(proc.pid, cpu))
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    th.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{args[0]} failed (rc {proc.returncode})")
    res = json.loads(line[7:])
    res.update(wall_s=wall, peak_rss_mib=peak[0] / 2**20, per_min=res["studies"] / wall * 60.0,
               cpu_s=sum(cpu.values()), load_avg=os.getloadavg()[0])
    return res


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=8, help="X-ray studies in the folder")
    ap.add_argument("--ct", action="store_true", help="add the 120-slice CT phantom study")
    ap.add_argument("--device", default=None, help="CHESTVIEW_DEVICE for the children (cpu/cuda)")
    ap.add_argument("--workers", default="1,2", help="decode worker counts to measure")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the median run is shown")
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if a.device:
        env["CHESTVIEW_DEVICE"] = a.device
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        folder = build_folder(Path(tmp) / "in", a.studies, a.ct)
        configs = [("baseline: sequential analyze(), 1 process", ["baseline", str(folder)])]
        for w in [int(x) for x in a.workers.split(",")]:
            configs.append((f"chestview batch, {w} decode worker(s)", ["local", str(folder), f"{tmp}/out{w}", str(w)]))
        runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
        for rep in range(a.repeat):          # interleaved rounds: background load hits every config alike
            for name, args in configs:
                if args[0] == "local":
                    import shutil

                    shutil.rmtree(args[2], ignore_errors=True)   # a fresh output folder: no resume
                r = measure(args, env)
                runs[name].append(r)
                print(f"  round {rep + 1}: {name}: {r['per_min']:.1f} studies/min", file=sys.stderr, flush=True)
        for name, _ in configs:
            rs = sorted(runs[name], key=lambda r: r["per_min"])
            med = rs[len(rs) // 2]
            rows.append({"config": name, **med, "per_min_all": [round(r["per_min"], 2) for r in runs[name]],
                         "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)})
    base = rows[0]["per_min"]
    import platform

    print(f"\nBatch review, {a.studies} X-ray studies{' + CT phantom' if a.ct else ''}, median of {a.repeat} "
          "interleaved runs, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), device {a.device or 'auto'}")
    print(f"{'configuration':45s} {'studies':>7s} {'wall s':>8s} {'studies/min':>12s} {'vs base':>8s} "
          f"{'CPU s/study':>12s} {'peak RSS MiB':>13s} {'load avg':>9s}")
    for r in rows:
        print(f"{r['config']:45s} {r['studies']:7d} {r['wall_s']:8.1f} {r['per_min']:12.1f} "
              f"{r['per_min'] / base:7.2f}x {r['cpu_s'] / max(1, r['studies']):12.2f} {r['peak_rss_mib']:13.0f} "
              f"{r['load_avg']:9.1f}")
    print("(CPU s/study: user+sys of the whole process tree incl. start-up; a load average above the CPU count "
          "means other work shared the cores and wall-clock rates are pessimistic)")
    for r in rows:
        print(f"  {r['config']}: all runs {r['per_min_all']} studies/min")
    res_dir = REPO / "bench" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / "bench_batch.json").write_text(json.dumps({"studies": a.studies, "ct": a.ct, "device": a.device,
                                                          "cpus": os.cpu_count(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
