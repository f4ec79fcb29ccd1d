"""The main window on the demo study set (pytest-qt, offscreen): what is displayed, annotations,
keyboard, presets, measurements in mm, MPR, tag search, broken files, screenshots for humans."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QEvent, QPoint, QPointF, Qt
from PySide6.QtGui import QMouseEvent
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication


def _settings(path: Path):
    from viewer.settings_store import SettingsStore

    s = SettingsStore(path)
    s.set_value("ai/auto_run", False)      # these tests are about the viewer, not the models
    return s


@pytest.fixture(scope="module")
def win(qapp, demo_dir, tmp_path_factory):
    from viewer.main_window import MainWindow
    from viewer.style import apply_dark_theme

    apply_dark_theme(qapp)
    w = MainWindow(_settings(tmp_path_factory.mktemp("settings") / "viewer.ini"))
    w.resize(1400, 900)
    w.show()
    QTest.qWaitForWindowExposed(w)
    w.activateWindow()
    w.open_path(demo_dir, wait=True)
    yield w
    w.close()
    w.deleteLater()


def _series(win, kind: str, desc: str = ""):
    return next(s for s in win.index.all_series() if s.kind == kind and desc in s.series_description)


def _open_ct(win, qtbot):
    ct = _series(win, "ct")
    if win.current_series is not ct or win.current_volume is None:
        win.set_layout("stack")
        assert win.select_series(ct.series_uid)
        qtbot.waitUntil(lambda: win.current_volume is not None, timeout=30000)
    return ct


def _mouse(vp, kind, pos: QPoint, button, buttons):
    ev = QMouseEvent(kind, QPointF(pos), QPointF(vp.mapToGlobal(pos)), button, buttons,
                     Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(vp, ev)


def _drag(vp, p1: QPoint, p2: QPoint, button=Qt.MouseButton.LeftButton, steps=6):
    """Press, move, release like a hand would: pyqtgraph ignores move events closer than ~16 ms
    apart (GraphicsScene rate limit), so each step waits a little."""
    QTest.qWait(20)
    _mouse(vp, QEvent.Type.MouseButtonPress, p1, button, button)
    for k in range(1, steps + 1):
        QTest.qWait(20)
        _mouse(vp, QEvent.Type.MouseMove, p1 + (p2 - p1) * (k / steps), Qt.MouseButton.NoButton, button)
    _mouse(vp, QEvent.Type.MouseButtonRelease, p2, button, Qt.MouseButton.NoButton)


def test_demo_opens_with_cr_displayed_through_the_voi_pipeline(win, qtbot, artifacts_dir):
    from engine.dicom.display import render_display
    from engine.dicom.pixels import load_frame

    assert win.index.patients and len(win.index.all_series()) >= 3
    cr = _series(win, "xray", "uncompressed")
    win.select_series(cr.series_uid)
    iv = win.image_view
    assert iv.current_frame_shape() == (cr.instances[0].rows, cr.instances[0].columns)
    frame = load_frame(cr.instances[0].path)
    assert frame.monochrome1
    # header default first, then a known W/L: every pixel within 1 grey level of the engine's renderer
    assert iv.window() == pytest.approx(frame.window)
    for c, w in ((frame.window[0], frame.window[1]), (12000.0, 8000.0)):
        iv.set_window(c, w)
        got = iv.rendered_image().astype(int)
        ref = render_display(frame, c, w).astype(int)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1
    iv.apply_preset(0)
    ann = iv.overlay.all_text()
    assert "DEMO, CHEST CR" in ann and "W: 30000 L: 15000" in ann and "Zoom:" in ann
    assert iv.overlay.text("left") == "R" and iv.overlay.text("top") == "H"   # PA chest: R on screen left
    qtbot.waitUntil(lambda: all(win.browser.has_thumbnail(u) for u in win.browser.series_uids()),
                    timeout=60000)
    win.grab().save(str(artifacts_dir / "viewer_cr.png"))


def test_ct_annotations_keyboard_scrolling_and_presets(win, qtbot, artifacts_dir):
    ct = _open_ct(win, qtbot)
    iv = win.image_view
    vol = win.current_volume
    assert vol.hu.shape == (ct.count, 512, 512)
    assert type(iv.source).__name__ == "VolumeSource"
    i0 = iv.current_slice()
    iv.setFocus()
    QTest.keyClick(iv, Qt.Key.Key_Down)            # next image = one slice towards the feet
    assert iv.current_slice() == i0 - 1
    QTest.keyClick(iv, Qt.Key.Key_Up)
    QTest.keyClick(iv, Qt.Key.Key_PageDown)
    assert iv.current_slice() == i0 - ct.count // 10
    QTest.keyClick(iv, Qt.Key.Key_Home)
    assert iv.current_slice() == ct.count - 1      # first image in reading order = most superior
    QTest.keyClick(iv, Qt.Key.Key_End)
    assert iv.current_slice() == 0
    iv.set_slice(i0)
    win.activateWindow()                            # window shortcuts need the active window
    qtbot.waitUntil(win.isActiveWindow, timeout=5000)
    # HU displayed: the slice values are the volume's HU
    assert np.array_equal(iv.current_values(), vol.hu[i0])
    QTest.keyClick(iv, Qt.Key.Key_2)
    assert iv.window() == (40.0, 400.0)             # mediastinum
    QTest.keyClick(iv, Qt.Key.Key_3)
    assert iv.window() == (400.0, 1800.0)           # bone
    QTest.keyClick(iv, Qt.Key.Key_1)
    assert iv.window() == (-600.0, 1500.0)          # lung
    assert win.settings.last_window("CT") == (-600.0, 1500.0)
    ann = iv.overlay.all_text()
    n_read = ct.count - i0
    assert f"Im: {n_read}/{ct.count}" in ann and "Thk: 2.5 mm" in ann and "W: 1500 L: -600" in ann
    assert f"Pos: {vol.positions[i0]:.1f} mm" in ann
    assert "DEMO, CHEST CT" in ann
    assert (iv.overlay.text("left"), iv.overlay.text("top")) == ("R", "A")
    # pixel readout: raw stored value and HU
    txt = iv.readout_at(256.5, 256.5)
    hu = float(vol.hu[i0, 256, 256])
    assert f"HU {hu:.0f}" in txt and f"raw {hu + 1024:.0f}" in txt
    win.grab().save(str(artifacts_dir / "viewer_ct_axial.png"))
    # annotations can be hidden
    win.act_annot.trigger()
    assert not iv.overlay.isVisible() and win.settings.annotations_visible() is False
    win.act_annot.trigger()
    assert iv.overlay.isVisible()


def test_right_drag_window_level_and_wheel(win, qtbot):
    _open_ct(win, qtbot)
    iv = win.image_view
    iv.apply_preset(1)
    vp = iv.graphics.viewport()
    c = vp.rect().center()
    _drag(vp, c, c + QPoint(90, 60), Qt.MouseButton.RightButton)
    cw = iv.window()
    assert cw[1] > 1500 and cw[0] < -600            # right = wider, down = lower level
    assert win.settings.last_window("CT") == pytest.approx(cw)
    from PySide6.QtGui import QWheelEvent

    i0 = iv.current_slice()
    ev = QWheelEvent(QPointF(c), QPointF(vp.mapToGlobal(c)), QPoint(0, 0), QPoint(0, -240),
                     Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(vp, ev)
    assert iv.current_slice() == i0 - 2
    z0 = iv.zoom()
    ev = QWheelEvent(QPointF(c), QPointF(vp.mapToGlobal(c)), QPoint(0, 0), QPoint(0, 240),
                     Qt.MouseButton.NoButton, Qt.KeyboardModifier.ControlModifier, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(vp, ev)
    assert iv.current_slice() == i0 - 2 and iv.zoom() > z0 * 1.1
    iv.set_zoom(1.0)
    assert iv.zoom() == pytest.approx(1.0, rel=0.02)
    iv.fit()
    # hovering shows the raw value and HU of the pixel under the cursor in the status bar
    qtbot.wait(60)                                  # pyqtgraph drops moves closer than ~16 ms apart
    _mouse(vp, QEvent.Type.MouseMove, c, Qt.MouseButton.NoButton, Qt.MouseButton.NoButton)
    p = iv.image_item.mapFromScene(iv.graphics.mapToScene(c))
    r, col = int(p.y()), int(p.x())
    assert f"x {col}  y {r}" in win.cursor_label.text()
    assert f"HU {float(iv.current_values()[r, col]):.0f}" in win.cursor_label.text()


def test_measurements_in_mm_on_ct(win, qtbot, artifacts_dir):
    _open_ct(win, qtbot)
    iv = win.image_view
    iv.apply_preset(2)
    iv.measurements.clear()
    # drawn with the mouse: a horizontal drag of 200 screen pixels
    win.set_tool("distance")
    vp = iv.graphics.viewport()
    c = vp.rect().center()
    _drag(vp, c - QPoint(100, 120), c + QPoint(100, -120))
    m = iv.measurements.items[-1]
    expected = 200 / iv.zoom() * 0.7
    assert m.kind == "distance" and m.value == pytest.approx(expected, rel=0.03)
    assert m.text.endswith("mm")
    # exact geometry through the API: 100 columns x 0.7 mm
    d = iv.measurements.add_distance((100.0, 400.0), (200.0, 400.0))
    assert d.value == pytest.approx(70.0) and d.text == "70.0 mm"
    a = iv.measurements.add_angle((300.0, 150.0), (200.0, 150.0), (200.0, 60.0))
    assert a.value == pytest.approx(90.0)
    # ellipse ROI in the phantom: statistics equal numpy on the same mask, area in mm2
    from viewer.view.measurements import ellipse_mask

    win.set_tool("ellipse")
    _drag(vp, c + QPoint(-40, 40), c + QPoint(40, 100))
    roi = iv.measurements.items[-1]
    x, y, w, h = roi.box()
    vals = iv.current_values().astype(float)
    mask = ellipse_mask(vals.shape, x, y, w, h)
    assert roi.stats.mean == pytest.approx(vals[mask].mean(), abs=1e-3)
    assert roi.stats.area_mm2 == pytest.approx(math.pi * w * h / 4 * 0.49, rel=1e-6)
    assert "HU" in roi.text and "mm²" in roi.text
    r = iv.measurements.add_roi(100, 180, 40, 30, "rect")           # inside the right lung
    assert r.stats.area_mm2 == pytest.approx(40 * 30 * 0.49) and r.stats.n_pixels == 1200
    assert r.stats.mean < -500                                        # aerated lung in HU
    win.set_tool("pan")
    win.grab().save(str(artifacts_dir / "viewer_ct_measurements.png"))
    # measurements belong to their slice
    iv.step_slices(1)
    assert not d.roi.isVisible()
    iv.step_slices(-1)
    assert d.roi.isVisible()
    iv.measurements.clear()
    assert iv.measurements.items == []


def test_mpr_linked_crosshair_and_slab_mip(win, qtbot, artifacts_dir):
    from viewer.view.mpr_view import plane_image

    _open_ct(win, qtbot)
    assert win.act_mpr.isEnabled()
    iv = win.image_view
    iv.apply_preset(1)
    iv.set_slice(70)
    win.act_mpr.trigger()
    assert win.layout_mode() == "mpr" and win.settings.layout_mode() == "mpr"
    mpr = win.mpr_view
    vol = win.current_volume
    nz, ny, nx = vol.hu.shape
    assert mpr.position[0] == 70
    assert mpr.panes["axial"].image_item.image.shape == (ny, nx)
    # reformats are interpolated along z to the in-plane spacing (viewer.view.mpr_view.resample_rows)
    rows = round(nz * vol.spacing[0] / vol.spacing[2]) if vol.spacing[0] > vol.spacing[2] * 1.01 else nz
    assert mpr.panes["coronal"].image_item.image.shape == (rows, nx)
    assert mpr.panes["sagittal"].image_item.image.shape[1] == ny
    # coronal row 0 is the most superior slice (head up)
    assert np.array_equal(mpr.panes["coronal"].image_item.image[0], vol.hu[nz - 1, mpr.position[1], :])
    # clicking the coronal view at 100 mm from the top moves the axial slice and the stack view
    mpr.pick("coronal", 200.0, 100.0)
    z = nz - 1 - int(100.0 // vol.spacing[0])
    assert mpr.position[0] == z and iv.current_slice() == z
    mpr.pick("axial", 100 * vol.spacing[2] + 0.1, 200 * vol.spacing[1] + 0.1)
    assert mpr.position[1:] == (200, 100)
    # the coronal image's physical aspect: rows scaled by slice spacing, columns by pixel spacing
    br = mpr.panes["coronal"].image_item.mapRectToParent(mpr.panes["coronal"].image_item.boundingRect())
    assert br.height() == pytest.approx(nz * vol.spacing[0]) and br.width() == pytest.approx(nx * vol.spacing[2])
    mpr.mip_box.setChecked(True)
    mpr.slab_spin.setValue(8 * vol.spacing[0])      # millimetres: 9 slices
    assert mpr.slab == 9
    assert np.array_equal(mpr.panes["axial"].image_item.image, vol.hu[z - 4:z + 5].max(axis=0).astype(np.float32))
    assert np.array_equal(plane_image(vol.hu, "sagittal", 100, 1), vol.hu[::-1, :, 100])
    mpr.mip_box.setChecked(False)
    QTest.keyClick(mpr, Qt.Key.Key_Down)            # keyboard scrolls the axial plane, stack follows
    assert mpr.position[0] == z - 1 and iv.current_slice() == z - 1
    win.grab().save(str(artifacts_dir / "viewer_mpr.png"))
    win.act_mpr.trigger()
    assert win.layout_mode() == "stack"


def test_tag_browser_search(win, qtbot):
    _open_ct(win, qtbot)
    win.act_tags.trigger()
    tb = win.tag_browser
    qtbot.waitUntil(lambda: tb.tree.topLevelItemCount() > 10, timeout=5000)
    tb.search.setText("0028,0030")
    rows = tb.visible_rows()
    assert rows and all("0028" in r[0] and "0030" in r[0] for r in rows)
    assert "0.7" in rows[0][2]
    tb.search.setText("window center")
    assert any(r[1] == "Window Center" for r in tb.visible_rows())
    tb.search.setText("no such tag anywhere")
    assert tb.visible_rows() == []
    tb.search.setText("")
    win.act_tags.trigger()
    assert not win.tags_dock.isVisible()


def test_non_square_pixels_shown_with_true_aspect(win, qtbot, tmp_path, artifacts_dir):
    """A 400x200 DX with 0.25 x 0.5 mm pixels covers 100 x 100 mm: it must display square, and a
    circle of 40 mm diameter as a circle."""
    path = tmp_path / "nonsquare" / "dx.dcm"
    path.parent.mkdir()
    _write_dx(path, rows=200, cols=400, spacing=(0.5, 0.25))
    win.set_layout("stack")
    win.open_path(path.parent, wait=True)
    iv = win.image_view
    assert iv.current_frame_shape() == (200, 400) and iv.pixel_spacing() == (0.5, 0.25)
    r = iv.view_box.mapFromItemToView(iv.image_item, iv.image_item.boundingRect()).boundingRect()
    assert r.width() == pytest.approx(r.height(), rel=0.01)
    d = iv.measurements.add_distance((0.0, 0.0), (40.0, 20.0))
    assert d.value == pytest.approx(math.sqrt(200), rel=1e-6)
    win.grab().save(str(artifacts_dir / "viewer_nonsquare_dx.png"))
    iv.rotate(90)
    e = iv.overlay
    assert (e.text("top"), e.text("right")) == ("R", "H")   # clockwise: screen-left R goes to the top
    iv.reset()
    iv.measurements.clear()


def test_broken_files_are_listed_not_fatal(win, qtbot, demo_dir, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    cr = next((demo_dir / "CR_TIBIA").glob("*.dcm"))
    shutil.copy(cr, folder / "good.dcm")
    (folder / "broken.dcm").write_bytes(b"DICM" + bytes(range(256)) * 8)
    data = cr.read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) // 3])
    before = len(win.index.problems)
    win.open_path(folder, wait=True)
    assert len(win.index.problems) > before
    assert any("broken.dcm" in p.path for p in win.index.problems)
    assert win.current_series is not None and win.image_view.current_data() is not None
    # a truncated file that made it into the index fails at display time with a message
    trunc = [s for s in win.index.all_series() if any("truncated" in i.path for i in s.instances)]
    for s in trunc:
        ok = win.select_series(s.series_uid)
        assert ok or "truncated.dcm" in win.last_message
    assert "skipped" in win.browser.summary.text()


def test_optional_menus_and_shortcut_list(win, monkeypatch):
    import importlib

    rows = dict((v, k) for k, v in win.shortcut_rows())
    assert rows["Invert"] == "I" and rows["MPR (axial / coronal / sagittal)"] == "M"
    dlg = win.show_shortcuts()
    assert dlg.findChild(type(dlg.layout().itemAt(0).widget())).rowCount() == len(win.shortcut_rows())
    dlg.close()
    real = importlib.import_module

    def fake(name, *a, **k):
        if name in ("viewer.browse.worklist", "viewer.pacs.pacs_dialog"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    win.open_worklist()
    assert "viewer.browse.worklist.open_worklist" in win.last_message
    win.open_network_settings()
    assert "viewer.pacs.pacs_dialog.open_network_settings" in win.last_message


def test_findings_dock_and_ai_hook(win):
    from PySide6.QtWidgets import QDockWidget

    assert isinstance(win.findings_dock, QDockWidget)
    assert win.dockWidgetArea(win.findings_dock) == Qt.DockWidgetArea.RightDockWidgetArea
    try:
        import viewer.ai.ai_controller  # noqa: F401
    except ImportError:
        assert win.ai is None
    else:
        assert win.ai is not None


def _write_dx(path: Path, rows: int, cols: int, spacing: tuple[float, float]) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "TEST^NONSQUARE", "T-NS-1", "DX"
    ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20260101", 1, 1
    ds.SeriesDescription = "Non-square pixel test"
    ds.PatientOrientation = ["L", "F"]
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [spacing[0], spacing[1]]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 1750, 3000
    yy, xx = np.mgrid[0:rows, 0:cols]
    ymm, xmm = (yy + 0.5) * spacing[0], (xx + 0.5) * spacing[1]
    img = np.full((rows, cols), 500, np.uint16)
    img[(ymm - 50) ** 2 + (xmm - 50) ** 2 <= 20 ** 2] = 3000
    img[:, :4] = 4095                                  # a bright left edge marks the first column
    ds.PixelData = img.tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_cine_drag_and_drop_recent_and_remembered_layout(win, qtbot, demo_dir, tmp_path):
    from PySide6.QtCore import QMimeData, QUrl
    from PySide6.QtGui import QDragEnterEvent, QDropEvent

    from viewer.main_window import MainWindow

    _open_ct(win, qtbot)
    iv = win.image_view
    i0 = iv.current_slice()
    win.set_fps(20)
    win.act_cine.trigger()
    assert iv.cine.isActive() and iv.cine.interval() == 50
    qtbot.waitUntil(lambda: iv.current_slice() != i0, timeout=3000)
    win.act_cine.trigger()
    assert not iv.cine.isActive()
    assert win.settings.cine_fps() == 20
    # drop a folder on the window: indexed off the GUI thread, then shown
    folder = tmp_path / "dropped"
    folder.mkdir()
    shutil.copy(next((demo_dir / "CR_TIBIA").glob("*.dcm")), folder / "x.dcm")
    md = QMimeData()
    md.setUrls([QUrl.fromLocalFile(str(folder))])
    enter = QDragEnterEvent(QPoint(10, 10), Qt.DropAction.CopyAction, md, Qt.MouseButton.LeftButton,
                            Qt.KeyboardModifier.NoModifier)
    win.dragEnterEvent(enter)
    assert enter.isAccepted()
    with qtbot.waitSignal(win.series_opened, timeout=20000):
        win.dropEvent(QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, md, Qt.MouseButton.LeftButton,
                                 Qt.KeyboardModifier.NoModifier))
    assert win.current_series.modality == "CR"
    assert win.settings.recent_paths()[0] == str(folder)
    assert [a.text() for a in win.recent_menu.actions()][0] == str(folder)
    # a new window with the same settings comes back in MPR for CT; opening a study hangs an
    # axial chest CT in lung window (engine.reading.hanging), whatever window was used last
    win.settings.set_layout_mode("mpr")
    win.settings.set_last_window("CT", 40, 400)
    w2 = MainWindow(win.settings)
    qtbot.addWidget(w2)
    w2.open_path(demo_dir / "CT_PHANTOM", wait=True)
    assert w2.image_view.window() == (-600.0, 1500.0)
    qtbot.waitUntil(lambda: w2.layout_mode() == "mpr", timeout=30000)
    w2.close()
    win.settings.set_layout_mode("stack")


def test_zip_and_a_broken_slice_inside_a_ct_series(win, qtbot, demo_dir, tmp_path):
    import zipfile

    # a ZIP is opened like a folder (members addressed as archive.zip::member)
    dx = tmp_path / "dx.dcm"
    _write_dx(dx, rows=64, cols=96, spacing=(0.2, 0.2))
    z = tmp_path / "study.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(dx, "DICOM/IM0001.dcm")
    win.set_layout("stack")
    win.open_path(z, wait=True)
    assert win.current_series is not None and "::" in win.current_series.instances[0].path
    assert win.image_view.current_frame_shape() == (64, 96)
    win.act_tags.trigger()
    qtbot.waitUntil(lambda: win.tag_browser.tree.topLevelItemCount() > 10, timeout=5000)
    assert win.tag_browser.title.text() == "IM0001.dcm"
    win.act_tags.trigger()
    # five CT slices, the middle one with its pixel data cut off: the series still displays,
    # scrolling onto the broken slice says so and keeps the last good image
    folder = tmp_path / "ct5"
    folder.mkdir()
    import pydicom
    from pydicom.uid import generate_uid

    src = sorted((demo_dir / "CT_PHANTOM").glob("*.dcm"))[40:45]
    study, series = generate_uid(), generate_uid()
    for p in src:                                   # a new series (the demo's is already open)
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / p.name)
    bad = folder / src[2].name
    bad.write_bytes(bad.read_bytes()[:-200000])
    win.open_path(folder, wait=True)
    iv = win.image_view
    # headers are fine, so the index keeps all five; the middle one (the first choice) fails to
    # decode and its neighbour is shown instead
    assert win.current_series.count == 5 and iv.current_data() is not None
    assert iv.current_slice() == 1
    messages = []
    iv.load_failed.connect(messages.append)
    iv.set_slice(2)
    assert iv.current_slice() == 1 and "could not be read" in messages[0]
    iv.set_slice(3)
    assert iv.current_slice() == 3
    win.wait_idle()
    assert win.current_volume is None or win.current_volume.hu.shape[0] == 4
