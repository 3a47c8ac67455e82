"""Log lines: JSON for collectors (every stderr line of a real process), the access log's
fields, probes kept out of the info level, and the output that never blocks serving (a full
pipe drops and counts lines) yet loses nothing on a clean shutdown."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from simple_oci_registry.layoutwriter import MEDIA_TYPE_OCI_LAYER, LayoutWriter, random_chunks
from simple_oci_registry.logs import (
    ACCESS_LOGGER,
    CUT_SHORT,
    TEXT_FORMAT,
    AccessLogger,
    JsonFormatter,
    LogOutput,
)
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


# ------------------------------------------------------------------ the output (issue 12)


def _keepalive_gets(host: str, path: str, count: int, agent: str,
                    timeout: float = 10.0) -> list[int]:
    """``count`` GETs of ``path`` on one keep-alive connection; their statuses."""
    address, port = host.rsplit(":", 1)
    connection = http.client.HTTPConnection(address, int(port), timeout=timeout)
    statuses = []
    try:
        for _ in range(count):
            connection.request("GET", path, headers={"User-Agent": agent})
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        connection.close()
    return statuses


@pytest.mark.parametrize(("log_format", "workers"), [("text", "1"), ("json", "2")])
def test_every_line_is_written_on_a_clean_shutdown(shared_images: StandardImages,
                                                   tmp_path: Path, log_format: str,
                                                   workers: str) -> None:
    """Lines wait in a buffer (written in batches); SIGTERM right after the last response must
    still find all of them written, from one worker or from forked ones."""
    log_path = tmp_path / "registry.log"
    registry = RegistryProcess(shared_images.root, "--log-format", log_format,
                               "--workers", workers, log_path=log_path).start()
    count, path = 2000, "/v2/app/manifests/1.0"
    try:
        statuses = _keepalive_gets(registry.host, path, count, "flush-test")
    finally:
        assert registry.stop() == 0
    assert statuses == [200] * count
    text = log_path.read_text()
    if log_format == "json":
        written = [e for e in access_entries(json_lines(text)) if e["path"] == path]
    else:
        written = [line for line in text.splitlines() if f'"GET {path}" 200 ' in line]
    assert len(written) == count


def test_a_full_pipe_drops_and_counts_lines_and_never_stalls_serving(
        shared_images: StandardImages, tmp_path: Path) -> None:
    """stderr is a pipe nobody reads: requests are still answered at once, the lines past the
    buffer are dropped and counted in /metrics, and once the pipe is read again a warning says
    how many went. (With blocking writes serving stopped when the pipe's 64 KiB filled.)"""
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "simple_oci_registry", "serve",
               "--dir", str(shared_images.root), "--listen", "127.0.0.1:0", "--workers", "1",
               "--log-level", "info", "--log-format", "json",
               "--cache-dir", str(tmp_path / "cache")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=write_end, text=True)
    os.close(write_end)
    collected = bytearray()
    reader_started = False
    try:
        assert process.stdout is not None
        match = re.search(r"http://([^\s/]+)/", process.stdout.readline())
        assert match is not None
        host = match.group(1)
        _wait_ready(host)
        # ~1 kB lines (path twice, user agent): the 4 MiB buffer and the 64 KiB pipe hold
        # about 4,000 of them.
        path, agent = "/v2/" + "p" * 300, "a" * 200
        started = time.monotonic()
        statuses = _keepalive_gets(host, path, 6000, agent)
        assert statuses == [404] * 6000
        assert time.monotonic() - started < 120
        status, body = fetch(f"http://{host}/metrics")
        assert status == 200
        [dropped] = re.findall(rb"^registry_log_lines_dropped_total ([0-9.e+]+)$", body,
                               re.MULTILINE)
        assert float(dropped) >= 1000

        reader = threading.Thread(target=_read_all, args=(read_end, collected), daemon=True)
        reader.start()
        reader_started = True
        deadline = time.monotonic() + 20
        while collected.count(b'"user_agent": "aaa') + float(dropped) < 6000:
            assert time.monotonic() < deadline, "the output never caught up"
            time.sleep(0.05)
        # Caught up: lines are written again.
        assert _keepalive_gets(host, "/v2/", 1, "after") == [200]
        while b'"after"' not in collected:
            assert time.monotonic() < deadline, "a line after the drops was not written"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        if process.stdout is not None:
            process.stdout.close()
        if not reader_started:
            os.close(read_end)
    assert code == 0
    entries = json_lines(collected.decode())
    notices = [e for e in entries if "log line(s) dropped" in e["message"]]
    assert {e["level"] for e in notices} == {"warning"}
    dropped_lines = sum(e["dropped_lines"] for e in notices)
    assert dropped_lines == float(dropped)
    written = [e for e in access_entries(entries) if e["path"] == path[:300]]
    # Every line is either written whole or counted as dropped.
    assert len(written) + dropped_lines == 6000
    assert [e["user_agent"] for e in access_entries(entries)
            if e["path"] == "/v2/"][-1:] == ["after"]


