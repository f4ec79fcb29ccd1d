"""Rows, summary, CSV/JSON/HTML exports, thumbnails and de-identification of the batch report.

These build StudyResult objects directly (the engine's contract) so every branch of the report
is exercised without running models; tests/test_batch.py runs the real pipeline end to end.
"""
from __future__ import annotations

import csv
import io
import json
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from engine.review import journal as jr
from engine.review import report as rp
from engine.dicom.records import InstanceRecord, PatientRecord, SeriesRecord, StudyRecord
from engine.results import RESEARCH_USE, Finding, Heatmap, ModelInfo, Severity, StudyResult, Validity
from engine.dicom.safe_decode import Decoded

XM = ModelInfo("xray-densenet121", "1.2.0", True, "ab" * 32, label="ChestView X-ray DenseNet-121 v1.2.0")
CM = ModelInfo("ct-inception", "0.0.0", False, "", label="ChestView CT (untrained)")


def _records(pid: str = "PID-123456", name: str = "Doe^Jane", bd: str = "19471103"):
    se_x = SeriesRecord("1.2.3.1.1", "1.2.3.1", pid, "CR", 1, "PA chest", "CHEST", "PA", 400, 300,
                        [InstanceRecord(f"/in/{name.replace('^', '_')}/a.dcm", "1.2.3.1.1.1", 1)])
    se_c = SeriesRecord("1.2.3.1.2", "1.2.3.1", pid, "CT", 2, "Chest CT", "CHEST", "", 64, 64,
                        [InstanceRecord(f"/in/ct/{k}.dcm", f"1.2.3.1.2.{k}", k) for k in range(3)])
    st = StudyRecord("1.2.3.1", pid, "20200401", "", "Chest", "ACC-98765", [se_x, se_c])
    pt = PatientRecord(pid, name, bd, "F", [st])
    return pt, st, se_x, se_c


def _xray_result(se: SeriesRecord, passed: bool = True) -> StudyResult:
    heat = np.zeros((400, 300), np.float32)
    heat[50:150, 200:280] = 1.0            # upper right of the displayed image
    return StudyResult(
        se.study_uid, se.series_uid, "CR", "xray",
        Validity(passed, [] if passed else ["Body Part Examined is HAND, not chest"], 1.5, 3.0),
        findings=[Finding("Lung Opacity", 0.8123456789, 0.5, passed, XM.name, XM.version),
                  Finding("Effusion", 0.25, 0.4, False, XM.name, XM.version)],
        severity=Severity(4.25, 2.5, 0.9, XM.name, XM.version),
        heatmaps=[Heatmap("Lung Opacity", heat, XM.name, XM.version)], models=[XM],
        timings_ms={"inference": 93.2}, warnings=[])


def test_build_row_fields_status_and_rounding():
    pt, st, se_x, se_c = _records()
    row = rp.build_row(pt, st, se_x, _xray_result(se_x), thumbnail="thumbs/x.png", timings_ms={"decode": 12.34})
    assert set(row) == set(rp.ROW_KEYS)
    assert row["status"] == "ok" and row["valid"] is True
    assert row["score"] == pytest.approx(0.812346) and row["probabilities"]["Lung Opacity"] == 0.812346
    assert row["top_label"] == "Lung Opacity" and row["positive_labels"] == ["Lung Opacity"]
    assert row["severity_extent"] == 4.25 and row["models"] == ["xray-densenet121 1.2.0 (trained)"]
    assert row["timings_ms"] == {"decode": 12.3, "inference": 93.2}
    assert row["heatmap_target"] == "Lung Opacity" and row["intended_use"] == RESEARCH_USE
    assert (row["patient_name"], row["patient_id"], row["accession_number"]) == ("Doe^Jane", "PID-123456", "ACC-98765")

    bad = rp.build_row(pt, st, se_x, _xray_result(se_x, passed=False))
    assert bad["status"] == "invalid" and bad["validity_reasons"] == ["Body Part Examined is HAND, not chest"]
    failed = rp.build_row(pt, st, se_c, None, error="decoding took longer than 60 s")
    assert failed["status"] == "failed" and failed["valid"] is None and failed["score"] is None
    other = SeriesRecord("9.9", "1.2.3.1", "PID-123456", "MR", instances=[InstanceRecord("/in/m.dcm", "9.9.1", 1)])
    res = StudyResult("1.2.3.1", "9.9", "MR", "unsupported", Validity(False, ["not analysed"]),
                      error="Modality MR is not analysed")
    row = rp.build_row(pt, st, other, res)
    assert row["status"] == "unsupported" and row["error"] == "Modality MR is not analysed"
    assert rp.summarize([row], [])["failures_by_reason"] == {} and rp.summarize([row], [])["unsupported"] == 1
    assert rp.build_row(pt, st, other, None, error="could not decode")["status"] == "failed"
    res_x = StudyResult("1.2.3.1", se_x.series_uid, "CR", "xray", Validity(False), error="Model problem: x")
    assert rp.build_row(pt, st, se_x, res_x)["status"] == "failed"


