"""TLS with certificate reload: rotated certificates are picked up without a restart.

cert-manager and similar tools replace the Secret's files in place; the context is re-loaded
when either file's stat fingerprint changes, and new handshakes use the new certificate while
established connections keep theirs. A bad new pair is logged and the old one kept.

Each certificate pair gets a fresh context, and every handshake is switched to the current one
by the listening context's SNI callback (OpenSSL calls it for every ClientHello, with no server
name when a client connects by IP address). Loading a new pair into the live context instead
(a) left it, on a key that did not match yet mid-rotation, with the new certificate and no key,
failing every later handshake; (b) kept the old certificate beside the new one when the key
type changed (OpenSSL holds one per type), so after an ECDSA to RSA rotation ordinary clients
kept getting the old certificate until it expired; (c) changed a context that handshakes read
on the event loop's thread from a worker thread. A fresh context is built off to the side and
swapped in by one reference assignment.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Final

from simple_oci_registry.fingerprint import Fingerprint

__all__ = ["ReloadingTLS"]

log = logging.getLogger(__name__)

POLL_SECONDS: Final = 10.0


class ReloadingTLS:
    """An SSL context for the server whose certificate chain follows its files."""

    def __init__(self, cert: Path, key: Path) -> None:
        self._cert, self._key = cert, key
        self._seen = self._fingerprints()
        self.context = _server_context(cert, key)  # the listening socket's context
        self.context.sni_callback = self._select
        self._current = self.context

    def _select(self, connection: ssl.SSLObject, server_name: str | None,
                context: ssl.SSLContext) -> None:
        """Hand each new connection the current pair (runs during the handshake)."""
        current = self._current
        if current is not context:
            connection.context = current

    def _fingerprints(self) -> tuple[Fingerprint | None, Fingerprint | None]:
        def one(path: Path) -> Fingerprint | None:
            try:
                return Fingerprint.of_path(str(path))
            except OSError:
                return None
        return one(self._cert), one(self._key)

    def reload_if_changed(self) -> bool:
        """Re-load the chain if the files changed; True when a new certificate is in use."""
        seen = self._fingerprints()
        if seen == self._seen or None in seen:
            return False
        try:
            fresh = _server_context(self._cert, self._key)
        except (ssl.SSLError, OSError) as exc:
            # Mid-rotation the key may not match the certificate yet: retry at the next poll.
            log.warning("not reloading TLS certificate %s: %s", self._cert, exc)
            return False
        self._current = fresh  # new handshakes only; established connections keep theirs
        self._seen = seen
        log.info("reloaded TLS certificate %s", self._cert)
        return True

    async def watch(self, interval: float = POLL_SECONDS) -> None:
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.reload_if_changed)


def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context
