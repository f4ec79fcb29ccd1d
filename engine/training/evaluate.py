"""``python main.py evaluate MODEL_OR_RUN --data DIR [--split val|test] [--write-card]``.

Evaluates a training run folder (``run.json`` + ``best.safetensors``) or a shipped model
(``resources/models/<name>-<version>.json`` / ``.safetensors``) on the patient-level splits of
../shared/data, and with ``--write-card`` writes ``<name>-<version>.safetensors`` (fp16 when that
keeps the validation metrics) plus the JSON model card with ``trained: true``, the file's sha256,
metrics with 95% bootstrap CIs (patients resampled), per-source numbers, the validation-chosen
thresholds, severity agreement with the expert scores, shortcut probes and the OOD calibration.

Thresholds and every other choice use the validation split only; the X-ray test split is scored
once, for the card. The CT folder has no test split (held back by the project): CT numbers are
validation numbers and therefore optimistic. Research use only, not for diagnostic use.

This module is the command line; the work is in engine.training.eval_xray / eval_ct (one model each),
eval_model (loading, forward, fp16), eval_stats, eval_severity, eval_shortcuts and eval_ood (the
probes), and eval_cards (the card text). ``--labels FILE.csv`` hands over to
engine.training.local_validation (a site's own labelled images).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from engine import metrics as M
from engine.training.eval_ct import evaluate_ct
from engine.training.eval_model import load_for_eval
from engine.training.eval_xray import evaluate_xray

DEFAULT_VERSION = "1.0.0"


def evaluate(target: str, data: str, *, split: str = "val", write_card: bool = False, out_dir: str | None = None,
             version: str = DEFAULT_VERSION, ood_quantile: float = 0.99, threads: int = 2,
             max_train: int = 0) -> dict:
    """Evaluate ``target`` (run folder or card) on ``data``; the JSON-ready result, with ``card`` when written."""
    import torch

    from engine.paths import models_dir

    torch.set_num_threads(threads)
    model, info = load_for_eval(target)
    out = Path(out_dir) if out_dir else models_dir()
    if info["kind"] == "xray":
        res = evaluate_xray(model, info, Path(data), write_card, out, version, split, ood_quantile, max_train)
    else:
        res = evaluate_ct(model, info, Path(data), write_card, out, version, ood_quantile)
    return M.jsonable(res)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chestview evaluate", description="Evaluate a model or training run and "
                                "(with --write-card) write its weights + model card. Research use only.")
    p.add_argument("model", help="run folder (with run.json) or model card/safetensors in resources/models")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data"))
    p.add_argument("--split", choices=["val", "test"], default="val",
                   help="X-ray split to report (test is also scored when writing a card); CT has val only")
    p.add_argument("--write-card", action="store_true", help="write <name>-<version>.safetensors + .json")
    p.add_argument("--out", help="models folder for --write-card (default resources/models or $CHESTVIEW_MODELS)")
    p.add_argument("--version", default=DEFAULT_VERSION)
    p.add_argument("--ood-quantile", type=float, default=0.99)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-train", type=int, default=0,
                   help="X-ray: use at most N training images for the OOD fit / probes (0 = all; CPU budget)")
    p.add_argument("--json", help="also write the full result JSON here")
    return p


def _headline(res: dict) -> str:
    lines = []
    m = res["metrics"]
    for s in ("val", "test"):
        if s not in m:
            continue
        if res["kind"] == "xray":
            for lab, block in m[s].items():
                if lab == "three_class":
                    continue
                pooled = block["pooled"]
                ci = pooled["ci95"]["auc"]
                lines.append(f"{s:4s} {lab:16s} AUC {pooled['auc']} CI {ci} sens {pooled['sensitivity']} "
                             f"spec {pooled['specificity']} @thr {pooled['threshold']}")
        else:
            for lvl, block in m[s].items():
                b = block.get("pooled", block)
                lines.append(f"{s:4s} {lvl:18s} AUC {b['auc']} CI {b['ci95']['auc']} acc {b['accuracy']} "
                             f"sens {b['sensitivity']} spec {b['specificity']}")
    return "\n".join(lines)


def cli_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--labels" in argv or any(a.startswith("--labels=") for a in argv):
        from engine.training.local_validation import cli_main as local_main  # a site's own labelled data

        return local_main(argv)
    a = build_parser().parse_args(argv)
    t0 = time.time()
    res = evaluate(a.model, a.data, split=a.split, write_card=a.write_card, out_dir=a.out, version=a.version,
                   ood_quantile=a.ood_quantile, threads=a.threads, max_train=a.max_train)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(_headline(res))
    print("[evaluate] OOD rejection: " + json.dumps({k: v.get("rejection_rate", v.get("error"))
                                                     for k, v in res["ood"]["rejection"].items()
                                                     if k != "training_score_quantiles"}))
    if res.get("card"):
        print(f"[evaluate] wrote {res['card']}")
    print(f"[evaluate] done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
