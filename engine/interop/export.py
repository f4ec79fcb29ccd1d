"""AI results out as standard DICOM, built with highdicom (research use only).

* Comprehensive 3D SR with a TID 1500 Measurement Report (PS3.16 TID 1500/1501): one
  measurement group per finding (probability, operating-threshold verdict, algorithm name and
  version per TID 4019), a severity group (Cohen et al. 2020 scores), CT study/slice scores,
  and "Research use only, not for diagnostic use" plus validity-gate reasons as TEXT comments.
* Parametric Map (PS3.3 A.75) holding the float Grad-CAM heatmap of a cross-sectional image, or
* a Secondary Capture (PS3.3 A.8) of the source image blended with a colour heatmap and a
  burned-in "RESEARCH USE ONLY — AI heatmap <model> <version>" banner.

Why a projection radiograph (CR/DX, no Frame of Reference) never gets a Parametric Map: the PM IOD
requires the Frame of Reference module and the Plane Position/Orientation (Patient) functional
groups (PS3.3 A.75.3, A.75.4), i.e. patient coordinates that a projection image does not have;
inventing them would make a viewer place the map in a space that does not exist. A Grayscale
Softcopy Presentation State cannot carry a continuous map (its overlays are 1 bit, PS3.3 C.9.2).
So for those sources the heatmap goes out as the labelled Secondary Capture, which PS3.3 A.8
allows for any image and every PACS displays.

Codes: measurement concepts come from PS3.16 (DCM 122157 Probability, SCT 118565006 Volume,
SCT 260858005 Extent, SCT 246112005 Severity, DCM 121052 Presence of property) with the disease as
the TID 1501 Finding; a private scheme, declared in the Coding Scheme Identification Sequence
(PS3.3 C.12.1.1.2), is used only for finding labels PS3.16 and SNOMED CT have no concept for.

Every object gets new SOP Instance and Series UIDs, keeps the source StudyInstanceUID (same
study, new series), references its source images, has a zeroed 128-byte preamble and carries no
private tags. Files are written to a folder that is never an input folder, or C-STOREd to a peer.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from pydicom import Dataset, dcmwrite
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from engine.dicom.display import display_gray01
from engine.dicom.pixels import load_frame, read_header, split_zip_path
from engine.results import RESEARCH_USE, Heatmap, StudyResult

log = logging.getLogger(__name__)

MANUFACTURER = "ChestView"
SOFTWARE_VERSION = "0.1.0"
SR_SERIES_NUMBER = 9900
PM_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
FILE_MODE = 0o644                  # exported files are readable by the workstation's other users
LOCAL_SCHEME = "99CHESTVIEW"      # private coding scheme (PS3.16 8.2: "99" prefix) for our labels

# SNOMED CT (and DCM) concepts for findings we can name with confidence; others use LOCAL_SCHEME.
SNOMED_FINDINGS = {
    "lung opacity": ("112001", "Opacity", "DCM"),          # PS3.16 CID 6102 chest finding
    "normal": ("17621005", "Normal"),
    "atelectasis": ("46621007", "Atelectasis"),
    "cardiomegaly": ("8186001", "Cardiomegaly"),
    "consolidation": ("95436008", "Lung consolidation"),
    "edema": ("19242006", "Pulmonary edema"),
    "effusion": ("60046008", "Pleural effusion"),
    "pleural effusion": ("60046008", "Pleural effusion"),
    "emphysema": ("87433001", "Pulmonary emphysema"),
    "pneumonia": ("233604007", "Pneumonia"),
    "pneumothorax": ("36118008", "Pneumothorax"),
    "covid-19": ("840539006", "COVID-19"),
    "covid": ("840539006", "COVID-19"),
    "mass": ("4147007", "Mass"),
    "nodule": ("27925004", "Nodule"),
    "fracture": ("125605004", "Fracture of bone"),
}
PROCEDURE_XRAY = ("399208008", "SCT", "Plain chest X-ray")
PROCEDURE_CT = ("169069000", "SCT", "Computed tomography of chest")
BANNER = "RESEARCH USE ONLY — AI heatmap"


class ExportError(Exception):
    """Results could not be exported; the message says what to do."""


def _hd():
    """highdicom imported on first use (it is heavy and the viewer imports this module lazily)."""
    import highdicom as hd

    return hd


def _code(value: str, scheme: str, meaning: str):
    return _hd().sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning[:64])


def _local_scheme():
    """Coding Scheme Identification (PS3.3 C.12.1.1.2) declaring our private scheme."""
    return _hd().coding_schemes.CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME, name="ChestView local codes", responsible_organization=MANUFACTURER)


def finding_concept(label: str):
    """SNOMED CT concept for a finding label when known, else a local code (meaning = the label)."""
    key = label.strip().lower()
    if key in SNOMED_FINDINGS:
        v, m, *scheme = SNOMED_FINDINGS[key]
        return _code(v, scheme[0] if scheme else "SCT", m)
    value = "".join(ch if ch.isalnum() else "-" for ch in label.upper())[:16] or "FINDING"
    return _code(value, LOCAL_SCHEME, label)


def _uses_local_scheme(ds: Dataset) -> bool:
    """True when any code in ``ds`` is from LOCAL_SCHEME (then it must be declared, PS3.3 C.12.1.1.2)."""
    return any(e.keyword == "CodingSchemeDesignator" and e.value == LOCAL_SCHEME for e in ds.iterall())


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
# Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that the
# result objects copy: a source that omits one (not conformant, but seen in orthanc-tests' GE CT)
# gets it empty, as Type 2 permits, instead of failing the builders.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


def read_sources(source_paths: Sequence[str | Path]) -> list[Dataset]:
    """Headers of the source images (order kept: CT in volume order so slice_index applies)."""
    if not source_paths:
        raise ExportError("No source images given: export needs the image(s) the AI analysed.")
    headers = [read_header(p) for p in source_paths]
    for ds in headers:                     # in-memory header copies; the files are never touched
        for kw in TYPE2_COPIED:
            if kw not in ds:
                setattr(ds, kw, "")
        _normalise_date_time(ds)
    return headers


def _normalise_date_time(ds: Dataset) -> None:
    """ACR-NEMA style dates/times ("1995.01.02", "11:42:21", PS3.5 6.2 notes) in the copied study
    attributes are rewritten in DICOM form; a value that is still malformed becomes empty (Type 2)."""
    for kw, pattern, drop in (("StudyDate", r"\d{8}", ".-/"), ("StudyTime", r"\d{2,6}(\.\d{1,6})?", ":")):
        raw = ds.get(kw)
        if raw is None:
            continue
        text = str(raw).strip()
        for ch in drop:
            text = text.replace(ch, "")
        setattr(ds, kw, text if re.fullmatch(pattern, text) else "")


def _input_folders(source_paths: Sequence[str | Path]) -> set[Path]:
    return {Path(split_zip_path(p)[0]).resolve().parent for p in source_paths}


def check_output_folder(out_dir: Path, source_paths: Sequence[str | Path]) -> Path:
    """Refuse to write into (or under) a folder the source images came from (DESIGN.md 5)."""
    out = Path(out_dir).resolve()
    for folder in _input_folders(source_paths):
        if out == folder or folder in out.parents:
            raise ExportError(f"Export folder {out} is an input folder (or inside one): choose "
                              "another folder; ChestView never writes next to the original images.")
    return out


def _finish(ds: Dataset) -> Dataset:
    """PS3.10 7.1 zeroed preamble; drop private tags (never copied blindly, DESIGN.md 5)."""
    ds.remove_private_tags()
    ds.preamble = b"\x00" * 128
    age = str(ds.get("PatientAge", "") or "")
    if age and not re.fullmatch(r"\d{3}[DWMY]", age):
        del ds.PatientAge                  # Type 3; a malformed source value (e.g. "62") is not copied
    if "SeriesDescription" not in ds:
        ds.SeriesDescription = "ChestView AI - RESEARCH USE ONLY"
    return ds


def _model_infos(result: StudyResult) -> dict[tuple[str, str], object]:
    return {(m.name, m.version): m for m in result.models}


def _trained(result: StudyResult, name: str, version: str) -> bool:
    info = _model_infos(result).get((name, version))
    return bool(getattr(info, "trained", False)) if info is not None else False


# --------------------------------------------------------------------------------------------
# Comprehensive 3D SR / TID 1500
# --------------------------------------------------------------------------------------------
def _comment(text: str):
    hd = _hd()
    return hd.sr.TextContentItem(name=codes.DCM.Comment, value=text[:1024],
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _group(identifier: str, *, measurements, qualitative=None, finding_type=None, finding_sites=None,
           algorithm=None, source_images=None, comments: Sequence[str] = ()):
    hd = _hd()
    grp = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=identifier[:64]),
        finding_type=finding_type, finding_sites=finding_sites, algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=qualitative or None, source_images=source_images or None)
    for text in comments:
        grp[0].ContentSequence.append(_comment(text))
    return grp


def _algorithm(name: str, version: str, params: Sequence[str] = ()):
    return _hd().sr.AlgorithmIdentification(name=name, version=version, parameters=list(params) or None,
                                            manufacturer=MANUFACTURER)


def _validity_text(result: StudyResult) -> str:
    v = result.validity
    if v.passed:
        return "Validity gate passed."
    reasons = "; ".join(v.reasons) or "no reason given"
    return f"Validity gate FAILED, scores are not reliable: {reasons}"


def _lung_site():
    return _hd().sr.FindingSite(anatomic_location=codes.SCT.Lung)


def _verdict(positive: bool):
    """TID 1501 qualitative evaluation: the model output is at/above its operating threshold or not."""
    hd = _hd()
    return hd.sr.QualitativeEvaluation(name=codes.DCM.PresenceOfProperty,
                                       value=codes.SCT.Present if positive else codes.SCT.Absent)


def _projection_descriptors(src: Dataset) -> list:
    """TID 1603 rows that ``src`` has values for.

    Patient Orientation (0020,0020) is Type 2 (PS3.3 C.7.6.1.1.1) and Imager Pixel Spacing is
    optional in CR: an empty or absent value cannot fill a row, so the row is left out rather than
    invented (highdicom indexes both unconditionally and fails with IndexError/AttributeError).
    """
    hd = _hd()
    rel = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    out = []
    po = [str(v) for v in (src.get("PatientOrientation") or []) if str(v)]
    if len(po) == 2:
        out += [hd.sr.TextContentItem(name=codes.DCM.PatientOrientationRow, value=po[0], relationship_type=rel),
                hd.sr.TextContentItem(name=codes.DCM.PatientOrientationColumn, value=po[1], relationship_type=rel)]
    sp = src.get("ImagerPixelSpacing")
    if sp is not None and len(sp) == 2 and all(float(v) > 0 for v in sp):
        out += [hd.sr.NumContentItem(name=codes.DCM.HorizontalPixelSpacing, value=float(sp[1]),
                                     relationship_type=rel, unit=codes.UCUM.Millimeter),
                hd.sr.NumContentItem(name=codes.DCM.VerticalPixelSpacing, value=float(sp[0]),
                                     relationship_type=rel, unit=codes.UCUM.Millimeter)]
    return out


_PROJECTION_MODALITIES = {"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"}


def _library_view(src: Dataset) -> tuple[Dataset, list]:
    """The header highdicom's TID 1600 builder gets, and the TID 1603 rows to add afterwards.

    For projection images the TID 1603 rows are built here (only those with values); highdicom is
    given a copy whose Modality does not select its own TID 1603 branch. The Modality row itself
    comes from the SOP Class (highdicom ``_get_coded_modality``), so it still says CR/DX.
    """
    if str(src.get("Modality", "")) not in _PROJECTION_MODALITIES:
        return src, []
    view = Dataset()
    view.update(src)
    view.Modality = "OT"
    return view, _projection_descriptors(src)


def _add_library_descriptors(report_root: Dataset, extra: dict[str, list]) -> None:
    """Append TID 1603 rows to the Image Library entries of the given SOP Instance UIDs."""
    for item in report_root.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue != codes.DCM.ImageLibrary.value:
            continue
        for group in item.get("ContentSequence", []):
            for entry in group.get("ContentSequence", []):
                if entry.ValueType != "IMAGE":
                    continue
                rows = extra.get(str(entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
                if rows:
                    entry.ContentSequence.extend(rows)


def build_sr(result: StudyResult, sources: Sequence[Dataset]) -> Dataset:
    """Comprehensive 3D SR (TID 1500) for ``result``, referencing ``sources`` (same study).

    One TID 1501 group per finding: Finding = the disease, measurement DCM 122157 Probability,
    qualitative evaluation DCM 121052 Presence of property = Present/Absent at the model's
    operating threshold (stated as an algorithm parameter, TID 4019), finding site Lung.
    """
    hd = _hd()
    if result.error:
        raise ExportError(f"The analysis failed ({result.error}); there is nothing to export. "
                          "Re-run the analysis first.")
    _check_same_study(result, sources)
    prob_unit = _code("{probability}", "UCUM", "probability")
    score_unit = _code("{score}", "UCUM", "score")
    src_items = [hd.sr.SourceImageForMeasurementGroup.from_source_image(s) for s in sources[:1]]
    validity = _validity_text(result)
    groups = []
    skipped_untrained: set[tuple[str, str]] = set()
    for f in result.findings:
        if not _trained(result, f.model_name, f.model_version):
            skipped_untrained.add((f.model_name, f.model_version))
            continue
        groups.append(_group(
            f"AI finding: {f.label}", finding_type=finding_concept(f.label), finding_sites=[_lung_site()],
            algorithm=_algorithm(f.model_name, f.model_version, [f"threshold={f.threshold:.4f}"]),
            measurements=[hd.sr.Measurement(name=codes.DCM.Probability, value=round(float(f.probability), 6),
                                            unit=prob_unit)],
            qualitative=[_verdict(f.positive)],
            source_images=src_items, comments=[RESEARCH_USE, validity]))
    if result.severity is not None and _trained(result, result.severity.model_name, result.severity.model_version):
        s = result.severity
        groups.append(_group(
            "AI severity (Cohen et al. 2020)", finding_type=codes.DCM.Opacity, finding_sites=[_lung_site()],
            algorithm=_algorithm(s.model_name, s.model_version,
                                 ["Cohen et al. 2020 linear map of Lung Opacity logit" if s.method == "cohen-logit"
                                  else f"method={s.method}: Brixia global mapped to Cohen et al. 2020 scales",
                                  "Extent = geographic extent score 0-8", "Severity = opacity score 0-6"]),
            measurements=[
                hd.sr.Measurement(name=codes.SCT.Extent, value=round(float(s.geographic_extent), 4), unit=score_unit),
                hd.sr.Measurement(name=codes.SCT.Severity, value=round(float(s.opacity), 4), unit=score_unit)],
            source_images=src_items, comments=[RESEARCH_USE, validity]))
        from engine.interop.sr_xray_zones import xray_zone_groups   # Brixia zones A-F + global (TID 1501)

        groups.extend(xray_zone_groups(s, src_items, validity))
    elif result.severity is not None:
        skipped_untrained.add((result.severity.model_name, result.severity.model_version))
    ct_models = [m for m in result.models if result.kind == "ct"]
    if result.ct_study_probability is not None and ct_models and ct_models[0].trained:
        groups.extend(_ct_groups(result, ct_models[0], sources, src_items, prob_unit, validity))
    if getattr(result, "ct_quant", None) is not None:    # HU quantification per lung/zone (TID 1501 groups)
        from engine.interop.sr_ct_quant import ct_quant_groups

        groups.extend(ct_quant_groups(result.ct_quant, src_items, validity))
    # An untrained model yields no findings at all: say so, so a PACS reader never takes silence for normal.
    skipped_untrained |= {(m.name, m.version) for m in result.models if not m.trained}
    notes = [f"Model {n} {v} is untrained: no findings reported." for n, v in sorted(skipped_untrained)]
    if not groups:
        # TID 1500 needs at least one group: record why there are no scores.
        models = result.models or []
        name = models[0].name if models else "ChestView"
        version = models[0].version if models else SOFTWARE_VERSION
        groups.append(_group("AI analysis summary", algorithm=_algorithm(name, version), measurements=[],
                             source_images=src_items,
                             comments=[RESEARCH_USE, validity] + (notes or ["No findings produced."])))
        notes = []
    if notes:
        for n in notes:
            groups[-1][0].ContentSequence.append(_comment(n))

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(), name="ChestView AI", manufacturer_name=MANUFACTURER,
        model_name=", ".join(sorted({f"{m.name} {m.version}" for m in result.models}))[:64] or "ChestView")
    observation = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                                      observer_identifying_attributes=device))
    proc = PROCEDURE_CT if result.kind == "ct" else PROCEDURE_XRAY
    view, rows = _library_view(sources[0])          # TID 1600 image library of the analysed image
    report = hd.sr.MeasurementReport(observation_context=observation, procedure_reported=_code(*proc),
                                     imaging_measurements=groups, referenced_images=[view])
    _add_library_descriptors(report[0], {str(sources[0].SOPInstanceUID): rows})
    schemes = [_local_scheme()] if any(_uses_local_scheme(g[0]) for g in groups) else None
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(sources), content=report[0], series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description="ChestView AI results - RESEARCH USE ONLY", software_versions=SOFTWARE_VERSION,
        manufacturer_model_name="ChestView", coding_schemes=schemes)
    return _finish(sr)


def _ct_groups(result: StudyResult, model, sources: Sequence[Dataset], src_items, prob_unit,
               validity: str) -> list:
    """CT study group (study probability, lung volume) and slice group (top slice probabilities,
    each referencing its slice), both with the CT model's finding as TID 1501 Finding."""
    hd = _hd()
    label = next((f.label for f in result.findings if f.model_name == model.name), "COVID-19")
    finding = finding_concept(label)
    study = [hd.sr.Measurement(name=codes.DCM.Probability, value=round(float(result.ct_study_probability), 6),
                               unit=prob_unit)]
    if result.lung_volume_ml is not None:
        study.append(hd.sr.Measurement(name=codes.SCT.Volume, value=round(float(result.lung_volume_ml), 1),
                                       unit=_code("mL", "UCUM", "milliliter"), finding_sites=[_lung_site()]))
    groups = [_group("AI CT study score", finding_type=finding, finding_sites=[_lung_site()],
                     algorithm=_algorithm(model.name, model.version, ["study = mean of top slice probabilities"]),
                     measurements=study, source_images=src_items, comments=[RESEARCH_USE, validity])]
    slices = []
    for c in sorted(result.ct_slice_scores, key=lambda c: c.probability, reverse=True)[:5]:
        if 0 <= c.slice_index < len(sources):
            ref = [hd.sr.SourceImageForMeasurement.from_source_image(sources[c.slice_index])]
            slices.append(hd.sr.Measurement(name=codes.DCM.Probability, value=round(float(c.probability), 6),
                                            unit=prob_unit, referenced_images=ref))
    if slices:
        groups.append(_group("AI CT slice scores", finding_type=finding, finding_sites=[_lung_site()],
                             algorithm=_algorithm(model.name, model.version), measurements=slices,
                             comments=[RESEARCH_USE]))
    return groups


