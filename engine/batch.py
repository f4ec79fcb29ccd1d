"""Batch review of a folder of studies: ``python main.py batch FOLDER --out DIR``.

The review is a chain of stages, each a plain function so the Ray engine (issue 12) can map the
same functions over a Ray Dataset:

1. :func:`plan_batch` — index the input (headers only, engine.dicom.index) into
   :class:`StudyTask` items with a fingerprint, plus the files the index skipped.
2. :func:`decode_stage` (``engine.safe_decode.decode_series`` in a ``LimitedPool``) — decode one
   series in a memory- and time-bounded child: thumbnails for the report and the decoded
   Frame/Volume, or a LoadError reason. A decode failure never reaches inference.
3. :func:`infer_stage` — the *same* ``engine.analysis.analyze`` call the viewer makes
   (preprocessing, validity gate, model, Grad-CAM) -> StudyResult. Inside
   ``engine.safe_decode.reuse_decoded`` the analysis reads the child's pixels, so untrusted data
   is decoded once, bounded. :func:`batch_outcomes` does the same for several X-rays with
   ``analyze_many`` (``--batch-size``, default 8 on a GPU: one forward pass across studies).
4. :func:`series_outcome` / :func:`study_record` — thumbnail PNG + one row per series
   (engine.report.build_row), grouped per study.
5. :class:`engine.journal.Journal` — each study's record committed atomically when done;
   a restarted batch skips studies whose record and fingerprint exist.
6. :func:`finalize` — results.json / results.csv / report.html derived from the journal only.

On one machine decode runs in ``--workers`` child processes while the parent runs inference, so
both cores are busy; memory is bounded by a small prefetch window (``workers + batch_size + 1``
decoded series; full pixels over 160 MiB stay in the child and are re-read by the analysis). Input is only ever read; an
output folder inside the input folder is refused. Logs carry counts and relative file paths,
never patient names, IDs or birth dates.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.errors import AnalysisCancelled, LoadError
from engine.journal import Journal, fingerprint, study_key
from engine.report import (Deidentifier, build_results, build_row, collect_models, is_unsupported, write_reports,
                           write_thumbnail)
from engine.safe_decode import DEFAULT_TIMEOUT_S, Decoded, LimitedPool, decode_series, reuse_decoded, series_timeout

CancelFn = Callable[[], bool]


def default_workers() -> int:
    """Decode children: the cores beside the inference thread, at least 2, at most 4.

    At least 2 because decoding (JPEG 2000 above all) usually takes longer than inference, so one
    child leaves the inference waiting (bench/bench_batch.py: 2 children beat 1 on 2 cores)."""
    return max(2, min(4, (os.cpu_count() or 2) - 1))


@dataclass
class BatchOptions:
    input: Path
    out: Path
    deidentify: bool = False
    workers: int = field(default_factory=default_workers)
    timeout_s: float = DEFAULT_TIMEOUT_S      # per series, plus 2 s per further file
    memory_mb: int | None = None              # per decode child; None = min(3 GiB, RAM/2)
    heatmaps: bool = True
    reuse_pixels: bool = True                 # analysis reads the child's decoded pixels (no 2nd decode)
    batch_size: int | None = None             # X-rays per forward pass across studies; None = 8 on GPU, 1 on CPU


@dataclass
class StudyTask:
    """One study to review: its records and the fingerprint its journal entry must match."""

    key: str
    fingerprint: str
    patient: Any
    study: Any
    series: list[Any]


@dataclass
class BatchPlan:
    input: Path
    studies: list[StudyTask]
    problems: list[dict[str, str]]            # {"path": relative, "reason": ...}, not de-identified yet
    files_seen: int
    patients: list[Any]


@dataclass
class SeriesOutcome:
    """What stages 2-3 produced for one series (the Ray engine builds the same)."""

    series: Any
    decoded: Decoded | None = None
    result: Any = None                        # StudyResult
    error: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class BatchSummary:
    out: Path
    report_html: Path | None
    results_json: Path | None
    results_csv: Path | None
    studies_total: int = 0
    studies_done: int = 0                     # analysed in this run
    studies_skipped: int = 0                  # already in the journal
    series_failed: int = 0
    problem_files: int = 0
    seconds: float = 0.0
    cancelled: bool = False


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------
def input_root(path: Path) -> Path:
    """The folder whose files are input: the folder itself, or a DICOMDIR's / ZIP's folder."""
    return path if path.is_dir() else path.parent


def check_paths(input_path: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Resolve both; refuse a missing input and an output inside (or equal to) the input folder."""
    inp = Path(input_path).expanduser().resolve()
    outp = Path(out).expanduser().resolve()
    if not inp.exists():
        raise ValueError(f"input {inp} does not exist: give a folder, DICOMDIR or ZIP file")
    root = input_root(inp)
    if outp == root or root in outp.parents:
        raise ValueError(f"--out {outp} is inside the input folder {root}; ChestView never writes into "
                         "an input folder: choose an output folder elsewhere")
    return inp, outp


