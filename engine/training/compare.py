"""``python main.py compare --data DIR --out DIR``: the source papers' systems on one split (README: The papers' model zoo).

Every zoo model (engine.training.zoo.architectures.ZOO) is trained with the same patient-level split,
seed, augmentation, source-balanced sampling and sample budget through engine.training.train.fit, then all
models — plus our shipped DenseNet-121 as the reference row — are evaluated on the validation
split, the test split and each test source with the same metrics (engine.metrics, 95% patient-level
bootstrap CIs), a DeLong test against the reference, parameters, FLOPs, CPU latency per image and
training time. Task for the table: COVID-19 vs not-COVID (every model yields P(COVID)); the
operating threshold of each model is chosen on validation (Youden) and then applied to test.
Runs are cached in OUT/runs/ and reused. Research use only, not for diagnostic use.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

# Figures each paper reports on its OWN data (not comparable with ours); None = not recorded here.
REPORTED: dict[str, dict[str, str]] = {
    "vgg16-szalay": {"reported": "not recorded here (see the paper)"},
    "cnn22-alasfoor": {"reported": "not recorded here (see the paper)"},
    "cnnlstm-islam": {"reported": "accuracy 99.4%, AUC 0.999, sensitivity 99.3%, specificity 99.2% (Islam et al. 2020)"},
    "cnnrnn-bargavi": {"reported": "not recorded here (see the paper)"},
    "covidnet-wang": {"reported": "accuracy 93.3%, COVID-19 sensitivity 91.0% (Wang and Wong 2020, COVIDx)"},
    "detrac-abbas": {"reported": "accuracy 93.1%, sensitivity 100% (Abbas et al. 2021)"},
    "xray-densenet121": {"reported": "ours (reference)"},
    "ct-inception": {"reported": "accuracy 89.5% internal / 79.3% external (Wang et al. 2020, M-Inception)"},
}


def p_covid(name: str, model, logits) -> np.ndarray:
    """P(COVID-19) from a zoo model's output, whatever its class set."""
    import torch

    from engine.training.zoo.architectures import BINARY, ZOO

    spec = ZOO[name]
    if spec.decomposition:
        return model.compose(logits)[:, spec.classes.index("COVID-19")].numpy()
    idx = spec.classes.index("COVID-19")
    if spec.classes == BINARY:
        idx = 1
    return torch.softmax(logits, 1)[:, idx].numpy()


