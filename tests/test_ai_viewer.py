"""AI in the viewer (pytest-qt, offscreen): the real MainWindow on the demo studies, the real engine.

Covers: auto-run on series_opened, findings panel (validity first, untrained never as findings,
research-use banner), heatmap overlay pixels following opacity/threshold/colormap/outline, overlay
geometry on screen (also after rotation), blink key, CT slice strip navigation and per-slice
heatmaps, supersede inside the window, failing analyses shown as messages, the auto-run setting,
screenshots in test-artifacts/, and (informative) the longest GUI stall during a CT analysis.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytestqt")

from PySide6.QtCore import QPoint, QPointF, Qt  # noqa: E402

from engine.results import RESEARCH_USE, CTSliceScore, Heatmap, StudyResult  # noqa: E402
from viewer.ai.findings_panel import UNTRAINED_TEXT  # noqa: E402
from viewer.view.heatmap_overlay import colormap_lut  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ANALYSIS_TIMEOUT_MS = 300_000


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture
def window(qtbot, tmp_path):
    from viewer.main_window import MainWindow
    from viewer.settings_store import SettingsStore

    w = MainWindow(settings=SettingsStore(tmp_path / "viewer.ini"))
    qtbot.addWidget(w)
    w.resize(1500, 950)
    w.show()
    assert w.ai is not None, "MainWindow did not create the AIController"
    yield w
    w.ai.shutdown()


def open_demo(w, demo_dir: Path, auto_run: bool) -> None:
    w.ai.panel.auto_run.setChecked(auto_run)
    w.open_path(str(demo_dir))
    w.wait_idle(60_000)


def series(w, role: str):
    ss = w.index.all_series()
    if role == "ct":
        return next(s for s in ss if s.kind == "ct")
    cr = [s for s in ss if s.kind == "xray"]
    if role == "tibia":
        return next(s for s in cr if "tibia" in s.series_description.lower())
    return next(s for s in cr if "uncompressed" in s.series_description.lower())


def wait_result(qtbot, ai, series_uid: str, timeout: int = ANALYSIS_TIMEOUT_MS) -> StudyResult:
    qtbot.waitUntil(lambda: ai.current_result is not None and ai.current_result.series_uid == series_uid
                    and not ai.is_busy(), timeout=timeout)
    return ai.current_result


def real_xray_gradcam(path: str, target_index: int = 16) -> np.ndarray:
    """Grad-CAM of the registered X-ray model (trained or not) for one output, in displayed coords."""
    from engine.dicom.display import display_gray01
    from engine.dicom.pixels import load_frame
    from engine.ai.explain.gradcam import gradcam, xray_heatmap
    from engine.ai.models.registry import XRAY_MODEL, load_model
    from engine.ai.preprocess.xray import prepare_xray

    lm = load_model(XRAY_MODEL)
    gray = display_gray01(load_frame(path))
    x, geom = prepare_xray(np.ascontiguousarray(gray, dtype=np.float32))
    (cam,) = gradcam(lm.module, x[None], [lambda o: o["pathologies"][:, target_index]], size=(geom.size, geom.size))
    return xray_heatmap(cam[0], geom)


def screen_rgb(w, image_xy: tuple[float, float]) -> tuple[int, int, int]:
    """Colour on screen at an image pixel (x = col, y = row), through every view transform."""
    iv = w.image_view
    scene = iv.image_item.mapToScene(QPointF(*image_xy))
    p = iv.graphics.mapFromScene(scene)
    img = iv.graphics.grab().toImage()
    c = img.pixelColor(QPoint(p.x(), p.y()))
    return c.red(), c.green(), c.blue()


# ------------------------------------------------------------------------------------ tests
def test_xray_auto_run_panel_and_supersede(qtbot, window, demo_dir):
    """Opening a series queues analysis; switching series supersedes; the panel renders the verdict."""
    w, ai = window, window.ai
    open_demo(w, demo_dir, auto_run=True)
    ct, tibia, chest = series(w, "ct"), series(w, "tibia"), series(w, "xray")
    w.select_series(ct.series_uid)             # a CT analysis is queued (waits for the volume) ...
    assert ai.is_busy()
    w.select_series(tibia.series_uid)          # ... and is superseded at once
    res = wait_result(qtbot, ai, tibia.series_uid)
    assert ct.series_uid not in ai.results     # the CT never produced a (shown or cached) result
    p = ai.panel
    assert p.research_label.text() == RESEARCH_USE and p.research_label.isVisible()
    assert res.validity.passed is False
    assert "Failed" in p.validity_label.text() and "not chest" in p.validity_label.text()

    w.select_series(chest.series_uid)
    res = wait_result(qtbot, ai, chest.series_uid)
    assert res.error is None and res.kind == "xray"
    assert "DenseNet" in p.model_label.text() or "densenet" in p.model_label.text().lower()
    trained = any(m.trained for m in res.models)
    texts = [p.findings_layout.itemAt(i).widget().text() for i in range(p.findings_layout.count())
             if hasattr(p.findings_layout.itemAt(i).widget(), "text")]
    if trained:
        assert p.finding_rows, "a trained model shows its scores"
        for f in res.findings:
            bar = p.finding_rows[f.label][1]
            assert bar.threshold == pytest.approx(f.threshold) and bar.value == pytest.approx(f.probability)
    else:
        assert not p.finding_rows and any(UNTRAINED_TEXT in t for t in texts)
    # validity verdict comes before the findings in the panel
    assert p.validity_box.y() < p.findings_box.y()
    # switching back shows the cached result without a new run
    w.select_series(tibia.series_uid)
    assert not ai.is_busy() and ai.current_result.series_uid == tibia.series_uid


def test_heatmap_overlay_follows_controls(qtbot, window, demo_dir, artifacts_dir):
    w, ai = window, window.ai
    open_demo(w, demo_dir, auto_run=False)
    chest = series(w, "xray")
    w.select_series(chest.series_uid)
    assert not ai.is_busy()                     # auto-run off: nothing queued
    ai.run_current()
    res = wait_result(qtbot, ai, chest.series_uid)
    hm = next((h for h in res.heatmaps if h.slice_index is None), None)
    if hm is None:   # untrained model: the engine makes no heatmaps; use its real Grad-CAM, labelled untrained
        m = res.models[0]
        hm = Heatmap("Lung Opacity", real_xray_gradcam(chest.instances[0].path), m.name, m.version)
        res.heatmaps = [hm]
    assert hm.array.shape == w.image_view.current_frame_shape()
    ai.show_result(res)
    p, ov = ai.panel, ai.overlay
    assert p.select_target(hm.target)
    if not any(m.trained for m in res.models):
        assert "untrained" in p.target_combo.currentText()
        assert "UNTRAINED" in p.heatmap_source.text()
    assert ov.is_showing()

    step = int(np.ceil(max(hm.array.shape) / 1024))
    small = hm.array[::step, ::step]
    assert ov.rgba.shape[:2] == small.shape
    # default opacity 0.45 / threshold 0.30
    np.testing.assert_array_equal(ov.rgba[..., 3], np.where(small >= 0.30, round(0.45 * 255), 0))
    p.opacity_slider.setValue(80)
    np.testing.assert_array_equal(ov.rgba[..., 3], np.where(small >= 0.30, 204, 0))
    p.threshold_slider.setValue(60)
    np.testing.assert_array_equal(ov.rgba[..., 3], np.where(small >= 0.60, 204, 0))
    p.colormap_combo.setCurrentText("inferno")
    r, c = np.unravel_index(np.argmax(small), small.shape)
    lut = colormap_lut("inferno")
    expect = lut[min(int(small[r, c] * (len(lut) - 1) + 0.5), len(lut) - 1)]   # the hottest sampled pixel
    np.testing.assert_array_equal(ov.rgba[r, c, :3], expect)

    # On screen, at the hottest pixel: grey without the overlay, the colormap's top colour with it.
    rr, cc = np.unravel_index(np.argmax(hm.array), hm.array.shape)
    xy = (cc + 0.5, rr + 0.5)
    p.opacity_slider.setValue(100)
    p.overlay_check.setChecked(False)
    qtbot.wait(20)
    off = screen_rgb(w, xy)
    assert off[0] == off[1] == off[2]
    p.overlay_check.setChecked(True)
    top = tuple(int(v) for v in colormap_lut("inferno")[255])
    for rotation in (0, 90):
        w.image_view.rotate(rotation)
        qtbot.wait(20)
        on = screen_rgb(w, xy)
        assert max(abs(a - b) for a, b in zip(on, top)) <= 40, (rotation, on, top)
    w.image_view.reset()

    # Blink compare: hold B to hide, release to show.
    qtbot.keyPress(w.image_view.graphics, Qt.Key.Key_B)
    assert not ov.image.isVisible()
    qtbot.keyRelease(w.image_view.graphics, Qt.Key.Key_B)
    assert ov.image.isVisible()

    # Outline mode: contours instead of the filled map.
    p.outline_check.setChecked(True)
    assert not ov.image.isVisible() and ov.outline.isVisible() and not ov.outline.path().isEmpty()
    p.outline_check.setChecked(False)

    p.threshold_slider.setValue(30)
    p.opacity_slider.setValue(50)
    p.colormap_combo.setCurrentText("turbo")
    qtbot.wait(50)
    assert w.grab().save(str(artifacts_dir / "ai_xray_heatmap.png"))


def test_ct_analysis_strip_heatmaps_and_gui_stall(qtbot, window, demo_dir, artifacts_dir):
    """One real CT analysis while a 5 ms timer records GUI stalls (printed, not asserted)."""
    from viewer.ai.workers import StallMeter

    w, ai = window, window.ai
    open_demo(w, demo_dir, auto_run=False)
    ct = series(w, "ct")
    w.select_series(ct.series_uid)
    w.wait_idle(120_000)                        # the viewer's own volume load finishes first
    ai.info_loader.wait(120_000)                # torch imported at startup (a one-off GIL stall)
    vol = w.current_volume
    assert vol is not None and vol.series_uid == ct.series_uid
    checksum = int(np.asarray(vol.hu, dtype=np.int64).sum())
    # Cancel from the panel: the engine stops, nothing is shown or cached.
    ai.run_current()
    assert ai.is_busy() and ai.panel.cancel_button.isEnabled()
    ai.panel.cancel_button.click()
    assert ai.runner.wait(120_000)
    qtbot.wait(50)
    assert not ai.is_busy() and ct.series_uid not in ai.results
    assert "cancelled" in ai.panel.status_label.text() and ai.panel.run_button.isEnabled()

    meter = StallMeter()
    ai.runner.progress.connect(lambda f, m: meter.mark(m))
    meter.start()
    meter.mark("starting")
    ai.run_current()
    res = wait_result(qtbot, ai, ct.series_uid)
    stall = meter.stop()
    # The engine analysed the viewer's volume (no second read) and left it unchanged.
    assert res.timings_ms.get("load") == 0.0
    assert int(np.asarray(vol.hu, dtype=np.int64).sum()) == checksum
    print(f"\n[gui-stall] CT analysis: longest event-loop gap {stall['max_ms']:.0f} ms, p99 "
          f"{stall['p99_ms']:.0f} ms, {stall['over_50ms']} gaps > 50 ms (target < 50 ms), worst stage "
          f"'{stall['worst_phase']}', {res.device}")
    (artifacts_dir / "gui_stall_ct.json").write_text(json.dumps(stall, indent=1))
    assert res.error is None and res.kind == "ct"
    p = ai.panel
    assert p.ct_box.isVisible() and "mL" in p.lung_volume_label.text()
    trained = any(m.trained for m in res.models)
    if not trained:
        assert not res.ct_slice_scores and p.ct_untrained_label.isVisible()
        res = with_untrained_ct_scores(res, ct)
        ai.show_result(res)
        assert "untrained" in p.top_label.text() and not p.finding_rows
    strip = p.strip
    top = strip.top_slices()
    assert top and all(s.slice_index in top for s in sorted(res.ct_slice_scores, key=lambda s: -s.probability)[:1])
    # Click the strip at a scored slice: the view jumps there (strip drawn in reading order).
    target = top[-1]
    qtbot.mouseClick(strip, Qt.MouseButton.LeftButton, pos=QPoint(int(strip.x_of(target)), strip.height() // 2))
    assert w.image_view.current_slice() == target
    # ... and the strip numbers images as the corner annotation does ("n/N").
    corner = " ".join(w.image_view.annotation_texts().values())
    assert f"{strip.reading_number(target)}/{w.image_view.n_slices()}" in corner, corner
    # Next suspicious slice = the highest score.
    p.next_button.click()
    assert w.image_view.current_slice() == top[0]

    # Per-slice heatmaps are drawn only on their own slice, over the right pixels. Trained models
    # give Grad-CAM; the untrained one's CAM is all zero, so the engine's lung mask stands in.
    real = [h for h in res.heatmaps if h.slice_index is not None and h.array.max() > 0.5]
    shown = real or lung_mask_heatmaps(ct, top[:2])
    saved = list(res.heatmaps)
    res.heatmaps = shown
    ai.show_result(res)
    assert p.select_target(shown[0].target)
    hm = shown[0]
    w.image_view.set_slice(hm.slice_index)
    assert ai.overlay.is_showing() and ai.overlay.current_heatmap() is hm
    assert (ai.overlay.rgba[..., 3] > 0).any()
    p.opacity_slider.setValue(100)
    rr, cc = np.argwhere(hm.array >= hm.array.max() - 1e-6)[0]
    qtbot.wait(20)
    on = screen_rgb(w, (cc + 0.5, rr + 0.5))
    assert on[0] != on[1] or on[1] != on[2], on            # coloured, not the grey CT
    other = next(i for i in range(w.image_view.n_slices()) if i not in {h.slice_index for h in shown})
    w.image_view.set_slice(other)
    assert not ai.overlay.is_showing() and ai.overlay.rgba is None
    qtbot.wait(20)
    off = screen_rgb(w, (cc + 0.5, rr + 0.5))
    assert off[0] == off[1] == off[2]
    p.opacity_slider.setValue(45)

    # Screenshot of what the engine and model really produced.
    res.heatmaps = saved
    ai.show_result(res)
    w.image_view.set_slice(top[0])
    qtbot.wait(50)
    assert w.grab().save(str(artifacts_dir / "ai_ct_slice_strip.png"))


def lung_mask_heatmaps(ct_series, slices: list[int]) -> list[Heatmap]:
    """engine.ai.preprocess.lung_roi's lung mask on some slices, as overlay data (not an AI output)."""
    from engine.dicom.volume import load_volume
    from engine.ai.preprocess.lung_roi import segment_lungs

    vol = load_volume(ct_series)
    roi = segment_lungs(vol.hu, tuple(float(s) for s in vol.spacing))
    f = int(roi.factor)
    out = []
    for i in slices:
        m = np.repeat(np.repeat(roi.mask[i].astype(np.float32), f, 0), f, 1)[:vol.hu.shape[1], :vol.hu.shape[2]]
        out.append(Heatmap("lung mask (display check, not AI)", m, "lung-roi", "engine", slice_index=int(i)))
    return out