def test_deidentifier_pseudonym_is_stable_keyed_and_scrubs_free_text():
    pt, st, se_x, _ = _records()
    d1 = rp.Deidentifier(True, [pt], key=b"k" * 32)
    d2 = rp.Deidentifier(True, [pt], key=b"k" * 32)
    d3 = rp.Deidentifier(True, [pt], key=b"other-key")
    p = d1.pseudonym("PID-123456")
    assert re.fullmatch(r"ANON-[0-9A-F]{12}", p)
    assert p == d2.pseudonym("PID-123456") != d1.pseudonym("PID-123457")
    assert p != d3.pseudonym("PID-123456")           # not a bare hash: guessing IDs needs the key
    text = d1.scrub("in/Doe_Jane/a.dcm: PID-123456 born 19471103 (JANE DOE); uid 1.2.3.1")
    for ident in ("Doe", "Jane", "PID-123456", "19471103"):
        assert ident.lower() not in text.lower()
    assert p in text and "1.2.3.1" in text
    row = rp.build_row(pt, st, se_x, _xray_result(se_x), deid=d1, warnings=["file Doe_Jane/a.dcm re-read"])
    blob = json.dumps(row)
    for ident in ("Doe", "Jane", "PID-123456", "19471103", "ACC-98765"):
        assert ident not in blob
    assert row["patient_id"] == p and row["patient_name"] == "" and row["birth_date"] == ""
    assert rp.Deidentifier(False).scrub("Doe^Jane") == "Doe^Jane"


def test_thumbnail_has_the_heatmap_where_the_model_looked(tmp_path):
    pt, st, se_x, se_c = _records()
    gray = np.tile(np.linspace(0, 255, 300, dtype=np.float32), (400, 1)).astype(np.uint8)
    thumb = np.asarray(Image.fromarray(gray).resize((192, 256)))
    dec = Decoded(se_x.series_uid, "xray", [thumb], (400, 300), 1, 5.0)
    rel = rp.write_thumbnail(tmp_path, se_x.series_uid, dec, _xray_result(se_x))
    assert rel == f"thumbs/{rp.series_key(se_x.series_uid)}.png"
    im = Image.open(tmp_path / rel)
    assert im.info.get("Comment") == RESEARCH_USE and "xray-densenet121 1.2.0" in im.info.get("Software", "")
    a = np.asarray(im.convert("RGB")).astype(int)
    assert a.shape == (256, 192 * 2 + 4, 3)
    left, right = a[:, :192], a[:, 196:]
    assert np.abs(left[:, :, 0] - left[:, :, 2]).max() <= 1          # plain image is grey
    hot, cold = right[50:90, 140:180], right[200:250, 10:60]          # heatmap box scaled by 0.64
    assert np.abs(hot[..., 0] - hot[..., 2]).mean() > 40               # coloured where the heatmap is
    assert np.abs(cold - left[200:250, 10:60]).max() <= 1              # untouched elsewhere

    # CT: the slice the heatmap names is the one shown
    slices = [np.full((32, 32), 10 * k, np.uint8) for k in range(3)]
    hm = np.zeros((64, 64), np.float32)
    ct = StudyResult(se_c.study_uid, se_c.series_uid, "CT", "ct", Validity(True), models=[CM],
                     heatmaps=[Heatmap("COVID-19", hm, CM.name, CM.version, slice_index=2)])
    rel = rp.write_thumbnail(tmp_path, se_c.series_uid, Decoded(se_c.series_uid, "ct", slices, (64, 64), 3), ct)
    assert np.asarray(Image.open(tmp_path / rel).convert("L"))[:, :32].mean() == pytest.approx(20, abs=1)


def _results(deid: bool = False) -> dict:
    pt, st, se_x, se_c = _records()
    d = rp.Deidentifier(deid, [pt], key=b"k" * 32)
    rows = [rp.build_row(pt, st, se_x, _xray_result(se_x), deid=d, thumbnail="thumbs/a.png",
                         timings_ms={"decode": 5.0, "analyze": 400.0}),
            rp.build_row(pt, st, se_c, None, error="the decoder crashed (SIGSEGV) on this file", deid=d)]
    problems = [{"path": "notes.txt", "reason": "not a DICOM file"}, {"path": "x.dcm", "reason": "not a DICOM file"}]
    models = rp.collect_models([{"name": XM.name, "version": XM.version, "trained": True, "sha256": XM.sha256,
                                 "label": XM.label}])
    return rp.build_results(rows, problems, models, input_path="/in", files_seen=6, deidentified=deid,
                            run={"generated_at": "2026-01-01T00:00:00+00:00", "seconds": 1.5})


