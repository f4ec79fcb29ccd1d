"""``main.py selftest`` on the demo study set (engine.demo.selftest)."""
from __future__ import annotations

import pytest

from engine.demo import selftest
from engine.ai.models import registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_selftest_on_demo(demo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHESTVIEW_MODELS", str(tmp_path / "models"))
    registry.clear_cache()
    try:
        rc = selftest.cli_main(["--demo", str(demo_dir), "--ct-max-slices", "2"])
    finally:
        registry.clear_cache()
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ChestView " in out and "Research use only" in out
    assert "xray-densenet121: no card -> untrained" in out and "ct-inception: no card -> untrained" in out
    assert "JPEG 2000 Lossless" in out and "pylibjpeg" in out and "SimpleITK" in out
    assert "device used: cpu" in out or "device used: cuda" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("  [")]
    assert len(lines) == 5, out                    # 3 chest CR series, tibia, CT phantom
    assert sum("gate FAILED" in ln and "EXTREMITY" in ln for ln in lines) == 1
    assert any("kind=ct" in ln and "lung volume" in ln for ln in lines)
    assert not any("ERROR" in ln for ln in lines)
    assert out.rstrip().endswith("selftest: OK")


def test_selftest_reports_hash_mismatch(tmp_path, monkeypatch, capsys):
    import torch

    d = tmp_path / "models"
    registry.write_card(d, name="ct-inception", version="1.0.0", state_dict={"w": torch.zeros(2)},
                        trained=False, labels={"classes": ["Non-COVID", "COVID-19"]})
    (d / "ct-inception-1.0.0.safetensors").write_bytes(b"tampered")
    monkeypatch.setenv("CHESTVIEW_MODELS", str(d))
    assert selftest.cli_main(["--no-demo"]) == 1
    out = capsys.readouterr().out
    assert "SHA256 MISMATCH" in out and "selftest: FAILED (models)" in out
