"""``python main.py batch FOLDER --out DIR``: the command line of the batch review, for both
engines (engine.review.batch on this machine, engine.review.ray_batch with ``--engine ray``), with a
terminal progress line (studies done, rate, ETA)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from engine.dicom.safe_decode import DEFAULT_TIMEOUT_S
from engine.review.batch import run_batch
from engine.review.stages import BatchOptions, default_workers


# ----------------------------------------------------------------------------------------------
# Terminal progress
# ----------------------------------------------------------------------------------------------
class TerminalProgress:
    """Studies done, rate and ETA on one updating line (a line every few seconds when not a tty)."""

    def __init__(self, total: int, stream: Any = None):
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0.0
        self._shown = False

    @staticmethod
    def _eta(s: float) -> str:
        if s != s or s == float("inf"):
            return "--"
        s = int(s)
        return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

    def update(self, done: int, rate_per_min: float, eta_s: float, force: bool = False) -> None:
        now = time.monotonic()
        if not force and not self.tty and now - self._last < 5.0:
            return
        self._last = now
        frac = done / self.total if self.total else 1.0
        bar = "#" * int(frac * 24) + "." * (24 - int(frac * 24))
        msg = f"[{bar}] {done}/{self.total} studies  {rate_per_min:5.1f}/min  ETA {self._eta(eta_s)}"
        if self.tty:
            self.stream.write("\r" + msg + "\x1b[K")
            self._shown = True
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()

    def line(self, msg: str) -> None:
        if self.tty and self._shown:
            self.stream.write("\r\x1b[K")
        self.stream.write(msg + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chestview batch",
        description="Review every study under FOLDER (folder, DICOMDIR or ZIP; read only) and write "
                    "results.csv, results.json and report.html to --out. Finished studies are kept: "
                    "run the same command again to resume. Research use only, not for diagnostic use.")
    p.add_argument("folder", help="input folder, DICOMDIR or ZIP (never written to)")
    p.add_argument("--out", required=True, help="output folder (must not be inside the input folder)")
    p.add_argument("--deidentify", action="store_true",
                   help="replace patient name, ID and birth date by a stable pseudonym in every output")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="decode processes beside inference (default: cores - 1, at least 2, at most 4)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="decode time limit per series in seconds (+2 s per further file)")
    p.add_argument("--max-memory-mb", type=int, default=None,
                   help="address-space bound of each decode process (default min(3072, RAM/2))")
    p.add_argument("--no-heatmaps", action="store_true", help="skip Grad-CAM (faster; no overlays)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="X-rays per forward pass across studies (default 8 on a GPU, 1 on CPU)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local (default) or ray: the same review as a Ray Data pipeline (pip install '.[cluster]')")
    p.add_argument("--address", default=None,
                   help="with --engine ray: join this Ray cluster (default: start a local Ray sized to the machine)")
    p.add_argument("--ray-cpus", type=int, default=None,
                   help="with --engine ray and no --address: CPUs of the local Ray instance (default: all)")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    """``python main.py batch FOLDER --out DIR [--deidentify] [--workers N] [--timeout S]``."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.workers < 1 or args.timeout <= 0 or (args.batch_size is not None and args.batch_size < 1):
        print("chestview batch: --workers and --batch-size must be >= 1 and --timeout > 0", file=sys.stderr)
        return 2
    opts = BatchOptions(Path(args.folder), Path(args.out), deidentify=args.deidentify, workers=args.workers,
                        timeout_s=args.timeout, memory_mb=args.max_memory_mb, heatmaps=not args.no_heatmaps,
                        batch_size=args.batch_size)
    bar: TerminalProgress | None = None

    def on_progress(done: int, total: int, rate: float, eta: float) -> None:
        nonlocal bar
        if bar is None:
            bar = TerminalProgress(total)
        bar.update(done, rate, eta, force=done in (0, total))

    def on_problem(path: str, reason: str) -> None:
        msg = f"problem: {path}: {reason}"
        (bar.line(msg) if bar is not None else print(msg, file=sys.stderr, flush=True))

    try:
        if args.engine == "ray":
            from engine.review.ray_batch import run_batch_ray

            kw: dict[str, Any] = {"address": args.address, "progress": on_progress, "on_problem": on_problem,
                                  "num_cpus": args.ray_cpus}
            if args.batch_size:
                kw["batch_size"] = args.batch_size
            s = run_batch_ray(opts, **kw)
        else:
            if args.address:
                print("chestview batch: --address needs --engine ray", file=sys.stderr)
                return 2
            s = run_batch(opts, progress=on_progress, on_problem=on_problem)
    except RuntimeError as e:  # e.g. the Ray extra is not installed
        if bar:
            bar.finish()
        print(f"chestview batch: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        if bar:
            bar.finish()
        print(f"chestview batch: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if bar:
            bar.finish()
        print(f"chestview batch: interrupted; finished studies are kept in {opts.out}: run the same command "
              "again to resume", file=sys.stderr)
        return 130
    if bar:
        bar.finish()
    print(f"Reviewed {s.studies_total} studies ({s.studies_done} analysed now, {s.studies_skipped} from an "
          f"earlier run), {s.series_failed} series failed, {s.problem_files} files skipped, in {s.seconds:.1f} s.")
    print("Research use only, not for diagnostic use.")
    print(f"Report: {s.report_html}")
    print(f"Results: {s.results_csv} and {s.results_json}")
    return 0


def run_batch_cli(argv: list[str]) -> int:
    """Used by ``main.py run-demo`` (same as ``python main.py batch``)."""
    return cli_main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_main())
