"""Model cards for the X-ray DenseNet and the CT Inception: what the card says about the model's data,
preprocessing, metrics, limits and licences, written next to the weights by
engine.ai.models.registry.write_card.

Model cards after Mitchell et al., "Model Cards for Model Reporting", FAT* 2019; the keys are the
ones engine.ai.models.registry reads and the app shows. Research use only, not for diagnostic use.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine import metrics as M
from engine.training.eval_model import CT_NAME, XRAY_NAME
from engine.training.eval_severity import severity_ok

XRAY_REFERENCES = [
    "Huang G, Liu Z, van der Maaten L, Weinberger KQ. Densely Connected Convolutional Networks. CVPR 2017.",
    "Cohen JP, Viviano JD, Bertin P, et al. TorchXRayVision: A library of chest X-ray datasets and models. "
    "MIDL 2022 (arXiv:2111.00595) - layout, preprocessing and pathology names.",
    "Cohen JP, Dao L, Roth K, et al. Predicting COVID-19 Pneumonia Severity on Chest X-ray With Deep Learning. "
    "Cureus 2020;12(7):e9448 (arXiv:2005.11856) - severity formula and expert scores.",
    "Cohen JP, Morrison P, Dao L. COVID-19 image data collection. arXiv:2003.11597 (2020).",
    "Wang X, Peng Y, Lu L, et al. ChestX-ray8. CVPR 2017 (NIH Clinical Center data).",
    "DeGrave AJ, Janizek JD, Lee S-I. AI for radiographic COVID-19 detection selects shortcuts over signal. "
    "Nat Mach Intell 2021;3:610-619 - why per-source metrics are reported.",
]
CT_REFERENCES = [
    "Szegedy C, et al. Going deeper with convolutions (GoogLeNet/Inception v1). CVPR 2015.",
    "Wang S, Kang B, Ma J, et al. A deep learning algorithm using CT images to screen for Corona Virus Disease "
    "(COVID-19). Eur Radiol 2021;31:6096-6104 (M-Inception; reported internal acc 89.5%, external 79.3%).",
    "Zhao J, Zhang Y, He X, Xie P. COVID-CT-Dataset: a CT scan dataset about COVID-19. arXiv:2003.13865 (2020).",
    "Li L, et al. Artificial intelligence distinguishes COVID-19 from community acquired pneumonia on chest CT "
    "(COVNet, max-pooled slice features). Radiology 2020;296:E65-E71.",
]
CT_COPYRIGHT = ("COVID-CT (UCSD-AI4H): \"The images are collected from COVID19-related papers from medRxiv, bioRxiv, "
                "NEJM, JAMA, Lancet, etc. CTs containing COVID-19 abnormalities are selected by reading the figure "
                "captions in the papers. All copyrights of the data belong to the authors and publishers of these "
                "papers.\" No licence granted; used for research only.")
XRAY_LICENCES = [
    "ieee8023/covid-chestxray-dataset: per-image licences (CC BY-NC-SA, CC BY 3.0/4.0, CC BY-NC-ND, CC BY-SA, "
    "'authorized for everyone', unspecified); metadata CC BY-NC-SA 4.0; severity scores CC BY-SA. Non-commercial "
    "and no-derivatives terms apply to some training images.",
    "Figure1 COVID-19 Chest X-ray Dataset Initiative (agchung): no licence stated; 'research purposes only'.",
    "NIH ChestX-ray8/14 (via muhammedtalo/COVID-19 re-hosting, no LICENSE): NIH states no restrictions, asks for "
    "attribution (NIH Clinical Center; Wang et al. CVPR 2017).",
]

CT_SELECTION_RULE = ("declared before training: the epoch with the highest validation slice AUC (earliest on ties; "
                     "engine.training.train.ct_task); operating threshold = Youden J on the validation slices")


# ---------------------------------------------------------------- shared
def _counts(rows, keys=("source", "label", "split")) -> dict:
    """Image counts per combination of ``keys`` (e.g. "ieee8023/covid/train")."""
    from collections import Counter

    c = Counter(tuple(r[k] for k in keys) for r in rows)
    return {"/".join(k): v for k, v in sorted(c.items())}


_RUN_KEYS = ("config", "n_train", "started", "finished", "best_epoch", "epochs_run", "train_seconds", "stopped",
             "balance", "size", "seed", "init")


def _training_summary(info: dict) -> dict:
    """The run's settings and timing; for a progressive-resizing run also the earlier stage(s)."""
    run = info.get("run") or {}
    out = {k: run.get(k) for k in _RUN_KEYS if k in run} | {"run_dir": info.get("run_dir")}
    stages = []
    init = run.get("init")
    while init and (Path(init).parent / "run.json").is_file() and len(stages) < 5:
        prev = json.loads((Path(init).parent / "run.json").read_text())
        stages.append({k: prev.get(k) for k in _RUN_KEYS if k in prev} | {"run_dir": str(Path(init).parent)})
        init = prev.get("init")
    if stages:
        out["earlier_stages"] = stages
        out["total_train_seconds"] = float(run.get("train_seconds") or 0) + sum(
            float(st.get("train_seconds") or 0) for st in stages)
    return out


