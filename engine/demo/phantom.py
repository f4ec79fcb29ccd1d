"""Deterministic synthetic chest CT phantom, written as a real multi-file CT series.

Anatomy is analytic (ellipses, spheres, tubes) so every slice can be generated alone, in a few
milliseconds, with low memory; the same label function gives the ground truth (lung volume, lesion
volumes) that tests of the lung ROI and the CT pipeline check against.

Patient coordinate system (PS3.3 C.7.6.2.1.1, LPS): +x patient left, +y posterior, +z superior.
Image rows run anterior->posterior, columns patient right->left; slice 0 is the most inferior.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np

# Tissue values in HU (Hounsfield units)
AIR, LUNG, FAT, SOFT, BLOOD, BONE, GGO, CONSOLIDATION = -1000, -850, -100, 40, 40, 700, -500, 20
SEED = 20260101
UID_ROOT_TEXT = "chestview-demo-phantom-v1"

# Label codes of the analytic anatomy
L_AIR, L_FAT, L_SOFT, L_LUNG, L_AIRWAY, L_VESSEL, L_GGO, L_CONS, L_BONE, L_HEART = range(10)
_HU_OF_LABEL = np.array([AIR, FAT, SOFT, LUNG, AIR, BLOOD, GGO, CONSOLIDATION, BONE, BLOOD],
                        dtype=np.float32)


@dataclass(frozen=True)
class PhantomGeometry:
    """Acquisition geometry of the phantom series."""

    n_slices: int = 120
    size: int = 512
    pixel_mm: float = 0.7
    slice_mm: float = 2.5
    z0_mm: float = 0.0  # z of slice 0 (most inferior)

    def z_of(self, k: int) -> float:
        return self.z0_mm + k * self.slice_mm

    def origin(self, k: int) -> tuple[float, float, float]:
        """ImagePositionPatient: centre of the first transmitted pixel (PS3.3 C.7.6.2.1.1)."""
        half = (self.size - 1) / 2.0 * self.pixel_mm
        return (-half, -half, self.z_of(k))


@dataclass(frozen=True)
class PhantomTruth:
    """Ground truth of the phantom in mL (1 mL = 1000 mm^3), counted on the voxel grid."""

    lung_ml: float            # both lungs, including intrapulmonary vessels, airways and lesions
    right_lung_ml: float
    left_lung_ml: float
    lung_air_ml: float        # lung voxels whose noise-free HU is below -320 (what a threshold keeps)
    ggo_ml: float
    consolidation_ml: float
    airway_ml: float          # trachea and main bronchi outside the lungs
    n_slices: int
    voxel_mm: tuple[float, float, float]  # (z, y, x)
    lesion_slices: tuple[int, ...]        # slice indices that contain GGO or consolidation


# ----------------------------------------------------------------------------------------
# Anatomy (all lengths in mm)
# ----------------------------------------------------------------------------------------

_LUNG_BASE, _LUNG_APEX = 40.0, 280.0
_LUNG_RX, _LUNG_RY, _LUNG_CX, _LUNG_CY = 58.0, 82.0, 80.0, 5.0

# (x, y, z) tubes: (start, end, radius, label)
def _tubes() -> list[tuple[tuple[float, float, float], tuple[float, float, float], float, int]]:
    t = [((0.0, -20.0, 300.0), (0.0, -20.0, 200.0), 8.0, L_AIRWAY)]  # trachea down to the carina
    for s in (-1.0, 1.0):
        t.append(((0.0, -20.0, 200.0), (s * 36.0, -8.0, 178.0), 5.5, L_AIRWAY))  # main bronchus
        hil_b, hil_v = (s * 36.0, -8.0, 178.0), (s * 46.0, 6.0, 176.0)
        for end, r in (((s * 80.0, -40.0, 255.0), 2.5), ((s * 112.0, 0.0, 240.0), 2.5),
                       ((s * 72.0, 45.0, 95.0), 3.0), ((s * 112.0, 22.0, 85.0), 2.5),
                       ((s * 92.0, -45.0, 110.0), 2.5)):
            t.append((hil_b, end, r, L_AIRWAY))
            t.append((hil_v, (end[0] + s * 6.0, end[1] + 9.0, end[2]), r + 1.5, L_VESSEL))
    return t


_LESIONS = (  # (centre, radius, label): GGO right lower lobe, consolidation left lower lobe
    ((-98.0, 22.0, 112.0), 24.0, L_GGO),
    ((98.0, 40.0, 92.0), 17.0, L_CONS),
)


@lru_cache(maxsize=4)
def _grid(size: int, pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * np.float32(pixel_mm)
    return c[None, :], c[:, None]  # x (columns), y (rows): broadcast, not materialised


def _ellipse(x, y, cx, cy, rx, ry) -> np.ndarray:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def _lung_masks(x, y, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Right (-x) and left (+x) lung masks at height z: half-ellipsoids on domed bases."""
    out = []
    for s in (-1.0, 1.0):
        if not (_LUNG_BASE - 1e-6 <= z <= _LUNG_APEX):
            out.append(np.zeros((y.shape[0], x.shape[1]), dtype=bool))
            continue
        t = (z - _LUNG_BASE) / (_LUNG_APEX - _LUNG_BASE)
        scale = math.sqrt(max(1.0 - t * t, 0.0)) * (0.55 + 0.45 * min(1.0, t * 6 + 0.4))
        rx, ry = _LUNG_RX * scale, _LUNG_RY * scale
        if rx < 1.0:
            out.append(np.zeros((y.shape[0], x.shape[1]), dtype=bool))
            continue
        r2 = ((x - s * _LUNG_CX) / rx) ** 2 + ((y - _LUNG_CY) / ry) ** 2
        dome = _LUNG_BASE + 28.0 * (1.0 - np.minimum(r2, 1.0))  # diaphragm higher at the centre
        m = (r2 <= 1.0) & (z >= dome)
        if s > 0 and 60.0 <= z <= 175.0:  # cardiac notch of the left lung
            m &= ~_ellipse(x, y, 22.0, -32.0, 62.0, 52.0)
        out.append(m)
    return out[0], out[1]


