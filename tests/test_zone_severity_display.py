"""Brixia zone severity where it is read: the findings panel's zone table, the zone grid on the image
(toggle, key, rotation and flips), the batch report's columns and grid, and the SR's zone groups.

The Severity objects are built here as engine.ai.severity_zones returns them (method "zone-ridge",
six zone scores, their sum, zone boxes in displayed-image pixels), so the display is tested
independently of the scorer's training; the image is the real demo CR.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

pytest.importorskip("pytestqt")

from engine.results import Finding, ModelInfo, Severity, StudyResult, Validity  # noqa: E402

SM = ModelInfo("xray-severity", "2.0.0", True, "cd" * 32, label="ChestView X-ray zone severity 2.0.0")
ZS = {"A": 0.4, "B": 1.26, "C": 2.04, "D": 0.0, "E": 1.55, "F": 2.91}


def zone_boxes(rows: int, cols: int) -> dict[str, tuple[int, int, int, int]]:
    """Thirds of two lung boxes: patient right on the image's left (PA), as engine.ai.analysis sets them."""
    out = {}
    top, bottom = int(rows * 0.18), int(rows * 0.78)
    h = (bottom - top) / 3
    for k, (z_upper, left, right) in enumerate((("A", int(cols * 0.14), int(cols * 0.47)),
                                               ("D", int(cols * 0.53), int(cols * 0.86)))):
        for i in range(3):
            z = chr(ord(z_upper) + i)
            out[z] = (int(top + i * h), left, int(top + (i + 1) * h), right)
    return out


def zone_severity(shape=(2000, 1600), zones: dict | None = ZS) -> Severity:
    zs = dict(zones or {})
    return Severity(4.6, 3.1, None, SM.name, SM.version, zone_scores=zs,
                    brixia_global=round(sum(zs.values()), 3) if zs else None, method="zone-ridge",
                    zone_boxes=zone_boxes(*shape) if zs else {})


def zone_result(study_uid: str, series_uid: str, shape=(2000, 1600), passed: bool = True,
                trained: bool = True, zones: dict | None = ZS) -> StudyResult:
    m = ModelInfo(SM.name, SM.version, trained, SM.sha256, label=SM.label if trained else "")
    reasons = [] if passed else ["Body Part Examined is KNEE, not chest"]
    return StudyResult(study_uid, series_uid, "CR", "xray", Validity(passed, reasons),
                       [Finding("Lung Opacity", 0.71, 0.5, passed, m.name, m.version)],
                       zone_severity(shape, zones), [], [m], device="cpu")


# ------------------------------------------------------------------------------ findings panel
def test_panel_shows_six_zones_and_global(qtbot):
    from viewer.ai.findings_panel import FindingsPanel

    p = FindingsPanel()
    qtbot.addWidget(p)
    p.show()
    p.show_result(zone_result("1.2", "1.2.3"))
    zb = p.zone_box
    assert zb.isVisible()
    assert {z: c.text() for z, c in zb.cells.items()} == {z: f"{z}  {v:.1f}" for z, v in ZS.items()}
    assert "8.2" in zb.global_label.text() and "/ 18" in zb.global_label.text()
    assert all("thirds approximation of the Brixia zones; research use only" in c.toolTip() for c in zb.cells.values())
    assert "zone-ridge" in p.severity_method.text() or "ridge" in p.severity_method.text()
    assert "Brixia" in p.severity_box.title() and p.extent_value.text() == "4.6 / 8"
    # colour-coded: the 2.9 zone is redder than the 0.0 zone
    red = [int(zb.cells[z].styleSheet().split("background: #")[1][:2], 16) for z in ("D", "F")]
    green = [int(zb.cells[z].styleSheet().split("background: #")[1][2:4], 16) for z in ("D", "F")]
    assert red[1] > red[0] and green[1] < green[0]
    assert all(c.isEnabled() for c in zb.cells.values())

    p.show_result(zone_result("1.2", "1.2.3", passed=False))       # gate failed: greyed like findings
    assert zb.isVisible() and not any(c.isEnabled() for c in zb.cells.values())
    assert "image check failed" in zb.global_label.text() and p.extent_bar.greyed

    p.show_result(zone_result("1.2", "1.2.3", trained=False))      # untrained: no scores shown
    assert all(c.text() == "untrained" for c in zb.cells.values())

    p.show_result(zone_result("1.2", "1.2.3", zones={}))             # formula-only severity: no table
    assert not zb.isVisible() and p.severity_box.isVisible() and p.extent_value.text() == "4.6 / 8"


