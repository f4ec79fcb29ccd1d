"""``analyze(series) -> StudyResult``: the one AI call the GUI and batch review share (DESIGN.md 2, 4).

X-ray: one instance -> engine.dicom.pixels (Modality LUT, default VOI, MONOCHROME1 inverted: the
displayed image) -> validity gate -> ``prepare_xray`` -> DenseNet-121 -> sigmoid pathologies +
softmax COVID head -> findings, Cohen severity, Grad-CAM in displayed-image coordinates.
CT: engine.dicom.volume -> lung ROI (engine.ai.preprocess.lung_roi) -> slices with enough lung ->
lung window, lung-ROI crop (6% margin, as in training) -> Inception-family classifier per slice, in batches -> study
probability = mean of the top-3 slice probabilities (COVNet-style pooling that a single noisy
slice cannot dominate; the card's ``aggregation`` may change k) -> Grad-CAM on the top slices.

Findings appear only from a *trained* model (card written by ``main.py evaluate``), and only for
labels that the card gives a threshold; they are marked positive only when the gate passed.
Bad input never raises: the StudyResult carries ``error`` and a failed gate. Cancellation raises
AnalysisCancelled between stages and batches.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from engine.dicom.records import SeriesRecord
from engine.errors import AnalysisCancelled, LoadError, ModelError
from engine.results import CTSliceScore, Finding, Heatmap, Severity, StudyResult, Validity

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

CT_TOP_K = 3                 # study probability = mean of the top-k slice probabilities
CT_BATCH = 16                # slices per forward pass
CT_MAX_SLICES = 48           # evenly thinned beyond this (CPU budget); the card may not change it
CT_MIN_LUNG_FRACTION = 0.03  # a slice must be >= 3% lung for the series to count as chest with lungs
XRAY_BATCH = 8
HEATMAP_TOP_FINDINGS = 2
CT_HEATMAP_SLICES = 3


def _check(cancel: CancelFn | None) -> None:
    if cancel is not None and cancel():
        raise AnalysisCancelled("analysis cancelled by the user")


def _report(progress: ProgressFn | None, frac: float, msg: str) -> None:
    if progress is not None:
        try:
            progress(float(min(max(frac, 0.0), 1.0)), msg)
        except Exception:  # a broken progress callback must not break the analysis
            log.debug("progress callback failed", exc_info=True)


def _failed(series: SeriesRecord, kind: str, reason: str, **kw: Any) -> StudyResult:
    return StudyResult(study_uid=series.study_uid, series_uid=series.series_uid, modality=series.modality,
                       kind=kind, validity=Validity(passed=False, reasons=[reason]), error=reason, **kw)


@dataclass
class _XrayItem:
    """One X-ray between preprocessing and inference."""

    series: SeriesRecord
    gate: Any                        # engine.ai.validity.GateBuilder
    tensor: Any                      # torch (1, 224, 224)
    geom: Any                        # CropGeometry
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    lung_mask: Any = None            # bool (rows, cols) from the lung segmentation (anatomy gate), or None
    lungs: Any = None                # engine.ai.preprocess.xray_lungs.XrayLungs, or None
    lung_input: Any = None           # engine.ai.preprocess.xray_lung_input.LungInput for lung-input models (v2)


SEVERITY_NEEDS = "Lung Opacity"   # zone severity is scored only with this finding positive


class Analyzer:
    """Holds the device choice and the (process-wide cached) models; batch code keeps one and calls
    :meth:`analyze_many` so X-rays share forward passes. Thread-safe: model work is serialised."""

    def __init__(self, device: str | None = None, *, ct_max_slices: int = CT_MAX_SLICES, ct_batch: int = CT_BATCH,
                 xray_batch: int = XRAY_BATCH) -> None:
        from engine.ai.models.devices import pick_device

        self.cfg = pick_device(device)
        self.ct_max_slices = ct_max_slices
        self.ct_batch = ct_batch
        self.xray_batch = xray_batch
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ models
    def model(self, name: str):
        from engine.ai.models.registry import load_model

        return load_model(name, device=self.cfg.device)

    def _features(self, lm, x):
        """Feature map under autocast on the model's device -> fp32."""
        import torch

        from engine.ai.models.devices import autocast

        with torch.inference_mode(), autocast(self.cfg):
            fmap = lm.module.feature_map(x.to(self.cfg.device, non_blocking=True))
        return fmap.float()

    # ------------------------------------------------------------------ public API
    def analyze(self, series: SeriesRecord, *, progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                want_heatmaps: bool = True, instance_index: int = 0) -> StudyResult:
        """Analyse one series (never raises for bad input; raises AnalysisCancelled)."""
        t0 = time.perf_counter()
        kind = series.kind
        try:
            _check(cancel)
            if kind == "xray":
                item = self._xray_prepare(series, instance_index, progress)
                if isinstance(item, StudyResult):
                    return item
                _check(cancel)
                res = self._xray_run([item], want_heatmaps, cancel, progress)[0]
            elif kind == "ct":
                res = self._ct(series, want_heatmaps, progress, cancel)
            else:
                mod = series.modality or "(no modality)"
                reason = (f"Modality {mod} is not analysed: ChestView's AI reads chest X-rays (CR/DX) "
                          "and chest CT only. The images can still be viewed.")
                # not an error: nothing went wrong, there is just no model for it
                return StudyResult(study_uid=series.study_uid, series_uid=series.series_uid,
                                   modality=series.modality, kind="unsupported",
                                   validity=Validity(passed=False, reasons=[reason], checks={"modality": False}))
        except AnalysisCancelled:
            raise
        except LoadError as e:
            return _failed(series, kind if kind in ("xray", "ct") else "unsupported",
                           f"Could not read the images: {e.reason}")
        except ModelError as e:
            return _failed(series, kind, f"Model problem: {e}")
        except MemoryError:
            return _failed(series, kind, "Not enough memory to analyse this series; close other series or "
                                         "run the batch review with fewer parallel jobs.")
        except Exception as e:  # never let one bad series kill a batch
            log.exception("analysis failed for a %s series", kind)
            return _failed(series, kind, f"Analysis failed ({type(e).__name__}: {e}); please report this.")
        res.timings_ms["total"] = (time.perf_counter() - t0) * 1000.0
        _report(progress, 1.0, "done")
        return res

    def analyze_many(self, series_list: Sequence[SeriesRecord], *, progress: ProgressFn | None = None,
                     cancel: CancelFn | None = None, want_heatmaps: bool = True) -> list[StudyResult]:
        """Analyse several series, batching X-rays ``xray_batch`` at a time; results keep the input order."""
        n = max(1, len(series_list))
        results: list[StudyResult | None] = [None] * len(series_list)
        pending: list[tuple[int, _XrayItem, float]] = []

        def flush() -> None:
            if not pending:
                return
            try:
                outs = self._xray_run([p[1] for p in pending], want_heatmaps, cancel, None)
            except AnalysisCancelled:
                raise
            except Exception as e:
                log.exception("batched X-ray inference failed")
                outs = [_failed(p[1].series, "xray", f"Analysis failed ({type(e).__name__}: {e})") for p in pending]
            for (i, _, t_start), r in zip(pending, outs):
                r.timings_ms["total"] = (time.perf_counter() - t_start) * 1000.0
                results[i] = r
            pending.clear()

        for i, s in enumerate(series_list):
            _check(cancel)
            _report(progress, i / n, f"series {i + 1} of {len(series_list)}")
            if s.kind == "xray":
                t_start = time.perf_counter()
                try:
                    item = self._xray_prepare(s, 0, None)
                except LoadError as e:
                    item = _failed(s, "xray", f"Could not read the images: {e.reason}")
                except Exception as e:
                    log.exception("X-ray preparation failed")
                    item = _failed(s, "xray", f"Analysis failed ({type(e).__name__}: {e})")
                if isinstance(item, StudyResult):
                    results[i] = item
                else:
                    pending.append((i, item, t_start))
                    if len(pending) >= self.xray_batch:
                        flush()
            else:
                results[i] = self.analyze(s, cancel=cancel, want_heatmaps=want_heatmaps)
        flush()
        _report(progress, 1.0, "done")
        return [r for r in results if r is not None]

    # ------------------------------------------------------------------ X-ray
    def _xray_prepare(self, series: SeriesRecord, instance_index: int,
                      progress: ProgressFn | None) -> _XrayItem | StudyResult:
        from engine.dicom.display import display_gray01
        from engine.ai.preprocess.xray import prepare_xray
        from engine.dicom.safe_decode import bounded_load_frame as load_frame  # sandboxed (DESIGN.md 5)
        from engine.ai.validity import GateBuilder, header_checks, pixel_checks_2d

        if not series.instances:
            return _failed(series, "xray", "The series has no images.")
        idx = min(max(instance_index, 0), len(series.instances) - 1)
        timings: dict[str, float] = {}
        warnings: list[str] = []
        t = time.perf_counter()
        _report(progress, 0.05, "reading image")
        frame = load_frame(series.instances[idx].path)
        gray = display_gray01(frame)
        if gray.ndim == 3:
            gray = gray.mean(axis=2)
        if frame.is_color:
            warnings.append("Colour image converted to grey for the model (chest radiographs are grey).")
        if frame.n_frames > 1:
            warnings.append(f"Multi-frame image: frame 1 of {frame.n_frames} analysed.")
        if len(series.instances) > 1:
            warnings.append(f"Series has {len(series.instances)} images; image {idx + 1} analysed.")
        timings["load"] = (time.perf_counter() - t) * 1000.0
        t = time.perf_counter()
        gate = GateBuilder()
        modality = frame.modality or series.modality
        header_checks(gate, "xray", modality, series.body_part, series.view_position)
        pixel_checks_2d(gate, gray)
        lungs = self._xray_anatomy(gate, gray, frame, series.instances[idx].path)
        lung_mask = None if lungs is None else lungs.mask
        li = None
        if self._xray_lung_input_model():
            # v2: the model sees the segmented lungs only (engine.ai.preprocess.xray_lung_input); without
            # two lungs there is no input, and the gate has already said why
            tensor, geom = None, None
            if lungs is not None and lung_mask.any():
                from engine.ai.preprocess.xray_lung_input import lung_input

                li = lung_input(np.ascontiguousarray(gray, dtype=np.float32), lung_mask, lungs.zones,
                                side=self._xray_input_size())
                tensor, geom = li.tensor, li.geom
            elif lungs is None:
                gate.check("lung_model", False, "The lung segmentation model is missing, and the X-ray model reads "
                                                "the segmented lungs only: reinstall ChestView.")
        else:
            tensor, geom = prepare_xray(np.ascontiguousarray(gray, dtype=np.float32), size=self._xray_input_size())
        del gray, frame
        timings["preprocess"] = (time.perf_counter() - t) * 1000.0
        return _XrayItem(series, gate, tensor, geom, timings, warnings, lung_mask, lungs, li)

    def _xray_anatomy(self, gate, gray: np.ndarray, frame, path: str):
        """Lung segmentation + anatomy gate (engine.ai.validity.anatomy_checks): two plausible lungs, frontal,
        adult human. Returns the XrayLungs (mask for lung-restricted heatmaps, zones for severity and the
        lung-only model input); None without the lung model."""
        from engine.ai.preprocess.xray_lungs import load_lungseg, segment_lungs_xray
        from engine.ai.validity import anatomy_checks, read_anatomy_header

        try:
            seg = load_lungseg()
        except ModelError as e:
            gate.note(f"No anatomy check: {e}")
            return None
        with self._lock:
            lungs = segment_lungs_xray(gray, seg)
        anatomy_checks(gate, lungs, gray, read_anatomy_header(path, frame.pixel_spacing))
        return lungs

    def _xray_lung_input_model(self) -> bool:
        """True when the X-ray model's card says it reads lung-only inputs (engine.ai.preprocess.xray_lung_input)."""
        from engine.ai.models.registry import XRAY_MODEL

        card = self.model(XRAY_MODEL).card or {}
        return str((card.get("preprocessing") or {}).get("function", "")).startswith("engine.ai.preprocess.xray_lung_input")

    def _xray_input_size(self) -> int:
        """The X-ray model's input side from its card (224 = torchxrayvision's; CPU-trained cards may differ)."""
        from engine.ai.models.registry import XRAY_MODEL

        card = self.model(XRAY_MODEL).card or {}
        return int((card.get("preprocessing") or {}).get("input_size") or 224)

    def _xray_run(self, items: list[_XrayItem], want_heatmaps: bool, cancel: CancelFn | None,
                  progress: ProgressFn | None) -> list[StudyResult]:
        import torch

        from engine.ai.models.devices import warm_up
        from engine.ai.models.ood import has_ood, ood_score, pooled_features
        from engine.ai.models.registry import XRAY_MODEL
        from engine.ai.validity import ood_check

        with self._lock:
            t = time.perf_counter()
            lm = self.model(XRAY_MODEL)
            side = self._xray_input_size()
            warm_up(lm.module, (1, 1, side, side), self.cfg)
            t_load = (time.perf_counter() - t) * 1000.0
            _report(progress, 0.3, "running the X-ray model")
            t = time.perf_counter()
            # items without a model input (no lungs found for a lung-input model) get the gate's verdict only
            run = [k for k, it in enumerate(items) if it.tensor is not None]
            pos_of = {k: j for j, k in enumerate(run)}
            fmap = path_logits = covid_logits = scores = None
            if run:
                x = torch.stack([items[k].tensor for k in run])
                fmap = self._features(lm, x)
                with torch.no_grad():
                    out = lm.module.head(fmap)
                    path_logits = out["pathologies"].float().cpu()
                    covid_logits = out["covid"].float().cpu()
                    feats = pooled_features(fmap)
            t_inf = (time.perf_counter() - t) * 1000.0 / len(items)
            t = time.perf_counter()
            if run and has_ood(lm.ood):
                scores = ood_score(feats, lm.ood)
            t_ood = (time.perf_counter() - t) * 1000.0 / len(items)
            sev_model = self._zone_severity_model(lm.card)
            results = []
            for i, it in enumerate(items):
                _check(cancel)
                j = pos_of.get(i)
                thr = (lm.card.get("ood") or {}).get("threshold")
                if j is not None:
                    ood_check(it.gate, None if scores is None else float(scores[j]),
                              None if thr is None else float(thr), lm.trained)
                validity = it.gate.build()
                res = StudyResult(study_uid=it.series.study_uid, series_uid=it.series.series_uid,
                                  modality=it.series.modality, kind="xray", validity=validity,
                                  models=[lm.info], device=self.cfg.name, warnings=list(it.warnings))
                res.timings_ms.update(it.timings)
                res.timings_ms.update({"model_load": t_load, "inference": t_inf, "ood": t_ood})
                if j is None:
                    results.append(res)
                    continue
                self._xray_findings(res, lm, path_logits[j], covid_logits[j])
                if (sev_model is not None and validity.passed and it.lung_input is not None
                        and it.lung_input.zones is not None):
                    # the scorer learnt from COVID-19 pneumonia radiographs only (Brixia and Cohen scores):
                    # on lungs without an opacity finding it has no normal reference and overestimates, so
                    # severity is given only with a positive Lung Opacity finding
                    if any(f.label == SEVERITY_NEEDS and f.positive for f in res.findings):
                        from engine.ai.models.registry import info_from_card

                        res.severity = self._zone_severity(fmap[j], it, sev_model)
                        res.models.append(info_from_card(sev_model[1]))   # labelled like every model
                    else:
                        res.warnings.append(f"Severity not scored: no positive {SEVERITY_NEEDS} finding (the severity "
                                            "scorer was trained on pneumonia radiographs only).")
                if want_heatmaps and lm.trained and validity.passed:
                    _report(progress, 0.7, "computing heatmaps")
                    t = time.perf_counter()
                    res.heatmaps = self._xray_heatmaps(lm, fmap[j:j + 1], it.geom, res, it.lung_mask)
                    res.timings_ms["gradcam"] = (time.perf_counter() - t) * 1000.0
                results.append(res)
            return results

    @staticmethod
    def _zone_severity_model(card: dict[str, Any]):
        """The zone severity scorer (engine.ai.severity_zones) when the X-ray card enables it, else None."""
        sev = card.get("severity")
        if not isinstance(sev, dict) or not sev.get("enabled") or not str(sev.get("model", "")).startswith("xray-severity"):
            return None
        from engine.ai.severity_zones import load_severity_model

        return load_severity_model()

    @staticmethod
    def _zone_severity(fmap1, it: _XrayItem, sev_model) -> Severity:
        """Six zone scores + Cohen extent/opacity from one image's feature map, with where each zone lies."""
        import torch

        from engine.ai.severity_zones import ZONE_NAMES, zone_severity

        model, card = sev_model
        fm = torch.relu(fmap1.float()).cpu().numpy()
        s = zone_severity(fm, it.lung_input.zones, it.lung_input.norm01, model, str(card.get("name")),
                          str(card.get("version")))
        lungs = it.lungs
        for name in ZONE_NAMES:
            if lungs is None or name not in lungs.zone_rows:
                continue
            side = lungs.right if name in "ABC" else lungs.left
            if side.bbox is None:
                continue
            r0, r1 = lungs.zone_rows[name]
            s.zone_boxes[name] = (int(r0), int(side.bbox[1]), int(r1), int(side.bbox[3]))
        return s

    @staticmethod
    def _reported_labels(card: dict[str, Any], labels: list[str], res: StudyResult) -> dict[str, float]:
        """Labels with their thresholds that this card reports (see module docstring)."""
        thresholds = {str(k): float(v) for k, v in (card.get("thresholds") or {}).items()}
        if not thresholds:
            if "0.5 used" not in " ".join(res.warnings):
                res.warnings.append("The model card has no operating thresholds; 0.5 used for every label.")
            return {lab: 0.5 for lab in labels}
        return {lab: thresholds[lab] for lab in labels if lab in thresholds}

    def _xray_findings(self, res: StudyResult, lm, path_logits, covid_logits) -> None:
        import torch

        from engine.ai.severity import to_result

        if not lm.trained:
            return
        labels = lm.card.get("labels") or {}
        path_names = list(labels.get("pathologies") or [])
        covid_names = list(labels.get("covid") or [])
        path_p = torch.sigmoid(path_logits).numpy()
        covid_p = torch.softmax(covid_logits[: len(covid_names)], dim=0).numpy() if covid_names else np.zeros(0)
        probs = {n: float(path_p[j]) for j, n in enumerate(path_names[: len(path_p)])}
        probs.update({n: float(covid_p[j]) for j, n in enumerate(covid_names)})
        passed = res.validity.passed
        info = lm.info
        for lab, thr in self._reported_labels(lm.card, path_names + covid_names, res).items():
            if lab in probs:
                p = probs[lab]
                res.findings.append(Finding(lab, p, thr, bool(passed and p >= thr), info.name, info.version))
        res.findings.sort(key=lambda f: (f.positive, f.probability), reverse=True)
        from engine.ai.models.densenet_xray import LUNG_OPACITY_INDEX

        if self._severity_enabled(lm.card):
            res.severity = to_result(float(path_logits[LUNG_OPACITY_INDEX]), info.name, info.version)

    @staticmethod
    def _severity_enabled(card: dict[str, Any]) -> bool:
        """Severity needs a trained 'Lung Opacity' output: card ``severity`` flag, else a Lung Opacity threshold."""
        if "severity" in card:
            sev = card["severity"]
            if isinstance(sev, dict) and str(sev.get("model", "")).startswith("xray-severity"):
                return False  # the zone scorer (engine.ai.severity_zones) replaces the Cohen formula
            return bool(sev.get("enabled", True) if isinstance(sev, dict) else sev)
        names = (card.get("labels") or {}).get("pathologies") or []
        return "Lung Opacity" in (card.get("thresholds") or {}) and "Lung Opacity" in names

    def _xray_heatmaps(self, lm, fmap1, geom, res: StudyResult, lung_mask: np.ndarray | None = None) -> list[Heatmap]:
        from engine.ai.explain.gradcam import cams_from_fmap, restrict_to_lungs, upsample, xray_heatmap
        from engine.ai.severity import geographic_extent_linear

        labels = lm.card.get("labels") or {}
        path_names = list(labels.get("pathologies") or [])
        covid_names = list(labels.get("covid") or [])
        ranked = [f for f in res.findings if f.positive] or res.findings[:1]
        targets: list[tuple[str, Callable]] = []
        for f in ranked[:HEATMAP_TOP_FINDINGS]:
            if f.label in path_names:
                j = path_names.index(f.label)
                targets.append((f.label, lambda o, j=j: o["pathologies"][:, j]))
            elif f.label in covid_names:
                j = covid_names.index(f.label)
                targets.append((f.label, lambda o, j=j: o["covid"][:, j]))
        if res.severity is not None and res.severity.method == "cohen-logit":
            from engine.ai.models.densenet_xray import LUNG_OPACITY_INDEX

            # unclamped linear extent: the clamp would zero the gradient (DESIGN.md section 4)
            targets.append(("severity", lambda o: geographic_extent_linear(o["pathologies"][:, LUNG_OPACITY_INDEX])))
        if not targets:
            return []
        cams = cams_from_fmap(lm.module.head, fmap1, [fn for _, fn in targets])
        out = []
        from engine.ai.preprocess.xray_lung_input import LungCropGeometry
        from engine.ai.preprocess.xray_lung_input import heatmap_to_image as lung_heatmap_to_image

        for (name, _), cam in zip(targets, cams):
            if isinstance(geom, LungCropGeometry):  # lung-input model: undo the lung crop
                hw = upsample(cam, (geom.raw_side, geom.raw_side))[0]
                arr = np.clip(lung_heatmap_to_image(hw, geom), 0.0, 1.0).astype(np.float32)
            else:
                hw = upsample(cam, (geom.size, geom.size))[0]
                arr = xray_heatmap(hw, geom)
            arr = restrict_to_lungs(arr, lung_mask)
            # shown only on request unless its finding is positive and the gate passed
            shown = res.validity.passed and (name == "severity" or any(f.label == name and f.positive
                                                                       for f in res.findings))
            out.append(Heatmap(name, arr, lm.info.name, lm.info.version, hidden_by_default=not shown))
        return out

    # ------------------------------------------------------------------ CT
    def _ct(self, series: SeriesRecord, want_heatmaps: bool, progress: ProgressFn | None,
            cancel: CancelFn | None) -> StudyResult:
        from engine.dicom.safe_decode import bounded_load_volume as load_volume  # sandboxed (DESIGN.md 5)

        t = time.perf_counter()
        _report(progress, 0.02, "reading the CT series")
        vol = load_volume(series, progress=lambda f, m: _report(progress, 0.02 + 0.1 * f, m), cancel=cancel)
        load_ms = (time.perf_counter() - t) * 1000.0
        _check(cancel)
        res = self.analyze_volume(series, vol, want_heatmaps=want_heatmaps, progress=progress, cancel=cancel)
        res.timings_ms["load"] = load_ms
        return res

    def analyze_volume(self, series: SeriesRecord, vol, *, want_heatmaps: bool = True,
                       progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> StudyResult:
        """CT pipeline on an already loaded engine.dicom.volume.Volume (or any object with ``hu``,
        ``spacing``, ``direction``, ``positions``, ``warnings``)."""
        import torch

        from engine.ai.models.devices import warm_up
        from engine.ai.models.ood import has_ood, ood_score, pooled_features
        from engine.ai.models.registry import CT_MODEL
        from engine.ai.preprocess.lung_roi import choose_slices, segment_lungs
        from engine.ai.validity import GateBuilder, header_checks, ood_check, volume_checks

        timings: dict[str, float] = {}
        res = StudyResult(study_uid=series.study_uid, series_uid=series.series_uid, modality=series.modality,
                          kind="ct", validity=Validity(passed=False), device=self.cfg.name,
                          warnings=list(getattr(vol, "warnings", []) or []))
        gate = GateBuilder()
        header_checks(gate, "ct", series.modality, series.body_part)
        hu = vol.hu
        volume_checks(gate, hu, tuple(vol.direction) if getattr(vol, "direction", None) is not None else None)
        from engine.ai.validity import ct_series_checks   # scouts, radiographs as CT, slice count, phantom
        ct_facts = ct_series_checks(gate, vol, series)
        t = time.perf_counter()
        _report(progress, 0.15, "finding the lungs")
        spacing = tuple(float(s) for s in vol.spacing)
        roi = segment_lungs(hu, spacing)
        timings["lung_roi"] = (time.perf_counter() - t) * 1000.0
        if hu.shape[0] >= 10:
            res.lung_volume_ml = round(roi.volume_ml, 1)
        frac = roi.area_fraction()
        gate.check("lungs_found", frac.size > 0 and float(frac.max()) >= CT_MIN_LUNG_FRACTION,
                   "No lungs found in this CT (no large air-filled region inside the body): is it a chest CT "
                   "in a lung-compatible reconstruction?")
        if ct_facts.quantify and gate.passed:
            _report(progress, 0.18, "quantifying the lungs in HU")
            res.ct_quant = self._ct_quantify(vol, roi, ct_facts.is_phantom, res, cancel)
            if res.ct_quant is not None:
                timings["ct_quant"] = res.ct_quant.timings_ms.get("quantification", 0.0)
        chosen = choose_slices(roi, max_slices=self.ct_max_slices)
        n_candidates = int((roi.area_px >= 0.3 * roi.area_px.max()).sum()) if roi.area_px.size and roi.area_px.max() > 0 else 0
        if n_candidates > len(chosen):
            res.warnings.append(f"{len(chosen)} of {n_candidates} slices with lung were scored (evenly spaced).")
        _check(cancel)
        with self._lock:
            t = time.perf_counter()
            lm = self.model(CT_MODEL)
            size = int(getattr(lm.module, "input_size", 224))
            warm_up(lm.module, (1, 3, size, size), self.cfg)
            timings["model_load"] = (time.perf_counter() - t) * 1000.0
            res.models = [lm.info]
            classes = list((lm.card.get("labels") or {}).get("classes") or ["Non-COVID", "COVID-19"])
            pos = classes.index("COVID-19") if "COVID-19" in classes else len(classes) - 1
            probs: list[float] = []
            feats: list[torch.Tensor] = []
            t = time.perf_counter()
            for b in range(0, len(chosen), self.ct_batch):
                _check(cancel)
                _report(progress, 0.25 + 0.55 * b / max(1, len(chosen)), f"scoring slices {b + 1}-"
                        f"{min(b + self.ct_batch, len(chosen))} of {len(chosen)}")
                batch_idx = chosen[b:b + self.ct_batch]
                x = torch.stack([self._ct_input(hu[i], roi, i, size)[0] for i in batch_idx])
                fmap = self._features(lm, x)
                with torch.no_grad():
                    logits = lm.module.head(fmap).float()
                    probs.extend(torch.softmax(logits, dim=1)[:, pos].cpu().tolist())
                    feats.append(pooled_features(fmap).cpu())
                del x, fmap
            timings["inference"] = (time.perf_counter() - t) * 1000.0
            timings["slices_scored"] = float(len(chosen))
            ood_thr = (lm.card.get("ood") or {}).get("threshold")
            if feats and has_ood(lm.ood):
                slice_scores = ood_score(torch.cat(feats), {k: v.cpu() for k, v in lm.ood.items()})
                ood_check(gate, float(np.median(slice_scores)), None if ood_thr is None else float(ood_thr), lm.trained)
            else:
                ood_check(gate, None, None, lm.trained)
            res.validity = gate.build()
            if lm.trained and probs:
                agg = lm.card.get("aggregation") or {}
                k = max(1, min(int(agg.get("k", CT_TOP_K)), len(probs)))
                study_p = float(np.mean(sorted(probs, reverse=True)[:k]))
                res.ct_study_probability = study_p
                positions = list(getattr(vol, "positions", []) or [])
                res.ct_slice_scores = [CTSliceScore(i, float(positions[i]) if i < len(positions) else float(i),
                                                    float(p)) for i, p in zip(chosen, probs)]
                thr_map = self._reported_labels(lm.card, [classes[pos]], res)
                if classes[pos] in thr_map:
                    thr = thr_map[classes[pos]]
                    # positive is decided by the study verdict below (engine.ai.ct_verdict), not by the score alone
                    res.findings.append(Finding(classes[pos], study_p, thr, False, lm.info.name, lm.info.version))
                if want_heatmaps and res.validity.passed:
                    _check(cancel)
                    _report(progress, 0.85, "computing heatmaps")
                    t = time.perf_counter()
                    top = [chosen[j] for j in np.argsort(probs)[::-1][:CT_HEATMAP_SLICES]]
                    res.heatmaps = self._ct_heatmaps(lm, hu, roi, top, size, pos, classes[pos])
                    timings["gradcam"] = (time.perf_counter() - t) * 1000.0
        # ---- CT study verdict call site: classifier + HU burden (engine.ai.ct_verdict). Keep it after
        # the HU quantification so that res.ct_quant is set when the verdict reads it.
        self._apply_ct_verdict(res, lm, classes[pos], int(hu.shape[0]))
        res.timings_ms.update(timings)
        return res

    @staticmethod
    def _ct_quantify(vol, roi, is_phantom: bool, res: StudyResult, cancel: CancelFn | None):
        """HU quantification per lung and zone (engine.ai.ct_quant); a refusal becomes a warning."""
        from engine.ai.ct_quant import QuantificationRefused, quantify_ct

        direction = getattr(vol, "direction", None)
        positions = getattr(vol, "positions", None)
        try:
            q = quantify_ct(vol.hu, tuple(float(s) for s in vol.spacing), roi,
                            direction=tuple(direction) if direction is not None else None,
                            positions=list(positions) if positions else None, is_phantom=is_phantom, cancel=cancel)
        except QuantificationRefused as e:
            res.warnings.append(f"No HU quantification: {e}")
            return None
        res.warnings.extend(w for w in q.warnings if w not in res.warnings)
        return q

    @staticmethod
    def _apply_ct_verdict(res: StudyResult, lm, label: str, n_slices: int) -> None:
        """Set ``res.ct_verdict`` and the COVID-19 finding's ``positive`` from engine.ai.ct_verdict."""
        from engine.ai.ct_quant import MIN_QUANT_SLICES
        from engine.ai.ct_verdict import BASIS_SLICE_ONLY, ct_verdict

        finding = next((f for f in res.findings if f.label == label), None)
        thr = finding.threshold if finding is not None else (lm.card.get("thresholds") or {}).get(label)
        verdict = ct_verdict(res.ct_study_probability, None if thr is None else float(thr),
                             getattr(res, "ct_quant", None), is_volume=n_slices >= MIN_QUANT_SLICES,
                             gate_passed=res.validity.passed, trained=lm.trained)
        res.ct_verdict = verdict
        if finding is not None:
            finding.positive = verdict.flag
            if verdict.basis == BASIS_SLICE_ONLY:
                res.warnings.append(f"{label}: {BASIS_SLICE_ONLY}. " + " ".join(verdict.reasons))
            elif not verdict.flag and verdict.reasons:
                res.warnings.append(f"{label} not flagged: " + " ".join(verdict.reasons))

    @staticmethod
    def _ct_input(hu_slice: np.ndarray, roi, index: int, size: int):
        """One axial slice -> (model tensor (3, S, S), lung crop box (y0, y1, x0, x1) in slice pixels).

        HU -> lung window -> this slice of the 3-D lung mask -> engine.ai.preprocess.ct_input.prepare_ct_slice,
        the function training ends in too (engine.training.datasets.encode_ct_slice + ct_batch_input).
        """
        from engine.ai.preprocess.ct import hu_to_gray01
        from engine.ai.preprocess.ct_input import prepare_ct_slice, volume_slice_mask

        mask = volume_slice_mask(roi.mask[index], roi.factor, hu_slice.shape) if roi.boxes[index] is not None else None
        return prepare_ct_slice(hu_to_gray01(hu_slice), mask, size)

    def _ct_heatmaps(self, lm, hu, roi, slices: list[int], size: int, pos: int, label: str) -> list[Heatmap]:
        import torch

        from engine.ai.explain.gradcam import cams_from_fmap, ct_heatmap, restrict_to_lungs, upsample
        from engine.ai.preprocess.ct_input import volume_slice_mask

        inputs = [self._ct_input(hu[i], roi, i, size) for i in slices]
        fmap = self._features(lm, torch.stack([t for t, _ in inputs]))
        (cams,) = cams_from_fmap(lm.module.head, fmap, [lambda o: o[:, pos]])
        up = upsample(cams, (size, size))
        out = []
        for j, (i, (_, box)) in enumerate(zip(slices, inputs)):
            arr = ct_heatmap(up[j], box, hu.shape[1:])
            # the finding is a lung finding: fade the map out beyond this slice's lung mask, as for X-rays
            arr = restrict_to_lungs(arr, volume_slice_mask(roi.mask[i], roi.factor, hu.shape[1:]))
            out.append(Heatmap(label, arr, lm.info.name, lm.info.version, slice_index=int(i)))
        return out


_default: Analyzer | None = None
_default_lock = threading.Lock()


def default_analyzer() -> Analyzer:
    """The process-wide Analyzer (device picked once, models loaded once)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Analyzer()
        return _default


def analyze(series: SeriesRecord, *, progress: ProgressFn | None = None, cancel: CancelFn | None = None,
            want_heatmaps: bool = True, instance_index: int = 0) -> StudyResult:
    """Analyse one series with the shared Analyzer (see module docstring).

    ``instance_index`` picks the X-ray image of a multi-image series (the user's choice); CT uses all.
    """
    return default_analyzer().analyze(series, progress=progress, cancel=cancel, want_heatmaps=want_heatmaps,
                                      instance_index=instance_index)


def analyze_volume(series: SeriesRecord, volume: Any, *, progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None) -> StudyResult:
    """CT analysis on a Volume the caller already loaded (engine.dicom.volume.load_volume), so the
    series is not read and held in memory twice. Same contract as :func:`analyze`: never raises for
    bad input (any unexpected failure falls back to :func:`analyze`, which re-reads the series and
    reports errors in ``StudyResult.error``); raises AnalysisCancelled when ``cancel()`` is True."""
    t0 = time.perf_counter()
    try:
        res = default_analyzer().analyze_volume(series, volume, progress=progress, cancel=cancel)
    except AnalysisCancelled:
        raise
    except Exception:  # noqa: BLE001 - the full path reports errors as StudyResult.error
        log.debug("analyze_volume failed; re-reading the series", exc_info=True)
        return analyze(series, progress=progress, cancel=cancel)
    res.timings_ms["total"] = (time.perf_counter() - t0) * 1000.0
    res.timings_ms.setdefault("load", 0.0)
    if progress is not None:
        progress(1.0, "done")
    return res


def failed_result(series: SeriesRecord, reason: str) -> StudyResult:
    """The StudyResult of an analysis that could not run at all (``error`` set, no findings), as
    :meth:`Analyzer.analyze` reports a failure."""
    return _failed(series, series.kind if series.kind in ("xray", "ct") else "unsupported", reason)


def analyze_many(series_list: Sequence[SeriesRecord], *, progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None, want_heatmaps: bool = True) -> list[StudyResult]:
    """Batch form of :func:`analyze` (X-rays share forward passes)."""
    return default_analyzer().analyze_many(series_list, progress=progress, cancel=cancel, want_heatmaps=want_heatmaps)
