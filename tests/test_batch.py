"""Batch review end to end: the demo folder with broken files, kill -9 then resume, de-identification,
bounded decoding (time, memory, crashes) and the read-only input rule.

The kill/resume and de-identification tests use small real radiographs (the demo CR chest and
tibia, 4x downsampled, given new UIDs and identities) so the models run in seconds on CPU; the
demo folder test runs the full demo with its CT phantom once.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.errors import LoadError
from engine.review.report import strip_timing
from engine.dicom.safe_decode import LimitedPool, decode_series, run_limited

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# helpers run inside decode children (module level: the spawn context imports them by name)
def _hang(seconds: float) -> None:
    """Stands in for a decoder stuck on crafted JPEG 2000 input."""
    time.sleep(seconds)


def _hog(gib: int) -> int:
    return len(bytearray(gib * 2**30))


def _segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def _double(x: int) -> int:
    return 2 * x


# ---------------------------------------------------------------------------------------------
# data builders
def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(prefix="1.2.826.0.1.3680043.8.498.", entropy_srcs=["chestview-batch-test", *parts])


def _small_copy(src: Path, dst: Path, *, key: str, name: str, pid: str, birth: str, description: str = "",
                modality: str = "") -> None:
    """A real radiograph, 4x smaller, with its own study/series/SOP UIDs and patient identity."""
    import pydicom

    ds = pydicom.dcmread(src)
    arr = ds.pixel_array[::4, ::4].copy()
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, birth
    if description:
        ds.SeriesDescription = description
    if modality:
        ds.Modality = modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(key, "study"), _uid(key, "series")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(key, "sop")
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)


def _xray_folder(demo_dir: Path, root: Path, n_chest: int) -> Path:
    for i in range(n_chest):
        _small_copy(demo_dir / "CR_CHEST" / "CR_01_UNCR.dcm", root / f"study{i}" / "cr.dcm", key=f"chest{i}",
                    name=f"Testpatient^Alice{i}", pid=f"PID-77889{i}", birth=f"1945031{i}")
    _small_copy(demo_dir / "CR_TIBIA" / "CR_01_UNCR.dcm", root / "tibia" / "cr.dcm", key="tibia",
                name="Testpatient^Bob", pid="PID-55443", birth="19600101")
    return root


def _crafted_huge(path: Path) -> None:
    """A CR whose header declares 65535 x 65535 x 16 bit (8 GiB) over 4 KiB of pixel data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    fm = FileMetaDataset()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    fm.MediaStorageSOPInstanceUID = _uid("huge", "sop")
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid("huge", "study"), _uid("huge", "series")
    ds.PatientID, ds.PatientName, ds.Modality, ds.BodyPartExamined = "PID-HUGE", "Huge^Header", "CR", "CHEST"
    ds.Rows = ds.Columns = 65535
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = b"\0" * 4096
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns,
                                             hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["rows"]


# ---------------------------------------------------------------------------------------------
def test_decode_pool_bounds_time_memory_and_crashes():
    with LimitedPool(1, timeout_s=2.0, memory_mb=1536) as pool:
        futs = [pool.submit(_hang, 60), pool.submit(_hog, 4), pool.submit(_segfault), pool.submit(_double, 21)]
        outcomes = []
        for f in futs:
            try:
                outcomes.append(f.result(timeout=60))
            except LoadError as e:
                outcomes.append(e.reason)
        assert pool.replaced == 2        # the hung child and the crashed child were replaced
    assert "longer than 2 s" in outcomes[0]
    assert "memory" in outcomes[1]       # RLIMIT_AS turned a 4 GiB allocation into a reason
    assert "crashed (SIGSEGV)" in outcomes[2]
    assert outcomes[3] == 42             # and the pool kept working


def test_crafted_huge_declared_size_is_refused(tmp_path):
    from engine.dicom.records import InstanceRecord, SeriesRecord

    f = tmp_path / "huge.dcm"
    _crafted_huge(f)
    se = SeriesRecord("1.2", "1.1", "PID-HUGE", "CR", instances=[InstanceRecord(str(f), "1.3", 1)])
    with pytest.raises(LoadError) as ei:
        run_limited(decode_series, se, timeout_s=60, memory_mb=1024)
    assert "MiB" in ei.value.reason or "memory" in ei.value.reason


