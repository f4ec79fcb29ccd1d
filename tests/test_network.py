"""DICOM networking against a real Orthanc (Debian package) and our own SCP/SCU, incl. TLS.

Orthanc is installed with apt-get when missing and started on loopback with a temp config; the
tests skip cleanly where that is impossible. Sources are pydicom's RG1 chest CR and CT slices
made from CT_small.dcm (tests.orthanc_server.make_sources).
"""
from __future__ import annotations

import io
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from engine.interop import network as net
from engine.interop.netconfig import NetworkSettings, Peer, TLSSettings, load_settings, save_settings
from engine.interop.received import file_instance
from engine.interop.storage_scp import StorageSCP
from tests.orthanc_server import SECRET_ID, SECRET_NAME, OrthancServer, ensure_orthanc, make_sources

pytestmark = pytest.mark.timeout(300)


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, list[Path]]:
    return make_sources(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, sources):
    """(settings, peer, orthanc, scp): Orthanc with our SCP registered as a move destination,
    holding the CR and the CT study (sent by our own C-STORE SCU)."""
    exe = ensure_orthanc()
    if exe is None:
        pytest.skip("Debian 'orthanc' is not installed and cannot be installed here (needs root + apt)")
    work = tmp_path_factory.mktemp("orthanc")
    settings = NetworkSettings(ae_title="CHESTVIEW", port=0, bind_address="127.0.0.1", timeout_s=20,
                               allowed_calling_aets=["ORTHANC"])
    scp = StorageSCP(settings, root=work / "scp_store")
    scp.start()
    orthanc = OrthancServer(exe, work / "pacs", modalities={"chestview": ("CHESTVIEW", "127.0.0.1", scp.port)})
    try:
        orthanc.start()
        peer = Peer(name="Test PACS", ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port)
        settings.peers = [peer]
        res = net.send(settings, peer, sources["cr"] + sources["ct"])
        assert res.ok and len(res.sent) == 4, res.failed
        yield settings, peer, orthanc, scp
    finally:
        orthanc.stop()
        scp.stop()


def _pixels(path_or_ds) -> np.ndarray:
    ds = path_or_ds if isinstance(path_or_ds, pydicom.Dataset) else pydicom.dcmread(path_or_ds)
    return ds.pixel_array