def _targets(name: str, rows: list[dict[str, str]]) -> np.ndarray:
    """Training targets in the model's own class set; -1 = not used for training."""
    from engine.training.zoo.architectures import BINARY, ZOO

    spec = ZOO[name]
    if spec.classes == BINARY:
        return np.array([1 if r["label"] == "covid" else 0 for r in rows])
    m = {"covid": 0, "other_pneumonia": 1, "normal": 2, "other_finding": -1}
    return np.array([m[r["label"]] for r in rows])


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Plain k-means (k-means++ init) for DeTraC's class decomposition."""
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min([((x - c) ** 2).sum(1) for c in centers], axis=0)
        centers.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))])
    c = np.stack(centers)
    lab = np.zeros(len(x), dtype=int)
    for _ in range(iters):
        lab = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        new = np.stack([x[lab == j].mean(0) if (lab == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return lab


def train_zoo_model(name: str, ds, run_dir: Path, *, epochs: int, batch: int, lr: float, seed: int,
                    threads: int, reuse: bool, log: Callable[[str], None],
                    samples_per_epoch: int = 0) -> tuple[object, dict]:
    """Train (or reload from ``run_dir``) one zoo model with the shared recipe."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from engine import metrics as M
    from engine.training.datasets import source_balanced_weights
    from engine.training.train import TrainConfig, augment_batch, fit, predict, set_seed
    from engine.training.zoo.architectures import ZOO

    spec = ZOO[name]
    set_seed(seed)
    model = spec.build()
    if name == "cnnrnn-bargavi":
        _load_chest_backbone(model, log)
    tr_all = ds.indices("train")
    y_all = _targets(name, [ds.rows[i] for i in tr_all])
    tr = tr_all[y_all >= 0]
    y = torch.as_tensor(y_all[y_all >= 0], dtype=torch.long)
    rows_tr = [ds.rows[i] for i in tr]
    weights = source_balanced_weights(rows_tr, power=0.5)
    va = ds.indices("val")
    yv = np.array([ds.rows[i]["label"] == "covid" for i in va], dtype=int)
    xv = ds.x[va]
    hist_path = run_dir / "history.json"
    best = run_dir / "best.safetensors"
    if reuse and best.is_file() and hist_path.is_file() and (run_dir / "done").is_file():
        model.load_state_dict(load_file(str(best)))
        log(f"[compare] {name}: reusing cached run {run_dir}")
        return model, json.loads(hist_path.read_text())

    def evaluate(m):
        return M.roc_auc(yv, p_covid(name, m, predict(m, xv))), {}

    def aug(xb, generator=None):
        return augment_batch(xb, generator=generator)

    cfg = TrainConfig(epochs=epochs, batch=batch, lr=lr, seed=seed, threads=threads, patience=max(3, epochs),
                      log_every=0, samples_per_epoch=samples_per_epoch, extra={"model": name})
    t0 = time.time()
    if spec.decomposition:
        # DeTraC: (1) train on the original classes through the composition layer, (2) decompose each
        # class into k sub-classes by k-means on the learned features, (3) train on the sub-classes.
        k = model.k

        def loss_composed(m, xb, idx):
            return F.nll_loss(torch.log(m.compose(m(xb)) + 1e-7), y[idx])

        warm = TrainConfig(**{**cfg.__dict__, "epochs": max(1, epochs // 3)})
        fit(model, ds.x[tr], loss_composed, evaluate, warm, run_dir / "phase1", weights=weights, augment=aug,
            log=log)
        model.eval()
        with torch.no_grad():
            emb = torch.cat([model.embed(ds.x[tr][i:i + 32].float()) for i in range(0, len(tr), 32)]).numpy()
        sub = np.zeros(len(tr), dtype=int)
        for c in range(len(spec.classes)):
            sel = (y.numpy() == c)
            if sel.sum() >= k:
                sub[sel] = c * k + kmeans(emb[sel], k, seed)
            else:
                sub[sel] = c * k
        ysub = torch.as_tensor(sub, dtype=torch.long)
        log(f"[compare] detrac: sub-class sizes {np.bincount(sub, minlength=len(spec.classes) * k).tolist()}")

        def loss_fn(m, xb, idx):
            return F.cross_entropy(m(xb), ysub[idx])

        cfg2 = TrainConfig(**{**cfg.__dict__, "epochs": epochs - warm.epochs})
        hist = fit(model, ds.x[tr], loss_fn, evaluate, cfg2, run_dir, weights=weights, augment=aug, log=log)
    else:
        def loss_fn(m, xb, idx):
            return F.cross_entropy(m(xb), y[idx])

        hist = fit(model, ds.x[tr], loss_fn, evaluate, cfg, run_dir, weights=weights, augment=aug, log=log)
    hist["wall_seconds"] = time.time() - t0
    hist_path.write_text(json.dumps(hist, indent=1, default=float))
    model.load_state_dict(load_file(str(best)))
    (run_dir / "done").write_text("ok")
    return model, hist


def _load_chest_backbone(model, log: Callable[[str], None]) -> None:
    """Bargavi's 'pretrained CNN': our trained DenseNet-121 features when a trained card exists."""
    try:
        from engine.ai.models.registry import load_model

        lm = load_model("xray-densenet121")
        if getattr(lm.info, "trained", False):
            model.backbone.load_state_dict(lm.module.features.state_dict())
            log("[compare] cnnrnn-bargavi: backbone = our trained DenseNet-121 features")
            return
    except Exception as exc:  # noqa: BLE001 - any registry problem means: no trained backbone
        log(f"[compare] cnnrnn-bargavi: no trained DenseNet-121 ({exc}); backbone stays random (frozen)")
        return
    log("[compare] cnnrnn-bargavi: DenseNet-121 is untrained; backbone stays random (frozen)")


def cpu_latency_ms(model, size: int, channels: int = 1, repeats: int = 10) -> float:
    """Median CPU latency of one image (batch 1), after one warm-up call."""
    import torch

    model.eval()
    x = torch.zeros(1, channels, size, size)
    with torch.no_grad():
        model(x)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            ts.append((time.perf_counter() - t) * 1000)
    return float(np.median(ts))


_DATA_HINT: list[str] = [""]


def _reference_scores(ds, size: int, log: Callable[[str], None]):
    """Our shipped DenseNet-121 (trained card) as the reference row, or None when untrained."""
    import torch

    from engine.training.train import predict

    try:
        from engine.ai.models.registry import load_model

        lm = load_model("xray-densenet121")
    except Exception as exc:  # noqa: BLE001
        log(f"[compare] reference DenseNet-121 unavailable: {exc}")
        return None
    if not getattr(lm.info, "trained", False):
        log("[compare] reference DenseNet-121 is untrained: no reference row")
        return None
    model = lm.module.float().eval()
    native = int((lm.card.get("preprocessing") or {}).get("input_size") or 224)
    x = ds.x
    if size != native:
        # The reference sees its own preprocessing (prepare_xray at its native size), same images and order.
        from engine.training.datasets import load_xray_set

        x = load_xray_set(ds.info.get("data") or _DATA_HINT[0], size=native, progress=False).x
    p = torch.softmax(predict(model, x)["covid"], 1)[:, 0].numpy()
    return model, p, lm.card


def evaluate_scores(name: str, p: np.ndarray, ds, n_boot: int) -> dict:
    """Val-chosen threshold; metrics with patient-level CIs on val, test and each test source."""
    from engine import metrics as M

    out: dict = {}
    va, te = ds.indices("val"), ds.indices("test")
    y = np.array([r["label"] == "covid" for r in ds.rows], dtype=int)
    groups = np.array([r["patient_id"] for r in ds.rows])
    thr = M.youden_threshold(y[va], p[va])
    out["threshold"] = thr
    out["val"] = M.binary_report_ci(y[va], p[va], thr, groups=groups[va], n_boot=n_boot)
    out["test"] = M.binary_report_ci(y[te], p[te], thr, groups=groups[te], n_boot=n_boot)
    out["test_sources"] = {}
    for src in sorted({ds.rows[i]["source"] for i in te}):
        idx = te[np.array([ds.rows[i]["source"] == src for i in te])]
        out["test_sources"][src] = M.binary_report_ci(y[idx], p[idx], thr, groups=groups[idx], n_boot=n_boot)
    return out


def _fmt(rep: dict, key: str) -> str:
    v = rep.get(key)
    ci = rep.get("ci95", {}).get(key, [None, None])
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    if ci[0] is None:
        return f"{v:.3f}"
    return f"{v:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def write_outputs(out: Path, table: list[dict], scores: dict[str, np.ndarray], ds, meta: dict) -> None:
    """comparison.csv, comparison.md, roc.png, accuracy_vs_latency.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engine import metrics as M

    keys = ["accuracy", "sensitivity", "specificity", "ppv", "f1", "auc"]
    with open(out / "comparison.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "split", *keys, *[f"{k}_ci_low" for k in keys], *[f"{k}_ci_high" for k in keys],
                    "threshold", "tn", "fp", "fn", "tp", "n", "params", "flops", "cpu_latency_ms",
                    "train_seconds", "delong_p_vs_reference", "reported_on_other_data"])
        for row in table:
            for split, rep in [("val", row["eval"]["val"]), ("test", row["eval"]["test"]),
                               *[(f"test:{s}", r) for s, r in row["eval"]["test_sources"].items()]]:
                cm = rep["confusion"]
                w.writerow([row["name"], split, *[rep.get(k) for k in keys],
                            *[rep["ci95"][k][0] for k in keys], *[rep["ci95"][k][1] for k in keys],
                            row["eval"]["threshold"], cm["tn"], cm["fp"], cm["fn"], cm["tp"], rep["n"],
                            row["params"], row["flops"], row["latency_ms"], row["train_seconds"],
                            row.get("delong_p"), REPORTED.get(row["name"], {}).get("reported", "")])
    lines = ["# Model zoo: the source papers' systems on one split", "",
             "Research use only, not for diagnostic use. Task: COVID-19 vs not-COVID chest X-ray.",
             f"Data: {meta['data']} (patient-level split from labels.csv; train {meta['n_train']}, "
             f"val {meta['n_val']}, test {meta['n_test']} images). Input {meta['size']} px; "
             f"{meta['epochs']} epochs of {meta['samples_per_epoch']} samples, batch {meta['batch']}, same seed "
             f"({meta['seed']}), augmentation and "
             "source-balanced sampling for every model; thresholds chosen on validation (Youden), applied to test.",
             f"Measured on: {meta['device']}. 95% CIs: patient-level bootstrap ({meta['n_boot']} resamples). "
             "p: two-sided DeLong test of test AUC against the reference row (our shipped DenseNet-121).", "",
             "| model | test AUC | test acc | sens | spec | PPV | F1 | val AUC | params | GFLOPs | CPU ms/img "
             "| train s | p vs ref | paper's own figure (other data!) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        t, v = row["eval"]["test"], row["eval"]["val"]
        p = row.get("delong_p")
        ts = f"{row['train_seconds']:.0f}" if row["train_seconds"] else "—"
        lines.append(
            f"| {row['name']} | {_fmt(t, 'auc')} | {_fmt(t, 'accuracy')} | {_fmt(t, 'sensitivity')} | "
            f"{_fmt(t, 'specificity')} | {_fmt(t, 'ppv')} | {_fmt(t, 'f1')} | {_fmt(v, 'auc')} | "
            f"{row['params'] / 1e6:.1f} M | {row['flops'] / 1e9:.2f} | {row['latency_ms']:.0f} | "
            f"{ts} | {'—' if p is None else f'{p:.3g}'} | "
            f"{REPORTED.get(row['name'], {}).get('reported', '')} |")
    lines += ["", "## Per test source (AUC, sensitivity, specificity)", "",
              "| model | " + " | ".join(sorted(table[0]["eval"]["test_sources"])) + " |",
              "|---|" + "---|" * len(table[0]["eval"]["test_sources"])]
    for row in table:
        cells = []
        for s in sorted(row["eval"]["test_sources"]):
            r = row["eval"]["test_sources"][s]
            cells.append(f"AUC {_fmt(r, 'auc')}; sens {_fmt(r, 'sensitivity')}; spec {_fmt(r, 'specificity')} "
                         f"(n={r['n']}, pos={r['n_pos']})")
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines += ["", "## What this means and does not mean", "",
              "- All rows share one split, one budget and one preprocessing; differences whose DeLong p is "
              "large (or whose CIs overlap) are noise, not a ranking.",
              "- The sources are confounded with the labels (almost all COVID images are web/paper figures; "
              "most normals come from one hospital archive). A high pooled AUC can mean the model recognises "
              "the source; read the per-source rows (a source with only one class has no AUC).",
              "- The papers' own figures were measured on their own, different data and are not comparable.",
              "- Departures from each paper (no ImageNet weights here, reduced sizes) are listed below.", ""]
    from engine.training.zoo.architectures import ZOO

    for name, spec in ZOO.items():
        lines.append(f"- **{name}**: {spec.paper}. Departures: {spec.departures}.")
    (out / "comparison.md").write_text("\n".join(lines) + "\n")

    te = ds.indices("test")
    y = np.array([ds.rows[i]["label"] == "covid" for i in te], dtype=int)
    fig, ax = plt.subplots(figsize=(6, 6))
    for name, p in scores.items():
        fpr, tpr, _ = M.roc_curve(y, p[te])
        ax.plot(np.r_[0, fpr, 1], np.r_[0, tpr, 1], label=f"{name} (AUC {M.roc_auc(y, p[te]):.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("COVID-19 vs not-COVID, test split (research use only)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in table:
        ax.scatter(row["latency_ms"], row["eval"]["test"]["accuracy"])
        ax.annotate(row["name"], (row["latency_ms"], row["eval"]["test"]["accuracy"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("CPU latency per image (ms, batch 1, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs latency (research use only)")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_latency.png", dpi=120)
    plt.close(fig)


def run_compare(data: str, out: str, *, models: list[str] | None = None, size: int = 224, epochs: int = 6,
                batch: int = 16, lr: float = 1e-3, seed: int = 0, threads: int = 2, n_boot: int = 1000,
                samples_per_epoch: int = 0,
                reuse: bool = True, include_reference: bool = True, cache_dir: Path | None = None,
                log: Callable[[str], None] = print) -> list[dict]:
    import platform

    import torch

    from engine.training.datasets import load_xray_set
    from engine.training.splits import check_no_patient_leak
    from engine.training.train import predict
    from engine.training.zoo.architectures import ZOO, count_flops, count_parameters
    from engine.training.zoo.significance import delong_test

    torch.set_num_threads(threads)
    outp = Path(out)
    (outp / "runs").mkdir(parents=True, exist_ok=True)
    ds = load_xray_set(data, size=size, cache_dir=cache_dir, progress=False)
    _DATA_HINT[0] = data
    check_no_patient_leak(ds.rows)
    names = models or list(ZOO)
    table: list[dict] = []
    scores: dict[str, np.ndarray] = {}
    ref = _reference_scores(ds, size, log) if include_reference else None
    for name in names:
        run_dir = outp / "runs" / f"{name}-s{size}-e{epochs}x{samples_per_epoch or 'all'}-b{batch}-seed{seed}"
        log(f"[compare] {name}: training ({epochs} epochs, size {size})")
        model, hist = train_zoo_model(name, ds, run_dir, epochs=epochs, batch=batch, lr=lr, seed=seed,
                                      threads=threads, reuse=reuse, log=log, samples_per_epoch=samples_per_epoch)
        model.eval()
        p = p_covid(name, model, predict(model, ds.x))
        scores[name] = p
        table.append({"name": name, "eval": evaluate_scores(name, p, ds, n_boot),
                      "params": count_parameters(model), "flops": count_flops(model, size),
                      "latency_ms": cpu_latency_ms(model, size),
                      "train_seconds": float(hist.get("wall_seconds", hist.get("train_seconds", 0.0)))})
        log(f"[compare] {name}: test AUC {table[-1]['eval']['test']['auc']:.3f}")
    if ref is not None:
        rmodel, rp, card = ref
        scores["xray-densenet121"] = rp
        table.append({"name": "xray-densenet121", "eval": evaluate_scores("xray-densenet121", rp, ds, n_boot),
                      "params": count_parameters(rmodel), "flops": count_flops(_XrvCovid(rmodel), 224),
                      "latency_ms": cpu_latency_ms(_XrvCovid(rmodel), 224),
                      "train_seconds": float(card.get("training", {}).get("train_seconds", 0.0) or 0.0),
                      "note": f"shipped weights {card.get('version', '?')}"})
        te = ds.indices("test")
        y = np.array([ds.rows[i]["label"] == "covid" for i in te], dtype=int)
        for row in table[:-1]:
            row["delong_p"] = delong_test(y, scores[row["name"]][te], rp[te]).p_value
    meta = {"data": str(Path(data).resolve()), "size": size, "epochs": epochs, "batch": batch, "seed": seed,
            "samples_per_epoch": samples_per_epoch or "all training images",
            "n_boot": n_boot, "n_train": len(ds.indices("train")), "n_val": len(ds.indices("val")),
            "n_test": len(ds.indices("test")),
            "device": f"CPU ({platform.processor() or platform.machine()}, {threads} threads), torch {torch.__version__}"}
    write_outputs(outp, table, scores, ds, meta)
    from engine.metrics import jsonable

    (outp / "comparison.json").write_text(json.dumps(jsonable({"meta": meta, "rows": table}), indent=1))
    log(f"[compare] wrote {outp / 'comparison.md'}")
    return table


class _XrvCovid:
    """Adapter so FLOP/latency counters can call the DenseNet like a zoo model."""

    def __init__(self, model) -> None:
        self.model = model

    def eval(self):
        self.model.eval()
        return self

    def __call__(self, x):
        return self.model(x)["covid"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chestview compare", description="Train and compare the source papers' "
                                "systems on one patient-level split (research use only).")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data"))
    p.add_argument("--out", required=True)
    p.add_argument("--models", nargs="*", help="subset of: " + ", ".join(__import__(
        "engine.training.zoo.architectures", fromlist=["ZOO"]).ZOO))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--samples-per-epoch", type=int, default=0, help="sampled training images per epoch (0 = all)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--no-reuse", action="store_true", help="retrain even when a cached run exists")
    p.add_argument("--no-reference", action="store_true", help="skip the shipped DenseNet-121 reference row")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    run_compare(a.data, a.out, models=a.models, size=a.size, epochs=a.epochs, batch=a.batch, lr=a.lr,
                samples_per_epoch=a.samples_per_epoch,
                seed=a.seed, threads=a.threads, n_boot=a.n_boot, reuse=not a.no_reuse,
                include_reference=not a.no_reference, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