def problem_entry(deid: Deidentifier, path: str, reason: Any) -> tuple[str, str]:
    """(where, reason) of a problem line for stderr, results.json and report.html.

    Relative paths still name folders, and folders are often named after patients, while a
    file that failed to index has no known identifiers for ``deid.scrub`` to remove: under
    --deidentify the file is named by a keyed hash (engine.logscrub.deid_path) instead, and
    absolute paths inside reasons are hashed in every mode (DESIGN.md 5).
    """
    from engine.logscrub import deid_path, scrub_paths

    where = str(path or "")
    if deid.enabled and where and not where.startswith("series "):
        where = deid_path(where, deid.pseudonym("chestview-problem-paths").encode())
    return deid.scrub(where), deid.scrub(scrub_paths(str(reason)))


def rel_path(path: str, root: Path) -> str:
    """Path relative to the input root for reports and logs (ZIP members keep their ``::member``)."""
    head, sep, member = str(path).partition("::")
    try:
        r = Path(head).resolve().relative_to(root).as_posix()
    except (ValueError, OSError):
        r = Path(head).name
    return r + (sep + member if sep else "")


# ----------------------------------------------------------------------------------------------
# Stage 1: plan
# ----------------------------------------------------------------------------------------------
def _model_signature() -> list[Any]:
    """Model names/versions/hashes: a study is re-analysed when a model changes."""
    try:
        from engine.models.registry import list_model_infos

        return sorted((m.name, m.version, m.sha256, bool(m.trained)) for m in list_model_infos())
    except Exception:
        return []


def _file_stamp(path: str) -> tuple[int, int]:
    try:
        st = os.stat(str(path).partition("::")[0])
        return st.st_size, int(st.st_mtime)
    except OSError:
        return -1, -1


def plan_batch(input_path: str | Path, *, cancel: CancelFn | None = None, heatmaps: bool = True,
               deidentify: bool = False, index_fn: Callable | None = None) -> BatchPlan:
    """Index the input (headers only) and list the studies with their fingerprints."""
    if index_fn is None:
        from engine.dicom.index import index_path as index_fn
    inp = Path(input_path)
    root = input_root(inp)
    idx = index_fn(inp, cancel=cancel) if cancel is not None else index_fn(inp)
    models = _model_signature()
    tasks: list[StudyTask] = []
    for p in idx.patients:
        for st in p.studies:
            if not st.series:
                continue
            parts = [st.study_uid, models, bool(heatmaps), bool(deidentify)]
            for se in sorted(st.series, key=lambda s: s.series_uid):
                parts.append([se.series_uid, [(rel_path(i.path, root), *_file_stamp(i.path)) for i in se.instances]])
            tasks.append(StudyTask(study_key(st.study_uid), fingerprint(parts), p, st, list(st.series)))
    tasks.sort(key=lambda t: t.key)
    prefix = str(root).rstrip(os.sep) + os.sep
    problems = [{"path": rel_path(pr.path, root) if pr.path else "", "reason": str(pr.reason).replace(prefix, "")}
                for pr in idx.problems]
    return BatchPlan(inp, tasks, problems, int(getattr(idx, "files_seen", 0) or 0), list(idx.patients))


# ----------------------------------------------------------------------------------------------
# Stages 2-4
# ----------------------------------------------------------------------------------------------
def decode_stage(series: Any) -> Decoded:
    """Stage 2 body (runs inside a limited child): thumbnails of what the viewer displays."""
    return decode_series(series)


