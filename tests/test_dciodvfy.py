"""Every DICOM object type we write passes David Clunie's ``dciodvfy -new`` with 0 errors.

Objects: the Comprehensive 3D SR, the Parametric Map (CT) and the labelled Secondary Capture (CT,
and the radiograph heatmap object), built from CT and CR sources, uncompressed and compressed,
including real-world header quirks (an empty Patient Orientation, a missing Patient ID). dciodvfy
comes from the Debian package ``dicom3tools``, installed with apt-get when missing (the test skips
only when that fails). Remaining warnings are listed per object type in the test output and in
/tmp/dciodvfy_warnings.txt.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from engine.interop import export as ex
from tests.orthanc_server import make_sources
from tests.test_export import ct_result, xray_result

pytestmark = pytest.mark.timeout(600)
WARNINGS_FILE = Path("/tmp/dciodvfy_warnings.txt")
KIND = {"1.2.840.10008.5.1.4.1.1.88.34": "SR (Comprehensive 3D, TID 1500)",
        "1.2.840.10008.5.1.4.1.1.30": "Parametric Map", "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
        "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation"}

_failed_installs: set[str] = set()


def ensure_debian_tool(binary: str, package: str, timeout_s: int = 600) -> str | None:
    """Path of ``binary``; installs Debian ``package`` with apt-get when missing (root only)."""
    exe = shutil.which(binary)
    if exe or package in _failed_installs or not shutil.which("apt-get") or os.geteuid() != 0:
        return exe
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, timeout=timeout_s,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", package], env=env,
                       check=True, timeout=timeout_s, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (subprocess.SubprocessError, OSError):
        _failed_installs.add(package)
        return None
    return shutil.which(binary)


_PN_VALUE = re.compile(r"(\[PN\] = <)[^>]*(>)")
_ITEM_INDEX = re.compile(r"(Sequence\([0-9a-f]{4},[0-9a-f]{4}\))\[\d+\]")


def _kind_of(warning: str) -> str:
    """One line per kind of warning: sequence item numbers in the path are replaced by [n]."""
    return _ITEM_INDEX.sub(r"\1[n]", warning)


def dciodvfy(exe: str, path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of ``dciodvfy -new`` for one file; person-name values are scrubbed."""
    run = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=120)
    lines = [_PN_VALUE.sub(r"\1…\2", ln.strip()) for ln in (run.stdout + run.stderr).splitlines()]
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


@pytest.fixture(scope="module")
def tool() -> str:
    exe = ensure_debian_tool("dciodvfy", "dicom3tools")
    if exe is None:
        pytest.skip("dciodvfy (Debian 'dicom3tools') is not installed and cannot be installed here")
    return exe


