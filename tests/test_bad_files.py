"""Hostile and broken input: every path ends in LoadError (loaders) or FileProblem (index).

Covers zero-length, random bytes, truncation, preamble-less data, a huge declared size (refused
before any allocation) and a deflate bomb (refused while streaming, without inflating it).
"""
from __future__ import annotations

import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, generate_uid)

from engine.dicom.index import index_path
from engine.dicom.display import render_display
from engine.dicom.pixels import load_frame, read_header
from engine.errors import LoadError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns on the broken input


def _image_ds(rows: int = 8, cols: int = 8, pixel_bytes: bytes | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[f"bad-{rows}-{cols}"])
    ds.StudyInstanceUID = ds.SeriesInstanceUID = ds.SOPInstanceUID + ".1"
    ds.Modality = "CT"
    ds.PatientID = "BAD"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixel_bytes if pixel_bytes is not None else np.arange(rows * cols, dtype="<u2").tobytes()
    return ds


def _save(ds: Dataset, path: Path, ts: str = ExplicitVRLittleEndian) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(path, enforce_file_format=True)
    return path


def _both_refuse(path: Path, match: str | None = None) -> None:
    with pytest.raises(LoadError) as e1:
        load_frame(path)
    if match:
        assert match in e1.value.reason.lower(), e1.value.reason
    res = index_path(path)
    assert not res.all_series() or res.problems is not None


