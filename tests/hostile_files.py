"""Hostile and malformed DICOM files, generated (no binary blobs): the regression corpus of the decode boundary (engine.dicom.safe_decode).

Each builder writes one file and returns its path; :data:`BUILDERS` maps a name to
``(builder, expected reason fragment)``. bench/make_hostile_corpus.py uses the same builders
plus seeded mutations of real files for its >= 2,000-file corpus.
"""
from __future__ import annotations

import io
import random
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def _uid(tag: str) -> str:
    import hashlib

    return "1.2.826.0.1.3680043.10.1234." + str(int(hashlib.sha256(tag.encode()).hexdigest()[:12], 16))


def image_dataset(name: str, ts: str, rows: int = 64, cols: int = 64, modality: str = "CR",
                  frames: int = 1, bits: int = 16):
    """A minimal valid image header (PS3.3 C.7.6.3) whose pixel data the caller sets."""
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    sop_class = CT_STORAGE if modality == "CT" else CR_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = _uid(name + "sop")
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, _uid(name + "sop")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(name + "study"), _uid(name + "series")
    ds.PatientName, ds.PatientID = "Hostile^Hannah", "HOSTILE-" + name[:20]
    ds.Modality, ds.BodyPartExamined = modality, "CHEST"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, min(bits, 12), min(bits, 12) - 1
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if frames > 1:
        ds.NumberOfFrames = frames
    if modality == "CT":
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    return ds


def _save_encapsulated(ds, frames: list[bytes], path: Path) -> Path:
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def j2k_frame(rows: int = 64, cols: int = 64, seed: int = 0) -> bytes:
    """A real JPEG 2000 lossless codestream of a small 12-bit image (openjpeg's encoder)."""
    from openjpeg import encode

    a = np.random.default_rng(seed).integers(0, 4000, (rows, cols)).astype(np.uint16)
    return bytes(encode(a, bits_stored=12, photometric_interpretation=2, use_mct=False))


def jpeg_sof_bomb(path: Path) -> Path:
    """974-byte class: a JPEG stream whose SOF declares 65500x65500 inside a 64x64 header."""
    sof = b"\xff\xc0\x00\x0b\x08" + (65500).to_bytes(2, "big") * 2 + b"\x01\x01\x11\x00"
    dqt = b"\xff\xdb\x00\x43\x00" + bytes(range(1, 65))
    frame = b"\xff\xd8" + dqt + sof + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x00" * 600 + b"\xff\xd9"
    ds = image_dataset("jpegbomb", JPEG_BASELINE, bits=8)
    return _save_encapsulated(ds, [frame], path)


def j2k_siz_bomb(path: Path) -> Path:
    """A J2K codestream whose SIZ declares 60000x60000 inside a 64x64 header."""
    real = bytearray(j2k_frame())
    real[8:12] = (60000).to_bytes(4, "big")      # Xsiz
    real[12:16] = (60000).to_bytes(4, "big")     # Ysiz
    return _save_encapsulated(image_dataset("j2kbomb", J2K_LOSSLESS), [bytes(real)], path)


def rle_bomb(path: Path) -> Path:
    """An RLE header declaring 15 segments whose offsets point far past the frame."""
    hdr = (15).to_bytes(4, "little") + b"".join((64 + k * 2**28).to_bytes(4, "little") for k in range(15))
    hdr += b"\x00" * (64 - len(hdr))
    return _save_encapsulated(image_dataset("rlebomb", RLE, bits=8), [hdr + b"\x00" * 100], path)


RLE_PANIC_FRAME = bytes.fromhex(
    "02000000400000006100000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000" "6bdd0a7309cb4a1252e4da70e6720fcaa4da1e98"
    "406c189c24279e9851d5814204136feb5713c166b13269dd63fc35c797ff08a6cd90095066a745addb"
    "6d8831c2b0f87821")


def rle_panic(path: Path) -> Path:
    """A 4x4 16-bit RLE frame on which pylibjpeg-rle panics (pyo3 PanicException, a BaseException)."""
    return _save_encapsulated(image_dataset("rlepanic", RLE, rows=4, cols=4), [RLE_PANIC_FRAME], path)


def j2k_zero_box(seed: int = 0) -> bytes:
    """A JP2 file whose second box has length 0: pydicom's box walk never advances."""
    return (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00\x00\x00\x14ftypjp2 \x00\x00\x00\x00jp2 "
            + b"\x00\x00\x00\x00jp2h" + b"\x00" * 64 + j2k_frame(seed=seed))


def j2k_loop(path: Path) -> Path:
    return _save_encapsulated(image_dataset("j2kloop", J2K_LOSSLESS), [j2k_zero_box()], path)


