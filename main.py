"""ChestView entry point: ``python main.py [view|batch|selftest|demo|train|evaluate|compare|convert-xrv] ...``.

Research use only, not for diagnostic use.
"""
from __future__ import annotations

import argparse
import os
import sys


def _has_display() -> bool:
    if os.environ.get("QT_QPA_PLATFORM", "") in ("offscreen", "minimal"):
        return False
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def start_decoder_early(paths: list[str] = ()) -> None:
    """Boot the sandboxed decoder (engine.dicom.safe_decode.start_boundary) before Qt is imported,
    so it starts on the other core while the window is built and the first image does not wait
    for it; the first path given is indexed there meanwhile (safe_decode.prefetch_index). Best
    effort: the viewer starts both on demand otherwise."""
    try:
        from engine.dicom.safe_decode import prefetch_index, start_boundary

        start_boundary()
        if paths:
            prefetch_index(paths[0])
    except Exception:  # noqa: BLE001 - an optimisation only; a real failure shows on first decode
        pass


def cmd_run_demo(args: argparse.Namespace) -> int:
    """The README's main job: viewer on the demo; with no display, batch review of the demo."""
    from engine.demo.studies import ensure_demo

    demo = ensure_demo()
    if _has_display() and not args.batch:
        start_decoder_early([str(demo)])
        from viewer.app import run_viewer

        return run_viewer([str(demo)])
    from engine.review.cli import run_batch_cli

    out = args.out or str(demo.parent / "demo-review")
    print(f"[chestview] no display: running the batch review of the demo study set in {demo}")
    return run_batch_cli([str(demo), "--out", out])


def cmd_view(args: argparse.Namespace) -> int:
    paths = list(args.paths)
    if not paths and args.demo:
        from engine.demo.studies import ensure_demo

        paths = [str(ensure_demo())]
    start_decoder_early(paths)
    from viewer.app import run_viewer

    return run_viewer(paths)


def cmd_demo(args: argparse.Namespace) -> int:
    from engine.demo.studies import ensure_demo

    path = ensure_demo(rebuild=args.rebuild)
    print(path)
    return 0


DELEGATED: dict[str, str] = {
    "batch": "engine.review.cli",
    "selftest": "engine.demo.selftest",
    "train": "engine.training.train",
    "evaluate": "engine.training.evaluate",
    "train-xray-lung": "engine.training.train_xray_lung",
    "evaluate-xray-lung": "engine.training.evaluate_xray_lung",
    "compare": "engine.training.compare",
    "convert-xrv": "engine.training.convert_xrv",
}


def build_parser() -> argparse.ArgumentParser:
    from engine import __version__

    p = argparse.ArgumentParser(prog="chestview", description="ChestView: chest X-ray and CT viewer with AI "
                                "assistance. Research use only, not for diagnostic use.")
    p.add_argument("--version", action="version", version=f"ChestView {__version__}")
    sub = p.add_subparsers(dest="command")

    r = sub.add_parser("run-demo", help="viewer on the demo study set (batch review when no display)")
    r.add_argument("--batch", action="store_true", help="force the batch review even with a display")
    r.add_argument("--out", help="report folder for the batch review")
    r.set_defaults(func=cmd_run_demo)

    v = sub.add_parser("view", help="open the viewer on folders, DICOMDIRs or ZIP files")
    v.add_argument("paths", nargs="*")
    v.add_argument("--demo", action="store_true", help="open the bundled demo study set")
    v.set_defaults(func=cmd_view)

    d = sub.add_parser("demo", help="build (if needed) the demo study set and print its folder")
    d.add_argument("--rebuild", action="store_true")
    d.set_defaults(func=cmd_demo)

    # Subcommands whose argument parsing lives with their module (one job per module).
    for name, module, helptext in [
        ("batch", "engine.review.cli", "review every study under a folder; write CSV/JSON/HTML reports"),
        ("selftest", "engine.demo.selftest", "check decoders, models (hashes), devices; analyse the demo"),
        ("train", "engine.training.train", "train a model on real data (xray|ct)"),
        ("evaluate", "engine.training.evaluate", "evaluate a model and write its model card; with --labels FILE.csv, "
                                        "validate the shipped model on your own labelled images"),
        ("train-xray-lung", "engine.training.train_xray_lung", "train the lung-input X-ray classifier (v2)"),
        ("evaluate-xray-lung", "engine.training.evaluate_xray_lung", "evaluate the v2 X-ray classifier and severity "
                                                            "scorer; write their cards"),
        ("compare", "engine.training.compare", "train and compare the papers' model zoo on one split"),
        ("convert-xrv", "engine.training.convert_xrv", "convert torchxrayvision weights to safetensors"),
    ]:
        sp = sub.add_parser(name, help=helptext, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(func=None, module=module)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from engine.logscrub import install as scrub_logs

    scrub_logs()  # no patient identifiers in stderr or logs from any subcommand (DESIGN.md 5)
    if argv and argv[0] in DELEGATED:
        # These subcommands parse their own arguments (options included) in their module.
        import importlib

        return int(importlib.import_module(DELEGATED[argv[0]]).cli_main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.func is None:
        import importlib

        mod = importlib.import_module(args.module)
        return int(mod.cli_main(args.rest) or 0)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
