"""engine.reading.hanging: series ranking, priors and the default chest hanging (no Qt)."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.dicom.records import IndexResult, InstanceRecord, PatientRecord, SeriesRecord, StudyRecord
from engine.reading.hanging import (LUNG_WINDOW, default_hanging, find_priors, nearest_position_index, plane,
                            primary_series, rank_series, series_class)
from tests.priors_data import write_cr_studies, write_ct_studies

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def _ct(uid: str, number: int, desc: str, n: int = 40, iop=AXIAL, image_type="ORIGINAL\\PRIMARY\\AXIAL",
        kernel="", thickness: float | None = None, study="S1") -> SeriesRecord:
    insts = [InstanceRecord(f"/x/{uid}/{k}.dcm", f"{uid}.{k}", k + 1, image_position=(0.0, 0.0, float(k)),
                            image_orientation=iop, rows=512, columns=512) for k in range(n)]
    return SeriesRecord(uid, study, "P1", "CT", number, desc, "CHEST", "", 512, 512, instances=insts,
                        image_type=image_type, convolution_kernel=kernel, slice_thickness=thickness)


def _cr(uid: str, number: int, view: str, desc: str = "", study="S1", rows: int = 2000) -> SeriesRecord:
    return SeriesRecord(uid, study, "P1", "CR", number, desc, "CHEST", view, rows, rows,
                        instances=[InstanceRecord(f"/x/{uid}.dcm", f"{uid}.1", 1, rows=rows, columns=rows)])


def test_ct_axial_lung_kernel_thin_first_reformats_and_localizers_last():
    scout = _ct("scout", 1, "Topogram 0.6", n=1, iop=CORONAL, image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    cor = _ct("cor", 2, "ABD COR MPR", iop=CORONAL, image_type="DERIVED\\SECONDARY\\REFORMATTED")
    soft = _ct("soft", 3, "Chest 5mm", kernel="B31f", thickness=5.0)
    lung_thick = _ct("lung5", 4, "Chest 5mm lung", kernel="B70f", thickness=5.0)
    lung_thin = _ct("lung1", 5, "Chest 1mm lung", kernel="B70f", thickness=1.0, n=200)
    order = [se.series_uid for se in rank_series([scout, cor, soft, lung_thick, lung_thin])]
    assert order == ["lung1", "lung5", "soft", "cor", "scout"]
    assert plane(cor) == "coronal" and plane(soft) == "axial"
    assert series_class(scout) == 4 and series_class(cor) == 3 and series_class(soft) == 0


def test_radiograph_frontal_before_lateral_and_pixels_before_sr():
    lat = _cr("lat", 1, "LL", "Lateral chest")
    pa = _cr("pa", 2, "PA", "PA chest")
    ap = _cr("ap", 3, "AP", "AP portable")
    sr = SeriesRecord("sr", "S1", "P1", "SR", 0, "AI report")
    assert [s.series_uid for s in rank_series([sr, lat, ap, pa])] == ["pa", "ap", "lat", "sr"]
    study = StudyRecord("S1", "P1", "20240101", series=[sr, lat])
    assert primary_series(study).series_uid == "lat"       # lateral beats an object with no pixels
    # no View Position: the description decides, a lateral never counts as frontal
    assert series_class(_cr("d1", 1, "", "Thorax p.a.")) == 1
    assert series_class(_cr("d2", 1, "", "Chest PA")) == 0


def _index() -> IndexResult:
    def study(uid, date, series, time="100000"):
        return StudyRecord(uid, "P1", date, time, series=series)
    p1 = PatientRecord("P1", "A^B", studies=[
        study("cr-2020", "20200101", [_cr("a", 1, "PA", study="cr-2020")]),
        study("cr-2021a", "20210301", [_cr("b", 1, "PA", study="cr-2021a")]),
        study("cr-2021b", "20210301", [_cr("b2", 1, "PA", study="cr-2021b")], time="080000"),
        study("ct-2021", "20210501", [_ct("c", 1, "Chest", study="ct-2021")]),
        study("cur", "20210601", [_cr("d", 1, "PA", study="cur"), _cr("d2", 2, "LL", study="cur")]),
        study("later", "20220101", [_cr("e", 1, "PA", study="later")]),
        study("nodate", "", [_cr("f", 1, "PA", study="nodate")]),
    ])
    other = PatientRecord("P2", "C^D", studies=[StudyRecord("o", "P2", "20210530", series=[_cr("g", 1, "PA")])])
    # a second record of the same patient ID (name spelled differently) is the same patient
    p1b = PatientRecord("P1", "A B", studies=[StudyRecord("dx", "P1", "20190101", series=[
        SeriesRecord("h", "dx", "P1", "DX", 1, "", "CHEST", "AP", 100, 100,
                     instances=[InstanceRecord("/x/h.dcm", "h.1", 1, rows=100, columns=100)])])])
    return IndexResult(patients=[p1, other, p1b])


def test_priors_same_patient_same_modality_group_earlier_most_recent_first():
    idx = _index()
    cur = next(s for s in idx.patients[0].studies if s.study_uid == "cur")
    priors = [s.study_uid for s in find_priors(idx, cur, "XR")]
    # same date: the earlier Study Time is older; CT, the later study, the undated one and P2 are out
    assert priors == ["cr-2021a", "cr-2021b", "cr-2020", "dx"]
    assert [s.study_uid for s in find_priors(idx, cur, "CT")] == ["ct-2021"]
    nodate = next(s for s in idx.patients[0].studies if s.study_uid == "nodate")
    assert find_priors(idx, nodate, "XR") == []


def test_default_hanging_current_frontal_and_prior_beside_it():
    idx = _index()
    cur = next(s for s in idx.patients[0].studies if s.study_uid == "cur")
    plan = default_hanging(idx, cur)
    assert (plan.rows, plan.cols) == (1, 2)
    assert plan.series_uids == ["d", "b"] and plan.study_uids == ["cur", "cr-2021a"]
    assert not plan.link_position and plan.window is None
    assert (default_hanging(idx, cur, with_prior=False).cols) == 1


def test_nearest_position_index_is_by_millimetres_not_index():
    assert nearest_position_index([0.0, 5.0, 10.0, 15.0], 11.0) == 2
    assert nearest_position_index([None, 40.0, 20.0], 27.0) == 2
    assert nearest_position_index([None, None], 3.0) is None
    assert nearest_position_index([1.0], None) is None


def test_real_files_cr_and_ct_priors(tmp_path: Path):
    from engine.dicom.index import index_path

    write_cr_studies(tmp_path, "HANG-CR", ["20240105", "20240620", "20240312"])
    write_ct_studies(tmp_path, "HANG-CT", ["20230101", "20240101"], n_slices=6)
    idx = index_path(tmp_path)
    cr = next(p for p in idx.patients if p.patient_id == "HANG-CR")
    cur = next(s for s in cr.studies if s.study_date == "20240620")
    plan = default_hanging(idx, cur)
    prior = next(s for s in cr.studies if s.study_date == "20240312")
    assert plan.cols == 2 and plan.study_uids == [cur.study_uid, prior.study_uid]
    ct = next(p for p in idx.patients if p.patient_id == "HANG-CT")
    cur = next(s for s in ct.studies if s.study_date == "20240101")
    plan = default_hanging(idx, cur)
    assert plan.cols == 2 and plan.link_position and plan.window == LUNG_WINDOW
    # the index now carries what the ranking reads
    se = cur.series[0]
    assert se.image_type.startswith("ORIGINAL\\PRIMARY\\AXIAL") and se.slice_thickness == 15.0


def test_real_ct_axial_before_coronal_and_sagittal_reformats(shared_data: Path):
    """A GE study of the COVID-19-NY-SBU collection: axial, coronal and sagittal reformats, all
    DERIVED; the coronal has the thinnest slices, so thickness alone would hang it first."""
    from engine.dicom.index import index_path

    folder = shared_data / "dicom" / "ct_covid19nysbu_1"
    if not folder.is_dir():
        pytest.skip("ct_covid19nysbu_1 is absent")
    idx = index_path(folder)
    study = idx.patients[0].studies[0]
    first = primary_series(study)
    assert plane(first) == "axial", [(s.series_description, plane(s)) for s in study.series]
    assert min(se.slice_thickness for se in study.series) < first.slice_thickness
