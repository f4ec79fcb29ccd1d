"""The untrusted-decode boundary (engine.dicom.safe_decode) against a generated hostile corpus.

Every hostile file becomes a LoadError with a reason that names what is wrong; none crashes,
hangs or bloats the test process; genuine files decode identically through the boundary.
"""
from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostile_files as hf  # noqa: E402

from engine.errors import LoadError  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    for name, (build, _) in hf.BUILDERS.items():
        build(d / name)
    hf.genuine_cr(d / "genuine.dcm")
    return d


@pytest.mark.parametrize("name", sorted(hf.BUILDERS))
def test_hostile_file_is_a_clean_load_error(corpus: Path, name: str) -> None:
    from engine.dicom.safe_decode import bounded_load_frame

    frame = 0
    if name == "multiframe_hostile.dcm":   # its first frame is genuine and still displays
        assert bounded_load_frame(corpus / name, 0).values.shape == (64, 64)
        frame = 1
    with pytest.raises(LoadError) as ei:
        bounded_load_frame(corpus / name, frame)
    reason = ei.value.reason
    assert hf.BUILDERS[name][1] in reason, reason
    assert "install" not in reason                   # corrupt is not "missing plugins"
    assert ei.value.path == str(corpus / name)
    # and the boundary is still good for a genuine file right after
    assert bounded_load_frame(corpus / "genuine.dcm").values.shape == (100, 100)


def test_multiframe_ct_with_hostile_later_frame_never_reaches_the_parent(corpus: Path) -> None:
    """analysis._ct -> load_volume used to decode every frame in the batch parent, unbounded."""
    from engine.dicom.index import index_path
    from engine.dicom.safe_decode import bounded_load_volume, decode_series, run_limited

    se = next(s for s in index_path(corpus / "multiframe_hostile.dcm").all_series())
    with pytest.raises(LoadError) as ei:
        bounded_load_volume(se)
    assert "frame 2 of 2" in ei.value.reason
    with pytest.raises(LoadError):
        run_limited(decode_series, se, True, timeout_s=30)   # the batch decode stage decodes all frames


def test_boundary_returns_the_same_pixels_as_in_process(shared_data_or_package: Path) -> None:
    from engine.dicom.pixels import load_frame
    from engine.dicom.safe_decode import bounded_load_frame

    a, b = load_frame(shared_data_or_package), bounded_load_frame(shared_data_or_package)
    assert np.array_equal(a.values, b.values) and np.array_equal(a.stored, b.stored)
    assert a.window == b.window and a.monochrome1 == b.monochrome1
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"chestview-{os.getpid()}-")]


@pytest.fixture
def shared_data_or_package() -> Path:
    from pydicom.data import get_testdata_file

    real = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "xray_wg04_rg1_j2ki.dcm"
    return real if real.is_file() else Path(get_testdata_file("JPEG2000.dcm"))


def _abort() -> None:
    os.abort()


def _hog() -> int:
    x = bytearray(8 * 2**30)
    return len(x)


def _pid() -> int:
    return os.getpid()


def test_child_that_hit_its_memory_limit_or_crashed_is_never_reused() -> None:
    from engine.dicom.safe_decode import LimitedPool

    with LimitedPool(1, timeout_s=20, memory_mb=1536) as pool:
        first = pool.submit(_pid).result()
        with pytest.raises(LoadError, match="memory"):
            pool.submit(_hog).result()
        second = pool.submit(_pid).result()
        with pytest.raises(LoadError, match="SIGABRT"):
            pool.submit(_abort).result()
        third = pool.submit(_pid).result()
        assert len({first, second, third}) == 3
        assert pool.retired == 1 and pool.replaced == 1


def test_memory_guard_sizes_the_limit_from_the_declared_size() -> None:
    """A decoder allocating far beyond what the file declares fails with MemoryError in the child."""
    from engine.dicom.safe_decode import run_limited

    with pytest.raises(LoadError, match="memory"):
        run_limited(_guarded_alloc, timeout_s=20, memory_mb=3072)


def _guarded_alloc() -> int:
    from engine.dicom.pixels import guard_memory

    guard_memory(64 * 2**20)              # the file declared 64 MiB ...
    return len(bytearray(2 * 2**30))      # ... the decoder asks for 2 GiB (under the 3 GiB cap)


