"""The Ray engine against the local engine: same rows, same failures; resume after the
driver is killed; a worker killed mid-run is retried. CI-sized: a local Ray with 2 CPUs."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the Ray engine needs the cluster extra (pip install '.[cluster]')")

from engine.review.batch import BatchOptions, run_batch  # noqa: E402
from engine.review.ray_batch import merge_index_results, ray_index, run_batch_ray  # noqa: E402
from engine.review.report import strip_timing  # noqa: E402
from tests.test_batch import _xray_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _rounded(obj):
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def _comparable(out: Path) -> tuple:
    res = strip_timing(json.loads((out / "results.json").read_text()))
    return _rounded(res["rows"]), _rounded(res["problems"]), sorted(p.name for p in (out / "thumbs").iterdir())


def _broken_files(root: Path) -> None:
    (root / "broken").mkdir(parents=True, exist_ok=True)
    (root / "broken" / "notes.txt").write_text("not a DICOM file")
    (root / "broken" / "empty.dcm").write_bytes(b"")
    (root / "broken" / "random.dcm").write_bytes(os.urandom(4096))
    good = next(root.rglob("CR_01_UNCR.dcm"), None) or next(root.rglob("*.dcm"))
    (root / "broken" / "truncated.dcm").write_bytes(good.read_bytes()[:3000])


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()


def test_distributed_index_matches_local_index(demo_dir, ray_local) -> None:
    from engine.dicom.index import index_path

    local = index_path(demo_dir)
    dist = ray_index(demo_dir, chunk=16)
    flat = lambda r: [(s.series_uid, [i.path for i in s.instances]) for s in r.all_series()]  # noqa: E731
    assert flat(dist) == flat(local)
    assert [p.patient_id for p in dist.patients] == [p.patient_id for p in local.patients]
    assert merge_index_results([]).patients == []


def test_ray_engine_equals_local_engine_with_broken_files(demo_dir, tmp_path, ray_local) -> None:
    inp = tmp_path / "in"
    shutil.copytree(demo_dir, inp)
    _broken_files(inp)
    local, dist = tmp_path / "local", tmp_path / "ray"
    run_batch(BatchOptions(inp, local, workers=1))
    problems: list[tuple[str, str]] = []
    s = run_batch_ray(BatchOptions(inp, dist), on_problem=lambda p, r: problems.append((p, r)))
    assert s.studies_done == s.studies_total >= 3
    a, b = _comparable(local), _comparable(dist)
    assert a[0] == b[0], "rows differ between the local and the Ray engine"
    assert a[1] == b[1] and len(a[1]) >= 4, "failures/reasons differ"
    assert a[2] == b[2]
    assert {p for p, _ in problems} >= {"broken/notes.txt", "broken/empty.dcm", "broken/random.dcm"}
    # resume: a second run recomputes nothing
    s2 = run_batch_ray(BatchOptions(inp, dist))
    assert s2.studies_done == 0 and s2.studies_skipped == s.studies_total


def test_worker_killed_mid_run_is_retried(demo_dir, tmp_path, ray_local) -> None:
    import psutil

    inp = _xray_folder(demo_dir, tmp_path / "in", 3)
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set() and not killed:
            for p in psutil.process_iter(["pid", "cmdline"]):
                cmd = " ".join(p.info.get("cmdline") or [])
                if "InferActor" in cmd:
                    try:
                        os.kill(p.info["pid"], signal.SIGKILL)
                        killed.append(p.info["pid"])
                    except ProcessLookupError:
                        pass
                    break
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        s = run_batch_ray(BatchOptions(inp, tmp_path / "out"), infer_actors=1)
    finally:
        stop.set()
        t.join(5)
    assert killed, "no inference worker was seen to kill"
    assert s.studies_done == s.studies_total == 4
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert len(rows) == 4 and all(not r.get("error") for r in rows)


def test_driver_killed_then_resumed_loses_and_duplicates_nothing(demo_dir, tmp_path) -> None:
    inp = _xray_folder(demo_dir, tmp_path / "in", 5)
    # Ray hands the driver its rows in bursts (all six journal entries within ~0.5 s here), so a
    # kill "after the first entry" would race the rest. The driver of the first run commits one
    # study every 2 s (sitecustomize wraps engine.review.journal.Journal.write); the kill then lands
    # between commits whatever the machine's load.
    slow = tmp_path / "slow_journal"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import time\n"
        "import engine.review.journal as _j\n"
        "_write = _j.Journal.write\n"
        "def _slow_write(self, *a, **k):\n"
        "    _write(self, *a, **k)\n"
        "    time.sleep(2.0)\n"
        "_j.Journal.write = _slow_write\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), CHESTVIEW_HOME=str(tmp_path / "home"))
    slow_env = dict(env, PYTHONPATH=os.pathsep.join([str(slow), str(REPO)]))
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "main.py"), "batch", str(inp), "--out", str(out), "--engine", "ray",
           "--ray-cpus", "2"]
    proc = subprocess.Popen(cmd, env=slow_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((out / "journal").glob("*.json"))) >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the batch finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        time.sleep(1.0)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    before = len(list((out / "journal").glob("*.json")))
    assert 1 <= before < 6, before
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{before} from an earlier run" in r.stdout
    ref = tmp_path / "ref"
    run_batch(BatchOptions(inp, ref, workers=1))
    assert _comparable(ref) == _comparable(out)
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 6
