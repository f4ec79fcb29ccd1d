"""Hostile files in batch: the hostile corpus in patient-named folders beside genuine studies.

rc 0; every hostile file is a problem or a failed row with the right reason; the genuine studies
after them are analysed; with --deidentify neither stderr nor results.json names a patient or a
patient-named folder.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostile_files as hf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_batch_survives_the_hostile_corpus_without_leaking_identifiers(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    for name, (build, _) in hf.BUILDERS.items():
        d = inp / "Doe_John_1961" / name.replace(".dcm", "")
        d.mkdir(parents=True)
        build(d / name)
    from pydicom.data import get_testdata_file

    import shutil

    (inp / "media").mkdir()      # a DICOMDIR whose referenced files were not copied
    shutil.copy(get_testdata_file("DICOMDIR"), inp / "media" / "DICOMDIR")
    for k in range(2):   # genuine studies sorted after the hostile ones
        (inp / f"zz_genuine{k}").mkdir()
        hf.genuine_cr(inp / f"zz_genuine{k}" / "cr.dcm", seed=10 + k)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "main.py"), "batch", str(inp), "--out", str(out),
                        "--workers", "1", "--deidentify"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    texts = [p["reason"] for p in res["problems"]] + [str(row.get("error") or "") for row in res["rows"]]
    for name, (_, frag) in hf.BUILDERS.items():
        if frag:
            assert any(frag in t for t in texts), (name, texts)
    assert any("media directory" in t for t in texts) and any("missing on disk" in t for t in texts)
    assert all(p["path"].startswith("file-") for p in res["problems"] if p["path"])   # hashed names
    # the genuine studies after the hostile ones were decoded by a healthy child (a thumbnail and
    # a decode time) and reached the model stage: no decode reason, whatever the model said
    uids = {hf._uid(f"genuine{10 + k}series") for k in range(2)}
    genuine = [row for row in res["rows"] if row["series_uid"] in uids]
    assert len(genuine) == 2
    for row in genuine:
        assert row["thumbnail"] and row["timings_ms"].get("decode", 0) > 0, row
        assert not row.get("error") or row["error"].startswith("Analysis failed ("), row["error"]
    leaked = r.stderr + r.stdout + json.dumps(res["problems"])
    for ident in ("Doe_John", "Hostile", "HOSTILE-", "Hannah"):
        assert ident not in leaked, ident
    assert str(tmp_path) not in r.stderr