def _wait_ready(host: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            if fetch(f"http://{host}/v2/")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, "the registry never became ready"
            time.sleep(0.05)


def _read_all(fd: int, into: bytearray) -> None:
    with open(fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(1 << 16):
            into += chunk


def test_output_never_blocks_and_reports_what_it_dropped() -> None:
    read_end, write_end = os.pipe()
    stream = open(write_end, "w")  # noqa: SIM115 - closed below
    output = LogOutput(stream, json_format=False, buffer_chars=10_000, batch_chars=1_000,
                       delay=0.01)
    line = "x" * 99 + "\n"
    try:
        started = time.monotonic()
        accepted = sum(output.write_line(line) for _ in range(5000))  # 500 kB > pipe+buffer
        assert time.monotonic() - started < 2  # never waited for the reader
        assert 0 < accepted < 5000
        time.sleep(0.2)
        assert output.dropped == 5000 - accepted
        collected = bytearray()
        reader = threading.Thread(target=_read_all, args=(read_end, collected), daemon=True)
        reader.start()
        output.flush()
        assert output.write_line("after\n")
        output.close()
        stream.close()
        reader.join(10)
    finally:
        if not stream.closed:
            stream.close()
    text = collected.decode()
    assert text.count(line) == accepted
    assert text.endswith("after\n")
    notices = re.findall(r" WARNING simple_oci_registry.logs: (\d+) log line\(s\) dropped: ",
                         text)
    assert sum(map(int, notices)) == 5000 - accepted


def test_output_writes_warnings_at_once_and_the_rest_in_batches() -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    stream = open(write_end, "w")  # noqa: SIM115 - closed below
    output = LogOutput(stream, json_format=False, delay=30.0)
    logger = logging.getLogger("simple_oci_registry.test_batches")
    logger.propagate = False
    logger.addHandler(output)
    try:
        logger.warning("first")
        # Written before logger.warning returned: a test or an operator reading the log
        # right after a failed request finds the reason there.
        assert b"first" in os.read(read_end, 1 << 16)
        output.write_line("quiet\n")
        time.sleep(0.3)
        with contextlib.suppress(BlockingIOError):
            assert b"quiet" not in os.read(read_end, 1 << 16)  # waits for its batch...
        output.flush()
        assert os.read(read_end, 1 << 16) == b"quiet\n"  # ...or a flush
    finally:
        logger.removeHandler(output)
        output.close()
        stream.close()
        os.close(read_end)


def _access_line(output: LogOutput | None, logger: logging.Logger, request: web.BaseRequest,
                 response: web.StreamResponse) -> None:
    access = AccessLogger(logger, "")
    assert access._output is output
    access.log(request, response, 0.012345678)


@settings(max_examples=60, deadline=None)
@given(path=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]),
                    max_size=40),
       agent=st.text(max_size=30), cut_short=st.booleans())
def test_access_lines_match_what_the_formatters_write(path: str, agent: str,
                                                      cut_short: bool) -> None:
    """The access log formats its line itself (no LogRecord per request): text and JSON must
    be what the ordinary formatters write for the same record, stamp aside."""
    url = "/v2/" + "".join(c if c.isalnum() else f"%{ord(c) & 0x7F:02X}" for c in path)
    request = make_mocked_request("GET", url, headers={"User-Agent": agent})
    request[CUT_SHORT] = cut_short
    response = web.Response(body=b"{}")
    for json_format in (False, True):
        fast = io.StringIO()
        output = LogOutput(fast, json_format=json_format)
        logger = logging.getLogger(f"simple_oci_registry.test_fast_{json_format}")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(output)
        capture = _Capture()
        try:
            _access_line(output, logger, request, response)
            output.flush()
            got = fast.getvalue()
            logger.addHandler(capture)  # two handlers: records again
            _access_line(None, logger, request, response)
        finally:
            logger.removeHandler(capture)
            logger.removeHandler(output)
            output.close()
        [record] = capture.records
        formatter = JsonFormatter() if json_format else logging.Formatter(TEXT_FORMAT)
        expected = formatter.format(record)
        assert got.endswith("\n") and got.count("\n") == 1
        if json_format:
            got_entry, expected_entry = json.loads(got), json.loads(expected)
            # The stamps are taken a moment apart (maybe across a second): compare shapes.
            shape = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
            assert re.fullmatch(shape, got_entry.pop("time"))
            assert re.fullmatch(shape, expected_entry.pop("time"))
            assert got_entry == expected_entry
            assert list(got_entry) == list(expected_entry)
            assert got[got.index('"level"'):] == expected[expected.index('"level"'):] + "\n"
        else:
            stamp = len("2024-01-01 00:00:00,000")
            expected_rest = expected[stamp:].replace("\r", "\\r").replace("\n", "\\n")
            assert got[stamp:] == expected_rest + "\n"
            shape = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
            assert re.fullmatch(shape, got[:stamp]) and re.fullmatch(shape, expected[:stamp])