def infer_stage(series: Any, *, cancel: CancelFn | None = None, heatmaps: bool = True,
                analyze_fn: Callable | None = None) -> Any:
    """Stage 3: the viewer's analyze() call. Only AnalysisCancelled escapes."""
    if analyze_fn is None:
        from engine.analysis import analyze as analyze_fn
    return analyze_fn(series, cancel=cancel, want_heatmaps=heatmaps)


def series_outcome(series: Any, decoded: Decoded | LoadError, *, cancel: CancelFn | None = None,
                   heatmaps: bool = True, analyze_fn: Callable | None = None) -> SeriesOutcome:
    """Stages 2->3 for one series: a decode failure skips inference (never re-decode unbounded)."""
    if isinstance(decoded, LoadError):
        return SeriesOutcome(series, None, None, decoded.reason, {})
    oc = SeriesOutcome(series, decoded, timings_ms={"decode": round(decoded.decode_ms, 1)})
    t0 = time.perf_counter()
    try:
        with reuse_decoded([decoded]):
            oc.result = infer_stage(series, cancel=cancel, heatmaps=heatmaps, analyze_fn=analyze_fn)
    except AnalysisCancelled:
        raise
    except Exception as e:  # analyze() must not raise for bad input; bound it anyway
        oc.error = f"analysis failed: {type(e).__name__}: {e}"
    finally:
        decoded.pixels = None             # full-resolution data is not kept beyond inference
    oc.timings_ms["analyze"] = round((time.perf_counter() - t0) * 1000.0, 1)
    return oc


def batch_outcomes(items: list[tuple[Any, Decoded | LoadError]], *, cancel: CancelFn | None = None,
                   heatmaps: bool = True, analyze_many_fn: Callable | None = None) -> list[SeriesOutcome]:
    """Stage 3 for several X-ray series at once (``engine.analysis.analyze_many``: shared forward
    passes, for GPUs). Decode failures skip inference as in :func:`series_outcome`; results keep order."""
    if analyze_many_fn is None:
        from engine.analysis import analyze_many as analyze_many_fn
    outs: list[SeriesOutcome] = []
    ok: list[SeriesOutcome] = []
    for se, dec in items:
        if isinstance(dec, LoadError):
            outs.append(SeriesOutcome(se, None, None, dec.reason, {}))
        else:
            oc = SeriesOutcome(se, dec, timings_ms={"decode": round(dec.decode_ms, 1)})
            outs.append(oc)
            ok.append(oc)
    if ok:
        t0 = time.perf_counter()
        try:
            with reuse_decoded([oc.decoded for oc in ok]):
                results = analyze_many_fn([oc.series for oc in ok], cancel=cancel, want_heatmaps=heatmaps)
            if len(results) != len(ok):
                raise RuntimeError(f"{len(results)} results for {len(ok)} series")
        except AnalysisCancelled:
            raise
        except Exception as e:  # bound it: the whole group gets the reason, the batch goes on
            results = [None] * len(ok)
            for oc in ok:
                oc.error = f"analysis failed: {type(e).__name__}: {e}"
        finally:
            for oc in ok:
                oc.decoded.pixels = None
        per = round((time.perf_counter() - t0) * 1000.0 / len(ok), 1)
        for oc, res in zip(ok, results):
            oc.result = res
            oc.timings_ms["analyze"] = per      # the group's time, shared
    return outs


def default_batch_size() -> int:
    """8 X-rays per forward pass on a GPU (throughput), 1 on CPU (identical to the viewer's call)."""
    try:
        from engine.models.devices import pick_device

        return 8 if pick_device().device.type == "cuda" else 1
    except Exception:
        return 1


def study_record(task: StudyTask, outcomes: list[SeriesOutcome], out_dir: Path,
                 deid: Deidentifier) -> dict[str, Any]:
    """Stage 4: thumbnails + rows of one study, ready for Journal.write."""
    rows, models = [], []
    for oc in outcomes:
        thumb = None
        if oc.decoded is not None:
            try:
                thumb = write_thumbnail(out_dir, oc.series.series_uid, oc.decoded, oc.result)
            except Exception as e:  # a thumbnail never costs a result
                oc.decoded.warnings.append(f"no thumbnail: {type(e).__name__}")
        rows.append(build_row(task.patient, task.study, oc.series, oc.result, error=oc.error, deid=deid,
                              thumbnail=thumb, timings_ms=oc.timings_ms,
                              warnings=oc.decoded.warnings if oc.decoded is not None else ()))
        if oc.result is not None:
            models += [asdict(m) for m in oc.result.models]
    return {"study_uid": task.study.study_uid, "rows": rows, "models": collect_models(models)}


