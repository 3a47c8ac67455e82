"""Log lines: JSON for collectors (every stderr line of a real process), the access log's
fields, and probes kept out of the info level."""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from simple_oci_registry.layoutwriter import MEDIA_TYPE_OCI_LAYER, LayoutWriter, random_chunks
from simple_oci_registry.logs import ACCESS_LOGGER, CUT_SHORT, AccessLogger, JsonFormatter
from tests.images import StandardImages
from tests.server import RegistryProcess

PROBES = ("/healthz", "/readyz", "/metrics")


def fetch(url: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line parsed as a JSON object (fails on the first line that is not one)."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"log line {number} is not JSON: {line!r}")
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message"} <= set(entry), line
        entries.append(entry)
    return entries


def access_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["logger"] == ACCESS_LOGGER]


def exercise(registry: RegistryProcess, images: StandardImages) -> dict[str, int]:
    """A few requests of every kind; returns path -> expected body bytes of the GETs."""
    expected: dict[str, int] = {}
    manifest_path = "/v2/app/manifests/1.0"
    blob_path = f"/v2/app/blobs/{images.layers['app:1.0'][0]}"
    for path in (manifest_path, blob_path, "/v2/app/manifests/9.9"):
        status, body = fetch(registry.url + path)
        expected[path] = len(body)
    assert fetch(registry.url + blob_path, "HEAD")[0] == 200
    for path in PROBES:
        for _ in range(2):
            assert fetch(registry.url + path)[0] == 200
    return expected


def test_json_log_of_a_real_process(shared_images: StandardImages, tmp_path: Path) -> None:
    log_path = tmp_path / "registry.log"
    registry = RegistryProcess(shared_images.root, "--log-format", "json", "--log-level", "info",
                               log_path=log_path).start()
    try:
        expected = exercise(registry, shared_images)
    finally:
        assert registry.stop() == 0
    entries = json_lines(log_path.read_text())
    assert any(e["message"].startswith("shutting down") for e in entries)
    access = access_entries(entries)
    for entry in access:
        assert {"method", "path", "status", "bytes", "remote", "duration_s"} <= set(entry)
        assert entry["level"] == "info"
        assert entry["path"] not in PROBES  # probes and scrapes: debug level only
    by_request = {(e["method"], e["path"]): e for e in access}
    for path, size in expected.items():
        entry = by_request[("GET", path)]
        assert entry["bytes"] == size, entry  # body bytes, sendfile'd blob included
    assert by_request[("GET", "/v2/app/manifests/1.0")]["status"] == 200
    assert by_request[("GET", "/v2/app/manifests/9.9")]["status"] == 404
    head = by_request[("HEAD", f"/v2/app/blobs/{shared_images.layers['app:1.0'][0]}")]
    assert (head["status"], head["bytes"]) == (200, 0)


def test_probes_are_logged_at_debug_level(shared_images: StandardImages,
                                          tmp_path: Path) -> None:
    log_path = tmp_path / "registry.log"
    # RegistryProcess runs with --log-level debug.
    registry = RegistryProcess(shared_images.root, "--log-format", "json",
                               log_path=log_path).start()
    try:
        for path in PROBES:
            assert fetch(registry.url + path)[0] == 200
        assert fetch(registry.url + "/v2/")[0] == 200
    finally:
        assert registry.stop() == 0
    access = access_entries(json_lines(log_path.read_text()))
    levels = {e["path"]: e["level"] for e in access}
    assert {p: levels.get(p) for p in PROBES} == {p: "debug" for p in PROBES}
    assert levels["/v2/"] == "info"


def test_text_log_of_a_real_process(shared_images: StandardImages, tmp_path: Path) -> None:
    log_path = tmp_path / "registry.log"
    registry = RegistryProcess(shared_images.root, "--log-level", "info",
                               log_path=log_path).start()
    try:
        status, body = fetch(registry.url + "/v2/app/manifests/1.0")
        assert status == 200
        assert fetch(registry.url + "/healthz")[0] == 200
    finally:
        registry.stop()
    text = log_path.read_text()
    assert f'"GET /v2/app/manifests/1.0" 200 {len(body)} ' in text
    assert "/healthz" not in text
    assert " INFO simple_oci_registry.access: " in text


def test_no_access_log(shared_images: StandardImages, tmp_path: Path) -> None:
    log_path = tmp_path / "registry.log"
    registry = RegistryProcess(shared_images.root, "--no-access-log", "--log-format", "json",
                               log_path=log_path).start()
    try:
        assert fetch(registry.url + "/v2/app/manifests/1.0")[0] == 200
    finally:
        registry.stop()
    entries = json_lines(log_path.read_text())
    assert entries and access_entries(entries) == []


