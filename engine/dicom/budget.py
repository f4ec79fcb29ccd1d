"""Size checks made before anything is inflated or decoded (PS3.5 A.4, A.5; PS3.3 C.7.6.3).

Why: a decoder allocates what the bytes declare. A ZIP member or deflated dataset can inflate
thousands of times, the header's Rows/Columns/Frames can declare gigabytes, and a compressed
frame's own codestream (JPEG SOF, JPEG 2000 SIZ, RLE header) can declare far more than the header
(DESIGN.md 5). Each is read from the declared sizes alone and refused with a
:class:`engine.errors.LoadError` when it exceeds the memory budget or disagrees with the header.
"""
from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from engine.dicom.attributes import _int
from engine.errors import LoadError

DEFAULT_BUDGET_BYTES = 512 * 1024 * 1024
"""Largest declared pixel-data size (all frames, as stored) that load_frame will decode."""

MAX_INFLATE_RATIO = 200
"""Deflate/ZIP data inflating more than this many times (and past 64 MiB) is treated as a bomb."""
_BOMB_FLOOR = 64 * 1024 * 1024

DEFLATED_TS = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")  # Deflated Explicit VR LE (+Image)


# --------------------------------------------------------------------------------------------
# ZIP members and deflated datasets (measured while streaming, never inflated whole)
# --------------------------------------------------------------------------------------------

def _check_zip_info(info: zipfile.ZipInfo, cap_bytes: int) -> None:
    where = info.filename
    if info.file_size > cap_bytes:
        raise LoadError(where, f"ZIP member declares {info.file_size >> 20} MiB, over the "
                               f"{cap_bytes >> 20} MiB budget; extract it and open the file instead")
    if (info.file_size > _BOMB_FLOOR
            and info.file_size > MAX_INFLATE_RATIO * max(info.compress_size, 1)):
        raise LoadError(where, f"ZIP member compresses {info.file_size // max(info.compress_size, 1)}:1 "
                               f"({info.file_size >> 20} MiB); refused as a possible ZIP bomb")


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


# --------------------------------------------------------------------------------------------
# Header budget
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Codestream inspection (before any decoder sees the bytes)
# --------------------------------------------------------------------------------------------

_JPEG_TS = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
            "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")
_J2K_TS = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
           "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
           "1.2.840.10008.1.2.4.203")
_RLE_TS = "1.2.840.10008.1.2.5"


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

