"""``python main.py selftest``: is this installation able to do its job?

Prints the version, every model card with its sha256 check and trained state, the DICOM decoders
pydicom can use per compressed transfer syntax (PS3.5 section 8 / Annex A.4), SimpleITK, CPU/GPU,
then builds (if needed) the demo study set and analyses each demo series, one line each.
Exit status 0 when every check worked (a failed validity gate on the out-of-scope tibia is the
expected outcome, not a failure). No patient identifiers are printed.
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from pathlib import Path

_TRANSFER_SYNTAXES = [
    ("JPEG Baseline", "1.2.840.10008.1.2.4.50"),
    ("JPEG Lossless SV1", "1.2.840.10008.1.2.4.70"),
    ("JPEG-LS Lossless", "1.2.840.10008.1.2.4.80"),
    ("JPEG 2000 Lossless", "1.2.840.10008.1.2.4.90"),
    ("JPEG 2000", "1.2.840.10008.1.2.4.91"),
    ("HTJ2K Lossless", "1.2.840.10008.1.2.4.201"),
    ("RLE Lossless", "1.2.840.10008.1.2.5"),
    ("Deflated Explicit VR LE", "1.2.840.10008.1.2.1.99"),
]
_DECODER_PACKAGES = [("pylibjpeg", "pylibjpeg"), ("openjpeg", "pylibjpeg-openjpeg"), ("libjpeg", "pylibjpeg-libjpeg"),
                     ("rle", "pylibjpeg-rle"), ("gdcm", "python-gdcm"), ("SimpleITK", "SimpleITK")]


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def check_models(out) -> bool:
    from engine.ai.models.registry import KNOWN_MODELS, find_card, list_cards, model_label, sha256_file
    from engine.paths import models_dir

    ok = True
    d = models_dir()
    cards = list_cards(d)
    print(f"models folder: {d} ({len(cards)} card(s))", file=out)
    for path, card in cards:
        w = path.parent / str(card.get("file"))
        if not w.is_file():
            state, ok = "FILE MISSING", False
        else:
            actual = sha256_file(w)
            state = "sha256 ok" if actual == card.get("sha256") else f"SHA256 MISMATCH (file {actual[:16]}…)"
            ok = ok and actual == card.get("sha256")
        print(f"  {path.name}: {model_label(card)}; trained={bool(card.get('trained'))}; "
              f"sha256 {str(card.get('sha256', ''))[:16]}…; {state}", file=out)
    for name in KNOWN_MODELS:
        if find_card(name, directory=d) is None:
            print(f"  {name}: no card -> untrained stand-in (no findings shown)", file=out)
    return ok


def check_decoders(out) -> bool:
    from pydicom.pixels import get_decoder

    for mod, dist in _DECODER_PACKAGES:
        v = _version(dist)
        try:
            importlib.import_module(mod)
            state = f"{v or 'installed'}"
        except Exception as e:  # an installed but broken binary wheel shows up here
            state = f"NOT USABLE ({type(e).__name__})" if v else "not installed"
        print(f"  {dist:<20} {state}", file=out)
    ok = True
    for label, uid in _TRANSFER_SYNTAXES:
        if uid.endswith(".99"):   # deflate compresses the data set, not the pixels: pydicom inflates it (zlib)
            plugins = "pydicom (zlib)"
        else:
            try:
                plugins = ", ".join(get_decoder(uid).available_plugins) or "NONE"
            except Exception:
                plugins = "NONE"
        if plugins == "NONE":
            ok = False
        print(f"  {label:<24} {uid:<26} {plugins}", file=out)
    return ok


def check_devices(out) -> None:
    import torch

    from engine.ai.models.devices import physical_cores, pick_device

    cfg = pick_device()
    print(f"torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}; "
          f"{physical_cores()} physical core(s); device used: {cfg.name}", file=out)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB", file=out)


def analyse_demo(out, demo: Path | None = None, ct_max_slices: int | None = None,
                 keep: list | None = None) -> bool:
    from engine.ai.analysis import Analyzer
    from engine.demo.studies import ensure_demo
    from engine.dicom.index import index_path

    t = time.perf_counter()
    root = Path(demo) if demo else ensure_demo()
    idx = index_path(root)
    print(f"demo: {root} ({idx.files_seen} files, {len(idx.problems)} problem(s), "
          f"{(time.perf_counter() - t):.1f} s)", file=out)
    an = Analyzer(**({"ct_max_slices": ct_max_slices} if ct_max_slices else {}))
    ok = not idx.problems
    for s in idx.all_series():
        r = an.analyze(s)
        if keep is not None:
            keep.append((s, r))
        failed = [x for x in r.validity.reasons if "No out-of-distribution check" not in x]
        gate = "gate passed" if r.validity.passed else "gate FAILED: " + "; ".join(failed)[:160]
        if r.error:
            ok = False
        model = r.models[0].label if r.models else "-"
        extra = ""
        if r.kind == "ct" and r.lung_volume_ml is not None:
            extra = f"; lung volume {r.lung_volume_ml:.0f} mL"
        pos = [f"{f.label} {f.probability:.2f}" for f in r.findings if f.positive]
        print(f"  [{s.modality} #{s.series_number} {s.series_description[:40]}] kind={r.kind}; "
              f"{'ERROR: ' + r.error if r.error else gate}; findings={len(r.findings)} "
              f"({', '.join(pos) or 'none positive'}){extra}; {r.timings_ms.get('total', 0):.0f} ms; {model}",
              file=out)
    return ok


def check_ai_process(out, analysed: list) -> bool:
    """The viewer's path to the models (engine.service uses engine.ai.host, a separate process): the
    first radiograph of the demo analysed there must give the findings the in-process analysis
    gave. In a packaged build this is the check that the frozen app can start its AI process."""
    from engine.ai.host import call, get_host, process_enabled

    pick = next(((s, r) for s, r in analysed if r.kind == "xray"), None)
    if pick is None:
        print("  no radiograph in the demo: nothing to compare", file=out)
        return False
    series, here = pick
    t = time.perf_counter()
    there = call("analyze_series", series)
    if there.error:
        print(f"  FAILED: {there.error}", file=out)
        return False
    a = {f.label: f.probability for f in here.findings}
    b = {f.label: f.probability for f in there.findings}
    same = a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
    where = f"process {get_host().pid}" if process_enabled() else "this process (CHESTVIEW_AI_PROCESS=0)"
    print(f"  analysed in {where} in {time.perf_counter() - t:.1f} s: "
          f"{'same findings as in-process' if same else f'DIFFERENT findings: {b} vs {a}'}", file=out)
    return same


def cli_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="chestview selftest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", help="use this demo folder instead of building/using the default one")
    ap.add_argument("--no-demo", action="store_true", help="skip analysing the demo")
    ap.add_argument("--ct-max-slices", type=int, default=None, help="fewer CT slices for a quicker run")
    args = ap.parse_args(argv)
    out = sys.stdout
    from engine import __version__
    from engine.results import RESEARCH_USE

    print(f"ChestView {__version__} ({RESEARCH_USE}); Python {platform.python_version()} on "
          f"{platform.system()} {platform.machine()}", file=out)
    results = {}
    for name, fn in (("models", check_models), ("decoders", check_decoders)):
        print(f"-- {name}", file=out)
        try:
            results[name] = fn(out)
        except Exception as e:
            print(f"  FAILED: {type(e).__name__}: {e}", file=out)
            results[name] = False
    print("-- devices", file=out)
    try:
        check_devices(out)
        results["devices"] = True
    except Exception as e:
        print(f"  FAILED: {type(e).__name__}: {e}", file=out)
        results["devices"] = False
    if not args.no_demo:
        print("-- demo analysis", file=out)
        analysed: list = []
        try:
            results["demo"] = analyse_demo(out, Path(args.demo) if args.demo else None, args.ct_max_slices,
                                           keep=analysed)
        except Exception as e:
            print(f"  FAILED: {type(e).__name__}: {e}", file=out)
            results["demo"] = False
        print("-- AI process (the viewer's path to the models)", file=out)
        try:
            results["ai-process"] = check_ai_process(out, analysed)
        except Exception as e:
            print(f"  FAILED: {type(e).__name__}: {e}", file=out)
            results["ai-process"] = False
    bad = [k for k, v in results.items() if not v]
    print(f"selftest: {'OK' if not bad else 'FAILED (' + ', '.join(bad) + ')'}", file=out)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(cli_main())
