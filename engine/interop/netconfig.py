"""DICOM network settings: our AE title/port, PACS peers, the calling-AE allow-list, TLS files.

Persisted as JSON in ``engine.paths.user_data_dir()/network.json`` so the settings dialog, the
storage SCP and the query/retrieve code all read one source. AE titles follow PS3.5 6.2
(AE VR: at most 16 characters, no backslash or control characters, not all spaces).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine import paths

SETTINGS_FILE = "network.json"


def validate_ae_title(title: str, what: str = "AE title") -> str:
    """Return ``title`` stripped, or raise ValueError saying how to fix it (PS3.5 6.2, VR AE)."""
    t = (title or "").strip()
    if not t:
        raise ValueError(f"{what} is empty: enter 1-16 characters, e.g. CHESTVIEW.")
    if len(t) > 16:
        raise ValueError(f"{what} '{t}' is longer than 16 characters: shorten it.")
    if "\\" in t or any(ord(c) < 32 or ord(c) > 126 for c in t):
        raise ValueError(f"{what} '{t}' has a backslash or a non-ASCII/control character: "
                         "use letters, digits, '_' or '-'.")
    return t


def validate_port(port: int, what: str = "port") -> int:
    p = int(port)
    if not 1 <= p <= 65535:
        raise ValueError(f"{what} {p} is outside 1-65535: the DICOM default is 104 or 11112.")
    return p


@dataclass
class TLSSettings:
    """Optional DICOM TLS (PS3.15 B.9 'BCP 195 TLS Secure Transport Connection Profile')."""

    enabled: bool = False        # our storage SCP speaks TLS only; SCU connections use TLS per Peer.tls
    cert_file: str = ""          # our certificate (PEM), presented as SCP and, if set, as SCU
    key_file: str = ""           # its private key (PEM)
    ca_file: str = ""            # CA bundle / peer certificates we trust (PEM); empty = system CAs
    verify_peer: bool = True     # SCU: check the server certificate; SCP: require client certs
                                 # when ca_file is set

    def validate(self) -> None:
        if not self.enabled:
            return
        for label, f in (("certificate", self.cert_file), ("private key", self.key_file)):
            if not f:
                raise ValueError(f"TLS is on but no {label} file is set: choose a PEM file "
                                 "in Network settings, or turn TLS off.")
            if not Path(f).is_file():
                raise ValueError(f"TLS {label} file {f} does not exist: choose an existing PEM file.")
        if self.ca_file and not Path(self.ca_file).is_file():
            raise ValueError(f"TLS CA file {self.ca_file} does not exist: choose an existing PEM file.")


@dataclass
class Peer:
    """A remote DICOM node (PACS) we query, retrieve from and send results to."""

    name: str                    # label shown in the GUI
    ae_title: str
    host: str
    port: int
    tls: bool = False            # connect to this peer with TLS (our TLSSettings supply the files)
    retrieve: str = "C-MOVE"     # "C-MOVE" (peer pushes to our SCP) or "C-GET" (same association)

    def validate(self) -> None:
        if not self.name.strip():
            raise ValueError("A peer has no name: give it a label such as 'Hospital PACS'.")
        validate_ae_title(self.ae_title, f"Peer '{self.name}' AE title")
        if not self.host.strip():
            raise ValueError(f"Peer '{self.name}' has no host: enter a host name or IP address.")
        validate_port(self.port, f"Peer '{self.name}' port")
        if self.retrieve not in ("C-MOVE", "C-GET"):
            raise ValueError(f"Peer '{self.name}' retrieve method must be C-MOVE or C-GET.")


@dataclass
class NetworkSettings:
    """Everything the DICOM network code needs; see module docstring for the file location."""

    ae_title: str = "CHESTVIEW"
    port: int = 11112
    bind_address: str = "0.0.0.0"
    peers: list[Peer] = field(default_factory=list)
    # Calling AE titles allowed to open associations with our SCP (C-STORE, C-ECHO). The
    # configured peers' titles are always allowed; an empty effective list means our SCP
    # refuses to start rather than accepting anyone (PS3.15 leaves access control to us).
    allowed_calling_aets: list[str] = field(default_factory=list)
    allow_peers: bool = True
    start_scp: bool = False      # start the storage SCP when the viewer starts
    timeout_s: float = 30.0      # ACSE/DIMSE/network timeout
    tls: TLSSettings = field(default_factory=TLSSettings)

    def effective_allow_list(self) -> list[str]:
        """Calling AE titles our SCP accepts: the allow-list plus (by default) every peer's title."""
        out: list[str] = []
        for t in self.allowed_calling_aets + ([p.ae_title for p in self.peers] if self.allow_peers else []):
            t = t.strip()
            if t and t not in out:
                out.append(t)
        return out

    def peer(self, name: str) -> Peer:
        for p in self.peers:
            if p.name == name:
                return p
        raise KeyError(f"No peer named '{name}': add it in Network settings.")

    def validate(self) -> None:
        """Raise ValueError with a user-actionable message for the first problem found."""
        validate_ae_title(self.ae_title, "Our AE title")
        validate_port(self.port, "Our port")
        for t in self.allowed_calling_aets:
            validate_ae_title(t, "Allowed calling AE title")
        names = [p.name for p in self.peers]
        if len(set(names)) != len(names):
            raise ValueError("Two peers have the same name: give each peer a unique label.")
        for p in self.peers:
            p.validate()
        if not self.timeout_s > 0:
            raise ValueError("The network timeout must be positive (e.g. 30 s).")
        self.tls.validate()

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NetworkSettings:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        peers = [Peer(**{k: v for k, v in p.items() if k in Peer.__dataclass_fields__})
                 for p in known.pop("peers", [])]
        tls_d = known.pop("tls", {}) or {}
        tls = TLSSettings(**{k: v for k, v in tls_d.items() if k in TLSSettings.__dataclass_fields__})
        return cls(peers=peers, tls=tls, **known)


def settings_path() -> Path:
    return paths.user_data_dir() / SETTINGS_FILE


def load_settings(path: Path | None = None) -> NetworkSettings:
    """Saved settings, or defaults when the file does not exist yet.

    A corrupt file raises ValueError naming the file, so the user can fix or delete it.
    """
    p = path or settings_path()
    if not p.exists():
        return NetworkSettings()
    try:
        return NetworkSettings.from_dict(json.loads(p.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"Network settings file {p} is unreadable ({exc}): fix it or delete it "
                         "to start from defaults.") from exc


def save_settings(settings: NetworkSettings, path: Path | None = None) -> Path:
    """Validate, then write atomically (temp file + rename) so a crash never leaves half a file."""
    settings.validate()
    p = path or settings_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".network-", suffix=".json", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(settings.to_dict(), f, indent=2)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
