"""Checking and filing received DICOM instances, before anything reaches the store.

Every received object is decoded completely and checked (``parse_body``/``check_dataset``):
the encoding matches the negotiated transfer syntax (PS3.5 7.1), the pixel data matches the header
(PS3.5 8.1.1 native length, A.4 encapsulated fragments), and the SOP Class/Instance UIDs are the
request's (PS3.4 B.2.1). A failure carries its PS3.4 B.2.3 C-STORE status. Whole Part 10 files
(PS3.10 7.1) are checked with ``check_file_bytes``.

Instances are filed as ``<store>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm`` (mode 0644), written
atomically, one file per SOP Instance UID: a valid stored instance is never replaced or shadowed.
``StoreHandler`` is the EVT_C_STORE handler shared by the storage SCP and C-GET.

Privacy: log lines carry status codes and reasons only, never header values.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydicom import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from engine import paths

log = logging.getLogger(__name__)

StoredFn = Callable[["StoredInstance"], None]

FILE_MODE = 0o644          # received files are readable by the workstation's other users and tools
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# --------------------------------------------------------------------------------------------
# Integrity of received objects (checked before anything is filed)
# --------------------------------------------------------------------------------------------
STATUS_SUCCESS = 0x0000
STATUS_DUPLICATE = 0x0111          # PS3.7 Annex C status 0111H "Duplicate SOP Instance"
STATUS_OUT_OF_RESOURCES = 0xA700   # PS3.4 B.2.3 Refused: out of resources
STATUS_NOT_MATCHING = 0xA900       # PS3.4 B.2.3 Error: Data Set does not match SOP Class
STATUS_CANNOT_UNDERSTAND = 0xC000  # PS3.4 B.2.3 Error: cannot understand

_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB",
        b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM",
        b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV"}
_IMPLICIT = {ImplicitVRLittleEndian}
_BIG = {ExplicitVRBigEndian}
_DEFLATED = {DeflatedExplicitVRLittleEndian, "1.2.840.10008.1.2.8.1"}
_NATIVE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian} | _DEFLATED
# First bytes of the first fragment's codestream for each encapsulated syntax family.
_JPEG = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
         JPEGLSNearLossless}
_J2K = {JPEG2000Lossless, JPEG2000, "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93", HTJ2KLossless,
        HTJ2KLosslessRPCL, HTJ2K}
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_WARNINGS_LOCK = threading.Lock()


class IntegrityError(ValueError):
    """A received object is not what its transfer syntax and SOP class say; ``status`` is the
    PS3.4 B.2.3 C-STORE failure to answer, ``reason`` says why without any header value."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _encoding_matches(body: bytes, transfer_syntax: str) -> bool:
    """Does the first data element look like the transfer syntax says (PS3.5 7.1)?

    Explicit VR puts a two-letter VR after the tag; Implicit VR a 32-bit length. A body encoded
    the other way round (a file whose meta header lies) is recognised here before any parser
    silently guesses (pydicom switches encodings with only a warning).
    """
    if len(body) < 8:
        return False
    looks_explicit = body[4:6] in _VRS
    if transfer_syntax in _IMPLICIT:
        length = int.from_bytes(body[4:8], "little")
        return not looks_explicit or length <= len(body) - 8
    return looks_explicit


def _inflate(body: bytes) -> bytes:
    import zlib

    try:
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(body)
    except zlib.error as exc:
        raise IntegrityError(STATUS_CANNOT_UNDERSTAND, "deflated body does not inflate") from exc


def parse_body(body: bytes, transfer_syntax: str) -> Dataset:
    """Decode a received data set completely (every element, nested ones too) or raise."""
    from io import BytesIO

    from pydicom.filereader import read_dataset

    ts = str(transfer_syntax)
    raw = _inflate(body) if ts in _DEFLATED else body
    if not _encoding_matches(raw, ts):
        raise IntegrityError(STATUS_CANNOT_UNDERSTAND,
                             "data set is not encoded in the negotiated transfer syntax "
                             "(explicit/implicit VR mismatch)")
    try:
        # pydicom warnings can quote header values: recorded, never printed. catch_warnings swaps
        # process-wide state, so the SCP's association threads take turns (Python docs, warnings).
        with _WARNINGS_LOCK, warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            ds = read_dataset(BytesIO(raw), ts in _IMPLICIT, ts not in _BIG)
            for _ in ds.iterall():                  # converts every raw element: malformed ones raise
                pass
    except IntegrityError:
        raise
    except Exception as exc:                        # pydicom raises many types on corrupt input
        raise IntegrityError(STATUS_CANNOT_UNDERSTAND,
                             f"data set cannot be decoded ({type(exc).__name__})") from exc
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ds


