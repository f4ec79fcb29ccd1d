"""Generate >= 2,000 malformed DICOM files and count what the viewer's decode path does with them.

    nice -n 10 .venv/bin/python bench/make_hostile_corpus.py --out /tmp/hostile_corpus [--n 2000]
        [--before /tmp/before_tree]

Files: seeded mutations (truncations, bit flips, byte runs, header-length edits) of real files
(pydicom's test files, ../shared/data/dicom when present) plus the generated hostile builders of
tests/hostile_files.py with random declared sizes. Nothing is written into the repository.

Outcomes per file, for the viewer's decode path:
* after: ``engine.service.load_frame`` (the sandboxed boundary) called in this process: ok /
  clean error (LoadError) / escaped exception; this process must survive every file.
* before (``--before DIR``: a tree holding the pre-change engine, e.g. from ``git show HEAD:...``):
  the old in-process ``engine.dicom.pixels.load_frame`` in a forked child per file, so that a
  crash (signal), hang (> 20 s) or memory kill (> 4 GiB address space) is counted instead of
  ending the run.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _sources() -> list[Path]:
    import pydicom

    base = Path(pydicom.__file__).parent / "data" / "test_files"
    out = [p for p in base.glob("*.dcm") if p.stat().st_size < 2_000_000]
    shared = REPO.parent / "shared" / "data" / "dicom"
    if shared.is_dir():
        out += [p for p in shared.rglob("*.dcm") if p.stat().st_size < 6_000_000]
    return sorted(out)


def make(out: Path, n: int, seed: int = 16) -> list[Path]:
    import hostile_files as hf

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    srcs = _sources()
    files: list[Path] = []
    for name, (build, _) in hf.BUILDERS.items():
        files.append(build(out / name))
    while len(files) < n:
        k = len(files)
        src = rng.choice(srcs)
        data = bytearray(src.read_bytes())
        kind = rng.choice(("truncate", "flips", "run", "length", "flips"))
        if kind == "truncate":
            data = data[:rng.randrange(132, len(data))]
        elif kind == "flips":
            for _ in range(rng.randint(1, 40)):
                i = rng.randrange(132, len(data))
                data[i] ^= 1 << rng.randrange(8)
        elif kind == "run":
            i = rng.randrange(132, len(data))
            data[i:i + rng.randint(4, 64)] = bytes([rng.choice((0x00, 0xFF, 0x7F))]) * rng.randint(4, 64)
        else:  # an element length near the pixel data or in the header set to something huge
            i = rng.randrange(132, min(len(data), 2048)) & ~1
            data[i:i + 4] = rng.choice((b"\xff\xff\xff\x7f", b"\x00\x00\x00\x00", b"\xf0\xff\xff\xff"))
        p = out / f"m{k:05d}_{kind}_{src.stem[:24]}.dcm"
        p.write_bytes(bytes(data))
        files.append(p)
    return files


def after(files: list[Path]) -> Counter:
    from engine.errors import LoadError
    from engine.service import load_frame

    c: Counter = Counter()
    for p in files:
        try:
            load_frame(p)
            c["ok"] += 1
        except LoadError as e:
            r = e.reason
            c["clean error"] += 1
            if "crashed" in r or "killed" in r:
                c["  of which: decoder crash contained"] += 1
            elif "longer than" in r:
                c["  of which: hang stopped by the time limit"] += 1
            elif "memory" in r:
                c["  of which: memory refused or limited"] += 1
        except BaseException as e:  # noqa: BLE001 - counted, that is the point
            c[f"escaped {type(e).__name__}"] += 1
    return c


def before(files: list[Path], tree: Path, timeout_s: float = 20.0) -> Counter:
    """Old in-process decode, one forked child per file (the harness survives what the viewer did not)."""
    import resource
    import signal

    sys.path.insert(0, str(tree))
    for m in [m for m in sys.modules if m == "engine" or m.startswith("engine.")]:
        del sys.modules[m]
    import engine.dicom.pixels as px  # noqa: F401 - the old module, imported before forking
    from engine.errors import LoadError

    c: Counter = Counter()
    for p in files:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))
            code = b"o"
            try:
                px.load_frame(str(p))
            except LoadError:
                code = b"e"
            except MemoryError:
                code = b"m"
            except BaseException:  # noqa: BLE001
                code = b"x"
            os.write(w, code)
            os._exit(0)
        os.close(w)
        t0 = time.monotonic()
        status = None
        while time.monotonic() - t0 < timeout_s:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            c["hang"] += 1
            continue
        got = os.read(r, 1)
        os.close(r)
        if os.WIFSIGNALED(status):
            c["crash" if os.WTERMSIG(status) != signal.SIGKILL else "memory kill"] += 1
        else:
            c[{b"o": "ok", b"e": "clean error", b"m": "memory kill", b"x": "escaped exception"}.get(got, "crash")] += 1
    return c


def _series_of(p: Path):
    from engine.dicom.index import index_path

    found = index_path(p).all_series()
    return found[0] if found else None


def batch_path(files: list[Path], tree: Path | None, timeout_s: float = 20.0) -> Counter:
    """The batch decode stage (decode_series in a LimitedPool child, pixels kept for the analysis)
    and then what the analysis would decode in the parent: with ``tree`` the old engine, where a
    single multi-frame CT is decoded again in the parent (done here in a forked child so a hang
    or memory blow-up is counted); without, the new engine, whose parent reads only the child's
    pixels or decodes through the boundary. "misleading reason" = a file refused with a memory
    or "install the plugins" reason after an earlier file hit the memory limit in the same child."""
    if tree is not None:
        sys.path.insert(0, str(tree))
        for m in [m for m in sys.modules if m == "engine" or m.startswith("engine.")]:
            del sys.modules[m]
    import resource
    import signal

    from engine.errors import LoadError
    from engine.dicom.safe_decode import LimitedPool, decode_series, series_timeout

    c: Counter = Counter()
    memory_hit = False
    with LimitedPool(1, timeout_s=timeout_s) as pool:
        for p in files:
            se = _series_of(p)
            if se is None:
                c["index problem (clean)"] += 1
                continue
            try:
                dec = pool.submit(decode_series, se, True, timeout_s=series_timeout(timeout_s, 1)).result()
            except LoadError as e:
                r = e.reason
                if memory_hit and ("install the pydicom" in r or "not enough memory" in r):
                    c["misleading reason after a memory hit"] += 1
                elif "crashed" in r or "killed" in r:
                    c["crash contained"] += 1
                elif "longer than" in r:
                    c["hang stopped"] += 1
                else:
                    c["clean error"] += 1
                memory_hit = memory_hit or "memory" in r
                continue
            parent_decodes = (tree is not None and se.kind == "ct" and len(se.instances) == 1
                              and se.instances[0].frames > 1)
            if not parent_decodes:
                c["ok"] += 1
                continue
            from engine.dicom.volume import load_volume

            pid = os.fork()
            if pid == 0:
                os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
                resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))
                try:
                    load_volume(se)
                    os._exit(0)
                except MemoryError:
                    os._exit(3)
                except BaseException:  # noqa: BLE001
                    os._exit(1)
            t0 = time.monotonic()
            while time.monotonic() - t0 < timeout_s:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.01)
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                c["hang in the batch parent"] += 1
                continue
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
            c[{0: "ok", 1: "error in the batch parent", 3: "memory kill of the batch parent"}.get(
                code, "crash of the batch parent")] += 1
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/hostile_corpus"))
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--before", type=Path, default=None)
    ap.add_argument("--only", choices=("before", "after", "both", "batch-before", "batch-after"), default="both")
    a = ap.parse_args()
    t0 = time.time()
    files = make(a.out, a.n)
    print(f"{len(files)} files in {a.out} ({time.time() - t0:.0f} s)")
    if a.only.startswith("batch-"):
        t0 = time.time()
        tree = a.before if a.only == "batch-before" else None
        print(f"{a.only}: {dict(batch_path(files, tree))}  [{time.time() - t0:.0f} s]", flush=True)
        return
    if a.only in ("after", "both"):
        t0 = time.time()
        print(f"after  (viewer path, sandboxed): {dict(after(files))}  [{time.time() - t0:.0f} s]", flush=True)
    if a.before is not None and a.only in ("before", "both"):
        t0 = time.time()
        print(f"before (viewer path, in-process): {dict(before(files, a.before))}  [{time.time() - t0:.0f} s]")


if __name__ == "__main__":
    main()