def test_a_transfer_cut_short_is_not_logged_as_complete(tmp_path: Path) -> None:
    size = 24 << 20  # more than the socket buffers hold: the server is still sending
    writer = LayoutWriter()
    layer = writer.add_blob_stream(random_chunks(size, seed=24), MEDIA_TYPE_OCI_LAYER)
    writer.tag(writer.add_image([layer]), "1.0")
    writer.write_archive(tmp_path / "images" / "big" / "1.0.oci")
    log_path = tmp_path / "registry.log"
    registry = RegistryProcess(tmp_path / "images", "--log-format", "json",
                               log_path=log_path).start()
    path = f"/v2/big/blobs/{layer.digest}"
    try:
        host, port = registry.host.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            client.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            received = 0
            while received < (1 << 20):
                received += len(client.recv(1 << 16))
        # The hang-up shows in the log once the server notices it.
        deadline = time.monotonic() + 30
        while not [e for e in access_entries(json_lines(log_path.read_text()))
                   if e["path"] == path]:
            assert time.monotonic() < deadline, "the cut-short transfer was never logged"
            time.sleep(0.05)
    finally:
        registry.stop()
    [entry] = [e for e in access_entries(json_lines(log_path.read_text())) if e["path"] == path]
    assert entry["status"] == 200  # what its headers said
    assert (entry["complete"], entry["bytes"]) == (False, None)


# ------------------------------------------------------------------------------ units


def record(message: str, *args: object, exc_info: Any = None,
           **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("simple_oci_registry.test", logging.WARNING, __file__, 1, message,
                             args, exc_info)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_json_formatter_fields_extras_and_exceptions() -> None:
    formatter = JsonFormatter()
    entry = json.loads(formatter.format(record("%s of %d", "one", 2, digest="sha256:x",
                                               path=Path("/a/b"))))
    assert entry["message"] == "one of 2"
    assert (entry["level"], entry["logger"]) == ("warning", "simple_oci_registry.test")
    assert (entry["digest"], entry["path"]) == ("sha256:x", "/a/b")  # not JSON: str()
    assert entry["time"].endswith("Z") and "T" in entry["time"]
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        line = formatter.format(record("failed", exc_info=sys.exc_info()))
    assert "\n" not in line  # a traceback stays on one line
    entry = json.loads(line)
    assert "ValueError: boom" in entry["exception"]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_access_logger_marks_a_transfer_cut_short() -> None:
    logger = logging.getLogger("simple_oci_registry.test_access_cut")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    capture = _Capture()
    logger.addHandler(capture)
    request = make_mocked_request("GET", "/v2/a/blobs/x")
    request[CUT_SHORT] = True
    try:
        AccessLogger(logger, "").log(
            request, web.Response(headers={"Content-Length": "1000"}), 1.5)
    finally:
        logger.removeHandler(capture)
    [logged] = capture.records
    assert (logged.__dict__["bytes"], logged.__dict__["complete"]) == (None, False)
    assert logged.getMessage().endswith('"GET /v2/a/blobs/x" 200 - 1.500s cut short')
    entry = json.loads(JsonFormatter().format(logged))
    assert (entry["bytes"], entry["complete"], entry["status"]) == (None, False, 200)


@pytest.mark.parametrize(("method", "path", "response", "level", "size"), [
    ("GET", "/v2/", web.Response(body=b"{}"), logging.INFO, 2),
    ("HEAD", "/v2/a/blobs/x", web.Response(headers={"Content-Length": "1000"}), logging.INFO,
     0),
    ("GET", "/v2/a/blobs/x", web.Response(status=304), logging.INFO, 0),
    ("GET", "/healthz", web.Response(body=b'{"status":"ok"}'), logging.DEBUG, 15),
    ("GET", "/metrics", web.Response(body=b"x" * 100), logging.DEBUG, 100),
    # A failing probe is worth seeing at info level.
    ("GET", "/readyz", web.Response(status=503, body=b"not ready"), logging.INFO, 9),
])
def test_access_logger_levels_and_sizes(method: str, path: str, response: web.Response,
                                        level: int, size: int) -> None:
    logger = logging.getLogger("simple_oci_registry.test_access")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    capture = _Capture()
    logger.addHandler(capture)
    try:
        AccessLogger(logger, "").log(make_mocked_request(method, path), response, 0.25)
    finally:
        logger.removeHandler(capture)
    [logged] = capture.records
    assert logged.levelno == level
    assert logged.__dict__["bytes"] == size
    assert (logged.__dict__["method"], logged.__dict__["path"]) == (method, path)
    assert logged.__dict__["status"] == response.status
    assert logged.__dict__["complete"] is True
