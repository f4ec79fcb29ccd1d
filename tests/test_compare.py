"""`main.py compare` end to end on a tiny synthetic dataset laid out like shared/data/xray."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.training.compare import kmeans, run_compare


def _make_dataset(root: Path, n: int = 48) -> Path:
    rng = np.random.default_rng(0)
    d = root / "xray"
    (d / "images").mkdir(parents=True)
    labels = ["covid", "normal", "other_pneumonia"]
    rows = []
    for i in range(n):
        lab = labels[i % 3]
        img = rng.normal(110, 20, (40, 40))
        if lab == "covid":
            img[10:22, 10:22] += 120
        elif lab == "other_pneumonia":
            img[24:34, 20:32] += 60
        name = f"images/img{i:03d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / name, quality=95)
        split = ["train", "train", "val", "test"][(i // 3) % 4]
        rows.append({"path": name, "source": ["srcA", "srcB"][i % 2], "patient_id": f"p{i}", "label": lab,
                     "finding": lab, "view": "PA", "sex": "", "age": "", "license": "test", "original_path": name,
                     "split": split})
    with open(d / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def test_kmeans_separates_two_blobs() -> None:
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 0.1, (20, 3)), rng.normal(5, 0.1, (20, 3))])
    lab = kmeans(x, 2)
    assert len(set(lab[:20])) == 1 and len(set(lab[20:])) == 1 and lab[0] != lab[20]


def test_compare_end_to_end(tmp_path: Path) -> None:
    data = _make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    models = ["cnn22-alasfoor", "covidnet-wang", "detrac-abbas"]
    table = run_compare(str(data), str(out), models=models, size=32, epochs=2, batch=8, n_boot=50,
                        include_reference=False, cache_dir=tmp_path / "cache", log=lambda s: None)
    assert [r["name"] for r in table] == models
    for f in ["comparison.md", "comparison.csv", "comparison.json", "roc.png", "accuracy_vs_latency.png"]:
        assert (out / f).stat().st_size > 0, f
    md = (out / "comparison.md").read_text()
    assert "Research use only" in md and "other data" in md
    for m in models:
        assert m in md
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    splits = {r["split"] for r in rows}
    assert {"val", "test", "test:srcA", "test:srcB"} <= splits
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        assert int(r["tn"]) + int(r["fp"]) + int(r["fn"]) + int(r["tp"]) == int(r["n"])
        assert float(r["params"]) > 0 and float(r["cpu_latency_ms"]) > 0
    meta = json.loads((out / "comparison.json").read_text())["meta"]
    assert meta["n_train"] + meta["n_val"] + meta["n_test"] == 48
    # The cached runs are reused on a second call (no retraining: same scores).
    table2 = run_compare(str(data), str(out), models=models[:1], size=32, epochs=2, batch=8, n_boot=50,
                         include_reference=False, cache_dir=tmp_path / "cache", log=lambda s: None)
    assert table2[0]["eval"]["test"]["auc"] == pytest.approx(table[0]["eval"]["test"]["auc"])