# ------------------------------------------------------------------------------ zone grid on image
@pytest.fixture
def window(qtbot, tmp_path):
    from viewer.main_window import MainWindow
    from viewer.settings_store import SettingsStore

    w = MainWindow(settings=SettingsStore(tmp_path / "viewer.ini"))
    qtbot.addWidget(w)
    w.resize(1500, 950)
    w.show()
    assert w.ai is not None
    yield w
    w.ai.shutdown()


def _open_demo_cr(w, demo_dir: Path):
    w.ai.panel.auto_run.setChecked(False)
    w.open_path(str(demo_dir))
    w.wait_idle(60_000)
    cr = next(s for s in w.index.all_series() if s.kind == "xray" and "uncompressed" in s.series_description.lower())
    w.select_series(cr.series_uid)
    w.wait_idle(60_000)
    return cr


def _outline_scene_rect(ov, z: str):
    item = ov.outlines[z]
    return item.mapRectToScene(item.rect)


def test_zone_grid_toggles_and_follows_rotation_and_flips(qtbot, window, demo_dir, artifacts_dir):
    w = window
    cr = _open_demo_cr(w, demo_dir)
    shape = w.image_view.current_frame_shape()
    res = zone_result(cr.study_uid, cr.series_uid, shape)
    w.ai.show_result(res)
    ov = w.zone_grid
    assert ov.is_showing() and sorted(ov.outlines) == list("ABCDEF")
    assert {z: lab.text for z, lab in ov.labels.items()} == {z: f"{z} {v:.1f}" for z, v in ZS.items()}
    qtbot.wait(30)
    assert w.grab().save(str(artifacts_dir / "xray_zone_severity.png"))

    def geometry():
        return ({z: _outline_scene_rect(ov, z) for z in ov.outlines}, ov.label_scene_positions())

    rects0, labels0 = geometry()
    # unrotated PA image: zone A (patient right) is on the screen's left, D on its right
    assert rects0["A"].center().x() < rects0["D"].center().x()
    for transform in (lambda: w.image_view.rotate(90), lambda: w.image_view.set_flip(horizontal=True)):
        before_rects, before_labels = geometry()
        transform()
        qtbot.wait(20)
        rects, labels = geometry()
        assert any(abs(rects[z].center().x() - before_rects[z].center().x()) > 5 for z in rects)
        assert labels != before_labels
        for z in rects:   # each label stays anchored at its own zone's top-left corner on screen
            x, y = labels[z]
            assert abs(x - rects[z].left()) < 4 and abs(y - rects[z].top()) < 4, (z, labels[z], rects[z])
    # after rotate 90 then a horizontal flip, the image's left-right axis runs top-bottom on screen
    assert abs(rects["A"].center().x() - rects["D"].center().x()) < abs(rects["A"].center().y() - rects["D"].center().y())
    w.image_view.reset()

    # zoom and pan keep the outline on the same image pixels
    w.image_view.set_zoom(2.0)
    vb = w.image_view.view_box
    t, left, b, r = res.severity.zone_boxes["B"]
    corner = w.image_view.content.mapToScene(float(left), float(t))
    assert abs(corner.x() - _outline_scene_rect(ov, "B").left()) < 3
    vb.translateBy(x=40, y=25)
    corner = w.image_view.content.mapToScene(float(left), float(t))
    assert abs(corner.x() - _outline_scene_rect(ov, "B").left()) < 3
    w.image_view.reset()

    # toggles: the panel's check box, and the Z key (listed in Help > Shortcuts)
    box = w.ai.panel.zone_box
    box.grid_check.setChecked(False)
    assert not ov.is_showing()
    box.grid_check.setChecked(True)
    assert ov.is_showing()
    w.activateWindow()
    w.image_view.graphics.setFocus()
    ov.action.trigger()
    assert not ov.is_showing() and not box.grid_check.isChecked()
    ov.action.trigger()
    assert ov.is_showing() and box.grid_check.isChecked()
    assert ("Z", ov.action.text()) in w.shortcut_rows()
    assert sum(1 for k, _ in w.shortcut_rows() if k == "Z") == 1

    # a result whose boxes do not fit the displayed frame (another image) is not drawn
    w.ai.show_result(zone_result(cr.study_uid, cr.series_uid, (shape[0] * 2, shape[1] * 2)))
    assert not ov.is_showing()
    # gate failed: drawn, grey and dashed
    w.ai.show_result(zone_result(cr.study_uid, cr.series_uid, shape, passed=False))
    assert ov.is_showing() and all(o.dashed for o in ov.outlines.values())
    # untrained severity model: nothing drawn
    w.ai.show_result(zone_result(cr.study_uid, cr.series_uid, shape, trained=False))
    assert not ov.is_showing()


