"""engine.dicom.index: folders, DICOMDIR, ZIP, grouping, sorting, progress and cancel."""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from engine.demo import phantom as ph
from engine.dicom.index import index_path, sort_instances
from engine.dicom.pixels import load_frame, read_header
from engine.dicom.records import InstanceRecord

SMALL = ph.PhantomGeometry(n_slices=6, size=64, pixel_mm=5.0, slice_mm=10.0, z0_mm=80.0)


@pytest.fixture(scope="module")
def small_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small") / "CT"
    ph.write_phantom_series(out, SMALL, patient_name="DEMO^SMALL", patient_id="DEMO-S")
    return out


def test_shared_folder_grouping_and_problems(shared_data: Path) -> None:
    res = index_path(shared_data / "dicom")
    series = res.all_series()
    lung = [s for s in series if s.count == 64]
    assert len(lung) == 1 and lung[0].modality == "CT" and lung[0].kind == "ct"
    z = [i.image_position[2] for i in lung[0].instances]
    assert z == sorted(z) and z[1] - z[0] == pytest.approx(5.0)
    assert lung[0].rows == lung[0].columns == 512
    # the preamble-less Barre CR is indexed (raw implicit VR dataset)
    barre = [s for s in series if any(i.path.endswith("xray_barre_crmono1chest.dcm") for i in s.instances)]
    assert len(barre) == 1 and barre[0].kind == "xray"
    # non-DICOM files are listed with a reason, nothing is raised
    probs = {Path(p.path).name: p.reason for p in res.problems}
    assert "MANIFEST.csv" in probs and "not a DICOM file" in probs["MANIFEST.csv"]
    assert res.files_seen >= 100 and res.seconds > 0
    # patient/study/series links are consistent for the browser
    for s in series:
        assert res.study_of(s) is not None and res.patient_of(s) is not None


def test_dicomdir_equals_folder_walk(shared_data: Path) -> None:
    d = shared_data / "dicom" / "dicomdir_pydicom"
    via_dir = index_path(d / "DICOMDIR")
    via_walk = index_path(d)
    uids_dir = {s.series_uid: s.count for s in via_dir.all_series()}
    uids_walk = {s.series_uid: s.count for s in via_walk.all_series()}
    assert uids_dir and uids_dir == uids_walk
    assert not [p for p in via_dir.problems]
    names = {p.patient_name for p in via_dir.patients}
    assert {"Doe^Archibald", "Doe^Peter"} <= names
    mods = {s.modality for s in via_dir.all_series()}
    assert {"CT", "MR", "CR"} <= mods


def test_pydicom_dicomdir_package_file() -> None:
    from pydicom.data import get_testdata_file

    p = get_testdata_file("DICOMDIR")
    res = index_path(p)
    assert len(res.all_series()) > 5
    assert all(i.path.startswith(str(Path(p).parent)) for s in res.all_series() for i in s.instances)


def test_zip_archive_members(tmp_path: Path, small_series: Path) -> None:
    from pydicom.data import get_testdata_file

    z = tmp_path / "study.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(small_series.glob("*.dcm")):
            zf.write(p, f"CT/{p.name}")
        zf.write(get_testdata_file("CT_small.dcm"), "other/ct_small.dcm")
        zf.writestr("notes.txt", "not dicom")
        zf.writestr("__MACOSX/._junk", "resource fork")
    res = index_path(z)
    series = res.all_series()
    ct = [s for s in series if s.count == 6]
    assert len(ct) == 1
    member = ct[0].instances[0].path
    assert member.startswith(f"{z}::CT/")
    assert [p.path for p in res.problems] == [f"{z}::notes.txt"]
    # members load through the same address
    assert read_header(member).Modality == "CT"
    f = load_frame(member)
    np.testing.assert_array_equal(f.values, ph.hu_slice(0, SMALL).astype(np.float32))
    # a ZIP inside a folder is indexed too
    (tmp_path / "sub").mkdir()
    shutil.copy(z, tmp_path / "sub" / "copy.zip")
    res2 = index_path(tmp_path / "sub")
    assert sum(s.count for s in res2.all_series()) == 7


def test_zip_bomb_member_refused(tmp_path: Path) -> None:
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("bomb.dcm", "w", force_zip64=True) as fh:
            chunk = b"\0" * (1 << 20)
            for _ in range(80):       # 80 MiB of zeros -> about 80 KiB compressed
                fh.write(chunk)
    res = index_path(z)
    assert not res.all_series()
    assert len(res.problems) == 1 and "bomb" in res.problems[0].reason.lower()


def test_zip_member_declared_too_large(tmp_path: Path) -> None:
    z = tmp_path / "liar.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a.dcm", b"x" * 100)
    raw = bytearray(z.read_bytes())
    cd = raw.rfind(b"PK\x01\x02")               # central directory entry: uncompressed size at +24
    raw[cd + 24:cd + 28] = (3 * 2**30).to_bytes(4, "little")
    z.write_bytes(bytes(raw))
    res = index_path(z)
    assert len(res.problems) == 1 and "MiB" in res.problems[0].reason


