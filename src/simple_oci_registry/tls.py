"""TLS with certificate reload: rotated certificates are picked up without a restart.

cert-manager and similar tools replace the Secret's files in place; the context is re-loaded
when either file's stat fingerprint changes, and new handshakes use the new certificate while
established connections keep theirs. A bad new pair is logged and the old one kept.

Why a new pair is first loaded into a throwaway context: OpenSSL installs the new certificate
before it reads the key, and on a key mismatch it drops the key and keeps the new certificate,
so a failed ``load_cert_chain`` on the live context would leave it with no usable pair and fail
every later handshake. Probe and live load read the same bytes (anonymous memory files), so
a rotation between the two reads cannot slip an unchecked pair in. The live context is changed
on the event loop's thread only, because handshakes (SSL_new) copy its certificate without a
lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Iterator
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
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._seen = self._fingerprints()
        self.context.load_cert_chain(cert, key)

    def _fingerprints(self) -> tuple[Fingerprint | None, Fingerprint | None]:
        def one(path: Path) -> Fingerprint | None:
            try:
                return Fingerprint.of_path(str(path))
            except OSError:
                return None
        return one(self._cert), one(self._key)

    def reload_if_changed(self) -> bool:
        """Re-load the chain if the files changed; True when a new certificate is in use."""
        pending = self._read_if_changed()
        return pending is not None and self._apply(*pending)

    def _read_if_changed(self) -> tuple[tuple[Fingerprint | None, Fingerprint | None],
                                         bytes, bytes] | None:
        """The files' fingerprints and contents when they changed (blocking file access)."""
        seen = self._fingerprints()
        if seen == self._seen or None in seen:
            return None
        try:
            return seen, self._cert.read_bytes(), self._key.read_bytes()
        except OSError as exc:
            log.warning("not reloading TLS certificate %s: %s", self._cert, exc)
            return None

    def _apply(self, seen: tuple[Fingerprint | None, Fingerprint | None], cert: bytes,
               key: bytes) -> bool:
        try:
            with _memory_file(cert) as cert_path, _memory_file(key) as key_path:
                # Probe first (see the module docstring): a failed load on the live context
                # would leave it with the new certificate and no key.
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path)
                self.context.load_cert_chain(cert_path, key_path)
        except (ssl.SSLError, OSError) as exc:
            # Mid-rotation the key may not match the certificate yet: retry at the next poll.
            log.warning("not reloading TLS certificate %s: %s", self._cert, exc)
            return False
        self._seen = seen
        log.info("reloaded TLS certificate %s", self._cert)
        return True

    async def watch(self, interval: float = POLL_SECONDS) -> None:
        while True:
            await asyncio.sleep(interval)
            pending = await asyncio.to_thread(self._read_if_changed)
            if pending is not None:
                self._apply(*pending)  # on the loop's thread: handshakes read the context


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path to ``data`` in an anonymous memory file (no key material written to disk)."""
    fd = os.memfd_create("simple-oci-registry-tls", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as file:
            file.write(data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
