"""HTTPS with certificate reload (--tls-cert/--tls-key), in process and against a real server.

The certificates are made here with ``cryptography``: a self-signed CA and server certificates
for 127.0.0.1 (an IP SAN, as clients check) that differ by serial number, so a test can tell
which one a handshake was answered with. Reload is driven by ``ReloadingTLS.reload_if_changed``
in process; the real server polls its files every 10 s, so the functional test waits for the
served serial to change with a bound well above that.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from simple_oci_registry.app import make_app
from simple_oci_registry.config import Config
from simple_oci_registry.tls import ReloadingTLS
from tests.conftest import require
from tests.images import StandardImages
from tests.server import RegistryProcess

POLL_LIMIT = 30.0  # seconds; the server checks its files every 10 s


# ------------------------------------------------------------------------------ certificates


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass
class CA:
    """A self-signed certificate authority that issues server certificates for 127.0.0.1."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls) -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(_name("simple-oci-registry test CA"))
                .issuer_name(_name("simple-oci-registry test CA"))
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, serial: int, *, rsa_key: bool = False) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for 127.0.0.1 with the given serial number."""
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048) if rsa_key
            else ec.generate_private_key(ec.SECP256R1()))
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(_name("127.0.0.1"))
                .issuer_name(self.cert.subject)
                .public_key(key.public_key())
                .serial_number(serial)
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


def replace_file(path: Path, data: bytes) -> None:
    """Write beside, then rename into place (how secret volumes and cert tools rotate)."""
    incoming = path.with_name(path.name + ".incoming")
    incoming.write_bytes(data)
    os.replace(incoming, path)


@dataclass
class TLSFiles:
    ca: CA
    directory: Path

    @property
    def cert(self) -> Path:
        return self.directory / "tls.crt"

    @property
    def key(self) -> Path:
        return self.directory / "tls.key"

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca" / "ca.crt"

    def install(self, serial: int, *, cert_only: bool = False,
                rsa_key: bool = False) -> tuple[bytes, bytes]:
        cert, key = self.ca.issue(serial, rsa_key=rsa_key)
        if not cert_only:
            replace_file(self.key, key)
        replace_file(self.cert, cert)
        return cert, key

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA.create()


@pytest.fixture
def tls_files(ca: CA, tmp_path: Path) -> TLSFiles:
    files = TLSFiles(ca, tmp_path / "tls")
    files.ca_file.parent.mkdir(parents=True)
    files.ca_file.write_bytes(ca.pem())
    files.install(1001)
    return files


# ------------------------------------------------------------------------------ HTTPS client


async def https_get(port: int, context: ssl.SSLContext, path: str = "/v2/"
                    ) -> tuple[int, int, bytes]:
    """(status, serial number of the server's certificate, body) over a new connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                   server_hostname="127.0.0.1")
    try:
        peer = writer.get_extra_info("peercert")
        serial = int(peer["serialNumber"], 16)
        status, body = await _exchange(reader, writer, path)
        return status, serial, body
    finally:
        writer.close()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    path: str) -> tuple[int, bytes]:
    """One keep-alive request on an open connection."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers["content-length"]))
    return int(lines[0].split()[1]), body


@dataclass
class Served:
    tls: ReloadingTLS
    port: int


@pytest.fixture
async def served(tls_files: TLSFiles, shared_images: StandardImages
                 ) -> AsyncIterator[Served]:
    """The registry app over HTTPS in this process, with the ReloadingTLS the CLI uses."""
    tls = ReloadingTLS(tls_files.cert, tls_files.key)
    runner = web.ServerRunner(make_app(Config(directory=shared_images.root)).server())
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    site = web.SockSite(runner, sock, ssl_context=tls.context)
    await site.start()
    try:
        yield Served(tls, sock.getsockname()[1])
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------------------ in process


async def test_https_verifies_against_the_ca(served: Served, tls_files: TLSFiles) -> None:
    status, serial, body = await https_get(served.port, tls_files.client_context())
    assert (status, serial, json.loads(body)) == (200, 1001, {})
    # A client that does not trust the CA refuses the certificate.
    with pytest.raises(ssl.SSLCertVerificationError):
        await https_get(served.port, ssl.create_default_context())


async def test_reload_serves_the_new_certificate(served: Served, tls_files: TLSFiles) -> None:
    context = tls_files.client_context()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port, ssl=context)
    try:
        assert await _exchange(reader, writer, "/v2/") == (200, b"{}")
        assert served.tls.reload_if_changed() is False  # nothing changed yet

        tls_files.install(1002)
        assert served.tls.reload_if_changed() is True
        assert served.tls.reload_if_changed() is False  # once per change
        status, serial, _ = await https_get(served.port, context)
        assert (status, serial) == (200, 1002)
        # The connection made before the rotation keeps working with its certificate.
        assert await _exchange(reader, writer, "/v2/") == (200, b"{}")
        assert int(writer.get_extra_info("peercert")["serialNumber"], 16) == 1001
    finally:
        writer.close()


def rsa_only_client(files: TLSFiles) -> ssl.SSLContext:
    """A TLS 1.2 client that can only take an RSA certificate."""
    context = files.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    return context


async def test_rotation_to_another_key_type_replaces_the_certificate(
        served: Served, tls_files: TLSFiles) -> None:
    # OpenSSL keeps one certificate per key type in a context: loading an RSA pair into the
    # one holding the ECDSA pair kept serving the old ECDSA certificate to ordinary clients.
    context = tls_files.client_context()
    tls_files.install(2001, rsa_key=True)
    assert served.tls.reload_if_changed() is True
    assert (await https_get(served.port, context))[:2] == (200, 2001)
    assert (await https_get(served.port, rsa_only_client(tls_files)))[:2] == (200, 2001)
    tls_files.install(2002)  # and back to ECDSA: the RSA certificate is not served any more
    assert served.tls.reload_if_changed() is True
    assert (await https_get(served.port, context))[:2] == (200, 2002)
    with pytest.raises((ssl.SSLError, ConnectionError)):  # no certificate it can take
        await https_get(served.port, rsa_only_client(tls_files))


async def test_mismatched_key_keeps_the_old_certificate(
        served: Served, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture) -> None:
    # Mid-rotation: the new certificate is in place, its key not yet.
    context = tls_files.client_context()
    _, new_key = tls_files.install(1003, cert_only=True)
    with caplog.at_level(logging.WARNING, logger="simple_oci_registry.tls"):
        assert served.tls.reload_if_changed() is False
    assert "not reloading TLS certificate" in caplog.text
    for _ in range(3):
        status, serial, _ = await https_get(served.port, context)
        assert (status, serial) == (200, 1001)
    # The key arrives: the next check takes the new pair.
    replace_file(tls_files.key, new_key)
    assert served.tls.reload_if_changed() is True
    status, serial, _ = await https_get(served.port, context)
    assert (status, serial) == (200, 1003)


async def test_missing_or_broken_files_keep_the_old_certificate(
        served: Served, tls_files: TLSFiles) -> None:
    context = tls_files.client_context()
    tls_files.key.unlink()
    assert served.tls.reload_if_changed() is False
    assert (await https_get(served.port, context))[:2] == (200, 1001)
    tls_files.key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n")
    assert served.tls.reload_if_changed() is False
    replace_file(tls_files.cert, b"not a certificate either")
    assert served.tls.reload_if_changed() is False
    assert (await https_get(served.port, context))[:2] == (200, 1001)
    tls_files.install(1004)
    assert served.tls.reload_if_changed() is True
    assert (await https_get(served.port, context))[:2] == (200, 1004)


async def test_watch_applies_a_rotation(served: Served, tls_files: TLSFiles) -> None:
    context = tls_files.client_context()
    watcher = asyncio.create_task(served.tls.watch(interval=0.05))
    try:
        tls_files.install(1006, cert_only=True)  # half-rotated first: ignored, retried
        await asyncio.sleep(0.2)
        assert (await https_get(served.port, context))[:2] == (200, 1001)
        tls_files.install(1006)
        deadline = time.monotonic() + POLL_LIMIT
        while (await https_get(served.port, context))[1] != 1006:
            assert time.monotonic() < deadline, "the watcher never applied the rotation"
            await asyncio.sleep(0.05)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


# ------------------------------------------------------------------------------ real process


def start_tls_registry(directory: Path, files: TLSFiles, monkeypatch: pytest.MonkeyPatch,
                       log_path: Path) -> RegistryProcess:
    # RegistryProcess waits for /v2/ with urllib, which trusts what SSL_CERT_FILE names; only
    # while it starts, so that the clients below trust nothing but what they are given.
    with monkeypatch.context() as patch:
        patch.setenv("SSL_CERT_FILE", str(files.ca_file))
        return RegistryProcess(directory, "--tls-cert", str(files.cert), "--tls-key",
                               str(files.key), log_path=log_path).start()


def served_serial(port: int, context: ssl.SSLContext) -> int:
    status, serial, _ = asyncio.run(https_get(port, context))
    assert status == 200
    return serial


def test_real_server_serves_https_and_picks_up_a_rotated_certificate(
        tls_files: TLSFiles, shared_images: StandardImages, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    registry = start_tls_registry(shared_images.root, tls_files, monkeypatch,
                                  tmp_path / "registry.log")
    try:
        assert registry.url.startswith("https://127.0.0.1:")
        port = int(registry.host.rsplit(":", 1)[1])
        context = tls_files.client_context()
        assert served_serial(port, context) == 1001
        tls_files.install(1005)
        deadline = time.monotonic() + POLL_LIMIT
        while served_serial(port, context) != 1005:
            assert time.monotonic() < deadline, "rotated certificate never served"
            time.sleep(0.2)
        # Info lines reach the log file through the access log's writer thread (logs.py),
        # within a fraction of a second: wait for it rather than race it.
        while "reloaded TLS certificate" not in registry.log():
            assert time.monotonic() < deadline, "the reload was never logged"
            time.sleep(0.1)
    finally:
        assert registry.stop() == 0


@pytest.mark.clients
def test_skopeo_pulls_over_tls_with_a_cert_dir(
        tls_files: TLSFiles, shared_images: StandardImages, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    skopeo = require("skopeo")
    registry = start_tls_registry(shared_images.root, tls_files, monkeypatch,
                                  tmp_path / "registry.log")
    try:
        out = tmp_path / "out"
        # skopeo's --src-cert-dir convention: the CA as ca.crt (no --src-tls-verify=false).
        result = subprocess.run(
            [skopeo, "copy", "--src-cert-dir", str(tls_files.ca_file.parent),
             f"docker://{registry.host}/app:1.0", f"oci:{out}:1.0"],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        index = json.loads((out / "index.json").read_text())
        assert index["manifests"][0]["digest"] == shared_images.manifests["app:1.0"]
        for blob in (out / "blobs" / "sha256").iterdir():
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
        for layer in shared_images.layers["app:1.0"]:
            assert (out / "blobs" / "sha256" / layer.split(":", 1)[1]).is_file()
        # Without the CA, the same pull is refused by certificate verification.
        refused = subprocess.run(
            [skopeo, "copy", "--src-cert-dir", str(tmp_path / "empty"),
             f"docker://{registry.host}/app:1.0", f"oci:{tmp_path / 'refused'}:1.0"],
            capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0
        assert "certificate" in refused.stderr
    finally:
        assert registry.stop() == 0
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
