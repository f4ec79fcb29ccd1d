"""Find DICOM images in a folder, DICOMDIR or ZIP and group them Patient -> Study -> Series.

Headers only: indexing never decodes pixel data. Little-endian headers are walked directly up to
group 0028 (about 4x plain pydicom.dcmread, bench/bench_index.py); everything else is read with
``pydicom.dcmread(stop_before_pixels=True)`` (``specific_tags`` measured slower, so unused).
Every file that cannot be used becomes a :class:`FileProblem` with a reason; nothing is raised
for bad input. Hidden names (starting with '.') are skipped.
ZIP members are addressed ``"/path/archive.zip::member/path.dcm"`` and read with bomb guards.
"""
from __future__ import annotations

import io
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from engine.dicom.budget import _check_zip_info, _guard_deflate
from engine.dicom.pixels import ZIP_SEP, _ensure_transfer_syntax, sniff
from engine.dicom.records import (FileProblem, IndexResult, InstanceRecord, PatientRecord,
                                  SeriesRecord, StudyRecord)
from engine.errors import LoadError

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

ZIP_MEMBER_CAP = 256 * 1024 * 1024   # a single member larger than this is not read while indexing
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

# Header attributes the index needs (all before (0028,0012), which the fast walk relies on)
_TAGS = [
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
    "SeriesInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate",
    "StudyTime", "StudyDescription", "AccessionNumber", "Modality", "SeriesNumber",
    "SeriesDescription", "BodyPartExamined", "ViewPosition", "InstanceNumber", "NumberOfFrames",
    "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation", "Rows", "Columns",
    "DirectoryRecordSequence", "ImageType", "ConvolutionKernel", "SliceThickness",
]


@dataclass
class _Header:
    """The fields of one file that the grouping needs."""

    path: str
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_uid: str
    study_date: str
    study_time: str
    study_description: str
    accession: str
    series_uid: str
    series_number: int | None
    series_description: str
    modality: str
    body_part: str
    view_position: str
    instance: InstanceRecord
    image_type: str = ""
    convolution_kernel: str = ""
    slice_thickness: float | None = None


_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UI", "LT", "ST"}
_FAST_CHARSETS = {"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192"}
_TAG_CACHE: dict[str, tuple[int, str]] = {}


def _tag(kw: str) -> tuple[int, str]:
    t = _TAG_CACHE.get(kw)
    if t is None:
        from pydicom.datadict import dictionary_VR, tag_for_keyword

        tag = tag_for_keyword(kw)
        t = _TAG_CACHE[kw] = (int(tag), dictionary_VR(tag))  # type: ignore[arg-type]
    return t


def _raw_text(ds, kw: str) -> str | None:
    """Decode a still-raw text element straight from its bytes (much faster than pydicom's value
    conversion, which dominated indexing time); None means 'ask pydicom'."""
    tag, vr = _tag(kw)
    try:
        raw = ds._dict.get(tag)  # RawDataElement until first access (pydicom reads lazily)
    except AttributeError:
        return None
    if raw is None:
        return ""
    value = getattr(raw, "value", None)
    if not isinstance(value, (bytes, bytearray)) or vr not in _TEXT_VRS:
        return None
    if raw.VR not in (None, vr, "UN"):
        return None
    charset = getattr(ds, "_chestview_charset", "")
    if vr in ("PN", "LO", "SH", "LT", "ST") and charset not in _FAST_CHARSETS:
        return None
    enc = "utf-8" if charset == "ISO_IR 192" else "latin-1"
    return value.decode(enc, errors="replace").strip(" \0")


def _s(ds, kw: str) -> str:
    v = _raw_text(ds, kw)
    if v is not None:
        return v
    try:
        v = ds.get(kw, "")
        return "" if v is None else str(v).strip()
    except Exception:
        return ""


def _i(ds, kw: str) -> int | None:
    v = _raw_text(ds, kw)
    if v is not None:
        try:
            return int(v.split("\\")[0]) if v else None
        except ValueError:
            return None
    try:
        v = ds.get(kw, None)
        return None if v is None or v == "" else int(v)
    except Exception:
        return None


