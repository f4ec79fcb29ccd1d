"""engine.dicom.pixels: every decoder path on the package test files, LUT maths, photometrics."""
from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file, get_testdata_files

from engine.dicom.budget import DEFAULT_BUDGET_BYTES
from engine.dicom.display import Frame, apply_voi, display_gray01, render_display
from engine.dicom.pixels import load_frame, read_header
from engine.errors import LoadError


def tf(name: str) -> str:
    p = get_testdata_file(name)
    if p is None:
        pytest.skip(f"test file {name} not installed")
    return str(p)


def stored(name: str, frame: int = 0) -> np.ndarray:
    return np.asarray(load_frame(tf(name), frame).stored)


# ---- decoded values equal their uncompressed twin (lossless) ------------------------------

LOSSLESS_TWINS = [
    ("RG1_UNCR.dcm", "RG1_J2KR.dcm"),                 # JPEG 2000 lossless, 15-bit CR
    ("MR2_UNCR.dcm", "MR2_J2KR.dcm"),
    ("693_UNCR.dcm", "693_J2KR.dcm"),
    ("US1_UNCR.dcm", "US1_J2KR.dcm"),                 # colour, YBR_RCT -> RGB
    ("MR_small.dcm", "MR_small_RLE.dcm"),             # RLE Lossless
    ("MR_small.dcm", "MR_small_bigendian.dcm"),       # explicit VR big endian
    ("MR_small.dcm", "MR_small_implicit.dcm"),        # implicit VR little endian
    ("MR_small.dcm", "MR_small_expb.dcm"),
    ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),  # JPEG-LS lossless
    ("emri_small.dcm", "emri_small_RLE.dcm"),
    ("emri_small.dcm", "emri_small_big_endian.dcm"),
    ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"),
    ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm"),
    ("SC_rgb.dcm", "SC_rgb_rle.dcm"),
    ("SC_rgb.dcm", "SC_rgb_expb.dcm"),
    ("SC_rgb_16bit.dcm", "SC_rgb_rle_16bit.dcm"),
    ("OBXXXX1A.dcm", "OBXXXX1A_rle.dcm"),             # PALETTE COLOR
    ("OBXXXX1A.dcm", "OBXXXX1A_expb.dcm"),
    ("rtdose.dcm", "rtdose_rle.dcm"),
]


@pytest.mark.parametrize("ref,other", LOSSLESS_TWINS)
def test_lossless_twin_decodes_identically(ref: str, other: str) -> None:
    a, b = load_frame(tf(ref)), load_frame(tf(other))
    assert a.values.shape == b.values.shape
    np.testing.assert_array_equal(a.values, b.values)
    assert a.is_color == b.is_color


@pytest.mark.parametrize("ref,other,tol", [
    ("RG1_UNCR.dcm", "RG1_J2KI.dcm", 0.01),   # lossy JPEG 2000: mean abs error < 1% of range
    ("MR2_UNCR.dcm", "MR2_J2KI.dcm", 0.02),
    ("SC_rgb.dcm", "SC_rgb_jpeg_dcmtk.dcm", 0.05),   # baseline JPEG, YBR_FULL_422
])
def test_lossy_twin_close(ref: str, other: str, tol: float) -> None:
    a, b = load_frame(tf(ref)), load_frame(tf(other))
    va, vb = a.values.astype(np.float64), b.values.astype(np.float64)
    rng = float(va.max() - va.min()) or 1.0
    assert np.abs(va - vb).mean() / rng < tol


def test_multiframe_frame_index() -> None:
    p = tf("emri_small.dcm")
    f0, f5 = load_frame(p, 0), load_frame(p, 5)
    assert f0.n_frames == 10 and f5.frame_index == 5
    assert f0.values.shape == f5.values.shape == (64, 64)
    assert not np.array_equal(f0.values, f5.values)
    with pytest.raises(LoadError, match="frame 10"):
        load_frame(p, 10)