def test_summary_csv_json_html(tmp_path):
    res = _results()
    s = res["summary"]
    assert (s["studies"], s["series"], s["ok"], s["failed"], s["problem_files"]) == (1, 2, 1, 1, 2)
    assert s["failures_by_reason"] == {"not a DICOM file": 2, "the decoder crashed (SIGSEGV) on this file": 1}
    paths = rp.write_reports(tmp_path, res)
    assert json.loads(paths["json"].read_text())["schema"] == rp.RESULTS_SCHEMA

    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert len(rows) == 2 and rows[0]["p:Lung Opacity"] == "0.812346" and rows[1]["p:Lung Opacity"] == ""
    assert all(r["intended_use"] == RESEARCH_USE for r in rows)
    assert rows[0]["models"] == "xray-densenet121 1.2.0 (trained)" and rows[0]["ms:analyze"] == "400.0"
    assert rows[1]["status"] == "failed" and "SIGSEGV" in rows[1]["error"]

    page = paths["html"].read_text()
    assert page.count(RESEARCH_USE) >= 2 and "xray-densenet121" in page and "1.2.0" in page
    assert "<script>" in page and "sortBy" in page and not re.search(r"(src|href)=['\"]https?:", page)
    assert page.count("<tr class='") == 2 and "thumbs/a.png" in page and "SIGSEGV" in page
    assert "notes.txt" in page and "Failures by reason" in page
    assert "<script>alert" not in rp.to_html(_with_description(res, "<script>alert(1)</script>"))


def _with_description(res: dict, text: str) -> dict:
    out = json.loads(json.dumps(res))
    out["rows"][0]["series_description"] = text
    return out


def test_strip_timing_makes_runs_comparable():
    a, b = _results(), _results()
    b["run"]["seconds"] = 99.0
    b["rows"][0]["timings_ms"]["analyze"] = 1.0
    assert a != b and rp.strip_timing(a) == rp.strip_timing(b)


def test_deidentified_exports_carry_no_identifiers(tmp_path):
    paths = rp.write_reports(tmp_path, _results(deid=True))
    for p in paths.values():
        text = p.read_text()
        for ident in ("Doe", "Jane", "PID-123456", "19471103", "ACC-98765", "/in"):
            assert ident not in text, (p.name, ident)
        assert "ANON-" in text


def test_journal_atomic_records_resume_and_settings(tmp_path):
    j = jr.Journal(tmp_path)
    j.open({"schema": "s/1", "deidentify": False})
    (tmp_path / "journal" / ".tmp-leftover.json").write_text("{half")   # a killed writer's temp file
    j.write("k1", "fp1", {"rows": [{"a": 1}]})
    assert j.is_done("k1", "fp1") and not j.is_done("k1", "fp2") and not j.is_done("k2", "fp1")
    assert [r["rows"] for r in j.records()] == [[{"a": 1}]]
    with pytest.raises(jr.JournalLocked):
        jr.Journal(tmp_path).open({"schema": "s/1", "deidentify": False})
    j.close()
    j2 = jr.Journal(tmp_path)
    j2.open({"schema": "s/1", "deidentify": False})
    assert not (tmp_path / "journal" / ".tmp-leftover.json").exists()
    assert j2.read("k1")["fingerprint"] == "fp1"
    j2.close()
    with pytest.raises(ValueError, match="deidentify"):
        jr.Journal(tmp_path).open({"schema": "s/1", "deidentify": True})
    (tmp_path / "journal" / "k3.json").write_text('{"schema": "other"}')
    assert jr.Journal(tmp_path).read("k3") is None
    jr.atomic_write_text(tmp_path / "x.txt", "hello")
    assert (tmp_path / "x.txt").read_text() == "hello" and not list(tmp_path.glob(".tmp-*"))


def test_html_table_sorts_by_score_in_a_real_browser(tmp_path):
    """The page's own script orders rows by score (highest first) when it loads; no network needed."""
    from tests.test_dciodvfy import ensure_debian_tool

    # installed by the test when missing (a fresh machine has none), as tests/test_report_browser.py does
    browser = ensure_debian_tool("chromium", "chromium")
    if browser is None:
        pytest.skip("chromium (Debian package) is not installed and cannot be installed here")
    pt, st, se_x, _ = _records()
    rows = []
    for k, p in enumerate([0.3, 0.9, None, 0.6]):
        se = SeriesRecord(f"1.2.3.1.{10 + k}", "1.2.3.1", "PID-1", "CR", k, "PA", instances=se_x.instances)
        res = _xray_result(se)
        res.findings = [] if p is None else [Finding("Lung Opacity", p, 0.5, p > 0.5, XM.name, XM.version)]
        rows.append(rp.build_row(pt, st, se, res))
    page = tmp_path / "report.html"
    page.write_text(rp.to_html(rp.build_results(rows, [], [], input_path="/in", files_seen=4, deidentified=False,
                                                run={})))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    order = re.findall(r'<tr class="[a-z]+" data-uid="([0-9.]+)"', dom)
    assert order == ["1.2.3.1.11", "1.2.3.1.13", "1.2.3.1.10", "1.2.3.1.12"], order
