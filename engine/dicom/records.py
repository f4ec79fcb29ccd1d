"""Patient -> Study -> Series records built from headers only (engine.dicom.index fills them)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class InstanceRecord:
    path: str                    # file path; for ZIP members "archive.zip::member/name.dcm"
    sop_instance_uid: str
    instance_number: int | None
    frames: int = 1
    image_position: tuple[float, float, float] | None = None
    image_orientation: tuple[float, ...] | None = None
    slice_location: float | None = None
    transfer_syntax: str = ""
    rows: int = 0
    columns: int = 0


@dataclass
class SeriesRecord:
    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    series_number: int | None = None
    series_description: str = ""
    body_part: str = ""
    view_position: str = ""
    rows: int = 0
    columns: int = 0
    instances: list[InstanceRecord] = field(default_factory=list)  # sorted by instance number / position
    # For the hanging protocol (engine.reading.hanging): ORIGINAL/DERIVED and LOCALIZER (PS3.3 C.7.6.1.1.2,
    # C.8.2.1.1.1), the reconstruction kernel (0018,1210) and Slice Thickness (0018,0050).
    image_type: str = ""
    convolution_kernel: str = ""
    slice_thickness: float | None = None

    @property
    def count(self) -> int:
        return len(self.instances)

    @property
    def kind(self) -> str:
        """'xray' | 'ct' | 'other': which AI pipeline (if any) applies, from the header alone."""
        m = self.modality.upper()
        if m in ("CR", "DX", "DR"):
            return "xray"
        if m == "CT":
            return "ct"
        return "other"


@dataclass
class StudyRecord:
    study_uid: str
    patient_id: str
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    accession_number: str = ""
    series: list[SeriesRecord] = field(default_factory=list)


@dataclass
class PatientRecord:
    patient_id: str
    patient_name: str = ""
    birth_date: str = ""
    sex: str = ""
    studies: list[StudyRecord] = field(default_factory=list)


@dataclass
class FileProblem:
    """A file that was skipped, with a reason a user can act on (never raised)."""

    path: str
    reason: str


@dataclass
class IndexResult:
    patients: list[PatientRecord] = field(default_factory=list)
    problems: list[FileProblem] = field(default_factory=list)
    files_seen: int = 0
    seconds: float = 0.0
    cancelled: bool = False      # True when cancel() stopped the scan: the lists are incomplete

    def all_series(self) -> list[SeriesRecord]:
        return [se for p in self.patients for st in p.studies for se in st.series]

    def find_series(self, series_uid: str) -> SeriesRecord | None:
        return next((s for s in self.all_series() if s.series_uid == series_uid), None)

    def study_of(self, series: SeriesRecord) -> StudyRecord | None:
        for p in self.patients:
            for st in p.studies:
                if st.study_uid == series.study_uid:
                    return st
        return None

    def patient_of(self, series: SeriesRecord) -> PatientRecord | None:
        return next((p for p in self.patients if p.patient_id == series.patient_id), None)