def test_every_package_image_decodes_or_gives_load_error() -> None:
    """All of pydicom's and pydicom-data's files: either a Frame or a LoadError, nothing else."""
    files = [f for f in get_testdata_files() if os.path.isfile(f)]
    extra = get_testdata_file("RG1_UNCR.dcm")
    if extra:
        files += glob.glob(os.path.join(os.path.dirname(extra), "*.dcm"))
    decoded, refused, by_ts = 0, 0, set()
    # JPEG-lossy.dcm (12-bit JPEG extended, Se=0 in its SOS) decodes (pylibjpeg handles Se=0)
    known_bad = {"JPEG2000-embedded-sequence-delimiter.dcm", "MR_truncated.dcm",
                 "badVR.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in sorted(set(files)):
            name = os.path.basename(f)
            try:
                fr = load_frame(f)
            except LoadError as exc:
                refused += 1
                assert exc.reason
                continue
            assert name not in known_bad or name == "badVR.dcm", name
            decoded += 1
            by_ts.add(str(read_header(f).file_meta.TransferSyntaxUID))
            img = render_display(fr)
            assert img.dtype == np.uint8 and img.shape[:2] == fr.values.shape[:2]
    # every transfer syntax family of the test files was decoded at least once
    for ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
               "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50",
               "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.70",
               "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90",
               "1.2.840.10008.1.2.4.91"):
        assert ts in by_ts, f"transfer syntax {ts} never decoded"
    assert decoded > 100 and refused > 10


# ---- LUT maths ----------------------------------------------------------------------------

def test_voi_linear_hand_computed() -> None:
    # PS3.3 C.11.2.1.2.1, c=40 w=400: 0 at x <= -160, 1 at x > 239, (x - 39.5)/399 + 0.5 between
    x = np.array([-1000, -160, -159, 0, 39.5, 239, 240], dtype=np.float32)
    y = apply_voi(x, 40, 400, "LINEAR")
    expect = [0, 0, (-159 - 39.5) / 399 + 0.5, (0 - 39.5) / 399 + 0.5, 0.5, (239 - 39.5) / 399 + 0.5, 1]
    np.testing.assert_allclose(y, expect, atol=1e-6)
    assert y.dtype == np.float32


def test_voi_linear_exact_and_sigmoid_hand_computed() -> None:
    x = np.array([-160, -60, 40, 140, 240, 500], dtype=np.float32)
    np.testing.assert_allclose(apply_voi(x, 40, 400, "LINEAR_EXACT"), [0, 0.25, 0.5, 0.75, 1, 1], atol=1e-6)
    s = apply_voi(np.array([40, 140, -60], dtype=np.float32), 40, 400, "SIGMOID")
    np.testing.assert_allclose(s, [0.5, 1 / (1 + np.exp(-1)), 1 / (1 + np.exp(1))], atol=1e-6)


