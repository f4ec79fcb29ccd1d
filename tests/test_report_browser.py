"""The HTML batch report in a real browser: headless Chromium loads it from disk, a small script
(added to a copy of the page, the report itself is untouched) records each image's decoded natural
size and how many heatmap-coloured pixels it holds, then ``--dump-dom`` returns the DOM and
``--screenshot`` a picture. Chromium is the Debian package, installed with apt-get when missing
(the test skips only when that fails).

The report is built the way the batch engine builds it (engine.review.batch): real images indexed and
decoded (pydicom's chest CR and CT slices), thumbnails with Grad-CAM-style heatmaps written by
engine.review.report.write_thumbnail, rows, report.html.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.review import report as rp
from engine.dicom.index import index_path
from engine.results import Finding, Heatmap, ModelInfo, Severity, StudyResult, Validity
from engine.dicom.safe_decode import decode_series
from tests.orthanc_server import make_sources
from tests.test_dciodvfy import ensure_debian_tool

pytestmark = pytest.mark.timeout(600)
XM = ModelInfo("xray-densenet121", "1.0.0", True, "ab" * 32, label="ChestView X-ray DenseNet-121")
CM = ModelInfo("ct-inception", "1.0.0", True, "cd" * 32, label="ChestView CT")

# Added to a copy of report.html: once everything has loaded, write each image's natural size and
# its count of strongly coloured pixels (|R-B| > 60: jet heatmap, never a grey radiograph) into
# data attributes, so --dump-dom shows what the browser decoded.
PROBE = """<script>
window.addEventListener('load', () => {
  for (const img of document.querySelectorAll('img')) {
    img.dataset.natural = img.naturalWidth + 'x' + img.naturalHeight;
    try {
      const c = document.createElement('canvas');
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      const g = c.getContext('2d'); g.drawImage(img, 0, 0);
      const d = g.getImageData(0, 0, c.width, c.height).data;
      let hot = 0;
      for (let i = 0; i < d.length; i += 4) if (Math.abs(d[i] - d[i + 2]) > 60) hot++;
      img.dataset.hot = String(hot);
    } catch (e) { img.dataset.hot = 'error: ' + e.name; }
  }
  document.body.dataset.probed = 'yes';
});
</script>"""


def _chromium() -> str:
    exe = ensure_debian_tool("chromium", "chromium")
    if exe is None:
        pytest.skip("chromium (Debian package) is not installed and cannot be installed here")
    return exe


def _blob(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * r * r)).astype(np.float32)


def _result(series, dec) -> StudyResult:
    if series.kind == "ct":
        return StudyResult(series.study_uid, series.series_uid, "CT", "ct", Validity(True), models=[CM],
                           findings=[Finding("COVID-19", 0.42, 0.68, False, CM.name, CM.version)],
                           heatmaps=[Heatmap("COVID-19", _blob(dec.image_shape, 40, 60, 12), CM.name,
                                             CM.version, slice_index=1)], ct_study_probability=0.42)
    h, w = dec.image_shape
    return StudyResult(series.study_uid, series.series_uid, "CR", "xray", Validity(True), models=[XM],
                       findings=[Finding("Lung Opacity", 0.81, 0.5, True, XM.name, XM.version)],
                       severity=Severity(4.2, 2.5, 0.9, XM.name, XM.version),
                       heatmaps=[Heatmap("Lung Opacity", _blob((h, w), h * 0.4, w * 0.3, h * 0.08),
                                         XM.name, XM.version)])


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("report")
    src = make_sources(work / "in")
    idx = index_path(work / "in")
    out = work / "out"
    rows = []
    for patient in idx.patients:
        for study in patient.studies:
            for series in study.series:
                dec = decode_series(series)
                res = _result(series, dec)
                thumb = rp.write_thumbnail(out, series.series_uid, dec, res)
                rows.append(rp.build_row(patient, study, series, res, thumbnail=thumb))
    assert len(rows) == 2 and len(src["ct"]) == 3
    results = rp.build_results(rows, [], rp.collect_models([XM.__dict__, CM.__dict__]), input_path=str(work / "in"),
                               files_seen=4, deidentified=False, run={})
    return rp.write_reports(out, results)["html"]


def test_report_table_thumbnails_and_heatmaps_render_in_chromium(report, artifacts_dir):
    browser = _chromium()
    probe = report.parent / "report_probe.html"
    html = report.read_text("utf-8")
    probe.write_text(html.replace("</body>", PROBE + "</body>"), "utf-8")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--virtual-time-budget=10000"]
    dom = subprocess.run(flags + ["--dump-dom", probe.as_uri()], capture_output=True, text=True,
                         timeout=180).stdout
    assert 'data-probed="yes"' in dom, dom[-2000:]
    # the table: header and one row per series, sorted by score by the page's own script
    assert '<table id="rows"' in dom
    uids = re.findall(r'<tr class="[a-z]+" data-uid="([0-9.]+)"', dom)
    assert len(uids) == 2
    # every thumbnail decoded with its natural size; its right half carries the coloured heatmap
    imgs = re.findall(r"<img[^>]*>", dom)
    assert len(imgs) == 2, imgs
    for tag in imgs:
        size = re.search(r'data-natural="(\d+)x(\d+)"', tag)
        hot = re.search(r'data-hot="([^"]+)"', tag)
        assert size and int(size.group(1)) > 0 and int(size.group(2)) > 0, tag
        assert int(size.group(1)) > int(size.group(2)) * 1.5, tag          # [image | image + heatmap]
        assert hot and hot.group(1).isdigit() and int(hot.group(1)) > 50, tag
    # a screenshot for people, checked to be a real rendering (not blank)
    shot = artifacts_dir / "report_in_chromium.png"
    shot.unlink(missing_ok=True)
    subprocess.run(flags + ["--window-size=1400,1000", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=180, cwd=report.parent)
    assert shot.is_file()
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert px.shape[0] >= 900 and px.std() > 10
    assert (np.abs(px[..., 0] - px[..., 2]) > 60).sum() > 50          # the heatmap is visible on the page


def test_broken_thumbnail_is_detected(report):
    """Control: an image that does not decode is reported with natural size 0 by the same probe."""
    browser = _chromium()
    probe = report.parent / "report_broken.html"
    html = report.read_text("utf-8").replace("src='thumbs/", "src='missing/", 1)
    probe.write_text(html.replace("</body>", PROBE + "</body>"), "utf-8")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=180).stdout
    assert 'data-natural="0x0"' in dom