def _floats(ds, kw: str, n: int) -> tuple[float, ...] | None:
    v = _raw_text(ds, kw)
    if v is not None:
        try:
            parts = v.split("\\")
            return tuple(float(x) for x in parts) if len(parts) == n and v else None
        except ValueError:
            return None
    try:
        v = ds.get(kw, None)
        if v is None or len(v) != n:
            return None
        return tuple(float(x) for x in v)
    except Exception:
        return None


def _us(ds, kw: str) -> int | None:
    """US attributes (Rows, Columns): read the 2 raw bytes when still raw."""
    tag, _ = _tag(kw)
    raw = getattr(ds, "_dict", {}).get(tag)
    value = getattr(raw, "value", None)
    if isinstance(value, (bytes, bytearray)) and len(value) == 2 and raw.VR in (None, "US"):
        return int.from_bytes(value, "little" if raw.is_little_endian else "big")
    return _i(ds, kw)


def _header_from_dataset(ds, path: str) -> _Header:
    try:
        cs = ds.get("SpecificCharacterSet", "")
        cs = cs if isinstance(cs, str) else "\\".join(cs)
    except Exception:
        cs = "?"
    try:
        object.__setattr__(ds, "_chestview_charset", (cs or "").strip())
    except Exception:
        pass
    ts = ""
    try:
        ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    except Exception:
        pass
    sop = _s(ds, "SOPInstanceUID") or f"nouid:{path}"
    inst = InstanceRecord(
        path=path, sop_instance_uid=sop, instance_number=_i(ds, "InstanceNumber"),
        frames=max(_i(ds, "NumberOfFrames") or 1, 1),
        image_position=_floats(ds, "ImagePositionPatient", 3),  # type: ignore[arg-type]
        image_orientation=_floats(ds, "ImageOrientationPatient", 6),
        slice_location=_float1(ds),
        transfer_syntax=ts, rows=_us(ds, "Rows") or 0, columns=_us(ds, "Columns") or 0)
    pid = _s(ds, "PatientID")
    pname = _s(ds, "PatientName")
    study = _s(ds, "StudyInstanceUID")
    series = _s(ds, "SeriesInstanceUID")
    folder = os.path.dirname(path.split(ZIP_SEP)[-1] if ZIP_SEP in path else path)
    return _Header(
        path=path, patient_id=pid or (f"(no ID) {pname}" if pname else "(no patient ID)"),
        patient_name=pname, birth_date=_s(ds, "PatientBirthDate"), sex=_s(ds, "PatientSex"),
        study_uid=study or f"(no study UID) {pid or pname}",
        study_date=_s(ds, "StudyDate"), study_time=_s(ds, "StudyTime"),
        study_description=_s(ds, "StudyDescription"), accession=_s(ds, "AccessionNumber"),
        series_uid=series or f"(no series UID) {folder}",
        series_number=_i(ds, "SeriesNumber"), series_description=_s(ds, "SeriesDescription"),
        modality=_s(ds, "Modality").upper(), body_part=_s(ds, "BodyPartExamined"),
        view_position=_s(ds, "ViewPosition"), instance=inst, image_type=_multi(ds, "ImageType"),
        convolution_kernel=_multi(ds, "ConvolutionKernel"), slice_thickness=_ds1(ds, "SliceThickness"))


def _multi(ds, kw: str) -> str:
    """A multi-valued text attribute as its DICOM encoding (values joined by backslash)."""
    v = _raw_text(ds, kw)
    if v is not None:
        return v
    try:
        v = ds.get(kw, "")
    except Exception:
        return ""
    if v is None:
        return ""
    return "\\".join(str(x) for x in v) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" \
        else str(v).strip()


def _ds1(ds, kw: str) -> float | None:
    """The first value of a DS attribute, None when absent or not a number."""
    try:
        return float(_multi(ds, kw).split("\\")[0])
    except ValueError:
        return None


def _float1(ds) -> float | None:
    v = _raw_text(ds, "SliceLocation")
    if v is not None:
        try:
            return float(v) if v else None
        except ValueError:
            return None
    try:
        v = ds.get("SliceLocation", None)
        return None if v is None or v == "" else float(v)
    except Exception:
        return None