def with_untrained_ct_scores(res: StudyResult, ct_series) -> StudyResult:
    """The untrained CT model's real per-slice outputs and Grad-CAM on a few lung slices.

    The engine hides them (untrained -> no findings); the panel must keep saying 'untrained'.
    """
    import torch

    from engine.dicom.volume import load_volume
    from engine.ai.explain.gradcam import cams_from_fmap, ct_heatmap, upsample
    from engine.ai.models.registry import CT_MODEL, load_model
    from engine.ai.preprocess.ct import ct_model_input, hu_to_gray01
    from engine.ai.preprocess.lung_roi import choose_slices, segment_lungs

    vol = load_volume(ct_series)
    roi = segment_lungs(vol.hu, tuple(float(s) for s in vol.spacing))
    chosen = list(choose_slices(roi, max_slices=10))
    lm = load_model(CT_MODEL)
    size = int(getattr(lm.module, "input_size", 224))
    crops = []
    for i in chosen:
        y0, y1, x0, x1 = roi.boxes[i]
        crops.append(ct_model_input(hu_to_gray01(vol.hu[i][y0:y1, x0:x1]), size))
    x = torch.stack(crops)
    with torch.no_grad():
        fmap = lm.module.feature_map(x)
        probs = torch.softmax(lm.module.head(fmap).float(), dim=1)[:, -1].tolist()
    order = sorted(range(len(chosen)), key=lambda j: -probs[j])[:2]
    (cams,) = cams_from_fmap(lm.module.head, fmap[order], [lambda o: o[:, -1]])
    up = upsample(cams, (size, size))
    res.ct_slice_scores = [CTSliceScore(int(i), float(vol.positions[i]), float(pr)) for i, pr in zip(chosen, probs)]
    res.heatmaps = [Heatmap("COVID-19", ct_heatmap(up[k], roi.boxes[chosen[j]], vol.hu.shape[1:]), lm.info.name,
                            lm.info.version, slice_index=int(chosen[j])) for k, j in enumerate(order)]
    return res


