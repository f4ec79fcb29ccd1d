"""AI results out as DICOM (SR TID 1500, Parametric Map, Secondary Capture) and back from Orthanc."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest

from engine.dicom import export as ex
from engine.dicom import network as net
from engine.netconfig import NetworkSettings, Peer
from engine.results import (RESEARCH_USE, CTSliceScore, Finding, Heatmap, ModelInfo, Severity,
                            StudyResult, Validity)
from tests.orthanc_server import OrthancServer, ensure_orthanc, make_sources

pytestmark = pytest.mark.timeout(300)
XR, XV = "xray-densenet121", "1.3.0"
CT, CV = "ct-inception", "0.9.1"


# --------------------------------------------------------------------------------------------
# fixtures: real source images and realistic results
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, list[Path]]:
    return make_sources(tmp_path_factory.mktemp("src"))


def _blob(shape, cy, cx, r) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * r * r)).astype(np.float32)


def xray_result(path: Path, trained: bool = True) -> StudyResult:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    f = [Finding("Pneumonia", 0.8312, 0.52, trained, XR, XV),
         Finding("Effusion", 0.1204, 0.41, False, XR, XV),
         Finding("Lung Opacity", 0.7741, 0.50, trained, XR, XV),
         Finding("COVID-19", 0.6630, 0.60, trained, XR, XV)]
    hm = _blob((224, 224), 90, 70, 25)        # model-sized map: export resizes to the image
    return StudyResult(
        study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID), modality="CR",
        kind="xray", validity=Validity(True, [], ood_score=0.21, ood_threshold=0.6), findings=f,
        severity=Severity(4.31, 2.87, 1.0231, XR, XV),
        heatmaps=[Heatmap("Pneumonia", hm, XR, XV)],
        models=[ModelInfo(XR, XV, trained, "ab" * 32, label=f"ChestView X-ray DenseNet-121 {XV}")])


def ct_result(paths: list[Path]) -> StudyResult:
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return StudyResult(
        study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID), modality="CT", kind="ct",
        validity=Validity(False, ["slice spacing 5.0 mm exceeds 3 mm"]),
        findings=[Finding("COVID-19", 0.2731, 0.5, False, CT, CV)],
        heatmaps=[Heatmap("COVID-19", _blob((128, 128), 60, 40, 12), CT, CV, slice_index=2)],
        models=[ModelInfo(CT, CV, True, "cd" * 32)], ct_study_probability=0.2731,
        ct_slice_scores=[CTSliceScore(0, -75.7, 0.11), CTSliceScore(2, -65.7, 0.2731), CTSliceScore(1, -70.7, 0.19)],
        lung_volume_ml=4312.5)


def sr_items(ds: pydicom.Dataset) -> list[tuple[str, str, object]]:
    """Flatten an SR content tree into (value type, concept name, value) triples."""
    out: list[tuple[str, str, object]] = []

    def walk(items):
        for it in items:
            name = it.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in it else ""
            vt = it.ValueType
            val: object = None
            if vt == "TEXT":
                val = str(it.TextValue)
            elif vt == "NUM":
                mv = it.MeasuredValueSequence[0]
                val = (float(mv.NumericValue), mv.MeasurementUnitsCodeSequence[0].CodeValue)
            elif vt == "CODE":
                val = it.ConceptCodeSequence[0].CodeMeaning
            elif vt == "IMAGE":
                val = str(it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            out.append((vt, str(name), val))
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(ds.ContentSequence)
    return out


def _check_written(path: Path, source: pydicom.Dataset) -> pydicom.Dataset:
    raw = path.read_bytes()
    assert raw[:128] == b"\x00" * 128 and raw[128:132] == b"DICM"
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SOPInstanceUID != source.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert not [e for e in ds.iterall() if e.tag.is_private]
    return ds


# --------------------------------------------------------------------------------------------
# building objects (no network)
# --------------------------------------------------------------------------------------------
def test_sr_holds_findings_severity_model_and_research_text(sources, tmp_path):
    src_path = sources["cr"][0]
    src = pydicom.dcmread(src_path, stop_before_pixels=True)
    paths = ex.export_to_folder(xray_result(src_path), [src_path], tmp_path / "out",
                                ex.ExportKinds(sr=True, parametric_map=False))
    assert len(paths) == 1 and paths[0].name.startswith("SR_")
    sr = _check_written(paths[0], src)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"               # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.PatientID == src.PatientID and "RESEARCH USE ONLY" in sr.SeriesDescription
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert ev.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    items = sr_items(sr)
    nums = {name: val for vt, name, val in items if vt == "NUM"}
    assert nums["Pneumonia"] == (0.8312, "{probability}")
    assert nums["Pleural effusion"] == (0.1204, "{probability}")              # SNOMED CT 60046008
    assert nums["Lung Opacity"] == (0.7741, "{probability}")                  # local code
    assert nums["COVID-19"] == (0.663, "{probability}")
    assert nums["Geographic extent score (0-8)"] == (4.31, "{score}")
    assert nums["Opacity score (0-6)"] == (2.87, "{score}")
    verdicts = [val for vt, name, val in items if name == "Above model operating threshold"]
    assert verdicts == ["Yes", "No", "Yes", "Yes"]
    texts = [val for vt, _, val in items if vt == "TEXT"]
    assert texts.count(RESEARCH_USE) == 5                                      # one per group
    assert any(name == "Algorithm Version" and val == XV for _, name, val in items)
    assert any(name == "Algorithm Name" and val == XR for _, name, val in items)
    assert ("IMAGE", "Source", src.SOPInstanceUID) in items or \
        any(vt == "IMAGE" and val == src.SOPInstanceUID for vt, _, val in items)
    assert "Validity gate passed." in texts


def test_untrained_model_reports_no_findings(sources):
    src_path = sources["cr"][0]
    sr = ex.build_exports(xray_result(src_path, trained=False), [src_path], ex.ExportKinds(parametric_map=False))[0]
    items = sr_items(sr)
    assert not [i for i in items if i[0] == "NUM"]
    texts = [val for vt, _, val in items if vt == "TEXT"]
    assert f"Model {XR} {XV} is untrained: no findings reported." in texts and RESEARCH_USE in texts


def test_ct_result_sr_references_slices_and_validity(sources):
    paths = sources["ct"]
    srcs = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    sr = ex.build_exports(ct_result(paths), paths, ex.ExportKinds(parametric_map=False))[0]
    items = sr_items(sr)
    assert any(vt == "NUM" and name == "Study-level probability" and val == (0.2731, "{probability}")
               for vt, name, val in items)
    assert any(vt == "NUM" and name == "Lung volume" and val == (4312.5, "mL") for vt, name, val in items)
    # the top slice score references the slice it came from
    assert srcs[2].SOPInstanceUID in [val for vt, _, val in items if vt == "IMAGE"]
    texts = [val for vt, _, val in items if vt == "TEXT"]
    assert any("Validity gate FAILED" in t and "slice spacing" in t for t in texts)
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert len(ev.ReferencedSOPSequence) == 3


def test_parametric_map_holds_the_float_heatmap(sources, tmp_path):
    cr_path = sources["cr"][0]
    cr = pydicom.dcmread(cr_path, stop_before_pixels=True)
    result = xray_result(cr_path)
    out = ex.export_to_folder(result, [cr_path], tmp_path / "pm", ex.ExportKinds(sr=False, parametric_map=True))
    pm = _check_written(out[0], cr)
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and "FloatPixelData" in pm
    arr = pm.pixel_array.astype(np.float32)
    assert arr.shape == (cr.Rows, cr.Columns)
    # resized 224x224 Gaussian: peak lands where (90, 70) maps to in the full image
    peak = np.unravel_index(np.argmax(arr), arr.shape)
    assert abs(peak[0] - 90 * cr.Rows / 224) < 12 and abs(peak[1] - 70 * cr.Columns / 224) < 12
    assert 0.0 <= arr.min() and arr.max() <= 1.0 and arr.max() > 0.95
    assert pm.ContentQualification == "RESEARCH"
    ref = pm.SharedFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0] \
        if "DerivationImageSequence" in pm.SharedFunctionalGroupsSequence[0] else \
        pm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == cr.SOPInstanceUID
    # CT: the heatmap sits on slice_index 2 and references that slice, same size as the slice
    ct_paths = sources["ct"]
    pm_ct = ex.build_exports(ct_result(ct_paths), ct_paths, ex.ExportKinds(sr=False))[0]
    np.testing.assert_allclose(pm_ct.pixel_array, _blob((128, 128), 60, 40, 12), atol=1e-6)
    refs = [str(s.ReferencedSOPInstanceUID) for fg in pm_ct.PerFrameFunctionalGroupsSequence
            for d in fg.get("DerivationImageSequence", []) for s in d.SourceImageSequence]
    refs += [str(s.ReferencedSOPInstanceUID) for d in pm_ct.SharedFunctionalGroupsSequence[0].get(
        "DerivationImageSequence", []) for s in d.SourceImageSequence]
    assert refs == [str(pydicom.dcmread(ct_paths[2], stop_before_pixels=True).SOPInstanceUID)]
    assert not [e for e in pm_ct.iterall() if e.tag.is_private]       # CT_small has 179 private tags


def test_secondary_capture_is_labelled_and_blended(sources, tmp_path, artifacts_dir):
    cr_path = sources["cr"][0]
    cr = pydicom.dcmread(cr_path)
    out = ex.export_to_folder(xray_result(cr_path), [cr_path], tmp_path / "sc",
                              ex.ExportKinds(sr=False, parametric_map=False, secondary_capture=True))
    sc = _check_written(out[0], cr)
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.BurnedInAnnotation == "YES"
    assert sc.PhotometricInterpretation == "RGB" and RESEARCH_USE in sc.ImageComments
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == cr.SOPInstanceUID
    rgb = sc.pixel_array
    assert rgb.shape == (cr.Rows, cr.Columns, 3)
    band = rgb[:40]
    assert (band == 0).all(axis=2).mean() > 0.5 and (band > 200).all(axis=2).sum() > 500   # black band, white text
    cy, cx = int(90 * cr.Rows / 224), int(70 * cr.Columns / 224)
    hot = rgb[cy - 20:cy + 20, cx - 20:cx + 20].astype(int)
    cold = rgb[-300:-200, -300:-200].astype(int)
    assert np.abs(hot[..., 0] - hot[..., 2]).mean() > 40                 # coloured where the heatmap is
    assert np.abs(cold[..., 0] - cold[..., 2]).mean() < 3                 # grey elsewhere
    from PIL import Image

    Image.fromarray(rgb).resize((cr.Columns // 3, cr.Rows // 3)).save(artifacts_dir / "export_secondary_capture.png")


def test_export_refuses_input_folder_and_failed_results(sources, tmp_path):
    cr_path = sources["cr"][0]
    with pytest.raises(ex.ExportError, match="input folder"):
        ex.export_to_folder(xray_result(cr_path), [cr_path], cr_path.parent)
    with pytest.raises(ex.ExportError, match="input folder"):
        ex.export_to_folder(xray_result(cr_path), [cr_path], cr_path.parent / "results")
    failed = xray_result(cr_path)
    failed.error = "model file missing"
    with pytest.raises(ex.ExportError, match="analysis failed"):
        ex.build_exports(failed, [cr_path])
    with pytest.raises(ex.ExportError, match="different study"):
        ex.build_exports(xray_result(cr_path), sources["ct"][:1])
    assert sorted(p.name for p in cr_path.parent.iterdir()) == sorted(
        [cr_path.name] + [p.name for p in sources["ct"]])                   # input folder untouched


# --------------------------------------------------------------------------------------------
# send to a real PACS and read back
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, sources):
    exe = ensure_orthanc()
    if exe is None:
        pytest.skip("Debian 'orthanc' is not installed and cannot be installed here (needs root + apt)")
    server = OrthancServer(exe, tmp_path_factory.mktemp("orthanc"))
    try:
        server.start()
        settings = NetworkSettings(ae_title="CHESTVIEW", timeout_s=20)
        peer = Peer("Test PACS", "ORTHANC", "127.0.0.1", server.dicom_port)
        assert net.send(settings, peer, sources["cr"] + sources["ct"]).ok
        yield settings, peer, server
    finally:
        server.stop()


def test_send_results_to_orthanc_and_read_back(orthanc, sources, tmp_path):
    settings, peer, server = orthanc
    cr_path = sources["cr"][0]
    cr = pydicom.dcmread(cr_path, stop_before_pixels=True)
    kinds = ex.ExportKinds(sr=True, parametric_map=True, secondary_capture=True)
    res = ex.send_results(xray_result(cr_path), [cr_path], settings, peer, kinds)
    assert res.ok and len(res.sent) == 3, res.failed
    # the results joined the source study in the PACS, as three new series
    study = net.find_studies(settings, peer, net.StudyQuery(study_uid=cr.StudyInstanceUID))[0]
    assert study.n_series == 4 and set(study.modalities) >= {"CR", "SR", "OT"}
    read = {}
    for uid in res.sent:
        ids = server.find_instances(SOPInstanceUID=uid)
        assert len(ids) == 1
        ds = pydicom.dcmread(io.BytesIO(server.instance_file(ids[0])))
        read[str(ds.SOPClassUID)] = ds
    sr = read["1.2.840.10008.5.1.4.1.1.88.34"]
    items = sr_items(sr)
    nums = {name: val[0] for vt, name, val in items if vt == "NUM"}
    assert nums["Pneumonia"] == 0.8312 and nums["COVID-19"] == 0.663 and nums["Lung Opacity"] == 0.7741
    assert any(name == "Algorithm Version" and val == XV for _, name, val in items)
    assert RESEARCH_USE in [val for vt, _, val in items if vt == "TEXT"]
    pm = read["1.2.840.10008.5.1.4.1.1.30"]
    assert pm.pixel_array.dtype == np.float32 and pm.pixel_array.shape == (cr.Rows, cr.Columns)
    sc = read["1.2.840.10008.5.1.4.1.1.7"]
    assert sc.BurnedInAnnotation == "YES" and (sc.pixel_array[:40] > 200).all(axis=2).sum() > 500
    # and over DICOM: C-GET the SR series back into a local store
    got = net.get(settings, peer, cr.StudyInstanceUID, series_uid=sr.SeriesInstanceUID, root=tmp_path)
    assert got.completed == 1 and sr_items(pydicom.dcmread(got.stored[0].path)) == items
