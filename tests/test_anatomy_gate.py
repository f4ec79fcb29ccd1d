"""X-ray anatomy gate (engine.ai.validity.anatomy_checks): refuses what is not a frontal adult human
chest radiograph, passes real frontal chest radiographs; wired into engine.ai.analysis."""
from __future__ import annotations

import numpy as np
import pytest

from engine.ai.validity import AnatomyHeader, GateBuilder, anatomy_checks, header_anatomy_checks, read_anatomy_header

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gate(gray, header=None):
    from engine.ai.preprocess.xray_lungs import segment_lungs_xray

    gate = GateBuilder()
    anatomy_checks(gate, segment_lungs_xray(gray), gray, header)
    return gate


def _dicom_gray(path):
    from engine.dicom.display import display_gray01
    from engine.dicom.pixels import load_frame

    frame = load_frame(path)
    g = display_gray01(frame)
    return (g.mean(axis=2) if g.ndim == 3 else g).astype(np.float32), frame


def _rg(name):
    from pydicom.data import get_testdata_file

    p = get_testdata_file(name)
    if p is None:
        pytest.skip(f"pydicom-data {name} not installed")
    return p


# ---------------------------------------------------------------- header facts (no model)

@pytest.mark.parametrize("header, check", [
    (AnatomyHeader(species="CANIS LUPUS FAMILIARIS"), "species_human"),
    (AnatomyHeader(species_code="448771007 CANIS LUPUS FAMILIARIS"), "species_human"),
    (AnatomyHeader(breed="BEAGLE"), "species_human"),
    (AnatomyHeader(descriptions="CANINE LATERAL THORAX 0-15CM"), "species_human"),
    (AnatomyHeader(age_years=5.0), "adult"),
    (AnatomyHeader(view_position="LL"), "frontal_projection"),
    (AnatomyHeader(patient_orientation=("A", "F")), "frontal_projection"),
    (AnatomyHeader(descriptions="CHEST LAT"), "frontal_projection"),
])
def test_header_refusals(header, check):
    gate = GateBuilder()
    header_anatomy_checks(gate, header)
    assert gate.checks[check] is False and not gate.passed
    assert gate.reasons and all(len(r) > 40 for r in gate.reasons)


def test_header_human_frontal_adult_passes():
    gate = GateBuilder()
    header_anatomy_checks(gate, AnatomyHeader(species="HOMO SAPIENS", age_years=62, view_position="PA",
                                              patient_orientation=("L", "F"), descriptions="CHEST PA"))
    assert gate.passed and "adult" in gate.checks
    gate = GateBuilder()
    header_anatomy_checks(gate, AnatomyHeader())           # nothing stated: nothing refused
    assert gate.passed


def test_no_lungs_reason_is_readable():
    from engine.ai.preprocess.xray_lungs import lungs_from_labels

    lab = np.zeros((200, 200), np.uint8)
    lab[50:60, 20:30] = 1                                  # one small region, 0.25% of the image
    gate = GateBuilder()
    anatomy_checks(gate, lungs_from_labels(lab))
    assert gate.checks == {"two_lungs": False}
    assert "No two lungs found" in gate.reasons[0] and "chest radiograph" in gate.reasons[0]


# ---------------------------------------------------------------- real images

def test_refuses_dog_thorax(shared_data):
    path = shared_data / "dicom" / "other_highdicom_dog_thorax_dx.dcm"
    gray, frame = _dicom_gray(path)
    header = read_anatomy_header(str(path), frame.pixel_spacing)
    assert "CANINE" in header.descriptions
    gate = _gate(gray, header)
    assert not gate.passed and gate.checks["species_human"] is False
    assert any("animal" in r for r in gate.reasons)
    image_only = _gate(gray, AnatomyHeader(pixel_spacing_mm=frame.pixel_spacing))   # header scrubbed
    assert not image_only.passed, image_only.checks


def test_refuses_tibia():
    gray, _ = _dicom_gray(_rg("RG3_UNCR.dcm"))
    gate = _gate(gray)
    assert not gate.passed, gate.checks


def test_refuses_ct_slice_fed_as_xray(shared_data):
    from engine.ai.preprocess.ct import hu_to_gray01

    gray, frame = _dicom_gray(shared_data / "dicom" / "ct_orthanc_ge_brightspeed_lung.dcm")
    assert not _gate(gray).passed
    assert not _gate(hu_to_gray01(frame.values.astype(np.float32))).passed   # in a lung window too


def test_refuses_blank_inverted_and_lateral(shared_data):
    from engine.training.datasets import load_gray01

    assert not _gate(np.zeros((512, 512), np.float32)).passed
    assert not _gate(np.full((512, 512), 0.5, np.float32)).passed
    gray, _ = _dicom_gray(shared_data / "dicom" / "xray_siim_1.dcm")
    assert _gate(gray).passed
    inv = _gate(1.0 - gray)
    assert not inv.passed, inv.checks
    lateral = _gate(gray, AnatomyHeader(view_position="LL"))
    assert lateral.checks["frontal_projection"] is False
    # a lateral-like image: one lung field across the whole image (the half with the right lung,
    # stretched to full width)
    half = gray[:, : gray.shape[1] // 2]
    stretched = np.repeat(half, 2, axis=1)
    assert not _gate(stretched).passed
    nih = load_gray01(sorted((shared_data / "xray" / "images" / "nih_cxr8_talo").glob("*"))[0])
    assert not _gate(1.0 - nih).passed


def test_passes_real_frontal_chest_radiographs(shared_data):
    paths = [_rg("RG1_UNCR.dcm")] + [shared_data / "dicom" / n for n in
                                     ("xray_wg04_rg1_j2ki.dcm", "xray_barre_crmono1chest.dcm", "xray_siim_1.dcm")]
    for p in paths:
        gray, frame = _dicom_gray(p)
        gate = _gate(gray, read_anatomy_header(str(p), frame.pixel_spacing))
        assert gate.passed, (str(p).rsplit("/", 1)[-1], gate.reasons)


def test_analysis_refuses_dog_with_anatomy_reason(shared_data):
    """Wired into the X-ray path: the dog DX (Body Part THORAX, so the header check alone passes it)."""
    from engine.ai.analysis import Analyzer
    from engine.dicom.records import InstanceRecord, SeriesRecord

    path = shared_data / "dicom" / "other_highdicom_dog_thorax_dx.dcm"
    s = SeriesRecord("2.25.1", "2.25.2", "anon", "DX", body_part="THORAX",
                     instances=[InstanceRecord(str(path), "2.25.3", 1)])
    r = Analyzer("cpu").analyze(s, want_heatmaps=False)
    assert not r.validity.passed
    assert r.validity.checks.get("species_human") is False
    assert not any(f.positive for f in r.findings)