def _check_same_study(result: StudyResult, sources: Sequence[Dataset]) -> None:
    for s in sources:
        if str(s.StudyInstanceUID) != result.study_uid:
            raise ExportError("The source images belong to a different study than the AI result: "
                              "export from the series that was analysed.")


# --------------------------------------------------------------------------------------------
# Heatmap images: Parametric Map (float) and Secondary Capture (burned-in, for old PACS)
# --------------------------------------------------------------------------------------------
def _heatmap_source(hm: Heatmap, sources: Sequence[Dataset]) -> int:
    i = hm.slice_index if hm.slice_index is not None else 0
    if not 0 <= i < len(sources):
        raise ExportError(f"Heatmap slice {i} has no source image (series has {len(sources)}): "
                          "pass the series' instances in volume order.")
    return i


def _resize(arr: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear resize of a float map to the source image size (heatmaps are display-sized)."""
    a = np.asarray(arr, dtype=np.float32)
    if a.shape == (rows, cols):
        return a
    from PIL import Image

    return np.asarray(Image.fromarray(a, mode="F").resize((cols, rows), Image.BILINEAR), dtype=np.float32)


# PS3.16 CID 4031 body part defined terms of unpaired regions a chest study can carry.
UNPAIRED_BODY_PARTS = {"CHEST", "CHESTABDOMEN", "CHESTABDPELVIS", "ABDOMEN", "PELVIS",
                       "HEAD", "NECK", "HEADNECK", "SPINE", "TSPINE", "WHOLEBODY", "MEDIASTINUM", "HEART"}


def has_patient_space(src: Dataset) -> bool:
    """A Frame of Reference (PS3.3 C.7.4.1) is what a Parametric Map needs from its source."""
    return bool(str(src.get("FrameOfReferenceUID", "")).strip())


def _copy_series_anatomy(ds: Dataset, src: Dataset) -> None:
    """Body Part Examined and Laterality of the source series (PS3.3 C.7.3.1).

    Laterality is Type 2C, required when the body part is paired and absent otherwise; with no body
    part in the source nobody knows which, so an empty (Type 2, "unknown") Laterality is written
    rather than a guessed side.
    """
    body = str(src.get("BodyPartExamined", "") or "").strip().upper()
    if body:
        ds.BodyPartExamined = body
    side = str(src.get("Laterality", "") or "").strip()
    if side in ("L", "R"):
        ds.Laterality = side
    elif body in UNPAIRED_BODY_PARTS:
        if "Laterality" in ds:
            del ds.Laterality
    else:
        ds.Laterality = ""


def build_parametric_maps(result: StudyResult, sources: Sequence[Dataset]) -> list[Dataset]:
    """One float32 Parametric Map per heatmap, each referencing its source image (PS3.3 A.75).

    Only for sources with a Frame of Reference; see the module docstring for projection images.
    """
    hd = _hd()
    _check_same_study(result, sources)
    series_uid = generate_uid()
    out = []
    for n, hm in enumerate(result.heatmaps, start=1):
        src = sources[_heatmap_source(hm, sources)]
        if not has_patient_space(src):
            raise ExportError("A Parametric Map needs a source image with a Frame of Reference (CT/MR); "
                              "export the heatmap of a radiograph as a Secondary Capture.")
        arr = np.clip(_resize(hm.array, int(src.Rows), int(src.Columns)), 0.0, 1.0)
        mapping = hd.pm.RealWorldValueMapping(
            lut_label="GRADCAM", lut_explanation=f"Grad-CAM {hm.target} {hm.model_name} {hm.model_version}"[:64],
            unit=codes.UCUM.NoUnits if hasattr(codes.UCUM, "NoUnits") else _code("1", "UCUM", "no units"),
            value_range=(0.0, 1.0), slope=1.0, intercept=0.0)
        pm = hd.pm.ParametricMap(
            source_images=[src], pixel_array=arr[np.newaxis], series_instance_uid=series_uid,
            series_number=PM_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=n,
            manufacturer=MANUFACTURER, manufacturer_model_name=f"{hm.model_name}"[:64],
            software_versions=f"{hm.model_name} {hm.model_version}"[:64], device_serial_number="N/A",
            contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
            content_label="AIHEATMAP", content_description=f"{RESEARCH_USE}; Grad-CAM {hm.target}"[:64],
            content_qualification="RESEARCH",
            series_description=f"AI heatmap {hm.model_name} {hm.model_version} - RESEARCH USE ONLY"[:64])
        _copy_series_anatomy(pm, src)
        out.append(_finish(pm))
    return out


def _jet(v: np.ndarray) -> np.ndarray:
    """float [0,1] -> uint8 RGB with matplotlib's 'jet' map (no pyplot, so no GUI backend)."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.clip(v, 0, 1))[..., :3] * 255).astype(np.uint8)


def _banner_font_file() -> str | None:
    """DejaVu Sans shipped with matplotlib (has the em dash); None -> Pillow's default font."""
    try:
        import matplotlib

        f = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
        return str(f) if f.is_file() else None
    except ImportError:
        return None


def burn_banner(rgb: np.ndarray, text: str) -> np.ndarray:
    """Burn ``text`` in white on a black band across the top, sized to fit the image width."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(rgb)
    w, h = img.size
    band = max(12, min(h // 8, max(16, h // 22)))
    size = band
    ttf = _banner_font_file()
    if ttf is None:
        text = text.replace("—", "-")      # Pillow's built-in font has no em dash
    while True:
        px = max(6, int(size * 0.75))
        font = ImageFont.truetype(ttf, px) if ttf else ImageFont.load_default(size=px)
        x0, y0, x1, y1 = font.getbbox(text)
        if x1 - x0 <= w - 8 or size <= 8:
            break
        size -= 1
    lines = [text]
    if x1 - x0 > w - 8:                    # very small image: two lines
        words = text.split(" ")
        half = len(words) // 2
        lines = [" ".join(words[:half]), " ".join(words[half:])]
    band_h = (int(size * 0.75) + 4) * len(lines) + 4
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, w, band_h], fill=(0, 0, 0))
    y = 2
    for line in lines:
        draw.text((4, y), line, fill=(255, 255, 255), font=font)
        y += int(size * 0.75) + 4
    return np.asarray(img)


def _patient_orientation(src: Dataset) -> tuple[str, str] | None:
    """Row/column directions of the source (PS3.3 C.7.6.1.1.1), from Patient Orientation or the
    dominant axis of Image Orientation (Patient); None when the source does not say."""
    po = [str(v) for v in (src.get("PatientOrientation") or [])]
    if len(po) == 2 and all(po):
        return po[0], po[1]
    iop = src.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        names = (("L", "R"), ("P", "A"), ("H", "F"))

        def letter(v) -> str:
            i = int(np.argmax(np.abs(np.asarray(v, float))))
            return names[i][0] if float(v[i]) > 0 else names[i][1]
        return letter(iop[:3]), letter(iop[3:])
    return None


def build_secondary_captures(result: StudyResult, sources: Sequence[Dataset],
                             source_paths: Sequence[str | Path], alpha: float = 0.45) -> list[Dataset]:
    """RGB Secondary Capture per heatmap: displayed source image + jet heatmap + banner (PS3.3 A.8)."""
    hd = _hd()
    _check_same_study(result, sources)
    series_uid = generate_uid()
    out = []
    for n, hm in enumerate(result.heatmaps, start=1):
        i = _heatmap_source(hm, sources)
        src = sources[i]
        frame = load_frame(source_paths[i])
        gray = display_gray01(frame)
        heat = np.clip(_resize(hm.array, gray.shape[0], gray.shape[1]), 0.0, 1.0)
        base = np.repeat((gray * 255.0)[..., None], 3, axis=2)
        a = (alpha * heat)[..., None]
        rgb = np.clip((1 - a) * base + a * _jet(heat).astype(np.float32), 0, 255).astype(np.uint8)
        rgb = burn_banner(rgb, f"{BANNER} {hm.model_name} {hm.model_version}")
        scimg = _sc_from_ref(hd, src, rgb, series_uid, n, hm)
        scimg.BurnedInAnnotation = "YES"
        scimg.ImageComments = f"{RESEARCH_USE}. Grad-CAM {hm.target}, {hm.model_name} {hm.model_version}"[:10240]
        scimg.DerivationDescription = f"Source image with AI heatmap ({hm.target}) blended, alpha {alpha}"[:1024]
        scimg.SourceImageSequence = [_ref_item(src)]
        if _patient_orientation(src) is None:
            scimg.PatientOrientation = ""      # Type 2: unknown stays empty, never guessed
        _copy_series_anatomy(scimg, src)
        out.append(_finish(scimg))
    return out


def _sc_from_ref(hd, src: Dataset, rgb: np.ndarray, series_uid: str, n: int, hm: Heatmap) -> Dataset:
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=src, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=n, manufacturer=MANUFACTURER,
        # highdicom needs a value for the PATIENT coordinate system; an unknown one is blanked after
        patient_orientation=_patient_orientation(src) or ("L", "F"), transfer_syntax_uid="1.2.840.10008.1.2.1",
        series_description=f"AI heatmap {hm.model_name} {hm.model_version} - RESEARCH USE ONLY"[:64])


def _ref_item(src: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = src.SOPClassUID
    item.ReferencedSOPInstanceUID = src.SOPInstanceUID
    return item


# --------------------------------------------------------------------------------------------
# Orchestration: build, write to a folder, send to a peer
# --------------------------------------------------------------------------------------------
@dataclass
class ExportKinds:
    sr: bool = True
    parametric_map: bool = True         # CT/MR; a radiograph's heatmap goes out as a Secondary Capture
    secondary_capture: bool = False     # for PACS that cannot display Parametric Maps
    segmentation: bool = True           # CT opacity map (GGO, consolidation) as a DICOM SEG


def build_exports(result: StudyResult, source_paths: Sequence[str | Path],
                  kinds: ExportKinds | None = None) -> list[Dataset]:
    """All requested result objects for one analysed series (no files written).

    ``source_paths``: the analysed series' instances — for CT in the order of the Volume
    (``Volume.instance_paths``) so that ``Heatmap.slice_index`` and ``CTSliceScore.slice_index``
    pick the right slice; for X-ray the one displayed image.
    """
    k = kinds or ExportKinds()
    sources = read_sources(source_paths)
    with _captured_warnings():
        try:
            return _build_all(result, sources, source_paths, k)
        except ExportError:
            raise
        except Exception as exc:          # the one outer boundary: any library failure, one message
            log.error("Building DICOM result objects failed (%s)", type(exc).__name__)
            raise ExportError(f"Could not build the DICOM result objects ({type(exc).__name__}: "
                              f"{str(exc)[:200]}). The source header is unusual; export the other "
                              "kinds (e.g. untick Parametric Map) and report this file.") from exc


@contextmanager
def _captured_warnings() -> Iterator[None]:
    """Keep pydicom/highdicom warnings off stderr: they quote header values such as the patient
    name (highdicom.valuerep.check_person_name). They reach the log only through
    engine.logscrub.scrub_text (quoted values, PN-form names and paths removed), DESIGN.md 5."""
    from engine.logscrub import scrub_text

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        log.info("Export: %s from the DICOM libraries suppressed: %s", w.category.__name__,
                 scrub_text(w.message)[:300])


def _build_all(result: StudyResult, sources: list[Dataset], source_paths: Sequence[str | Path],
               k: ExportKinds) -> list[Dataset]:
    out: list[Dataset] = []
    # Heatmaps of untrained models are never exported as results (they are not findings).
    trained_heatmaps = [h for h in result.heatmaps if _trained(result, h.model_name, h.model_version)]
    if len(trained_heatmaps) != len(result.heatmaps):
        result = replace(result, heatmaps=trained_heatmaps)
    if k.sr:
        out.append(build_sr(result, sources))
    flags = [has_patient_space(sources[_heatmap_source(h, sources)]) for h in result.heatmaps]
    in_space = [h for h, f in zip(result.heatmaps, flags) if f]
    projection = [h for h, f in zip(result.heatmaps, flags) if not f]
    if k.parametric_map and in_space:
        out.extend(build_parametric_maps(replace(result, heatmaps=in_space), sources))
    sc_maps = result.heatmaps if k.secondary_capture else (projection if k.parametric_map else [])
    if sc_maps:
        out.extend(build_secondary_captures(replace(result, heatmaps=sc_maps), sources, source_paths))
    q = getattr(result, "ct_quant", None)
    if k.segmentation and q is not None and q.labels is not None and q.labels.any():
        from engine.interop.export_seg import build_opacity_seg

        out.append(build_opacity_seg(result, sources))
    return out


_PREFIX = {"1.2.840.10008.5.1.4.1.1.88.34": "SR", "1.2.840.10008.5.1.4.1.1.30": "PM",
           "1.2.840.10008.5.1.4.1.1.7": "SC", "1.2.840.10008.5.1.4.1.1.66.4": "SEG"}


def write_datasets(datasets: Sequence[Dataset], out_dir: Path) -> list[Path]:
    """Write each dataset as ``<kind>_<SOPInstanceUID>.dcm`` atomically (temp file + rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        name = f"{_PREFIX.get(str(ds.SOPClassUID), 'DCM')}_{ds.SOPInstanceUID}.dcm"
        fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".part", dir=out_dir)
        os.close(fd)
        try:
            ds.preamble = b"\x00" * 128
            dcmwrite(tmp, ds, enforce_file_format=True)
            os.chmod(tmp, FILE_MODE)          # mkstemp makes 0600: PACS tools and other users read these
            os.replace(tmp, out_dir / name)
        finally:
            Path(tmp).unlink(missing_ok=True)
        paths.append(out_dir / name)
    log.info("Exported %d result object(s)", len(paths))
    return paths


def export_to_folder(result: StudyResult, source_paths: Sequence[str | Path], out_dir: str | Path,
                     kinds: ExportKinds | None = None) -> list[Path]:
    """Build and write the result objects into ``out_dir`` (never an input folder)."""
    out = check_output_folder(Path(out_dir), source_paths)
    return write_datasets(build_exports(result, source_paths, kinds), out)


def send_results(result: StudyResult, source_paths: Sequence[str | Path], settings, peer,
                 kinds: ExportKinds | None = None, progress=None):
    """Build the result objects and C-STORE them to ``peer``; returns network.StoreResult."""
    from engine.interop.network import send

    return send(settings, peer, build_exports(result, source_paths, kinds), progress=progress)
