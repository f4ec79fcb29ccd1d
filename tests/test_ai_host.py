"""The AI process (engine.ai.host): a real child with the shipped models runs the viewer's analyses,
the parent never imports torch, cancel keeps the child, a killed child is reported and replaced."""
from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import engine.service as service
from engine.ai import host
from engine.ai.models.registry import XRAY_MODEL
from engine.errors import AIHostError, AnalysisCancelled

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "resources" / "models"

pytestmark = pytest.mark.skipif(not any(MODELS.glob(f"{XRAY_MODEL}-*.safetensors")),
                                reason="the shipped models are absent")


@pytest.fixture(scope="module")
def demo(demo_dir):
    from engine.dicom.index import index_path

    out = {}
    for s in index_path(demo_dir).all_series():
        if s.modality == "CT":
            out["ct"] = s
        elif s.series_number == 1 and s.body_part.upper() == "CHEST":
            out["cr"] = s
    assert set(out) == {"ct", "cr"}
    return out


@pytest.fixture(scope="module")
def ai_host():
    """The process-wide host, with its own child for this module."""
    host.shutdown_ai_host()
    assert host.process_enabled()
    yield host.get_host()
    host.shutdown_ai_host()


def _own_shm() -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"chestview-{os.getpid()}-")] \
        if os.path.isdir("/dev/shm") else []


def _findings(res):
    return {f.label: f.probability for f in res.findings}


def test_analysis_in_the_host_equals_in_process_with_progress(ai_host, demo):
    seen: list[tuple[float, str]] = []
    remote = service.analyze_series(demo["cr"], progress=lambda f, m: seen.append((f, m)))
    pid = ai_host.pid
    assert pid is not None and pid != os.getpid()
    local = host.run_here("analyze_series", demo["cr"])
    assert remote.error is None and local.error is None
    assert remote.findings and _findings(remote).keys() == _findings(local).keys()
    for label, p in _findings(local).items():
        assert abs(_findings(remote)[label] - p) < 1e-5, label
    assert [(m.name, m.version, m.label) for m in remote.models] == [(m.name, m.version, m.label) for m in local.models]
    assert len(remote.heatmaps) == len(local.heatmaps)
    assert seen and seen[-1][0] == 1.0 and len(seen) >= 2
    assert [i.name for i in service.model_infos()] == [i.name for i in host.run_here("model_infos")]
    assert ai_host.pid == pid


