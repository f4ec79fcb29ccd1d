"""The bundled demo study set, built on first use from pydicom-data and the synthetic phantom.

Contents (patient names are clearly fake; UIDs are new and deterministic):
- ``CR_CHEST/``  DEMO^CHEST CR: the real Philips CR chest radiograph RG1 (MONOCHROME1, 15-bit) from
  pydicom-data as one study with three series: uncompressed, JPEG 2000 lossless, JPEG 2000 lossy.
- ``CR_TIBIA/``  DEMO^TIBIA CR: RG3, a tibia radiograph (out of scope for the chest models).
- ``CT_PHANTOM/`` DEMO^CHEST CT: the synthetic chest CT phantom (engine.demo.phantom), 120 x 512x512.

Built into a temporary sibling folder and renamed into place, so a killed build never leaves a
half demo behind; ``.chestview-demo.json`` records the recipe version and file count.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

DEMO_VERSION = 1
MARKER = ".chestview-demo.json"

_CR_SOURCES = (  # (pydicom-data file, series number, description)
    ("RG1_UNCR.dcm", 1, "PA chest (uncompressed)"),
    ("RG1_J2KR.dcm", 2, "PA chest (JPEG 2000 lossless)"),
    ("RG1_J2KI.dcm", 3, "PA chest (JPEG 2000 lossy)"),
)
_TIBIA = ("RG3_UNCR.dcm", 1, "Tibia AP (out of scope for chest AI)")

_IDENTIFYING = ("PatientBirthDate", "OtherPatientIDs", "OtherPatientNames", "PatientAddress",
                "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
                "OperatorsName", "PerformingPhysicianName", "StationName", "DeviceSerialNumber")


def _uid(*parts: str) -> str:
    import hashlib
    import uuid

    digest = hashlib.sha256("\x1f".join(["chestview-demo-v1", *parts]).encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"


def _testdata(name: str) -> Path | None:
    """A pydicom-data file, or None if that optional variant is not installed."""
    from pydicom.data import get_testdata_file

    try:
        p = get_testdata_file(name)
    except Exception:
        return None
    return Path(p) if p else None


def _copy_radiograph(src: Path, dst: Path, *, patient_name: str, patient_id: str, study_key: str,
                     series_number: int, description: str, study_description: str) -> None:
    """Copy one CR with fake identity, new deterministic UIDs and no private tags (DESIGN.md 5)."""
    import pydicom

    ds = pydicom.dcmread(src)
    ds.preamble = b"\0" * 128  # the source preamble is a TIFF header: never copy it (PS3.10 7.5)
    ds.remove_private_tags()
    for kw in _IDENTIFYING:
        if kw in ds:
            ds.data_element(kw).value = ""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "ChestView demo: identifying attributes emptied"  # Type 1C (PS3.3 C.7.1.1)
    ds.StudyInstanceUID = _uid(study_key, "study")
    ds.SeriesInstanceUID = _uid(study_key, "series", str(series_number))
    ds.SOPInstanceUID = _uid(study_key, "sop", str(series_number))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.SeriesDescription = description
    ds.StudyDescription = study_description
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ImageComments = f"ChestView demo copy of pydicom-data {src.name} (WG-04 sample image)"
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)


def build_demo(out_dir: Path) -> Path:
    """Write the demo study set into ``out_dir`` (created if needed) and return it."""
    from engine.demo.phantom import write_phantom_series

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, number, desc in _CR_SOURCES:
        src = _testdata(name)
        if src is None:
            if number == 1:
                raise FileNotFoundError(f"pydicom-data file {name} not found; install pydicom-data")
            continue
        _copy_radiograph(src, out / "CR_CHEST" / f"CR_{number:02d}_{name[4:8]}.dcm",
                         patient_name="DEMO^CHEST CR", patient_id="DEMO-CR-001", study_key="cr-chest",
                         series_number=number, description=desc,
                         study_description="Demo chest radiograph (public WG-04 sample)")
        n += 1
    src = _testdata(_TIBIA[0])
    if src is not None:
        _copy_radiograph(src, out / "CR_TIBIA" / "CR_01_UNCR.dcm", patient_name="DEMO^TIBIA CR",
                         patient_id="DEMO-CR-002", study_key="cr-tibia", series_number=_TIBIA[1],
                         description=_TIBIA[2], study_description="Demo tibia radiograph (out of scope)")
        n += 1
    n += len(write_phantom_series(out / "CT_PHANTOM"))
    (out / MARKER).write_text(json.dumps({"version": DEMO_VERSION, "files": n}, indent=1))
    return out


def demo_complete(root: Path) -> bool:
    """True when ``root`` holds a finished build of the current recipe."""
    try:
        info = json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if info.get("version") != DEMO_VERSION:
        return False
    n = sum(1 for p in Path(root).rglob("*.dcm"))
    return n == info.get("files")


def _remove_stale(parent: Path, age_s: float = 3600.0) -> None:
    """Delete leftovers of killed builds (older than an hour, so a concurrent build is safe)."""
    import time

    for p in parent.glob(".demo-*"):
        try:
            if p.is_dir() and time.time() - p.stat().st_mtime > age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            continue


def ensure_demo(rebuild: bool = False) -> Path:
    """The demo folder in engine.paths.demo_root(), built once (atomically) when missing or stale."""
    from engine.paths import demo_root

    root = demo_root()
    if not rebuild and demo_complete(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(root.parent)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=root.parent))
    try:
        build_demo(tmp)
        os.chmod(tmp, 0o755)
        if root.exists():
            old = root.parent / f".demo-old-{os.getpid()}"
            os.replace(root, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            if not demo_complete(root):  # another process won the race with a good build: fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
