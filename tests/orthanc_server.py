"""Test helper: a throw-away Debian ``orthanc`` PACS on loopback.

``ensure_orthanc()`` installs the Debian package with apt-get when it is missing (we run as root
in CI) and returns the binary, or None when that is impossible (tests then skip). ``OrthancServer``
writes a config into a temp folder (storage, index, log there too), picks free ports, starts the
binary, waits for its REST API, and stops it by PID.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ORTHANC_AET = "ORTHANC"


def free_port() -> int:
    """A TCP port that was free a moment ago on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_install_failed = False      # tried once in this process and failed: later modules skip at once


def ensure_orthanc(timeout_s: int = 300) -> str | None:
    """Path of the Orthanc binary; apt-get installs Debian's ``orthanc`` if needed (root only)."""
    global _install_failed
    exe = shutil.which("Orthanc") or (("/usr/sbin/Orthanc") if Path("/usr/sbin/Orthanc").exists() else None)
    if exe:
        return exe
    if _install_failed or not shutil.which("apt-get") or os.geteuid() != 0:
        return None
    _install_failed = True
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, timeout=timeout_s,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "orthanc"],
                       env=env, check=True, timeout=timeout_s,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (subprocess.SubprocessError, OSError):
        return None
    exe = shutil.which("Orthanc") or (("/usr/sbin/Orthanc") if Path("/usr/sbin/Orthanc").exists() else None)
    _install_failed = exe is None
    return exe


class OrthancServer:
    """One Orthanc process with its own config/storage in ``workdir``; loopback only."""

    def __init__(self, exe: str, workdir: Path, modalities: dict[str, tuple[str, str, int]] | None = None,
                 aet: str = ORTHANC_AET, tls: dict | None = None):
        self.exe = exe
        self.workdir = Path(workdir)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.modalities = dict(modalities or {})
        self.tls = tls or {}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "orthanc.log"

    # -- lifecycle ------------------------------------------------------------------------------
    def config(self) -> dict:
        cfg = {
            "Name": "ChestViewTestPACS",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": True,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "DicomScuTimeout": 10,
            "StorageCompression": False,
            "StableAge": 1,
            "Plugins": [],
            "ConcurrentJobs": 2,
        }
        cfg.update(self.tls)
        return cfg

    def start(self, timeout_s: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(), indent=2))
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen([self.exe, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                self.rest("GET", "/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout_s} s: {self.log_tail()}")

    def stop(self) -> None:
        """Stop our Orthanc by its PID (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # -- REST on loopback -----------------------------------------------------------------------
    def rest(self, method: str, path: str, body: bytes | dict | None = None, raw: bool = False):
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            payload = r.read()
        return payload if raw else (json.loads(payload) if payload else None)

    def upload(self, path: Path) -> dict:
        """POST /instances: store a DICOM file into Orthanc without DICOM networking."""
        return self.rest("POST", "/instances", Path(path).read_bytes())

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        self.rest("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.rest("GET", f"/instances/{orthanc_id}/file", raw=True)

    def find_instances(self, **tags: str) -> list[str]:
        """Orthanc IDs of instances whose main tags match (e.g. SOPInstanceUID=...)."""
        return self.rest("POST", "/tools/find", {"Level": "Instance", "Query": tags})


# -- test images ----------------------------------------------------------------------------------
SECRET_NAME = "Quixote^Dulcinea"       # distinctive identifiers, so log checks cannot pass by accident
SECRET_ID = "CV-PID-735519"


def make_sources(folder: Path, n_ct: int = 3) -> dict[str, list[Path]]:
    """Real pydicom test images in ``folder``: RG1 chest CR (as shipped) and ``n_ct`` CT slices
    made from CT_small.dcm (one new study/series, distinct pixels and positions, distinctive
    patient name/ID). Returns {"cr": [path], "ct": [paths in position order]}.
    """
    import numpy as np
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    cr = folder / "RG1_UNCR.dcm"
    cr.write_bytes(Path(get_testdata_file("RG1_UNCR.dcm")).read_bytes())
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    cts = []
    for i in range(n_ct):
        ds = dcmread(get_testdata_file("CT_small.dcm"))
        ds.PatientName = SECRET_NAME
        ds.PatientID = SECRET_ID
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.StudyDate = "20240315"
        ds.SeriesNumber = 2
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * i]
        ds.SliceLocation = z + 5.0 * i
        arr = ds.pixel_array.astype(np.int16)
        arr = np.clip(arr + np.int16(7 * i), -2000, 4000).astype(arr.dtype)
        ds.PixelData = arr.tobytes()
        p = folder / f"ct_{i + 1:03d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        cts.append(p)
    return {"cr": [cr], "ct": cts}