def test_damaged_zip_is_a_problem(tmp_path: Path) -> None:
    z = tmp_path / "broken.zip"
    z.write_bytes(b"PK\x03\x04" + b"\0" * 50)
    res = index_path(z)
    assert len(res.problems) == 1 and "ZIP" in res.problems[0].reason


def test_sort_by_position_not_instance_number(tmp_path: Path, small_series: Path) -> None:
    out = tmp_path / "shuffled"
    out.mkdir()
    for k, p in enumerate(sorted(small_series.glob("*.dcm"))):
        ds = pydicom.dcmread(p)
        ds.InstanceNumber = [4, 1, 6, 2, 5, 3][k]
        ds.save_as(out / f"x{ds.InstanceNumber}.dcm", enforce_file_format=True)
    s = index_path(out).all_series()[0]
    z = [i.image_position[2] for i in s.instances]
    assert z == sorted(z)
    assert [i.instance_number for i in s.instances] == [4, 1, 6, 2, 5, 3]


def test_sort_falls_back_to_instance_number() -> None:
    insts = [InstanceRecord(path=f"p{n}", sop_instance_uid=str(n), instance_number=n) for n in (3, 1, 2)]
    assert [i.instance_number for i in sort_instances(insts)] == [1, 2, 3]


def test_duplicates_listed_once(tmp_path: Path, small_series: Path) -> None:
    shutil.copytree(small_series, tmp_path / "a")
    shutil.copytree(small_series, tmp_path / "b")
    res = index_path(tmp_path)
    assert [s.count for s in res.all_series()] == [6]
    assert len(res.problems) == 6 and all("duplicate" in p.reason for p in res.problems)


def test_header_fields_for_the_browser(demo_dir: Path) -> None:
    res = index_path(demo_dir / "CR_CHEST")
    p = res.patients[0]
    st = p.studies[0]
    se = st.series[0]
    assert p.patient_id == "DEMO-CR-001" and p.patient_name == "DEMO^CHEST CR"
    assert st.study_date == "20040826" and st.study_description.startswith("Demo chest")
    assert se.view_position == "PA" and se.series_description == "PA chest (uncompressed)"
    inst = se.instances[0]
    assert (inst.rows, inst.columns) == (1955, 1841) and inst.frames == 1 and inst.instance_number == 1


def test_progress_and_cancel(demo_dir: Path) -> None:
    seen: list[float] = []
    res = index_path(demo_dir / "CT_PHANTOM", progress=lambda f, msg: seen.append(f))
    assert seen and seen[-1] == 1.0 and all(0.0 <= f <= 1.0 for f in seen)
    assert not res.cancelled
    n = {"calls": 0}

    def cancel() -> bool:
        n["calls"] += 1
        return n["calls"] > 10

    part = index_path(demo_dir / "CT_PHANTOM", cancel=cancel)
    assert part.cancelled and 0 < sum(s.count for s in part.all_series()) < 120


def test_missing_path_is_a_problem(tmp_path: Path) -> None:
    res = index_path(tmp_path / "nope")
    assert not res.patients and "not found" in res.problems[0].reason


def _snapshot(res) -> tuple:
    from dataclasses import asdict

    return ([asdict(p) for p in res.patients], sorted((p.path, p.reason) for p in res.problems))


@pytest.mark.parametrize("which", ["pydicom", "pydicom-data", "charsets"])
def test_fast_header_walk_equals_pydicom(which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bounded header walk gives exactly what pydicom's reader gives, on ~240 package files
    (explicit/implicit/big endian, deflate, DICOMDIRs, broken files, private sequences)."""
    import warnings

    from pydicom.data import get_testdata_file

    from engine.dicom import index as idx

    name = "CT_small.dcm" if which == "pydicom" else "RG1_UNCR.dcm"
    root = Path(get_testdata_file(name)).parent
    if which == "charsets":  # ISO 2022 / GB18030 / UTF-8 names: the walk must defer to pydicom
        root = Path(pydicom.__file__).parent / "data" / "charset_files"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = idx.index_path(root)
        monkeypatch.setattr(idx, "USE_FAST_PATH", False)
        slow = idx.index_path(root)
    assert fast.files_seen == slow.files_seen > (10 if which == "charsets" else 50)
    assert _snapshot(fast) == _snapshot(slow)


def test_fast_header_walk_equals_pydicom_on_shared(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.dicom import index as idx

    fast = idx.index_path(shared_data / "dicom")
    monkeypatch.setattr(idx, "USE_FAST_PATH", False)
    assert _snapshot(fast) == _snapshot(idx.index_path(shared_data / "dicom"))