def test_voi_matches_pydicom_windowing() -> None:
    from pydicom.pixels import apply_windowing

    ds = read_header(tf("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth, ds.BitsStored = 40, 400, 16
    x = np.arange(-1200, 1200, 7, dtype=np.float64)
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ref = apply_windowing(x.copy(), ds)  # maps to the stored-value range
    lo, hi = float(ref.min()), float(ref.max())
    np.testing.assert_allclose(apply_voi(x, 40, 400), (ref - lo) / (hi - lo), atol=2e-4)


def test_modality_lut_rescale_ct() -> None:
    f = load_frame(tf("CT_small.dcm"))
    ds = read_header(tf("CT_small.dcm"))
    slope, inter = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    np.testing.assert_allclose(f.values, f.stored.astype(np.float64) * slope + inter)
    assert f.values.dtype == np.float32 and (f.rescale_slope, f.rescale_intercept) == (slope, inter)


def test_modality_lut_sequence() -> None:
    from pydicom import dcmread
    from pydicom.pixels import apply_modality_lut

    p = tf("mlut_18.dcm")
    f = load_frame(p)
    ds = dcmread(p)
    np.testing.assert_allclose(f.values, apply_modality_lut(ds.pixel_array, ds))
    assert not f.linear_modality
    # the display is computed from the LUT output, not from stored values
    a = render_display(f)
    y = apply_voi(f.values, *f.window, f.voi_function)
    assert _maxdiff(a, np.rint((1 - y if f.monochrome1 else y) * 255)) <= 1


def test_voi_lut_sequence() -> None:
    from pydicom import dcmread
    from pydicom.pixels import apply_voi_lut

    p = tf("vlut_04.dcm")
    f = load_frame(p)
    ds = dcmread(p)
    if "WindowCenter" in ds:
        pytest.skip("file has a window too")
    assert f.window_source == "voi_lut" and f.voi_lut is not None
    ref = apply_voi_lut(ds.pixel_array, ds).astype(np.float64)
    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    got = display_gray01(f)
    np.testing.assert_allclose(got, ref / max(2 ** bits - 1, ref.max()), atol=1e-6)


def test_multiple_windows_and_explanations(shared_data: Path) -> None:
    f = load_frame(shared_data / "dicom" / "other_fodicom_mg_voilut.dcm")
    assert len(f.windows) >= 2
    assert f.window == (f.windows[0][1], f.windows[0][2])
    assert all(isinstance(n, str) and n for n, _, _ in f.windows)


def test_monochrome1_inverted_for_display() -> None:
    f = load_frame(tf("RG1_UNCR.dcm"))
    assert f.monochrome1 and f.photometric == "MONOCHROME1"
    assert f.window == (15000.0, 30000.0)
    g = display_gray01(f)
    raw = apply_voi(f.values, 15000.0, 30000.0)
    np.testing.assert_allclose(g, 1.0 - raw, atol=1e-6)
    disp = render_display(f)
    assert _maxdiff(disp, np.rint(g * 255)) <= 1
    # invert=False shows the stored sense
    assert _maxdiff(render_display(f, invert=False), np.rint(raw * 255)) <= 1
    assert (render_display(f).astype(int) + render_display(f, invert=False) - 255).std() < 0.5
    # a chest radiograph displayed correctly: lungs (centre) darker than the mediastinum/bone edges
    assert g.dtype == np.float32 and 0.0 <= g.min() and g.max() <= 1.0


def _maxdiff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


def test_fused_display_matches_apply_voi() -> None:
    f = load_frame(tf("CT_small.dcm"))
    for c, w, fn in [(40, 400, "LINEAR"), (-600, 1500, "LINEAR_EXACT"), (*f.window, "SIGMOID")]:
        f.voi_function = fn
        fast = render_display(f, c, w)
        y = apply_voi(f.values, c, w, fn)
        assert fast.dtype == np.uint8 and _maxdiff(fast, np.rint(y * 255)) <= 1  # float32 rounding
        assert _maxdiff(render_display(f, c, w, invert=True), np.rint((1 - y) * 255)) <= 1


def test_default_window_computed_from_percentiles() -> None:
    f = load_frame(tf("CT_small.dcm"))  # no window in the header
    assert f.window_source == "computed"
    lo, hi = np.percentile(f.values, [0.5, 99.5])
    assert f.window == pytest.approx(((lo + hi) / 2, hi - lo), rel=1e-4)


@pytest.mark.parametrize("name", ["SC_rgb.dcm", "US1_J2KR.dcm", "OBXXXX1A.dcm",
                                  "SC_ybr_full_uncompressed.dcm", "SC_rgb_16bit.dcm"])
def test_colour_to_rgb8(name: str) -> None:
    f = load_frame(tf(name))
    assert f.is_color and f.values.dtype == np.uint8 and f.values.shape[2] == 3
    assert render_display(f).shape == f.values.shape
    assert display_gray01(f).ndim == 2


def test_ybr_full_equals_rgb_twin() -> None:
    a, b = load_frame(tf("SC_rgb.dcm")), load_frame(tf("SC_ybr_full_uncompressed.dcm"))
    assert np.abs(a.values.astype(int) - b.values.astype(int)).max() <= 8  # YBR rounding


def test_palette_colour_known_pixel() -> None:
    from pydicom import dcmread
    from pydicom.pixels import apply_color_lut

    p = tf("OBXXXX1A.dcm")
    ds = dcmread(p)
    ref = apply_color_lut(ds.pixel_array, ds)
    f = load_frame(p)
    scale = 256 if ref.max() > 255 else 1
    np.testing.assert_array_equal(f.values, (ref // scale).astype(np.uint8))


def test_pixel_spacing_sources(shared_data: Path) -> None:
    f = load_frame(shared_data / "dicom" / "ct_lungpetctdx_1" / sorted(
        os.listdir(shared_data / "dicom" / "ct_lungpetctdx_1"))[0])
    assert f.pixel_spacing == pytest.approx((0.841796875, 0.841796875), abs=1e-4)
    assert f.spacing_source.startswith("PixelSpacing")
    cr = load_frame(shared_data / "dicom" / "xray_barre_crmono1chest.dcm")  # no preamble/meta
    assert cr.monochrome1 and cr.values.shape == (440, 440)


@pytest.mark.parametrize("name", ["CT1_RLE.dcm", "CT1_J2KR.dcm", "CT1_JPLL.dcm", "CT1_JLSL.dcm"])
def test_shared_ct_lossless_variants_equal_explicit_le(shared_data: Path, name: str) -> None:
    d = shared_data / "dicom" / "ct_wg04_ct1_transfer_syntaxes"
    ref = load_frame(d / "CT1_UNC_explicitLE.dcm")
    got = load_frame(d / name)
    np.testing.assert_array_equal(ref.values, got.values)
    assert ref.modality == "CT"


@pytest.mark.parametrize("name", ["CT1_J2KI.dcm", "CT1_JLSN.dcm"])
def test_shared_ct_lossy_variants_close(shared_data: Path, name: str) -> None:
    d = shared_data / "dicom" / "ct_wg04_ct1_transfer_syntaxes"
    ref = load_frame(d / "CT1_UNC_explicitLE.dcm").values.astype(np.float64)
    got = load_frame(d / name).values.astype(np.float64)
    assert np.abs(ref - got).mean() < 40.0  # HU; the WG-04 lossy set is strongly compressed


def test_frame_fields_and_budget_constant() -> None:
    f = load_frame(tf("CT_small.dcm"))
    assert isinstance(f, Frame)
    assert f.modality == "CT" and f.bits_stored == 16 and f.n_frames == 1 and f.frame_index == 0
    assert f.pixel_spacing is not None and f.voi_function == "LINEAR"
    assert DEFAULT_BUDGET_BYTES >= 256 * 2**20


def test_budget_refuses_before_decoding() -> None:
    with pytest.raises(LoadError, match="budget"):
        load_frame(tf("RG1_UNCR.dcm"), budget_bytes=1 << 20)


def test_presentation_lut_inverse_displays_inverted(tmp_path: Path) -> None:
    """MONOCHROME2 with Presentation LUT Shape INVERSE (PS3.3 C.11.6) is shown like MONOCHROME1."""
    from pydicom import dcmread

    ds = dcmread(tf("MR_small.dcm"))
    plain = load_frame(tf("MR_small.dcm"))
    ds.PresentationLUTShape = "INVERSE"
    p = tmp_path / "inverse.dcm"
    ds.save_as(p)
    f = load_frame(p)
    assert f.photometric == "MONOCHROME2" and f.monochrome1 and f.presentation_lut_shape == "INVERSE"
    np.testing.assert_allclose(display_gray01(f), 1.0 - display_gray01(plain), atol=1e-6)
    assert not plain.monochrome1