def test_jpeg_extended_12bit_decodes(tmp_path: Path) -> None:
    """12-bit JPEG extended (1.2.840.10008.1.2.4.51) with Se=0 in its scan header."""
    from pydicom.data import get_testdata_file

    from engine.dicom.pixels import load_frame, repair_sequential_scan

    f = load_frame(get_testdata_file("JPEG-lossy.dcm"))
    assert f.values.shape == (1024, 256) and f.bits_stored == 12 and float(f.values.max()) > 0
    ok = load_frame(get_testdata_file("JPGExtended.dcm"))    # a conformant 12-bit file is unchanged
    assert ok.values.shape == (1024, 256)
    sos = b"\xff\xd8\xff\xc1\x00\x0b\x0c\x00\x10\x00\x10\x01\x01\x11\x00\xff\xda\x00\x08\x01\x01\x00\x00\x00\x00"
    fixed = repair_sequential_scan(sos)
    assert fixed is not None and fixed[-3:-1] == b"\x00\x3f"
    assert repair_sequential_scan(fixed) is None


def test_budget_message_states_the_right_figures(tmp_path: Path) -> None:
    """A 77 MiB image is not '77 MiB over a 512 MiB budget': the working size is stated."""
    from engine.dicom.budget import check_budget

    ds = hf.image_dataset("budget", hf.EXPLICIT_LE, rows=6400, cols=6400)
    with pytest.raises(LoadError) as ei:
        check_budget(ds, "x", 256 * 2**20)
    r = ei.value.reason
    assert "78 MiB of pixel data" in r and "about 391 MiB" in r and "256 MiB" in r


def test_unsupported_versus_corrupt(tmp_path: Path) -> None:
    from engine.dicom.pixels import _decode_reason

    assert "corrupt" in _decode_reason(RuntimeError("Unable to decode"), hf.J2K_LOSSLESS)
    assert "unsupported transfer syntax" in _decode_reason(RuntimeError("Unable to decode"), "1.2.3.4")


def test_ct_series_with_one_bad_slice_loads_with_a_gap_warning(tmp_path: Path) -> None:
    from engine.dicom.index import index_path
    from engine.dicom.volume import load_volume

    for z in range(12):
        ds = hf.image_dataset("ctgap", hf.EXPLICIT_LE, modality="CT")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = hf._uid(f"gap{z}")
        ds.ImagePositionPatient, ds.InstanceNumber = [0, 0, float(z)], z + 1
        ds.PixelData = np.full((64, 64), 1000 + z, np.uint16).tobytes()
        ds.save_as(tmp_path / f"s{z:02d}.dcm", enforce_file_format=True)
    hf.truncated(tmp_path / "s05.dcm", tmp_path / "s05.dcm", 0.7)
    se = index_path(tmp_path).all_series()[0]
    vol = load_volume(se)
    assert vol.hu.shape[0] == 11
    assert any("1 of 12 slice(s) could not be decoded" in w for w in vol.warnings), vol.warnings
    assert any("gap" in w for w in vol.warnings)
    hf.truncated(tmp_path / "s06.dcm", tmp_path / "s06.dcm", 0.7)   # 2 of 12 > 10%: refused
    with pytest.raises(LoadError, match="at most 10%"):
        load_volume(index_path(tmp_path).all_series()[0])


def test_dicomdir_in_a_scanned_folder_is_listed_with_missing_files(tmp_path: Path) -> None:
    import shutil

    from pydicom.data import get_testdata_file

    from engine.dicom.index import index_path

    shutil.copy(get_testdata_file("DICOMDIR"), tmp_path / "DICOMDIR")
    shutil.copy(get_testdata_file("DICOMDIR"), tmp_path / "renamed_dir.dcm")   # found by content
    hf.genuine_cr(tmp_path / "img.dcm")
    res = index_path(tmp_path)
    reasons = {Path(p.path).name: p.reason for p in res.problems}
    assert "DICOMDIR" in reasons and "media directory" in reasons["DICOMDIR"]
    assert "renamed_dir.dcm" in reasons
    assert any("missing on disk" in p.reason for p in res.problems)
    assert len(res.all_series()) == 1
    assert res.files_seen == 3