# ---------------------------------------------------------------- X-ray
def write_xray_card(model, info, ds, thresholds, metrics, ood, tensors, out_dir: Path, version: str,
                    dtype: str, f16: dict) -> Path:
    """Weights + card of the X-ray DenseNet; only the two trained pathology outputs are marked supported."""
    from engine.ai.models import registry
    from engine.ai.models.densenet_xray import COVID_CLASSES, XRV_PATHOLOGIES

    run = info.get("run") or {}
    trained = ["Pneumonia", "Lung Opacity"]
    card_thresholds = {"COVID-19": thresholds["COVID-19"], "Other pneumonia": thresholds["Other pneumonia"],
                       "Pneumonia": thresholds["Pneumonia"], "Lung Opacity": thresholds["Lung Opacity"]}
    card = dict(
        preprocessing={"text": "displayed grayscale in [0,1] (default VOI, MONOCHROME1 inverted; training JPEGs /255) "
                               "-> largest centred square -> resize to 224 (area) -> (2x-1)*1024, torchxrayvision "
                               "range; engine.ai.preprocess.xray.prepare_xray, identical in training and inference",
                       "input_size": 224, "channels": 1, "range": [-1024, 1024], "function": "engine.ai.preprocess.xray.prepare_xray"},
        thresholds=card_thresholds,
        outputs={"pathologies": {n: {"supported": n in trained, "threshold": card_thresholds.get(n)}
                                 for n in XRV_PATHOLOGIES},
                 "covid": {n: {"supported": True, "threshold": card_thresholds.get(n)} for n in COVID_CLASSES},
                 "note": "Only Pneumonia and Lung Opacity of the 18 torchxrayvision outputs were trained (the other 16 "
                         "had no labels and were masked out of the loss): they must never be shown as findings. "
                         "'Normal' is reported through the 3-class head but has no finding threshold."},
        severity={"enabled": severity_ok(metrics.get("severity", {})), "logit": "Lung Opacity",
                  "enable_rule": "enabled only when the train-split calibration was applied and the held-out "
                                 "(val+test) Pearson r of the geographic extent is >= 0.5", "formula": "Cohen et al. 2020 constants (engine.ai.severity)",
                  "evaluation": metrics.get("severity", {}),
                  "calibration": metrics.get("severity", {}).get("calibration"),
                  "caveat": "The Lung Opacity logit was trained as opacity present/absent on our labels, then affinely "
                            "calibrated (folded into the weights) on the train-split expert extent scores; check the "
                            "held-out numbers before trusting the 0-8 / 0-6 scores."},
        metrics=metrics,
        training_data={"folder": "shared/data/xray (labels.csv, severity.csv)", "split": "patient-level train/val/test as "
                       "given in labels.csv (~70/15/15, stratified by source and label); thresholds and epoch chosen "
                       "on val; test scored once for this card", "counts": _counts(ds.rows),
                       "label_mapping": {"COVID-19 head": "covid -> COVID-19, other_pneumonia -> Other pneumonia, "
                                         "normal -> Normal, other_finding masked",
                                         "Pneumonia": "covid+other_pneumonia positive, normal negative, other_finding masked",
                                         "Lung Opacity": "covid+other_pneumonia+other_finding positive, normal negative"},
                       "mitigation": "source-balanced sampling: classes equally likely, sources within a class drawn "
                                     "in proportion to sqrt(count); contrast/gamma and small affine augmentation",
                       "compute": "trained from random initialisation (no pretrained weights available) on a shared "
                                  "2-core CPU with bfloat16 autocast under a fixed wall-clock budget; best epoch by "
                                  "validation 0.5*AUC(COVID pooled) + 0.5*AUC(COVID within ieee8023)",
                       **_training_summary(info)},
        data_licences=XRAY_LICENCES,
        references=XRAY_REFERENCES,
        ood=ood,
        fp16_check={k: v for k, v in f16.items()},
        limitations=["Trained from scratch on ~950 images on a CPU for about an hour: far weaker than published models.",
                     "COVID-19 images come almost only from web/paper-figure sources and most normal/pneumonia images "
                     "from one NIH archive: pooled metrics overstate disease detection; read the per-source numbers "
                     "(ieee8023 is the only source with both COVID and non-COVID images).",
                     "No external test set was available here.",
                     "Severity (Cohen et al. formula on the Lung Opacity logit) is disabled unless it passed the "
                     "enable rule in 'severity'; see metrics.severity for the agreement with the expert scores."],
        evaluated_by="python main.py evaluate (engine/training/evaluate.py)",
        source=f"trained by ChestView (engine/training/train.py), run {run.get('started', '?')}",
    )
    state = {k: v for k, v in model.state_dict().items()}
    return _public(registry.write_card(out_dir, name=XRAY_NAME, version=version, state_dict=state, trained=True,
                               labels={"pathologies": list(XRV_PATHOLOGIES), "covid": list(COVID_CLASSES)},
                               architecture="XRayDenseNet", arch_params={}, dtype=dtype, ood_tensors=tensors,
                               **M.jsonable(card)))


