"""Architectures, preprocessing against hand-computed values, devices (engine.ai.models, engine.ai.preprocess)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.ai.models import devices
from engine.ai.models.densenet_xray import LUNG_OPACITY_INDEX, XRV_PATHOLOGIES, XRayDenseNet
from engine.ai.models.inception_ct import CTInception
from engine.ai.preprocess.ct import ct_model_input, hu_to_gray01
from engine.ai.preprocess.xray import center_crop_box, prepare_xray, to_xrv_range

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def xnet():
    torch.manual_seed(0)
    return XRayDenseNet().eval()


def test_xray_densenet_shapes_and_feature_split(xnet):
    assert XRV_PATHOLOGIES[LUNG_OPACITY_INDEX] == "Lung Opacity" and len(XRV_PATHOLOGIES) == 18
    x = torch.rand(2, 1, 224, 224) * 2048 - 1024
    with torch.no_grad():
        fmap = xnet.feature_map(x)
        out = xnet(x)
    assert fmap.shape == (2, 1024, 7, 7)
    assert out["pathologies"].shape == (2, 18) and out["covid"].shape == (2, 3)
    torch.testing.assert_close(xnet.head(fmap)["pathologies"], out["pathologies"])
    p = torch.sigmoid(out["pathologies"])
    assert float(p.min()) >= 0 and float(p.max()) <= 1
    assert torch.softmax(out["covid"], 1).sum(1).allclose(torch.ones(2))


def test_ct_googlenet_shapes():
    torch.manual_seed(0)
    net = CTInception("googlenet").eval()
    assert net.input_size == 224 and net.cam_layer == "inception5b"
    x = torch.rand(1, 3, 112, 112) * 2 - 1                  # small input keeps the test cheap
    with torch.no_grad():
        fmap = net.feature_map(x)
        logits = net.head(fmap)
    assert fmap.shape[:2] == (1, 1024) and logits.shape == (1, 2)


def test_xrv_range_hand_computed():
    g = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    assert to_xrv_range(g).tolist() == [[-1024.0, -512.0, 0.0, 1024.0]]
    # torchxrayvision's (2*x/maxval - 1)*1024 with maxval = 2**12-1 for 12-bit pixels
    stored = np.array([0, 4095, 1000], np.float32)
    expect = (2 * stored / 4095 - 1) * 1024
    np.testing.assert_allclose(to_xrv_range(stored / 4095), expect, rtol=1e-5, atol=1e-3)


def test_prepare_xray_crop_and_resize_hand_computed():
    assert center_crop_box(300, 200) == (50, 0, 200)
    assert center_crop_box(5, 9) == (0, 2, 5)
    # 4x6 image: centre square = columns 1..4; bilinear upscale of a constant stays constant
    g = np.zeros((4, 6), np.float32)
    g[:, 1:5] = 0.75
    t, geom = prepare_xray(g, size=8)
    assert (geom.top, geom.left, geom.side) == (0, 1, 4)
    assert t.shape == (1, 8, 8) and torch.allclose(t, torch.full((1, 8, 8), 512.0))
    # downscale by area averaging: 448 -> 224 averages 2x2 blocks exactly
    big = np.zeros((448, 448), np.float32)
    big[0::2, :] = 1.0                                  # alternate rows white/black -> mean 0.5 -> 0
    t2, _ = prepare_xray(big)
    assert t2.shape == (1, 224, 224) and float(t2.abs().max()) < 1e-3


def test_ct_preprocessing_hand_computed():
    hu = np.array([[-1350.0, -600.0, 150.0, 3000.0]])
    np.testing.assert_allclose(hu_to_gray01(hu), [[0.0, 0.5, 1.0, 1.0]])
    t = ct_model_input(np.full((10, 20), 0.25, np.float32), 16)
    assert t.shape == (3, 16, 16) and torch.allclose(t, torch.full_like(t, -0.5))


def test_pick_device_cpu_and_thread_count(monkeypatch):
    cfg = devices.pick_device("cpu")
    assert cfg.device.type == "cpu" and cfg.autocast_dtype is None
    assert "cpu" in cfg.name and torch.get_num_threads() >= 1
    assert devices.physical_cores() >= 1


def test_physical_cores_read_from_sysfs_match_psutil_and_fall_back(monkeypatch, tmp_path):
    """engine.cpu counts distinct sibling sets of the CPUs this process may use (no psutil import
    on the viewer's GUI thread); without sysfs it asks psutil, as before."""
    import os

    import psutil

    import engine.cpu as cpu

    all_cpus = len(os.sched_getaffinity(0)) == (os.cpu_count() or 0)
    if all_cpus:
        assert cpu.physical_cores() == psutil.cpu_count(logical=False)
    # a 2-core machine with hyper-threading: cpu0/cpu2 and cpu1/cpu3 are siblings
    for n, sib in {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"}.items():
        d = tmp_path / f"cpu{n}" / "topology"
        d.mkdir(parents=True)
        (d / "core_cpus_list").write_text(sib + "\n")
    monkeypatch.setattr(cpu, "SYSFS_CPU", str(tmp_path))
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert cpu.physical_cores() == 2
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 2})      # taskset -c 0,2
    assert cpu.physical_cores() == 1
    monkeypatch.setattr(cpu, "SYSFS_CPU", str(tmp_path / "absent"))
    assert cpu.physical_cores() == max(1, psutil.cpu_count(logical=False) or 1)


def test_cpu_bf16_autocast_agrees_with_fp32():
    """Mixed precision changes numbers only within tolerance (the CUDA fp16 path is the same code)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(4, 1, 32, 32)
    cfg = devices.DeviceConfig(torch.device("cpu"), torch.bfloat16)
    with torch.inference_mode():
        ref = net(x)
        with devices.autocast(cfg):
            low = net(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(devices.to_float32(low), ref, rtol=0.05, atol=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_autocast_agrees_with_cpu_fp32(xnet):
    x = torch.rand(2, 1, 224, 224) * 2048 - 1024
    with torch.inference_mode():
        ref = xnet(x)["pathologies"]
    cfg = devices.pick_device("cuda")
    gnet = XRayDenseNet().eval()
    gnet.load_state_dict(xnet.state_dict())
    gnet.to(cfg.device)
    with torch.inference_mode(), devices.autocast(cfg):
        got = gnet(x.to(cfg.device))["pathologies"].float().cpu()
    torch.testing.assert_close(got, ref, rtol=0.02, atol=0.05)