def test_analysis_reads_the_pixels_the_bounded_child_decoded(demo_dir, tmp_path):
    """The parent never decodes a second time: analyze() gets the child's Frame, in this thread only."""
    import threading

    from engine.review.stages import series_outcome
    from engine.dicom.records import InstanceRecord, SeriesRecord
    from engine.dicom.safe_decode import reuse_decoded

    inp = _xray_folder(demo_dir, tmp_path / "in", 1)
    se = SeriesRecord(_uid("chest0", "series"), _uid("chest0", "study"), "PID-778890", "CR", 1, "", "CHEST", "PA",
                      instances=[InstanceRecord(str(inp / "study0" / "cr.dcm"), _uid("chest0", "sop"), 1)])
    dec = run_limited(decode_series, se, True, timeout_s=60)
    assert dec.pixels[0] == "frame" and dec.pixels[3].values.shape == dec.image_shape
    (inp / "study0" / "cr.dcm").rename(tmp_path / "moved.dcm")       # the file is gone from the parent's view
    other_thread: list = []
    with reuse_decoded([dec]):
        from engine.dicom.pixels import load_frame

        t = threading.Thread(target=lambda: other_thread.append(_load_or_reason(load_frame, se)))
        t.start()
        t.join()
    assert other_thread and isinstance(other_thread[0], str)          # other threads read the disk
    oc = series_outcome(se, dec)
    assert oc.error is None and oc.result.error is None and oc.result.kind == "xray"
    assert dec.pixels is None                                          # full pixels dropped after use
    dec2 = run_limited(decode_series, SeriesRecord(se.series_uid, se.study_uid, "P", "CR", instances=[
        InstanceRecord(str(tmp_path / "moved.dcm"), "1", 1)]), timeout_s=60)
    assert dec2.pixels is None                                         # only when asked for
    oc2 = series_outcome(se, dec2)
    assert oc2.result.error and "read" in oc2.result.error             # without reuse the analysis reads the disk


def _load_or_reason(load_frame, se):
    try:
        return load_frame(se.instances[0].path)
    except LoadError as e:
        return e.reason


