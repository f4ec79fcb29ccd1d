"""``python main.py batch FOLDER --out DIR --engine ray [--address ADDR]``: the same review on Ray.

A Ray Data pipeline over the *same* stage functions as the local engine (engine.review.batch):

1. list files on the driver, then **index** them in parallel CPU tasks (headers only,
   engine.dicom.index) and merge into Patient -> Study -> Series exactly as the local index sorts;
   ``engine.review.stages.plan_batch`` turns that into studies + fingerprints; studies already in the
   journal are skipped (resume).
2. **decode** (``engine.dicom.safe_decode.decode_series``) in an actor pool whose actors each own a
   ``LimitedPool`` child: time-limited and memory-bounded, bad files become reasons, never fatal.
3. **inference** (``engine.review.stages.series_outcome`` -> ``engine.ai.analysis`` — preprocessing, validity
   gate, model, Grad-CAM) in an actor pool that loads each model once; GPU actors when the
   cluster has GPUs (``num_gpus`` per actor), CPU otherwise. Actors restart and tasks retry when a
   worker dies.
4. the driver groups outcomes per study as they stream in and commits each study atomically
   (``engine.review.journal.Journal`` + ``engine.review.stages.study_record``); ``engine.review.stages.finalize`` writes
   the same results.csv/json and report.html as the local engine.

Ray is an optional extra (``pip install .[cluster]``). Research use only, not for diagnostic use.
"""
from __future__ import annotations

import datetime as _dt
import os
import time
from pathlib import Path
from typing import Any, Callable

from engine.review.stages import (BatchOptions, BatchSummary, check_paths, finalize, input_root, open_output, plan_and_report,
                          problem_entry,
                          rel_path, series_outcome, study_record)
from engine.dicom.records import IndexResult, PatientRecord, SeriesRecord, StudyRecord
from engine.errors import LoadError

INDEX_CHUNK = 256          # files per index task


def _require_ray():
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RuntimeError("the Ray engine needs the cluster extra: pip install '.[cluster]' "
                           f"(or .venv/bin/pip install 'ray[data]==2.60.0'); {e}") from None
    return ray


# ----------------------------------------------------------------------------------------------
# Stage 1: distributed index
# ----------------------------------------------------------------------------------------------
def list_inputs(path: Path) -> list[str]:
    """The files engine.dicom.index would read, in its walk order (DICOMDIRs inside folders are
    skipped there too); a DICOMDIR, ZIP or single file is its own one input."""
    from engine.dicom.index import _is_dicomdir_name, _walk

    if not path.is_dir():
        return [str(path)]
    return [e.path for e in _walk(str(path)) if not _is_dicomdir_name(e.name)]


def index_chunk(paths: list[str]) -> IndexResult:
    """Index a list of files (each a file, ZIP or DICOMDIR) and merge: one Ray task's work."""
    from engine.dicom.index import index_path

    return merge_index_results([index_path(p) for p in paths])


def merge_index_results(parts: list[IndexResult]) -> IndexResult:
    """Merge partial indexes in walk order, as one engine.dicom.index scan would have built them:
    the first file of a SOP Instance UID wins and later copies become problems; levels are sorted
    exactly as engine.dicom.index.group sorts."""
    from engine.dicom.index import sort_instances
    from engine.dicom.records import FileProblem

    patients: dict[str, PatientRecord] = {}
    studies: dict[str, StudyRecord] = {}
    series: dict[str, SeriesRecord] = {}
    first_path: dict[str, str] = {}
    out = IndexResult()
    for part in parts:
        out.problems += part.problems
        out.files_seen += part.files_seen
        out.seconds += part.seconds
        out.cancelled = out.cancelled or bool(getattr(part, "cancelled", False))
        accepted = []
        for p in part.patients:
            for st in p.studies:
                for se in st.series:
                    for inst in se.instances:
                        accepted.append((inst.path, p, st, se, inst))
        accepted.sort(key=lambda a: a[0])          # within one part: file order
        for path, p, st, se, inst in accepted:
            sop = inst.sop_instance_uid
            if sop in first_path:
                out.problems.append(FileProblem(path, f"duplicate of {first_path[sop]} (same SOP Instance UID); "
                                                      "shown once"))
                continue
            first_path[sop] = path
            pp = patients.get(p.patient_id)
            if pp is None:
                pp = patients[p.patient_id] = PatientRecord(p.patient_id, p.patient_name, p.birth_date, p.sex)
            ss = studies.get(st.study_uid)
            if ss is None:
                ss = studies[st.study_uid] = StudyRecord(st.study_uid, st.patient_id, st.study_date, st.study_time,
                                                         st.study_description, st.accession_number)
                pp.studies.append(ss)
            s2 = series.get(se.series_uid)
            if s2 is None:
                s2 = series[se.series_uid] = SeriesRecord(
                    se.series_uid, se.study_uid, se.patient_id, se.modality, se.series_number,
                    se.series_description, se.body_part, se.view_position, se.rows, se.columns)
                ss.series.append(s2)
            s2.instances.append(inst)
    for se in series.values():
        se.instances = sort_instances(se.instances)
    for p in patients.values():
        p.studies.sort(key=lambda s: (s.study_date, s.study_time, s.study_uid))
        for st in p.studies:
            st.series.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_description,
                                          s.series_uid))
    out.patients = sorted(patients.values(), key=lambda p: (p.patient_name.lower(), p.patient_id))
    return out


