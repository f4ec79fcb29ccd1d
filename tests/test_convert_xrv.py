"""Safe conversion of torchxrayvision whole-module pickles (engine.training.convert_xrv)."""
from __future__ import annotations

import io
import json
import os
import sys
import types
import zipfile

import pytest
import torch
from torch import nn

from engine.errors import ModelError
from engine.training import convert_xrv
from engine.ai.models.densenet_xray import XRV_PATHOLOGIES, XRayDenseNet


pytestmark = [pytest.mark.filterwarnings("ignore:Couldn't retrieve source code"),
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def fake_xrv():
    """A module named torchxrayvision.models whose DenseNet mimics xrv's pickled layout."""
    pkg = types.ModuleType("torchxrayvision")
    mod = types.ModuleType("torchxrayvision.models")

    class DenseNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            ref = XRayDenseNet()
            self.features = ref.features
            self.classifier = ref.classifier
            self.pathologies = list(XRV_PATHOLOGIES)
            self.op_threshs = torch.linspace(0.1, 0.9, 18)
            self.upsample = nn.Upsample(size=(224, 224), mode="bilinear", align_corners=False)
            self.weights = "densenet121-res224-all"

    DenseNet.__module__ = "torchxrayvision.models"
    DenseNet.__qualname__ = "DenseNet"
    mod.DenseNet = DenseNet
    pkg.models = mod
    saved = {k: sys.modules.get(k) for k in ("torchxrayvision", "torchxrayvision.models")}
    sys.modules["torchxrayvision"], sys.modules["torchxrayvision.models"] = pkg, mod
    yield DenseNet
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v


@pytest.fixture(scope="module")
def xrv_files(fake_xrv, tmp_path_factory):
    """The fake model saved once in the zip format and once in the legacy (pre-1.6) format."""
    d = tmp_path_factory.mktemp("xrv")
    torch.manual_seed(3)
    model = fake_xrv().eval()
    files = {}
    for zip_format in (True, False):
        files[zip_format] = d / f"densenet121-res224-all-{'zip' if zip_format else 'legacy'}.pt"
        torch.save(model, files[zip_format], _use_new_zipfile_serialization=zip_format)
    return model, files


@pytest.mark.parametrize("zip_format", [True, False])
def test_convert_whole_module_pickle(xrv_files, tmp_path, zip_format):
    src_model, files = xrv_files
    src = files[zip_format]
    assert zipfile.is_zipfile(src) == zip_format
    card_path = convert_xrv.convert(src, tmp_path / "models")
    card = json.loads(card_path.read_text())
    assert card["trained"] is False
    assert card["source"] == "torchxrayvision (user supplied)"
    assert "not evaluated by ChestView" in card["note"]
    assert card["labels"]["pathologies"] == XRV_PATHOLOGIES
    assert card["operating_thresholds_from_source"]["Atelectasis"] == pytest.approx(0.1)
    from safetensors.torch import load_file

    from engine.ai.models.registry import sha256_file

    w = tmp_path / "models" / card["file"]
    assert card["sha256"] == sha256_file(w)
    state = load_file(str(w))
    ours = XRayDenseNet()
    ours.load_state_dict(state)
    ours.eval()
    x = torch.randn(1, 1, 64, 64) * 500   # small input: same weights, cheaper forward
    with torch.no_grad():
        ref_logits = src_model.classifier(torch.nn.functional.adaptive_avg_pool2d(
            torch.relu(src_model.features(x)), 1).flatten(1))
        got = ours(x)["pathologies"]
    torch.testing.assert_close(got, ref_logits, rtol=1e-4, atol=1e-4)


def test_registry_labels_converted_weights_external(xrv_files, tmp_path, monkeypatch):
    src = xrv_files[1][True]
    assert convert_xrv.cli_main([str(src), "--out", str(tmp_path / "models"), "--dtype", "float16"]) == 0
    from engine.ai.models import registry

    monkeypatch.setenv("CHESTVIEW_MODELS", str(tmp_path / "models"))
    registry.clear_cache()
    try:
        infos = {i.name: i for i in registry.list_model_infos()}
        xr = infos["xray-densenet121"]
        assert xr.trained is False and xr.version == "xrv-res224-all"
        assert "external weights, not evaluated by ChestView" in xr.label
        lm = registry.load_model("xray-densenet121")
        assert next(lm.module.parameters()).dtype == torch.float32   # fp16 file upcast on CPU
    finally:
        registry.clear_cache()


class _Evil:
    def __init__(self, target: str, how: str) -> None:
        self.target, self.how = target, how

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {self.target}",))
        return (eval, (f"open({self.target!r}, 'w').write('x')",))


@pytest.mark.parametrize("how", ["system", "eval"])
@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_refused_without_executing(tmp_path, how, zip_format):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": _Evil(str(marker), how)}, src,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(convert_xrv.UnsafePickleError, match="refused to load"):
        convert_xrv.convert(src, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert convert_xrv.cli_main([str(src), "--out", str(tmp_path / "out")]) == 2
    assert not marker.exists()


def test_hand_built_zip_with_evil_global_refused(tmp_path):
    """A crafted archive whose data.pkl names builtins.exec is refused at find_class."""
    marker = tmp_path / "pwned2"
    payload = (b"\x80\x02cbuiltins\nexec\nq\x00X" + len(f"open('{marker}','w')").to_bytes(4, "little")
               + f"open('{marker}','w')".encode() + b"\x85R.")
    src = tmp_path / "crafted.pt"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")
    with pytest.raises(ModelError):
        convert_xrv.safe_load(src)
    assert not marker.exists()


def test_non_model_file_clear_error(tmp_path):
    src = tmp_path / "weights.pt"
    torch.save({"a": torch.zeros(3)}, src)
    with pytest.raises(ModelError, match="lacks"):
        convert_xrv.convert(src, tmp_path / "out")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model at all" * 10)
    with pytest.raises(ModelError):
        convert_xrv.convert(junk, tmp_path / "out")