# ----------------------------------------------------------------------------------------
# Fast header path: walk the first bytes of little-endian files up to group 0028 ourselves.
# pydicom parses the whole header (and its file meta) into objects; the index needs about 25
# values that all sit before (0028,0012), so a bounded walk is several times faster
# (bench_index.py). Anything unusual (big endian, deflate, undefined-length UN, a header longer
# than the first read) returns None and the file goes through pydicom instead.
# ----------------------------------------------------------------------------------------

FAST_READ_BYTES = 262144
USE_FAST_PATH = True
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_VALID_VRS = _LONG_VRS | {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS",
                          b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
_STOP_TAG = 0x00280012
_UNDEF = 0xFFFFFFFF


class _Raw:
    """Minimal stand-in for pydicom's RawDataElement (value bytes + VR)."""

    __slots__ = ("value", "VR", "is_little_endian")

    def __init__(self, value: bytes, vr: str | None) -> None:
        self.value, self.VR, self.is_little_endian = value, vr, True


class _Meta(dict):
    def get(self, key, default=None):  # type: ignore[override]
        return dict.get(self, key, default)


class _FastDS:
    """Just enough of a Dataset for _header_from_dataset and _Collector.add_dataset."""

    def __init__(self, elems: dict[int, _Raw], ts: str, has_dir: bool) -> None:
        self._dict = elems
        self.file_meta = _Meta(TransferSyntaxUID=ts)
        self._has_dir = has_dir
        self._chestview_charset = ""

    def __contains__(self, kw: str) -> bool:
        if kw == "DirectoryRecordSequence":
            return self._has_dir
        return _tag(kw)[0] in self._dict

    def get(self, kw: str, default=None):
        raw = self._dict.get(_tag(kw)[0])
        if raw is None:
            return default
        parts = raw.value.decode("latin-1", errors="replace").strip(" \0").split("\\")
        return parts[0] if len(parts) == 1 else parts


_WANTED: set[int] = set()


def _wanted() -> set[int]:
    if not _WANTED:
        _WANTED.update(_tag(kw)[0] for kw in _TAGS if kw != "DirectoryRecordSequence")
    return _WANTED


def _skip_undefined(data: bytes, pos: int, explicit: bool, depth: int = 0) -> int:
    """Position after an undefined-length sequence starting at ``pos`` (its first item tag)."""
    n = len(data)
    if depth > 16:
        raise ValueError("sequences nested too deeply")
    while pos + 8 <= n:
        g, e, ln = int.from_bytes(data[pos:pos + 2], "little"), int.from_bytes(data[pos + 2:pos + 4], "little"), \
            int.from_bytes(data[pos + 4:pos + 8], "little")
        pos += 8
        if (g, e) == (0xFFFE, 0xE0DD):
            return pos
        if (g, e) != (0xFFFE, 0xE000):
            raise ValueError("bad item")
        if ln != _UNDEF:
            pos += ln
            continue
        # undefined-length item: walk its elements to the item delimiter
        while True:
            if pos + 8 > n:
                raise EOFError
            g2, e2 = int.from_bytes(data[pos:pos + 2], "little"), int.from_bytes(data[pos + 2:pos + 4], "little")
            if (g2, e2) == (0xFFFE, 0xE00D):
                pos += 8
                break
            pos, _, _, _ = _next_element(data, pos, explicit, depth + 1)
    raise EOFError


def _next_element(data: bytes, pos: int, explicit: bool, depth: int = 0) -> tuple[int, int, bytes | None, str | None]:
    """(next position, tag, value bytes or None for sequences, VR) of the element at ``pos``."""
    n = len(data)
    if pos + 8 > n:
        raise EOFError
    tag = (int.from_bytes(data[pos:pos + 2], "little") << 16) | int.from_bytes(data[pos + 2:pos + 4], "little")
    vr: str | None = None
    if explicit:
        vrb = bytes(data[pos + 4:pos + 6])
        if vrb in _LONG_VRS:
            if pos + 12 > n:
                raise EOFError
            ln = int.from_bytes(data[pos + 8:pos + 12], "little")
            start = pos + 12
        elif vrb in _VALID_VRS:
            ln = int.from_bytes(data[pos + 6:pos + 8], "little")
            start = pos + 8
        else:
            raise ValueError("bad VR")
        vr = vrb.decode("ascii")
    else:
        ln = int.from_bytes(data[pos + 4:pos + 8], "little")
        start = pos + 8
    if ln == _UNDEF:
        if vr == "UN" or tag == 0x7FE00010:
            raise ValueError("undefined-length UN or pixel data")
        return _skip_undefined(data, start, explicit, depth), tag, None, vr
    end = start + ln
    if end > n:
        raise EOFError
    return end, tag, data[start:end], vr


def _fast_header(data: bytes, whole_file: bool) -> _FastDS | None:
    """Parse the header from ``data`` (the first bytes of the file), or None to use pydicom."""
    try:
        pos, ts = 0, ""
        if len(data) >= 132 and data[128:132] == b"DICM":
            pos = 132
            while pos + 8 <= len(data) and data[pos:pos + 2] == b"\x02\x00":
                pos, tag, val, _ = _next_element(data, pos, True)
                if tag == 0x00020010 and val is not None:
                    ts = val.decode("ascii", errors="replace").strip(" \0")
            if not ts:
                return None
            explicit = ts != "1.2.840.10008.1.2"
            if ts in ("1.2.840.10008.1.2.2",) or ts in ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"):
                return None
        else:
            if len(data) < 8 or data[0:2] not in (b"\x08\x00", b"\x02\x00", b"\x10\x00"):
                return None
            explicit = bytes(data[4:6]) in _VALID_VRS
            ts = "1.2.840.10008.1.2.1" if explicit else "1.2.840.10008.1.2"
        wanted = _wanted()
        elems: dict[int, _Raw] = {}
        has_dir = False
        while pos < len(data):
            try:
                nxt, tag, val, vr = _next_element(data, pos, explicit)
            except EOFError:
                if whole_file and pos + 8 > len(data):
                    break       # a header-only file that simply ends here
                return None
            if tag >= _STOP_TAG:
                break
            if tag >> 16 == 0x0004:
                has_dir = True
            if tag in wanted and val is not None:
                elems[tag] = _Raw(bytes(val), vr)
            pos = nxt
        if not elems and not has_dir:
            return None
        cs = elems.get(0x00080005)
        if cs is not None:  # other character sets (ISO 2022 escapes...): let pydicom decode names
            charset = cs.value.decode("latin-1").strip(" \0")
            if charset not in _FAST_CHARSETS:
                return None
        return _FastDS(elems, ts, has_dir)
    except (ValueError, EOFError, IndexError):
        return None


USE_SPECIFIC_TAGS = False  # measured slower in pydicom 3.0 (bench_index.py prints both)


def _read_dataset(fh, path: str, head: bytes = b""):
    """Header-only read of an open binary file; raises on anything unusable."""
    import pydicom

    if not head or b"1.2.840.10008.1.2.1.99" in head or b"1.2.840.10008.1.2.8.1" in head:
        _guard_deflate(fh, path, ZIP_MEMBER_CAP)  # deflated transfer syntax: bomb check first
    ds = pydicom.dcmread(fh, force=True, stop_before_pixels=True,
                         specific_tags=_TAGS if USE_SPECIFIC_TAGS else None)
    _ensure_transfer_syntax(ds)
    return ds


def _problem_reason(exc: BaseException) -> str:
    if isinstance(exc, LoadError):
        return exc.reason
    if isinstance(exc, PermissionError):
        return "permission denied; check the file's read permissions"
    if isinstance(exc, (IsADirectoryError, FileNotFoundError)):
        return "file vanished while scanning"
    msg = str(exc).replace("\n", " ")[:160]
    return f"damaged or incomplete DICOM header ({type(exc).__name__}: {msg})"


class _Collector:
    """Accumulates headers and problems; groups at the end."""

    def __init__(self) -> None:
        self.headers: list[_Header] = []
        self.problems: list[FileProblem] = []
        self.files_seen = 0
        self._sops: dict[str, str] = {}
        self._dicomdirs: set[str] = set()

    def add_bytes_or_file(self, fh, path: str, size: int | None) -> None:
        self.files_seen += 1
        if size == 0:
            self.problems.append(FileProblem(path, "empty file (0 bytes)"))
            return
        head = fh.read(2048)
        kind = sniff(head)
        if kind == "empty":
            self.problems.append(FileProblem(path, "empty file (0 bytes)"))
            return
        if kind == "no":
            self.problems.append(FileProblem(path, "not a DICOM file (no 'DICM' marker and no DICOM "
                                                   "data element at the start)"))
            return
        if USE_FAST_PATH and b"1.2.840.10008.1.2.1.99" not in head and b"1.2.840.10008.1.2.8.1" not in head:
            data = head + fh.read(8192 - len(head))
            fast = _fast_header(data, len(data) < 8192)
            if fast is None and len(data) == 8192:  # a longer header: one bigger read
                data += fh.read(FAST_READ_BYTES - len(data))
                fast = _fast_header(data, len(data) < FAST_READ_BYTES)
            if fast is not None:
                self.add_dataset(fast, path)
                return
        fh.seek(0)
        try:
            ds = _read_dataset(fh, path, head)
        except Exception as exc:
            self.problems.append(FileProblem(path, _problem_reason(exc)))
            return
        self.add_dataset(ds, path)

    def add_dataset(self, ds, path: str) -> None:
        try:
            if _s(ds, "SOPClassUID") == _MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
                self.note_dicomdir(path)  # its images are walked anyway; it is listed, not dropped
                return
            if not any(k in ds for k in ("SOPInstanceUID", "StudyInstanceUID", "Rows", "Modality")):
                self.problems.append(FileProblem(path, "not a DICOM image (no SOP Instance UID, "
                                                       "study or image attributes)"))
                return
            h = _header_from_dataset(ds, path)
        except Exception as exc:
            self.problems.append(FileProblem(path, _problem_reason(exc)))
            return
        sop = h.instance.sop_instance_uid
        if sop in self._sops:
            self.problems.append(FileProblem(path, f"duplicate of {self._sops[sop]} (same SOP "
                                                   f"Instance UID); shown once"))
            return
        self._sops[sop] = path
        self.headers.append(h)

    def note_dicomdir(self, path: str) -> None:
        """A DICOMDIR met during a folder walk: one entry saying what it is, plus one per file it
        references that is missing (PS3.10 8.6: a File-set's files must be present), so every
        file the walk meets is a row or a reason."""
        if path in self._dicomdirs:
            return
        self._dicomdirs.add(path)
        try:
            files, missing = dicomdir_files(path)
        except Exception as exc:  # noqa: BLE001 - reported, never raised
            self.problems.append(FileProblem(path, f"unreadable DICOMDIR ({_problem_reason(exc)})"))
            return
        self.problems.append(FileProblem(path, f"DICOMDIR (media directory, not an image) listing "
                                               f"{len(files) + len(missing)} file(s); the images are "
                                               f"indexed from the folder itself"))
        self.problems.extend(missing)

    def result(self, seconds: float, cancelled: bool) -> IndexResult:
        res = IndexResult(patients=group(self.headers), problems=self.problems,
                          files_seen=self.files_seen, seconds=seconds)
        if hasattr(res, "cancelled"):
            res.cancelled = cancelled  # type: ignore[attr-defined]
        if cancelled:
            res.problems.append(FileProblem("", "scan cancelled: the list is incomplete"))
        return res


# ----------------------------------------------------------------------------------------
# Grouping and sorting
# ----------------------------------------------------------------------------------------

def _normal(iop: tuple[float, ...]) -> tuple[float, float, float]:
    r, c = iop[:3], iop[3:6]
    return (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])