def _native_pixel_bytes(ds: Dataset, keyword: str) -> int:
    """Bytes the header promises: Rows x Columns x Samples x Frames x BitsAllocated / 8 (PS3.5 8.1.1)."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if keyword == "PixelData":
        bits, samples = int(ds.BitsAllocated), int(ds.get("SamplesPerPixel", 1) or 1)
    else:
        bits, samples = (32 if keyword == "FloatPixelData" else 64), 1
    return (rows * cols * samples * frames * bits + 7) // 8


def _check_encapsulated(value: bytes, ts: str, frames: int) -> None:
    """Encapsulated Pixel Data (PS3.5 A.4): items, at least one fragment per frame unless an offset
    table says otherwise, and a codestream that starts as the transfer syntax says."""
    from pydicom.encaps import generate_fragments

    if value[:4] != b"\xfe\xff\x00\xe0":
        raise IntegrityError(STATUS_NOT_MATCHING, "pixel data is not encapsulated although the "
                             "transfer syntax is compressed (native pixels under a compressed label)")
    try:
        items = list(generate_fragments(value))
    except Exception as exc:
        raise IntegrityError(STATUS_NOT_MATCHING, "encapsulated pixel data items are broken") from exc
    fragments = items[1:]                            # the first item is the Basic Offset Table
    if not fragments or not fragments[0]:
        raise IntegrityError(STATUS_NOT_MATCHING, "encapsulated pixel data has no fragments")
    if len(fragments) < frames and not items[0]:
        raise IntegrityError(STATUS_NOT_MATCHING, f"{len(fragments)} fragment(s) for {frames} frames "
                             "and no offset table")
    head = fragments[0][:12]
    if ts in _JPEG and head[:2] != b"\xff\xd8":
        raise IntegrityError(STATUS_NOT_MATCHING, "first fragment is not a JPEG codestream (no SOI)")
    if ts in _J2K and head[:4] != b"\xff\x4f\xff\x51" and head[4:8] != b"jP  ":
        raise IntegrityError(STATUS_NOT_MATCHING, "first fragment is not a JPEG 2000 codestream")
    if ts == RLELossless and not (len(fragments[0]) >= 64 and 1 <= int.from_bytes(head[:4], "little") <= 15):
        raise IntegrityError(STATUS_NOT_MATCHING, "first fragment is not an RLE segment header")


def check_dataset(ds: Dataset, transfer_syntax: str, sop_class: str | None = None,
                  sop_instance: str | None = None) -> None:
    """Raise IntegrityError unless ``ds`` is a storable instance of ``sop_class``.

    Identity (PS3.4 B.2.1: the data set's SOP Class/Instance UIDs are the request's), the UIDs the
    store is keyed by, and pixel data consistent with the header: native length equal to what
    Rows x Columns x Samples x Bits x Frames promise (plus one pad byte, PS3.5 7.1.1), encapsulated
    data with fragments of the right codestream.
    """
    ts = str(transfer_syntax)
    got_class = str(ds.get("SOPClassUID", "")).strip()
    if not got_class or (sop_class and got_class != str(sop_class)):
        raise IntegrityError(STATUS_NOT_MATCHING, "SOP Class UID of the data set differs from the request")
    if sop_instance is not None and str(ds.get("SOPInstanceUID", "")).strip() != str(sop_instance):
        raise IntegrityError(STATUS_NOT_MATCHING, "SOP Instance UID of the data set differs from the request")
    for kw, what in (("StudyInstanceUID", "Study Instance UID"), ("SeriesInstanceUID", "Series Instance UID"),
                     ("SOPInstanceUID", "SOP Instance UID")):
        try:
            check_uid(str(ds.get(kw, "")), what)
        except ValueError as exc:
            raise IntegrityError(STATUS_NOT_MATCHING, str(exc)) from exc
    for kw in _PIXEL_TAGS:
        if kw not in ds:
            continue
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
        except (AttributeError, TypeError, ValueError) as exc:
            raise IntegrityError(STATUS_NOT_MATCHING, "pixel data without valid Rows/Columns/Number of "
                                 "Frames") from exc
        if rows <= 0 or cols <= 0 or frames <= 0:
            raise IntegrityError(STATUS_NOT_MATCHING, "pixel data with zero Rows, Columns or frames")
        value = ds[kw].value or b""
        if ts in _NATIVE or kw != "PixelData":
            try:
                want = _native_pixel_bytes(ds, kw)
            except (AttributeError, TypeError, ValueError) as exc:
                raise IntegrityError(STATUS_NOT_MATCHING, "pixel data without Bits Allocated") from exc
            if len(value) not in (want, want + 1):
                raise IntegrityError(STATUS_NOT_MATCHING, f"native pixel data holds {len(value)} bytes, "
                                     f"the header promises {want}")
        else:
            _check_encapsulated(value, ts, frames)


def _split_file(data: bytes) -> tuple[bytes, str]:
    """(data set body, transfer syntax) of an encoded Part 10 file (PS3.10 7.1)."""
    from io import BytesIO

    from pydicom.filereader import read_preamble, _read_file_meta_info

    fp = BytesIO(data)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    return data[fp.tell():], str(meta.get("TransferSyntaxUID", ""))


def check_file_bytes(data: bytes) -> Dataset:
    """Parse and check a whole Part 10 file; returns its data set or raises IntegrityError."""
    try:
        body, ts = _split_file(data)
    except Exception as exc:
        raise IntegrityError(STATUS_CANNOT_UNDERSTAND, f"file meta information unreadable "
                             f"({type(exc).__name__})") from exc
    ds = parse_body(body, ts)
    check_dataset(ds, ts)
    return ds


def _body_of(data: bytes) -> bytes:
    """The data set after the file meta (senders differ in meta, e.g. Implementation Class UID)."""
    try:
        return _split_file(data)[0]
    except Exception:
        return data


def _is_valid_file(path: Path) -> bool:
    try:
        check_file_bytes(path.read_bytes())
        return True
    except (IntegrityError, OSError):
        return False


# --------------------------------------------------------------------------------------------
# Filing received instances
# --------------------------------------------------------------------------------------------
@dataclass
class StoredInstance:
    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    duplicate: bool = False      # the same data set was already in the store
    conflict: bool = False       # a different, valid data set holds this SOP UID: it was kept, the new one not filed
    replaced: bool = False       # the stored copy failed the integrity check and was replaced


def check_uid(uid: str, what: str) -> str:
    """``uid`` without padding, or ValueError unless it is a valid UID (PS3.5 9.1): UIDs name the
    store's folders, so a peer must not steer paths with them."""
    u = (uid or "").strip().rstrip("\x00")
    if not u or len(u) > 64 or not _UID_RE.match(u):
        raise ValueError(f"{what} is missing or not a valid UID (PS3.5 9.1)")
    return u


