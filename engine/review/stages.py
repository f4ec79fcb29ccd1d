"""The stages of a batch review, shared by both engines: one machine (engine.review.batch) and a
Ray cluster (engine.review.ray_batch) map the same plain functions, so their results are equal.

Stage order and their contracts are described in engine.review.batch; this module holds the
options and records (BatchOptions, StudyTask, BatchPlan, SeriesOutcome, BatchSummary), indexing
(plan_batch), decode and inference of one series (decode_stage, infer_stage, series_outcome,
batch_outcomes), one study's journal record (study_record), the output folder (check_paths,
open_output) and the reports (finalize).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.errors import AnalysisCancelled, LoadError
from engine.review.journal import Journal, fingerprint, study_key
from engine.review.report import (Deidentifier, build_results, build_row, collect_models, write_reports,
                           write_thumbnail)
from engine.dicom.safe_decode import DEFAULT_TIMEOUT_S, Decoded, decode_series, reuse_decoded

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
        from engine.ai.models.registry import list_model_infos

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
        from engine.ai.analysis import analyze as analyze_fn
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
    """Stage 3 for several X-ray series at once (``engine.ai.analysis.analyze_many``: shared forward
    passes, for GPUs). Decode failures skip inference as in :func:`series_outcome`; results keep order."""
    if analyze_many_fn is None:
        from engine.ai.analysis import analyze_many as analyze_many_fn
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
        from engine.ai.models.devices import pick_device

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
            from engine.ai.models.registry import list_model_infos

            models = collect_models(asdict(m) for m in list_model_infos())
        except Exception:
            models = []
    problems = [dict(zip(("path", "reason"), problem_entry(deid, p["path"], p["reason"]))) for p in plan.problems]
    run = dict(run, studies_planned=len(plan.studies), studies_in_report=len(recs))
    results = build_results(rows, problems, models, input_path=str(plan.input), files_seen=plan.files_seen,
                            deidentified=deid.enabled, run=run)
    results["summary"]["complete"] = len(recs) == len(plan.studies)
    return write_reports(out, results)


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