def sort_instances(instances: list[InstanceRecord]) -> list[InstanceRecord]:
    """By position along the slice normal when every instance has one, else by Instance Number.

    Position = ImagePositionPatient . (row cosines x column cosines) (PS3.3 C.7.6.2.1.1):
    ascending, so for axial CT index 0 is the most inferior slice.
    """
    if len(instances) > 1 and all(i.image_position and i.image_orientation for i in instances):
        n = _normal(instances[0].image_orientation)  # type: ignore[arg-type]

        def pos(i: InstanceRecord) -> float:
            p = i.image_position
            return p[0] * n[0] + p[1] * n[1] + p[2] * n[2]  # type: ignore[index]
        return sorted(instances, key=lambda i: (pos(i), i.instance_number or 0, i.path))
    return sorted(instances, key=lambda i: (i.instance_number is None, i.instance_number or 0, i.path))


def group(headers: Iterable[_Header]) -> list[PatientRecord]:
    """Patient -> Study -> Series, each level sorted for a browser (names, dates, numbers)."""
    patients: dict[str, PatientRecord] = {}
    studies: dict[str, StudyRecord] = {}
    series: dict[str, SeriesRecord] = {}
    for h in headers:
        p = patients.get(h.patient_id)
        if p is None:
            p = patients[h.patient_id] = PatientRecord(h.patient_id, h.patient_name, h.birth_date, h.sex)
        st = studies.get(h.study_uid)
        if st is None:
            st = studies[h.study_uid] = StudyRecord(h.study_uid, h.patient_id, h.study_date,
                                                    h.study_time, h.study_description, h.accession)
            p.studies.append(st)
        se = series.get(h.series_uid)
        if se is None:
            se = series[h.series_uid] = SeriesRecord(
                h.series_uid, h.study_uid, h.patient_id, h.modality, h.series_number,
                h.series_description, h.body_part, h.view_position,
                h.instance.rows, h.instance.columns, image_type=h.image_type,
                convolution_kernel=h.convolution_kernel, slice_thickness=h.slice_thickness)
            st.series.append(se)
        se.instances.append(h.instance)
    for se in series.values():
        se.instances = sort_instances(se.instances)
    for p in patients.values():
        p.studies.sort(key=lambda s: (s.study_date, s.study_time, s.study_uid))
        for st in p.studies:
            st.series.sort(key=lambda s: (s.series_number is None, s.series_number or 0,
                                          s.series_description, s.series_uid))
    return sorted(patients.values(), key=lambda p: (p.patient_name.lower(), p.patient_id))


