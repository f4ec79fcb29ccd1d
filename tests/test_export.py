"""AI results out as DICOM (SR TID 1500, Parametric Map, Secondary Capture) and back from Orthanc."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest

from engine.interop import export as ex
from engine.interop import network as net
from engine.interop.netconfig import NetworkSettings, Peer
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


def sr_groups(ds: pydicom.Dataset) -> dict[str, dict]:
    """TID 1501 measurement groups by tracking identifier: the Finding, finding site, NUM items
    as (concept, value, unit) and CODE items as concept -> value meaning."""
    out: dict[str, dict] = {}
    for top in ds.ContentSequence:
        if top.ConceptNameCodeSequence[0].CodeValue != "126010":          # Imaging Measurements
            continue
        for grp in top.ContentSequence:
            g = {"finding": None, "site": None, "num": [], "code": {}, "text": []}
            ident = ""
            for it in grp.ContentSequence:
                name = it.ConceptNameCodeSequence[0]
                if it.ValueType == "TEXT" and name.CodeValue == "112039":    # Tracking Identifier
                    ident = str(it.TextValue)
                elif it.ValueType == "TEXT":
                    g["text"].append(str(it.TextValue))
                elif it.ValueType == "CODE" and name.CodeValue == "121071":  # Finding
                    c = it.ConceptCodeSequence[0]
                    g["finding"] = (c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning)
                elif it.ValueType == "CODE" and name.CodeValue == "363698007":  # Finding Site
                    g["site"] = it.ConceptCodeSequence[0].CodeMeaning
                elif it.ValueType == "CODE":
                    g["code"][name.CodeMeaning] = it.ConceptCodeSequence[0].CodeMeaning
                elif it.ValueType == "NUM":
                    mv = it.MeasuredValueSequence[0]
                    g["num"].append(((name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning),
                                     float(mv.NumericValue), mv.MeasurementUnitsCodeSequence[0].CodeValue))
            out[ident] = g
    return out


PROBABILITY = ("122157", "DCM", "Probability")


def _check_written(path: Path, source: pydicom.Dataset) -> pydicom.Dataset:
    raw = path.read_bytes()
    assert raw[:128] == b"\x00" * 128 and raw[128:132] == b"DICM"
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SOPInstanceUID != source.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert not [e for e in ds.iterall() if e.tag.is_private]
    assert path.stat().st_mode & 0o777 == 0o644                       # readable by PACS tools (was 0600)
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
    groups = sr_groups(sr)
    # TID 1501: the disease is the Finding, the measurement is DCM 122157 Probability (PS3.16)
    expect = {"Pneumonia": (("233604007", "SCT", "Pneumonia"), 0.8312, "Present"),
              "Effusion": (("60046008", "SCT", "Pleural effusion"), 0.1204, "Absent"),
              "Lung Opacity": (("112001", "DCM", "Opacity"), 0.7741, "Present"),
              "COVID-19": (("840539006", "SCT", "COVID-19"), 0.663, "Present")}
    for label, (finding, p, verdict) in expect.items():
        g = groups[f"AI finding: {label}"]
        assert g["finding"] == finding and g["site"] == "Lung"
        assert g["num"] == [(PROBABILITY, p, "{probability}")]
        assert g["code"] == {"Presence of property": verdict}
    sev = groups["AI severity (Cohen et al. 2020)"]
    assert sev["finding"] == ("112001", "DCM", "Opacity")
    assert sev["num"] == [(("260858005", "SCT", "Extent (attribute)"), 4.31, "{score}"),
                          (("246112005", "SCT", "Severity (attribute)"), 2.87, "{score}")]
    # every concept is standard here, so no private scheme is used or declared
    assert not [e for e in sr.iterall() if e.keyword == "CodingSchemeDesignator" and e.value == ex.LOCAL_SCHEME]
    assert "CodingSchemeIdentificationSequence" not in sr
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
    assert not [n for g in sr_groups(sr).values() for n in g["num"]]      # no measurements at all
    texts = [val for vt, _, val in items if vt == "TEXT"]
    assert f"Model {XR} {XV} is untrained: no findings reported." in texts and RESEARCH_USE in texts


def test_ct_result_sr_references_slices_and_validity(sources):
    paths = sources["ct"]
    srcs = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    sr = ex.build_exports(ct_result(paths), paths, ex.ExportKinds(parametric_map=False))[0]
    items = sr_items(sr)
    study = sr_groups(sr)["AI CT study score"]
    assert study["finding"] == ("840539006", "SCT", "COVID-19")
    assert study["num"] == [(PROBABILITY, 0.2731, "{probability}"),
                            (("118565006", "SCT", "Volume"), 4312.5, "mL")]
    assert [n[1] for n in sr_groups(sr)["AI CT slice scores"]["num"]] == [0.2731, 0.19, 0.11]
    # the top slice score references the slice it came from
    assert srcs[2].SOPInstanceUID in [val for vt, _, val in items if vt == "IMAGE"]
    texts = [val for vt, _, val in items if vt == "TEXT"]
    assert any("Validity gate FAILED" in t and "slice spacing" in t for t in texts)
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert len(ev.ReferencedSOPSequence) == 3


def test_parametric_map_holds_the_float_heatmap(sources, tmp_path):
    # A radiograph has no Frame of Reference: its heatmap goes out as a Secondary Capture, never as a
    # Parametric Map with invented patient coordinates (dciodvfy found 9-11 errors in those).
    cr_path = sources["cr"][0]
    cr = pydicom.dcmread(cr_path, stop_before_pixels=True)
    out = ex.export_to_folder(xray_result(cr_path), [cr_path], tmp_path / "pm", ex.ExportKinds(sr=False))
    assert [pydicom.dcmread(p).SOPClassUID for p in out] == ["1.2.840.10008.5.1.4.1.1.7"]
    sc = _check_written(out[0], cr)
    assert sc.BurnedInAnnotation == "YES" and sc.BodyPartExamined == "CHEST" and "Laterality" not in sc
    with pytest.raises(ex.ExportError, match="Frame of Reference"):
        ex.build_parametric_maps(xray_result(cr_path), [cr])
    # CT: the heatmap sits on slice_index 2 and references that slice, same size as the slice
    ct_paths = sources["ct"]
    pm_ct = ex.build_exports(ct_result(ct_paths), ct_paths, ex.ExportKinds(sr=False))[0]
    assert pm_ct.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and "FloatPixelData" in pm_ct
    np.testing.assert_allclose(pm_ct.pixel_array, _blob((128, 128), 60, 40, 12), atol=1e-6)
    assert pm_ct.ContentQualification == "RESEARCH" and pm_ct.FrameOfReferenceUID
    assert pm_ct.Laterality == ""                  # CT_small has no body part: laterality unknown, Type 2
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
    assert res.ok and len(res.sent) == 2, res.failed            # a radiograph: SR + one SC, no PM
    # the results joined the source study in the PACS, as two new series
    study = net.find_studies(settings, peer, net.StudyQuery(study_uid=cr.StudyInstanceUID))[0]
    assert study.n_series == 3 and set(study.modalities) >= {"CR", "SR", "OT"}
    read = {}
    for uid in res.sent:
        ids = server.find_instances(SOPInstanceUID=uid)
        assert len(ids) == 1
        ds = pydicom.dcmread(io.BytesIO(server.instance_file(ids[0])))
        read[str(ds.SOPClassUID)] = ds
    sr = read["1.2.840.10008.5.1.4.1.1.88.34"]
    items = sr_items(sr)
    probs = {g["finding"][2]: g["num"][0][1] for g in sr_groups(sr).values() if g["num"] and g["finding"]
             and g["num"][0][0] == PROBABILITY}
    assert probs["Pneumonia"] == 0.8312 and probs["COVID-19"] == 0.663 and probs["Opacity"] == 0.7741
    assert any(name == "Algorithm Version" and val == XV for _, name, val in items)
    assert RESEARCH_USE in [val for vt, _, val in items if vt == "TEXT"]
    sc = read["1.2.840.10008.5.1.4.1.1.7"]
    assert sc.BurnedInAnnotation == "YES" and (sc.pixel_array[:40] > 200).all(axis=2).sum() > 500
    # and over DICOM: C-GET the SR series back into a local store
    got = net.get(settings, peer, cr.StudyInstanceUID, series_uid=sr.SeriesInstanceUID, root=tmp_path)
    assert got.completed == 1 and sr_items(pydicom.dcmread(got.stored[0].path)) == items


# --------------------------------------------------------------------------------------------
# real-world headers (issue: a Konica CR with an empty Patient Orientation crashed the export)
# --------------------------------------------------------------------------------------------
def _variant(src: Path, out: Path, **changes) -> Path:
    """A changed copy of ``src`` written as ``<out's folder>/src/<out's name>`` (an input folder)."""
    ds = pydicom.dcmread(src)
    for k, v in changes.items():
        setattr(ds, k, v)
    path = out.parent / "src" / out.name
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_cr_with_empty_patient_orientation_exports(sources, tmp_path):
    """Patient Orientation (0020,0020) is Type 2: empty is legal. highdicom indexed it for the TID
    1603 image library descriptors and raised IndexError, so nothing was exported."""
    src = _variant(sources["cr"][0], tmp_path / "konica_like.dcm", PatientOrientation="",
                   ImagerPixelSpacing=[0.175, 0.175])
    paths = ex.export_to_folder(xray_result(src), [src], tmp_path / "out")       # default kinds
    read = {str(pydicom.dcmread(p).SOPClassUID): pydicom.dcmread(p) for p in paths}
    assert set(read) == {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"}
    items = sr_items(read["1.2.840.10008.5.1.4.1.1.88.34"])
    names = [name for _, name, _ in items]
    # the image library keeps the descriptors the source has values for, and invents none
    assert ("NUM", "Horizontal Pixel Spacing", (0.175, "mm")) in items
    assert "Patient Orientation Row" not in names and "Patient Orientation Column" not in names
    assert ("CODE", "Modality", "Computed Radiography") in items
    sc = read["1.2.840.10008.5.1.4.1.1.7"]
    assert sc.PatientOrientation == "" or list(sc.PatientOrientation) == []     # unknown stays empty
    # with both values present they are carried into the library
    full = _variant(sources["cr"][0], tmp_path / "oriented.dcm", PatientOrientation=["P", "F"],
                    ImagerPixelSpacing=[0.175, 0.175])
    items = sr_items(ex.build_exports(xray_result(full), [full], ex.ExportKinds(parametric_map=False))[0])
    assert ("TEXT", "Patient Orientation Row", "P") in items


def test_unexpected_builder_failure_is_one_clear_export_error(sources, monkeypatch):
    def boom(*a, **k):
        raise IndexError("list index out of range")

    monkeypatch.setattr(ex, "build_sr", boom)
    with pytest.raises(ex.ExportError, match="Could not build the DICOM result objects \\(IndexError"):
        ex.build_exports(xray_result(sources["cr"][0]), sources["cr"])


def test_patient_name_never_reaches_stderr_or_warnings(sources, tmp_path, capfd, caplog):
    """highdicom's UserWarning quotes a one-component patient name; it must not escape the export."""
    import logging
    import warnings

    secret = "Dulcineadeltoboso"
    src = _variant(sources["cr"][0], tmp_path / "one_name.dcm", PatientName=secret)
    ct = [_variant(p, tmp_path / f"ct{i}.dcm", PatientName=secret) for i, p in enumerate(sources["ct"])]
    kinds = ex.ExportKinds(sr=True, parametric_map=True, secondary_capture=True)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        ex.export_to_folder(xray_result(src), [src], tmp_path / "a", kinds)
        ex.export_to_folder(ct_result(ct), ct, tmp_path / "b", kinds)
    err = capfd.readouterr()
    assert not [w for w in caught if secret in str(w.message)], [str(w.message)[:80] for w in caught]
    assert secret not in err.err and secret not in err.out and secret not in caplog.text
    assert "suppressed" in caplog.text                     # the warnings happened, and were counted


def test_local_scheme_only_for_labels_without_a_standard_concept(sources):
    src = sources["cr"][0]
    result = xray_result(src)
    result.findings.append(Finding("Other pneumonia", 0.2, 0.5, False, XR, XV))
    sr = ex.build_exports(result, [src], ex.ExportKinds(parametric_map=False))[0]
    g = sr_groups(sr)["AI finding: Other pneumonia"]
    assert g["finding"][1] == ex.LOCAL_SCHEME and g["num"][0][0] == PROBABILITY
    decl = sr.CodingSchemeIdentificationSequence[0]
    assert decl.CodingSchemeDesignator == ex.LOCAL_SCHEME and decl.CodingSchemeName
    used = {e.value for e in sr.iterall() if e.keyword == "CodingSchemeDesignator"}
    assert used <= {"DCM", "SCT", "UCUM", "RFC5646", ex.LOCAL_SCHEME}         # RFC5646: language