def test_failing_analysis_shows_message_and_auto_run_setting(qtbot, window, demo_dir, tmp_path):
    w, ai = window, window.ai
    # A study whose file disappears after it was displayed: the engine's own error reaches the panel.
    src = Path(next(s for s in __import__("engine.service", fromlist=["x"]).open_path(demo_dir).all_series()
                    if "uncompressed" in s.series_description.lower()).instances[0].path)
    study = tmp_path / "study"
    study.mkdir()
    shutil.copy(src, study / "cr.dcm")
    open_demo(w, study, auto_run=False)
    assert w.settings.value("ai/auto_run") in (False, "false")
    s = w.index.all_series()[0]
    w.select_series(s.series_uid)
    assert not ai.is_busy() and "Run AI" in ai.panel.status_label.text()
    (study / "cr.dcm").unlink()
    ai.panel.run_button.click()
    res = wait_result(qtbot, ai, s.series_uid, timeout=60_000)
    assert res.error and ai.panel.error_label.isVisible()
    assert "not found" in ai.panel.error_label.text()

    # An exception inside the worker becomes a message too; the window stays usable.
    from engine.ai.models.registry import load_model

    ai.runner.analyze_fn = lambda series, progress, cancel: load_model("no-such-model")
    with qtbot.waitSignal(ai.runner.error, timeout=30_000):
        ai.panel.run_button.click()
    assert ai.panel.error_label.isVisible() and "no-such-model" in ai.panel.error_label.text()
    assert ai.panel.run_button.isEnabled() and not ai.panel.cancel_button.isEnabled()


