"""GUI responsiveness while the AI runs: longest event-loop stall (target < 50 ms).

A 5 ms precise QTimer on the GUI thread records the gap between ticks (viewer.ai.workers.StallMeter)
while viewer.ai.workers.AnalysisRunner analyses the demo studies in its worker thread. Phases:
idle baseline, startup (model cards: imports torch), CT cold (first analysis: model build),
CT warm (engine reads the series), CT warm on an already loaded volume (the viewer's path),
X-ray warm. Prints max / p99 gap, gaps over 50 ms, the engine stage of the worst gap
and the ratio to the idle baseline measured in the same run; for the longest gaps, the worker's
innermost engine/torch frames sampled right after the gap (the call that held the GIL).

Run: ``.venv/bin/python bench/bench_gui_stall.py [--no-cold] [--repeat N]``.
Writes bench/results/gui_stall.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle-s", type=float, default=3.0, help="idle baseline duration")
    ap.add_argument("--repeat", type=int, default=1, help="warm CT runs")
    ap.add_argument("--stacks", type=int, default=3, help="longest gaps per phase to print with worker stacks")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (CHESTVIEW_THREADS); 0 = the viewer's policy: physical cores - 1")
    ap.add_argument("--nice", type=int, default=None,
                    help="worker thread nice value (viewer.ai.workers.WORKER_NICE; 0 = same as the GUI)")
    args = ap.parse_args()
    if args.nice is not None:
        import viewer.ai.workers

        viewer.ai.workers.WORKER_NICE = args.nice
    if args.threads:
        os.environ["CHESTVIEW_THREADS"] = str(args.threads)
    else:   # what the viewer does (AIController): one core left for the GUI thread
        from viewer.ai.ai_controller import leave_a_core_for_the_gui

        leave_a_core_for_the_gui()

    from PySide6.QtCore import QEventLoop, QTimer
    from PySide6.QtWidgets import QApplication

    from viewer.qt_startup import protect_singletons   # PySide6 6.12 on CPython 3.11 refcount workaround

    protect_singletons()
    app = QApplication.instance() or QApplication(sys.argv[:1])
    from engine.demo.studies import build_demo
    from engine.service import open_path
    from viewer.ai.workers import AnalysisRunner, ModelInfoLoader, StallMeter

    assert "torch" not in sys.modules, "the viewer side must not import torch"
    tmp = Path(tempfile.mkdtemp(prefix="chestview-bench-"))
    build_demo(tmp / "demo")
    idx = open_path(tmp / "demo")
    ct = next(s for s in idx.all_series() if s.kind == "ct")
    cr = next(s for s in idx.all_series() if s.kind == "xray")

    def spin_until(pred, timeout_s: float) -> None:
        """Run a real event loop (not a processEvents busy loop) until ``pred()`` or the timeout."""
        t0 = time.monotonic()
        loop = QEventLoop()
        poll = QTimer()
        poll.setInterval(20)

        def check() -> None:
            if pred() or time.monotonic() - t0 >= timeout_s:
                poll.stop()
                loop.quit()

        poll.timeout.connect(check)
        poll.start()
        loop.exec()

    rows: list[dict] = []
    long_gaps: list[tuple[float, str, str, str]] = []

    def phase(name: str, start, done) -> None:
        meter = StallMeter(capture_stacks=True)
        meter.start()
        t0 = time.perf_counter()
        start(meter)
        spin_until(done, 900)
        dur = time.perf_counter() - t0
        s = meter.stop()
        s.update(phase=name, seconds=dur)
        rows.append(s)
        long_gaps.extend((g, name, lab, st) for g, lab, st in meter.long_gaps)

    # Idle baseline: the same meter with nothing running.
    t_end = time.monotonic() + args.idle_s
    phase("idle", lambda m: None, lambda: time.monotonic() >= t_end)

    loader = ModelInfoLoader()
    got = []
    loader.loaded.connect(lambda infos, err: got.append((infos, err)))
    phase("startup: model cards (import torch)", lambda m: loader.start(), lambda: bool(got))
    loader.wait()

    runner = AnalysisRunner()
    results: list = []
    runner.result.connect(results.append)
    runner.error.connect(lambda msg: results.append(msg))

    def run(series, name, volume=None):
        n0 = len(results)

        def start(meter):
            runner.progress.connect(lambda f, m: meter.mark(m))
            meter.mark("starting (imports, model load)")
            runner.submit(series, volume=volume)

        phase(name, start, lambda: len(results) > n0)
        try:
            runner.progress.disconnect()
        except (RuntimeError, TypeError):
            pass

    run(ct, "CT analysis, cold (model build)")
    for k in range(args.repeat):
        run(ct, f"CT analysis, warm #{k + 1}")
    from engine.dicom.volume import load_volume

    run(ct, "CT analysis, warm, viewer's volume", volume=load_volume(ct))   # what the viewer does
    run(cr, "X-ray analysis, warm")
    runner.shutdown()

    base = next(r for r in rows if r["phase"] == "idle")
    print(f"\nGUI event-loop stalls (5 ms timer), {os.cpu_count()} CPUs, device "
          f"{getattr(results[-1], 'device', '?') if results else '?'}")
    print(f"{'phase':38s} {'s':>6s} {'max ms':>8s} {'p99 ms':>7s} {'>50ms':>6s} {'max/idle':>8s}  worst stage")
    for r in rows:
        ratio = r["max_ms"] / base["max_ms"] if base["max_ms"] else float("nan")
        print(f"{r['phase']:38s} {r['seconds']:6.1f} {r['max_ms']:8.1f} {r['p99_ms']:7.1f} "
              f"{r['over_50ms']:6d} {ratio:8.1f}  {r['worst_phase']}")
    analysis = [r for r in rows if r["phase"].startswith("CT analysis")]
    if analysis:
        worst = max(r["max_ms"] for r in analysis)
        print(f"\nLongest stall during CT analysis: {worst:.0f} ms (target < 50 ms): "
              f"{'OK' if worst < 50 else 'over target'}")
    if long_gaps:
        print(f"\nLongest gaps ({len(long_gaps)} over 50 ms in total), worker frames sampled after the gap:")
        for r in rows:
            mine = sorted((x for x in long_gaps if x[1] == r["phase"]), reverse=True)[:args.stacks]
            for g, name, lab, st in mine:
                print(f"  {g:7.1f} ms  [{name} / {lab}]  {st or '(no engine frame)'}")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gui_stall.json").write_text(json.dumps(
        {"rows": rows, "long_gaps": [{"ms": g, "phase": n, "stage": lab, "stack": st}
                                     for g, n, lab, st in sorted(long_gaps, reverse=True)[:50]]}, indent=1))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    del app
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
