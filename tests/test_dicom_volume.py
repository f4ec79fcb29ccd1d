"""engine.dicom.volume: real CT series geometry, the phantom, and every geometry warning."""
from __future__ import annotations

import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest

from engine.demo import phantom as ph
from engine.dicom.index import index_path
from engine.dicom.records import SeriesRecord
from engine.dicom.volume import load_volume
from engine.errors import AnalysisCancelled, LoadError

SMALL = ph.PhantomGeometry(n_slices=6, size=64, pixel_mm=5.0, slice_mm=10.0, z0_mm=80.0)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vol") / "CT"
    ph.write_phantom_series(out, SMALL)
    return out


def variant(tmp: Path, src: Path, edit: Callable[[int, pydicom.Dataset], bool | None]) -> SeriesRecord:
    """Copy the small series through ``edit(k, ds)`` (return False to drop a slice); index it."""
    out = tmp / "variant"
    out.mkdir()
    for k, p in enumerate(sorted(src.glob("*.dcm"))):
        ds = pydicom.dcmread(p)
        if edit(k, ds) is False:
            continue
        ds.save_as(out / p.name, enforce_file_format=True)
    series = index_path(out).all_series()
    assert len(series) == 1
    return series[0]


def test_real_64_slice_series(shared_data: Path) -> None:
    s = index_path(shared_data / "dicom" / "ct_lungpetctdx_1").all_series()[0]
    v = load_volume(s)
    assert v.hu.shape == (64, 512, 512) and v.hu.dtype == np.int16
    assert v.spacing == pytest.approx((5.0, 0.8418, 0.8418), abs=1e-3)
    assert v.positions == sorted(v.positions) and len(v.positions) == 64
    assert v.positions[-1] - v.positions[0] == pytest.approx(63 * 5.0)
    assert v.direction[6:] == pytest.approx((0, 0, 1))
    assert v.origin[2] == pytest.approx(v.positions[0])
    assert not v.warnings, v.warnings
    assert len(v.instance_paths) == len(v.sop_instance_uids) == 64
    # HU sanity: air around the patient, soft tissue and lung present
    assert -1100 < np.median(v.hu[:, :20, :20]) < -900
    mid = v.hu[32]
    assert ((mid > 0) & (mid < 80)).mean() > 0.05 and ((mid < -700) & (mid > -950)).mean() > 0.02
    # the slice order agrees with each file's own position
    z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in v.instance_paths[:3]]
    assert z == sorted(z)


def test_demo_phantom_volume_is_exact(demo_dir: Path) -> None:
    s = index_path(demo_dir / "CT_PHANTOM").all_series()[0]
    v = load_volume(s)
    assert v.hu.dtype == np.int16 and v.hu.shape == (120, 512, 512)
    assert v.spacing == (2.5, 0.7, 0.7) and v.window == (-600.0, 1500.0)
    for k in (0, 47, 119):
        np.testing.assert_array_equal(v.hu[k], ph.hu_slice(k))
    assert not v.warnings and v.modality == "CT" and v.series_uid == s.series_uid
    assert v.slice_thickness == 2.5 and v.voxel_ml == pytest.approx(2.5 * 0.49 / 1000)


def test_gap_warning(tmp_path: Path, small_dir: Path) -> None:
    v = load_volume(variant(tmp_path, small_dir, lambda k, ds: k != 3))
    assert v.hu.shape[0] == 5 and v.spacing[0] == pytest.approx(10.0)
    assert any("gap" in w and "1 slice" in w for w in v.warnings), v.warnings


def test_non_uniform_spacing_warning(tmp_path: Path, small_dir: Path) -> None:
    def edit(k: int, ds: pydicom.Dataset) -> None:
        if k == 2:
            ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                                       float(ds.ImagePositionPatient[2]) + 2.0]
    v = load_volume(variant(tmp_path, small_dir, edit))
    assert any("non-uniform" in w for w in v.warnings), v.warnings


def test_mixed_orientation_left_out(tmp_path: Path, small_dir: Path) -> None:
    def edit(k: int, ds: pydicom.Dataset) -> None:
        if k == 4:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    v = load_volume(variant(tmp_path, small_dir, edit))
    assert v.hu.shape[0] == 5
    assert any("orientation" in w for w in v.warnings), v.warnings


def test_gantry_tilt_and_shear_warnings(tmp_path: Path, small_dir: Path) -> None:
    def tilt(k: int, ds: pydicom.Dataset) -> None:
        ds.GantryDetectorTilt = 12
    v = load_volume(variant(tmp_path, small_dir, tilt))
    assert any("tilt" in w for w in v.warnings)

    def shear(k: int, ds: pydicom.Dataset) -> None:
        ipp = [float(x) for x in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1] + 2.0 * k, ipp[2]]
    (tmp_path / "variant").rename(tmp_path / "v1")
    v = load_volume(variant(tmp_path, small_dir, shear))
    assert any("sideways" in w for w in v.warnings), v.warnings