def ray_index(path: str | Path, chunk: int = INDEX_CHUNK) -> IndexResult:
    """engine.dicom.index.index_path, fanned out over Ray CPU tasks by chunks of files."""
    ray = _require_ray()
    files = list_inputs(Path(path))
    if len(files) <= chunk:
        return index_chunk(files)
    task = ray.remote(num_cpus=1, max_retries=3)(index_chunk)
    refs = [task.remote(files[i:i + chunk]) for i in range(0, len(files), chunk)]
    return merge_index_results(ray.get(refs))


# ----------------------------------------------------------------------------------------------
# Stages 2-3: actor pools
# ----------------------------------------------------------------------------------------------
class DecodeActor:
    """Decodes series in its own time-limited, memory-bounded child (engine.dicom.safe_decode)."""

    def __init__(self, timeout_s: float, memory_mb: int | None, keep_pixels: bool):
        from engine.dicom.safe_decode import LimitedPool

        self.keep_pixels = keep_pixels
        self.timeout_s = timeout_s
        self.pool = LimitedPool(1, timeout_s=timeout_s, memory_mb=memory_mb)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from engine.dicom.safe_decode import decode_series, series_timeout

        decoded = []
        for se in batch["series"]:
            fut = self.pool.submit(decode_series, se, self.keep_pixels,
                                   timeout_s=series_timeout(self.timeout_s, len(se.instances)))
            try:
                decoded.append(fut.result())
            except LoadError as e:
                decoded.append(LoadError(se.instances[0].path if se.instances else "", e.reason))
        return {"key": batch["key"], "order": batch["order"], "series": batch["series"], "decoded": decoded}


class InferActor:
    """Loads the models once (engine.ai.analysis) and runs the local engine's series_outcome."""

    def __init__(self, heatmaps: bool):
        import engine.ai.analysis as analysis

        self.heatmaps = heatmaps
        self.analyze = analysis.analyze
        # Warm-up: load models once per actor, before the first batch arrives.
        try:
            analysis.default_analyzer()
        except Exception:
            pass

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        outs = [series_outcome(se, dec, heatmaps=self.heatmaps, analyze_fn=self.analyze)
                for se, dec in zip(batch["series"], batch["decoded"])]
        return {"key": batch["key"], "order": batch["order"], "outcome": outs}


def _quiet_ray_data(ray) -> None:
    """Our own progress line replaces Ray Data's progress bars and per-stage log blocks."""
    import logging

    ctx = ray.data.DataContext.get_current()
    for attr, value in (("enable_progress_bars", False), ("print_on_execution_start", False),
                        ("enable_operator_progress_bars", False)):
        if hasattr(ctx, attr):
            setattr(ctx, attr, value)
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _cluster_gpus(ray) -> float:
    try:
        return float(ray.cluster_resources().get("GPU", 0.0))
    except Exception:
        return 0.0


