"""Decode one DICOM frame safely and turn it into display pixels (PS3.3 C.7.6.3, C.11).

Pipeline (the display and the AI models share it, DESIGN.md section 2/5):
stored values -> Modality LUT (C.11.1: Rescale Slope/Intercept or Modality LUT Sequence)
-> VOI LUT (C.11.2: Window Center/Width with a VOI LUT Function, or VOI LUT Sequence)
-> MONOCHROME1 inversion (C.7.6.3.1.2) -> display.

Every failure leaves this module as :class:`engine.errors.LoadError` with a reason a user can act
on. The declared pixel-data size is checked against a memory budget *before* anything is decoded,
and deflated or zipped input is measured while streaming so a bomb is refused without inflating it.
"""
from __future__ import annotations

import io
import math
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from engine.errors import LoadError

DEFAULT_BUDGET_BYTES = 512 * 1024 * 1024
"""Largest declared pixel-data size (all frames, as stored) that load_frame will decode."""

MAX_INFLATE_RATIO = 200
"""Deflate/ZIP data inflating more than this many times (and past 64 MiB) is treated as a bomb."""
_BOMB_FLOOR = 64 * 1024 * 1024

ZIP_SEP = "::"
DEFLATED_TS = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")  # Deflated Explicit VR LE (+Image)

_COLOR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420",
                       "YBR_PARTIAL_422", "PALETTE COLOR")


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


def _check_zip_info(info: zipfile.ZipInfo, cap_bytes: int) -> None:
    where = info.filename
    if info.file_size > cap_bytes:
        raise LoadError(where, f"ZIP member declares {info.file_size >> 20} MiB, over the "
                               f"{cap_bytes >> 20} MiB budget; extract it and open the file instead")
    if (info.file_size > _BOMB_FLOOR
            and info.file_size > MAX_INFLATE_RATIO * max(info.compress_size, 1)):
        raise LoadError(where, f"ZIP member compresses {info.file_size // max(info.compress_size, 1)}:1 "
                               f"({info.file_size >> 20} MiB); refused as a possible ZIP bomb")


def _read_source(path: str | Path, cap_bytes: int = DEFAULT_BUDGET_BYTES) -> BinaryIO | str:
    """A path for plain files, or a BytesIO for ZIP members (read with the bomb guard)."""
    archive, member = split_zip_path(path)
    if member is None:
        return str(path)
    return io.BytesIO(read_zip_member(archive, member, cap_bytes))