# --------------------------------------------------------------------------------------------
# settings and filing (no network)
# --------------------------------------------------------------------------------------------
def test_settings_roundtrip_and_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("CHESTVIEW_HOME", str(tmp_path))
    assert load_settings().ae_title == "CHESTVIEW"          # defaults before anything is saved
    s = NetworkSettings(ae_title="WS1", port=11113, allowed_calling_aets=["MODALITY1"],
                        peers=[Peer("PACS", "PACSAE", "pacs.example", 104, tls=True, retrieve="C-GET")])
    path = save_settings(s)
    assert path == tmp_path / "network.json"
    back = load_settings()
    assert back == s
    assert back.effective_allow_list() == ["MODALITY1", "PACSAE"]
    with pytest.raises(ValueError, match="longer than 16"):
        save_settings(NetworkSettings(ae_title="X" * 17))
    with pytest.raises(ValueError, match="outside 1-65535"):
        save_settings(NetworkSettings(port=70000))
    with pytest.raises(ValueError, match="no certificate"):
        save_settings(NetworkSettings(tls=TLSSettings(enabled=True)))
    (tmp_path / "network.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        load_settings()


def test_file_instance_is_atomic_and_never_overwrites(tmp_path, sources):
    """One file per SOP Instance UID: a different data set under a stored, valid UID is not filed
    (it used to be stored beside it as ``<SOP>.<sha8>.dcm`` and could shadow it in the index)."""
    good = sources["ct"][0].read_bytes()
    ds = pydicom.dcmread(sources["ct"][0])
    st, se, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    a = file_instance(good, st, se, sop, tmp_path)
    assert a.path == tmp_path / st / se / f"{sop}.dcm" and not a.duplicate and not a.conflict
    assert a.path.stat().st_mode & 0o777 == 0o644                # readable by PACS tools (was 0600)
    again = file_instance(good, st, se, sop, tmp_path)
    assert again.duplicate and again.path == a.path
    ds.PixelData = bytes(len(ds.PixelData))                      # same UID, different (valid) data set
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    other = file_instance(buf.getvalue(), st, se, sop, tmp_path)
    assert other.conflict and other.path == a.path
    assert a.path.read_bytes() == good                           # the stored copy is untouched
    assert [p.name for p in (tmp_path / st / se).iterdir()] == [f"{sop}.dcm"]
    # a stored copy that fails the integrity check (truncated) is replaced by a valid one
    a.path.write_bytes(good[: len(good) - 5000])
    fixed = file_instance(good, st, se, sop, tmp_path)
    assert fixed.replaced and a.path.read_bytes() == good
    assert not list(tmp_path.rglob("*.part"))                    # no temp files left behind
    for bad in ("../../etc", "1.2.abc", "", "1." + "2" * 70):
        with pytest.raises(ValueError):
            file_instance(b"x", bad, se, sop, tmp_path)
    assert not (tmp_path.parent / "etc").exists()


def test_get_contexts_keep_each_syntax_within_the_limit():
    """One presentation context per (image class, compressed syntax): an acceptor picks one syntax
    per context, so the old single 12-syntax context per class made Orthanc choose Explicit VR."""
    cr = "1.2.840.10008.5.1.4.1.1.1"
    ctx = net.get_contexts([cr] + net.GET_STORAGE_CLASSES)
    assert len(ctx) <= 127                                      # + the C-GET model context = 128
    cr_syntaxes = [ts for c, tss in ctx if c == cr for ts in tss]
    for ts in (pydicom.uid.JPEG2000, pydicom.uid.JPEGBaseline8Bit, pydicom.uid.JPEG2000Lossless):
        assert [tss for c, tss in ctx if c == cr and ts in tss] == [[ts]]
    assert pydicom.uid.ExplicitVRLittleEndian in cr_syntaxes
    assert {c for c, _ in ctx} == set(net.GET_STORAGE_CLASSES) | {cr}   # every class still received


# --------------------------------------------------------------------------------------------
# our SCU <-> our SCP: allow-list and TLS
# --------------------------------------------------------------------------------------------
def _self_signed(folder: Path) -> tuple[Path, Path]:
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not available to make a test certificate")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_scp_allow_list_rejects_unknown_callers(tmp_path, sources):
    scp_settings = NetworkSettings(ae_title="CVSCP", port=0, bind_address="127.0.0.1", timeout_s=10,
                                   allowed_calling_aets=["GOODSCU"])
    with pytest.raises(net.NetworkError, match="allow-list"):
        StorageSCP(NetworkSettings(port=0, bind_address="127.0.0.1")).start()
    with StorageSCP(scp_settings, root=tmp_path / "store") as scp:
        target = Peer("ChestView SCP", "CVSCP", "127.0.0.1", scp.port)
        good = NetworkSettings(ae_title="GOODSCU", timeout_s=10)
        evil = NetworkSettings(ae_title="EVILSCU", timeout_s=10)
        assert net.echo(good, target) > 0
        with pytest.raises(net.NetworkError, match="rejected"):
            net.echo(evil, target)
        with pytest.raises(net.NetworkError, match="rejected"):
            net.send(evil, target, sources["ct"][:1])
        wrong_called = Peer("wrong", "NOTCVSCP", "127.0.0.1", scp.port)
        with pytest.raises(net.NetworkError, match="rejected"):
            net.echo(good, wrong_called)
        res = net.send(good, target, sources["ct"][:1])
        assert res.ok
        assert len(scp.stored) == 1
        assert list((tmp_path / "store").rglob("*.dcm")) == [scp.stored[0].path]


def test_tls_between_our_scu_and_scp(tmp_path, sources):
    cert, key = _self_signed(tmp_path)
    tls = TLSSettings(enabled=True, cert_file=str(cert), key_file=str(key), ca_file=str(cert))
    scp_settings = NetworkSettings(ae_title="CVSCP", port=0, bind_address="127.0.0.1", timeout_s=10,
                                   allowed_calling_aets=["GOODSCU"],
                                   tls=TLSSettings(enabled=True, cert_file=str(cert), key_file=str(key)))
    with StorageSCP(scp_settings, root=tmp_path / "store") as scp:
        secure = Peer("ChestView SCP", "CVSCP", "127.0.0.1", scp.port, tls=True)
        plain = Peer("ChestView SCP", "CVSCP", "127.0.0.1", scp.port, tls=False)
        client = NetworkSettings(ae_title="GOODSCU", timeout_s=10, tls=tls)
        assert net.echo(client, secure) > 0
        res = net.send(client, secure, sources["ct"])
        assert res.ok and len(res.sent) == 3
        got = sorted(scp.stored, key=lambda s: s.path.name)
        assert len(got) == 3
        by_uid = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in sources["ct"]}
        for rec in got:
            np.testing.assert_array_equal(_pixels(rec.path), _pixels(by_uid[rec.sop_uid]))
        with pytest.raises(net.NetworkError):                       # plain TCP to a TLS port
            net.echo(NetworkSettings(ae_title="GOODSCU", timeout_s=5), plain)
        untrusting = NetworkSettings(ae_title="GOODSCU", timeout_s=5,                # unknown CA
                                     tls=TLSSettings(enabled=True, ca_file=str(_other_ca(tmp_path))))
        with pytest.raises(net.NetworkError):
            net.echo(untrusting, secure)


