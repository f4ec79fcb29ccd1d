"""The reading room, display part (pytest-qt, offscreen): what a radiologist hits first.

Stale AI after a decode error, CT windows per series, DICOM overlay planes (60xx), slice keys after
a click in a side panel, MPR numbering / slab in mm / interpolated reformats, smoothing when
magnified, default window inside the field of view, cine at the series' frame time, and the
smaller items (angle then drag, flip after rotate, tag dock, colour-bar labels, top finding,
stale corner box, '^' in descriptions, status readout, patient coordinates, no torch at start).
Images are small DICOM files written here (and pydicom's overlay test files).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytestqt")

from PySide6.QtCore import QEvent, QPoint, QPointF, Qt  # noqa: E402
from PySide6.QtGui import QMouseEvent  # noqa: E402
from PySide6.QtTest import QTest  # noqa: E402
from PySide6.QtWidgets import QApplication, QMessageBox  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
XA_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"


# ------------------------------------------------------------------------------------ writers
def _base(sop_class: str, modality: str, patient: str, series_uid: str, study_uid: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName, ds.PatientID = patient, patient.replace("^", "-")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = generate_uid()
    ds.StudyDate, ds.StudyTime = "20240102", "101010"
    ds.SeriesNumber = 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    return ds


def ct_phantom(nz: int = 5, n: int = 64) -> np.ndarray:
    """HU slices: -2000 padding outside a circular field of view, air, a body of soft tissue
    (40 HU) with two lungs (-850 HU); slice k adds 10*k HU inside the body (z gradient)."""
    yy, xx = np.mgrid[0:n, 0:n]
    r = np.hypot(yy - (n - 1) / 2, xx - (n - 1) / 2)
    out = np.full((nz, n, n), -1000, np.int16)
    for k in range(nz):
        s = out[k]
        s[r > n / 2] = -2000
        body = r < n * 0.42
        s[body] = 40 + 10 * k
        lung = body & (np.hypot(yy - n / 2, np.abs(xx - n / 2) - n * 0.18) < n * 0.14)
        s[lung] = -850
    return out


def write_ct(folder: Path, *, nz: int = 5, window: tuple[float, float] | None = None, padding: bool = True,
             patient: str = "CT^A", description: str = "Thorax^AThoraxRoutine", thickness: float = 8.0,
             spacing: float = 0.7, origin: tuple[float, float] = (-100.0, -120.0)) -> str:
    """A CT series (one file per slice, signed HU stored as is); returns its Series Instance UID."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    hu = ct_phantom(nz)
    series_uid, study_uid = generate_uid(), generate_uid()
    for k in range(nz):
        ds = _base(CT_CLASS, "CT", patient, series_uid, study_uid)
        ds.SeriesDescription, ds.StudyDescription = description, description
        ds.BodyPartExamined = "CHEST"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "HU"
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = thickness
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], -200.0 + thickness * k]
        ds.SliceLocation = -200.0 + thickness * k
        if window:
            ds.WindowCenter, ds.WindowWidth = window
        if padding:
            ds.PixelPaddingValue = -2000
        ds.PixelData = hu[k].tobytes()
        ds.save_as(folder / f"ct_{k:03d}.dcm", enforce_file_format=True)
    return series_uid


