"""Viewer pure logic: measurement math, annotations/orientation letters, settings, thumbnails, image
view rendering on numpy arrays (no DICOM files needed)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine.dicom.series_meta import SeriesMeta
from viewer.view.annotations import corner_texts, direction_letters, edge_letters
from viewer.view.measurements import angle_deg, distance_mm, ellipse_mask, rect_mask, roi_stats


def test_distance_uses_row_and_column_spacing():
    # (row_mm, col_mm) = (0.5, 0.25): 40 columns = 10 mm, 20 rows = 10 mm
    assert distance_mm((0, 0), (40, 0), (0.5, 0.25)) == pytest.approx(10.0)
    assert distance_mm((0, 0), (0, 20), (0.5, 0.25)) == pytest.approx(10.0)
    assert distance_mm((0, 0), (40, 20), (0.5, 0.25)) == pytest.approx(math.sqrt(200))
    assert distance_mm((0, 0), (3, 4), None) == pytest.approx(5.0)   # pixels without spacing


def test_angle_is_physical_not_pixel():
    assert angle_deg((10, 0), (0, 0), (0, 10), (1.0, 1.0)) == pytest.approx(90.0)
    # 1 px right vs 1 px down+right with rows 2 mm, cols 1 mm: atan(2/1)
    assert angle_deg((1, 0), (0, 0), (1, 1), (2.0, 1.0)) == pytest.approx(math.degrees(math.atan(2.0)))
    assert angle_deg((1, 0), (0, 0), (-1, 0), None) == pytest.approx(180.0)


def test_roi_masks_and_stats():
    values = np.zeros((100, 100), np.float32)
    values[:, 50:] = 100.0
    m = rect_mask(values.shape, 40, 0, 20, 10)           # columns 40..59, rows 0..9
    assert m.sum() == 200
    st = roi_stats(values, m, 20 * 10, (0.5, 0.5))
    assert st.mean == pytest.approx(50.0) and st.sd == pytest.approx(50.0)
    assert (st.min, st.max) == (0.0, 100.0)
    assert st.area_mm2 == pytest.approx(50.0)
    e = ellipse_mask((200, 200), 0, 0, 200, 200)
    assert e.sum() == pytest.approx(math.pi * 100 ** 2, rel=0.01)
    assert roi_stats(values, np.zeros_like(m), 0, None) is None


def test_orientation_letters_follow_rotation_and_flip():
    meta = SeriesMeta(row_dir=(1, 0, 0), col_dir=(0, 1, 0))       # axial: +x = L, +y = P
    assert direction_letters((1, 0, 0)) == "L" and direction_letters((0, 0, -1)) == "F"
    e = edge_letters(meta)
    assert (e["left"], e["right"], e["top"], e["bottom"]) == ("R", "L", "A", "P")
    e = edge_letters(meta, rotation=90)                               # clockwise: top goes right
    assert (e["right"], e["top"]) == ("A", "R")
    e = edge_letters(meta, flip_h=True)
    assert (e["left"], e["right"]) == ("L", "R")
    pa = SeriesMeta(patient_orientation=("L", "F"))                   # PA chest (0020,0020)
    assert edge_letters(pa)["left"] == "R" and edge_letters(pa)["top"] == "H"


def test_corner_texts_content():
    meta = SeriesMeta(patient_name="DOE, JANE", patient_id="X1", study_date="2026-01-01",
                      modality="CT", series_number="3", series_description="Lung 1mm", slice_thickness=1.0)
    t = corner_texts(meta, slice_index=4, n_slices=10, position=-12.5, center=-600, width=1500,
                     zoom=2.0, rows=512, cols=512, spacing=(0.7, 0.7), is_volume_ct=True)
    assert "DOE, JANE" in t["top_left"] and "2026-01-01" in t["top_right"]
    assert "Im: 5/10" in t["bottom_left"] and "Pos: -12.5 mm" in t["bottom_left"]
    assert "Thk: 1 mm" in t["bottom_left"]
    assert t["bottom_right"].splitlines() == ["W: 1500 L: -600", "Zoom: 200%"]


def test_settings_store_roundtrip(tmp_path):
    from viewer.settings_store import SettingsStore

    s = SettingsStore(tmp_path / "v.ini")
    s.set_last_window("ct", 40, 400)
    for i in range(12):
        s.add_recent(f"/data/study{i}")
    s.set_layout_mode("mpr")
    s.sync()
    s2 = SettingsStore(tmp_path / "v.ini")
    assert s2.last_window("CT") == (40.0, 400.0)
    assert s2.last_window("MR") is None
    assert s2.recent_paths()[0] == "/data/study11" and len(s2.recent_paths()) == 10
    assert s2.layout_mode() == "mpr"


def test_default_settings_never_user_file_under_pytest(monkeypatch):
    from viewer.settings_store import default_settings_path

    monkeypatch.delenv("CHESTVIEW_SETTINGS", raising=False)
    assert "chestview-test-settings" in default_settings_path().name


def test_image_view_levels_match_dicom_linear_voi(qtbot):
    """Rendered 8-bit pixels equal PS3.3 C.11.2.1.2.1 LINEAR windowing (MONOCHROME1 inverted)."""
    from viewer.view.image_view import ArraySource, ImageView, SliceData

    iv = ImageView()
    qtbot.addWidget(iv)
    vals = np.linspace(-1200, 800, 64 * 64, dtype=np.float32).reshape(64, 64)
    iv.set_stack(ArraySource(vals[None], SliceData(values=vals, modality="CT", window=(-600, 1500))))
    c, w = 40.0, 400.0
    iv.set_window(c, w)
    got = iv.rendered_image().astype(int)
    y = np.clip((vals - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255
    assert np.abs(got - y).max() <= 1.0
    assert got[0, 0] == 0 and got[-1, -1] == 255
    iv.set_stack(ArraySource(vals[None], SliceData(values=vals, monochrome1=True, window=(c, w))))
    assert iv.rendered_image()[0, 0] == 255                          # MONOCHROME1: low = white
    iv.toggle_invert()
    assert iv.rendered_image()[0, 0] == 0


def test_thumbnail_downscale_keeps_aspect_and_range():
    from engine.dicom.safe_decode import box_downscale as downscale
    from viewer.browse.thumbnails import to_qimage

    img = np.zeros((300, 150), np.uint8)
    img[:, 75:] = 255
    th = downscale(img, 96)
    assert th.shape == (75, 37) or th.shape == (75, 38)
    assert th[:, 0].max() == 0 and th[:, -1].min() == 255
    q = to_qimage(th)
    assert (q.width(), q.height()) == (th.shape[1], th.shape[0])


def test_voi_lut_sequence_is_the_default_display_until_the_user_windows(qtbot):
    """PS3.3 C.11.2.1.1: a VOI LUT Sequence default is shown through the table, not a window."""
    from viewer.view.image_view import ArraySource, ImageView, SliceData

    iv = ImageView()
    qtbot.addWidget(iv)
    vals = np.arange(0, 1024, dtype=np.float32).reshape(32, 32)
    lut = np.sqrt(np.linspace(0, 1, 1024)).astype(np.float32)        # a non-linear table
    sd = SliceData(values=vals, window=(512.0, 1024.0), voi_lut=(0.0, lut), voi_lut_default=True)
    iv.set_stack(ArraySource(vals[None], sd))
    assert iv.use_voi_lut and "VOI LUT" in iv.annotation_texts()["bottom_right"]
    got = iv.rendered_image().astype(float)
    assert np.abs(got - lut[vals.astype(int)] * 255).max() <= 1.0
    iv.set_window(512, 1024)                                          # user W/L: linear again
    assert not iv.use_voi_lut
    lin = iv.rendered_image().astype(float)
    assert np.abs(lin - np.clip((vals - 511.5) / 1023 + 0.5, 0, 1) * 255).max() <= 1.0
    iv.apply_preset(0)
    assert iv.use_voi_lut