# ----------------------------------------------------------------------------------------------
# Stage 6: report
# ----------------------------------------------------------------------------------------------
def finalize(out: Path, plan: BatchPlan, journal: Journal, deid: Deidentifier, run: dict[str, Any]) -> dict[str, Path]:
    """Write results.json/.csv and report.html from the journal records of the planned studies."""
    recs = journal.records([t.key for t in plan.studies])
    rows = [r for rec in recs for r in rec.get("rows", [])]
    models = collect_models(m for rec in recs for m in rec.get("models", []))
    if not models:  # nothing was analysed: still name the models this installation would use
        try:
            from engine.models.registry import list_model_infos

            models = collect_models(asdict(m) for m in list_model_infos())
        except Exception:
            models = []
    problems = [dict(zip(("path", "reason"), problem_entry(deid, p["path"], p["reason"]))) for p in plan.problems]
    run = dict(run, studies_planned=len(plan.studies), studies_in_report=len(recs))
    results = build_results(rows, problems, models, input_path=str(plan.input), files_seen=plan.files_seen,
                            deidentified=deid.enabled, run=run)
    results["summary"]["complete"] = len(recs) == len(plan.studies)
    return write_reports(out, results)


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
# The local engine
# ----------------------------------------------------------------------------------------------
def _decoded(series: Any, fut: Any) -> Decoded | LoadError:
    """The decode future's value, or its LoadError addressed to the series' first file."""
    try:
        return fut.result()
    except LoadError as e:
        return LoadError(series.instances[0].path if series.instances else "", e.reason)


def open_output(opts: BatchOptions) -> tuple[Path, Path, Journal]:
    """Check the paths and open (lock) the output folder's journal: the start of every engine."""
    inp, out = check_paths(opts.input, opts.out)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out)
    journal.open({"schema": "chestview-batch/1", "deidentify": bool(opts.deidentify),
                  "input": "<de-identified>" if opts.deidentify else str(inp)})
    return inp, out, journal


def plan_and_report(inp: Path, opts: BatchOptions, summary: BatchSummary, *, cancel: CancelFn | None,
                    index_fn: Callable | None, on_problem: Callable[[str, str], None] | None
                    ) -> tuple[BatchPlan, Deidentifier]:
    """Stage 1 plus its bookkeeping: counts into ``summary`` and each skipped file to ``on_problem``
    (de-identified when asked)."""
    plan = plan_batch(inp, cancel=cancel, heatmaps=opts.heatmaps, deidentify=opts.deidentify, index_fn=index_fn)
    deid = Deidentifier(opts.deidentify, plan.patients)
    summary.studies_total, summary.problem_files = len(plan.studies), len(plan.problems)
    for p in plan.problems:
        if on_problem:
            on_problem(*problem_entry(deid, p["path"], p["reason"]))
    return plan, deid


