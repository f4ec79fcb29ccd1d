"""``analyze(series) -> StudyResult``: the one AI call the GUI and batch review share (DESIGN.md 2, 4).

X-ray: one instance -> engine.dicom.pixels (Modality LUT, default VOI, MONOCHROME1 inverted: the
displayed image) -> validity gate -> ``prepare_xray`` -> DenseNet-121 -> sigmoid pathologies +
softmax COVID head -> findings, Cohen severity, Grad-CAM in displayed-image coordinates.
CT: engine.dicom.volume -> lung ROI (engine.preprocess.lung_roi) -> slices with enough lung ->
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
from engine.results import CTSliceScore, Finding, Heatmap, StudyResult, Validity

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
    gate: Any                        # engine.validity.GateBuilder
    tensor: Any                      # torch (1, 224, 224)
    geom: Any                        # CropGeometry
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Analyzer:
    """Holds the device choice and the (process-wide cached) models; batch code keeps one and calls
    :meth:`analyze_many` so X-rays share forward passes. Thread-safe: model work is serialised."""

    def __init__(self, device: str | None = None, *, ct_max_slices: int = CT_MAX_SLICES, ct_batch: int = CT_BATCH,
                 xray_batch: int = XRAY_BATCH) -> None:
        from engine.models.devices import pick_device

        self.cfg = pick_device(device)
        self.ct_max_slices = ct_max_slices
        self.ct_batch = ct_batch
        self.xray_batch = xray_batch
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ models
    def model(self, name: str):
        from engine.models.registry import load_model

        return load_model(name, device=self.cfg.device)

    def _features(self, lm, x):
        """Feature map under autocast on the model's device -> fp32."""
        import torch

        from engine.models.devices import autocast

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
        from engine.dicom.pixels import display_gray01, load_frame
        from engine.preprocess.xray import prepare_xray
        from engine.validity import GateBuilder, header_checks, pixel_checks_2d

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
        tensor, geom = prepare_xray(np.ascontiguousarray(gray, dtype=np.float32), size=self._xray_input_size())
        del gray, frame
        timings["preprocess"] = (time.perf_counter() - t) * 1000.0
        return _XrayItem(series, gate, tensor, geom, timings, warnings)

    def _xray_input_size(self) -> int:
        """The X-ray model's input side from its card (224 = torchxrayvision's; CPU-trained cards may differ)."""
        from engine.models.registry import XRAY_MODEL

        card = self.model(XRAY_MODEL).card or {}
        return int((card.get("preprocessing") or {}).get("input_size") or 224)

    def _xray_run(self, items: list[_XrayItem], want_heatmaps: bool, cancel: CancelFn | None,
                  progress: ProgressFn | None) -> list[StudyResult]:
        import torch

        from engine.models.devices import warm_up
        from engine.models.ood import has_ood, ood_score, pooled_features
        from engine.models.registry import XRAY_MODEL
        from engine.validity import ood_check

        with self._lock:
            t = time.perf_counter()
            lm = self.model(XRAY_MODEL)
            side = self._xray_input_size()
            warm_up(lm.module, (1, 1, side, side), self.cfg)
            t_load = (time.perf_counter() - t) * 1000.0
            _report(progress, 0.3, "running the X-ray model")
            t = time.perf_counter()
            x = torch.stack([it.tensor for it in items])
            fmap = self._features(lm, x)
            with torch.no_grad():
                out = lm.module.head(fmap)
                path_logits = out["pathologies"].float().cpu()
                covid_logits = out["covid"].float().cpu()
                feats = pooled_features(fmap)
            t_inf = (time.perf_counter() - t) * 1000.0 / len(items)
            t = time.perf_counter()
            scores = ood_score(feats, lm.ood) if has_ood(lm.ood) else None
            t_ood = (time.perf_counter() - t) * 1000.0 / len(items)
            results = []
            for i, it in enumerate(items):
                _check(cancel)
                thr = (lm.card.get("ood") or {}).get("threshold")
                ood_check(it.gate, None if scores is None else float(scores[i]),
                          None if thr is None else float(thr), lm.trained)
                validity = it.gate.build()
                res = StudyResult(study_uid=it.series.study_uid, series_uid=it.series.series_uid,
                                  modality=it.series.modality, kind="xray", validity=validity,
                                  models=[lm.info], device=self.cfg.name, warnings=list(it.warnings))
                res.timings_ms.update(it.timings)
                res.timings_ms.update({"model_load": t_load, "inference": t_inf, "ood": t_ood})
                self._xray_findings(res, lm, path_logits[i], covid_logits[i])
                if want_heatmaps and lm.trained and validity.passed:
                    _report(progress, 0.7, "computing heatmaps")
                    t = time.perf_counter()
                    res.heatmaps = self._xray_heatmaps(lm, fmap[i:i + 1], it.geom, res)
                    res.timings_ms["gradcam"] = (time.perf_counter() - t) * 1000.0
                results.append(res)
            return results

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

        from engine.severity import to_result

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
        from engine.models.densenet_xray import LUNG_OPACITY_INDEX

        if self._severity_enabled(lm.card):
            res.severity = to_result(float(path_logits[LUNG_OPACITY_INDEX]), info.name, info.version)

    @staticmethod
    def _severity_enabled(card: dict[str, Any]) -> bool:
        """Severity needs a trained 'Lung Opacity' output: card ``severity`` flag, else a Lung Opacity threshold."""
        if "severity" in card:
            sev = card["severity"]
            return bool(sev.get("enabled", True) if isinstance(sev, dict) else sev)
        names = (card.get("labels") or {}).get("pathologies") or []
        return "Lung Opacity" in (card.get("thresholds") or {}) and "Lung Opacity" in names

    def _xray_heatmaps(self, lm, fmap1, geom, res: StudyResult) -> list[Heatmap]:
        from engine.explain.gradcam import cams_from_fmap, upsample, xray_heatmap
        from engine.severity import geographic_extent_linear

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
        if res.severity is not None:
            from engine.models.densenet_xray import LUNG_OPACITY_INDEX

            # unclamped linear extent: the clamp would zero the gradient (DESIGN.md section 4)
            targets.append(("severity", lambda o: geographic_extent_linear(o["pathologies"][:, LUNG_OPACITY_INDEX])))
        if not targets:
            return []
        cams = cams_from_fmap(lm.module.head, fmap1, [fn for _, fn in targets])
        out = []
        for (name, _), cam in zip(targets, cams):
            hw = upsample(cam, (geom.size, geom.size))[0]
            out.append(Heatmap(name, xray_heatmap(hw, geom), lm.info.name, lm.info.version))
        return out

    # ------------------------------------------------------------------ CT
    def _ct(self, series: SeriesRecord, want_heatmaps: bool, progress: ProgressFn | None,
            cancel: CancelFn | None) -> StudyResult:
        from engine.dicom.volume import load_volume

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

        from engine.models.devices import warm_up
        from engine.models.ood import has_ood, ood_score, pooled_features
        from engine.models.registry import CT_MODEL
        from engine.preprocess.lung_roi import choose_slices, segment_lungs
        from engine.validity import GateBuilder, header_checks, ood_check, volume_checks

        timings: dict[str, float] = {}
        res = StudyResult(study_uid=series.study_uid, series_uid=series.series_uid, modality=series.modality,
                          kind="ct", validity=Validity(passed=False), device=self.cfg.name,
                          warnings=list(getattr(vol, "warnings", []) or []))
        gate = GateBuilder()
        header_checks(gate, "ct", series.modality, series.body_part)
        hu = vol.hu
        volume_checks(gate, hu, tuple(vol.direction) if getattr(vol, "direction", None) is not None else None)
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
                x = torch.stack([self._ct_input(hu[i], roi.boxes[i], size)[0] for i in batch_idx])
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
                    res.findings.append(Finding(classes[pos], study_p, thr, bool(res.validity.passed and study_p >= thr),
                                                lm.info.name, lm.info.version))
                if want_heatmaps and res.validity.passed:
                    _check(cancel)
                    _report(progress, 0.85, "computing heatmaps")
                    t = time.perf_counter()
                    top = [chosen[j] for j in np.argsort(probs)[::-1][:CT_HEATMAP_SLICES]]
                    res.heatmaps = self._ct_heatmaps(lm, hu, roi, top, size, pos, classes[pos])
                    timings["gradcam"] = (time.perf_counter() - t) * 1000.0
        res.timings_ms.update(timings)
        return res

    @staticmethod
    def _ct_input(hu_slice: np.ndarray, box, size: int):
        """One axial slice -> (model tensor (3, S, S), lung crop box (y0, y1, x0, x1) in slice pixels)."""
        from engine.preprocess.ct import ct_model_input, hu_to_gray01
        from engine.preprocess.lung_roi import margin_box

        shape = hu_slice.shape
        sq = margin_box(box, shape) if box is not None else (0, shape[0], 0, shape[1])
        y0, y1, x0, x1 = sq
        crop = hu_to_gray01(hu_slice[y0:y1, x0:x1])
        return ct_model_input(crop, size), sq

    def _ct_heatmaps(self, lm, hu, roi, slices: list[int], size: int, pos: int, label: str) -> list[Heatmap]:
        import torch

        from engine.explain.gradcam import cams_from_fmap, ct_heatmap, upsample

        inputs = [self._ct_input(hu[i], roi.boxes[i], size) for i in slices]
        fmap = self._features(lm, torch.stack([t for t, _ in inputs]))
        (cams,) = cams_from_fmap(lm.module.head, fmap, [lambda o: o[:, pos]])
        up = upsample(cams, (size, size))
        return [Heatmap(label, ct_heatmap(up[j], box, hu.shape[1:]), lm.info.name, lm.info.version, slice_index=int(i))
                for j, (i, (_, box)) in enumerate(zip(slices, inputs))]


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


def analyze_many(series_list: Sequence[SeriesRecord], *, progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None, want_heatmaps: bool = True) -> list[StudyResult]:
    """Batch form of :func:`analyze` (X-rays share forward passes)."""
    return default_analyzer().analyze_many(series_list, progress=progress, cancel=cancel, want_heatmaps=want_heatmaps)