def _link_new(tmp: Path, final: Path) -> bool:
    """Give ``tmp`` the name ``final`` only if ``final`` does not exist (atomic where links work)."""
    try:
        os.link(tmp, final)
        return True
    except FileExistsError:
        return False
    except OSError as exc:          # filesystem without hard links (e.g. FAT): check-then-rename
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if final.exists():
            return False
        os.replace(tmp, final)
        return True


def file_instance(data: bytes, study_uid: str, series_uid: str, sop_uid: str,
                  root: Path | None = None) -> StoredInstance:
    """Write one encoded, already checked DICOM file as ``root/<Study>/<Series>/<SOP>.dcm``.

    Atomic (temp file in the target folder, mode 0644, then link/rename). One file per SOP
    Instance UID, so nothing can shadow a stored instance: the same data set again (meta header
    aside) is a duplicate; a *different* data set under a stored, valid UID is not filed and is
    reported as a conflict (the stored copy is kept); a stored copy that fails the integrity check
    (left by an older version) is replaced by the new one. UIDs are validated so a peer cannot
    steer paths (``..``).
    """
    study_uid = check_uid(study_uid, "Study Instance UID")
    series_uid = check_uid(series_uid, "Series Instance UID")
    sop_uid = check_uid(sop_uid, "SOP Instance UID")
    folder = (root or paths.store_dir()) / study_uid / series_uid
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{sop_uid}.dcm"
    body = _body_of(data)
    if final.exists():
        held = final.read_bytes()
        if held == data or _body_of(held) == body:
            return StoredInstance(final, study_uid, series_uid, sop_uid, duplicate=True)
        if _is_valid_file(final):
            log.warning("Received a different data set under a stored SOP Instance UID: kept the stored "
                        "copy, the new one was not filed (conflict)")
            return StoredInstance(final, study_uid, series_uid, sop_uid, conflict=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".incoming-", suffix=".part", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())
        if _link_new(tmp, final):
            return StoredInstance(final, study_uid, series_uid, sop_uid)
        held = final.read_bytes()                   # appeared meanwhile (a parallel association)
        if _body_of(held) == body:
            return StoredInstance(final, study_uid, series_uid, sop_uid, duplicate=True)
        if _is_valid_file(final):
            return StoredInstance(final, study_uid, series_uid, sop_uid, conflict=True)
        os.replace(tmp, final)
        log.warning("Replaced a stored copy that failed the integrity check by a valid one")
        return StoredInstance(final, study_uid, series_uid, sop_uid, replaced=True)
    finally:
        tmp.unlink(missing_ok=True)