def run_batch_ray(opts: BatchOptions, *, address: str | None = None, num_cpus: int | None = None,
                  decode_actors: int | None = None, infer_actors: int | None = None, batch_size: int = 4,
                  progress: Callable[[int, int, float, float], None] | None = None,
                  on_problem: Callable[[str, str], None] | None = None,
                  cancel: Callable[[], bool] | None = None) -> BatchSummary:
    """Same contract as engine.review.batch.run_batch, on a Ray cluster (``address``) or a local Ray."""
    ray = _require_ray()
    t_start = time.perf_counter()
    check_paths(opts.input, opts.out)          # fail fast, before a Ray instance is started
    started_here = False
    if not ray.is_initialized():
        init_kw: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False,
                                   "include_dashboard": False,
                                   "runtime_env": {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}}}
        if address:
            init_kw["address"] = address
        else:
            init_kw["num_cpus"] = num_cpus or os.cpu_count() or 2
        ray.init(**init_kw)
        started_here = True
    _quiet_ray_data(ray)
    inp, out, journal = open_output(opts)
    summary = BatchSummary(out, None, None, None)
    try:
        plan, deid = plan_and_report(inp, opts, summary, cancel=cancel, index_fn=ray_index, on_problem=on_problem)
        todo = [t for t in plan.studies if not journal.is_done(t.key, t.fingerprint)]
        summary.studies_skipped = len(plan.studies) - len(todo)
        done = summary.studies_skipped
        if progress:
            progress(done, summary.studies_total, 0.0, float("nan"))
        t_loop = time.perf_counter()
        if todo:
            by_key = {t.key: t for t in todo}
            items = [{"key": t.key, "order": j, "series": se} for t in todo for j, se in enumerate(t.series)]
            cpus = int(ray.cluster_resources().get("CPU", 2))
            gpus = _cluster_gpus(ray)
            n_dec = decode_actors or max(1, cpus // 2)
            n_inf = infer_actors or (int(gpus) if gpus >= 1 else max(1, cpus - n_dec))
            retry = {"max_restarts": -1, "max_task_retries": -1}
            ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * n_dec)))
            ds = ds.map_batches(DecodeActor, fn_constructor_args=(opts.timeout_s, opts.memory_mb, opts.reuse_pixels),
                                batch_size=1, compute=ray.data.ActorPoolStrategy(size=n_dec), num_cpus=1, batch_format="numpy",
                                zero_copy_batch=False, **retry)
            infer_kw: dict[str, Any] = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1}
            ds = ds.map_batches(InferActor, fn_constructor_args=(opts.heatmaps,), batch_size=batch_size,
                                compute=ray.data.ActorPoolStrategy(size=n_inf), batch_format="numpy", zero_copy_batch=False,
                                **infer_kw, **retry)
            current: dict[str, dict[int, Any]] = {}
            for row in ds.iter_rows():
                if cancel is not None and cancel():
                    summary.cancelled = True
                    break
                key, order, oc = row["key"], int(row["order"]), row["outcome"]
                t = by_key[key]
                if oc.error:
                    summary.series_failed += 1
                    if on_problem:
                        se = oc.series
                        where = rel_path(se.instances[0].path, input_root(inp)) if se.instances else f"series {se.series_uid}"
                        on_problem(*problem_entry(deid, where, oc.error))
                current.setdefault(key, {})[order] = oc
                if len(current[key]) == len(t.series):
                    got = current.pop(key)
                    rec = study_record(t, [got[j] for j in range(len(t.series))], out, deid)
                    journal.write(t.key, t.fingerprint, rec)
                    summary.studies_done += 1
                    done += 1
                    if progress:
                        el = time.perf_counter() - t_loop
                        rate = summary.studies_done / el * 60.0 if el > 0 else 0.0
                        eta = (summary.studies_total - done) / (rate / 60.0) if rate > 0 else float("nan")
                        progress(done, summary.studies_total, rate, eta)
        seconds = time.perf_counter() - t_start
        loop_s = time.perf_counter() - t_loop
        run = {"generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "seconds": round(seconds, 3), "studies_analysed": summary.studies_done,
               "studies_skipped": summary.studies_skipped, "workers": None, "engine": "ray",
               "studies_per_minute": round(summary.studies_done / loop_s * 60.0, 2)
               if loop_s > 0 and summary.studies_done else None, "cancelled": summary.cancelled}
        paths = finalize(out, plan, journal, deid, run)
        summary.report_html, summary.results_json, summary.results_csv = paths["html"], paths["json"], paths["csv"]
        summary.seconds = seconds
        return summary
    finally:
        journal.close()
        if started_here:
            ray.shutdown()