# ----------------------------------------------------------------------------------------
# Sources: folders, DICOMDIR, ZIP
# ----------------------------------------------------------------------------------------

def _walk(root: str) -> Iterator[os.DirEntry]:
    """Files under root (depth first, sorted, hidden names skipped, symlinked dirs not followed)."""
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir(follow_symlinks=False):
                    subdirs.append(e.path)
                elif e.is_file():
                    yield e
            except OSError:
                continue
        stack.extend(reversed(subdirs))


def _is_zip_name(name: str) -> bool:
    return name.lower().endswith(".zip")


def _is_dicomdir_name(name: str) -> bool:
    return name.upper() == "DICOMDIR"


def _index_file(col: _Collector, path: str, size: int | None = None) -> None:
    try:
        with open(path, "rb") as fh:
            col.add_bytes_or_file(fh, path, size)
    except OSError as exc:
        col.files_seen += 1
        col.problems.append(FileProblem(path, _problem_reason(exc)))


def _index_zip(col: _Collector, path: str, tick: Callable[[str, int, int], bool]) -> bool:
    """Index every member of a ZIP; returns False when cancelled."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        col.files_seen += 1
        col.problems.append(FileProblem(path, f"damaged or unsupported ZIP archive ({exc})"))
        return True
    with zf:
        infos = zf.infolist()
        for k, info in enumerate(infos):
            if info.is_dir():
                continue
            base = info.filename.rsplit("/", 1)[-1]
            if base.startswith(".") or info.filename.startswith("__MACOSX/"):
                continue
            mpath = f"{path}{ZIP_SEP}{info.filename}"
            if not tick(mpath, k, len(infos)):
                return False
            if _is_zip_name(base):
                col.files_seen += 1
                col.problems.append(FileProblem(mpath, "ZIP inside a ZIP is not indexed; extract the "
                                                       "outer archive first"))
                continue
            if _is_dicomdir_name(base):
                continue
            try:
                _check_zip_info(info, ZIP_MEMBER_CAP)
                with zf.open(info) as fh:
                    data = fh.read(ZIP_MEMBER_CAP + 1)
                if len(data) > ZIP_MEMBER_CAP:
                    raise LoadError(mpath, "ZIP member inflates beyond its declared size; refused")
            except Exception as exc:
                col.files_seen += 1
                col.problems.append(FileProblem(mpath, _problem_reason(exc)))
                continue
            col.add_bytes_or_file(io.BytesIO(data), mpath, len(data))
    return True


def dicomdir_files(dicomdir: str) -> tuple[list[str], list[FileProblem]]:
    """Files referenced by a DICOMDIR (PS3.3 F.5 Referenced File ID), relative to its folder."""
    import pydicom

    base = os.path.dirname(os.path.abspath(dicomdir))
    ds = pydicom.dcmread(dicomdir, force=True)
    files, problems, seen = [], [], set()
    for rec in ds.get("DirectoryRecordSequence", []) or []:
        fid = rec.get("ReferencedFileID")
        if not fid:
            continue
        parts = [str(x) for x in (fid if not isinstance(fid, str) else [fid])]
        p = os.path.join(base, *parts)
        if not os.path.exists(p):  # media written on case-insensitive systems
            alt = os.path.join(base, *[x.lower() for x in parts])
            p = alt if os.path.exists(alt) else p
        if p in seen:
            continue
        seen.add(p)
        if os.path.isfile(p):
            files.append(p)
        else:
            problems.append(FileProblem(p, "listed in the DICOMDIR but missing on disk"))
    return files, problems


def index_path(path: str | Path, progress: ProgressFn | None = None,
               cancel: CancelFn | None = None) -> IndexResult:
    """Index a folder (recursively), a DICOMDIR, a ZIP archive or a single file.

    ``progress(fraction, message)`` is called now and then; ``cancel()`` returning True stops the
    scan and returns what was found so far (marked incomplete). Never raises for bad input.
    """
    t0 = time.perf_counter()
    col = _Collector()
    p = os.path.abspath(os.fspath(path))
    cancelled = False
    last = [0.0]

    def tick(current: str, done: int = 0, total: int = 0) -> bool:
        if cancel is not None and cancel():
            return False
        if progress is not None:
            now = time.perf_counter()
            if now - last[0] > 0.1:
                last[0] = now
                frac = done / total if total else 0.0
                try:
                    progress(min(frac, 1.0), f"{col.files_seen} files read")
                except Exception:
                    pass
        return True

    try:
        if os.path.isdir(p):
            entries = list(_walk(p))
            total = len(entries)
            for k, e in enumerate(entries):
                if not tick(e.path, k, total):
                    cancelled = True
                    break
                if _is_dicomdir_name(e.name):
                    col.files_seen += 1
                    col.note_dicomdir(e.path)
                    continue
                if _is_zip_name(e.name):
                    if not _index_zip(col, e.path, lambda m, i, n: tick(m, k, total)):
                        cancelled = True
                        break
                    continue
                try:
                    size = e.stat().st_size
                except OSError:
                    size = None
                _index_file(col, e.path, size)
        elif os.path.isfile(p):
            name = os.path.basename(p)
            if _is_zip_name(name) or (zipfile.is_zipfile(p) and not _looks_dicom_file(p)):
                cancelled = not _index_zip(col, p, tick)
            elif _is_dicomdir_name(name) or _is_dicomdir_file(p):
                try:
                    files, probs = dicomdir_files(p)
                except Exception as exc:
                    files, probs = [], [FileProblem(p, f"unreadable DICOMDIR ({_problem_reason(exc)})")]
                col.problems.extend(probs)
                for k, f in enumerate(files):
                    if not tick(f, k, len(files)):
                        cancelled = True
                        break
                    _index_file(col, f)
            else:
                _index_file(col, p)
        else:
            col.problems.append(FileProblem(p, "path not found; check that the folder or file exists"))
    except Exception as exc:  # last-resort guard: index_path never raises for bad input
        col.problems.append(FileProblem(p, f"scan stopped early ({type(exc).__name__}: {exc})"))
    res = col.result(time.perf_counter() - t0, cancelled)
    if progress is not None and not cancelled:
        try:
            progress(1.0, f"{res.files_seen} files, {len(res.all_series())} series")
        except Exception:
            pass
    return res


def _looks_dicom_file(p: str) -> bool:
    try:
        with open(p, "rb") as fh:
            return sniff(fh.read(132)) != "no"
    except OSError:
        return False


def _is_dicomdir_file(p: str) -> bool:
    """A Media Storage Directory file given under another name (PS3.10 7.2)."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(512)
        return _MEDIA_STORAGE_DIRECTORY.encode() in head
    except OSError:
        return False
