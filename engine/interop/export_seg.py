"""The CT opacity map (engine.ai.ct_quant labels) as a DICOM Segmentation (PS3.3 A.51), via highdicom.

Two segments of a BINARY segmentation on the source CT grid, one frame per source slice that
contains the segment (empty frames omitted, PS3.3 C.8.20.2):

1. Ground-glass opacity: category SCT 49755003 Morphologically abnormal structure, type DCM 112120
   Ground glass opacity (CID 6102 is where DICOM lists it; SNOMED has no pre-coordinated concept).
2. Consolidation: same category, type SCT 95436008 Lung consolidation.

The labels come from HU thresholds and morphology, so the algorithm family is "Histogram
analysis" (CID 7162) and the algorithm is engine.ai.ct_quant's name and version. New series, same
study, "RESEARCH USE ONLY" in the content description.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from engine.ai.ct_quant import LABEL_CONSOLIDATION, LABEL_GGO, full_resolution_labels
from engine.results import RESEARCH_USE, StudyResult

SEG_SERIES_NUMBER = 9903
MANUFACTURER = "ChestView"


class SegExportError(Exception):
    """The opacity map could not be written as a Segmentation; the message says what to do."""


def _segments(hd, method: str, version: str) -> list:
    algo = hd.AlgorithmIdentificationSequence(name=method, version=version,
                                              family=codes.cid7162.HistogramAnalysis)
    abnormal = hd.sr.CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
    types = [(LABEL_GGO, "Ground-glass opacity", hd.sr.CodedConcept("112120", "DCM", "Ground glass opacity")),
             (LABEL_CONSOLIDATION, "Consolidation", hd.sr.CodedConcept("95436008", "SCT", "Lung consolidation"))]
    return [hd.seg.SegmentDescription(
        segment_number=n, segment_label=label, segmented_property_category=abnormal, segmented_property_type=t,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo,
        tracking_uid=hd.UID(), tracking_id=f"CT opacity map: {label}") for n, label, t in types]


def build_opacity_seg(result: StudyResult, sources: Sequence[Dataset]) -> Dataset:
    """Segmentation of GGO and consolidation for ``result`` on ``sources`` (CT headers in volume order)."""
    import highdicom as hd

    q = result.ct_quant
    if q is None or q.labels is None:
        raise SegExportError("This result has no CT opacity map: run the CT analysis on an axial volume first.")
    if len(sources) != q.shape[0]:
        raise SegExportError(f"The opacity map has {q.shape[0]} slices but {len(sources)} source images were "
                             "given: pass the analysed series' instances in volume order.")
    for s in sources:
        if (int(s.Rows), int(s.Columns)) != (q.shape[1], q.shape[2]):
            raise SegExportError("A source image's size differs from the analysed volume: export from the "
                                 "series that was analysed.")
        if str(s.StudyInstanceUID) != result.study_uid:
            raise SegExportError("The source images belong to a different study than the AI result.")
    labels = full_resolution_labels(q)
    if not labels.any():
        raise SegExportError("The opacity map is empty (no ground glass or consolidation found): "
                             "there is no segmentation to export.")
    keep = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    seg = hd.seg.Segmentation(
        source_images=[sources[i] for i in keep], pixel_array=labels[keep],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segments(hd, q.method, q.version), series_instance_uid=generate_uid(),
        series_number=SEG_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name="ChestView CT quantification",
        software_versions=f"{q.method} {q.version}", device_serial_number="N/A",
        content_label="OPACITYMAP", content_description=f"{RESEARCH_USE}; GGO and consolidation"[:64],
        series_description="CT opacity map (GGO, consolidation) - RESEARCH USE ONLY")
    src = sources[int(keep[0])]
    if str(src.get("PatientIdentityRemoved", "")).upper() == "YES":   # PS3.3 C.7.1.1: 1C with it
        seg.PatientIdentityRemoved = "YES"
        seg.DeidentificationMethod = str(src.get("DeidentificationMethod", "") or
                                         "De-identified source (method not stated in the source)")[:64]
    seg.remove_private_tags()
    seg.preamble = b"\x00" * 128
    return seg