def _public(card_path: Path) -> Path:
    """Shipped files are world-readable (the safetensors temp file is created 0600)."""
    card = json.loads(Path(card_path).read_text())
    for p in (Path(card_path), Path(card_path).parent / card["file"]):
        p.chmod(0o644)
    return Path(card_path)


# ---------------------------------------------------------------- CT
def write_ct_card(model, info: dict, rows: list[dict], thr: float, metrics: dict, ood: dict, tensors,
                  f16: dict, out_dir: Path, version: str, size: int, top_k: int, dtype: str) -> Path:
    """Weights + card of the CT Inception (``rows``: every slice of the CT set, for the counts)."""
    from engine.ai.ct_verdict import MIN_OPACITY_PERCENT
    from engine.ai.models import registry
    from engine.ai.models.inception_ct import CT_CLASSES
    from engine.ai.preprocess.ct_input import NORM_PERCENTILES, PREPROCESSING_ID

    run = info.get("run") or {}
    card = dict(
        preprocessing={"id": PREPROCESSING_ID,
                       "function": "engine.ai.preprocess.ct_input.prepare_ct_slice (training: "
                                   "engine.training.datasets.encode_ct_slice + ct_batch_input; app: "
                                   "engine.ai.analysis.Analyzer._ct_input)",
                       "text": "lung-window grey [0,1] (DICOM: HU -> window -600/1500; COVID-CT figures: PNG/255, "
                               "already windowed) -> lung mask (DICOM: the slice of the 3-D lung ROI; figures: "
                               "2-D threshold + components, engine.ai.preprocess.ct_input.figure_lung_mask), closed "
                               "and hole-filled the same way -> crop to the mask box + 6% margin -> resize -> "
                               f"per-lung percentile normalisation ({NORM_PERCENTILES[0]:g}th..{NORM_PERCENTILES[1]:g}th "
                               "percentile of the lung pixels -> [0,1]) -> outside the lungs set to the minimum "
                               "-> x*2-1, grey replicated in 3 channels",
                       "training_augmentation": "affine (rotation +-10 deg, zoom 0.9-1.1, shift 6%, horizontal "
                                                "flip) on grey and mask together; re-rendering of the crop before "
                                                "normalisation: random window centre/width, gamma 0.6-1.6, "
                                                "resolution 35-90% down and up, Gaussian blur, noise, 8-bit "
                                                "quantisation or JPEG quality 25-95 (engine.ai.preprocess.ct_input)",
                       "input_size": size, "channels": 3, "range": [-1, 1], "lung_window": [-600, 1500]},
        thresholds={"COVID-19": thr},
        aggregation={"method": "mean of top-k slice probabilities", "k": top_k},
        study_verdict={"module": "engine.ai.ct_verdict", "min_opacity_percent": MIN_OPACITY_PERCENT,
                       "rule": "COVID-19 flag only when the study probability >= threshold AND ground glass + "
                               "consolidation (engine.ai.ct_quant total_opacity_percent) >= min_opacity_percent of "
                               "the lung volume; never on a single slice or without a measured lung volume "
                               "(single slices: 'slice classifier only, no volume')",
                       "threshold_justification": "1% of lung volume = one lobe (about a fifth of the lungs) at "
                                                  "the CT-severity-score 1/2 boundary of 5% involvement (Pan et al. "
                                                  "Radiology 2020; Chung et al. Radiology 2020); fixed before the "
                                                  "specificity check, not tuned on it"},
        metrics=metrics,
        training_data={"folder": "shared/data/ct (slices.csv)", "split": "official COVID-CT patient-level "
                       "train/val (the official test split is held back); training on train only, selection "
                       "and threshold on val", "counts": _counts(rows, ("label", "split")),
                       "mitigation": "lung mask + per-lung intensity normalisation (removes overall brightness, "
                                     "window and everything outside the lungs), rendering augmentation so figure "
                                     "and DICOM renderings overlap, sqrt source-balanced sampling over "
                                     "covid/medpix/crawled",
                       "compute": "GoogLeNet initialised from ct-inception 1.0.0, fine-tuned on a shared 2-core "
                                  "CPU (1 torch thread) under a fixed wall-clock budget",
                       "selection_rule": CT_SELECTION_RULE,
                       **_training_summary(info)},
        data_licences=[CT_COPYRIGHT],
        references=CT_REFERENCES + [
            "Pan F, Ye T, Sun P, et al. Time course of lung changes at chest CT during recovery from coronavirus "
            "disease 2019 (COVID-19). Radiology 2020;295:715-721 (CT severity score).",
            "Chung M, Bernheim A, Mei X, et al. CT imaging features of 2019 novel coronavirus (2019-nCoV). "
            "Radiology 2020;295:202-207."],
        ood=ood, fp16_check=f16,
        limitations=["Trained on 2-D slices cut from paper figures (no HU, varied windows), applied to HU "
                     "volumes at inference; the shared preprocessing narrows but does not remove this gap and "
                     "the validation numbers do not measure it (see specificity_check).",
                     "COVID slices come from papers (PNG), non-COVID from MedPix/crawled pages: source shortcut risk.",
                     "Validation-only numbers (used for selection: optimistic); the official test split is held back.",
                     "The study verdict needs the HU quantification of a volume: single slices are never flagged."],
        evaluated_by="python main.py evaluate (engine/training/evaluate.py)",
        source=f"trained by ChestView (engine/training/train.py), run {run.get('started', '?')}",
    )
    card_path = _public(registry.write_card(
        out_dir, name=CT_NAME, version=version, state_dict=dict(model.state_dict()), trained=True,
        labels={"classes": list(CT_CLASSES)}, architecture="CTInception",
        arch_params={"variant": getattr(model, "variant", "googlenet"), "input_size": size}, dtype=dtype,
        ood_tensors=tensors, **M.jsonable(card)))
    return card_path


def update_card_json(card_path: Path, **fields: Any) -> None:
    """Add keys to a written card (weights and their sha256 untouched), atomically."""
    card = json.loads(Path(card_path).read_text(encoding="utf-8"))
    card.update(M.jsonable(fields))
    tmp = Path(card_path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2), encoding="utf-8")
    tmp.replace(card_path)
    Path(card_path).chmod(0o644)