def test_zero_length(tmp_path: Path) -> None:
    p = tmp_path / "empty.dcm"
    p.write_bytes(b"")
    with pytest.raises(LoadError, match="empty"):
        read_header(p)
    _both_refuse(p, "empty")
    res = index_path(tmp_path)
    assert [pr.reason for pr in res.problems] == ["empty file (0 bytes)"]


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = tmp_path / "noise.dcm"
    p.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(LoadError):
        load_frame(p)
    res = index_path(p)
    assert not res.all_series() and len(res.problems) == 1
    # random bytes behind a valid 'DICM' marker: still only LoadError / FileProblem
    q = tmp_path / "noise_dicm.dcm"
    q.write_bytes(b"\0" * 128 + b"DICM" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(LoadError):
        load_frame(q)
    index_path(q)  # must not raise


def test_truncated_files(tmp_path: Path, demo_dir: Path) -> None:
    src = (demo_dir / "CT_PHANTOM" / "CT_0050.dcm").read_bytes()
    for n, word in ((len(src) // 2, "truncated"), (len(src) - 7, "truncated"), (300, None), (140, None)):
        p = tmp_path / f"cut{n}.dcm"
        p.write_bytes(src[:n])
        with pytest.raises(LoadError) as e:
            load_frame(p)
        if word:
            assert word in e.value.reason.lower(), e.value.reason
        index_path(p)  # header-only: may list it or not, never raises
    j2k = Path(get_testdata_file("RG1_J2KR.dcm")).read_bytes()  # a truncated JPEG 2000 stream
    p = tmp_path / "cut_j2k.dcm"
    p.write_bytes(j2k[: len(j2k) * 2 // 3])
    with pytest.raises(LoadError):
        load_frame(p)


def test_no_preamble_raw_dataset(tmp_path: Path) -> None:
    ds = _image_ds(4, 5)
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    p = tmp_path / "raw.dcm"
    p.write_bytes(fp.getvalue())
    assert p.read_bytes()[128:132] != b"DICM"
    f = load_frame(p)
    np.testing.assert_array_equal(f.stored, np.arange(20).reshape(4, 5))
    assert read_header(p).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert index_path(p).all_series()[0].count == 1


def test_shared_preamble_less_cr(shared_data: Path) -> None:
    f = load_frame(shared_data / "dicom" / "xray_barre_crmono1chest.dcm")
    assert f.monochrome1 and render_display(f).shape == (440, 440)


def test_huge_declared_size_refused_before_allocation(tmp_path: Path) -> None:
    p = _save(_image_ds(65535, 65535, pixel_bytes=b"\0" * 64), tmp_path / "huge.dcm")
    tracemalloc.start()
    try:
        with pytest.raises(LoadError, match="budget") as e:
            load_frame(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"allocated {peak >> 20} MiB before refusing"
    assert "65535x65535" in e.value.reason
    # the index does not decode, so it lists the image; opening it is what is refused
    assert index_path(p).all_series()[0].rows == 65535


def test_huge_multiframe_declared_size(tmp_path: Path) -> None:
    ds = _image_ds(4096, 4096, pixel_bytes=b"\0" * 64)
    ds.NumberOfFrames = 1000
    p = _save(ds, tmp_path / "frames.dcm")
    with pytest.raises(LoadError, match="budget"):
        load_frame(p)


def test_deflate_bomb_refused_without_inflating(tmp_path: Path) -> None:
    """A small deflated file whose dataset inflates to 128 MiB (PS3.5 A.5 deflate)."""
    ds = _image_ds(8, 8, pixel_bytes=b"")
    del ds.PixelData
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    big = 128 * 2**20
    parts = [comp.compress(body.getvalue() + b"\xe0\x7f\x10\x00OW\0\0" + big.to_bytes(4, "little"))]
    zeros = b"\0" * (1 << 20)
    for _ in range(128):
        parts.append(comp.compress(zeros))
    parts.append(comp.flush())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    p = tmp_path / "bomb.dcm"
    p.write_bytes(head.getvalue() + b"".join(parts))
    assert p.stat().st_size < 2 * 2**20
    tracemalloc.start()
    try:
        with pytest.raises(LoadError, match="bomb"):
            read_header(p)
        with pytest.raises(LoadError, match="bomb"):
            load_frame(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20
    res = index_path(tmp_path)
    assert len(res.problems) == 1 and "bomb" in res.problems[0].reason


def test_real_deflated_file_still_reads() -> None:
    f = load_frame(get_testdata_file("image_dfl.dcm"))
    assert f.values.size > 0


def test_bad_value_and_bad_lengths(tmp_path: Path) -> None:
    ds = _image_ds(8, 8, pixel_bytes=b"\0" * 10)  # pixel data shorter than declared
    with pytest.raises(LoadError, match="truncated|damaged|decode"):
        load_frame(_save(ds, tmp_path / "short.dcm"))
    with pytest.raises(LoadError):
        load_frame(get_testdata_file("badVR.dcm"))
    ds = _image_ds(8, 8)
    ds.BitsAllocated = 13  # impossible
    with pytest.raises(LoadError):
        load_frame(_save(ds, tmp_path / "bits.dcm"))


def test_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="no image"):
        load_frame(get_testdata_file("rtplan.dcm"))
    res = index_path(get_testdata_file("rtplan.dcm"))
    assert res.all_series()[0].modality == "RTPLAN"


def test_missing_file_directory_and_bad_frame(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="not found"):
        load_frame(tmp_path / "missing.dcm")
    with pytest.raises(LoadError):
        load_frame(tmp_path)
    with pytest.raises(LoadError, match="frame"):
        load_frame(get_testdata_file("CT_small.dcm"), frame=-1)
    with pytest.raises(LoadError):
        read_header(f"{tmp_path}/nothing.zip::a.dcm")


def test_mutated_bytes_fuzz(tmp_path: Path) -> None:
    """Flip bytes of a real file 60 times: each read is a Frame or a LoadError, never another error."""
    src = bytearray(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    rng = np.random.default_rng(7)
    outcomes = {"ok": 0, "refused": 0}
    p = tmp_path / "fuzz.dcm"
    for _ in range(60):
        b = bytearray(src)
        for pos in rng.integers(132, 900, size=6):  # the header area, where parsers break
            b[int(pos)] = int(rng.integers(0, 256))
        p.write_bytes(bytes(b))
        try:
            f = load_frame(p)
            render_display(f)
            outcomes["ok"] += 1
        except LoadError:
            outcomes["refused"] += 1
        index_path(p)
    assert outcomes["ok"] + outcomes["refused"] == 60 and outcomes["refused"] > 0
