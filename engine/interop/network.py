"""DICOM network SCU with pynetdicom: C-ECHO, C-FIND, C-MOVE/C-GET retrieve, C-STORE to a peer.

Services follow PS3.4: Verification (annex A), Storage (annex B), Query/Retrieve (annex C:
Patient Root for PATIENT level, Study Root for STUDY/SERIES/IMAGE). Also the association and
TLS helpers (PS3.15 B.9) the storage SCP shares. C-GET negotiates one presentation context per
compressed syntax so files keep their transfer syntax; what it receives is checked and filed by
``engine.interop.received`` (the storage SCP is ``engine.interop.storage_scp``).

Privacy: pynetdicom logs C-FIND/C-MOVE/C-GET identifiers (patient names, IDs) by default; this
module switches that off at import, and its own log lines carry counts, AE titles and status
codes only — never names, IDs or birth dates.
"""
from __future__ import annotations

import logging
import re
import ssl
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from pydicom import Dataset, dcmread
from pydicom.uid import (
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
from pynetdicom import AE, _config, build_role, evt
from pynetdicom import sop_class as sc

from engine.interop.netconfig import NetworkSettings, Peer, TLSSettings
from engine.interop.received import StoredFn, StoredInstance, StoreHandler, check_uid


def quiet_identifiers() -> None:
    """Stop pynetdicom from logging query/retrieve identifiers (they hold patient names and IDs)."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


quiet_identifiers()
log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

# Storage SOP classes we ask to receive over a C-GET association (PS3.4 C.4.3 needs a
# presentation context plus SCP role selection for each; 128 contexts at most, PS3.8 9.3.2.2).
GET_STORAGE_CLASSES = [
    sc.ComputedRadiographyImageStorage,
    sc.DigitalXRayImageStorageForPresentation,
    sc.DigitalXRayImageStorageForProcessing,
    sc.CTImageStorage,
    sc.EnhancedCTImageStorage,
    sc.LegacyConvertedEnhancedCTImageStorage,
    sc.MRImageStorage,
    sc.EnhancedMRImageStorage,
    sc.UltrasoundImageStorage,
    sc.NuclearMedicineImageStorage,
    sc.PositronEmissionTomographyImageStorage,
    sc.XRayAngiographicImageStorage,
    sc.DigitalMammographyXRayImageStorageForPresentation,
    sc.SecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    sc.MultiFrameTrueColorSecondaryCaptureImageStorage,
    sc.ParametricMapStorage,
    sc.SegmentationStorage,
    sc.GrayscaleSoftcopyPresentationStateStorage,
    sc.KeyObjectSelectionDocumentStorage,
    sc.BasicTextSRStorage,
    sc.EnhancedSRStorage,
    sc.ComprehensiveSRStorage,
    sc.Comprehensive3DSRStorage,
    sc.XRayRadiationDoseSRStorage,
    sc.EncapsulatedPDFStorage,
]

LEVEL_MODELS = {
    "PATIENT": (sc.PatientRootQueryRetrieveInformationModelFind,
                sc.PatientRootQueryRetrieveInformationModelMove,
                sc.PatientRootQueryRetrieveInformationModelGet),
    "STUDY": (sc.StudyRootQueryRetrieveInformationModelFind,
              sc.StudyRootQueryRetrieveInformationModelMove,
              sc.StudyRootQueryRetrieveInformationModelGet),
}
LEVEL_MODELS["SERIES"] = LEVEL_MODELS["STUDY"]
LEVEL_MODELS["IMAGE"] = LEVEL_MODELS["STUDY"]


class NetworkError(Exception):
    """A DICOM network operation failed; the message says what to check (never holds identifiers).

    ``result``: what a retrieve did get before it failed (a RetrieveResult), when there is one."""

    result = None


# --------------------------------------------------------------------------------------------
# TLS (PS3.15 B.9): contexts from the PEM files in the settings
# --------------------------------------------------------------------------------------------
def client_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """SSL context for our SCU: verify the server against ``ca_file`` (or the system CAs)."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if not tls.verify_peer:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if tls.cert_file and tls.key_file:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise NetworkError(f"Cannot load the TLS certificate/key/CA files ({exc}): check the "
                           "PEM paths in Network settings.") from exc
    return ctx