@pytest.mark.timeout(300)
def test_the_calling_process_never_imports_torch(demo_dir):
    code = ("import sys\nimport engine.service as s\nfrom engine.dicom.index import index_path\n"
            f"idx = index_path({str(demo_dir)!r})\n"
            "cr = [x for x in idx.all_series() if x.modality == 'CR' and x.series_number == 1 "
            "and x.body_part.upper() == 'CHEST'][0]\n"
            "r = s.analyze_series(cr)\n"
            "print(r.error, len(r.findings) > 0, 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != host.ENV_SWITCH}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=280, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["None", "True", "False"], out.stdout


def test_a_loaded_volume_goes_through_shared_memory(ai_host, demo, monkeypatch):
    """analyze_volume: the Volume's ``hu`` is written to /dev/shm, not piped; nothing is left there."""
    from engine.dicom.volume import load_volume

    vol = load_volume(demo["ct"])
    k = 8   # every 8th slice: 15 slices score in one batch (the test machine has 2 cores)
    thin = dataclasses.replace(vol, hu=vol.hu[::k].copy(), positions=vol.positions[::k],
                               instance_paths=vol.instance_paths[::k], sop_instance_uids=vol.sop_instance_uids[::k],
                               spacing=(vol.spacing[0] * k, vol.spacing[1], vol.spacing[2]))
    shared: list[str] = []
    real_dumps = host._dumps

    def dumps(obj, prefix):
        data = real_dumps(obj, prefix)
        shared.extend(name for name, _ in pickle.loads(data)[0])
        return data

    monkeypatch.setattr(host, "_dumps", dumps)
    res = service.analyze_volume(demo["ct"], thin)
    assert res.error is None and res.kind == "ct" and res.validity.passed, res.validity
    assert res.lung_volume_ml and res.timings_ms["load"] == 0.0
    assert any("-a-" in n for n in shared), "the volume was piped, not shared"
    if ai_host.pid:
        assert _own_shm() == []


def _run_in_thread(fn, *args, **kwargs):
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - the test reads it
            box["error"] = e
        box["done"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_cancel_stops_the_call_and_keeps_the_child(ai_host, demo):
    service.model_infos()
    pid, started = ai_host.pid, ai_host.started
    stop = threading.Event()
    first = threading.Event()
    # cancelled once the volume is read, inside the child's analysis (not in its decode child)
    t, box = _run_in_thread(service.analyze_series, demo["ct"],
                            progress=lambda f, m: f >= 0.15 and first.set(), cancel=stop.is_set)
    # a second call queued behind the first and cancelled before its turn never runs
    stop2 = threading.Event()
    t2, box2 = _run_in_thread(host.call, "analyze_series", demo["ct"], cancel=stop2.is_set)
    assert first.wait(120)
    stop2.set()
    t2.join(10)
    assert isinstance(box2.get("error"), AnalysisCancelled)
    asked = time.monotonic()
    stop.set()
    t.join(30)
    assert isinstance(box.get("error"), AnalysisCancelled), box
    assert box["done"] - asked < 10
    assert ai_host.pid == pid and ai_host.started == started
    assert service.model_infos() and ai_host.pid == pid
    assert _own_shm() == []


def test_a_child_that_ignores_a_cancel_is_killed_after_the_grace_period():
    """'warm' imports torch and never polls cancel: with a short grace the child is replaced."""
    own = host.AIHost(grace_s=0.5)
    try:
        asked: list[float] = []

        def cancel() -> bool:
            if own.pid is not None and not asked:
                asked.append(time.monotonic())
            return bool(asked)

        with pytest.raises(AnalysisCancelled):
            own.call("warm", cancel=cancel)
        assert time.monotonic() - asked[0] < 5
        assert own.pid is None and own.started == 1
    finally:
        own.shutdown(final=True)


def _kill_at_first_progress(ai_host, fn, *args):
    """Run ``fn(*args, progress=...)`` in a thread, SIGKILL the child at its first progress message;
    (the old pid, what the thread returned or raised)."""
    ai_host.call("warm")
    pid = ai_host.pid
    first = threading.Event()
    t, box = _run_in_thread(fn, *args, progress=lambda f, m: first.set())
    assert first.wait(120)
    os.kill(pid, signal.SIGKILL)
    t.join(30)
    assert not t.is_alive()
    return pid, box


def test_a_killed_child_is_reported_and_replaced(ai_host, demo):
    pid, box = _kill_at_first_progress(ai_host, service.analyze_series, demo["ct"])
    res = box["value"]
    assert res.error and "SIGKILL" in res.error and "restarts on the next analysis" in res.error, res.error
    assert res.findings == [] and not res.validity.passed and res.kind == "ct"
    assert service.model_infos()
    assert ai_host.pid not in (None, pid)

    pid, box = _kill_at_first_progress(ai_host, host.call, "analyze_series", demo["ct"])
    assert isinstance(box.get("error"), AIHostError) and "SIGKILL" in str(box["error"])
    assert service.model_infos() and ai_host.pid not in (None, pid)
    assert _own_shm() == []


def test_the_switch_runs_the_models_in_this_process(ai_host, monkeypatch):
    monkeypatch.setitem(host.FUNCTIONS, "warm", lambda **kw: os.getpid())
    monkeypatch.setenv(host.ENV_SWITCH, "0")
    assert not host.process_enabled()
    started = ai_host.started
    assert host.call("warm") == os.getpid()
    service.start_ai_host()          # a no-op in-process
    assert ai_host.started == started
    monkeypatch.delenv(host.ENV_SWITCH)
    assert host.call("warm") is None    # the child runs its own table, not the patched one


def test_a_child_started_under_other_settings_is_replaced(ai_host, monkeypatch, tmp_path):
    """The child copies the environment when it starts; a later change of the model folder (or
    threads, device) must reach the models, as it would in-process."""
    trained = {i.name: i.trained for i in host.call("model_infos")}
    assert trained.get(XRAY_MODEL) is True
    pid, started = ai_host.pid, ai_host.started
    monkeypatch.setenv("CHESTVIEW_MODELS", str(tmp_path / "no-models"))
    now = {i.name: i.trained for i in host.call("model_infos")}
    assert now.get(XRAY_MODEL) is False                 # no card there: labelled untrained
    assert ai_host.started == started + 1 and ai_host.pid != pid
    monkeypatch.delenv("CHESTVIEW_MODELS")
    assert {i.name: i.trained for i in host.call("model_infos")} == trained


def test_stop_reasons_and_remote_errors_read_well():
    assert host._stop_reason(-signal.SIGKILL) == "SIGKILL: out of memory?"
    assert "SIGSEGV" in host._stop_reason(-signal.SIGSEGV) and host._stop_reason(3) == "exit status 3"
    from engine.errors import ModelError

    assert isinstance(host._remote_error("ModelError: sha256 mismatch"), ModelError)
    err = host._remote_error("ValueError: bad")
    assert isinstance(err, AIHostError) and isinstance(err, RuntimeError) and "ValueError: bad" in str(err)
    with pytest.raises(ValueError):
        host.get_host().call("os.system", "true")