# ------------------------------------------------------------------------------ batch report
def _records():
    from engine.dicom.records import InstanceRecord, PatientRecord, SeriesRecord, StudyRecord

    se = SeriesRecord("1.2.3.1.1", "1.2.3.1", "PID-1", "CR", 1, "PA chest", "CHEST", "PA", 400, 300,
                      [InstanceRecord("/in/a.dcm", "1.2.3.1.1.1", 1)])
    st = StudyRecord("1.2.3.1", "PID-1", "20200401", "", "Chest", "ACC-1", [se])
    return PatientRecord("PID-1", "Doe^Jane", "19471103", "F", [st]), st, se


def test_report_carries_zone_columns(tmp_path):
    from engine.review import report as rp

    pt, st, se = _records()
    row = rp.build_row(pt, st, se, zone_result(se.study_uid, se.series_uid, (400, 300)))
    assert set(row) == set(rp.ROW_KEYS)
    assert row["severity_method"] == "zone-ridge" and row["brixia_global"] == pytest.approx(8.16)
    assert [row[f"zone_{z}"] for z in "ABCDEF"] == [pytest.approx(v) for v in ZS.values()]
    assert row["severity_extent"] == 4.6 and row["severity_opacity"] == 3.1      # existing columns kept
    res = rp.build_results([row], [], [], input_path="/in", files_seen=1, deidentified=False, run={})
    paths = rp.write_reports(tmp_path, res)

    back = json.loads(paths["json"].read_text())["rows"][0]
    assert back["zone_F"] == pytest.approx(2.91) and back["severity_method"] == "zone-ridge"
    line = next(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    for col in ("severity_extent", "severity_opacity", "severity_method", "brixia_global",
                "zone_A", "zone_B", "zone_C", "zone_D", "zone_E", "zone_F"):
        assert col in line, col
    assert float(line["zone_C"]) == pytest.approx(2.04) and float(line["brixia_global"]) == pytest.approx(8.16)
    page = paths["html"].read_text()
    assert "Brixia 0-18 (zones)" in page and "<b>8.2</b>/18" in page
    assert "C&nbsp;2.0" in page and "F&nbsp;2.9" in page and "thirds approximation" in page

    # a severity without zones (the formula) leaves the new columns empty
    old = zone_result(se.study_uid, se.series_uid, (400, 300), zones={})
    old.severity.method = "cohen-logit"
    row = rp.build_row(pt, st, se, old)
    assert row["zone_A"] is None and row["brixia_global"] is None and row["severity_method"] == "cohen-logit"


# ------------------------------------------------------------------------------ DICOM SR
def _concept(item) -> str:
    return item.ConceptNameCodeSequence[0].CodeMeaning


def _groups(sr) -> list:
    imaging = next(i for i in sr.ContentSequence if _concept(i) == "Imaging Measurements")
    return [g for g in imaging.ContentSequence if _concept(g) == "Measurement Group"]


def _child(group, meaning: str):
    return [c for c in group.ContentSequence if _concept(c) == meaning]


def _ident(group) -> str:
    return next(c.TextValue for c in _child(group, "Tracking Identifier"))


def test_sr_has_six_zone_groups_and_global(tmp_path):
    from pydicom.data import get_testdata_file

    from engine.interop import export as ex

    src = Path(get_testdata_file("RG1_UNCR.dcm"))
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    res = zone_result(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), (int(ds.Rows), int(ds.Columns)))
    written = ex.export_to_folder(res, [src], tmp_path / "out", ex.ExportKinds(sr=True, parametric_map=False))
    sr_path = next(p for p in written if pydicom.dcmread(p).Modality == "SR")
    sr = pydicom.dcmread(sr_path)
    groups = _groups(sr)
    zone_groups = [g for g in groups if _ident(g).startswith("Brixia zone ")]
    assert sorted(_ident(g) for g in zone_groups) == [f"Brixia zone {z} (thirds approximation)" for z in "ABCDEF"]
    for g in zone_groups:
        z = _ident(g).split()[2]
        site = _child(g, "Finding Site")[0]
        lat = next(c for c in site.ContentSequence if _concept(c) == "Laterality")
        assert site.ConceptCodeSequence[0].CodeValue == {"A": "281392002", "B": "281393007", "C": "281394001"}[
            chr(ord(z) - 3) if z in "DEF" else z]
        assert lat.ConceptCodeSequence[0].CodeMeaning == ("Right" if z in "ABC" else "Left")
        num = next(c for c in g.ContentSequence if c.ValueType == "NUM")
        assert float(num.MeasuredValueSequence[0].NumericValue) == pytest.approx(ZS[z])
        assert _child(g, "Algorithm Name")[0].TextValue == SM.name
        assert _child(g, "Algorithm Version")[0].TextValue == SM.version
    glob = next(g for g in groups if _ident(g) == "Brixia global score (thirds approximation)")
    num = next(c for c in glob.ContentSequence if c.ValueType == "NUM")
    assert float(num.MeasuredValueSequence[0].NumericValue) == pytest.approx(8.16)
    assert any(i.CodingSchemeDesignator == "99CHESTVIEW" for i in sr.CodingSchemeIdentificationSequence)
    sev = next(g for g in groups if _ident(g) == "AI severity (Cohen et al. 2020)")
    params = " ".join(c.TextValue for c in _child(sev, "Algorithm Parameters"))
    assert "zone-ridge" in params and "Lung Opacity logit" not in params

    import highdicom as hd

    back = hd.sr.srread(sr_path)        # highdicom parses the TID 1500 tree back into its classes
    found = back.content.get_image_measurement_groups()
    zones = [g for g in found if str(g.tracking_identifier).startswith("Brixia zone ")]
    assert len(zones) == 6
    assert {g.finding_sites[0].topographical_modifier is None for g in zones} == {True}
    assert sorted(g.finding_sites[0].laterality.meaning for g in zones) == ["Left"] * 3 + ["Right"] * 3

    exe = shutil.which("dciodvfy")
    if exe:       # tests/test_dciodvfy.py installs dicom3tools where it can; here, check when present
        run = subprocess.run([exe, "-new", str(sr_path)], capture_output=True, text=True, timeout=120)
        errors = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")]
        assert errors == []


    # a severity without zone scores (the formula) gets no zone groups, the Cohen group stays
    res = zone_result(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), zones={})
    sr = ex.build_sr(res, ex.read_sources([src]))
    ids = [_ident(g) for g in _groups(sr)]
    assert not any(i.startswith("Brixia") for i in ids) and "AI severity (Cohen et al. 2020)" in ids