def label_slice(k: int, geom: PhantomGeometry = PhantomGeometry()) -> np.ndarray:
    """uint8 tissue labels of slice k (noise free)."""
    return _label_and_lungs(k, geom)[0]


def _label_and_lungs(k: int, geom: PhantomGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels plus the right and left lung masks of slice k."""
    x, y = _grid(geom.size, geom.pixel_mm)
    z = geom.z_of(k)
    shape = (geom.size, geom.size)
    lab = np.full(shape, L_AIR, dtype=np.uint8)
    body = _ellipse(x, y, 0.0, 8.0, 165.0, 118.0)
    lab[body] = L_FAT
    lab[_ellipse(x, y, 0.0, 8.0, 152.0, 106.0)] = L_SOFT
    # ribs: oblique bands on a ring inside the chest wall; sternum in front
    if 55.0 <= z <= 292.0:
        ring = _ellipse(x, y, 0.0, 8.0, 147.0, 101.0) & ~_ellipse(x, y, 0.0, 8.0, 139.0, 94.0)
        theta = np.arctan2(y - 8.0, x)
        phase = np.mod(z - 30.0 * np.cos(theta), 24.0)
        lab[ring & (phase < 8.0) & (y < 85.0)] = L_BONE
    if 150.0 <= z <= 262.0:
        lab[(np.abs(x) <= 14.0) & (y >= -98.0) & (y <= -88.0)] = L_BONE
    # heart and descending aorta
    if 55.0 <= z <= 185.0:
        f = math.sqrt(max(1.0 - ((z - 120.0) / 65.0) ** 2, 0.0))
        if f > 0.05:
            lab[_ellipse(x, y, 22.0, -32.0, 62.0 * f, 52.0 * f)] = L_HEART
    if z <= 235.0:
        lab[_ellipse(x, y, 18.0, 52.0, 12.0, 12.0)] = L_HEART
    # spine: vertebral body (discs every 30 mm), canal, posterior arch
    disc = (z % 30.0) < 5.0
    lab[_ellipse(x, y, 0.0, 72.0, 19.0, 16.0)] = L_SOFT if disc else L_BONE
    lab[_ellipse(x, y, 0.0, 100.0, 13.0, 7.0)] = L_BONE
    lab[_ellipse(x, y, 0.0, 94.0, 6.5, 6.5)] = L_SOFT
    # lungs, then airways, vessels and lesions (inside the lungs only for lesions)
    right, left = _lung_masks(x, y, z)
    lungs = right | left
    lab[lungs] = L_LUNG
    for (p0, p1, r, code) in _tubes():
        zlo, zhi = min(p0[2], p1[2]), max(p0[2], p1[2])
        if not (zlo <= z <= zhi) or zhi == zlo:
            continue
        f = (z - p0[2]) / (p1[2] - p0[2])
        cx, cy = p0[0] + f * (p1[0] - p0[0]), p0[1] + f * (p1[1] - p0[1])
        # in-plane stretch of an oblique tube cut by the axial plane
        dz = abs(p1[2] - p0[2])
        lx, ly = abs(p1[0] - p0[0]) / dz, abs(p1[1] - p0[1]) / dz
        m = _ellipse(x, y, cx, cy, r * math.sqrt(1 + lx * lx), r * math.sqrt(1 + ly * ly))
        if code == L_AIRWAY and p0[0] == 0.0 and p1[0] == 0.0:
            lab[m] = L_AIRWAY              # trachea
        elif code == L_AIRWAY:
            lab[m & (lungs | (lab == L_SOFT) | (lab == L_AIRWAY))] = L_AIRWAY
        else:
            lab[m & lungs] = L_VESSEL
    for (c, r, code) in _LESIONS:
        dz = z - c[2]
        if abs(dz) < r:
            rr = math.sqrt(r * r - dz * dz)
            m = _ellipse(x, y, c[0], c[1], rr, rr) & lungs & (lab != L_VESSEL)
            lab[m] = code
    return lab, right, left


def _lung_mask_with_sides(k: int, geom: PhantomGeometry) -> tuple[np.ndarray, np.ndarray]:
    x, y = _grid(geom.size, geom.pixel_mm)
    return _lung_masks(x, y, geom.z_of(k))


def hu_slice(k: int, geom: PhantomGeometry = PhantomGeometry(), seed: int = SEED) -> np.ndarray:
    """int16 HU of slice k: tissue values + deterministic texture and noise (sigma about 12 HU)."""
    lab = label_slice(k, geom)
    hu = _HU_OF_LABEL[lab]
    rng = np.random.default_rng([seed, k])
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    hu += np.where(lab == L_AIR, np.float32(4.0), np.float32(12.0)) * noise
    ggo = lab == L_GGO
    if ggo.any():  # patchy ground glass: +-60 HU blotches
        hu[ggo] += np.float32(60.0) * rng.standard_normal(int(ggo.sum()), dtype=np.float32)
    np.clip(hu, -1024, 3071, out=hu)
    return np.rint(hu).astype(np.int16)


def iter_phantom(geom: PhantomGeometry = PhantomGeometry(), seed: int = SEED) -> Iterator[tuple[int, np.ndarray]]:
    """(k, HU int16 slice) from the most inferior slice up; one slice in memory at a time."""
    for k in range(geom.n_slices):
        yield k, hu_slice(k, geom, seed)


def phantom_volume(geom: PhantomGeometry = PhantomGeometry(), seed: int = SEED) -> np.ndarray:
    """The whole phantom as int16 HU (z, y, x); about 63 MB at the default size."""
    vol = np.empty((geom.n_slices, geom.size, geom.size), dtype=np.int16)
    for k, s in iter_phantom(geom, seed):
        vol[k] = s
    return vol


@lru_cache(maxsize=4)
def phantom_truth(geom: PhantomGeometry = PhantomGeometry()) -> PhantomTruth:
    """Ground-truth volumes counted on the same voxel grid the series is written on."""
    vox_ml = geom.pixel_mm * geom.pixel_mm * geom.slice_mm / 1000.0
    n = dict(right=0, left=0, air=0, ggo=0, cons=0, airway=0)
    lesion_slices = []
    for k in range(geom.n_slices):
        lab, right, left = _label_and_lungs(k, geom)
        n["right"] += int(right.sum())
        n["left"] += int(left.sum())
        lungs = right | left
        n["air"] += int((lungs & ((lab == L_LUNG) | (lab == L_AIRWAY) | (lab == L_GGO))).sum())
        g, c = int((lab == L_GGO).sum()), int((lab == L_CONS).sum())
        n["ggo"] += g
        n["cons"] += c
        n["airway"] += int(((lab == L_AIRWAY) & ~lungs).sum())
        if g or c:
            lesion_slices.append(k)
    return PhantomTruth(
        lung_ml=(n["right"] + n["left"]) * vox_ml, right_lung_ml=n["right"] * vox_ml,
        left_lung_ml=n["left"] * vox_ml, lung_air_ml=n["air"] * vox_ml, ggo_ml=n["ggo"] * vox_ml,
        consolidation_ml=n["cons"] * vox_ml, airway_ml=n["airway"] * vox_ml,
        n_slices=geom.n_slices, voxel_mm=(geom.slice_mm, geom.pixel_mm, geom.pixel_mm),
        lesion_slices=tuple(lesion_slices))


def zone_truth(geom: PhantomGeometry = PhantomGeometry()) -> dict[tuple[str, str], dict[str, float]]:
    """Lung, GGO and consolidation mL per (side, zone), zones = thirds of each lung's extent over
    the slices that contain it (as engine.ai.ct_quant defines them); sides "right"/"left"."""
    vox_ml = geom.pixel_mm * geom.pixel_mm * geom.slice_mm / 1000.0
    per = {s: [] for s in ("right", "left")}
    for k in range(geom.n_slices):
        lab, right, left = _label_and_lungs(k, geom)
        for name, m in (("right", right), ("left", left)):
            if m.any():
                per[name].append((geom.z_of(k), int(m.sum()), int((m & (lab == L_GGO)).sum()),
                                  int((m & (lab == L_CONS)).sum())))
    out: dict[tuple[str, str], dict[str, float]] = {}
    for side, rows in per.items():
        lo, hi = rows[0][0], rows[-1][0]
        for zone in ("upper", "middle", "lower"):
            out[(side, zone)] = {"lung_ml": 0.0, "ggo_ml": 0.0, "consolidation_ml": 0.0}
        for z, n, g, c in rows:
            h = (z - lo) / max(hi - lo, 1e-6)
            zone = "upper" if h > 2.0 / 3.0 else ("middle" if h > 1.0 / 3.0 else "lower")
            d = out[(side, zone)]
            d["lung_ml"] += n * vox_ml
            d["ggo_ml"] += g * vox_ml
            d["consolidation_ml"] += c * vox_ml
    return out


# ----------------------------------------------------------------------------------------
# DICOM series writer
# ----------------------------------------------------------------------------------------

def _uid(*parts: str) -> str:
    """Deterministic UID under 2.25 (PS3.5 B.2) from a fixed text and the parts."""
    import hashlib
    import uuid

    digest = hashlib.sha256("\x1f".join([UID_ROOT_TEXT, *parts]).encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"


def write_phantom_series(out_dir: str | Path, geom: PhantomGeometry = PhantomGeometry(),
                         seed: int = SEED, patient_name: str = "DEMO^CHEST CT",
                         patient_id: str = "DEMO-CT-001") -> list[Path]:
    """Write the phantom as CT Image Storage files CT_0001.dcm... (PS3.3 A.3); returns the paths.

    Same inputs -> byte-identical files (fixed UIDs, dates and noise seed).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = f"{seed}-{geom}"
    study_uid, series_uid, for_uid = _uid(key, "study"), _uid(key, "series"), _uid(key, "for")
    base = Dataset()
    base.SpecificCharacterSet = "ISO_IR 100"
    base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    base.SOPClassUID = CTImageStorage
    base.StudyDate = base.SeriesDate = base.ContentDate = "20260101"
    base.StudyTime = base.SeriesTime = base.ContentTime = "120000"
    base.AccessionNumber = ""
    base.Modality = "CT"
    base.Manufacturer = "ChestView synthetic phantom"
    base.ReferringPhysicianName = ""
    base.StudyDescription = "Synthetic chest CT phantom (demo, not a patient)"
    base.SeriesDescription = f"Chest phantom {geom.slice_mm:g} mm"
    base.PatientName = patient_name
    base.PatientID = patient_id
    base.PatientBirthDate = ""
    base.PatientSex = "O"
    base.PatientIdentityRemoved = "YES"
    base.DeidentificationMethod = "Synthetic phantom: no patient data"  # Type 1C with the above (PS3.3 C.7.1.1)
    base.BodyPartExamined = "CHEST"
    base.SliceThickness = f"{geom.slice_mm:g}"
    base.SpacingBetweenSlices = f"{geom.slice_mm:g}"
    base.KVP = "120"
    base.PatientPosition = "HFS"
    base.ConvolutionKernel = "SYNTHETIC"
    base.StudyInstanceUID = study_uid
    base.SeriesInstanceUID = series_uid
    base.StudyID = "1"
    base.SeriesNumber = 1
    base.FrameOfReferenceUID = for_uid
    base.PositionReferenceIndicator = ""
    base.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows = base.Columns = geom.size
    base.PixelSpacing = [f"{geom.pixel_mm:g}", f"{geom.pixel_mm:g}"]
    base.BitsAllocated = 16
    base.BitsStored = 16
    base.HighBit = 15
    base.PixelRepresentation = 1
    base.WindowCenter = [-600, 40]
    base.WindowWidth = [1500, 400]
    base.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
    base.RescaleIntercept = "-1024"
    base.RescaleSlope = "1"
    base.RescaleType = "HU"
    base.BurnedInAnnotation = "NO"
    base.ImageComments = "Synthetic phantom generated by ChestView; research use only"
    paths = []
    for k, hu in iter_phantom(geom, seed):
        ds = Dataset()
        ds.update(base)
        sop_uid = _uid(key, "sop", str(k))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "CHESTVIEW_PH1"
        ds.file_meta = meta
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        pos = geom.origin(k)
        ds.ImagePositionPatient = [f"{v:.4f}".rstrip("0").rstrip(".") for v in pos]
        ds.SliceLocation = f"{pos[2]:.4f}".rstrip("0").rstrip(".")
        ds.PixelData = (hu.astype(np.int32) + 1024).astype("<i2").tobytes()
        p = out / f"CT_{k + 1:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