def test_logscrub_removes_identifiers_from_warnings_and_logs(tmp_path: Path) -> None:
    """In a fresh process, as main.py installs it: pydicom's own warning about a damaged patient
    name, a log record and an exception traceback reach stderr without the identifiers."""
    import subprocess

    from engine import logscrub

    folder = tmp_path / "Doe_John_1961"
    folder.mkdir()
    bad = hf.bad_element(folder / "IMG1.dcm")
    code = f"""
import logging, warnings
from engine.logscrub import install
install()
logging.basicConfig(level=logging.INFO)
warnings.simplefilter("always")
import pydicom
from pydicom.valuerep import PersonName
ds = pydicom.dcmread({str(bad)!r})
warnings.warn("Invalid value for VR PN: b'Doe^John' in {folder}/IMG1.dcm", UserWarning)
logging.getLogger("pydicom").warning("name %s id %s in %s", "Doe^John", "'PID-778890'", {str(bad)!r})
try:
    open({str(folder / "missing.dcm")!r})
except OSError:
    logging.getLogger("engine").exception("could not read")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=str(Path(__file__).resolve().parents[1]))
    err = r.stderr
    assert r.returncode == 0, err
    assert "Doe" not in err and "778890" not in err and str(tmp_path) not in err, err
    assert err.count("<file #") >= 2
    assert logscrub.deid_path("Doe_John/IMG1.dcm", b"k").startswith("file-")
    assert "Doe" not in logscrub.deid_path("Doe_John/IMG1.dcm", b"k")


def test_fuzzed_headers_and_codestreams_never_escape_the_loader(tmp_path: Path) -> None:
    """Property: whatever the bytes, load_frame (in a bounded child) returns a Frame or raises LoadError."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from engine.dicom.safe_decode import bounded_load_frame

    seeds = [hf.genuine_cr(tmp_path / "g.dcm").read_bytes(), (hf.rle_bomb(tmp_path / "r.dcm")).read_bytes(),
             hf.jpeg_sof_bomb(tmp_path / "j.dcm").read_bytes()]
    target = tmp_path / "fuzz.dcm"

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(which=st.integers(0, len(seeds) - 1),
           edits=st.lists(st.tuples(st.integers(132, 10**6), st.integers(0, 255)), min_size=1, max_size=12),
           cut=st.one_of(st.none(), st.integers(132, 10**6)))
    def check(which: int, edits: list[tuple[int, int]], cut: int | None) -> None:
        data = bytearray(seeds[which])
        for pos, val in edits:
            data[pos % len(data)] = val
        if cut is not None:
            data = data[:max(132, cut % len(data))]
        target.write_bytes(bytes(data))
        try:
            f = bounded_load_frame(target)
            assert f.values.ndim in (2, 3)
        except LoadError as e:
            assert e.reason

    check()


def test_volume_comes_back_through_shared_memory_unchanged(tmp_path: Path) -> None:
    """A 40x256x256 CT (5 MiB of int16) crosses the boundary as a /dev/shm buffer, not the pipe."""
    import engine.dicom.safe_decode as sd
    from engine.dicom.index import index_path
    from engine.dicom.volume import load_volume

    for z in range(40):
        ds = hf.image_dataset("shmvol", hf.EXPLICIT_LE, rows=256, cols=256, modality="CT")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = hf._uid(f"shm{z}")
        ds.ImagePositionPatient, ds.InstanceNumber = [0, 0, float(z)], z + 1
        ds.PixelData = (np.arange(256 * 256, dtype=np.uint16).reshape(256, 256) % 4000 + z).tobytes()
        ds.save_as(tmp_path / f"s{z:02d}.dcm", enforce_file_format=True)
    se = index_path(tmp_path).all_series()[0]
    ref = load_volume(se)
    got = sd.bounded_load_volume(se)
    assert np.array_equal(ref.hu, got.hu) and ref.positions == got.positions
    base = got.hu
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    base = base.obj if isinstance(base, memoryview) else base
    assert isinstance(base, mmap.mmap)                 # mapped from /dev/shm, not unpickled bytes
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"chestview-{os.getpid()}-")]


def test_orphaned_buffers_of_a_killed_parent_are_removed() -> None:
    from engine.dicom.safe_decode import _unlink_orphans

    orphan = Path("/dev/shm") / "chestview-999999999-1-0-1-0"
    orphan.write_bytes(b"x")
    mine = Path("/dev/shm") / f"chestview-{os.getpid()}-999-0-1-0"
    mine.write_bytes(b"x")
    try:
        _unlink_orphans()
        assert not orphan.exists() and mine.exists()
    finally:
        mine.unlink(missing_ok=True)
        orphan.unlink(missing_ok=True)