def _other_ca(tmp_path: Path) -> Path:
    d = tmp_path / "other"
    d.mkdir()
    return _self_signed(d)[0]


# --------------------------------------------------------------------------------------------
# against Orthanc
# --------------------------------------------------------------------------------------------
def test_echo_and_store_reach_orthanc(pacs, sources):
    settings, peer, orthanc, _ = pacs
    assert net.echo(settings, peer) > 0
    stats = orthanc.rest("GET", "/statistics")
    assert stats["CountInstances"] == 4 and stats["CountStudies"] == 2


def test_find_at_each_level(pacs, sources):
    settings, peer, _, _ = pacs
    ct = pydicom.dcmread(sources["ct"][0], stop_before_pixels=True)
    cr = pydicom.dcmread(sources["cr"][0], stop_before_pixels=True)
    patients = net.find_patients(settings, peer, net.StudyQuery(patient_name="dulcinea"))
    assert [p.patient_id for p in patients] == [SECRET_ID]
    studies = net.find_studies(settings, peer, net.StudyQuery())
    assert {s.study_uid for s in studies} == {ct.StudyInstanceUID, cr.StudyInstanceUID}
    by_id = net.find_studies(settings, peer, net.StudyQuery(patient_id=SECRET_ID))
    assert len(by_id) == 1 and by_id[0].study_uid == ct.StudyInstanceUID
    assert by_id[0].n_instances == 3 and by_id[0].modalities == ["CT"] and by_id[0].study_date == "20240315"
    assert [s.study_uid for s in net.find_studies(settings, peer, net.StudyQuery(modality="CR"))] == \
        [cr.StudyInstanceUID]
    in_range = net.find_studies(settings, peer, net.StudyQuery(date_from="20240301", date_to="20240331"))
    assert [s.study_uid for s in in_range] == [ct.StudyInstanceUID]
    assert net.find_studies(settings, peer, net.StudyQuery(date_from="20250101")) == []
    series = net.find_series(settings, peer, ct.StudyInstanceUID)
    assert [(s.series_uid, s.modality, s.n_instances) for s in series] == [(ct.SeriesInstanceUID, "CT", 3)]
    sops = net.find_instances(settings, peer, ct.StudyInstanceUID, ct.SeriesInstanceUID)
    assert sorted(sops) == sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in sources["ct"])
    with pytest.raises(ValueError, match="YYYYMMDD"):
        net.find_studies(settings, peer, net.StudyQuery(date_from="15.03.2024"))


def test_find_logs_no_patient_identifiers(pacs, caplog):
    settings, peer, _, _ = pacs
    secrets = [SECRET_ID, *SECRET_NAME.split("^")]
    with caplog.at_level(logging.DEBUG, logger="pynetdicom"), caplog.at_level(logging.DEBUG, logger="engine"):
        found = net.find_studies(settings, peer, net.StudyQuery(patient_name="Quixote", patient_id=SECRET_ID))
        net.find_patients(settings, peer, net.StudyQuery(patient_id=SECRET_ID))
    assert found and found[0].patient_name == SECRET_NAME        # the identifiers did travel...
    text = caplog.text
    assert "C-FIND" in text and "Association" in text           # ...and logging did run...
    for s in secrets:
        assert s not in text                                     # ...without them
    # Control: pynetdicom's default (identifiers logged) would have leaked them into this log.
    caplog.clear()
    from pynetdicom import _config
    try:
        _config.LOG_RESPONSE_IDENTIFIERS = True
        with caplog.at_level(logging.DEBUG, logger="pynetdicom"):
            net.find_studies(settings, peer, net.StudyQuery(patient_id=SECRET_ID))
        assert SECRET_ID in caplog.text
    finally:
        net.quiet_identifiers()


