"""AI results out as standard DICOM, built with highdicom (research use only).

* Comprehensive 3D SR with a TID 1500 Measurement Report (PS3.16 TID 1500/1501): one
  measurement group per finding (probability, operating-threshold verdict, algorithm name and
  version per TID 4019), a severity group (Cohen et al. 2020 scores), CT study/slice scores,
  and "Research use only, not for diagnostic use" plus validity-gate reasons as TEXT comments.
* Parametric Map (PS3.3 A.75) holding the float Grad-CAM heatmap, or for older PACS
* a Secondary Capture (PS3.3 A.8) of the source image blended with a colour heatmap and a
  burned-in "RESEARCH USE ONLY — AI heatmap <model> <version>" banner.

Every object gets new SOP Instance and Series UIDs, keeps the source StudyInstanceUID (same
study, new series), references its source images, has a zeroed 128-byte preamble and carries no
private tags. Files are written to a folder that is never an input folder, or C-STOREd to a peer.
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom import Dataset, dcmwrite
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from engine.dicom.pixels import display_gray01, load_frame, read_header, split_zip_path
from engine.results import RESEARCH_USE, Heatmap, StudyResult

log = logging.getLogger(__name__)

MANUFACTURER = "ChestView"
SOFTWARE_VERSION = "0.1.0"
SR_SERIES_NUMBER = 9900
PM_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
LOCAL_SCHEME = "99CHESTVIEW"      # private coding scheme (PS3.16 8.2: "99" prefix) for our labels

# SNOMED CT concepts for findings we can name with confidence; others use LOCAL_SCHEME.
SNOMED_FINDINGS = {
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
        v, m = SNOMED_FINDINGS[key]
        return _code(v, "SCT", m)
    value = "".join(ch if ch.isalnum() else "-" for ch in label.upper())[:16] or "FINDING"
    return _code(value, LOCAL_SCHEME, label)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
def read_sources(source_paths: Sequence[str | Path]) -> list[Dataset]:
    """Headers of the source images (order kept: CT in volume order so slice_index applies)."""
    if not source_paths:
        raise ExportError("No source images given: export needs the image(s) the AI analysed.")
    return [read_header(p) for p in source_paths]


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


def _group(identifier: str, *, measurements, qualitative=None, finding_type=None,
           algorithm=None, source_images=None, comments: Sequence[str] = ()):
    hd = _hd()
    grp = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=identifier[:64]),
        finding_type=finding_type, algorithm_id=algorithm, measurements=measurements or None,
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


def build_sr(result: StudyResult, sources: Sequence[Dataset]) -> Dataset:
    """Comprehensive 3D SR (TID 1500) for ``result``, referencing ``sources`` (same study)."""
    hd = _hd()
    if result.error:
        raise ExportError(f"The analysis failed ({result.error}); there is nothing to export. "
                          "Re-run the analysis first.")
    _check_same_study(result, sources)
    prob_unit = _code("{probability}", "UCUM", "probability")
    score_unit = _code("{score}", "UCUM", "score")
    yes, no = _code("373066001", "SCT", "Yes"), _code("373067005", "SCT", "No")
    above = _code("ABOVE-THRESHOLD", LOCAL_SCHEME, "Above model operating threshold")
    src_items = [hd.sr.SourceImageForMeasurementGroup.from_source_image(s) for s in sources[:1]]
    validity = _validity_text(result)
    groups = []
    skipped_untrained: set[tuple[str, str]] = set()
    for f in result.findings:
        if not _trained(result, f.model_name, f.model_version):
            skipped_untrained.add((f.model_name, f.model_version))
            continue
        concept = finding_concept(f.label)
        groups.append(_group(
            f"AI finding: {f.label}", finding_type=concept,
            algorithm=_algorithm(f.model_name, f.model_version, [f"threshold={f.threshold:.4f}"]),
            measurements=[hd.sr.Measurement(name=concept, value=round(float(f.probability), 6), unit=prob_unit)],
            qualitative=[hd.sr.QualitativeEvaluation(name=above, value=yes if f.positive else no)],
            source_images=src_items, comments=[RESEARCH_USE, validity]))
    if result.severity is not None and _trained(result, result.severity.model_name, result.severity.model_version):
        s = result.severity
        groups.append(_group(
            "AI severity (Cohen et al. 2020)",
            algorithm=_algorithm(s.model_name, s.model_version, ["Cohen et al. 2020 linear map of Lung Opacity logit"]),
            measurements=[
                hd.sr.Measurement(name=_code("GEOGRAPHIC-EXTENT", LOCAL_SCHEME, "Geographic extent score (0-8)"),
                                  value=round(float(s.geographic_extent), 4), unit=score_unit),
                hd.sr.Measurement(name=_code("OPACITY-SCORE", LOCAL_SCHEME, "Opacity score (0-6)"),
                                  value=round(float(s.opacity), 4), unit=score_unit)],
            source_images=src_items, comments=[RESEARCH_USE, validity]))
    elif result.severity is not None:
        skipped_untrained.add((result.severity.model_name, result.severity.model_version))
    ct_models = [m for m in result.models if result.kind == "ct"]
    if result.ct_study_probability is not None and ct_models and ct_models[0].trained:
        m = ct_models[0]
        measurements = [hd.sr.Measurement(name=_code("STUDY-PROBABILITY", LOCAL_SCHEME, "Study-level probability"),
                                          value=round(float(result.ct_study_probability), 6), unit=prob_unit)]
        top = sorted(result.ct_slice_scores, key=lambda c: c.probability, reverse=True)[:5]
        for c in top:
            if 0 <= c.slice_index < len(sources):
                ref = [hd.sr.SourceImageForMeasurement.from_source_image(sources[c.slice_index])]
            else:
                ref = None
            measurements.append(hd.sr.Measurement(
                name=_code("SLICE-PROBABILITY", LOCAL_SCHEME, f"Slice probability (z {c.z_mm:.1f} mm)"),
                value=round(float(c.probability), 6), unit=prob_unit, referenced_images=ref))
        if result.lung_volume_ml is not None:
            measurements.append(hd.sr.Measurement(name=_code("LUNG-VOLUME", LOCAL_SCHEME, "Lung volume"),
                                                  value=round(float(result.lung_volume_ml), 1),
                                                  unit=_code("mL", "UCUM", "milliliter")))
        groups.append(_group("AI CT study score", algorithm=_algorithm(m.name, m.version),
                             measurements=measurements, source_images=src_items,
                             comments=[RESEARCH_USE, validity]))
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
    try:        # TID 1600 image library; highdicom needs e.g. Imager Pixel Spacing for CR/DX
        report = hd.sr.MeasurementReport(observation_context=observation, procedure_reported=_code(*proc),
                                         imaging_measurements=groups, referenced_images=list(sources[:1]))
    except (AttributeError, ValueError, TypeError):
        report = hd.sr.MeasurementReport(observation_context=observation, procedure_reported=_code(*proc),
                                         imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(sources), content=report[0], series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description="ChestView AI results - RESEARCH USE ONLY", software_versions=SOFTWARE_VERSION,
        manufacturer_model_name="ChestView", coding_schemes=[_local_scheme()])
    return _finish(sr)


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


def _parametric_map_class():
    """highdicom 0.28.2 ParametricMap, patched for sources without a Frame of Reference (CR/DX).

    For such sources highdicom indexes frames by Frame Label (0020,9453) but leaves Dimension
    Index Values empty, then fails its own consistency check. We fill both (one frame: index 1)
    before that check runs; sources with a Frame of Reference are untouched.
    """
    hd = _hd()

    class _ParametricMap(hd.pm.ParametricMap):
        def _build_luts(self) -> None:  # noqa: D401 - highdicom hook
            dims = [int(d.DimensionIndexPointer) for d in self.get("DimensionIndexSequence", [])]
            if dims == [0x00209453]:
                for item in self.get("PerFrameFunctionalGroupsSequence", []):
                    fc = item.FrameContentSequence[0]
                    if not fc.get("DimensionIndexValues"):
                        fc.DimensionIndexValues = [1]
                        fc.FrameLabel = "AI heatmap"
            super()._build_luts()

    return _ParametricMap


def build_parametric_maps(result: StudyResult, sources: Sequence[Dataset]) -> list[Dataset]:
    """One float32 Parametric Map per heatmap, each referencing its source image (PS3.3 A.75)."""
    hd = _hd()
    _check_same_study(result, sources)
    pm_class = _parametric_map_class()
    series_uid = generate_uid()
    out = []
    for n, hm in enumerate(result.heatmaps, start=1):
        src = sources[_heatmap_source(hm, sources)]
        arr = np.clip(_resize(hm.array, int(src.Rows), int(src.Columns)), 0.0, 1.0)
        mapping = hd.pm.RealWorldValueMapping(
            lut_label="GRADCAM", lut_explanation=f"Grad-CAM {hm.target} {hm.model_name} {hm.model_version}"[:64],
            unit=codes.UCUM.NoUnits if hasattr(codes.UCUM, "NoUnits") else _code("1", "UCUM", "no units"),
            value_range=(0.0, 1.0), slope=1.0, intercept=0.0)
        pm = pm_class(
            source_images=[src], pixel_array=arr[np.newaxis], series_instance_uid=series_uid,
            series_number=PM_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=n,
            manufacturer=MANUFACTURER, manufacturer_model_name=f"{hm.model_name}"[:64],
            software_versions=f"{hm.model_name} {hm.model_version}"[:64], device_serial_number="N/A",
            contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
            content_label="AIHEATMAP", content_description=f"{RESEARCH_USE}; Grad-CAM {hm.target}"[:64],
            content_qualification="RESEARCH",
            series_description=f"AI heatmap {hm.model_name} {hm.model_version} - RESEARCH USE ONLY"[:64])
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


def _patient_orientation(src: Dataset) -> tuple[str, str]:
    po = src.get("PatientOrientation")
    if po is not None and len(po) == 2 and all(str(v) for v in po):
        return str(po[0]), str(po[1])
    iop = src.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        def letters(v):
            names = (("L", "R"), ("P", "A"), ("H", "F"))
            out = ""
            for i in np.argsort(-np.abs(np.asarray(v, float))):
                if abs(v[i]) > 0.25:
                    out += names[i][0] if v[i] > 0 else names[i][1]
            return out or "L"
        return letters(iop[:3])[:2], letters(iop[3:])[:2]
    return "L", "F"                        # conventional chest radiograph display (PA/AP)


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
        with warnings.catch_warnings():      # highdicom warns about odd names copied from the source
            warnings.simplefilter("ignore", UserWarning)
            scimg = _sc_from_ref(hd, src, rgb, series_uid, n, hm)
        scimg.BurnedInAnnotation = "YES"
        scimg.ImageComments = f"{RESEARCH_USE}. Grad-CAM {hm.target}, {hm.model_name} {hm.model_version}"[:10240]
        scimg.DerivationDescription = f"Source image with AI heatmap ({hm.target}) blended, alpha {alpha}"[:1024]
        scimg.SourceImageSequence = [_ref_item(src)]
        out.append(_finish(scimg))
    return out


def _sc_from_ref(hd, src: Dataset, rgb: np.ndarray, series_uid: str, n: int, hm: Heatmap) -> Dataset:
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=src, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=n, manufacturer=MANUFACTURER,
        patient_orientation=_patient_orientation(src), transfer_syntax_uid="1.2.840.10008.1.2.1",
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
    parametric_map: bool = True
    secondary_capture: bool = False     # for PACS that cannot display Parametric Maps


def build_exports(result: StudyResult, source_paths: Sequence[str | Path],
                  kinds: ExportKinds | None = None) -> list[Dataset]:
    """All requested result objects for one analysed series (no files written).

    ``source_paths``: the analysed series' instances — for CT in the order of the Volume
    (``Volume.instance_paths``) so that ``Heatmap.slice_index`` and ``CTSliceScore.slice_index``
    pick the right slice; for X-ray the one displayed image.
    """
    k = kinds or ExportKinds()
    sources = read_sources(source_paths)
    out: list[Dataset] = []
    # Heatmaps of untrained models are never exported as results (they are not findings).
    trained_heatmaps = [h for h in result.heatmaps if _trained(result, h.model_name, h.model_version)]
    if len(trained_heatmaps) != len(result.heatmaps):
        from dataclasses import replace

        result = replace(result, heatmaps=trained_heatmaps)
    if k.sr:
        out.append(build_sr(result, sources))
    if k.parametric_map and result.heatmaps:
        out.extend(build_parametric_maps(result, sources))
    if k.secondary_capture and result.heatmaps:
        out.extend(build_secondary_captures(result, sources, source_paths))
    return out


_PREFIX = {"1.2.840.10008.5.1.4.1.1.88.34": "SR", "1.2.840.10008.5.1.4.1.1.30": "PM",
           "1.2.840.10008.5.1.4.1.1.7": "SC"}


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
    from engine.dicom.network import send

    return send(settings, peer, build_exports(result, source_paths, kinds), progress=progress)