def _inflated_size(raw: bytes, cap: int) -> int:
    """Stream-inflate ``raw`` (raw deflate, PS3.5 A.5) counting output bytes, stopping past ``cap``."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    buf = raw
    while buf:
        out = d.decompress(buf, 1 << 22)
        total += len(out)
        if total > cap:
            return total
        buf = d.unconsumed_tail
        if not out and not buf:
            break
    return total


def _may_be_deflated(head: bytes) -> bool:
    return b"1.2.840.10008.1.2.1.99" in head or b"1.2.840.10008.1.2.8.1" in head


def _guard_deflate(src: BinaryIO | str, where: str, cap: int, head: bytes | None = None) -> None:
    """Refuse a deflated-transfer-syntax file that would inflate past ``cap`` or like a bomb.

    ``head`` (the file's first 4 KiB, when the caller has them) saves a read for the usual case.
    """
    if head is not None and not _may_be_deflated(head):
        return
    fh = open(src, "rb") if isinstance(src, str) else src
    try:
        start = fh.tell()
        if not _may_be_deflated(fh.read(4096)):
            return
        from pydicom.filereader import read_preamble, _read_file_meta_info

        fh.seek(start)
        read_preamble(fh, force=True)
        meta = _read_file_meta_info(fh)
        if str(meta.get("TransferSyntaxUID", "")) not in DEFLATED_TS:
            return
        raw = fh.read()
        limit = min(cap, max(_BOMB_FLOOR, MAX_INFLATE_RATIO * len(raw)))
        size = _inflated_size(raw, limit)
        if size > limit:
            raise LoadError(where, f"deflated dataset inflates beyond {limit >> 20} MiB from "
                                   f"{len(raw) >> 10} KiB; refused (possible deflate bomb)")
    except LoadError:
        raise
    except Exception:
        return  # not our business here: the real read below reports what is wrong
    finally:
        if isinstance(src, str):
            fh.close()
        else:
            fh.seek(0)


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
    except FileNotFoundError:
        raise LoadError(where, "file not found; was it moved or deleted?") from None
    except PermissionError:
        raise LoadError(where, "permission denied; check the file's read permissions") from None
    except zipfile.BadZipFile as exc:
        raise LoadError(where, f"damaged ZIP archive ({exc})") from None
    except KeyError as exc:
        raise LoadError(where, f"member not found in the ZIP archive ({exc})") from None
    except RecursionError:
        raise LoadError(where, "the header nests sequences too deeply to read (damaged or hostile "
                               "file)") from None
    except Exception as exc:  # pydicom raises many types on malformed input
        raise LoadError(where, f"unreadable DICOM header ({type(exc).__name__}: {_short(exc)})") from None


def _short(exc: BaseException, n: int = 160) -> str:
    s = str(exc).replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


# --------------------------------------------------------------------------------------------
# Header arithmetic
# --------------------------------------------------------------------------------------------

def _num(ds, keyword: str, default: Any = None):
    try:
        v = ds.get(keyword, None)
        if v is None or v == "":
            return default
        return v
    except Exception:
        return default


def _int(ds, keyword: str, default: int = 0) -> int:
    v = _num(ds, keyword, default)
    try:
        return int(v)
    except Exception:
        return default


def _seq_item(ds, *path: str):
    """First item down a chain of sequences, e.g. SharedFunctionalGroups -> PixelMeasures."""
    cur = ds
    for kw in path:
        try:
            seq = cur.get(kw)
        except Exception:
            return None
        if not seq:
            return None
        cur = seq[0]
    return cur


def _functional_item(ds, frame: int, macro: str):
    """Per-frame item of a functional-group macro (PS3.3 C.7.6.16), falling back to shared."""
    try:
        pf = ds.get("PerFrameFunctionalGroupsSequence")
        if pf and frame < len(pf):
            seq = pf[frame].get(macro)
            if seq:
                return seq[0]
    except Exception:
        pass
    return _seq_item(ds, "SharedFunctionalGroupsSequence", macro)


def declared_pixel_bytes(ds) -> int:
    """rows*cols*frames*samples*bytes-per-sample from the header (PS3.3 C.7.6.3), no decoding."""
    rows = _int(ds, "Rows")
    cols = _int(ds, "Columns")
    frames = max(_int(ds, "NumberOfFrames", 1), 1)
    spp = max(_int(ds, "SamplesPerPixel", 1), 1)
    bits = _int(ds, "BitsAllocated", 16) or 16
    nbytes = 1 if bits == 1 else math.ceil(bits / 8)
    if bits == 1:
        return math.ceil(rows * cols * frames * spp / 8)
    return rows * cols * frames * spp * nbytes


def check_budget(ds, where: str, budget_bytes: int) -> None:
    """Refuse (LoadError) before decoding when the declared size exceeds the budget."""
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if rows <= 0 or cols <= 0:
        raise LoadError(where, "no image in this file (Rows/Columns missing or zero); "
                               "it may be a report, structured document or presentation state")
    size = declared_pixel_bytes(ds)
    frames = max(_int(ds, "NumberOfFrames", 1), 1)
    spp = max(_int(ds, "SamplesPerPixel", 1), 1)
    working = decode_working_bytes(ds)
    if working > budget_bytes:
        raise LoadError(where, f"image declares {rows}x{cols}x{frames} frame(s)x{spp} sample(s) = "
                               f"{size / 2**20:.0f} MiB of pixel data; decoding and display need about "
                               f"{working / 2**20:.0f} MiB with the float32 working copies, over the "
                               f"{budget_bytes >> 20} MiB memory budget; refused before decoding")


def decode_working_bytes(ds) -> int:
    """Memory one load_frame needs: the stored pixel data plus two float32 copies of a frame."""
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    spp = max(_int(ds, "SamplesPerPixel", 1), 1)
    return declared_pixel_bytes(ds) + rows * cols * spp * 4 * 2


_memory_guard: Any = None


def set_memory_guard(fn: Any) -> None:
    """Install ``fn(need_bytes)``, called right before pixel data is decoded.

    A sandboxed decode process (engine.safe_decode) uses it to lower its address-space limit to
    what this file's header and codestream declare, so a decoder that allocates far beyond the
    declared size fails with MemoryError instead of taking the machine's memory.
    """
    global _memory_guard
    _memory_guard = fn


def guard_memory(need_bytes: int) -> None:
    if _memory_guard is not None:
        _memory_guard(int(need_bytes))


# --------------------------------------------------------------------------------------------
# Codestream inspection (before any decoder sees the bytes)
# --------------------------------------------------------------------------------------------

_JPEG_TS = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
            "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")
_J2K_TS = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
           "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
           "1.2.840.10008.1.2.4.203")
_RLE_TS = "1.2.840.10008.1.2.5"
_SEQUENTIAL_SOF = (0xC0, 0xC1)   # baseline and extended sequential DCT (ITU-T T.81 Table B.1)


@dataclass
class Codestream:
    """What one compressed frame says about itself: (rows, cols, components, bits)."""

    kind: str
    rows: int
    cols: int
    components: int
    bits: int

    @property
    def decoded_bytes(self) -> int:
        return self.rows * self.cols * self.components * max(1, math.ceil(self.bits / 8))


def jpeg_sof(frame: bytes) -> Codestream:
    """Frame size from the first SOFn marker segment (ITU-T T.81 B.2.2); ValueError if absent.

    JPEG-LS SOF55 (T.87 C.2.2) has the same layout. The walk only follows marker segment lengths
    up to the first SOS, so it is linear in the header size whatever the bytes are.
    """
    if not frame.startswith(b"\xff\xd8"):
        raise ValueError("no JPEG SOI marker at the start of the frame")
    i, n = 2, len(frame)
    while i + 4 <= n:
        if frame[i] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {i}")
        marker = frame[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        length = int.from_bytes(frame[i + 2:i + 4], "big")
        if length < 2:
            raise ValueError(f"JPEG marker segment of length {length} at byte {i}")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7):
            seg = frame[i + 4:i + 2 + length]
            if len(seg) < 6:
                raise ValueError("truncated JPEG SOF segment")
            return Codestream("jpeg", int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big"),
                              seg[5], seg[0])
        if marker == 0xDA:
            break
        i += 2 + length
    raise ValueError("no JPEG SOF marker before the image data")


def _j2k_offset(frame: bytes) -> int:
    """Offset of the J2K codestream (SOC) in a raw codestream or a JP2 file (ISO/IEC 15444-1 I.4).

    Boxes are walked with their declared lengths; a length of 0 ('to the end') before the
    contiguous codestream box, or one shorter than a box header, makes the walk impossible —
    pydicom's own walk loops forever on the former — so both are refused here.
    """
    if frame.startswith(b"\xff\x4f"):
        return 0
    if not frame.startswith(b"\x00\x00\x00\x0cjP  "):
        raise ValueError("neither a JPEG 2000 codestream (SOC) nor a JP2 signature box")
    off, n = 12, len(frame)
    while off + 8 <= n:
        length = int.from_bytes(frame[off:off + 4], "big")
        box = frame[off + 4:off + 8]
        if box == b"jp2c":
            return off + 8
        if length == 1 and off + 16 <= n:
            length = int.from_bytes(frame[off + 8:off + 16], "big")
        if length < 8:
            raise ValueError(f"JP2 box {box!r} at byte {off} declares length {length}")
        off += length
    raise ValueError("no JPEG 2000 codestream box (jp2c) in the JP2 data")


def j2k_siz(frame: bytes) -> Codestream:
    """Image size from the SIZ marker segment (ISO/IEC 15444-1 A.5.1); ValueError if malformed."""
    off = _j2k_offset(frame)
    seg = frame[off:off + 2 + 2 + 38 + 3]
    if len(seg) < 44 or seg[0:4] != b"\xff\x4f\xff\x51":
        raise ValueError("JPEG 2000 codestream without SOC followed by SIZ")
    lsiz = int.from_bytes(seg[4:6], "big")
    xsiz, ysiz, xo, yo = (int.from_bytes(seg[8 + 4 * k:12 + 4 * k], "big") for k in range(4))
    csiz = int.from_bytes(seg[40:42], "big")
    if lsiz != 38 + 3 * csiz or csiz == 0 or xsiz <= xo or ysiz <= yo:
        raise ValueError(f"inconsistent JPEG 2000 SIZ (Lsiz {lsiz}, Csiz {csiz}, "
                         f"{xsiz}x{ysiz} from {xo},{yo})")
    ssiz = seg[42]
    return Codestream("j2k", ysiz - yo, xsiz - xo, csiz, (ssiz & 0x7F) + 1)


def rle_header(frame: bytes, rows: int, cols: int) -> Codestream:
    """Check the 64-byte RLE header (PS3.5 G.5): 1-15 segments with increasing offsets inside the frame.

    RLE declares no size of its own: every segment decodes to exactly rows*cols bytes, so the
    decoded size follows from the header's Rows/Columns and the segment count.
    """
    if len(frame) < 64:
        raise ValueError(f"RLE frame of {len(frame)} bytes is shorter than its 64-byte header")
    nseg = int.from_bytes(frame[0:4], "little")
    offs = [int.from_bytes(frame[4 + 4 * k:8 + 4 * k], "little") for k in range(nseg if 0 < nseg <= 15 else 0)]
    if not 1 <= nseg <= 15:
        raise ValueError(f"RLE header declares {nseg} segments (1 to 15 allowed)")
    if offs[0] != 64 or any(b <= a for a, b in zip(offs, offs[1:])) or offs[-1] >= len(frame):
        shown = ", ".join(str(o) for o in offs[:4]) + (", ..." if len(offs) > 4 else "")
        raise ValueError(f"RLE segment offsets ({shown}) do not fit a {len(frame)}-byte frame")
    return Codestream("rle", rows, cols, nseg, 8)


def _frame_fragments(ds, n_frames: int) -> list[bytes]:
    """The encapsulated frames (PS3.5 A.4) as bytes, one per frame, without decoding anything."""
    from pydicom.encaps import generate_frames

    return list(generate_frames(ds.PixelData, number_of_frames=n_frames))


def inspect_codestreams(ds, where: str, budget_bytes: int, frames: list[int] | None = None) -> list[Codestream]:
    """Read compressed frames' own declared sizes and refuse what the header cannot explain.

    Why: the header budget (check_budget) cannot see inside the codestream; a 974-byte file whose
    JPEG SOF declares 65500x65500 inside a 64x64 header made the decoder allocate 9.7 GB
    (DESIGN.md 5). A frame whose codestream disagrees with Rows/Columns is corrupt either way
    (PS3.5 8.2: the encapsulated image must match the Image Pixel Module), so it is refused
    before a decoder runs. ``frames`` (0-based) limits the check to the frames about to be
    decoded: one damaged frame must not hide the good ones of a multi-frame image. When the
    fragments cannot be split into frames, every fragment that starts a codestream is checked
    instead and the decoder (bounded by the sandbox) gets its chance. Native syntaxes return [].
    """
    ts = str(getattr(getattr(ds, "file_meta", None), "get", lambda *_: "")("TransferSyntaxUID", "") or "")
    if ts not in _JPEG_TS and ts not in _J2K_TS and ts != _RLE_TS:
        return []
    try:
        elem = ds["PixelData"]
    except KeyError:
        return []
    if getattr(elem, "is_undefined_length", True) is False:
        raise LoadError(where, "compressed transfer syntax but the pixel data is not encapsulated "
                               "(PS3.5 A.4); the file is corrupt or mislabelled")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    n_frames = max(_int(ds, "NumberOfFrames", 1), 1)
    try:
        split = _frame_fragments(ds, n_frames)
        numbered = [(k, fr) for k, fr in enumerate(split) if frames is None or k in frames]
        strict = True
    except Exception:
        numbered, strict = _starting_fragments(ds.PixelData, ts), False
    out = []
    for k, fr in numbered:
        label = f"frame {k + 1} of {n_frames}" if strict else f"fragment {k + 1}"
        try:
            cs = (jpeg_sof(fr) if ts in _JPEG_TS else j2k_siz(fr) if ts in _J2K_TS
                  else rle_header(fr, rows, cols))
        except ValueError as exc:
            if not strict:
                continue
            raise LoadError(where, f"{label}: corrupt {_ts_name(ts)} data ({exc}); the frame "
                                   f"cannot be decoded") from None
        if (cs.rows, cs.cols) != (rows, cols):
            raise LoadError(where, f"{label}: the {_ts_name(ts)} codestream declares "
                                   f"{cs.rows}x{cs.cols} but the header says {rows}x{cols}; the file "
                                   f"is corrupt (refused before decoding)")
        if cs.decoded_bytes > budget_bytes:
            raise LoadError(where, f"{label}: the {_ts_name(ts)} codestream declares "
                                   f"{cs.rows}x{cs.cols}x{cs.components} ({cs.decoded_bytes / 2**20:.0f} MiB "
                                   f"decoded), over the {budget_bytes >> 20} MiB memory budget; "
                                   f"refused before decoding")
        out.append(cs)
    return out


def _starting_fragments(pixel_data: bytes, ts: str) -> list[tuple[int, bytes]]:
    """Fragments that begin a JPEG or J2K codestream (RLE fragments have no signature)."""
    from pydicom.encaps import generate_fragments

    out = []
    try:
        for k, frag in enumerate(generate_fragments(pixel_data)):
            if frag.startswith(b"\xff\xd8") or frag.startswith(b"\xff\x4f") or frag.startswith(b"\x00\x00\x00\x0cjP  "):
                out.append((k, frag))
    except Exception:
        pass
    return out


def _ts_name(ts: str) -> str:
    try:
        from pydicom.uid import UID

        return UID(ts).name
    except Exception:
        return ts


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


# --------------------------------------------------------------------------------------------
# Frame
# --------------------------------------------------------------------------------------------

@dataclass
class Frame:
    """One decoded frame and everything needed to display it as the header intends."""

    values: np.ndarray                # float32 (rows, cols) after Modality LUT, or uint8 (rows, cols, 3)
    stored: np.ndarray                # raw stored values (pixel readout)
    is_color: bool
    photometric: str
    monochrome1: bool                 # low values display bright: MONOCHROME1 (C.7.6.3.1.2) or
                                      # Presentation LUT Shape INVERSE (C.11.6); see photometric
    window: tuple[float, float]       # default (center, width) in Modality-LUT output units
    windows: list[tuple[str, float, float]] = field(default_factory=list)
    voi_function: str = "LINEAR"
    pixel_spacing: tuple[float, float] | None = None
    spacing_source: str = ""
    bits_stored: int = 16
    modality: str = ""
    n_frames: int = 1
    frame_index: int = 0
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    path: str = ""
    voi_lut: tuple[float, np.ndarray] | None = None   # (first mapped value, LUT scaled to [0,1])
    window_source: str = "header"     # 'header' | 'voi_lut' | 'computed'
    rescale_type: str = ""
    linear_modality: bool = True      # False when a Modality LUT Sequence (not slope/intercept) applied
    presentation_lut_shape: str = ""  # IDENTITY | INVERSE | "" (PS3.3 C.11.6)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.values.shape[0]), int(self.values.shape[1])


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
    except FileNotFoundError:
        raise LoadError(where, "file not found; was it moved or deleted?") from None
    except PermissionError:
        raise LoadError(where, "permission denied; check the file's read permissions") from None
    except MemoryError:
        raise LoadError(where, "decoding this image needs more memory than its header and "
                               "codestream declare or the memory budget allows; the file is "
                               "probably corrupt") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - Rust/C extensions raise BaseException subclasses
        raise LoadError(where, _decode_reason(exc, _ts_of(ds))) from None


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


def modality_lut(arr: np.ndarray, ds, frame: int = 0) -> tuple[np.ndarray, float, float, str]:
    """Stored values -> float32 Modality LUT output (PS3.3 C.11.1): HU for CT."""
    try:
        mlut = ds.get("ModalityLUTSequence")
    except Exception:
        mlut = None
    if mlut:
        from pydicom.pixels import apply_modality_lut

        out = apply_modality_lut(arr, ds).astype(np.float32, copy=False)
        return out, 1.0, 0.0, str(mlut[0].get("ModalityLUTType", ""))
    item = _functional_item(ds, frame, "PixelValueTransformationSequence")
    src = item if item is not None and "RescaleSlope" in item else ds
    try:
        slope = float(src.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(src.get("RescaleIntercept", 0.0) or 0.0)
    except Exception:
        slope, intercept = 1.0, 0.0
    rtype = str(src.get("RescaleType", "") or "")
    out = arr.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out, slope, intercept, rtype


def header_windows(ds, frame: int = 0) -> tuple[list[tuple[str, float, float]], str]:
    """Window Center/Width pairs with their explanations and the VOI LUT Function (C.11.2.1.2)."""
    item = _functional_item(ds, frame, "FrameVOILUTSequence")
    src = item if item is not None and "WindowCenter" in item else ds
    try:
        wc, ww = src.get("WindowCenter"), src.get("WindowWidth")
    except Exception:
        return [], "LINEAR"
    if wc is None or ww is None or wc == "" or ww == "":
        return [], "LINEAR"
    wcs = list(wc) if _is_multi(wc) else [wc]
    wws = list(ww) if _is_multi(ww) else [ww]
    try:
        expl = src.get("WindowCenterWidthExplanation", "")
    except Exception:
        expl = ""
    names = list(expl) if _is_multi(expl) else [expl]
    out = []
    for i, (c, w) in enumerate(zip(wcs, wws)):
        try:
            c, w = float(c), float(w)
        except Exception:
            continue
        if not (math.isfinite(c) and math.isfinite(w)) or w <= 0:
            continue
        name = str(names[i]) if i < len(names) and names[i] else f"Window {i + 1}"
        out.append((name, c, w))
    function = str(src.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    return out, function


def _is_multi(v) -> bool:
    return isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue"


def voi_lut_of(ds, values: np.ndarray) -> tuple[float, np.ndarray] | None:
    """First VOI LUT Sequence item as (first mapped value, LUT scaled to [0,1]) (PS3.3 C.11.2.1.1)."""
    try:
        seq = ds.get("VOILUTSequence")
        if not seq:
            return None
        item = seq[0]
        desc = [int(x) for x in item.LUTDescriptor]
        n = desc[0] or 65536
        first = desc[1]
        if ds.get("PixelRepresentation", 0) == 1 and first >= 2**15:
            first -= 2**16
        raw = item.LUTData
        if isinstance(raw, (bytes, bytearray)):
            dtype = np.uint8 if desc[2] <= 8 and len(raw) == n else np.uint16
            lut = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        else:
            lut = np.asarray(list(raw) if _is_multi(raw) else [raw], dtype=np.float64)
        lut = lut[:n].astype(np.float32)
        top = float(2 ** desc[2] - 1) if desc[2] > 0 else float(lut.max() or 1)
        top = max(top, float(lut.max()))  # some files misdeclare the LUT bit depth
        return float(first), (lut / np.float32(top if top > 0 else 1.0)).astype(np.float32)
    except Exception:
        return None


def robust_window(values: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> tuple[float, float]:
    """Default window from the 0.5–99.5 percentiles when the header has none."""
    v = values
    if v.size > 262144:
        step = int(math.ceil(math.sqrt(v.size / 262144)))
        v = v[::step, ::step]
    v = v[np.isfinite(v)] if v.dtype.kind == "f" else v.ravel()
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [lo_pct, hi_pct])
    lo, hi = float(lo), float(hi)
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
        if hi <= lo:
            hi = lo + 1.0
    return (lo + hi) / 2.0, hi - lo


def _to_rgb8(arr: np.ndarray, ds, photometric: str, bits_stored: int) -> np.ndarray:
    """PALETTE COLOR / RGB / YBR_* -> uint8 RGB (PS3.3 C.7.6.3.1.2, C.7.9)."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(arr, ds)
        top = float(rgb.max()) if rgb.size else 255.0
        shift = 8 if top > 255 else 0
        return (rgb >> shift).astype(np.uint8) if rgb.dtype.kind in "ui" else \
            np.clip(rgb, 0, 255).astype(np.uint8)
    if photometric in ("YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420"):
        # pixel_array already converts YBR_FULL(_422) to RGB; partial/other ones we convert here
        if photometric.startswith("YBR_PARTIAL"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr[..., :3])
    if arr.dtype.kind in "ui" and bits_stored > 8:
        return (np.clip(arr, 0, None).astype(np.uint32) >> (bits_stored - 8)).clip(0, 255).astype(np.uint8)[..., :3]
    a = arr.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    return ((a - lo) / (hi - lo or 1.0) * 255.0).astype(np.uint8)[..., :3]


# --------------------------------------------------------------------------------------------
# VOI LUT and display
# --------------------------------------------------------------------------------------------

def _voi_linear_coeffs(center: float, width: float, function: str) -> tuple[float, float]:
    """y = clip(a*x + b, 0, 1) for LINEAR (C.11.2.1.2.1) and LINEAR_EXACT (C.11.2.1.3.2)."""
    if function == "LINEAR_EXACT":
        w = max(float(width), 1e-6)
        return 1.0 / w, 0.5 - center / w
    w = max(float(width), 1.0)
    if w <= 1.0:  # degenerate LINEAR window: a step at c - 0.5
        return 1e6, -(center - 0.5) * 1e6
    # LINEAR: ((x - (c - 0.5)) / (w - 1) + 0.5), 0 below c-0.5-(w-1)/2, 1 above c-0.5+(w-1)/2
    return 1.0 / (w - 1.0), 0.5 - (center - 0.5) / (w - 1.0)


def apply_voi(values: np.ndarray, center: float, width: float, function: str = "LINEAR",
              out: np.ndarray | None = None) -> np.ndarray:
    """Window ``values`` to float32 [0, 1] (PS3.3 C.11.2.1.2), vectorised in float32.

    LINEAR: 0 if x <= c-0.5-(w-1)/2, 1 if x > c-0.5+(w-1)/2, else (x-(c-0.5))/(w-1)+0.5.
    LINEAR_EXACT: 0 if x <= c-w/2, 1 if x > c+w/2, else (x-c)/w+0.5.
    SIGMOID: 1/(1+exp(-4(x-c)/w)).
    """
    function = (function or "LINEAR").upper()
    x = np.asarray(values)
    if function == "SIGMOID":
        w = max(float(width), 1e-6)
        y = np.empty(x.shape, dtype=np.float32) if out is None else out
        np.copyto(y, x, casting="unsafe")
        y -= np.float32(center)
        y *= np.float32(-4.0 / w)
        np.exp(y, out=y)
        y += np.float32(1.0)
        np.reciprocal(y, out=y)
        return y
    a, b = _voi_linear_coeffs(center, width, function)
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    np.multiply(x, np.float32(a), out=out, casting="unsafe")
    out += np.float32(b)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def apply_voi_lut_table(values: np.ndarray, first: float, lut: np.ndarray) -> np.ndarray:
    """VOI LUT Sequence lookup (C.11.2.1.1): values below/above the LUT take its ends."""
    idx = np.clip(np.rint(values - first), 0, len(lut) - 1).astype(np.intp)
    return lut[idx]


def window_to_uint8(values: np.ndarray, center: float, width: float, function: str = "LINEAR",
                    invert: bool = False) -> np.ndarray:
    """apply_voi scaled to 0..255 (and optionally inverted) fused into one float32 buffer.

    Measured (bench_pixels.py): faster than an 8-bit lookup table gathered by stored value,
    because numpy's take() on a 512x512 index costs more than these few vectorised passes.
    """
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        y = apply_voi(values, center, width, function)
        if invert:
            np.subtract(1.0, y, out=y)
        y *= 255.0
        return np.rint(y, out=y).astype(np.uint8)
    a, b = _voi_linear_coeffs(center, width, function)
    if invert:
        a, b = -a, 1.0 - b
    out = np.multiply(values, np.float32(a * 255.0), dtype=np.float32)
    out += np.float32(b * 255.0)
    np.clip(out, 0.0, 255.0, out=out)
    np.rint(out, out=out)
    return out.astype(np.uint8)


def render_display(frame: Frame, center: float | None = None, width: float | None = None,
                   invert: bool | None = None) -> np.ndarray:
    """uint8 display image: (rows, cols) grey, or (rows, cols, 3) for colour.

    Default VOI from the header (window, else VOI LUT Sequence, else computed percentiles);
    MONOCHROME1 is shown inverted (PS3.3 C.7.6.3.1.2) unless ``invert`` is given: True/False is
    absolute (whether to show low values bright), not relative to the photometric default.
    """
    if frame.is_color:
        return frame.values if invert is not True else 255 - frame.values
    inv = frame.monochrome1 if invert is None else bool(invert)
    if center is None and width is None and frame.window_source == "voi_lut" and frame.voi_lut:
        y = apply_voi_lut_table(frame.values, *frame.voi_lut)
        if inv:
            y = 1.0 - y
        return np.rint(y * 255.0).astype(np.uint8)
    c = frame.window[0] if center is None else float(center)
    w = frame.window[1] if width is None else float(width)
    return window_to_uint8(frame.values, c, w, frame.voi_function, inv)


def display_gray01(frame: Frame) -> np.ndarray:
    """float32 [0,1]: default VOI, MONOCHROME1 inverted — what the radiologist sees and the X-ray model gets."""
    if frame.is_color:
        rgb = frame.values.astype(np.float32)
        return (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114) / np.float32(255.0)
    if frame.window_source == "voi_lut" and frame.voi_lut is not None:
        y = apply_voi_lut_table(frame.values, *frame.voi_lut).astype(np.float32)
    else:
        y = apply_voi(frame.values, frame.window[0], frame.window[1], frame.voi_function)
    if frame.monochrome1:
        y = np.subtract(np.float32(1.0), y, dtype=np.float32)
    return y
