"""Multi-study patients for the hanging, layout and trend tests, written from real DICOM: copies of
pydicom-data's RG1 chest CR (engine.demo.studies) and small versions of the CT phantom (engine.demo.phantom),
with one Patient ID and new Study Instance UIDs / Study Dates per study."""
from __future__ import annotations

from pathlib import Path


def _set_study(paths: list[Path], study_date: str, study_time: str = "093000",
               study_uid: str | None = None) -> None:
    import pydicom

    for p in paths:
        ds = pydicom.dcmread(p)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = study_time
        if study_uid:
            ds.StudyInstanceUID = study_uid
        ds.save_as(p, enforce_file_format=True)


def write_cr_studies(out: Path, patient_id: str, dates: list[str], name: str = "TREND^CR") -> list[Path]:
    """One PA chest CR study per date (RG1 copy); returns the file paths, oldest study first."""
    from engine.demo.studies import _copy_radiograph, _testdata

    src = _testdata("RG1_UNCR.dcm")
    if src is None:
        import pytest
        pytest.skip("pydicom-data RG1_UNCR.dcm is not installed")
    paths = []
    for k, d in enumerate(dates):
        p = Path(out) / f"{patient_id}_{d}" / "CR.dcm"
        _copy_radiograph(src, p, patient_name=name, patient_id=patient_id, study_key=f"{patient_id}-{d}",
                         series_number=1, description="PA chest", study_description="Chest radiograph")
        _set_study([p], d)
        paths.append(p)
    return paths


def write_ct_studies(out: Path, patient_id: str, dates: list[str], n_slices: int = 16,
                     z_shift_mm: float = 5.0, name: str = "TREND^CT") -> list[list[Path]]:
    """One small axial phantom CT per date (other seed, table shifted by ``z_shift_mm`` per study,
    as a rescan lands at another table position); returns the series' file lists, oldest first."""
    from engine.demo.phantom import PhantomGeometry, write_phantom_series

    series = []
    for k, d in enumerate(dates):
        geom = PhantomGeometry(n_slices=n_slices, size=96, pixel_mm=3.6, slice_mm=15.0,
                               z0_mm=40.0 + k * z_shift_mm)
        paths = write_phantom_series(Path(out) / f"{patient_id}_{d}", geom, seed=1000 + k,
                                     patient_name=name, patient_id=patient_id)
        _set_study(paths, d)
        series.append(paths)
    return series


def main_window(qapp, tmp_path: Path, monkeypatch, *, auto_run: bool, size: tuple[int, int]):
    """Generator for a fixture: a shown MainWindow over an empty local store; closed after the test."""
    from viewer.main_window import MainWindow
    from viewer.settings_store import SettingsStore
    from viewer.style import apply_dark_theme

    monkeypatch.setenv("CHESTVIEW_HOME", str(tmp_path / "home"))     # an empty local store
    apply_dark_theme(qapp)
    s = SettingsStore(tmp_path / "viewer.ini")
    s.set_value("ai/auto_run", auto_run)
    w = MainWindow(s)
    w.resize(*size)
    w.show()
    qapp.processEvents()       # offscreen: shown at once (no window manager to wait for)
    yield w
    w.wait_idle()
    w.close()
    w.deleteLater()