def test_overlay_rendering_functions():
    """Colour, alpha and threshold of the overlay image; the outline is the threshold iso-line."""
    from viewer.view.heatmap_overlay import render_heatmap_rgba, threshold_contours

    yy, xx = np.mgrid[:200, :300]
    hm = np.clip(1.0 - np.hypot(yy - 100, xx - 150) / 100.0, 0, 1).astype(np.float32)   # cone, r=100 at 0
    lut = colormap_lut("viridis")
    rgba = render_heatmap_rgba(hm, 0.5, 0.5, lut)
    assert rgba.dtype == np.uint8 and rgba.shape == (200, 300, 4)
    np.testing.assert_array_equal(rgba[..., 3], np.where(hm >= 0.5, 128, 0))
    np.testing.assert_array_equal(rgba[100, 150, :3], lut[255])
    (c,) = threshold_contours(hm, 0.5)            # one closed ring at radius 50 around (100, 150)
    r = np.hypot(c[:, 0] - 100.5, c[:, 1] - 150.5)
    assert abs(float(r.mean()) - 50.0) < 1.5 and np.allclose(c[0], c[-1])


def _trained_xray_result(passed: bool) -> StudyResult:
    """A StudyResult as a trained X-ray model would return it (panel rendering only)."""
    from engine.results import Finding, ModelInfo, Severity, Validity

    m = ModelInfo("xray-densenet121", "1.0.0", True, "0" * 64, label="ChestView X-ray DenseNet-121 1.0.0 (trained)")
    u = ModelInfo("ct-inception", "0.0.0", False, "")
    fs = [Finding(lbl, p, 0.5, passed and p >= 0.5, m.name, m.version)
          for lbl, p in [("Effusion", 0.2), ("Lung Opacity", 0.81), ("Pneumonia", 0.55)]]
    fs.append(Finding("COVID-19", 0.9, 0.5, False, u.name, u.version))       # from the untrained model
    reasons = [] if passed else ["Body Part Examined is KNEE, not chest"]
    return StudyResult("1.2", "1.2.3", "CR", "xray", Validity(passed, reasons), fs,
                       Severity(3.74, 2.41, 0.4, m.name, m.version), [], [m, u],
                       timings_ms={"inference": 93.0}, device="cpu (2 threads, fp32)")


