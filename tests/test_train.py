"""Training loop end to end on a tiny synthetic task; resumable checkpoints; evaluate writes a card."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from engine import metrics as M
from engine.training.train import TrainConfig, augment_batch, fit, lr_at


def _blob_images(n: int, seed: int):
    """Class 1: bright blob in the upper half; class 0: in the lower half; plus noise."""
    rs = np.random.RandomState(seed)
    y = rs.randint(0, 2, n)
    x = rs.normal(0, 0.3, (n, 1, 16, 16)).astype(np.float32)
    for i in range(n):
        r = rs.randint(1, 6) if y[i] else rs.randint(10, 14)
        c = rs.randint(2, 13)
        x[i, 0, r:r + 3, c:c + 3] += 2.0
    return torch.from_numpy(x), torch.from_numpy(y)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8 * 8 * 8, 2)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def _task():
    xtr, ytr = _blob_images(256, 0)
    xva, yva = _blob_images(128, 1)

    def loss_fn(model, xb, idx):
        return nn.functional.cross_entropy(model(xb), ytr[idx])

    def evaluate(model):
        with torch.no_grad():
            p = torch.softmax(model(xva), 1)[:, 1].numpy()
        auc = M.roc_auc(yva.numpy(), p)
        return auc, {"auc": auc}

    return xtr, loss_fn, evaluate


def test_fit_learns_a_tiny_task_and_keeps_the_best_epoch(tmp_path):
    torch.manual_seed(0)
    xtr, loss_fn, evaluate = _task()
    model = TinyNet()
    before, _ = evaluate(model.eval())
    cfg = TrainConfig(epochs=4, batch=32, lr=3e-3, threads=1, log_every=0, patience=10)
    hist = fit(model, xtr, loss_fn, evaluate, cfg, tmp_path, weights=np.ones(len(xtr)) / len(xtr))
    assert len(hist["epochs"]) == 4
    assert hist["best_score"] > 0.95 > before + 0.2
    assert hist["epochs"][-1]["loss"] < hist["epochs"][0]["loss"]
    from safetensors.torch import load_file

    best = TinyNet()
    best.load_state_dict(load_file(str(tmp_path / "best.safetensors")))
    assert evaluate(best.eval())[0] == pytest.approx(hist["best_score"])
    assert json.loads((tmp_path / "history.json").read_text())["best_epoch"] == hist["best_epoch"]


def test_resume_continues_from_the_checkpoint(tmp_path):
    xtr, loss_fn, evaluate = _task()
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=2, batch=32, lr=3e-3, threads=1, log_every=0)
    fit(TinyNet(), xtr, loss_fn, evaluate, cfg, tmp_path)
    logs: list[str] = []
    cfg3 = TrainConfig(epochs=3, batch=32, lr=3e-3, threads=1, log_every=0)
    hist = fit(TinyNet(), xtr, loss_fn, evaluate, cfg3, tmp_path, resume=True, log=logs.append)
    assert any("resumed" in s and "epoch 2" in s for s in logs)
    assert [e["epoch"] for e in hist["epochs"]] == [1, 2, 3]


def test_early_stopping_on_validation(tmp_path):
    xtr, loss_fn, _ = _task()
    calls = []

    def flat_eval(model):
        calls.append(1)
        return 0.5, {}

    cfg = TrainConfig(epochs=10, batch=32, threads=1, log_every=0, patience=2)
    hist = fit(TinyNet(), xtr, loss_fn, flat_eval, cfg, tmp_path)
    assert len(calls) == 3 and "early stop" in hist["stopped"]


def test_lr_schedule_warms_up_and_anneals():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(99, 100, 10, 1.0) < 0.05
    # a wall-clock budget that is nearly used up anneals even early in the step count
    assert lr_at(20, 100, 10, 1.0, time_frac=0.99) < 0.05


def test_augment_keeps_shape_and_range_and_flips_only_when_asked():
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-1024, 1024, 32).view(1, 1, 1, 32).repeat(4, 1, 32, 1)  # ramp along columns
    y = augment_batch(x, generator=g)
    assert y.shape == x.shape and float(y.min()) >= -1024 and float(y.max()) <= 1024
    # no flip: left-to-right intensity order survives (values increase along columns)
    assert bool((y[:, 0, 16, 24] > y[:, 0, 16, 8]).all())
    x2 = torch.zeros(64, 1, 16, 16)
    x2[..., :8] = 1.0
    z = augment_batch(x2, hflip=True, rot_deg=0, scale=(1, 1), shift=0, gamma=(1, 1), contrast=0,
                      value_range=(0.0, 1.0), generator=g)
    flipped = (z[:, 0, 8, 2] < 0.5).float().mean()
    assert 0.2 < float(flipped) < 0.8


def _tiny_ct_data(src, dst, n_train: int, n_val: int):
    rows = list(csv.DictReader(open(src / "slices.csv", newline="")))
    pick = []
    for split, n in (("train", n_train), ("val", n_val)):
        for lab in ("covid", "non_covid"):
            pick += [r for r in rows if r["split"] == split and r["label"] == lab][:n // 2]
    for r in pick:
        (dst / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / r["path"], dst / r["path"])
    with open(dst / "slices.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(pick)


def test_train_then_evaluate_writes_a_loadable_card(shared_data, tmp_path, monkeypatch):
    """CLI end to end on 20 real CT slices (one short epoch): run folder -> evaluate --write-card."""
    from engine.training.evaluate import cli_main as eval_main
    from engine.ai.models import registry
    from engine.training.train import cli_main as train_main

    monkeypatch.setenv("CHESTVIEW_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "ct"
    data.mkdir()
    _tiny_ct_data(shared_data / "ct", data, 12, 8)
    run = tmp_path / "run"
    assert train_main(["ct", "--data", str(data), "--out", str(run), "--epochs", "1", "--batch", "4",
                       "--threads", "1", "--log-every", "0"]) == 0
    assert (run / "best.safetensors").is_file() and (run / "last.safetensors").is_file() and (run / "last.json").is_file()
    models = tmp_path / "models"
    assert eval_main([str(run), "--data", str(data), "--write-card", "--out", str(models), "--threads", "1"]) == 0
    card_path = models / "ct-inception-1.0.0.json"
    card = json.loads(card_path.read_text())
    for key in ("name", "version", "architecture", "arch_params", "file", "sha256", "dtype", "trained", "labels",
                "preprocessing", "thresholds", "metrics", "training_data", "data_licences", "intended_use",
                "references", "ood", "created", "evaluated_by"):
        assert key in card, key
    assert card["trained"] is True and card["labels"] == {"classes": ["Non-COVID", "COVID-19"]}
    assert card["sha256"] == registry.sha256_file(models / card["file"])
    assert 0.0 <= card["thresholds"]["COVID-19"] <= 1.0
    val = card["metrics"]["val"]["slice"]["pooled"]
    assert val["n"] == 8 and set(val["confusion"]) == {"tp", "fp", "tn", "fn"}
    assert {0.3, 0.5} <= {round(r["threshold"], 6) for r in val["sweep"]}
    assert card["ood"]["threshold"] > 0 and "val_slices" in card["ood"]["rejection"]
    assert "Research use only" in card["intended_use"]
    monkeypatch.setenv("CHESTVIEW_MODELS", str(models))
    registry.clear_cache()
    lm = registry.load_model("ct-inception")
    assert lm.trained and registry.sha256_file(lm.path) == card["sha256"]
    assert {"mean", "components", "variance"} <= set(lm.ood)
    registry.clear_cache()


def test_severity_calibration_folds_into_the_lung_opacity_row():
    """The calibrated logit, fed to the app's unchanged Cohen formula, reproduces the expert extent."""
    from engine.training.eval_severity import fold_affine, severity_calibration
    from engine.ai.models.densenet_xray import LUNG_OPACITY_INDEX, XRayDenseNet
    from engine.ai.severity import geographic_extent_linear

    rs = np.random.RandomState(0)
    z = rs.normal(0, 2, 30)
    geo = 0.6 * z + 4.0
    rows = [{"geographic_mean": f"{g:.6f}", "split": "train"} for g in geo] + [{"geographic_mean": "", "split": "val"}]
    logits = np.zeros((31, 21))
    logits[:30, LUNG_OPACITY_INDEX] = z
    cal = severity_calibration(rows, logits)
    assert cal is not None and cal["scale"] > 0
    zc = cal["scale"] * z + cal["shift"]
    assert np.allclose(geographic_extent_linear(zc), geo, atol=1e-6)
    torch.manual_seed(0)
    m = XRayDenseNet().eval()
    pooled = torch.rand(2, 1024)
    before = m.classifier(pooled)
    fold_affine(m, LUNG_OPACITY_INDEX, cal["scale"], cal["shift"])
    after = m.classifier(pooled)
    j = LUNG_OPACITY_INDEX
    assert torch.allclose(after[:, j], cal["scale"] * before[:, j] + cal["shift"], atol=1e-4)
    others = [k for k in range(after.shape[1]) if k != j]
    assert torch.equal(after[:, others], before[:, others])
    # no positive association -> no calibration
    assert severity_calibration([{"geographic_mean": f"{-g:.6f}", "split": "train"} for g in geo], logits[:30]) is None