def test_output_inside_input_is_refused(demo_dir, tmp_path, capsys):
    from engine.review.cli import cli_main

    inp = _xray_folder(demo_dir, tmp_path / "in", 1)
    before = _snapshot(inp)
    assert cli_main([str(inp), "--out", str(inp / "review")]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert _snapshot(inp) == before and not (inp / "review").exists()


def test_decoder_time_limit_in_a_batch(demo_dir, tmp_path):
    """A decode that overruns --timeout is stopped, reported with its reason, and the batch completes."""
    from engine.review.batch import BatchOptions, run_batch

    inp = _xray_folder(demo_dir, tmp_path / "in", 1)
    problems: list[tuple[str, str]] = []
    s = run_batch(BatchOptions(inp, tmp_path / "out", workers=1, timeout_s=0.001),
                  on_problem=lambda p, r: problems.append((p, r)))
    rows = _rows(tmp_path / "out")
    assert s.studies_total == 2 and s.series_failed == 2 and len(rows) == 2
    assert all(r["status"] == "failed" and "longer than" in r["error"] for r in rows)
    assert sorted(p for p, _ in problems) == ["study0/cr.dcm", "tibia/cr.dcm"]
    summary = json.loads((tmp_path / "out" / "results.json").read_text())["summary"]
    assert sum(summary["failures_by_reason"].values()) == 2


def test_batch_reviews_the_demo_folder_with_broken_files(demo_dir, tmp_path, capsys, artifacts_dir):
    from engine.review.cli import cli_main

    inp = tmp_path / "in"
    shutil.copytree(demo_dir, inp)
    (inp / "notes.txt").write_text("not an image\n")
    (inp / "empty.dcm").write_bytes(b"")
    _small_copy(demo_dir / "CR_TIBIA" / "CR_01_UNCR.dcm", tmp_path / "t.dcm", key="truncated",
                name="Broken^File", pid="PID-TRUNC", birth="", description="truncated copy")
    cr = (tmp_path / "t.dcm").read_bytes()
    (inp / "broken" / "truncated.dcm").parent.mkdir()
    (inp / "broken" / "truncated.dcm").write_bytes(cr[: len(cr) // 3])   # header fine, pixels cut
    _crafted_huge(inp / "broken" / "huge.dcm")
    before = _snapshot(inp)
    out = tmp_path / "out"

    assert cli_main([str(inp), "--out", str(out), "--workers", "1"]) == 0
    cap = capsys.readouterr()
    assert f"Report: {out / 'report.html'}" in cap.out
    assert "problem: notes.txt:" in cap.err and "problem: broken/huge.dcm:" in cap.err
    assert "studies" in cap.err and "/min" in cap.err and "ETA" in cap.err     # the progress bar
    assert _snapshot(inp) == before                                             # input untouched

    res = json.loads((out / "results.json").read_text())
    rows = {(r["modality"], r["series_description"]): r for r in res["rows"]}
    by_kind = res["summary"]["by_kind"]
    assert by_kind["ct"] == 1 and by_kind["xray"] >= 5          # 3 chest series, tibia, truncated, huge
    ct = next(r for r in res["rows"] if r["kind"] == "ct")
    assert ct["status"] in ("ok", "invalid") and ct["n_images"] == 120 and ct["thumbnail"]
    assert ct["models"] and ct["models"][0].startswith("ct-inception")
    chest = [r for r in res["rows"] if r["series_description"].startswith("PA chest")]
    assert len(chest) == 3 and all(r["status"] in ("ok", "invalid") and r["thumbnail"] for r in chest)
    tibia = rows[("CR", "Tibia AP (out of scope for chest AI)")]
    assert tibia["status"] == "invalid" and tibia["validity_reasons"]
    failed = {r["error"] for r in res["rows"] if r["status"] == "failed"}
    assert len(failed) == 2 and any("MiB" in e for e in failed)          # huge header refused by its size
    problem_paths = {p["path"] for p in res["problems"]}
    assert {"notes.txt", "empty.dcm"} <= problem_paths
    assert res["summary"]["complete"] and res["summary"]["failed"] == 2
    for r in res["rows"]:
        if r["thumbnail"]:
            assert (out / r["thumbnail"]).is_file()
    rows_csv = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert len(rows_csv) == len(res["rows"])
    page = (out / "report.html").read_text()
    assert "Research use only, not for diagnostic use" in page and "xray-densenet121" in page
    # keep the report for humans (CI artifact), and a screenshot when a headless browser is there
    dest = artifacts_dir / "batch-demo-report"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(out, dest, ignore=shutil.ignore_patterns("journal", ".lock"))
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser:
        shot = artifacts_dir / "batch-demo-report.png"
        shot.unlink(missing_ok=True)
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1600,1800", f"--screenshot={shot}", (dest / "report.html").as_uri()],
                       capture_output=True, timeout=120)
        assert shot.is_file() and shot.stat().st_size > 20_000


def _live_in_group(pgid: int) -> list[int]:
    """Processes (not zombies) still in the process group of the killed batch."""
    import psutil

    live = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                live.append(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return live


def _batch_cmd(inp: Path, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "main.py"), "batch", str(inp), "--out", str(out), "--workers", "1"]


def _comparable(out: Path) -> tuple:
    res = strip_timing(json.loads((out / "results.json").read_text()))
    lines = list(csv.reader(io.StringIO((out / "results.csv").read_text())))
    keep = [i for i, h in enumerate(lines[0]) if not h.startswith("ms:")]
    table = [[row[i] for i in keep] for row in lines]
    page = re.sub(r"<(td|span) class=['\"]t['\"][^>]*>.*?</\1>", "", (out / "report.html").read_text(), flags=re.S)
    thumbs = sorted(p.name for p in (out / "thumbs").iterdir())
    return res, table, page, thumbs


def test_kill_9_during_a_batch_then_resume_gives_the_same_report(demo_dir, tmp_path):
    inp = _xray_folder(demo_dir, tmp_path / "in", 10)   # 11 studies: work is always left to kill
    env = dict(os.environ, PYTHONPATH=str(REPO), CHESTVIEW_HOME=str(tmp_path / "home"))
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(_batch_cmd(inp, ref), env=env, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(_batch_cmd(inp, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((out / "journal").glob("*.json"))) >= 1:
                time.sleep(random.uniform(0.0, 0.1))       # any moment of the next study's work
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the batch finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)                      # kill -9 the driver
        proc.wait(30)
        deadline = time.monotonic() + 20
        while _live_in_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _live_in_group(proc.pid), "decode children outlived the killed driver"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)                # cleanup if the assertion above failed
        except ProcessLookupError:
            pass
    done_before = len(list((out / "journal").glob("*.json")))
    assert 1 <= done_before < 11 and not (out / "results.json").exists()

    r = subprocess.run(_batch_cmd(inp, out), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"{done_before} from an earlier run" in r.stdout
    assert not list(out.rglob(".tmp-*"))
    a, b = _comparable(ref), _comparable(out)
    assert a[0] == b[0]             # results.json without timing
    assert a[1] == b[1]             # results.csv without ms: columns
    assert a[2] == b[2]             # report.html without timing cells
    assert a[3] == b[3] and len(a[3]) == 11
    assert len(a[0]["rows"]) == 11 and a[0]["summary"]["invalid"] >= 1


def _close(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-4
    return a == b


def test_batched_inference_across_studies_matches_per_series(demo_dir, tmp_path):
    """--batch-size (GPU default 8) shares forward passes across studies without changing any row."""
    from engine.review.batch import BatchOptions, run_batch

    inp = _xray_folder(demo_dir, tmp_path / "in", 2)
    one = run_batch(BatchOptions(inp, tmp_path / "one", workers=1, batch_size=1))
    many = run_batch(BatchOptions(inp, tmp_path / "many", workers=1, batch_size=3))
    assert one.studies_done == many.studies_done == 3 and many.series_failed == 0
    a = strip_timing(json.loads(one.results_json.read_text()))["rows"]
    b = strip_timing(json.loads(many.results_json.read_text()))["rows"]
    assert _close(a, b), (a, b)
    assert sorted(r["status"] for r in b) == ["invalid", "ok", "ok"]


def test_deidentified_batch_outputs_carry_no_identifiers(demo_dir, tmp_path, monkeypatch):
    from engine.review.batch import BatchOptions, run_batch

    monkeypatch.setenv("CHESTVIEW_HOME", str(tmp_path / "home"))
    inp = _xray_folder(demo_dir, tmp_path / "Testpatient_Alice0_archive", 1)   # identifiers in paths too
    (inp / "study0" / "Testpatient_Alice0_PID-778890_notes.txt").write_text("scanned form\n")
    _small_copy(demo_dir / "CR_TIBIA" / "CR_01_UNCR.dcm", inp / "other" / "ot.dcm", key="other",
                name="Testpatient^Carol", pid="PID-99001", birth="19711111", modality="OT")  # not analysed
    out = tmp_path / "out"
    problems: list[str] = []
    s = run_batch(BatchOptions(inp, out, deidentify=True, workers=1),
                  on_problem=lambda p, r: problems.append(f"{p}: {r}"))
    assert s.studies_total == 3 and s.problem_files == 1 and s.series_failed == 0
    assert sorted(r["status"] for r in _rows(out)) == ["invalid", "ok", "unsupported"]
    idents = ["Testpatient", "Alice", "Bob", "Carol", "PID-778890", "PID-55443", "PID-99001", "19450310",
              "19600101", "19711111"]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in files) and (out / "report.html") in files
    for p in files:                                   # every output: reports, journal, thumbnails
        blob = p.read_bytes()
        for ident in idents:
            assert ident.encode() not in blob, (p.relative_to(out), ident)
    for line in problems:                             # and what was printed
        assert not any(ident in line for ident in idents)
    rows = _rows(out)
    assert all(re.fullmatch(r"ANON-[0-9A-F]{12}", r["patient_id"]) for r in rows)
    assert len({r["patient_id"] for r in rows}) == 3
    assert json.loads((out / "results.json").read_text())["input"]["path"] == "<de-identified>"
