"""Smoke test of a built ChestView archive/folder: install, selftest, first window, uninstall.

    python packaging/smoke_test.py --stage dist/chestview-<v>-linux-x86_64 [--archive X.tar.gz]
                                   [--report build/installer-report-gpu.json] [--keep]

Runs the *installed* app (install.sh into a temporary prefix, then the `chestview` symlink), headless
(QT_QPA_PLATFORM=offscreen), with a private CHESTVIEW_HOME so nothing lands in the user's data:
  1. `chestview --version`                  start-up time of the frozen interpreter + argparse;
  2. `chestview selftest`                   version, models + hashes, decoders, CPU/GPU, demo analysed;
  3. `chestview batch <demo>`               decoder child processes (spawn) work in the frozen app;
  4. `chestview view --demo` + CHESTVIEW_SMOKE_EXIT=1 (packaging/rthooks): time to the first painted
     window and to the first displayed demo series;
  5. uninstall.sh                           removes the prefix, the symlink and the menu entry.
Standard library only (it tests the bundle, not the venv). Exit status 0 only if every step passed.
Research use only, not for diagnostic use.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REQUIRED_MEMBERS = ("chestview/chestview", "chestview.sh", "chestview.desktop", "chestview.svg",
                    "install.sh", "uninstall.sh", "VERSION")


def run(cmd: list[str], env: dict[str, str], timeout: float, label: str) -> tuple[int, str, float]:
    """Run one step; print its output; return (exit status, output, seconds)."""
    t = time.monotonic()
    try:
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout
    except subprocess.TimeoutExpired as exc:
        rc = 124
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out += f"\n[smoke] {label}: timed out after {timeout:.0f} s"
    dt = time.monotonic() - t
    print(f"---- {label}: exit {rc} in {dt:.1f} s ----")
    print(out.rstrip()[-6000:])
    return rc, out, dt


def check_archive(archive: Path, top: str) -> list[str]:
    """Members the archive must contain (under its top folder); returns what is missing."""
    with tarfile.open(archive, "r:gz") as tf:
        names = set(tf.getnames())
    return [m for m in REQUIRED_MEMBERS if f"{top}/{m}" not in names]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", required=True, type=Path, help="the unpacked archive folder")
    ap.add_argument("--archive", type=Path, help="the .tar.gz to check for its members")
    ap.add_argument("--report", type=Path, help="JSON file to merge the results into")
    ap.add_argument("--keep", action="store_true", help="keep the temporary install")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per step (selftest analyses the demo)")
    args = ap.parse_args(argv)

    stage = args.stage.resolve()
    version = (stage / "VERSION").read_text().strip()
    results: dict[str, object] = {"smoke_ok": False}
    failures: list[str] = []

    if args.archive:
        t = time.monotonic()
        missing = check_archive(args.archive, stage.name)
        results["archive_list_s"] = round(time.monotonic() - t, 1)
        if missing:
            failures.append(f"archive lacks {missing}")

    tmp = Path(tempfile.mkdtemp(prefix="chestview-smoke-"))
    prefix, bindir, datadir = tmp / "opt" / "chestview", tmp / "bin", tmp / "share"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "QT_", "CHESTVIEW_")) and k not in ("VIRTUAL_ENV", "LD_LIBRARY_PATH")}
    env.update(QT_QPA_PLATFORM="offscreen", CHESTVIEW_HOME=str(tmp / "userdata"),
               MPLCONFIGDIR=str(tmp / "mpl"), XDG_CACHE_HOME=str(tmp / "cache"))
    try:
        rc, out, dt = run(["sh", str(stage / "install.sh"), "--prefix", str(prefix), "--bin-dir", str(bindir),
                           "--data-dir", str(datadir)], env, 600, "install.sh")
        results["install_s"] = round(dt, 1)
        exe = bindir / "chestview"
        if rc != 0 or not exe.exists():
            failures.append("install.sh failed")
            raise RuntimeError
        if not (datadir / "applications" / "chestview.desktop").is_file():
            failures.append("no desktop entry installed")

        for i in (1, 2):
            rc, out, dt = run([str(exe), "--version"], env, 300, f"chestview --version (run {i})")
            results[f"version_run{i}_s"] = round(dt, 2)
            if rc != 0 or version not in out:
                failures.append(f"--version failed or did not print {version}")

        rc, out, dt = run([str(exe), "selftest"], env, args.timeout, "chestview selftest")
        results["selftest_s"] = round(dt, 1)
        results["selftest_rc"] = rc
        results["selftest_tail"] = out.strip().splitlines()[-40:]
        if rc != 0:
            failures.append(f"selftest exited {rc}")
        elif version not in out:
            failures.append(f"selftest output lacks the version {version}")

        # Batch review of the demo: decodes in spawned child processes (engine.dicom.safe_decode), which in a
        # frozen app re-run the executable; the runtime hook must turn them into workers.
        rc, out, _ = run([str(exe), "demo"], env, 600, "chestview demo")
        demo = out.strip().splitlines()[-1] if out.strip() else ""
        rc, out, dt = run([str(exe), "batch", demo, "--out", str(tmp / "batch")], env, args.timeout, "chestview batch <demo>")
        results["batch_s"] = round(dt, 1)
        m = re.search(r"(\d+) series failed", out)
        if rc != 0 or "exited with status" in out or (m and m.group(1) != "0"):
            failures.append(f"batch review of the demo failed (exit {rc})")

        env_view = dict(env, CHESTVIEW_SMOKE_EXIT="1", CHESTVIEW_SMOKE_TIMEOUT=str(int(args.timeout)))
        rc, out, dt = run([str(exe), "view", "--demo"], env_view, args.timeout + 60, "chestview view --demo (smoke exit)")
        results["first_window_wall_s"] = round(dt, 1)
        m = re.search(r"\[chestview-smoke\] first window painted after ([0-9.]+) s", out)
        if rc != 0 or not m:
            failures.append(f"viewer did not paint its first window (exit {rc})")
        else:
            results["first_window_s"] = float(m.group(1))
        m = re.search(r"\[chestview-smoke\] first series displayed after ([0-9.]+) s", out)
        if m:
            results["first_series_s"] = float(m.group(1))

        rc, out, dt = run(["sh", str(prefix / "uninstall.sh")], env, 300, "uninstall.sh")
        if rc != 0 or prefix.exists() or exe.is_symlink() or (datadir / "applications" / "chestview.desktop").exists():
            failures.append("uninstall.sh left files behind")
    except RuntimeError:
        pass
    finally:
        if args.keep:
            print(f"[smoke] kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    results["smoke_ok"] = not failures
    results["smoke_failures"] = failures
    if args.report:
        data = json.loads(args.report.read_text()) if args.report.exists() else {}
        data.update(results)
        args.report.write_text(json.dumps(data, indent=1))
    print("==== ChestView installer smoke test ====")
    for k, v in results.items():
        if k != "selftest_tail":
            print(f"  {k:22s} {v}")
    print("PASSED" if not failures else "FAILED: " + "; ".join(failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