def test_move_to_our_scp_returns_identical_pixels(pacs, sources):
    settings, peer, _, scp = pacs
    ct = pydicom.dcmread(sources["ct"][0], stop_before_pixels=True)
    before = len(scp.stored)
    seen: list[float] = []
    res = net.move(settings, peer, ct.StudyInstanceUID, progress=lambda f, msg: seen.append(f))
    assert (res.completed, res.failed, res.cancelled) == (3, 0, False)
    got = scp.stored[before:]
    assert len(got) == 3 and seen and seen[-1] == 1.0
    originals = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in sources["ct"]}
    for rec in got:
        assert rec.path.parent.name == ct.SeriesInstanceUID and rec.path.parent.parent.name == ct.StudyInstanceUID
        np.testing.assert_array_equal(_pixels(rec.path), _pixels(originals[rec.sop_uid]))
        back = pydicom.dcmread(rec.path)
        assert back.preamble == b"\x00" * 128 and back.PatientID == SECRET_ID
    # A second move of the same study files nothing new (identical files are recognised).
    res2 = net.move(settings, peer, ct.StudyInstanceUID, series_uid=ct.SeriesInstanceUID)
    assert res2.completed == 3
    assert all(r.duplicate for r in scp.stored[before + 3:])
    assert len(list((scp.root / ct.StudyInstanceUID).rglob("*.dcm"))) == 3


def test_move_to_unknown_destination_says_what_to_do(pacs, sources):
    settings, peer, _, _ = pacs
    ct = pydicom.dcmread(sources["ct"][0], stop_before_pixels=True)
    with pytest.raises(net.NetworkError, match="move destination"):
        net.move(settings, peer, ct.StudyInstanceUID, destination="NOSUCHAE")


def test_get_returns_identical_pixels(pacs, sources, tmp_path):
    settings, peer, _, _ = pacs
    cr = pydicom.dcmread(sources["cr"][0])
    res = net.get(settings, peer, cr.StudyInstanceUID, root=tmp_path)
    assert (res.completed, res.failed) == (1, 0) and len(res.stored) == 1
    rec = res.stored[0]
    assert rec.path == tmp_path / cr.StudyInstanceUID / cr.SeriesInstanceUID / f"{cr.SOPInstanceUID}.dcm"
    np.testing.assert_array_equal(_pixels(rec.path), cr.pixel_array)


def test_tls_to_orthanc(tmp_path, sources):
    """Our SCU over TLS to Orthanc's DICOM TLS listener (Orthanc >= 1.9); plain TCP is refused."""
    exe = ensure_orthanc()
    if exe is None:
        pytest.skip("Debian 'orthanc' is not installed and cannot be installed here (needs root + apt)")
    cert, key = _self_signed(tmp_path)
    server = OrthancServer(exe, tmp_path / "pacs", tls={
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(cert), "DicomTlsPrivateKey": str(key),
        "DicomTlsTrustedCertificates": str(cert), "DicomTlsRemoteCertificateRequired": False})
    try:
        server.start()
        settings = NetworkSettings(ae_title="CHESTVIEW", timeout_s=10, tls=TLSSettings(ca_file=str(cert)))
        secure = Peer("TLS PACS", "ORTHANC", "127.0.0.1", server.dicom_port, tls=True)
        assert net.echo(settings, secure) > 0
        assert net.send(settings, secure, sources["ct"]).ok
        found = net.find_studies(settings, secure, net.StudyQuery(patient_id=SECRET_ID))
        assert len(found) == 1 and found[0].n_instances == 3
        with pytest.raises(net.NetworkError, match="Could not connect"):
            net.echo(settings, Peer("plain", "ORTHANC", "127.0.0.1", server.dicom_port, tls=False))
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# compressed data through C-GET and C-MOVE (issue: J2K failed, JPEG Baseline arrived decompressed)
# --------------------------------------------------------------------------------------------
def make_compressed_crs(folder: Path) -> list[Path]:
    """A mixed CR study: pydicom-data's real JPEG 2000 CR (RG1_J2KI) and a JPEG Baseline CR encoded
    here from RG1_UNCR with Pillow (8-bit, quarter size), each with new UIDs in one new study."""
    from PIL import Image
    from pydicom.data import get_testdata_file
    from pydicom.encaps import encapsulate

    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    j2k = pydicom.dcmread(get_testdata_file("RG1_J2KI.dcm"))
    src = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    arr = src.pixel_array.astype(np.float32)
    small = arr[::4, ::4]
    img8 = np.clip((small - small.min()) / (np.ptp(small) or 1.0) * 255.0, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img8).save(buf, format="JPEG", quality=90)
    jpg = src
    jpg.Rows, jpg.Columns = img8.shape
    jpg.BitsAllocated, jpg.BitsStored, jpg.HighBit, jpg.PixelRepresentation = 8, 8, 7, 0
    jpg.PixelData = encapsulate([buf.getvalue()])
    jpg["PixelData"].VR = "OB"
    jpg.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
    for k in ("WindowCenter", "WindowWidth", "SmallestImagePixelValue", "LargestImagePixelValue"):
        if k in jpg:
            del jpg[k]
    out = []
    for name, ds in (("cr_j2k.dcm", j2k), ("cr_jpeg_baseline.dcm", jpg)):
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / name, enforce_file_format=True)
        out.append(folder / name)
    return out


