"""Priors and trend: engine.reading.priors (pure), the trend panel in the findings dock (pytest-qt), and
the per-patient trend section of the batch HTML report."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PySide6.QtCore import Qt
from PySide6.QtTest import QTest

from engine.review import report as rp
from engine.dicom.records import InstanceRecord, PatientRecord, SeriesRecord, StudyRecord
from engine.reading.priors import (order_points, patient_trend, point_from_result, series_to_analyse,
                           severity_metrics, study_datetime, trend_svg, trends_from_rows)
from engine.results import Finding, ModelInfo, Severity, StudyResult, Validity
from tests.priors_data import write_cr_studies

XM = ModelInfo("xray-densenet121", "1.0.0", True, "ab" * 32)
UNTRAINED = ModelInfo("xray-other", "0.1.0", False, "")


def _cr(uid: str, study: str, number: int = 1, view: str = "PA") -> SeriesRecord:
    return SeriesRecord(uid, study, "P1", "CR", number, "PA chest", "CHEST", view, 100, 100,
                        instances=[InstanceRecord(f"/x/{uid}.dcm", f"{uid}.1", 1, rows=100, columns=100)])


def _result(se: SeriesRecord, p: float, extent: float | None = None, passed: bool = True) -> StudyResult:
    return StudyResult(se.study_uid, se.series_uid, "CR", "xray", Validity(passed),
                       findings=[Finding("COVID-19", p, 0.5, p >= 0.5, XM.name, XM.version),
                                 Finding("Toy", 0.99, 0.5, True, UNTRAINED.name, UNTRAINED.version)],
                       severity=None if extent is None else Severity(extent, extent * 0.75, 0.0, XM.name, XM.version),
                       models=[XM, UNTRAINED])


def test_study_datetime_follows_ps3_5_da_tm():
    assert study_datetime("20240312", "0930").isoformat() == "2024-03-12T09:30:00"
    assert study_datetime("20240312", "235959.123456").second == 59
    assert study_datetime("", "1200") is None and study_datetime("2024", "") is None


def test_severity_metrics_read_whatever_the_result_carries():
    se = _cr("a", "s1")
    sev, zones = severity_metrics(_result(se, 0.3, extent=4.0))
    assert sev == {"extent": 4.0, "opacity": 3.0} and zones == {}
    # Brixia zone scores A-F (a list or a mapping) add their total 0-18
    with_zones = SimpleNamespace(severity=SimpleNamespace(geographic_extent=2.0, opacity=1.0,
                                                          zone_scores=[0, 1, 2, 0, 1, 3]), ct_quant=None)
    sev, zones = severity_metrics(with_zones)
    assert sev["brixia"] == 7.0 and zones["F"] == 3 and sev["extent"] == 2.0
    # the engine's Severity: zone scores by letter and the Brixia global from the zone scorer
    zs = dict(zip("ABCDEF", (1.0, 2.0, 0.5, 0.0, 1.5, 3.0)))
    real = SimpleNamespace(severity=Severity(5.0, 3.0, None, XM.name, XM.version, zone_scores=zs,
                                             brixia_global=8.0, method="zone-ridge"), ct_quant=None)
    sev, zones = severity_metrics(real)
    assert sev == {"extent": 5.0, "opacity": 3.0, "brixia": 8.0} and zones == zs
    # CT: severity score 0-25 and % opacity from the quantification
    ct = SimpleNamespace(severity=None, ct_quant=SimpleNamespace(severity_score=9, total_opacity_percent=12.5))
    assert severity_metrics(ct)[0] == {"ct_score": 9.0, "ct_opacity_pct": 12.5}
    assert severity_metrics(SimpleNamespace())[0] == {}


def test_ct_quantification_of_the_phantom_lands_in_the_trend():
    """The real HU quantification (engine.ai.ct_quant) on a small phantom volume, read by the trend."""
    ct_quant = pytest.importorskip("engine.ai.ct_quant")
    from engine.demo.phantom import PhantomGeometry, phantom_volume

    geom = PhantomGeometry(n_slices=24, size=128, pixel_mm=2.8, slice_mm=10.0, z0_mm=40.0)
    hu = phantom_volume(geom)
    q = ct_quant.quantify_ct(hu, (geom.slice_mm, geom.pixel_mm, geom.pixel_mm), is_phantom=True)
    sev, _ = severity_metrics(SimpleNamespace(severity=None, ct_quant=q))
    assert sev["ct_score"] == q.severity_score and sev["ct_opacity_pct"] == pytest.approx(q.total_opacity_percent)
    assert sev["ct_opacity_pct"] > 0          # the phantom has a GGO and a consolidation lesion


def _studies():
    s1 = StudyRecord("s1", "P1", "20240105", "080000", series=[_cr("a", "s1")])
    s2 = StudyRecord("s2", "P1", "20240620", "", series=[_cr("b-lat", "s2", 1, "LL"), _cr("b", "s2", 2)])
    s3 = StudyRecord("s3", "P1", "20240312", "", series=[_cr("c", "s3")])
    s4 = StudyRecord("s4", "P1", "", "", series=[_cr("d", "s4")])
    return [s1, s2, s3, s4]


def test_patient_trend_one_point_per_study_by_date_trained_findings_only():
    studies = _studies()
    results = {"a": _result(studies[0].series[0], 0.2, 1.0), "b-lat": _result(studies[1].series[0], 0.9),
               "b": _result(studies[1].series[1], 0.7, 5.0), "c": _result(studies[2].series[0], 0.4, 3.0),
               "d": _result(studies[3].series[0], 0.5)}
    pts = patient_trend(studies, results, "XR")
    assert [p.study_uid for p in pts] == ["s1", "s3", "s2"]          # by date; undated s4 left out
    assert pts[-1].series_uid == "b"                                   # the frontal, not the lateral
    assert [p.probabilities for p in pts] == [{"COVID-19": 0.2}, {"COVID-19": 0.4}, {"COVID-19": 0.7}]
    assert [p.severity["extent"] for p in pts] == [1.0, 3.0, 5.0]
    assert patient_trend(studies, results, "CT") == []
    # what still needs an analysis: the best series of each study without any result, newest first
    todo = series_to_analyse(studies, {"a": results["a"]}, "XR")
    assert [se.series_uid for se in todo] == ["b", "c", "d"]


def _row(pt, st, se, result, deid):
    return rp.build_row(pt, st, se, result, deid=deid)


def test_report_trend_section_per_patient_with_two_or_more_studies_deidentified(tmp_path):
    deid = rp.Deidentifier(True)
    pid, name = "PID-778899", "Doe^Jane"
    pt = PatientRecord(pid, name, "19600101", "F")
    rows = []
    for k, (date, p, ext) in enumerate((("20240105", 0.2, 1.0), ("20240620", 0.7, 5.0), ("20240312", 0.4, 3.0))):
        st = StudyRecord(f"1.2.{k}", pid, date, "", "Chest")
        se = SeriesRecord(f"1.2.{k}.1", st.study_uid, pid, "CR", 1, "PA chest", "CHEST", "PA", 100, 100,
                          instances=[InstanceRecord(f"/in/{k}.dcm", f"1.2.{k}.1.1", 1)])
        rows.append(_row(pt, st, se, _result(se, p, ext), deid))
    other = PatientRecord("PID-1", "Roe^Rick")
    st = StudyRecord("9.1", "PID-1", "20240101")
    se = SeriesRecord("9.1.1", "9.1", "PID-1", "CR", 1, "PA", "CHEST", "PA", 100, 100)
    rows.append(_row(other, st, se, _result(se, 0.5, 2.0), deid))
    trends = trends_from_rows(rows)
    assert list(trends) == [deid.pseudonym(pid)]
    zoned = dict(rows[0], brixia_global=None, **{f"zone_{z}": 1.0 for z in "ABCDEF"})
    assert trends_from_rows([zoned, rows[1]])[deid.pseudonym(pid)][0].severity["brixia"] == 6.0                     # the single-study patient has no trend
    assert [p.study_date for p in trends[deid.pseudonym(pid)]] == ["20240105", "20240312", "20240620"]
    res = rp.build_results(rows, [], [], input_path="/in", files_seen=4, deidentified=True, run={})
    page = rp.write_reports(tmp_path, res)["html"].read_text()
    assert "Trends (patients with two or more studies)" in page and page.count("<polyline") >= 3
    assert deid.pseudonym(pid) in page and "3 studies" in page
    for ident in ("Doe", "Jane", pid, "19600101"):
        assert ident not in page
    # no section when nobody has two studies
    assert "Trends" not in rp.to_html(rp.build_results(rows[-1:], [], [], input_path="/in", files_seen=1,
                                                       deidentified=True, run={}))


def test_trend_svg_places_points_by_date():
    studies = _studies()
    pts = order_points(point_from_result(st, _result(st.series[-1], 0.5, e), st.series[-1])
                       for st, e in zip(studies[:3], (2.0, 4.0, 6.0)))
    svg = trend_svg(pts)
    assert svg.startswith("<svg") and "2024-01-05" in svg and "2024-06-20" in svg
    xs = [float(c.split("cx='")[1].split("'")[0]) for c in svg.split("<circle")[1:4]]
    assert xs[0] < xs[1] < xs[2]
    # 2024-03-12 sits about 39% of the way between the others (67 of 167 days), not in the middle
    assert (xs[1] - xs[0]) / (xs[2] - xs[0]) == pytest.approx(67 / 167, abs=0.02)


# -- the viewer ---------------------------------------------------------------------------------
def test_trend_panel_plots_present_metrics_and_a_click_opens_the_study(qtbot, artifacts_dir):
    from viewer.ai.trend_panel import TrendPanel

    studies = _studies()[:3]
    pts = order_points(point_from_result(st, _result(st.series[-1], p, e), st.series[-1])
                       for st, p, e in zip(studies, (0.2, 0.7, 0.4), (1.0, 5.0, 3.0)))
    panel = TrendPanel()
    qtbot.addWidget(panel)
    panel.resize(360, 460)
    panel.set_points(pts, "s2", n_studies=4, missing=1)
    panel.show()
    QTest.qWaitForWindowExposed(panel)
    # extent, opacity and one probability: three metrics, each with three dated markers
    assert len(panel.scatters) == 3 and all(len(sc.points()) == 3 for sc in panel.scatters)
    assert panel.table.rowCount() == 3 and panel.table.item(0, 0).text().startswith("▶ 2024-06-20")
    assert "3 of 4 studies analysed" in panel.status.text() and panel.analyse_button.isVisible()
    pos = panel.spot_scene_pos("s3")
    vp = panel.plot.viewport()
    with qtbot.waitSignal(panel.study_requested, timeout=3000) as sig:
        local = panel.plot.mapFromScene(pos)
        QTest.mouseClick(vp, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, local)
    assert sig.args == ["s3"]
    with qtbot.waitSignal(panel.study_requested, timeout=3000) as sig:
        panel.table.cellClicked.emit(2, 1)                                    # oldest row
    assert sig.args == ["s1"]


@pytest.fixture()
def trend_win(qapp, tmp_path, monkeypatch, one_torch_thread):
    from tests.priors_data import main_window

    yield from main_window(qapp, tmp_path, monkeypatch, auto_run=True, size=(1500, 950))


def test_trend_fills_with_real_analyses_and_a_point_opens_the_prior(trend_win, qtbot, tmp_path):
    w = trend_win
    if w.ai is None or w.trend is None:
        pytest.skip("the AI panel is not available")
    write_cr_studies(tmp_path / "cr", "TREND-1", ["20240105", "20240620", "20240312"])
    w.open_path(tmp_path / "cr", wait=True)
    w.wait_idle()
    qtbot.waitUntil(lambda: w.ai.current_result is not None, timeout=180000)
    w.trend.wait_idle(300000)
    panel = w.trend.panel
    qtbot.waitUntil(lambda: len(panel.points) == 3, timeout=300000)
    assert panel.isVisible()
    assert [p.study_date for p in panel.points] == ["20240105", "20240312", "20240620"]
    assert panel.current_study == w.current_series.study_uid
    # the same image three times: the same numbers on every date (the analyses are real, not made up)
    probs = [p.probabilities for p in panel.points]
    assert probs[0] and probs[1] == pytest.approx(probs[0], abs=1e-4) and probs[2] == pytest.approx(probs[0], abs=1e-4)
    # click the oldest point: that study opens beside the current one
    oldest = panel.points[0].study_uid
    panel.study_requested.emit(oldest)
    qtbot.waitUntil(lambda: not w.viewports.loading(), timeout=30000)
    vp1 = w.viewports.viewports[1]
    assert w.viewports.layout_name() == "1x2" and vp1.series.study_uid == oldest
    assert np.asarray(vp1.view.rendered_image()).std() > 0


# -- priors held by a PACS (a real Orthanc on loopback) ---------------------------------------------
@pytest.fixture(scope="module")
def pacs_with_priors(tmp_path_factory):
    """Orthanc holding three CR studies of one patient; only the newest is opened locally."""
    from engine.interop.netconfig import NetworkSettings, Peer
    from tests.orthanc_server import OrthancServer, ensure_orthanc

    exe = ensure_orthanc()
    if exe is None:
        pytest.skip("Debian 'orthanc' is not installed and cannot be installed here (needs root + apt)")
    root = tmp_path_factory.mktemp("pacs_priors")
    files = write_cr_studies(root / "src", "PACS-CR", ["20230110", "20240312", "20240620"])
    orthanc = OrthancServer(exe, root / "orthanc")
    try:
        orthanc.start()
        for f in files:
            orthanc.upload(f)
        settings = NetworkSettings(ae_title="CHESTVIEW", port=0, bind_address="127.0.0.1", timeout_s=20,
                                   peers=[Peer("Test PACS", "ORTHANC", "127.0.0.1", orthanc.dicom_port)])
        yield settings, files
    finally:
        orthanc.stop()


def test_pacs_query_by_patient_id_lists_earlier_studies_not_opened(pacs_with_priors):
    from engine.dicom.index import index_path
    from engine.reading.priors import query_pacs_priors

    settings, files = pacs_with_priors
    idx = index_path(files[-1].parent)
    current = idx.patients[0].studies[0]
    found, problems = query_pacs_priors(settings, current, {current.study_uid})
    assert problems == []
    assert [(peer, m.study_date) for peer, m in found] == [("Test PACS", "20240312"), ("Test PACS", "20230110")]
    # an unreachable peer is reported, not raised
    from engine.interop.netconfig import Peer

    dead = type(settings)(**{**settings.__dict__, "peers": [Peer("Gone", "GONE", "127.0.0.1", 9), *settings.peers]})
    found2, problems2 = query_pacs_priors(dead, current, {current.study_uid})
    assert len(found2) == 2 and problems2 and problems2[0].startswith("Gone")


def test_trend_panel_names_pacs_priors_of_the_displayed_patient(trend_win, qtbot, pacs_with_priors):
    from engine.interop.netconfig import save_settings

    w = trend_win
    if w.trend is None:
        pytest.skip("the AI panel is not available")
    settings, files = pacs_with_priors
    # the user's network settings (CHESTVIEW_HOME); our own port only matters to the storage SCP
    save_settings(type(settings)(**{**settings.__dict__, "port": 11112}))
    w.ai.panel.auto_run.setChecked(False)
    w.open_path(files[-1].parent, wait=True)
    w.wait_idle()
    qtbot.waitUntil(lambda: w.trend.panel.pacs_label.isVisible(), timeout=30000)
    text = w.trend.panel.pacs_label.text()
    assert "On Test PACS: 2 earlier studies" in text and "2024-03-12 CR" in text and "2023-01-10 CR" in text
    assert w.trend.panel.isVisible() and len(w.trend.remote) == 2