def test_findings_panel_renders_trained_and_greyed(qtbot):
    from viewer.ai.findings_panel import FindingsPanel

    p = FindingsPanel()
    qtbot.addWidget(p)
    p.show()
    p.show_result(_trained_xray_result(passed=True))
    assert list(p.finding_rows) == ["Lung Opacity", "Pneumonia", "Effusion"]   # positives first
    assert "COVID-19" not in p.finding_rows                                      # untrained: never a finding
    name, bar, val = p.finding_rows["Lung Opacity"]
    assert bar.threshold == 0.5 and bar.value == pytest.approx(0.81) and "▲" in val.text()
    assert not bar.greyed and name.isEnabled() and name.font().bold()
    assert p.extent_value.text() == "3.7 / 8" and p.opacity_value.text() == "2.4 / 6"
    assert p.extent_bar.fill_fraction() == pytest.approx(3.74 / 8)
    assert "ct-inception 0.0.0" in " ".join(
        p.findings_layout.itemAt(i).widget().text() for i in range(p.findings_layout.count())
        if hasattr(p.findings_layout.itemAt(i).widget(), "text"))
    assert "cpu" in p.smallprint.text() and RESEARCH_USE in p.smallprint.text()

    p.show_result(_trained_xray_result(passed=False))
    assert "Failed" in p.validity_label.text() and "KNEE" in p.validity_label.text()
    name, bar, val = p.finding_rows["Lung Opacity"]
    assert bar.greyed and not name.isEnabled() and "▲" not in val.text()
    assert p.extent_bar.greyed
    assert p.research_label.isVisible() and p.research_label.text() == RESEARCH_USE