@pytest.fixture(scope="module")
def compressed(pacs, tmp_path_factory) -> list[Path]:
    """The mixed compressed CR study, uploaded to Orthanc over REST (stored as received)."""
    _, _, orthanc, _ = pacs
    files = make_compressed_crs(tmp_path_factory.mktemp("compressed"))
    for f in files:
        orthanc.upload(f)
    return files


def _same_encoded_pixels(received: Path, original: Path) -> None:
    got, want = pydicom.dcmread(received), pydicom.dcmread(original)
    assert str(got.file_meta.TransferSyntaxUID) == str(want.file_meta.TransferSyntaxUID)
    assert got.PixelData == want.PixelData                       # byte-identical codestream


def test_get_keeps_jpeg2000_and_jpeg_baseline_byte_identical(pacs, compressed, tmp_path):
    settings, peer, _, _ = pacs
    study = str(pydicom.dcmread(compressed[0], stop_before_pixels=True).StudyInstanceUID)
    announced: list = []
    res = net.get(settings, peer, study, root=tmp_path, on_stored=announced.append)
    assert (res.completed, res.failed) == (2, 0) and len(res.stored) == 2
    assert sorted(r.path for r in announced) == sorted(r.path for r in res.stored)   # all reported
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in compressed}
    for rec in res.stored:
        _same_encoded_pixels(rec.path, by_uid[rec.sop_uid])
        assert rec.path.stat().st_mode & 0o777 == 0o644
    assert pydicom.dcmread(res.stored[0].path).pixel_array.size > 0


def test_move_keeps_jpeg2000_and_jpeg_baseline_byte_identical(pacs, compressed):
    settings, peer, _, scp = pacs
    study = str(pydicom.dcmread(compressed[0], stop_before_pixels=True).StudyInstanceUID)
    before = len(scp.stored)
    res = net.move(settings, peer, study)
    assert (res.completed, res.failed) == (2, 0)
    got = scp.stored[before:]
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in compressed}
    assert sorted(r.sop_uid for r in got) == sorted(by_uid)
    for rec in got:
        _same_encoded_pixels(rec.path, by_uid[rec.sop_uid])


def test_get_reports_every_filed_instance_when_some_fail(pacs, tmp_path, monkeypatch):
    """A study where one instance cannot be sent (its SOP class is not negotiated): the call used
    to raise and the files already written were not reported to the caller."""
    from pydicom.data import get_testdata_file

    settings, peer, orthanc, _ = pacs
    study = generate_uid()
    files = []
    for name in ("RG1_UNCR.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(tmp_path / name, enforce_file_format=True)
        orthanc.upload(tmp_path / name)
        files.append(tmp_path / name)
    monkeypatch.setattr(net, "_sop_classes_of", lambda *a: [])
    monkeypatch.setattr(net, "GET_STORAGE_CLASSES", [net.sc.ComputedRadiographyImageStorage])
    res = net.get(settings, peer, study, root=tmp_path / "store")
    assert res.failed == 1 and [r.sop_uid for r in res.stored] == [str(pydicom.dcmread(files[0]).SOPInstanceUID)]
    assert res.stored[0].path.is_file(), res.status
