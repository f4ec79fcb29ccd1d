"""Read a DICOM header or decode one frame safely (PS3.10, PS3.5 A.4, PS3.3 C.7.6.3).

Every failure leaves this module as :class:`engine.errors.LoadError` with a reason a user can act
on. The declared pixel-data size is checked against a memory budget *before* anything is decoded,
and deflated or zipped input is measured while streaming so a bomb is refused without inflating it
(engine.dicom.budget). The decoded frame goes through the Modality LUT into a
:class:`engine.dicom.display.Frame`, which engine.dicom.display windows for display.
"""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from engine.dicom.attributes import _functional_item, _int, _num
from engine.dicom.budget import (_J2K_TS, _JPEG_TS, _RLE_TS, DEFAULT_BUDGET_BYTES, _check_zip_info,
                                 _frame_fragments, _guard_deflate, _ts_name, check_budget,
                                 decode_working_bytes, inspect_codestreams, jpeg_sof)
from engine.dicom.display import (Frame, _to_rgb8, header_windows, modality_lut, robust_window,
                                  voi_lut_of)
from engine.errors import LoadError

ZIP_SEP = "::"
_SEQUENTIAL_SOF = (0xC0, 0xC1)   # baseline and extended sequential DCT (ITU-T T.81 Table B.1)


# --------------------------------------------------------------------------------------------
# Opening files (plain paths, preamble-less datasets, "archive.zip::member", deflate guard)
# --------------------------------------------------------------------------------------------

def split_zip_path(path: str | Path) -> tuple[str, str | None]:
    """``"/a/b.zip::x/y.dcm"`` -> ``("/a/b.zip", "x/y.dcm")``; plain paths -> ``(path, None)``."""
    s = str(path)
    if ZIP_SEP in s:
        archive, member = s.split(ZIP_SEP, 1)
        if archive and member:
            return archive, member
    return s, None


def read_zip_member(archive: str | Path, member: str, cap_bytes: int = DEFAULT_BUDGET_BYTES,
                    zf: zipfile.ZipFile | None = None) -> bytes:
    """Read one ZIP member, refusing bombs from the declared sizes and again while reading."""
    own = zf is None
    try:
        if own:
            zf = zipfile.ZipFile(archive)
        info = zf.getinfo(member)
        _check_zip_info(info, cap_bytes)
        with zf.open(info) as fh:
            data = fh.read(cap_bytes + 1)
        if len(data) > cap_bytes:
            raise LoadError(f"{archive}{ZIP_SEP}{member}",
                            f"ZIP member inflates beyond {cap_bytes >> 20} MiB; refused (possible ZIP bomb)")
        return data
    finally:
        if own and zf is not None:
            zf.close()


def _read_source(path: str | Path, cap_bytes: int = DEFAULT_BUDGET_BYTES) -> BinaryIO | str:
    """A path for plain files, or a BytesIO for ZIP members (read with the bomb guard)."""
    archive, member = split_zip_path(path)
    if member is None:
        return str(path)
    return io.BytesIO(read_zip_member(archive, member, cap_bytes))


_RAW_FIRST_GROUPS = frozenset({0x0002, 0x0004, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028})


def sniff(head: bytes) -> str:
    """'part10' ('DICM' at offset 128, PS3.10 7.1), 'raw' (a preamble-less dataset starting with a
    plausible group), 'empty', or 'no'. Cheap enough to skip non-DICOM files in a folder scan."""
    if not head:
        return "empty"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "part10"
    if len(head) >= 8:
        g_le = head[0] | (head[1] << 8)
        g_be = (head[0] << 8) | head[1]
        if g_le in _RAW_FIRST_GROUPS or g_be in _RAW_FIRST_GROUPS:
            return "raw"
    return "no"


def _sniff_source(src: BinaryIO | str, where: str) -> bytes:
    """The first 4 KiB, after refusing empty and non-DICOM input."""
    if isinstance(src, str):
        with open(src, "rb") as fh:
            head = fh.read(4096)
    else:
        head = src.read(4096)
        src.seek(0)
    kind = sniff(head)
    if kind == "empty":
        raise LoadError(where, "empty file (0 bytes); copy it again from the source")
    if kind == "no":
        raise LoadError(where, "not a DICOM file (no 'DICM' marker at byte 128 and no DICOM data "
                               "element at the start)")
    return head


