"""The storage SCP checks every received object before filing it (PS3.4 B.2.3 failure statuses).

Deliberately broken objects are made here from real pydicom test images and sent *as files* with
pynetdicom (``send_c_store(path)`` with ``STORE_SEND_CHUNKED_DATASET`` sends the encoded body as it
is, under the context its meta header names),
the way a faulty modality or gateway sends them: a truncated file, native pixels labelled JPEG
Baseline, a meta header saying Explicit VR over an Implicit VR body, and a corrupt and a
different-but-valid re-send of a stored SOP Instance UID.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE

from engine.interop import received
from engine.interop.netconfig import NetworkSettings
from engine.interop.storage_scp import StorageSCP
from tests.orthanc_server import SECRET_ID, SECRET_NAME, make_sources

pytestmark = pytest.mark.timeout(120)
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def body_bytes(ds: Dataset, implicit: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def part10(ds: Dataset, meta_ts: str, body: bytes) -> bytes:
    """A Part 10 file whose meta header says ``meta_ts`` whatever ``body`` really is."""
    meta = Dataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = meta_ts
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue() + body


@pytest.fixture()
def ct(tmp_path) -> list[Path]:
    return make_sources(tmp_path / "src")["ct"]


@pytest.fixture(autouse=True)
def raw_file_sending(monkeypatch):
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture()
def scp(tmp_path):
    settings = NetworkSettings(ae_title="CVSCP", port=0, bind_address="127.0.0.1", timeout_s=10,
                               allowed_calling_aets=["MODALITY"])
    announced: list[received.StoredInstance] = []
    server = StorageSCP(settings, root=tmp_path / "store", on_stored=announced.append)
    server.start()
    server.announced = announced
    try:
        yield server
    finally:
        server.stop()


class Sender:
    """One association from AE 'MODALITY' to the SCP; ``store(path)`` returns the C-STORE status."""

    def __init__(self, port: int):
        ae = AE(ae_title="MODALITY")
        for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit):
            ae.add_requested_context(CT_STORAGE, ts)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="CVSCP")
        assert self.assoc.is_established

    def store(self, path: Path) -> int:
        return int(self.assoc.send_c_store(path).Status)

    def release(self) -> None:
        self.assoc.release()


def _wait(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_corrupt_objects_are_refused_with_failure_status(scp, ct, tmp_path, caplog):
    ds = pydicom.dcmread(ct[0])
    full = body_bytes(ds, implicit=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    cases = {   # name: (file bytes, expected PS3.4 B.2.3 status)
        "truncated.dcm": (part10(ds, ExplicitVRLittleEndian, full[: len(full) - len(ds.PixelData) // 3]),
                          received.STATUS_NOT_MATCHING),
        "native_labelled_jpeg.dcm": (part10(ds, JPEGBaseline8Bit, full), received.STATUS_NOT_MATCHING),
        "explicit_meta_implicit_body.dcm": (part10(ds, ExplicitVRLittleEndian, body_bytes(ds, implicit=True)),
                                            received.STATUS_CANNOT_UNDERSTAND),
    }
    sender = Sender(scp.port)
    with caplog.at_level(logging.DEBUG):
        for name, (data, status) in cases.items():
            (broken / name).write_bytes(data)
            assert sender.store(broken / name) == status, name
        good = sender.store(ct[1])
    sender.release()
    assert good == 0x0000
    assert [r.path.name for r in scp.stored] == [f"{pydicom.dcmread(ct[1]).SOPInstanceUID}.dcm"]
    files = list((tmp_path / "store").rglob("*.dcm"))
    assert files == [scp.stored[0].path]                          # nothing corrupt was filed
    assert len(scp.handler.refusals) == 3
    reasons = " ".join(r for _, r in scp.handler.refusals)
    assert "promises" in reasons and "not encapsulated" in reasons and "implicit" in reasons
    assert "Refused a received instance" in caplog.text
    for secret in (SECRET_ID, *SECRET_NAME.split("^")):          # reasons, never identifiers
        assert secret not in caplog.text


def test_resend_never_replaces_or_shadows_a_stored_instance(scp, ct, tmp_path):
    from engine.dicom.index import index_path

    sender = Sender(scp.port)
    for p in ct:
        assert sender.store(p) == 0x0000
    ds = pydicom.dcmread(ct[2])
    stored = tmp_path / "store" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    original = stored.read_bytes()
    full = body_bytes(ds, implicit=False)
    corrupt = tmp_path / "corrupt_resend.dcm"
    corrupt.write_bytes(part10(ds, ExplicitVRLittleEndian, full[: len(full) - 9000]))
    assert sender.store(corrupt) == received.STATUS_NOT_MATCHING
    ds.PixelData = (ds.pixel_array + 100).astype(ds.pixel_array.dtype).tobytes()
    changed = tmp_path / "valid_but_different.dcm"
    ds.save_as(changed, enforce_file_format=True)
    assert sender.store(changed) == received.STATUS_DUPLICATE      # conflict reported, not filed
    sender.release()
    assert stored.read_bytes() == original
    assert [c.path for c in scp.handler.conflicts] == [stored]
    assert sorted(p.name for p in stored.parent.iterdir()) == sorted(
        f"{pydicom.dcmread(p).SOPInstanceUID}.dcm" for p in ct)   # one file per instance
    # The browser's index sees the 3-slice series with the good slice, which decodes.
    series = index_path(tmp_path / "store").all_series()
    assert len(series) == 1 and len(series[0].instances) == 3
    np.testing.assert_array_equal(pydicom.dcmread(stored).pixel_array, pydicom.dcmread(ct[2]).pixel_array)


def test_received_studies_are_announced_only_on_release(scp, ct):
    sender = Sender(scp.port)
    for p in ct:
        assert sender.store(p) == 0x0000
    assert len(scp.stored) == 3
    time.sleep(0.3)
    assert scp.announced == []                                    # half a study is never shown
    sender.release()
    assert _wait(lambda: len(scp.announced) == 3)
    # An aborted transfer is filed (each object was valid) but not announced.
    again = Sender(scp.port)
    ds = pydicom.dcmread(ct[0])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    extra = ct[0].parent / "extra.dcm"
    ds.save_as(extra, enforce_file_format=True)
    assert again.store(extra) == 0x0000
    again.assoc.abort()
    time.sleep(0.5)
    assert len(scp.announced) == 3 and len(scp.stored) == 4


def test_received_files_are_readable_by_other_users(scp, ct):
    sender = Sender(scp.port)
    assert sender.store(ct[0]) == 0x0000
    sender.release()
    mode = scp.stored[0].path.stat().st_mode & 0o777
    assert mode == 0o644, oct(mode)


def test_checks_accept_every_real_transfer_syntax(shared_data):
    """No false refusals: every real file of ../shared/data/dicom passes the same checks."""
    files = [p for p in sorted((shared_data / "dicom").rglob("*.dcm")) if p.read_bytes()[128:132] == b"DICM"]
    assert len(files) > 20
    for p in files:
        received.check_file_bytes(p.read_bytes())


def test_checks_accept_pydicom_compressed_files():
    from pydicom.data import get_testdata_file

    for name in ("RG1_J2KI.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_RLE.dcm", "JPEG-lossy.dcm",
                 "MR_small_bigendian.dcm", "image_dfl.dcm", "emri_small_jpeg_2k_lossless.dcm"):
        received.check_file_bytes(Path(get_testdata_file(name)).read_bytes())
