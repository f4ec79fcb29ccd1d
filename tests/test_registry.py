"""Model registry: cards, sha256 pinning, untrained fallback (engine.ai.models.registry)."""
from __future__ import annotations

import json

import pytest
import torch

from engine.errors import ModelError
from engine.ai.models import registry
from engine.ai.models.densenet_xray import COVID_CLASSES, XRV_PATHOLOGIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def models_dir(tmp_path, monkeypatch):
    d = tmp_path / "models"
    d.mkdir()
    monkeypatch.setenv("CHESTVIEW_MODELS", str(d))
    registry.clear_cache()
    yield d
    registry.clear_cache()


@pytest.fixture(scope="module")
def xray_state():
    return registry._untrained_module(registry.default_card(registry.XRAY_MODEL)).state_dict()


def _write_xray(d, state, version="1.0.0", trained=True, **kw):
    return registry.write_card(d, name=registry.XRAY_MODEL, version=version, state_dict=state, trained=trained,
                               labels={"pathologies": XRV_PATHOLOGIES, "covid": COVID_CLASSES},
                               thresholds={"COVID-19": 0.4}, **kw)


def test_no_cards_means_untrained_everywhere(models_dir):
    infos = registry.list_model_infos()
    assert [i.name for i in infos] == ["xray-densenet121", "ct-inception"]
    for i in infos:
        assert i.trained is False and i.sha256 == ""
        assert "untrained — no findings shown" in i.label and i.version in i.label
    assert infos[0].label.startswith("ChestView X-ray DenseNet-121 0.0.0")


def test_untrained_model_is_deterministic_cached_and_keeps_caller_rng(models_dir):
    torch.manual_seed(123)
    expect = torch.rand(1)
    torch.manual_seed(123)
    lm = registry.load_model(registry.XRAY_MODEL)
    assert torch.rand(1).item() == expect.item()          # the caller's RNG stream is untouched
    assert registry.load_model(registry.XRAY_MODEL) is lm  # loaded once per process
    assert lm.info.trained is False and not lm.module.training
    registry.clear_cache()
    lm2 = registry.load_model(registry.XRAY_MODEL)
    assert lm2 is not lm
    w1, w2 = lm.module.features.conv0.weight, lm2.module.features.conv0.weight
    assert torch.equal(w1, w2)


def test_trained_card_round_trip_with_ood_tensors(models_dir, xray_state):
    ood = {"mean": torch.zeros(1024), "components": torch.eye(4, 1024), "variance": torch.ones(4)}
    card_path = _write_xray(models_dir, xray_state, ood_tensors=ood, ood={"method": "pca-mahalanobis",
                                                                          "threshold": 2.5})
    card = json.loads(card_path.read_text())
    assert card["file"] == "xray-densenet121-1.0.0.safetensors"
    assert card["sha256"] == registry.sha256_file(models_dir / card["file"])
    assert card["intended_use"] == "Research use only, not for diagnostic use"
    lm = registry.load_model(registry.XRAY_MODEL)
    assert lm.info.trained and lm.info.label == "ChestView X-ray DenseNet-121 1.0.0 (trained)"
    assert lm.info.sha256 == card["sha256"]
    assert set(lm.ood) == {"mean", "components", "variance"}
    assert torch.equal(lm.module.classifier.weight, xray_state["classifier.weight"])
    assert lm.card["thresholds"] == {"COVID-19": 0.4}


def test_tampered_weights_refused_with_clear_message(models_dir, xray_state):
    card_path = _write_xray(models_dir, xray_state)
    card = json.loads(card_path.read_text())
    w = models_dir / card["file"]
    data = bytearray(w.read_bytes())
    data[-100] ^= 0xFF
    w.write_bytes(bytes(data))
    actual = registry.sha256_file(w)
    with pytest.raises(ModelError) as ei:
        registry.load_model(registry.XRAY_MODEL)
    msg = str(ei.value)
    assert w.name in msg and card["sha256"] in msg and actual in msg and "restore" in msg
    w.unlink()
    with pytest.raises(ModelError, match="missing"):
        registry.load_model(registry.XRAY_MODEL)


def test_card_choice_trained_first_then_newest_and_bad_json_skipped(models_dir, xray_state):
    _write_xray(models_dir, xray_state, version="1.0.0", trained=True)
    _write_xray(models_dir, xray_state, version="1.1.0", trained=False)
    (models_dir / "broken.json").write_text("{not json")
    path, card = registry.find_card(registry.XRAY_MODEL)
    assert card["version"] == "1.0.0"
    assert registry.find_card(registry.XRAY_MODEL, version="1.1.0")[1]["trained"] is False
    infos = {i.name: i for i in registry.list_model_infos()}
    assert infos["xray-densenet121"].version == "1.0.0" and infos["ct-inception"].trained is False
    lbl = registry.model_label(registry.find_card(registry.XRAY_MODEL, version="1.1.0")[1])
    assert lbl == "ChestView X-ray DenseNet-121 1.1.0 (untrained — no findings shown)"


def test_architecture_mismatch_is_model_error(models_dir, xray_state):
    bad = dict(xray_state)
    bad.pop("classifier.bias")
    _write_xray(models_dir, bad)
    with pytest.raises(ModelError, match="do not match"):
        registry.load_model(registry.XRAY_MODEL)