@pytest.fixture(scope="module")
def collected(request):
    """Warnings per object type, printed and written to WARNINGS_FILE after the module."""
    found: dict[str, set[str]] = defaultdict(set)
    yield found
    text = []
    for kind in sorted(found):
        text.append(f"== {kind}: {len(found[kind])} distinct warning(s)")
        text += [f"   {w}" for w in sorted(found[kind])]
    WARNINGS_FILE.write_text("\n".join(text) + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():        # shown in the test output, not captured
            reporter.write_line("")
            reporter.write_line(f"dciodvfy -new warnings per object type (also in {WARNINGS_FILE}):")
            for line in text:
                reporter.write_line(line)


@pytest.fixture(scope="module")
def srcs(tmp_path_factory) -> dict[str, list[Path]]:
    """Source series: pydicom's CR (uncompressed and JPEG 2000), a CR with an empty Patient
    Orientation, and CT slices from CT_small (tests.orthanc_server.make_sources)."""
    from pydicom.data import get_testdata_file

    folder = tmp_path_factory.mktemp("src")
    base = make_sources(folder / "base")
    j2k = folder / "j2k" / "RG1_J2KI.dcm"
    j2k.parent.mkdir()
    shutil.copyfile(get_testdata_file("RG1_J2KI.dcm"), j2k)
    ds = pydicom.dcmread(base["cr"][0])
    ds.PatientOrientation = ""
    ds.ImagerPixelSpacing = [0.175, 0.175]
    konica = folder / "konica" / "cr_empty_orientation.dcm"
    konica.parent.mkdir()
    ds.save_as(konica, enforce_file_format=True)
    return {"CR uncompressed": base["cr"], "CR JPEG 2000": [j2k], "CR empty orientation": [konica],
            "CT uncompressed": base["ct"]}


SHARED = {"CR JPEG Baseline (SIIM)": ["xray_siim_1.dcm"],
          "CT JPEG 2000 lossless (WG04)": ["ct_wg04_ct1_transfer_syntaxes/CT1_J2KR.dcm"],
          "CT JPEG Lossless, no Patient ID (orthanc-tests)": ["ct_orthanc_ge_hispeed_chest_jpegll.dcm"]}


HAS_SEG = "segmentation" in getattr(ex.ExportKinds, "__dataclass_fields__", {})


def _opacity_map(paths: list[Path]):
    """A CT quantification whose label map holds a ground-glass and a consolidation blob."""
    from engine.results import CTQuantification, CTZoneStats

    head = pydicom.dcmread(paths[0], stop_before_pixels=True)
    shape = (len(paths), int(head.Rows), int(head.Columns))
    yy, xx = np.mgrid[0:shape[1], 0:shape[2]]
    labels = np.zeros(shape, np.uint8)
    labels[:, (yy - shape[1] * 0.4) ** 2 + (xx - shape[2] * 0.3) ** 2 < (shape[1] * 0.1) ** 2] = 1
    labels[-1, (yy - shape[1] * 0.6) ** 2 + (xx - shape[2] * 0.7) ** 2 < (shape[1] * 0.06) ** 2] = 2
    zone = CTZoneStats("both", "whole", 1000.0, 0.0, 90.0, 8.0, 2.0, 0.0, 80.0, 20.0, 10.0)
    return CTQuantification("hu-thresholds", "1.0.0", [zone, zone], [zone] * 6, zone, [], 3,
                            "zones, not lobes", 10.0, 80.0, 20.0, 1000.0, labels=labels, shape=shape)


def _result(paths: list[Path]):
    head = pydicom.dcmread(paths[0], stop_before_pixels=True)
    if head.Modality != "CT":
        return xray_result(paths[0])
    res = ct_result(paths)
    n = len(paths)
    for h in res.heatmaps:
        h.slice_index = min(h.slice_index or 0, n - 1)
    res.ct_slice_scores = [s for s in res.ct_slice_scores if s.slice_index < n]
    if HAS_SEG:
        res.ct_quant = _opacity_map(paths)
    return res


def _validate(tool: str, collected, paths: list[Path], out: Path, label: str) -> dict[str, list[str]]:
    kinds = ex.ExportKinds(sr=True, parametric_map=True, secondary_capture=True)
    written = ex.export_to_folder(_result(paths), paths, out, kinds)
    errors: dict[str, list[str]] = {}
    for p in written:
        kind = KIND.get(str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID), "other")
        errs, warns = dciodvfy(tool, p)
        collected[kind].update(_kind_of(w) for w in warns)
        if errs:
            errors[f"{label}: {kind}"] = errs
    return errors


@pytest.mark.parametrize("label", ["CR uncompressed", "CR JPEG 2000", "CR empty orientation", "CT uncompressed"])
def test_objects_from_test_sources_validate(tool, collected, srcs, label, tmp_path):
    errors = _validate(tool, collected, srcs[label], tmp_path / "out", label)
    assert errors == {}


@pytest.mark.parametrize("label", sorted(SHARED))
def test_objects_from_real_sources_validate(tool, collected, shared_data, label, tmp_path):
    paths = [shared_data / "dicom" / p for p in SHARED[label]]
    errors = _validate(tool, collected, paths, tmp_path / "out", label)
    assert errors == {}


def test_each_object_type_was_checked(tool, collected, srcs, tmp_path):
    """The radiograph's heatmap object is the Secondary Capture, CT's the Parametric Map."""
    for label in ("CR uncompressed", "CT uncompressed"):
        _validate(tool, collected, srcs[label], tmp_path / label.replace(" ", "_"), label)
    expected = {"SR (Comprehensive 3D, TID 1500)", "Parametric Map", "Secondary Capture"}
    if HAS_SEG:                                   # the CT opacity map (engine/interop/export_seg.py)
        expected.add("Segmentation")
    assert expected <= set(collected)


def test_dciodvfy_finds_errors_when_there_are_some(tool, srcs, tmp_path):
    """Control: the check can fail. Laterality removed where the body part is unknown (Type 2C)."""
    ct = srcs["CT uncompressed"]
    pm = ex.build_exports(_result(ct), ct, ex.ExportKinds(sr=False))[0]
    del pm.Laterality
    path = tmp_path / "broken_pm.dcm"
    pm.save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy(tool, path)
    assert any("Laterality" in e for e in errors)