def run_batch(opts: BatchOptions, *, progress: Callable[[int, int, float, float], None] | None = None,
              on_problem: Callable[[str, str], None] | None = None,
              on_study: Callable[[dict[str, Any]], None] | None = None,
              cancel: CancelFn | None = None, analyze_fn: Callable | None = None,
              index_fn: Callable | None = None, analyze_many_fn: Callable | None = None) -> BatchSummary:
    """Review every study under ``opts.input`` into ``opts.out``; resumes from the journal.

    ``progress(done, total, studies_per_minute, eta_s)``; ``on_problem(relative_path, reason)``
    for each file or series that failed (already de-identified when asked); ``on_study(record)``
    after each study is committed (also for studies found in the journal).
    """
    t_start = time.perf_counter()
    inp, out, journal = open_output(opts)
    summary = BatchSummary(out, None, None, None)
    pool: LimitedPool | None = None
    try:
        plan, deid = plan_and_report(inp, opts, summary, cancel=cancel, index_fn=index_fn, on_problem=on_problem)
        todo: list[StudyTask] = []
        for t in plan.studies:
            if journal.is_done(t.key, t.fingerprint):
                summary.studies_skipped += 1
                if on_study:
                    rec = journal.read(t.key)
                    if rec is not None:
                        on_study(rec)
            else:
                todo.append(t)
        done = summary.studies_skipped
        if progress:
            progress(done, summary.studies_total, 0.0, float("nan"))
        t_loop = time.perf_counter()
        if todo:
            pool = LimitedPool(opts.workers, timeout_s=opts.timeout_s, memory_mb=opts.memory_mb)
            jobs = [(t, se) for t in todo for se in t.series]
            bsize = max(1, int(opts.batch_size if opts.batch_size is not None else default_batch_size()))
            window = opts.workers + bsize + 1  # decoded-but-not-analysed series held in memory
            pending: deque = deque()
            nxt = 0
            current: dict[str, list[SeriesOutcome]] = {}

            def fill() -> None:
                nonlocal nxt
                while nxt < len(jobs) and len(pending) < window:
                    t, se = jobs[nxt]
                    fut = pool.submit(decode_series, se, opts.reuse_pixels,
                                      timeout_s=series_timeout(opts.timeout_s, len(se.instances)))
                    pending.append((t, se, fut))
                    nxt += 1

            fill()
            while pending:
                if cancel is not None and cancel():
                    summary.cancelled = True
                    break
                group = [pending.popleft()]
                while (bsize > 1 and pending and len(group) < bsize and group[0][1].kind == "xray"
                       and pending[0][1].kind == "xray"):
                    group.append(pending.popleft())      # X-rays of the next studies share a forward pass
                decs = [(t, se, _decoded(se, fut)) for t, se, fut in group]
                fill()
                try:
                    if len(decs) == 1:
                        ocs = [series_outcome(decs[0][1], decs[0][2], cancel=cancel, heatmaps=opts.heatmaps,
                                              analyze_fn=analyze_fn)]
                    else:
                        ocs = batch_outcomes([(se, d) for _, se, d in decs], cancel=cancel, heatmaps=opts.heatmaps,
                                             analyze_many_fn=analyze_many_fn)
                except AnalysisCancelled:
                    summary.cancelled = True
                    break
                for (t, se, _), oc in zip(decs, ocs):
                    err = oc.error or (oc.result.error if oc.result is not None else None)
                    if err and not is_unsupported(se, oc.result, oc.error):
                        summary.series_failed += 1
                        if on_problem:
                            where = rel_path(se.instances[0].path, input_root(inp)) if se.instances else f"series {se.series_uid}"
                            on_problem(*problem_entry(deid, where, err))
                    current.setdefault(t.key, []).append(oc)
                    if len(current[t.key]) == len(t.series):
                        rec = study_record(t, current.pop(t.key), out, deid)
                        journal.write(t.key, t.fingerprint, rec)
                        summary.studies_done += 1
                        done += 1
                        if on_study:
                            on_study(journal.read(t.key) or rec)
                        if progress:
                            el = time.perf_counter() - t_loop
                            rate = summary.studies_done / el * 60.0 if el > 0 else 0.0
                            eta = (summary.studies_total - done) / (rate / 60.0) if rate > 0 else float("nan")
                            progress(done, summary.studies_total, rate, eta)
        if cancel is not None and cancel():
            summary.cancelled = True
        seconds = time.perf_counter() - t_start
        loop_s = time.perf_counter() - t_loop
        run = {"generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "seconds": round(seconds, 3), "studies_analysed": summary.studies_done,
               "studies_skipped": summary.studies_skipped, "workers": opts.workers,
               "studies_per_minute": round(summary.studies_done / loop_s * 60.0, 2) if loop_s > 0 and summary.studies_done else None,
               "cancelled": summary.cancelled}
        paths = finalize(out, plan, journal, deid, run)
        summary.report_html, summary.results_json, summary.results_csv = paths["html"], paths["json"], paths["csv"]
        summary.seconds = seconds
        return summary
    finally:
        if pool is not None:
            pool.close()
        journal.close()


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
            from engine.ray_batch import run_batch_ray

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
