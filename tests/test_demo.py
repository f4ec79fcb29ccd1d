"""The demo study set and the synthetic CT phantom: determinism, HU values, geometry, truth."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from engine.demo import phantom as ph
from engine.dicom.index import index_path

SMALL = ph.PhantomGeometry(n_slices=8, size=128, pixel_mm=2.8, slice_mm=10.0, z0_mm=60.0)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.dcm"))}


def test_phantom_series_is_byte_identical_when_rebuilt(tmp_path: Path) -> None:
    a = ph.write_phantom_series(tmp_path / "a", SMALL)
    b = ph.write_phantom_series(tmp_path / "b", SMALL)
    assert len(a) == len(b) == 8
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    c = ph.write_phantom_series(tmp_path / "c", SMALL, seed=ph.SEED + 1)
    assert _digest(tmp_path / "c") != _digest(tmp_path / "a")  # the seed matters
    np.testing.assert_array_equal(ph.hu_slice(3, SMALL), ph.hu_slice(3, SMALL))


def test_phantom_hu_values_per_tissue() -> None:
    g = ph.PhantomGeometry()
    k = ph.phantom_truth(g).lesion_slices[len(ph.phantom_truth(g).lesion_slices) // 2]
    lab, hu = ph.label_slice(k, g), ph.hu_slice(k, g).astype(np.float64)
    expect = {ph.L_AIR: (-1000, 8), ph.L_LUNG: (-850, 8), ph.L_FAT: (-100, 8), ph.L_SOFT: (40, 8),
              ph.L_BONE: (700, 10), ph.L_GGO: (-500, 15), ph.L_CONS: (20, 8), ph.L_VESSEL: (40, 10)}
    for code, (mean, tol) in expect.items():
        m = lab == code
        assert m.sum() > 20, f"label {code} absent from slice {k}"
        assert abs(hu[m].mean() - mean) < tol, (code, hu[m].mean())
    # noise is present but does not push lung parenchyma across the -320 HU lung threshold
    assert 5 < hu[lab == ph.L_LUNG].std() < 20
    assert hu[lab == ph.L_LUNG].max() < -320


def test_phantom_has_airways_and_lungs_in_the_right_places() -> None:
    g = ph.PhantomGeometry()
    top = ph.label_slice(g.n_slices - 4, g)          # above the lung apices: trachea only
    assert (top == ph.L_AIRWAY).sum() > 300 and (top == ph.L_LUNG).sum() == 0
    mid = ph.label_slice(60, g)
    cols = np.nonzero((mid == ph.L_LUNG).any(axis=0))[0]
    centre = g.size // 2
    assert cols.min() < centre - 100 and cols.max() > centre + 100  # two lungs either side
    assert (mid[:, centre - 10:centre + 10] == ph.L_LUNG).sum() == 0  # mediastinum between
    assert (ph.label_slice(0, g) == ph.L_LUNG).sum() == 0  # below the diaphragm


def test_phantom_truth_is_plausible_and_matches_a_threshold() -> None:
    g = ph.PhantomGeometry()
    t = ph.phantom_truth(g)
    assert 3000 < t.lung_ml < 6500
    assert t.right_lung_ml > t.left_lung_ml  # cardiac notch
    assert t.lung_ml == pytest.approx(t.right_lung_ml + t.left_lung_ml)
    assert t.ggo_ml > 20 and t.consolidation_ml > 10 and 5 < t.airway_ml < 60
    assert t.voxel_mm == (2.5, 0.7, 0.7) and t.n_slices == 120
    # count HU < -320 inside the body on the real HU data: equals lung air + airways
    x, y = ph._grid(g.size, g.pixel_mm)
    inside = ((x / 160.0) ** 2 + ((y - 8.0) / 113.0) ** 2) <= 1.0
    vox = g.pixel_mm ** 2 * g.slice_mm / 1000.0
    n = sum(int(((ph.hu_slice(k, g) < -320) & inside).sum()) for k in range(0, g.n_slices, 3))
    estimate = n * 3 * vox
    assert estimate == pytest.approx(t.lung_air_ml + t.airway_ml, rel=0.05)


def test_demo_contents(demo_dir: Path) -> None:
    res = index_path(demo_dir)
    assert not res.problems, res.problems
    names = sorted(p.patient_name for p in res.patients)
    assert names == ["DEMO^CHEST CR", "DEMO^CHEST CT", "DEMO^TIBIA CR"]
    by_name = {p.patient_name: p for p in res.patients}
    cr = by_name["DEMO^CHEST CR"].studies
    assert len(cr) == 1 and [s.series_number for s in cr[0].series] == [1, 2, 3]
    assert all(s.kind == "xray" and s.body_part == "CHEST" for s in cr[0].series)
    ts = {s.instances[0].transfer_syntax for s in cr[0].series}
    assert ts == {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
    tib = by_name["DEMO^TIBIA CR"].studies[0].series[0]
    assert tib.body_part == "EXTREMITY"
    ct = by_name["DEMO^CHEST CT"].studies[0].series
    assert len(ct) == 1 and ct[0].kind == "ct" and ct[0].count == 120
    zs = [i.image_position[2] for i in ct[0].instances]
    assert zs == sorted(zs) and zs[1] - zs[0] == pytest.approx(2.5)


def test_demo_files_are_valid_part10_with_new_uids(demo_dir: Path) -> None:
    from pydicom.data import get_testdata_file

    src = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    cr = pydicom.dcmread(demo_dir / "CR_CHEST" / "CR_01_UNCR.dcm")  # no force: valid Part 10
    assert cr.preamble == b"\0" * 128
    assert cr.SOPInstanceUID != src.SOPInstanceUID and cr.StudyInstanceUID != src.StudyInstanceUID
    assert cr.file_meta.MediaStorageSOPInstanceUID == cr.SOPInstanceUID
    assert not any(e.tag.is_private for e in cr.iterall())
    np.testing.assert_array_equal(cr.pixel_array, pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")).pixel_array)
    ct = pydicom.dcmread(demo_dir / "CT_PHANTOM" / "CT_0060.dcm")
    assert ct.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ct.Modality == "CT"
    assert ct.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert (ct.Rows, ct.Columns) == (512, 512)
    assert [float(v) for v in ct.PixelSpacing] == [0.7, 0.7]
    assert float(ct.SliceThickness) == float(ct.SpacingBetweenSlices) == 2.5
    assert float(ct.RescaleSlope) == 1 and float(ct.RescaleIntercept) == -1024
    assert [float(v) for v in ct.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(ct.ImagePositionPatient[2]) == pytest.approx(59 * 2.5)
    np.testing.assert_array_equal(ct.pixel_array.astype(np.int32) - 1024, ph.hu_slice(59))
    assert ct.PatientName.family_name == "DEMO"


def test_ensure_demo_builds_once_and_rebuilds_when_incomplete(tmp_path: Path, demo_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.demo import studies as demo

    monkeypatch.setenv("CHESTVIEW_HOME", str(tmp_path / "home"))
    calls = []

    def fake_build(out: Path) -> Path:  # copy the session's demo instead of re-rendering it
        calls.append(out)
        shutil.copytree(demo_dir, out, dirs_exist_ok=True)
        return out

    monkeypatch.setattr(demo, "build_demo", fake_build)
    root = demo.ensure_demo()
    assert root == tmp_path / "home" / "demo" and demo.demo_complete(root) and len(calls) == 1
    assert demo.ensure_demo() == root and len(calls) == 1          # no rebuild when complete
    os.remove(root / "CT_PHANTOM" / "CT_0007.dcm")                  # damage it
    assert not demo.demo_complete(root)
    demo.ensure_demo()
    assert len(calls) == 2 and demo.demo_complete(root)
    demo.ensure_demo(rebuild=True)
    assert len(calls) == 3
    assert not list((tmp_path / "home").glob(".demo-*"))            # no temp folders left


def test_killed_build_leaves_no_half_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.demo import studies as demo

    monkeypatch.setenv("CHESTVIEW_HOME", str(tmp_path / "home"))

    def dying_build(out: Path) -> Path:
        (out / "CR_CHEST").mkdir(parents=True)
        (out / "CR_CHEST" / "half.dcm").write_bytes(b"\0" * 10)
        raise KeyboardInterrupt  # as if the process were stopped mid-build

    monkeypatch.setattr(demo, "build_demo", dying_build)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo()
    assert not (tmp_path / "home" / "demo").exists()
    assert not list((tmp_path / "home").glob(".demo-*"))