def multiframe_later_hostile(path: Path) -> Path:
    """A 2-frame JPEG 2000 CT: frame 1 is genuine, frame 2 is the looping JP2."""
    ds = image_dataset("mf2", J2K_LOSSLESS, modality="CT", frames=2)
    from pydicom.dataset import Dataset

    items = []
    for z in range(2):
        it, pp, po = Dataset(), Dataset(), Dataset()
        pp.ImagePositionPatient = [0, 0, float(z)]
        po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        it.PlanePositionSequence, it.PlaneOrientationSequence = [pp], [po]
        items.append(it)
    ds.PerFrameFunctionalGroupsSequence = items
    return _save_encapsulated(ds, [j2k_frame(), j2k_zero_box(1)], path)


def deep_nesting(path: Path, depth: int = 20000) -> Path:
    """A header whose sequence items nest ``depth`` deep (undefined lengths): recursion bombs."""
    ds = image_dataset("deep", EXPLICIT_LE)
    ds.PixelData = np.zeros((64, 64), np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    seq_open = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    # (0008,1115) Referenced Series Sequence, explicit VR, undefined length, then an item
    seq_close = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    blob = seq_open * depth + seq_close * depth
    data = path.read_bytes()
    at = data.index(b"\x08\x00\x16\x00")          # insert before SOP Class UID (0008,0016)
    path.write_bytes(data[:at] + blob + data[at:])
    return path


def bad_element(path: Path) -> Path:
    """A header with one element pydicom cannot convert ((0008,0014) as US with 3 bytes) among
    readable ones."""
    ds = image_dataset("badelem", EXPLICIT_LE)
    ds.PixelData = np.zeros((64, 64), np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    at = data.index(b"\x08\x00\x16\x00")
    path.write_bytes(data[:at] + b"\x08\x00\x14\x00US\x03\x00\x01\x02\x03" + data[at:])
    return path


def deflate_bomb(path: Path, inflated_mib: int = 300) -> Path:
    """Deflated Explicit VR LE (PS3.5 A.5) whose body inflates to ``inflated_mib`` MiB."""
    ds = image_dataset("deflate", DEFLATED)
    ds.Rows = ds.Columns = 0
    buf = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = DEFLATED
    from pydicom.filewriter import write_file_meta_info

    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, ds.file_meta, enforce_standard=True)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    # an OB element of the full size, then its zeros: a parser must inflate it to see the end
    head = b"\x09\x00\x10\x10OB\x00\x00" + (inflated_mib * 2**20).to_bytes(4, "little")
    out = [c.compress(head)]
    chunk = b"\x00" * 2**20
    for _ in range(inflated_mib):
        out.append(c.compress(chunk))
    out.append(c.flush())
    path.write_bytes(buf.getvalue() + b"".join(out))
    return path


def zip_bomb(path: Path, inflated_mib: int = 100) -> Path:
    """A ZIP whose one member inflates 1000:1 past 64 MiB."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("IMG0001.dcm", "w", force_zip64=True) as fh:
            fh.write(b"\x00" * 128 + b"DICM")
            chunk = b"\x00" * 2**20
            for _ in range(inflated_mib):
                fh.write(chunk)
    return path


def truncated(src: Path, path: Path, keep: float) -> Path:
    data = src.read_bytes()
    path.write_bytes(data[:max(140, int(len(data) * keep))])
    return path


def bit_flips(src: Path, path: Path, n: int, seed: int) -> Path:
    data = bytearray(src.read_bytes())
    rng = random.Random(seed)
    for _ in range(n):
        i = rng.randrange(132, len(data))
        data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return path


def genuine_cr(path: Path, seed: int = 3) -> Path:
    """A small genuine J2K CR that must still decode after the hostile ones."""
    return _save_encapsulated(image_dataset(f"genuine{seed}", J2K_LOSSLESS, rows=100, cols=100),
                              [j2k_frame(100, 100, seed)], path)


BUILDERS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "jpeg_sof_bomb.dcm": (jpeg_sof_bomb, "65500x65500"),
    "j2k_siz_bomb.dcm": (j2k_siz_bomb, "60000x60000"),
    "rle_bomb.dcm": (rle_bomb, "RLE"),
    "rle_panic.dcm": (rle_panic, "decoder stopped on invalid data"),
    "j2k_zero_box.dcm": (j2k_loop, "length 0"),
    "multiframe_hostile.dcm": (multiframe_later_hostile, "frame 2"),
    "deep_nesting.dcm": (deep_nesting, ""),
    "deflate_bomb.dcm": (deflate_bomb, "deflate"),
}
