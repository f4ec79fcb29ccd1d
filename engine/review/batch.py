"""Batch review of a folder of studies: ``python main.py batch FOLDER --out DIR``.

The review is a chain of stages, each a plain function so the Ray engine (engine.review.ray_batch) can map the
same functions over a Ray Dataset:

1. :func:`plan_batch` — index the input (headers only, engine.dicom.index) into
   :class:`StudyTask` items with a fingerprint, plus the files the index skipped.
2. :func:`decode_stage` (``engine.dicom.safe_decode.decode_series`` in a ``LimitedPool``) — decode one
   series in a memory- and time-bounded child: thumbnails for the report and the decoded
   Frame/Volume, or a LoadError reason. A decode failure never reaches inference.
3. :func:`infer_stage` — the *same* ``engine.ai.analysis.analyze`` call the viewer makes
   (preprocessing, validity gate, model, Grad-CAM) -> StudyResult. Inside
   ``engine.dicom.safe_decode.reuse_decoded`` the analysis reads the child's pixels, so untrusted data
   is decoded once, bounded. :func:`batch_outcomes` does the same for several X-rays with
   ``analyze_many`` (``--batch-size``, default 8 on a GPU: one forward pass across studies).
4. :func:`series_outcome` / :func:`study_record` — thumbnail PNG + one row per series
   (engine.review.report.build_row), grouped per study.
5. :class:`engine.review.journal.Journal` — each study's record committed atomically when done;
   a restarted batch skips studies whose record and fingerprint exist.
6. :func:`finalize` — results.json / results.csv / report.html derived from the journal only.

On one machine decode runs in ``--workers`` child processes while the parent runs inference, so
both cores are busy; memory is bounded by a small prefetch window (``workers + batch_size + 1``
decoded series; full pixels over 160 MiB stay in the child and are re-read by the analysis). Input is only ever read; an
output folder inside the input folder is refused. Logs carry counts and relative file paths,
never patient names, IDs or birth dates.
"""
from __future__ import annotations

import datetime as _dt
import time
from collections import deque
from typing import Any, Callable

from engine.errors import AnalysisCancelled, LoadError
from engine.review.report import is_unsupported
from engine.review.stages import (BatchOptions, BatchSummary, CancelFn, SeriesOutcome, StudyTask,
                                  batch_outcomes, default_batch_size, finalize, input_root, open_output,
                                  plan_and_report, problem_entry, rel_path, series_outcome, study_record)
from engine.dicom.safe_decode import Decoded, LimitedPool, decode_series, series_timeout

__all__ = ["BatchOptions", "BatchSummary", "run_batch"]


def _decoded(series: Any, fut: Any) -> Decoded | LoadError:
    """The decode future's value, or its LoadError addressed to the series' first file."""
    try:
        return fut.result()
    except LoadError as e:
        return LoadError(series.instances[0].path if series.instances else "", e.reason)


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