def write_cr(folder: Path, name: str, patient: str, broken: bool = False) -> str:
    """pydicom-data's RG1_UNCR chest radiograph as a new series; ``broken`` truncates its pixels."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    src = get_testdata_file("RG1_UNCR.dcm")
    if src is None:
        pytest.skip("pydicom-data is not installed")
    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = patient, patient.replace("^", "-")
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / name
    ds.save_as(out)
    if broken:
        data = out.read_bytes()
        out.write_bytes(data[: len(data) // 3])
    return str(ds.SeriesInstanceUID)


def write_xa(folder: Path, frames: int = 12, frame_time: float | None = 33.33,
             vector: list[float] | None = None) -> str:
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    ds = _base(XA_CLASS, "XA", "XA^CINE", generate_uid(), generate_uid())
    ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = 32
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.InstanceNumber = 1
    if frame_time is not None:
        ds.FrameTime = frame_time
    if vector is not None:
        ds.FrameTimeVector = vector
    ds.PixelData = (np.arange(frames * 32 * 32) % 251).astype(np.uint8).tobytes()
    ds.save_as(folder / "xa.dcm", enforce_file_format=True)
    return str(ds.SeriesInstanceUID)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def win(qtbot, tmp_path):
    from viewer.main_window import MainWindow
    from viewer.settings_store import SettingsStore

    s = SettingsStore(tmp_path / "viewer.ini")
    s.set_value("ai/auto_run", False)
    w = MainWindow(s)
    qtbot.addWidget(w)
    w.resize(1400, 900)
    w.show()
    QTest.qWaitForWindowExposed(w)
    w.activateWindow()
    # no thumbnails: not under test here, and a decode finishing after the window is gone
    # would be reported by pytest-qt as an error of whichever test runs then
    w.thumbs.request = lambda series_list: None
    yield w
    if w.ai is not None:
        w.ai.shutdown()
    w.close()


def _view():
    """A bare ImageView on a small array (geometry and rendering tests)."""
    from viewer.view.image_view import ImageView

    iv = ImageView()
    iv.resize(400, 400)
    iv.show()
    QTest.qWaitForWindowExposed(iv)
    return iv


def _mouse(vp, kind, pos: QPoint, button, buttons):
    ev = QMouseEvent(kind, QPointF(pos), QPointF(vp.mapToGlobal(pos)), button, buttons,
                     Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(vp, ev)


def _click(vp, p: QPoint) -> None:
    QTest.qWait(30)
    _mouse(vp, QEvent.Type.MouseButtonPress, p, Qt.MouseButton.LeftButton, Qt.MouseButton.LeftButton)
    QTest.qWait(30)
    _mouse(vp, QEvent.Type.MouseButtonRelease, p, Qt.MouseButton.LeftButton, Qt.MouseButton.NoButton)


def _drag(vp, p1: QPoint, p2: QPoint, steps: int = 6) -> None:
    QTest.qWait(30)
    _mouse(vp, QEvent.Type.MouseButtonPress, p1, Qt.MouseButton.LeftButton, Qt.MouseButton.LeftButton)
    for k in range(1, steps + 1):
        QTest.qWait(30)
        _mouse(vp, QEvent.Type.MouseMove, p1 + (p2 - p1) * (k / steps), Qt.MouseButton.NoButton,
               Qt.MouseButton.LeftButton)
    _mouse(vp, QEvent.Type.MouseButtonRelease, p2, Qt.MouseButton.LeftButton, Qt.MouseButton.NoButton)


def _result_for(series_uid: str):
    from engine.results import Finding, ModelInfo, StudyResult, Validity

    m = ModelInfo("xray-densenet121", "1.0.0", True, "0" * 64, label="ChestView X-ray DenseNet-121 1.0.0 (trained)")
    u = ModelInfo("xray-extra", "0.0.0", False, "0" * 64)
    return StudyResult(study_uid="1.2", series_uid=series_uid, modality="CR", kind="xray",
                       validity=Validity(True), models=[m, u],
                       findings=[Finding("Normal", 0.70, 0.80, False, m.name, m.version),
                                 Finding("COVID-19", 0.60, 0.556, True, m.name, m.version),
                                 Finding("Effusion", 0.95, 0.50, False, u.name, u.version)])


# ------------------------------------------------------------------------------------ 1. stale AI
def test_panel_clears_on_every_selection_and_decode_errors_are_inline(win, qtbot, tmp_path):
    hip = write_cr(tmp_path / "cr", "hip.dcm", "HIP^PATIENT")
    bad = write_cr(tmp_path / "cr", "broken.dcm", "BROKEN^PATIENT", broken=True)
    win.open_path(tmp_path / "cr", wait=True)
    assert win.select_series(hip)
    win.ai.show_result(_result_for(hip))
    assert win.ai.panel.result is not None and win.ai.panel.findings_box.isVisibleTo(win.ai.panel)
    assert win.select_series(bad) is False
    # nothing of the hip is left: no result, no finding rows, no heatmap
    assert win.ai.panel.result is None and win.ai.current_result is None
    assert not win.ai.panel.findings_box.isVisibleTo(win.ai.panel)
    assert win.ai.overlay is None or not win.ai.overlay.is_showing()
    # the error is in the image area and the status bar, and no modal box blocks the window
    iv = win.image_view
    assert iv.current_data() is None and "Could not display" in iv.message
    assert iv.overlay.message.isVisibleTo(iv.overlay) and "broken.dcm" in iv.overlay.message.text()
    assert "broken.dcm" in win.statusBar().currentMessage()
    assert QApplication.activeModalWidget() is None
    assert not [w for w in QApplication.topLevelWidgets() if isinstance(w, QMessageBox) and w.isVisible()]
    # navigation goes on: the next series displays and the message goes away
    assert win.select_series(hip) and iv.current_data() is not None and iv.message == ""
    assert not iv.overlay.message.isVisibleTo(iv.overlay)


# ------------------------------------------------------------------------------------ 2. CT window per series
def test_ct_preset_stays_with_its_series(win, qtbot, tmp_path):
    a = write_ct(tmp_path / "a", window=(40, 400), patient="CT^A")
    b = write_ct(tmp_path / "b", window=(-500, 1400), patient="CT^B")
    win.open_path(tmp_path / "a", wait=True)
    win.open_path(tmp_path / "b", wait=True)
    iv = win.image_view
    assert win.select_series(a) and iv.window() == (40.0, 400.0)
    win.apply_preset(3)                                   # key 3: bone on patient A
    assert iv.window() == (400.0, 1800.0)
    assert win.select_series(b)
    assert iv.window() == (-500.0, 1400.0)               # B opens at its own header window
    assert win.select_series(a)
    assert iv.window() == (400.0, 1800.0)                # A keeps the window chosen on it
    win.wait_idle(30000)


# ------------------------------------------------------------------------------------ 3. overlay planes
def test_overlay_planes_of_pydicom_test_files_decoded_in_the_engine():
    from pydicom.data import get_testdata_file

    from engine.dicom.overlays import compose_rgba, load_overlays

    path = get_testdata_file("examples_overlay.dcm")
    ov = load_overlays(path)
    assert [p.group for p in ov.planes] == [0x6000] and not ov.problems
    p = ov.planes[0]
    assert p.bitmap.shape == (300, 484) and p.origin == (0, 0) and p.kind == "G"
    import pydicom

    expected = pydicom.dcmread(path).overlay_array(0x6000).astype(bool)
    assert np.array_equal(p.bitmap, expected) and expected.sum() > 0
    rgba = compose_rgba(ov.planes, (300, 484))
    assert np.array_equal(rgba[..., 3] > 0, expected)


def test_overlay_planes_are_read_in_the_decoder_child(tmp_path):
    """engine.service.overlay_planes (the viewer's call, from a worker thread) parses the header in
    a sandboxed child and returns the same planes; a file it cannot read gives a problem, not an
    exception."""
    import threading

    from pydicom.data import get_testdata_file

    from engine.dicom.overlays import load_overlays
    from engine.service import overlay_planes

    path = get_testdata_file("examples_overlay.dcm")
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(
        ok=overlay_planes(path), bad=overlay_planes(str(tmp_path / "missing.dcm"))))
    worker.start()
    worker.join(120)
    here = load_overlays(path)
    assert [p.group for p in out["ok"].planes] == [0x6000]
    assert np.array_equal(out["ok"].planes[0].bitmap, here.planes[0].bitmap)
    assert not out["bad"].planes and "not read" in out["bad"].problems[0]


def test_multiframe_overlays_and_activation_layer_order(tmp_path):
    """PS3.3 C.9.3: overlay frames start at Image Frame Origin; C.11.7/C.10.7: layer order."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    from engine.dicom.overlays import overlays_from_dataset

    ds = _base(XA_CLASS, "XA", "OV^MF", generate_uid(), generate_uid())
    ds.NumberOfFrames, ds.Rows, ds.Columns = 4, 8, 8

    def plane(group: int, frames: np.ndarray, origin_frame: int | None, layer: str, pos=(1, 1)):
        from pydicom.pixels.utils import pack_bits

        ds.add_new((group, 0x0010), "US", frames.shape[1])
        ds.add_new((group, 0x0011), "US", frames.shape[2])
        ds.add_new((group, 0x0040), "CS", "G")
        ds.add_new((group, 0x0050), "SS", list(pos))
        ds.add_new((group, 0x0100), "US", 1)
        ds.add_new((group, 0x0102), "US", 0)
        if origin_frame is not None:
            ds.add_new((group, 0x0015), "IS", frames.shape[0])
            ds.add_new((group, 0x0051), "US", origin_frame)
        ds.add_new((group, 0x1001), "CS", layer)
        ds.add_new((group, 0x3000), "OW", pack_bits(frames.astype(np.uint8).ravel()))

    f = np.zeros((2, 8, 8), bool)
    f[0, 0, 0] = True                     # overlay frame 1 -> image frame 2 (0-based 1)
    f[1, 7, 7] = True                     # overlay frame 2 -> image frame 3 (0-based 2)
    plane(0x6000, f, 2, "TOP")
    g = np.zeros((1, 4, 4), bool)
    g[0, 1, 1] = True
    plane(0x6002, g, None, "BOTTOM", pos=(3, 5))   # single frame: every image frame; origin row 3, col 5
    lay = []
    for name, order in (("BOTTOM", 1), ("TOP", 2)):
        it = Dataset()
        it.GraphicLayer, it.GraphicLayerOrder = name, order
        lay.append(it)
    ds.GraphicLayerSequence = lay
    by_frame = {k: overlays_from_dataset(ds, k) for k in range(4)}
    assert [p.group for p in by_frame[0].planes] == [0x6002]
    assert [p.group for p in by_frame[1].planes] == [0x6002, 0x6000]     # bottom layer drawn first
    assert by_frame[1].planes[1].bitmap[0, 0] and not by_frame[1].planes[1].bitmap[7, 7]
    assert by_frame[2].planes[1].bitmap[7, 7] and not by_frame[2].planes[1].bitmap[0, 0]
    assert [p.group for p in by_frame[3].planes] == [0x6002]
    assert by_frame[0].planes[0].origin == (2, 4)


def test_overlay_planes_drawn_over_the_image_and_toggled(win, qtbot, tmp_path, artifacts_dir):
    import shutil

    from pydicom.data import get_testdata_file

    src = get_testdata_file("MR-SIEMENS-DICOM-WithOverlays.dcm")
    if src is None:
        pytest.skip("pydicom-data is not installed")
    (tmp_path / "mr").mkdir()
    shutil.copy(src, tmp_path / "mr" / "mr.dcm")
    win.open_path(tmp_path / "mr", wait=True)
    iv = win.image_view
    layer = iv.overlay_planes
    qtbot.waitUntil(lambda: layer.current is not None, timeout=20000)
    assert layer.plane_names() == ["Siemens MedCom Object Graphics"] and layer.is_showing()
    iv.set_annotations_visible(False)

    def yellow_pixels() -> int:
        img = iv.graphics.grab().toImage().convertToFormat(iv.graphics.grab().toImage().Format.Format_RGB32)
        a = np.frombuffer(img.constBits(), np.uint8).reshape(img.height(), img.bytesPerLine() // 4, 4)
        b, g, r = a[..., 0].astype(int), a[..., 1].astype(int), a[..., 2].astype(int)
        return int(((r > 200) & (g > 200) & (b < 80)).sum())

    assert yellow_pixels() > 100                        # the overlay graphics are on screen
    win.grab().save(str(artifacts_dir / "overlay_planes.png"))
    win.act_overlay_planes.trigger()                     # O: hide
    assert not layer.is_showing() and yellow_pixels() == 0
    win.act_overlay_planes.trigger()
    assert layer.is_showing() and yellow_pixels() > 100
    iv.set_annotations_visible(True)


# ------------------------------------------------------------------------------------ 4. keys after a panel click
def test_slice_keys_work_after_clicking_a_side_panel(win, qtbot, tmp_path):
    uid = write_ct(tmp_path / "ct", nz=6)
    win.open_path(tmp_path / "ct", wait=True)
    assert win.select_series(uid)
    win.wait_idle(30000)
    iv = win.image_view
    box = win.ai.panel.auto_run                          # any widget of a side panel
    QTest.mouseClick(box, Qt.MouseButton.LeftButton)
    box.setFocus()
    qtbot.waitUntil(lambda: QApplication.focusWidget() is box, timeout=3000)
    i0 = iv.current_slice()
    QTest.keyClick(box, Qt.Key.Key_Down)
    assert iv.current_slice() != i0                      # the image moved, not the check box
    QTest.keyClick(box, Qt.Key.Key_Up)
    assert iv.current_slice() == i0
    # a text field keeps its keys
    win.act_tags.trigger()
    search = win.tag_browser.search
    search.setFocus()
    qtbot.waitUntil(lambda: QApplication.focusWidget() is search, timeout=3000)
    QTest.keyClick(search, Qt.Key.Key_Down)
    assert iv.current_slice() == i0


# ------------------------------------------------------------------------------------ 5. MPR
def _volume(nz: int = 30, n: int = 48, dz: float = 8.0, dxy: float = 0.7):
    from engine.dicom.volume import Volume

    hu = (np.arange(nz, dtype=np.float32)[:, None, None] * 10.0 + np.zeros((1, n, n), np.float32))
    return Volume(hu=hu, spacing=(dz, dxy, dxy), origin=(-16.8, -16.8, -100.0),
                  direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), positions=[-100.0 + dz * k for k in range(nz)],
                  instance_paths=[""] * nz, sop_instance_uids=[""] * nz, series_uid="1.2.3", modality="CT")


def test_mpr_numbers_like_the_stack_slab_in_mm_and_interpolated_reformats(qtbot):
    from engine.dicom.series_meta import SeriesMeta
    from viewer.view.image_view import VolumeSource
    from viewer.view.mpr_view import MPRView

    vol = _volume()
    iv = _view()
    qtbot.addWidget(iv)
    iv.set_stack(VolumeSource(vol), SeriesMeta(modality="CT"))
    iv.set_slice(11)
    stack_no = iv.annotation_texts()["bottom_left"].split("Im: ")[1].split("/")[0]
    mpr = MPRView()
    qtbot.addWidget(mpr)
    mpr.set_volume(vol, (11, 24, 24))
    assert f"Axial    {int(stack_no):>4}/30" in mpr.info.text() and stack_no == "19"
    # slab in millimetres: 20 mm on 8 mm slices is 3 slices (24 mm), not 20 voxels
    mpr.mip_box.setChecked(True)
    mpr.slab_spin.setValue(20.0)
    assert mpr.slab_mm == 20.0 and mpr.slab_for("axial") == 3
    assert np.array_equal(mpr.panes["axial"].image_item.image, vol.hu[10:13].max(axis=0))
    assert mpr.slab_for("coronal") == 2 * int(10 / 0.7) + 1          # in-plane spacing 0.7 mm
    assert "Slab MIP 20 mm" in mpr.info.text()
    mpr.mip_box.setChecked(False)
    # reformats interpolated along z: rows at the in-plane spacing, values blend between slices
    cor = mpr.panes["coronal"].image_item.image
    assert cor.shape[0] == round(30 * 8.0 / 0.7)
    col = cor[:, 24]
    steps = np.abs(np.diff(col))
    assert steps.max() <= 10.0 * 0.7 / 8.0 + 1e-3                     # no 10 HU staircase steps
    assert len(np.unique(np.round(col, 3))) > 100
    br = mpr.panes["coronal"].image_item.mapRectToParent(mpr.panes["coronal"].image_item.boundingRect())
    assert br.height() == pytest.approx(30 * 8.0) and br.width() == pytest.approx(48 * 0.7)
    # the crosshair still maps millimetres to voxels
    mpr.pick("coronal", 10.0, 8.0 * 3 + 1.0)
    assert mpr.position[0] == 30 - 1 - 3


# ------------------------------------------------------------------------------------ 6. smoothing
def test_magnified_images_are_smoothed_and_nearest_on_request(qtbot):
    from viewer.view.image_view import ArraySource, SliceData

    iv = _view()
    qtbot.addWidget(iv)
    a = np.indices((16, 16)).sum(axis=0) % 2 * 255.0
    a = a.astype(np.float32)
    iv.set_stack(ArraySource(a, SliceData(values=a, window=(127.5, 256.0))))
    iv.set_annotations_visible(False)

    def levels() -> int:
        img = iv.graphics.grab().toImage()
        c = img.rect().center()
        vals = {img.pixelColor(c.x() + dx, c.y() + dy).red() for dx in range(-40, 40) for dy in range(-40, 40)}
        return len(vals)

    iv.set_zoom(12.0)
    assert iv.smoothing() and levels() > 4 and iv.image_item.last_smoothed
    iv.set_smoothing(False)                     # pixel peeping
    assert levels() <= 2 and iv.image_item.last_smoothed is False
    iv.set_smoothing(True)
    iv.set_zoom(1.0)
    levels()
    assert iv.image_item.last_smoothed is False   # nearest neighbour at 1:1


# ------------------------------------------------------------------------------------ 8. defaults
def test_default_ct_window_ignores_padding_outside_the_field_of_view(win, tmp_path):
    from viewer.view.image_view import default_window

    hu = ct_phantom(1)[0].astype(np.float32)
    for pad in ((-2000.0, None), None):           # from the header, and from the corners alone
        c, w = default_window(hu, pad)
        assert -1000 <= c - w / 2 <= -900 and 40 <= c + w / 2 <= 60, (c, w)
    uid = write_ct(tmp_path / "nowin", window=None)
    win.open_path(tmp_path / "nowin", wait=True)
    assert win.select_series(uid)
    c, w = win.image_view.window()
    assert w < 1200 and c > -700                    # not W3560/L-1244 (padding counted)
    win.wait_idle(30000)


def test_cine_runs_at_the_series_frame_time(win, tmp_path):
    from engine.dicom.series_meta import meta_from_dataset

    uid = write_xa(tmp_path / "xa", frames=12, frame_time=33.33)
    win.open_path(tmp_path / "xa", wait=True)
    assert win.select_series(uid)
    iv = win.image_view
    assert iv.fps == pytest.approx(30.0, abs=0.05)
    assert "Cine 30 fps" in iv.overlay.text("bottom_right")
    iv.start_cine()
    assert iv.cine.interval() == 33 and "▶ Cine 30 fps" in iv.overlay.text("bottom_right")
    iv.stop_cine()
    import pydicom

    ds = pydicom.Dataset()
    ds.FrameTimeVector = [0, 40, 40, 40]
    assert meta_from_dataset(ds).frame_time_ms == pytest.approx(40.0)
    ds = pydicom.Dataset()
    ds.CineRate = 15
    assert meta_from_dataset(ds).cine_rate == 15.0
    uid2 = write_xa(tmp_path / "xa2", frames=4, frame_time=None)
    win.open_path(tmp_path / "xa2", wait=True)
    assert win.select_series(uid2)
    assert iv.fps == pytest.approx(win.settings.cine_fps())   # no frame time: the user's speed


# ------------------------------------------------------------------------------------ 9. smaller items
def test_first_drag_after_an_angle_draws(qtbot):
    from viewer.view.image_view import ArraySource, SliceData

    iv = _view()
    qtbot.addWidget(iv)
    a = np.zeros((128, 128), np.float32)
    iv.set_stack(ArraySource(a, SliceData(values=a, pixel_spacing=(0.5, 0.5), window=(0, 100))))
    vp = iv.graphics.viewport()
    iv.set_tool("angle")
    for p in (QPoint(120, 220), QPoint(200, 220), QPoint(200, 140)):
        _click(vp, p)
    angle = iv.measurements.items[-1]
    assert angle.kind == "angle" and angle.value == pytest.approx(90.0, abs=1.0)
    iv.set_tool("distance")
    _drag(vp, QPoint(200, 140), QPoint(120, 100))        # starts where the angle was finished
    kinds = [m.kind for m in iv.measurements.items]
    assert kinds == ["angle", "distance"]
    assert angle.value == pytest.approx(90.0, abs=1.0)  # the finished angle was not edited
    iv.set_tool("pan")
    assert all(it.isEnabled() for m in iv.measurements.items for it in m.items)   # editable again


def test_flip_after_rotate_flips_on_screen(qtbot):
    from engine.dicom.series_meta import SeriesMeta
    from viewer.view.annotations import edge_letters
    from viewer.view.image_view import ArraySource, SliceData

    iv = _view()
    qtbot.addWidget(iv)
    a = np.zeros((100, 100), np.float32)
    iv.set_stack(ArraySource(a, SliceData(values=a, window=(0, 100))))

    def screen(x: float, y: float) -> QPointF:
        return iv.view_box.mapViewToDevice(iv.content.mapToParent(QPointF(x, y)))

    iv.rotate(90)                                          # R: image top-left -> screen top-right
    tl, br = screen(0, 0), screen(100, 100)
    assert tl.x() > br.x() and tl.y() < br.y()
    iv.set_flip(horizontal=True)                           # H: mirror left-right on screen
    tl, br = screen(0, 0), screen(100, 100)
    assert tl.x() < br.x() and tl.y() < br.y()             # top-left again, not a vertical flip
    iv.rotate(90)                                          # R again turns what is seen clockwise
    tl, br = screen(0, 0), screen(100, 100)
    assert tl.x() > br.x() and tl.y() < br.y()
    meta = SeriesMeta(row_dir=(1, 0, 0), col_dir=(0, 1, 0))   # axial: right = L, down = P
    assert edge_letters(meta, 90, True, False) == {"right": "P", "left": "A", "bottom": "L", "top": "R"}


def test_tag_browser_has_its_own_dock_with_the_value_column_visible(win, tmp_path):
    uid = write_ct(tmp_path / "ct", nz=3)
    win.open_path(tmp_path / "ct", wait=True)
    assert win.select_series(uid)
    win.act_tags.trigger()
    assert win.tags_dock.isVisible() and win.findings_dock.isVisible()
    assert win.tags_dock not in win.tabifiedDockWidgets(win.findings_dock)
    tree = win.tag_browser.tree
    QTest.qWait(50)
    hdr = tree.header()
    x = hdr.sectionViewportPosition(3)
    assert 0 <= x and x + 120 <= tree.viewport().width()      # the Value column is on screen
    assert tree.topLevelItemCount() > 10
    win.wait_idle(30000)


def test_headers_are_read_for_the_tag_browser_only_while_it_is_shown(win, tmp_path, monkeypatch):
    """Every slice change used to read the slice's header 120 ms later (a decoder round trip and a
    pydicom dataset unpickled on the GUI thread) even with the tag browser hidden."""
    import engine.service as service

    uid = write_ct(tmp_path / "ct", nz=3)
    win.open_path(tmp_path / "ct", wait=True)
    assert win.select_series(uid)
    read: list[str] = []
    real = service.header_tree
    monkeypatch.setattr(service, "header_tree", lambda path: read.append(path) or real(path))
    assert not win.tags_dock.isVisible()
    win.image_view.set_slice(1)
    QTest.qWait(300)                                   # past the tags timer
    assert read == []
    win.act_tags.trigger()
    assert len(read) == 1 and win.tag_browser.tree.topLevelItemCount() > 10
    win.act_tags.trigger()
    win.wait_idle(30000)


def test_colorbar_threshold_label_never_overlaps_the_end_marks(qtbot):
    from viewer.view.heatmap_overlay import ColorBar

    cb = ColorBar()
    qtbot.addWidget(cb)
    for width in (140, 220, 320):
        cb.resize(width, 30)
        for t in np.linspace(0.0, 1.0, 101):
            cb.set_threshold(float(t))
            rects = cb.label_rects()
            thr = rects["threshold"][0]
            assert thr.left() >= 0 and thr.right() <= width
            for k in ("zero", "one"):
                if k in rects:
                    assert not rects[k][0].intersects(thr)
    cb.set_threshold(0.5)
    cb.resize(220, 30)
    assert {"zero", "one", "threshold"} <= set(cb.label_rects())   # all three fit at 0.5


def test_worklist_top_finding_is_the_panels_first_row(qtbot):
    from types import SimpleNamespace

    from engine.review.report import build_row
    from viewer.ai.findings_panel import FindingsPanel

    res = _result_for("1.2.3.4")
    panel = FindingsPanel()
    qtbot.addWidget(panel)
    panel.show_result(res)
    first = next(iter(panel.finding_rows))                   # rows in display order
    series = SimpleNamespace(study_uid="1.2", series_uid="1.2.3.4", series_number=1, series_description="",
                             modality="CR", kind="xray", body_part="CHEST", view_position="PA",
                             instances=[], patient_id="P")
    row = build_row(SimpleNamespace(patient_id="P", patient_name="", birth_date=""),
                    SimpleNamespace(study_date="", study_description="", accession_number=""), series, res)
    assert first == "COVID-19" and row["top_label"] == first


def test_shorter_corner_text_leaves_no_stale_box(qtbot):
    from viewer.view.image_view import ArraySource, SliceData

    iv = _view()
    qtbot.addWidget(iv)
    a = np.full((64, 64), 200.0, np.float32)
    iv.set_stack(ArraySource(a, SliceData(values=a, window=(100.0, 200.0))))
    lab = iv.overlay.labels["bottom_right"]
    iv.overlay.set_texts({"bottom_right": "W: 123456789 L: 123456789\nZoom: 1000%\nsome longer line"})
    QTest.qWait(50)
    old = lab.geometry()
    iv.overlay.set_texts({"bottom_right": "W: 1"})
    # at the very next paint the box already has the short text's size
    assert lab.geometry().width() <= lab.sizeHint().width() + 2 and lab.geometry().height() < old.height()
    iv.overlay.repaint()
    img = QApplication.primaryScreen().grabWindow(iv.winId()).toImage()
    p = old.topLeft() + QPoint(8, 8)
    assert img.pixelColor(p).red() > 200                   # the image (white) shows, not a dark box


def test_names_and_caret_descriptions_are_formatted(tmp_path, win):
    import pydicom

    from engine.dicom.series_meta import display_text, meta_from_dataset

    uid = write_ct(tmp_path / "ct", nz=3, patient="DOE^JANE^Q")
    ds = pydicom.dcmread(next((tmp_path / "ct").glob("*.dcm")))
    m = meta_from_dataset(ds)
    assert m.patient_name == "DOE, JANE Q" and m.study_description == "Thorax · AThoraxRoutine"
    assert display_text("^^A^") == "A" and display_text("Plain") == "Plain"
    win.open_path(tmp_path / "ct", wait=True)
    assert win.select_series(uid)
    text = win.image_view.overlay.all_text()
    assert "^" not in text and "Thorax · AThoraxRoutine" in text
    assert "^" not in win.windowTitle() and "^" not in win.ai.panel.series_label.text()
    tree, shown = win.browser.tree, []                   # the study browser: patient, study, series rows
    items = [tree.topLevelItem(i) for i in range(tree.topLevelItemCount())]
    while items:
        it = items.pop()
        shown.append(it.text(0))
        items += [it.child(j) for j in range(it.childCount())]
    assert "Thorax · AThoraxRoutine" in " ".join(shown) and not any("^" in t for t in shown)
    win.wait_idle(30000)


def test_status_readout_follows_the_image_and_uses_patient_coordinates(win, tmp_path):
    uid = write_ct(tmp_path / "ct", nz=4, window=(40, 400), origin=(-100.0, -120.0))
    win.open_path(tmp_path / "ct", wait=True)
    assert win.select_series(uid)
    win.wait_idle(30000)
    iv = win.image_view
    i = iv.current_slice()
    scene = iv.image_item.mapToScene(QPointF(32.5, 32.5))
    iv._on_mouse_moved(scene)
    txt = win.cursor_label.text()
    hu = float(iv.current_values()[32, 32])
    assert f"HU {hu:.0f}" in txt
    z = -200.0 + 8.0 * i
    assert f"patient ({-100 + 32 * 0.7:.1f}, {-120 + 32 * 0.7:.1f}, {z:.1f}) mm" in txt
    j = (i + 1) % iv.n_slices()
    iv.set_slice(j)
    hu2 = float(iv.current_values()[32, 32])
    assert hu2 != hu and f"HU {hu2:.0f}" in win.cursor_label.text()    # not the previous image's value
    assert f"{-200.0 + 8.0 * j:.1f}) mm" in win.cursor_label.text()
    other = write_ct(tmp_path / "ct2", nz=3, window=(40, 400), patient="CT^B")
    win.open_path(tmp_path / "ct2", wait=True)
    assert win.select_series(other)
    assert win.cursor_label.text() == ""                               # nothing from the last image
    win.wait_idle(30000)


# ------------------------------------------------------------------------------------ 10. no torch at start
def test_opening_the_viewer_does_not_import_torch(tmp_path):
    write_cr(tmp_path / "cr", "cr.dcm", "NO^TORCH")
    code = f"""
import os, sys, time
os.environ["QT_QPA_PLATFORM"] = "offscreen"
os.environ["CHESTVIEW_SETTINGS"] = {str(tmp_path / 'viewer.ini')!r}
sys.path.insert(0, {str(REPO)!r})
from viewer.settings_store import SettingsStore
SettingsStore().set_value("ai/auto_run", False)
from viewer.app import create_app
app = create_app()
from viewer.main_window import MainWindow
w = MainWindow()
w.show()
w.open_path({str(tmp_path / 'cr')!r})
t = time.monotonic()
while time.monotonic() - t < 3.0:
    app.processEvents()
    time.sleep(0.01)
w.wait_idle(30000)
assert w.image_view.current_data() is not None, "no image shown"
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "engine.ai.models", "engine.ai.analysis")))
print("IMPORTED", bad)
w.close()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "IMPORTED []" in out.stdout, out.stdout[-2000:]