def server_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """SSL context for our SCP; clients must present a certificate when ``ca_file`` is set."""
    tls.validate()
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca_file or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if (tls.ca_file and tls.verify_peer) else ssl.CERT_NONE
    except (OSError, ssl.SSLError) as exc:
        raise NetworkError(f"Cannot load the TLS certificate/key files ({exc}): check the PEM "
                           "paths in Network settings.") from exc
    return ctx


# --------------------------------------------------------------------------------------------
# Association helper
# --------------------------------------------------------------------------------------------
def make_ae(settings: NetworkSettings) -> AE:
    """An AE with our AE title and ``settings.timeout_s`` for ACSE, DIMSE, network and connection."""
    ae = AE(ae_title=settings.ae_title)
    t = float(settings.timeout_s)
    ae.acse_timeout = t
    ae.dimse_timeout = t
    ae.network_timeout = t
    ae.connection_timeout = t
    return ae


@contextmanager
def _association(settings: NetworkSettings, peer: Peer, contexts: Sequence[tuple[str, list[str]]],
                 roles: list | None = None, handlers: list | None = None) -> Iterator:
    """Open an association to ``peer`` with the given (abstract syntax, transfer syntaxes)."""
    ae = make_ae(settings)
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    tls_args = (client_ssl_context(settings.tls), peer.host) if peer.tls else None
    assoc = ae.associate(peer.host, int(peer.port), ae_title=peer.ae_title, ext_neg=roles or None,
                         evt_handlers=handlers or None, tls_args=tls_args)
    if not assoc.is_established:
        where = f"{peer.name} ({peer.ae_title}@{peer.host}:{peer.port})"
        if assoc.is_rejected:
            raise NetworkError(f"{where} rejected the association: ask the PACS administrator "
                               f"to register our AE title '{settings.ae_title}', and check the "
                               "peer's AE title.")
        raise NetworkError(f"Could not connect to {where}: check host, port, TLS setting and "
                           "that the PACS is running.")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def echo(settings: NetworkSettings, peer: Peer) -> float:
    """C-ECHO (PS3.4 A): returns the round trip in seconds or raises NetworkError."""
    t0 = time.perf_counter()
    with _association(settings, peer, [(sc.Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]) as a:
        status = a.send_c_echo()
        code = getattr(status, "Status", None)
        if code != 0x0000:
            raise NetworkError(f"{peer.name} answered C-ECHO with status "
                               f"{'none' if code is None else hex(code)}.")
    dt = time.perf_counter() - t0
    log.info("C-ECHO %s ok in %.3f s", peer.ae_title, dt)
    return dt


# --------------------------------------------------------------------------------------------
# C-FIND
# --------------------------------------------------------------------------------------------
@dataclass
class StudyQuery:
    """What the user searches for; empty fields match anything (PS3.4 C.2.2.2 universal matching)."""

    patient_name: str = ""       # substring; '*'/'?' wildcards are passed through
    patient_id: str = ""
    date_from: str = ""          # YYYYMMDD
    date_to: str = ""            # YYYYMMDD
    modality: str = ""           # e.g. "CT", "CR", "DX"
    accession_number: str = ""
    study_uid: str = ""


@dataclass
class PatientMatch:
    patient_id: str
    patient_name: str
    birth_date: str = ""
    sex: str = ""
    n_studies: int | None = None


@dataclass
class StudyMatch:
    study_uid: str
    patient_id: str = ""
    patient_name: str = ""
    birth_date: str = ""
    study_date: str = ""
    study_time: str = ""
    description: str = ""
    accession_number: str = ""
    modalities: list[str] = field(default_factory=list)
    n_series: int | None = None
    n_instances: int | None = None


@dataclass
class SeriesMatch:
    series_uid: str
    study_uid: str
    modality: str = ""
    series_number: int | None = None
    description: str = ""
    n_instances: int | None = None


def _wild(text: str) -> str:
    """Substring match for names: 'smith' -> '*smith*' unless the user typed wildcards."""
    t = text.strip()
    if not t or "*" in t or "?" in t:
        return t
    return f"*{t}*"


def _date_range(d_from: str, d_to: str) -> str:
    """PS3.4 C.2.2.2.5 range matching: 'A-B', 'A-' or '-B'."""
    a, b = d_from.strip().replace("-", ""), d_to.strip().replace("-", "")
    for d in (a, b):
        if d and not re.fullmatch(r"\d{8}", d):
            raise ValueError(f"Date '{d}' is not YYYYMMDD: enter e.g. 20240131.")
    if a and b:
        return a if a == b else f"{a}-{b}"
    if a:
        return f"{a}-"
    if b:
        return f"-{b}"
    return ""


def _int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def find(settings: NetworkSettings, peer: Peer, identifier: Dataset,
         cancel: CancelFn | None = None) -> list[Dataset]:
    """C-FIND with a ready identifier; ``QueryRetrieveLevel`` selects the information model."""
    level = str(identifier.get("QueryRetrieveLevel", "STUDY")).upper()
    if level not in LEVEL_MODELS:
        raise ValueError(f"QueryRetrieveLevel '{level}' must be PATIENT, STUDY, SERIES or IMAGE.")
    model = LEVEL_MODELS[level][0]
    out: list[Dataset] = []
    with _association(settings, peer, [(model, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]) as a:
        for status, ident in a.send_c_find(identifier, model):
            if cancel is not None and cancel():
                a.abort()
                break
            code = getattr(status, "Status", None)
            if code is None:
                raise NetworkError(f"{peer.name} did not answer the C-FIND (timeout or aborted): "
                                   "try again or raise the timeout in Network settings.")
            if code in (0xFF00, 0xFF01):
                if ident is not None:
                    out.append(ident)
            elif code != 0x0000:
                raise NetworkError(f"{peer.name} refused the {level} query (status {code:#06x}).")
    log.info("C-FIND %s level %s: %d matches", peer.ae_title, level, len(out))
    return out


def _study_identifier(q: StudyQuery) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = _wild(q.patient_name)
    ds.PatientID = q.patient_id.strip()
    ds.PatientBirthDate = ""
    ds.StudyDate = _date_range(q.date_from, q.date_to)
    ds.StudyTime = ""
    ds.StudyDescription = ""
    ds.AccessionNumber = q.accession_number.strip()
    ds.ModalitiesInStudy = q.modality.strip().upper()
    ds.StudyInstanceUID = q.study_uid.strip()
    ds.NumberOfStudyRelatedSeries = ""
    ds.NumberOfStudyRelatedInstances = ""
    return ds


def find_patients(settings: NetworkSettings, peer: Peer, q: StudyQuery) -> list[PatientMatch]:
    """PATIENT level C-FIND (Patient Root, PS3.4 C.6.1)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "PATIENT"
    ds.PatientName = _wild(q.patient_name)
    ds.PatientID = q.patient_id.strip()
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.NumberOfPatientRelatedStudies = ""
    return [PatientMatch(patient_id=str(r.get("PatientID", "")), patient_name=str(r.get("PatientName", "")),
                         birth_date=str(r.get("PatientBirthDate", "")), sex=str(r.get("PatientSex", "")),
                         n_studies=_int(r.get("NumberOfPatientRelatedStudies")))
            for r in find(settings, peer, ds)]


def find_studies(settings: NetworkSettings, peer: Peer, q: StudyQuery,
                 cancel: CancelFn | None = None) -> list[StudyMatch]:
    """STUDY level C-FIND (Study Root, PS3.4 C.6.2), sorted newest first."""
    out = []
    for r in find(settings, peer, _study_identifier(q), cancel):
        mods = r.get("ModalitiesInStudy", "")
        mods = [str(mods)] if isinstance(mods, str) else [str(m) for m in mods]
        mods = [m for m in mods if m]
        out.append(StudyMatch(
            study_uid=str(r.get("StudyInstanceUID", "")), patient_id=str(r.get("PatientID", "")),
            patient_name=str(r.get("PatientName", "")), birth_date=str(r.get("PatientBirthDate", "")),
            study_date=str(r.get("StudyDate", "")), study_time=str(r.get("StudyTime", "")),
            description=str(r.get("StudyDescription", "")), accession_number=str(r.get("AccessionNumber", "")),
            modalities=mods, n_series=_int(r.get("NumberOfStudyRelatedSeries")),
            n_instances=_int(r.get("NumberOfStudyRelatedInstances"))))
    out.sort(key=lambda s: (s.study_date, s.study_time), reverse=True)
    return out


def find_series(settings: NetworkSettings, peer: Peer, study_uid: str, modality: str = "") -> list[SeriesMatch]:
    """SERIES level C-FIND within one study (Study Root, PS3.4 C.6.2)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = ""
    ds.Modality = modality.strip().upper()
    ds.SeriesNumber = ""
    ds.SeriesDescription = ""
    ds.NumberOfSeriesRelatedInstances = ""
    out = [SeriesMatch(series_uid=str(r.get("SeriesInstanceUID", "")), study_uid=study_uid,
                       modality=str(r.get("Modality", "")), series_number=_int(r.get("SeriesNumber")),
                       description=str(r.get("SeriesDescription", "")),
                       n_instances=_int(r.get("NumberOfSeriesRelatedInstances")))
           for r in find(settings, peer, ds)]
    out.sort(key=lambda s: (s.series_number is None, s.series_number or 0))
    return out


def find_instances(settings: NetworkSettings, peer: Peer, study_uid: str, series_uid: str) -> list[str]:
    """IMAGE level C-FIND: the SOP Instance UIDs of one series."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = ""
    ds.SOPClassUID = ""
    ds.InstanceNumber = ""
    return [str(r.get("SOPInstanceUID", "")) for r in find(settings, peer, ds)]


# --------------------------------------------------------------------------------------------
# Retrieve: C-MOVE (peer pushes to our SCP) and C-GET (same association)
# --------------------------------------------------------------------------------------------
@dataclass
class RetrieveResult:
    completed: int = 0
    failed: int = 0
    warning: int = 0
    stored: list[StoredInstance] = field(default_factory=list)   # filled for C-GET
    conflicts: list[StoredInstance] = field(default_factory=list)  # C-GET: different data under a stored UID
    cancelled: bool = False
    status: int | None = None


def _retrieve_identifier(study_uid: str, series_uid: str | None) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
    ds.StudyInstanceUID = check_uid(study_uid, "Study Instance UID")
    if series_uid:
        ds.SeriesInstanceUID = check_uid(series_uid, "Series Instance UID")
    return ds


def _track(responses, op: str, peer: Peer, assoc, progress: ProgressFn | None,
           cancel: CancelFn | None, destination: str = "") -> RetrieveResult:
    res = RetrieveResult()
    for status, _ident in responses:
        if cancel is not None and cancel():
            assoc.abort()
            res.cancelled = True
            log.info("%s from %s cancelled by the user", op, peer.ae_title)
            return res
        code = getattr(status, "Status", None)
        if code is None:
            raise NetworkError(f"{peer.name} stopped answering the {op} (timeout or aborted): "
                               "try again or raise the timeout in Network settings.")
        done = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
        fail = int(status.get("NumberOfFailedSuboperations", 0) or 0)
        warn = int(status.get("NumberOfWarningSuboperations", 0) or 0)
        left = int(status.get("NumberOfRemainingSuboperations", 0) or 0)
        res.completed, res.failed, res.warning, res.status = done, fail, warn, code
        total = done + fail + warn + left
        if progress is not None:
            progress(1.0 if code != 0xFF00 or total == 0 else (done + fail + warn) / total,
                     f"{done + fail + warn} of {total} received" if total else "waiting for the PACS")
        if code == 0xFF00:
            continue
        if code == 0xA801 or (op == "C-MOVE" and done == 0 and (code & 0xF000) == 0xC000):
            raise NetworkError(f"{peer.name} refused the C-MOVE (status {code:#06x}): most likely it "
                               f"does not know the move destination '{destination}'. Register that AE "
                               "title with our host and port on the PACS, or use C-GET for this peer.")
        if code not in (0x0000, 0xB000, 0xFE00):
            raise NetworkError(f"{peer.name} refused the {op} (status {code:#06x}); "
                               f"{fail} instance(s) failed.")
    log.info("%s from %s: %d completed, %d failed, %d warnings", op, peer.ae_title,
             res.completed, res.failed, res.warning)
    return res


def move(settings: NetworkSettings, peer: Peer, study_uid: str, series_uid: str | None = None,
         destination: str | None = None, progress: ProgressFn | None = None,
         cancel: CancelFn | None = None) -> RetrieveResult:
    """C-MOVE a study or series to ``destination`` (default: our AE title; our SCP must run)."""
    model = LEVEL_MODELS["STUDY"][1]
    ident = _retrieve_identifier(study_uid, series_uid)
    with _association(settings, peer, [(model, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]) as a:
        dest = destination or settings.ae_title
        return _track(a.send_c_move(ident, dest, model), "C-MOVE", peer, a, progress, cancel, dest)


# Encapsulated syntaxes offered for image classes over C-GET, each in a presentation context of its
# own: an acceptor picks one syntax per context (PS3.8 9.3.2.2), so a single context listing them
# all lets the peer choose Explicit VR and decompress (or fail on what it cannot transcode).
GET_COMPRESSED_SYNTAXES = [
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K,
]
GET_NATIVE_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
MAX_CONTEXTS = 128                   # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255


def _compressible(sop_class: str) -> bool:
    """Image storage classes whose pixels may be encapsulated. Parametric Maps (float pixels) and
    Segmentations (1-bit or fractional) are sent in native syntaxes."""
    from pydicom.uid import UID

    from pynetdicom.sop_class import uid_to_service_class

    if sop_class in (sc.ParametricMapStorage, sc.SegmentationStorage):
        return False
    name = UID(sop_class).name.lower()
    return uid_to_service_class(sop_class).__name__ == "StorageServiceClass" and "image" in name


def get_contexts(sop_classes: Sequence[str], budget: int = MAX_CONTEXTS - 1) -> list[tuple[str, list[str]]]:
    """Presentation contexts for receiving ``sop_classes`` over C-GET within ``budget`` contexts.

    Every class gets a native context (Explicit and Implicit VR LE); image classes, in the given
    order, additionally one context per compressed syntax while the budget lasts, so the peer
    can send each file in the syntax it holds.
    """
    classes = list(dict.fromkeys(str(c) for c in sop_classes))[:budget]
    contexts: list[tuple[str, list[str]]] = [(c, list(GET_NATIVE_SYNTAXES)) for c in classes]
    left = budget - len(contexts)
    for c in classes:
        if not _compressible(c):
            continue
        extra = [(c, [ts]) for ts in GET_COMPRESSED_SYNTAXES]
        if len(extra) > left:
            extra = extra[:left]
        contexts += extra
        left -= len(extra)
        if left <= 0:
            break
    return contexts


def _sop_classes_of(settings: NetworkSettings, peer: Peer, study_uid: str,
                    series_uid: str | None) -> list[str]:
    """SOP classes the retrieve will deliver, from C-FIND (PS3.4 C.6.2.1.2 SOP Classes in Study,
    else SOP Class UID at IMAGE level); empty when the peer does not say."""
    try:
        if series_uid is None:
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = study_uid
            ds.SOPClassesInStudy = ""
            found = [str(v) for r in find(settings, peer, ds)
                     for v in (r.get("SOPClassesInStudy") or []) if str(v)]
            if found:
                return found
            series = [s.series_uid for s in find_series(settings, peer, study_uid)]
        else:
            series = [series_uid]
        out: list[str] = []
        for uid in series:
            ds = Dataset()
            ds.QueryRetrieveLevel = "IMAGE"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = uid
            ds.SOPInstanceUID = ""
            ds.SOPClassUID = ""
            out += [str(r.get("SOPClassUID", "")) for r in find(settings, peer, ds) if r.get("SOPClassUID")]
        return list(dict.fromkeys(out))
    except NetworkError as exc:
        log.info("C-FIND for the SOP classes before C-GET failed (%s): offering the default classes", exc)
        return []


def get(settings: NetworkSettings, peer: Peer, study_uid: str, series_uid: str | None = None,
        root: Path | None = None, progress: ProgressFn | None = None, cancel: CancelFn | None = None,
        on_stored: StoredFn | None = None) -> RetrieveResult:
    """C-GET a study or series over one association, filing instances into the store (PS3.4 C.4.3).

    Presentation contexts keep each file's transfer syntax (``get_contexts`` for the SOP classes
    C-FIND reports, then the default classes while the 128-context limit allows), with SCP role
    selection per class (PS3.7 D.3.3.4). Every filed instance is in the result, also when some
    sub-operations failed; only a retrieve that filed nothing raises (``NetworkError.result``).
    """
    model = LEVEL_MODELS["STUDY"][2]
    ident = _retrieve_identifier(study_uid, series_uid)
    handler = StoreHandler(root, on_stored)
    classes = _sop_classes_of(settings, peer, study_uid, series_uid)
    storage = get_contexts(classes + [c for c in GET_STORAGE_CLASSES if c not in classes])
    contexts = [(model, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])] + storage
    roles = [build_role(uid, scp_role=True) for uid in dict.fromkeys(c for c, _ in storage)]
    try:
        with _association(settings, peer, contexts, roles, [(evt.EVT_C_STORE, handler)]) as a:
            res = _track(a.send_c_get(ident, model), "C-GET", peer, a, progress, cancel)
    except NetworkError as exc:
        partial = RetrieveResult(completed=len(handler.stored), failed=max(1, handler.failed),
                                 stored=list(handler.stored))
        if handler.stored:
            log.warning("C-GET from %s ended with an error after %d instance(s) were filed",
                        peer.ae_title, len(handler.stored))
            handler.release()
            partial.status = getattr(exc, "status", None)
            return partial
        exc.result = partial
        raise
    res.stored = list(handler.stored)
    res.conflicts = list(handler.conflicts)
    if not res.cancelled:
        handler.release()
    return res


# --------------------------------------------------------------------------------------------
# C-STORE to a peer
# --------------------------------------------------------------------------------------------
@dataclass
class StoreResult:
    sent: list[str] = field(default_factory=list)                     # SOP Instance UIDs
    failed: list[tuple[str, str]] = field(default_factory=list)       # (SOP UID, reason)

    @property
    def ok(self) -> bool:
        return not self.failed


def _as_dataset(item: Dataset | str | Path) -> Dataset:
    if isinstance(item, Dataset):
        return item
    try:
        return dcmread(str(item))
    except Exception as exc:          # pydicom raises many types; tell the user which file
        raise NetworkError(f"Cannot read {Path(str(item)).name} for sending ({exc}).") from exc


def send(settings: NetworkSettings, peer: Peer, items: Iterable[Dataset | str | Path],
         progress: ProgressFn | None = None) -> StoreResult:
    """C-STORE datasets or files to ``peer`` (PS3.4 B) over one association."""
    datasets = [_as_dataset(i) for i in items]
    if not datasets:
        return StoreResult()
    contexts: dict[str, list[str]] = {}
    for ds in datasets:
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ExplicitVRLittleEndian)
        lst = contexts.setdefault(str(ds.SOPClassUID), [])
        for t in [ts] + ([ExplicitVRLittleEndian, ImplicitVRLittleEndian]
                         if ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) else []):
            if t not in lst:
                lst.append(t)
    if len(contexts) > 128:
        raise NetworkError("More than 128 different SOP classes in one send: send in smaller batches.")
    res = StoreResult()
    with _association(settings, peer, list(contexts.items())) as a:
        for i, ds in enumerate(datasets):
            uid = str(ds.SOPInstanceUID)
            try:
                status = a.send_c_store(ds)
                code = getattr(status, "Status", None)
            except (ValueError, RuntimeError) as exc:      # no accepted context for this dataset
                res.failed.append((uid, f"not accepted by the peer ({exc})"))
                continue
            if code is None:
                res.failed.append((uid, "no response (timeout or aborted)"))
            elif code == 0x0000 or (code & 0xF000) == 0xB000:
                res.sent.append(uid)
            else:
                res.failed.append((uid, f"status {code:#06x}"))
            if progress is not None:
                progress((i + 1) / len(datasets), f"sent {i + 1} of {len(datasets)}")
    log.info("C-STORE to %s: %d sent, %d failed", peer.ae_title, len(res.sent), len(res.failed))
    return res
