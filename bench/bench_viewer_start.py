"""Viewer start-up: process start to first painted image, idle memory, GUI stalls per phase.

Each case runs in a fresh child process; the clock starts in this (parent) process right before
the child is spawned and stops when the child reports that the image view received its first
paint with an image in it, so interpreter start, imports, window construction, indexing and
decoding are all inside the figure. The child is ``main.py view [FOLDER]`` of the checkout under
test (``--repo``, default this one), instrumented from outside: an import hook wraps
``viewer.main_window.MainWindow.__init__`` to attach a probe (paint filter on the image view, a
5 ms precise timer that records event-loop gaps, the AI panel's ``result_changed``); the code
under test is not modified, so an older checkout can be measured the same way (before/after).

Phases (longest event-loop gap in each): ``start`` (window shown to first image), ``analysis``
(first image to the AI result on screen, auto-run on), ``idle`` (2 s with nothing to do).
The count of gaps of 50 ms or more (all phases, median per run) is printed beside the longest
ones: on a shared VM the longest gap of a run is often one scheduling hiccup. Idle RSS is read
by the parent from /proc/PID/status of the empty window (``view`` with no folder) 3 s after it
was shown, and of the window holding the study after its analysis. ``pydicom`` says whether the
viewer's process imported it (it needs none to read a study).

The checkouts are byte-compiled first (as scripts/setup.sh does for ``make run``).

Baseline, measured in the same run and printed as ratios: a bare QApplication with one QLabel
showing one 512x512 QImage (the least any Qt viewer can do).

Run: ``.venv/bin/python bench/bench_viewer_start.py [--repo PATH] [--repeat N]``.
Writes bench/results/viewer_start.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE_TAG = "CHESTVIEW-PROBE "

# The child: run with ``python -c CHILD REPO MODE [FOLDER]``. It must stay importable by an old
# checkout too, so it only uses MainWindow's documented interface (image_view, ai.panel).
CHILD = r'''
import importlib.abc, importlib.machinery, json, os, sys, time
T0 = time.monotonic()
repo, mode = sys.argv[1], sys.argv[2]
folder = sys.argv[3] if len(sys.argv) > 3 else None
sys.path.insert(0, repo)
os.chdir(repo)
TAG = "CHESTVIEW-PROBE "

def say(event, **kw):
    kw.update(event=event, t=time.monotonic() - T0)
    sys.stdout.write(TAG + json.dumps(kw) + "\n")
    sys.stdout.flush()

class Probe:
    def __init__(self, app, view_widget, has_image, ai_panel=None, wait_analysis=False):
        from PySide6.QtCore import QElapsedTimer, QEvent, QObject, Qt, QTimer
        self.app, self.has_image = app, has_image
        self.phase, self.gaps, self.over, self.done = "start", {}, {}, False
        self.clock = QElapsedTimer(); self.clock.start(); self.last = None   # from the first tick
        self.timer = QTimer(); self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.setInterval(5); self.timer.timeout.connect(self.tick); self.timer.start()
        self.wait_analysis = wait_analysis
        probe = self
        class PaintFilter(QObject):
            def eventFilter(self, obj, ev):
                if ev.type() == QEvent.Type.Paint and probe.phase == "start" and probe.has_image():
                    probe.first_image()
                return False
        self.filter = PaintFilter()
        view_widget.installEventFilter(self.filter)
        if ai_panel is not None and hasattr(ai_panel, "result_changed"):
            ai_panel.result_changed.connect(lambda r: r is not None and self.analysis_done())
        say("window")

    def tick(self):
        now = self.clock.nsecsElapsed()
        if self.last is None:
            self.last = now
            return
        gap = (now - self.last) / 1e6
        self.last = now
        self.gaps[self.phase] = max(self.gaps.get(self.phase, 0.0), gap)
        if gap >= 50.0:
            self.over[self.phase] = self.over.get(self.phase, 0) + 1

    def first_image(self):
        from PySide6.QtCore import QTimer
        say("first_image")
        if self.wait_analysis:
            self.phase = "analysis"
            QTimer.singleShot(120000, self.analysis_done)
        else:
            self.go_idle()

    def analysis_done(self):
        if self.phase == "analysis":
            say("analysis_done")
            self.go_idle()

    def go_idle(self):
        from PySide6.QtCore import QTimer
        self.phase = "idle"
        QTimer.singleShot(2000, self.finish)

    def finish(self):
        from PySide6.QtCore import QTimer
        if self.done:
            return
        self.done = True
        say("idle", gaps=self.gaps, over=self.over, torch="torch" in sys.modules,
            pydicom="pydicom" in sys.modules)
        QTimer.singleShot(1500, self.app.quit)   # the parent reads RSS meanwhile

if mode == "bare":
    import numpy as np
    from PySide6.QtGui import QImage, QPixmap
    from PySide6.QtWidgets import QApplication, QLabel
    app = QApplication(sys.argv[:1])
    img = (np.arange(512 * 512, dtype=np.uint32).reshape(512, 512) % 256).astype(np.uint8)
    q = QImage(img.data, 512, 512, 512, QImage.Format.Format_Grayscale8)
    label = QLabel()
    label.setPixmap(QPixmap.fromImage(q))
    label.show()
    probe = Probe(app, label, lambda: True)
    sys.exit(app.exec())

class _Hook(importlib.abc.MetaPathFinder):
    """After viewer.main_window is imported, wrap MainWindow.__init__ to attach the probe."""
    def find_spec(self, name, path, target=None):
        if name != "viewer.main_window":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        orig = spec.loader.exec_module
        def exec_module(module):
            orig(module)
            cls = module.MainWindow
            init = cls.__init__
            def patched(self, *a, **k):
                init(self, *a, **k)
                from PySide6.QtWidgets import QApplication
                iv = self.image_view
                ai = getattr(self, "ai", None)
                self._bench_probe = Probe(QApplication.instance(), iv.graphics.viewport(),
                                          lambda: iv.current_data() is not None,
                                          getattr(ai, "panel", None), wait_analysis=folder is not None and ai is not None)
                if folder is None:
                    self._bench_probe.go_idle()
            cls.__init__ = patched
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Hook())
import main
sys.exit(main.main(["view"] + ([folder] if folder else [])))
'''


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def run_case(repo: Path, mode: str, folder: Path | None, env: dict, timeout: float = 240.0) -> dict:
    """One child process; returns parent-clock event times (s), gaps (ms) and RSS (MB)."""
    args = [sys.executable, "-c", CHILD, str(repo), mode] + ([str(folder)] if folder else [])
    t0 = time.monotonic()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                         cwd=str(repo))
    out: dict = {"events": {}}

    def reader() -> None:
        for line in p.stdout:   # type: ignore[union-attr]
            if not line.startswith(PROBE_TAG):
                continue
            ev = json.loads(line[len(PROBE_TAG):])
            out["events"][ev["event"]] = time.monotonic() - t0
            if ev["event"] == "idle":
                time.sleep(0.5)
                out["rss_mb"] = rss_mb(p.pid)
                out["gaps"] = ev.get("gaps", {})
                out["torch"] = ev.get("torch")
                out["pydicom"] = ev.get("pydicom")
                out["over_50ms"] = ev.get("over", {})

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        out["error"] = "timeout"
    th.join(5)
    return out


def make_folders(tmp: Path) -> dict[str, Path]:
    """A CR study (pydicom-data's RG1_UNCR chest radiograph) and the demo CT phantom series."""
    from engine.demo.studies import build_demo

    demo = build_demo(tmp / "demo")
    cr = next(p for p in sorted((demo / "CR_CHEST").glob("*.dcm")))
    crdir = tmp / "cr"
    crdir.mkdir()
    shutil.copy(cr, crdir / cr.name)
    return {"CR": crdir, "CT": demo / "CT_PHANTOM"}


def f(x: float | None, fmt: str) -> str:
    """Number formatted to ``fmt``, or a dash of the same width when there is none."""
    if x is not None:
        return format(x, fmt)
    width = fmt.split(".")[0]
    return format("-", f">{width}") if width else "-"


def median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=REPO, help="checkout under test (its main.py view)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cases", default="empty,CR,CT", help="comma list of: empty, CR, CT")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "viewer_start.json")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    tmp = Path(tempfile.mkdtemp(prefix="chestview-start-"))
    env = dict(os.environ, QT_QPA_PLATFORM=os.environ.get("QT_QPA_PLATFORM", "offscreen"),
               CHESTVIEW_SETTINGS=str(tmp / "viewer.ini"), PYTHONDONTWRITEBYTECODE="1")
    folders = make_folders(tmp)
    # as an installed app starts: from bytecode (scripts/setup.sh compiles it; the children run
    # with PYTHONDONTWRITEBYTECODE and would otherwise compile every module of the checkout)
    for repo in {REPO, args.repo}:
        subprocess.run([sys.executable, "-m", "compileall", "-q", "engine", "viewer", "main.py"],
                       cwd=str(repo), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    rows: dict[str, list[dict]] = {"bare Qt + one QImage": []}
    for c in cases:
        rows[f"chestview {c}"] = []
    for _ in range(args.repeat):
        rows["bare Qt + one QImage"].append(run_case(REPO, "bare", None, env))
        for c in cases:
            (tmp / "viewer.ini").unlink(missing_ok=True)
            rows[f"chestview {c}"].append(run_case(args.repo, "view", None if c == "empty" else folders[c], env))
    base = rows["bare Qt + one QImage"]
    base_first = median([r["events"].get("first_image") for r in base])
    base_rss = median([r.get("rss_mb") for r in base])
    base_gap = median([max(r.get("gaps", {}).values(), default=None) for r in base])
    print(f"\nViewer start-up ({args.repo}), median of {args.repeat}, {os.cpu_count()} CPUs; "
          f"ratios against the bare Qt baseline of the same run")
    print(f"{'case':26s} {'first image s':>13s} {'x base':>7s} {'RSS MB':>7s} {'x base':>7s} "
          f"{'gap start':>9s} {'gap AI':>8s} {'gap idle':>8s} {'>=50ms':>7s} {'AI s':>6s} torch pydicom")
    summary = {}
    for name, rs in rows.items():
        first = median([r["events"].get("first_image") for r in rs])
        rss = median([r.get("rss_mb") for r in rs])
        g = {ph: median([r.get("gaps", {}).get(ph) for r in rs]) for ph in ("start", "analysis", "idle")}
        ai = median([(r["events"].get("analysis_done") or 0) - (r["events"].get("first_image") or 0)
                     if r["events"].get("analysis_done") else None for r in rs])
        torch_loaded = any(r.get("torch") for r in rs)
        pydicom_loaded = any(r.get("pydicom") for r in rs)
        # gaps of 50 ms or more, all phases, per run (the max alone is one event of a noisy VM)
        over = median([sum((r.get("over_50ms") or {}).values()) if "gaps" in r else None for r in rs])

        print(f"{name:26s} {f(first, '13.2f')} {f(first / base_first if first and base_first else None, '7.1f')} "
              f"{f(rss, '7.0f')} {f(rss / base_rss if rss and base_rss else None, '7.1f')} "
              f"{f(g['start'], '9.0f')} {f(g['analysis'], '8.0f')} {f(g['idle'], '8.0f')} {f(over, '7.0f')} "
              f"{f(ai, '6.1f')} {'yes' if torch_loaded else 'no':5s} {'yes' if pydicom_loaded else 'no'}")
        summary[name] = {"first_image_s": first, "rss_mb": rss, "gap_ms": g, "gaps_over_50ms": over,
                         "analysis_s": ai, "torch_imported": torch_loaded, "pydicom_imported": pydicom_loaded,
                         "runs": rs}
    print(f"\nbaseline: first image {f(base_first, '.2f')} s, RSS {f(base_rss, '.0f')} MB, "
          f"longest gap {f(base_gap, '.0f')} ms. Goals: first image <= 0.8 s, idle RSS <= 250 MB, "
          f"every gap < 50 ms.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repo": str(args.repo), "cases": summary}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
