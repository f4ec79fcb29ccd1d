"""The storage SCP: a C-STORE/C-ECHO listener (PS3.4 annexes A and B) in a background thread.

Only calling AE titles on the allow-list may associate and the called AE title must be ours;
optional TLS per PS3.15 B.9. Each received object goes through ``received.StoreHandler``
(checked, then filed, or answered with its PS3.4 B.2.3 failure status).
"""
from __future__ import annotations

import logging
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom import sop_class as sc

from engine.interop.netconfig import NetworkSettings
from engine.interop.network import NetworkError, make_ae, server_ssl_context
from engine.interop.received import StoredFn, StoredInstance, StoreHandler

log = logging.getLogger(__name__)


class StorageSCP:
    """C-STORE/C-ECHO listener in a background thread, filing into ``store_dir()``.

    Only calling AE titles in ``settings.effective_allow_list()`` may associate; the called AE
    title must be ours. TLS when ``settings.tls.enabled``.
    """

    def __init__(self, settings: NetworkSettings, root: Path | None = None,
                 on_stored: StoredFn | None = None):
        self.settings = settings
        self.root = root
        self.handler = StoreHandler(root, on_stored)
        self._ae: AE | None = None
        self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if self._server is None:
            raise NetworkError("The storage SCP is not running.")
        return int(self._server.server_address[1])

    @property
    def stored(self) -> list[StoredInstance]:
        with self.handler.lock:
            return list(self.handler.stored)

    def start(self) -> int:
        """Start listening; returns the bound port (settings.port 0 = any free port)."""
        if self._server is not None:
            return self.port
        s = self.settings
        allow = s.effective_allow_list()
        if not allow:
            raise NetworkError("No calling AE titles are allowed to send to us: add your PACS as a "
                               "peer or add its AE title to the allow-list in Network settings.")
        ae = make_ae(s)
        ae.require_called_aet = True
        ae.require_calling_aet = allow
        ae.maximum_associations = 16
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(sc.Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ssl_ctx = server_ssl_context(s.tls) if s.tls.enabled else None
        try:
            self._server = ae.start_server((s.bind_address, int(s.port)), block=False, ssl_context=ssl_ctx,
                                           evt_handlers=[(evt.EVT_C_STORE, self.handler),
                                                         (evt.EVT_RELEASED, self.handler.on_released),
                                                         (evt.EVT_ABORTED, self.handler.on_aborted)])
        except OSError as exc:
            raise NetworkError(f"Cannot listen on port {s.port} ({exc.strerror or exc}): choose another "
                               "port in Network settings or stop the program using it.") from exc
        self._ae = ae
        log.info("Storage SCP %s listening on port %d (TLS %s, %d allowed callers)",
                 s.ae_title, self.port, "on" if ssl_ctx else "off", len(allow))
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None

    def __enter__(self) -> StorageSCP:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
