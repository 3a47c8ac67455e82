"""Prometheus metrics: what /metrics reports for the requests made, in process and across the
worker processes of a real server (prometheus-client's multiprocess mode)."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer, TestClient
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from simple_oci_registry.app import Registry, make_app
from simple_oci_registry.config import Config
from simple_oci_registry.fingerprint import Fingerprint
from simple_oci_registry.metrics import Metrics
from simple_oci_registry.store import ImageStore
from tests.images import StandardImages, build_standard_images
from tests.server import RegistryProcess, child_pids

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
Labels = tuple[str, str, str]  # endpoint, method, status
POLL_LIMIT = 30.0


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample by (name, labels)."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def request_counts(text: str) -> collections.Counter[Labels]:
    counts: collections.Counter[Labels] = collections.Counter()
    for (name, labels), count in parse(text).items():
        if name == "registry_http_requests_total":
            found = dict(labels)
            counts[(found["endpoint"], found["method"], found["status"])] += int(count)
    return counts


async def scrape(client: Client) -> str:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return await response.text()


async def serve(aiohttp_client: MakeClient, directory: Path) -> tuple[Client, Registry]:
    registry = make_app(Config(directory=directory))
    return await aiohttp_client(RawTestServer(registry.handle)), registry


# ------------------------------------------------------------------------------ in process


def _duration_lines(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if line.startswith("registry_http_request_duration_seconds")
            and not line.startswith("registry_http_request_duration_seconds_created")]


def test_tallied_durations_render_as_observe_renders_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Durations added to the histogram in one update per bucket (metrics._observe_tallied
    uses prometheus-client internals) render exactly as one observe() each does."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    # Bucket bounds themselves (le is inclusive), between them, past the last, and zero.
    durations = [0.0, 0.0005, 0.0007, 0.001, 0.0011, 0.25, 1.0, 3.0, 300.0, 301.5, 0.0007]
    metrics = Metrics()
    for seconds in durations:
        metrics.observe("manifest", "GET", 200, 10, seconds)
    reference = CollectorRegistry()
    histogram = Histogram("registry_http_request_duration_seconds", "h", ["endpoint"],
                          buckets=metrics.duration._upper_bounds, registry=reference)
    for seconds in durations:
        histogram.labels("manifest").observe(seconds)
    mine = _duration_lines(metrics.render()[0].decode())
    assert mine == _duration_lines(generate_latest(reference).decode())
    assert 'registry_http_request_duration_seconds_count{endpoint="manifest"} 11.0' in mine


async def test_requests_answered_together_update_prometheus_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each prometheus-client update takes a lock and, with several workers, writes a
    memory-mapped file: the requests of one event-loop iteration make one update per series,
    visible once that iteration is over (so another worker's scrape sees them)."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics()
    child = metrics.requests.labels("manifest", "GET", "200")
    increments: list[float] = []
    original = child.inc
    monkeypatch.setattr(child, "inc", lambda amount=1: (increments.append(amount),
                                                        original(amount))[1])
    for _ in range(10):
        metrics.observe("manifest", "GET", 200, 1536, 0.0007)
    await asyncio.sleep(0)  # the iteration that answered them is over
    assert increments == [10]

    def exported(name: str, **labels: str) -> float:
        return value(parse(generate_latest(metrics.registry).decode()), name, **labels)

    assert exported("registry_http_requests_total",
                    endpoint="manifest", method="GET", status="200") == 10
    assert exported("registry_http_response_bytes_total", endpoint="manifest") == 15360
    assert exported("registry_http_request_duration_seconds_bucket",
                    endpoint="manifest", le="0.001") == 10


async def test_every_request_is_counted_once(aiohttp_client: MakeClient,
                                             shared_images: StandardImages,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    client, _ = await serve(aiohttp_client, shared_images.root)
    layer = shared_images.layers["app:1.0"][0]

    async def broken_tags(self: ImageStore, name: str) -> list[str]:
        raise RuntimeError("a bug in the store")

    monkeypatch.setattr(ImageStore, "tags", broken_tags)
    made: list[tuple[str, str, dict[str, str], Labels]] = [
        ("GET", "/v2/", {}, ("base", "GET", "200")),
        ("HEAD", "/v2", {}, ("base", "HEAD", "200")),
        ("GET", "/v2/app/manifests/1.0", {}, ("manifest", "GET", "200")),
        ("HEAD", "/v2/app/manifests/1.0", {}, ("manifest", "HEAD", "200")),
        ("GET", "/v2/app/manifests/9.9", {}, ("manifest", "GET", "404")),
        ("GET", "/v2/App/manifests/1.0", {}, ("manifest", "GET", "400")),
        ("DELETE", "/v2/app/manifests/1.0", {}, ("manifest", "DELETE", "405")),
        ("PUT", "/v2/app/manifests/1.0", {}, ("manifest", "PUT", "405")),
        ("POST", "/v2/app/blobs/uploads/", {}, ("upload", "POST", "405")),
        ("GET", f"/v2/app/blobs/{layer}", {}, ("blob", "GET", "200")),
        ("GET", f"/v2/app/blobs/{layer}", {"Range": "bytes=0-9"}, ("blob", "GET", "206")),
        ("GET", f"/v2/app/blobs/{layer}", {"Range": "bytes=99999-"}, ("blob", "GET", "416")),
        ("GET", "/v2/app/blobs/sha256:" + "0" * 64, {}, ("blob", "GET", "404")),
        ("GET", "/v2/app/blobs/sha256:zz", {}, ("blob", "GET", "400")),
        ("GET", "/v2/app/tags/list", {}, ("tags", "GET", "500")),
        ("GET", "/v2/app/nothing/here", {}, ("unknown", "GET", "404")),
        ("GET", "/nope", {}, ("unknown", "GET", "404")),
        ("POST", "/healthz", {}, ("healthz", "POST", "405")),
        ("GET", "/healthz", {}, ("healthz", "GET", "200")),
        ("GET", "/readyz", {}, ("readyz", "GET", "200")),
        ("PROPFIND", "/v2/", {}, ("base", "other", "405")),
        ("MKCOL", "/v2/", {}, ("base", "other", "405")),
    ]
    expected: collections.Counter[Labels] = collections.Counter()
    for method, path, headers, labels in made:
        response = await client.request(method, path, headers=headers)
        assert response.status == int(labels[2]), (method, path, await response.text())
        await response.read()
        expected[labels] += 1

    first = await scrape(client)
    assert request_counts(first) == expected  # the scrape counts itself only afterwards
    samples = parse(first)
    for endpoint in {labels[0] for labels in expected}:
        assert value(samples, "registry_http_request_duration_seconds_count",
                     endpoint=endpoint) == sum(n for (e, _, _), n in expected.items()
                                               if e == endpoint)
    expected[("metrics", "GET", "200")] += 1
    assert request_counts(await scrape(client)) == expected


async def test_methods_do_not_make_new_series(aiohttp_client: MakeClient,
                                              shared_images: StandardImages) -> None:
    # aiohttp's C parser refuses methods it does not know (400, before the registry sees
    # them); these it knows. The pure-Python parser would pass any token.
    unusual = ["PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "SEARCH",
               "REPORT", "PURGE", "LINK", "UNLINK", "TRACE", "SOURCE", "QUERY"]
    client, _ = await serve(aiohttp_client, shared_images.root)
    for method in unusual:
        response = await client.request(method, "/v2/app/manifests/1.0")
        assert response.status == 405, method
    counts = request_counts(await scrape(client))
    assert {labels[1] for labels in counts} == {"other"}
    assert counts[("manifest", "other", "405")] == len(unusual)


async def test_bytes_served_are_body_bytes(aiohttp_client: MakeClient,
                                           shared_images: StandardImages) -> None:
    client, _ = await serve(aiohttp_client, shared_images.root)
    plain = shared_images.layers["app:1.0"][0]  # sendfile from the archive's window
    zipped = shared_images.layers["zipped:1.0"][0]  # from a gzip archive
    blob_bytes = 0
    for name, digest in (("app", plain), ("app", plain), ("zipped", zipped)):
        response = await client.get(f"/v2/{name}/blobs/{digest}")
        body = await response.read()
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
        blob_bytes += len(body)
    response = await client.get(f"/v2/app/blobs/{plain}", headers={"Range": "bytes=3-12"})
    assert response.status == 206 and len(await response.read()) == 10
    blob_bytes += 10
    assert (await client.head(f"/v2/app/blobs/{plain}")).status == 200  # no body, no bytes
    manifest = await (await client.get("/v2/app/manifests/1.0")).read()

    samples = parse(await scrape(client))
    assert value(samples, "registry_http_response_bytes_total", endpoint="blob") == blob_bytes
    assert value(samples, "registry_http_response_bytes_total",
                 endpoint="manifest") == len(manifest)


async def test_store_figures_after_a_scrape(aiohttp_client: MakeClient, image_dir: Path) -> None:
    images = build_standard_images(image_dir)
    (image_dir / "broken.oci").write_bytes(b"this is not an archive" * 50)
    client, registry = await serve(aiohttp_client, image_dir)
    for path in ("/v2/app/manifests/1.0", "/v2/app/manifests/2.0",
                 "/v2/zipped/manifests/1.0"):
        assert (await client.get(path)).status == 200
    assert (await client.get("/v2/broken/manifests/latest")).status == 404
    layer = images.layers["app:1.0"][0]
    for _ in range(2):  # hashed before the first byte is served, once per archive version
        assert (await client.get(f"/v2/app/blobs/{layer}")).status == 200
    layer_size = (image_dir / "app" / "1.0.oci").stat().st_size  # an upper bound
    first = parse(await scrape(client))
    assert value(first, "registry_archives_indexed_total") == 3
    assert value(first, "registry_archive_errors_total") == 1
    assert value(first, "registry_rescans_total") == 0
    verified = value(first, "registry_blob_verified_bytes_total")
    assert 0 < verified < layer_size
    assert value(first, "registry_cache_entries", cache="archives") == 3
    assert value(first, "registry_cache_entries", cache="broken") == 1
    assert value(first, "registry_archive_index_seconds_total") > 0

    await registry.store.rescan()
    second = parse(await scrape(client))
    assert value(second, "registry_rescans_total") == 1
    # Nothing changed on disk: nothing indexed again, and nothing counted twice by the sync.
    for name in ("registry_archives_indexed_total", "registry_archive_errors_total",
                 "registry_blob_verified_bytes_total"):
        assert value(second, name) == value(first, name), name
    third = parse(await scrape(client))
    assert value(third, "registry_rescans_total") == 1


async def test_complete_transfer_then_close_counts_as_200(
        shared_images: StandardImages, monkeypatch: pytest.MonkeyPatch) -> None:
    # A sendfile'd blob is checked (an fstat, slow on NFS) after its last piece went out; a
    # client that reads the whole body and closes meanwhile (Connection: close, as skopeo and
    # urllib send) got every byte: a 200, not a 499. Served as the CLI serves (aiohttp's test
    # server cancels handlers when the client leaves, which production does not).
    registry = make_app(Config(directory=shared_images.root))
    runner = web.ServerRunner(registry.server())
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    await web.SockSite(runner, sock).start()
    port = sock.getsockname()[1]
    layer = shared_images.layers["app:1.0"][0]
    real_of_fd = Fingerprint.of_fd

    def slow_of_fd(fd: int) -> Fingerprint:  # an fstat answered by a busy NFS server
        time.sleep(0.2)
        return real_of_fd(fd)

    async def fetch(path: str, *, close: bool) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        connection = "close" if close else "keep-alive"
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: {connection}\r\n\r\n"
                     .encode())
        head = await reader.readuntil(b"\r\n\r\n")
        match = re.search(rb"Content-Length: (\d+)", head, re.I)
        assert match is not None and head.startswith(b"HTTP/1.1 200 ")
        body = await reader.readexactly(int(match.group(1)))
        writer.close()  # at once: the server may still be checking the source
        return body

    def blob_counts() -> dict[str, int]:
        return {status: n for (endpoint, _, status), n in
                request_counts(registry.metrics.render()[0].decode()).items()
                if endpoint == "blob"}

    try:
        assert await fetch(f"/v2/app/blobs/{layer}", close=False)  # verified: warm
        monkeypatch.setattr(Fingerprint, "of_fd", staticmethod(slow_of_fd))
        body = await fetch(f"/v2/app/blobs/{layer}", close=True)
        assert "sha256:" + hashlib.sha256(body).hexdigest() == layer  # complete and correct
        deadline = time.monotonic() + POLL_LIMIT
        while sum(blob_counts().values()) < 2:
            assert time.monotonic() < deadline, "the transfer was never counted"
            await asyncio.sleep(0.05)
        monkeypatch.undo()
        assert blob_counts() == {"200": 2}
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------------------ workers




def worker_of(connection: http.client.HTTPConnection, server_port: int,
              workers: set[int]) -> int | None:
    """Which worker process holds the server side of an open connection (from /proc)."""
    assert connection.sock is not None
    client_port = connection.sock.getsockname()[1]
    inode = None
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (int(local.split(":")[1], 16) == server_port
                    and int(remote.split(":")[1], 16) == client_port):
                inode = fields[9]
    if inode is None:
        return None
    for pid in workers:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
        except OSError:
            continue
    return None


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        with error:
            return error.code


def test_any_worker_reports_the_whole_node(shared_images: StandardImages,
                                           tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    registry = RegistryProcess(shared_images.root, "--workers", "2",
                               log_path=tmp_path / "registry.log",
                               env=dict(os.environ, TMPDIR=str(scratch))).start()
    assert registry.process is not None
    supervisor = registry.process.pid
    host, port = registry.host.rsplit(":", 1)
    try:
        deadline = time.monotonic() + POLL_LIMIT
        while len(child_pids(supervisor)) != 2:
            assert time.monotonic() < deadline, "two workers never started"
            time.sleep(0.05)
        workers = child_pids(supervisor)
        [metrics_dir] = scratch.glob("simple-oci-registry-metrics-*")

        # The workers accept from one shared socket, and an idle machine may let one of them
        # take every connection: open connections in bursts until each worker holds some.
        holders: dict[int, list[http.client.HTTPConnection]] = {pid: [] for pid in workers}
        opened: list[http.client.HTTPConnection] = []
        try:
            while not all(holders.values()):
                assert time.monotonic() < deadline, "connections never reached both workers"
                burst = [http.client.HTTPConnection(host, int(port), timeout=10)
                         for _ in range(16)]
                for connection in burst:
                    connection.connect()
                opened += burst
                for connection in burst:
                    pid = None
                    while pid is None and time.monotonic() < deadline:  # until accepted
                        pid = worker_of(connection, int(port), workers)
                        if pid is None:
                            time.sleep(0.01)
                    if pid is not None:
                        holders[pid].append(connection)

            made = 0
            for connection in opened:
                connection.request("GET", "/v2/app/manifests/1.0")
                response = connection.getresponse()
                response.read()
                assert response.status == 200
                made += 1
            files = {p.name for p in metrics_dir.iterdir()}
            assert {f"counter_{pid}.db" for pid in workers} <= files  # both answered some

            # Scrape through a connection held by each worker in turn.
            for pid, held in holders.items():
                held[0].request("GET", "/metrics")
                response = held[0].getresponse()
                assert response.status == 200
                counts = request_counts(response.read().decode())
                assert counts[("manifest", "GET", "200")] == made, pid
                assert sum(counts.values()) >= made + 1  # and RegistryProcess's readiness GET
        finally:
            for connection in opened:
                connection.close()
    finally:
        assert registry.stop() == 0
    assert not metrics_dir.exists()  # removed at shutdown
    assert list(scratch.iterdir()) == []


def test_metrics_dir_of_a_single_worker_process_is_not_made(shared_images: StandardImages,
                                                            tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    registry = RegistryProcess(shared_images.root, log_path=tmp_path / "registry.log",
                               env=dict(os.environ, TMPDIR=str(scratch))).start()
    try:
        assert get(registry.url + "/v2/app/manifests/1.0") == 200
        with urllib.request.urlopen(registry.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        assert request_counts(text)[("manifest", "GET", "200")] == 1
        assert re.search(r"^registry_http_requests_created", text, re.M)  # in-process registry
        assert list(scratch.iterdir()) == []
    finally:
        assert registry.stop() == 0


async def test_directory_and_grace_counters(aiohttp_client: MakeClient, tmp_path: Path) -> None:
    from simple_oci_registry.layoutwriter import LayoutWriter
    from tests.images import small_image

    def write(text: str) -> tuple[str, str]:
        writer = LayoutWriter()
        image, layers = small_image(writer, text)
        writer.tag(image, "1.0")
        writer.write_archive(tmp_path / "images" / "app" / "1.0.oci")
        return image.digest, layers[0].digest

    old_manifest, old_layer = write("old")
    client, _ = await serve(aiohttp_client, tmp_path / "images")
    assert (await client.get("/v2/app/manifests/1.0")).status == 200
    write("new")  # renamed over: the old layer stays downloadable for the grace period
    assert (await client.get(f"/v2/app/blobs/{old_layer}")).status == 200

    def value(text: str, name: str) -> float:
        return sum(sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples if sample.name == name)

    text = await scrape(client)
    assert value(text, "registry_grace_hits_total") == 1
    assert value(text, "registry_directory_listings_read_total") >= 2  # app/, then again
    assert value(text, "registry_directory_stat_calls_total") >= 2


async def test_requests_after_a_failed_update_are_still_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics()
    child = metrics.requests.labels("manifest", "GET", "200")
    original = child.inc

    def failing(amount: float = 1) -> None:
        raise OSError("the metrics file could not be written")

    monkeypatch.setattr(child, "inc", failing)
    metrics.observe("manifest", "GET", 200, 1536, 0.0007)
    with pytest.raises(OSError):
        metrics.flush()
    monkeypatch.setattr(child, "inc", original)
    metrics.observe("manifest", "GET", 200, 1536, 0.0007)
    metrics.flush()
    text = generate_latest(metrics.registry).decode()
    assert value(parse(text), "registry_http_requests_total",
                 endpoint="manifest", method="GET", status="200") == 1
