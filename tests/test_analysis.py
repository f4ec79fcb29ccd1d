"""analyze() end to end on the demo study set and on trained-card stand-ins (engine.ai.analysis)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.ai.analysis import Analyzer
from engine.dicom.records import InstanceRecord, SeriesRecord
from engine.errors import AnalysisCancelled
from engine.ai.models import registry
from engine.ai.models.densenet_xray import COVID_CLASSES, XRV_PATHOLOGIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo_series(demo_dir):
    from engine.dicom.index import index_path

    idx = index_path(demo_dir)
    by = {}
    for s in idx.all_series():
        if s.modality == "CT":
            by["ct"] = s
        elif s.body_part.upper() == "EXTREMITY" or "tibia" in s.series_description.lower():
            by["tibia"] = s
        elif s.series_number == 1:
            by["chest"] = s
    assert set(by) == {"ct", "tibia", "chest"}, [(s.modality, s.series_description) for s in idx.all_series()]
    return by


@pytest.fixture()
def untrained(tmp_path, monkeypatch):
    monkeypatch.setenv("CHESTVIEW_MODELS", str(tmp_path / "no-models"))
    registry.clear_cache()
    yield
    registry.clear_cache()


def test_demo_untrained_models_no_findings(demo_series, untrained):
    from engine.demo.phantom import phantom_truth

    an = Analyzer("cpu", ct_max_slices=4)
    seen = []
    chest, tibia = an.analyze_many([demo_series["chest"], demo_series["tibia"]],
                                   progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0
    for r in (chest, tibia):
        assert r.kind == "xray" and r.error is None and r.findings == [] and r.severity is None
        assert r.heatmaps == [] and r.models[0].trained is False
        assert "untrained" in r.models[0].label and r.models[0].label.startswith("ChestView X-ray DenseNet-121")
        assert {"load", "preprocess", "inference", "total"} <= set(r.timings_ms)
        assert r.intended_use == "Research use only, not for diagnostic use"
    assert chest.validity.passed and any("untrained" in x for x in chest.validity.reasons)
    assert not tibia.validity.passed and tibia.validity.checks["body_part"] is False
    assert any("EXTREMITY" in x for x in tibia.validity.reasons)

    ct = an.analyze(demo_series["ct"])
    assert ct.kind == "ct" and ct.error is None and ct.validity.passed, ct.validity
    assert ct.findings == [] and ct.ct_study_probability is None and ct.models[0].trained is False
    truth = phantom_truth().lung_ml
    assert abs(ct.lung_volume_ml - truth) / truth < 0.05
    assert ct.timings_ms["slices_scored"] == 4 and ct.to_json_dict()["kind"] == "ct"


def _chest_series() -> SeriesRecord:
    from pydicom.data import get_testdata_file

    return SeriesRecord("2.25.1", "2.25.2", "anon", "CR", body_part="CHEST", view_position="PA",
                        instances=[InstanceRecord(get_testdata_file("RG1_UNCR.dcm"), "2.25.3", 1)])


@pytest.fixture()
def trained_models(tmp_path, monkeypatch):
    """Cards marked trained (random weights: this checks the plumbing, not accuracy)."""
    d = tmp_path / "models"
    xstate = registry._untrained_module(registry.default_card(registry.XRAY_MODEL)).state_dict()
    big = {"mean": torch.zeros(1024), "components": torch.eye(2, 1024), "variance": torch.full((2,), 1e6),
           "residual_variance": torch.tensor(1e6)}
    registry.write_card(d, name=registry.XRAY_MODEL, version="9.9.9", state_dict=xstate, trained=True,
                        labels={"pathologies": XRV_PATHOLOGIES, "covid": COVID_CLASSES},
                        thresholds={"COVID-19": 0.0, "Normal": 1.0, "Lung Opacity": 0.5},
                        ood_tensors=big, ood={"method": "pca-mahalanobis", "threshold": 1.0})
    monkeypatch.setenv("CHESTVIEW_MODELS", str(d))
    registry.clear_cache()
    yield d
    registry.clear_cache()


def test_trained_xray_findings_severity_heatmaps(trained_models):
    an = Analyzer("cpu")
    r = an.analyze(_chest_series())
    assert r.error is None and r.validity.passed, r.validity
    assert r.validity.ood_score is not None and r.validity.ood_threshold == 1.0
    assert [f.label for f in r.findings][0] == "COVID-19"          # positive first
    labels = {f.label: f for f in r.findings}
    assert set(labels) == {"COVID-19", "Normal", "Lung Opacity"}  # only labels the card thresholds
    assert labels["COVID-19"].positive and not labels["Normal"].positive
    assert all(0 <= f.probability <= 1 and f.model_version == "9.9.9" for f in r.findings)
    assert r.severity is not None and 0 <= r.severity.geographic_extent <= 8 and 0 <= r.severity.opacity <= 6
    assert r.models[0].label == "ChestView X-ray DenseNet-121 9.9.9 (trained)"
    targets = [h.target for h in r.heatmaps]
    assert targets[0] == "COVID-19" and "severity" in targets
    for h in r.heatmaps:
        assert h.array.shape == (1955, 1841) and h.array.dtype == np.float32
        assert 0.0 <= float(h.array.min()) and float(h.array.max()) <= 1.0 and h.slice_index is None


def test_trained_gate_failure_greys_findings(trained_models):
    s = _chest_series()
    s.body_part = "EXTREMITY"
    r = Analyzer("cpu").analyze(s, want_heatmaps=True)
    assert not r.validity.passed and r.findings and not any(f.positive for f in r.findings)
    assert r.heatmaps == []


def test_trained_ct_slice_scores_and_heatmaps(tmp_path, monkeypatch):
    import types

    from engine.demo.phantom import PhantomGeometry, phantom_volume

    d = tmp_path / "models"
    card = registry.default_card(registry.CT_MODEL)
    cstate = registry._untrained_module(card).state_dict()
    registry.write_card(d, name=registry.CT_MODEL, version="2.0.0", state_dict=cstate, trained=True,
                        labels=card["labels"], arch_params={"variant": "googlenet"},
                        thresholds={"COVID-19": 0.5})
    monkeypatch.setenv("CHESTVIEW_MODELS", str(d))
    registry.clear_cache()
    try:
        g = PhantomGeometry(n_slices=24, size=128, pixel_mm=2.8, slice_mm=12.0)
        vol = types.SimpleNamespace(hu=phantom_volume(g), spacing=(g.slice_mm, g.pixel_mm, g.pixel_mm),
                                    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), warnings=[],
                                    positions=[g.z_of(k) for k in range(g.n_slices)])
        series = SeriesRecord("2.25.5", "2.25.4", "anon", "CT", body_part="CHEST")
        r = Analyzer("cpu", ct_max_slices=5, ct_batch=2).analyze_volume(series, vol)
        assert r.error is None and r.validity.passed
        assert len(r.ct_slice_scores) == 5
        top3 = sorted((s.probability for s in r.ct_slice_scores), reverse=True)[:3]
        assert r.ct_study_probability == pytest.approx(float(np.mean(top3)))
        assert [f.label for f in r.findings] == ["COVID-19"]
        assert len(r.heatmaps) == 3
        scored = {s.slice_index for s in r.ct_slice_scores}
        for h in r.heatmaps:
            assert h.slice_index in scored and h.array.shape == (128, 128)
        assert r.ct_slice_scores[0].z_mm == g.z_of(r.ct_slice_scores[0].slice_index)
    finally:
        registry.clear_cache()


def test_bad_input_never_raises_and_cancel_raises(tmp_path, untrained):
    an = Analyzer("cpu")
    mr = SeriesRecord("1", "2", "p", "MR")
    r = an.analyze(mr)
    assert r.kind == "unsupported" and not r.validity.passed and r.error is None
    assert "MR" in r.validity.reasons[0] and r.findings == [] and r.models == []
    missing = SeriesRecord("1", "2", "p", "CR", instances=[InstanceRecord(str(tmp_path / "gone.dcm"), "3", 1)])
    r = an.analyze(missing)
    assert r.kind == "xray" and r.error and not r.validity.passed
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 300)
    r = an.analyze(SeriesRecord("1", "2", "p", "CT", instances=[InstanceRecord(str(junk), "3", 1)]))
    assert r.kind == "ct" and r.error
    assert an.analyze(SeriesRecord("1", "2", "p", "DX")).error == "The series has no images."
    with pytest.raises(AnalysisCancelled):
        an.analyze(_chest_series(), cancel=lambda: True)