def _dcmread(path: str | Path, *, stop_before_pixels: bool, cap: int = DEFAULT_BUDGET_BYTES):
    """pydicom.dcmread with force (preamble-less files), ZIP members and the deflate guard.

    Raises LoadError for non-DICOM input; pydicom's own exceptions pass through (callers map them).
    """
    import pydicom

    where = str(path)
    src = _read_source(path, cap)
    head = _sniff_source(src, where)
    _guard_deflate(src, where, cap, head)
    ds = pydicom.dcmread(src, force=True, stop_before_pixels=stop_before_pixels)
    if len(ds) == 0:
        raise LoadError(where, "no DICOM data elements could be read; the file is damaged or not DICOM")
    _ensure_transfer_syntax(ds)
    return ds


def _has_pixel_tag(path: str | Path, cap: int) -> bool:
    """Whether the bytes contain a Pixel Data tag (7FE0,0010) that pydicom could not read."""
    try:
        src = _read_source(path, cap)
        if isinstance(src, str):
            with open(src, "rb") as fh:
                data = fh.read(cap)
        else:
            data = src.read()
    except Exception:
        return False
    return b"\xe0\x7f\x10\x00" in data or b"\x7f\xe0\x00\x10" in data


def _ensure_transfer_syntax(ds) -> None:
    """Preamble-less raw datasets have no file meta: record the encoding pydicom detected."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if "TransferSyntaxUID" not in meta:
        implicit = getattr(ds, "original_encoding", (None, None))[0]
        little = getattr(ds, "original_encoding", (None, True))[1]
        if implicit is None:
            implicit = True
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian)


def looks_like_dicom(ds) -> bool:
    """force=True parses any bytes; a real dataset has a SOP class, an image or a study."""
    try:
        keys = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Rows", "Modality",
                "DirectoryRecordSequence")
        return any(k in ds for k in keys)
    except Exception:
        return False


def read_header(path: str | Path):
    """The dataset without pixel data (PS3.10 file, preamble-less dataset or ZIP member).

    Raises LoadError when the file is missing, unreadable, or not DICOM.
    """
    where = str(path)
    try:
        return _dcmread(path, stop_before_pixels=True)
    except LoadError:
        raise
    except zipfile.BadZipFile as exc:
        raise LoadError(where, f"damaged ZIP archive ({exc})") from None
    except KeyError as exc:
        raise LoadError(where, f"member not found in the ZIP archive ({exc})") from None
    except RecursionError:
        raise LoadError(where, "the header nests sequences too deeply to read (damaged or hostile "
                               "file)") from None
    except Exception as exc:  # pydicom raises many types on malformed input
        raise LoadError(where, _open_failure_reason(exc)
                        or f"unreadable DICOM header ({type(exc).__name__}: {_short(exc)})") from None


def _open_failure_reason(exc: BaseException) -> str | None:
    """Why the file could not be opened at all, or None when ``exc`` is not such an OS error.

    One wording for read_header and load_frame: the user moves the file back or fixes its
    permissions, whichever of the two failed.
    """
    if isinstance(exc, FileNotFoundError):
        return "file not found; was it moved or deleted?"
    if isinstance(exc, PermissionError):
        return "permission denied; check the file's read permissions"
    return None


def _short(exc: BaseException, n: int = 160) -> str:
    s = str(exc).replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


_memory_guard: Any = None


def set_memory_guard(fn: Any) -> None:
    """Install ``fn(need_bytes)``, called right before pixel data is decoded.

    A sandboxed decode process (engine.dicom.safe_decode) uses it to lower its address-space limit to
    what this file's header and codestream declare, so a decoder that allocates far beyond the
    declared size fails with MemoryError instead of taking the machine's memory.
    """
    global _memory_guard
    _memory_guard = fn


def guard_memory(need_bytes: int) -> None:
    if _memory_guard is not None:
        _memory_guard(int(need_bytes))


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------

def load_frame(path: str | Path, frame: int = 0, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> Frame:
    """Decode frame ``frame`` of a DICOM image and apply the Modality LUT (PS3.3 C.11.1).

    The size budget is checked from the header before any decoding. Raises LoadError only.
    """
    where = str(path)
    ds = None
    try:
        archive, member = split_zip_path(path)
        try:
            small = member is None and os.path.getsize(archive) <= budget_bytes // 4
        except OSError:
            small = False
        # a small file is read once (its raw bytes are bounded by its size; nothing is decoded
        # before the budget check); a large one has its header checked before the rest is read
        ds = _dcmread(path, stop_before_pixels=not small, cap=budget_bytes)
        check_budget(ds, where, budget_bytes)
        n_frames = max(_int(ds, "NumberOfFrames", 1), 1)
        if not 0 <= frame < n_frames:
            raise LoadError(where, f"frame {frame} requested but the image has {n_frames} frame(s)")
        if not small:
            ds = _dcmread(path, stop_before_pixels=False, cap=budget_bytes)
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            if _has_pixel_tag(path, budget_bytes):
                raise LoadError(where, "the file is truncated or damaged: its pixel data element "
                                       "cannot be read; copy it again from the source")
            raise LoadError(where, "no pixel data in this file")
        streams = inspect_codestreams(ds, where, budget_bytes, frames=[frame])
        guard_memory(decode_working_bytes(ds) + max([c.decoded_bytes for c in streams] or [0]))
        return frame_from_dataset(ds, frame, where)
    except LoadError:
        raise
    except MemoryError:
        raise LoadError(where, "decoding this image needs more memory than its header and "
                               "codestream declare or the memory budget allows; the file is "
                               "probably corrupt") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - Rust/C extensions raise BaseException subclasses
        raise LoadError(where, _open_failure_reason(exc) or _decode_reason(exc, _ts_of(ds))) from None


def _ts_of(ds) -> str:
    try:
        return str(ds.file_meta.TransferSyntaxUID)
    except Exception:
        return ""


def decoder_available(ts: str) -> bool | None:
    """Whether any installed pydicom plugin can decode transfer syntax ``ts`` (None: unknown UID)."""
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(ts).is_available)
    except Exception:
        return None


def _decode_reason(exc: BaseException, ts: str = "") -> str:
    """An honest reason: unsupported (no decoder installed) vs corrupt data (decoders refused it)."""
    msg = _short(exc)
    low = msg.lower()
    available = decoder_available(ts) if ts else None
    if available is False or "no pixel data decoders" in low:
        return (f"cannot decode {_ts_name(ts) or 'this transfer syntax'}: no decoder plugin for it is "
                f"installed; install pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-libjpeg and python-gdcm")
    if available is None and ts and "unable to decode" in low:
        return f"unsupported transfer syntax {ts}; convert the file to a standard one (PS3.5 10)"
    if isinstance(exc, RecursionError):
        return "the header nests sequences too deeply to read (damaged or hostile file)"
    if type(exc).__name__ == "PanicException":
        return "the pixel data is corrupt: the decoder stopped on invalid data"
    if "length" in low or "truncat" in low or "buffer" in low or "expected" in low or "eof" in low \
            or "end of" in low:
        return f"the pixel data is truncated or damaged ({type(exc).__name__}: {msg})"
    if "invalid literal" in low or "could not convert" in low:
        return f"a header value needed to decode the image is malformed ({msg})"
    if available and (ts in _JPEG_TS or ts in _J2K_TS or ts == _RLE_TS):
        return (f"the {_ts_name(ts)} pixel data is corrupt: the installed decoders could not "
                f"decode it ({type(exc).__name__}: {msg})")
    return f"could not decode the image ({type(exc).__name__}: {msg})"


def _pixel_array_repairing(ds, index: int | None, n_frames: int) -> np.ndarray:
    """pydicom's pixel_array, retried once with sequential-JPEG scan headers made conformant.

    See repair_sequential_scan: 12-bit JPEG extended files with Se=0 decode with every
    installed plugin once Ss/Se are corrected in memory (the file on disk is never changed).
    """
    from pydicom.pixels import pixel_array

    try:
        return pixel_array(ds, index=index)
    except Exception:
        if _ts_of(ds) not in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"):
            raise
        frames = _frame_fragments(ds, n_frames)
        fixed = [repair_sequential_scan(f) for f in frames]
        if not any(f is not None for f in fixed):
            raise
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([f if f is not None else o for f, o in zip(fixed, frames)])
        return pixel_array(ds, index=index)


def frame_from_dataset(ds, frame: int = 0, where: str = "") -> Frame:
    """Decode one frame of an already-read dataset (budget must have been checked by the caller)."""
    n_frames = max(_int(ds, "NumberOfFrames", 1), 1)
    photometric = str(_num(ds, "PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    spp = max(_int(ds, "SamplesPerPixel", 1), 1)
    arr = _pixel_array_repairing(ds, frame if n_frames > 1 else None, n_frames)
    if n_frames > 1 and arr.ndim == (4 if spp > 1 else 3):  # some plugins ignore index
        arr = arr[frame]
    modality = str(_num(ds, "Modality", "")).upper()
    bits_stored = _int(ds, "BitsStored", _int(ds, "BitsAllocated", 8)) or 8
    spacing, source = pixel_spacing_of(ds, frame)
    base = dict(photometric=photometric, pixel_spacing=spacing, spacing_source=source,
                bits_stored=bits_stored, modality=modality, n_frames=n_frames, frame_index=frame,
                path=where)

    if photometric == "PALETTE COLOR" or spp > 1:
        rgb = _to_rgb8(arr, ds, photometric, bits_stored)
        return Frame(values=rgb, stored=arr, is_color=True, monochrome1=False,
                     window=(127.5, 256.0), windows=[], voi_function="LINEAR",
                     window_source="header", **base)

    values, slope, intercept, rtype = modality_lut(arr, ds, frame)
    linear = not bool(_num(ds, "ModalityLUTSequence", None))
    windows, function = header_windows(ds, frame)
    voi_lut = voi_lut_of(ds, values)
    if windows:
        window, wsrc = (windows[0][1], windows[0][2]), "header"
    elif voi_lut is not None:
        first, lut = voi_lut
        window, wsrc = (first + len(lut) / 2.0, float(len(lut))), "voi_lut"
    else:
        window, wsrc = robust_window(values), "computed"
    shape = str(_num(ds, "PresentationLUTShape", "") or "").strip().upper()
    inverse = photometric == "MONOCHROME1" or (shape == "INVERSE")
    return Frame(values=values, stored=arr, is_color=False, monochrome1=inverse,
                 presentation_lut_shape=shape,
                 window=window, windows=windows, voi_function=function, rescale_slope=slope,
                 rescale_intercept=intercept, voi_lut=voi_lut, window_source=wsrc,
                 rescale_type=rtype, linear_modality=linear, **base)


def pixel_spacing_of(ds, frame: int = 0) -> tuple[tuple[float, float] | None, str]:
    """Row/column spacing in mm and where it came from (PS3.3 10.7.1.3 on calibration)."""
    item = _functional_item(ds, frame, "PixelMeasuresSequence")
    candidates = [(ds, "PixelSpacing", "PixelSpacing (patient plane)")]
    if item is not None:
        candidates.insert(0, (item, "PixelSpacing", "PixelSpacing (functional group)"))
    candidates += [(ds, "ImagerPixelSpacing", "ImagerPixelSpacing (at the detector, not corrected "
                                             "for magnification)"),
                   (ds, "NominalScannedPixelSpacing", "NominalScannedPixelSpacing (film digitiser)")]
    for src, kw, label in candidates:
        try:
            v = src.get(kw)
            if v is not None and len(v) >= 2 and float(v[0]) > 0 and float(v[1]) > 0:
                return (float(v[0]), float(v[1])), label
        except Exception:
            continue
    return None, ""


def repair_sequential_scan(frame: bytes) -> bytes | None:
    """Set Ss=0, Se=63 in the SOS of a sequential-DCT JPEG frame whose encoder wrote other values.

    ITU-T T.81 B.2.3: for sequential DCT "Ss shall be zero" and "Se shall be set to 63". Some
    encoders (e.g. the one that wrote NEMA WG-04's 12-bit JPEG extended samples and pydicom's
    JPEG-lossy.dcm) write Se=0; IJG-based decoders ignore the field, libjpeg refuses it, and
    pydicom's GDCM plugin refuses 12-bit JPEG extended outright. Returns None if nothing to fix.
    """
    try:
        cs_sof = jpeg_sof(frame)
    except ValueError:
        return None
    del cs_sof
    i = 2
    sequential = False
    buf = bytearray(frame)
    while i + 4 <= len(buf):
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        length = int.from_bytes(buf[i + 2:i + 4], "big")
        if marker in _SEQUENTIAL_SOF:
            sequential = True
        if marker == 0xDA:
            if not sequential:
                return None
            ns = buf[i + 4]
            ss_at = i + 5 + 2 * ns
            if ss_at + 1 >= len(buf) or (buf[ss_at] == 0 and buf[ss_at + 1] == 63):
                return None
            buf[ss_at], buf[ss_at + 1] = 0, 63
            return bytes(buf)
        i += 2 + length
    return None