class StoreHandler:
    """EVT_C_STORE handler shared by the storage SCP and C-GET (PS3.4 B.2.3 statuses).

    Every object is decoded and checked (``parse_body``/``check_dataset``) before it is filed; a
    refusal answers a failure status and logs the reason, never a header value. Filed instances
    are announced (``on_stored``) only when their association is released normally, so the
    browser never shows half a study (``release``).
    """

    def __init__(self, root: Path | None, on_stored: StoredFn | None):
        self.root = root
        self.on_stored = on_stored
        self.lock = threading.Lock()
        self.stored: list[StoredInstance] = []
        self.conflicts: list[StoredInstance] = []
        self.failed = 0
        self.refusals: list[tuple[int, str]] = []            # (status, reason) per refused object
        self._pending: dict[int, list[StoredInstance]] = {}  # association id -> not yet announced

    def _refuse(self, status: int, reason: str) -> int:
        log.warning("Refused a received instance (status %#06x): %s", status, reason)
        with self.lock:
            self.failed += 1
            self.refusals.append((status, reason))
        return status

    def __call__(self, event) -> int:
        try:
            ts = str(event.context.transfer_syntax)
            body = event.request.DataSet.getvalue()
            ds = parse_body(body, ts)
            check_dataset(ds, ts, str(event.request.AffectedSOPClassUID),
                          str(event.request.AffectedSOPInstanceUID))
            data = event.encoded_dataset(include_meta=True)
            rec = file_instance(data, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                str(ds.SOPInstanceUID), self.root)
        except IntegrityError as exc:
            return self._refuse(exc.status, exc.reason)
        except ValueError as exc:
            return self._refuse(STATUS_NOT_MATCHING, str(exc))
        except OSError as exc:
            log.error("Could not file a received instance (%s): check free disk space", exc.strerror or exc)
            with self.lock:
                self.failed += 1
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:              # anything else: log the type only (no values)
            return self._refuse(STATUS_CANNOT_UNDERSTAND, f"unexpected {type(exc).__name__}")
        if rec.conflict:
            with self.lock:
                self.conflicts.append(rec)
                self.failed += 1
            return STATUS_DUPLICATE
        with self.lock:
            self.stored.append(rec)
            self._pending.setdefault(id(event.assoc), []).append(rec)
        return STATUS_SUCCESS

    def release(self, assoc_key: int | None = None) -> list[StoredInstance]:
        """Announce the instances of one released association (all when ``assoc_key`` is None)."""
        with self.lock:
            if assoc_key is None:
                recs = [r for lst in self._pending.values() for r in lst]
                self._pending.clear()
            else:
                recs = self._pending.pop(assoc_key, [])
        if self.on_stored is not None:
            for rec in recs:
                try:
                    self.on_stored(rec)
                except Exception:             # a GUI callback must never fail the SCP
                    log.exception("on_stored callback failed")
        return recs

    def drop(self, assoc_key: int) -> None:
        """An aborted association: its files stay (each was valid) but are not announced."""
        with self.lock:
            n = len(self._pending.pop(assoc_key, []))
        if n:
            log.warning("Association aborted after %d instance(s): not shown until a complete transfer", n)

    def on_released(self, event) -> None:
        self.release(id(event.assoc))

    def on_aborted(self, event) -> None:
        self.drop(id(event.assoc))