def test_missing_positions_use_instance_numbers(tmp_path: Path, small_dir: Path) -> None:
    def edit(k: int, ds: pydicom.Dataset) -> None:
        del ds.ImagePositionPatient
    v = load_volume(variant(tmp_path, small_dir, edit))
    assert v.hu.shape[0] == 6 and v.spacing[0] == 10.0
    assert any("positions missing" in w for w in v.warnings)
    np.testing.assert_array_equal(v.hu[2], ph.hu_slice(2, SMALL))


def test_missing_instance_numbers_warning(tmp_path: Path, small_dir: Path) -> None:
    def edit(k: int, ds: pydicom.Dataset) -> None:
        ds.InstanceNumber = k + 1 if k < 3 else k + 4  # 1,2,3,7,8,9 at uniform positions
    v = load_volume(variant(tmp_path, small_dir, edit))
    assert any("instance numbers" in w for w in v.warnings), v.warnings


def test_multiple_series_and_other_sizes(tmp_path: Path, small_dir: Path, demo_dir: Path) -> None:
    a = index_path(small_dir).all_series()[0]
    other = index_path(demo_dir / "CT_PHANTOM").all_series()[0]
    mixed = replace(a, instances=a.instances + other.instances[:2])
    v = load_volume(mixed)  # the 512x512 slices are the odd ones out here
    assert v.hu.shape == (6, 64, 64)
    assert any("size other than" in w for w in v.warnings)

    def edit(k: int, ds: pydicom.Dataset) -> None:
        if k == 5:
            ds.SeriesInstanceUID = "1.2.3.4"
    out = tmp_path / "two"
    out.mkdir()
    for k, p in enumerate(sorted(small_dir.glob("*.dcm"))):
        ds = pydicom.dcmread(p)
        edit(k, ds)
        ds.save_as(out / p.name, enforce_file_format=True)
    series = index_path(out).all_series()
    assert len(series) == 2
    both = replace(series[0], instances=series[0].instances + series[1].instances)
    v = load_volume(both)
    assert any("different series" in w for w in v.warnings)


def test_rescale_slope_gives_float_hu(tmp_path: Path, small_dir: Path) -> None:
    def edit(k: int, ds: pydicom.Dataset) -> None:
        ds.RescaleSlope = 0.5
    v = load_volume(variant(tmp_path, small_dir, edit))
    assert v.hu.dtype == np.float32
    stored = ph.hu_slice(1, SMALL).astype(np.float32) + 1024
    np.testing.assert_allclose(v.hu[1], stored * 0.5 - 1024)


def test_volume_from_zip_members(tmp_path: Path, small_dir: Path) -> None:
    z = tmp_path / "ct.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(small_dir.glob("*.dcm")):
            zf.write(p, p.name)
    v = load_volume(index_path(z).all_series()[0])
    assert v.hu.shape == (6, 64, 64) and v.instance_paths[0].startswith(f"{z}::")


def test_budget_cancel_and_errors(small_dir: Path) -> None:
    s = index_path(small_dir).all_series()[0]
    with pytest.raises(LoadError, match="budget"):
        load_volume(s, budget_bytes=10_000)
    with pytest.raises(AnalysisCancelled):
        load_volume(s, cancel=lambda: True)
    with pytest.raises(LoadError):
        load_volume(replace(s, instances=[]))
    broken = replace(s, instances=[replace(i, path=i.path + ".missing") for i in s.instances])
    with pytest.raises(LoadError):
        load_volume(broken)
    seen: list[float] = []
    load_volume(s, progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0


def test_peak_memory_is_about_one_volume(demo_dir: Path) -> None:
    """Slices are decoded into a preallocated array: no second copy of the volume."""
    import tracemalloc

    s = index_path(demo_dir / "CT_PHANTOM").all_series()[0]
    tracemalloc.start()
    try:
        v = load_volume(s)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.25 * v.hu.nbytes, (peak >> 20, v.hu.nbytes >> 20)


def test_enhanced_multiframe_ct() -> None:
    """Enhanced CT (PS3.3 A.38): per-frame positions and shared functional groups."""
    from pydicom.data import get_testdata_file

    from engine.dicom.pixels import load_frame

    p = get_testdata_file("eCT_Supplemental.dcm")
    f = load_frame(p, 1)
    assert (f.rescale_slope, f.rescale_intercept) == (1.0, -1024.0)   # PixelValueTransformation
    assert f.window == (49.0, 102.0)                                    # FrameVOILUT
    assert f.spacing_source == "PixelSpacing (functional group)"
    v = load_volume(index_path(p).all_series()[0])
    assert v.hu.shape == (2, 512, 512) and v.positions == [149.0, 159.0]
    assert v.spacing[0] == 10.0 and v.hu.min() == -1024
