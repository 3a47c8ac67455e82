"""gzip- and zstd-compressed archives served by a real process through its blob cache.

A compressed archive has no byte windows to ``sendfile`` from: indexing decompresses it once
and keeps every large blob, verified, in ``--cache-dir``; later pulls, restarts included, are
served from there. The cache's work is visible in /metrics (``registry_decompressions_total``,
``registry_blob_cache_*``), which is what these tests count. Blobs of at most 4 MiB stay in
memory from the index scan, so the images here carry a 6 MiB layer to exercise the cache.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.util
import json
import os
import socket
import tarfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zstandard
from prometheus_client.parser import text_string_to_metric_families

from simple_oci_registry.layoutwriter import Compression, LayerFile, LayoutWriter, random_chunks
from tests.conftest import require
from tests.server import RegistryProcess

BIG = 6 << 20  # above the 4 MiB of members kept in memory: goes through the blob cache


@dataclass
class Image:
    manifest: str
    layers: list[str]
    big: str  # the layer that lives in the blob cache
    big_size: int


@dataclass
class Images:
    root: Path
    images: dict[str, Image] = field(default_factory=dict)


def build(writer: LayoutWriter, text: str, *, big_size: int = BIG) -> Image:
    big = writer.add_layer(
        {f"{text}/big.bin": LayerFile.streamed(random_chunks(big_size, seed=len(text)),
                                               big_size)}, compression="gzip")
    small = writer.add_layer({f"{text}/small.txt": f"{text}\n".encode() * 100})
    manifest = writer.add_image([big, small], config={"config": {"Cmd": ["/bin/true"]}})
    writer.tag(manifest, "1.0")
    return Image(manifest.digest, [big.digest, small.digest], big.digest, big.size)


def corrupted(writer: LayoutWriter, digest: str, target: Path, scratch: Path) -> None:
    """Write the layout gzip-compressed with one byte of ``digest``'s member flipped."""
    plain = writer.write_archive(scratch)
    with tarfile.open(plain) as tar:
        offset = tar.getmember("blobs/sha256/" + digest.split(":", 1)[1]).offset_data
    data = bytearray(plain.read_bytes())
    data[offset + 100] ^= 0xFF
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(gzip.compress(bytes(data), compresslevel=1))


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> Images:
    """``gz:1.0`` (gzip), ``zs:1.0`` (zstd), ``bad:1.0`` and ``badsmall:1.0`` (gzip with a
    layer whose bytes do not match its digest: a cached-size one and an in-memory one)."""
    base = tmp_path_factory.mktemp("compressed")
    found = Images(base / "images")
    kinds: tuple[tuple[str, Compression], ...] = (("gz", "gzip"), ("zs", "zstd"))
    for name, compression in kinds:
        writer = LayoutWriter()
        found.images[name] = build(writer, name)
        writer.write_archive(found.root / name / "1.0.oci", compression=compression)
    writer = LayoutWriter()
    found.images["bad"] = image = build(writer, "bad")
    corrupted(writer, image.big, found.root / "bad" / "1.0.oci", base / "bad.tar")
    writer = LayoutWriter()
    found.images["badsmall"] = image = build(writer, "badsmall", big_size=1 << 20)
    corrupted(writer, image.big, found.root / "badsmall" / "1.0.oci", base / "badsmall.tar")
    return found


Start = Callable[..., RegistryProcess]


@pytest.fixture
def start(start_registry: Start) -> Start:
    """Registry processes with their own log files (conftest's start_registry), without
    background preparation: these tests count what requests themselves decompress
    (test_preparation_functional.py covers the work done ahead)."""
    def start_without_preparation(directory: Path, *args: str) -> RegistryProcess:
        return start_registry(directory, "--no-prepare-ahead", *args)
    return start_without_preparation


# ------------------------------------------------------------------------------ helpers


def request(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def metrics(registry: RegistryProcess) -> dict[str, float]:
    """Every sample of /metrics, label sets summed, by sample name."""
    status, _, body = request(registry.url + "/metrics")
    assert status == 200
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


DECOMPRESSIONS = "registry_decompressions_total"
HITS = "registry_blob_cache_hits_total"
FILLS = "registry_blob_cache_fills_total"


def skopeo_pull(registry: RegistryProcess, name: str, image: Image, out: Path) -> None:
    """Pull ``name:1.0`` with skopeo and check every blob against its digest."""
    import subprocess

    result = subprocess.run(
        [require("skopeo"), "copy", "--src-tls-verify=false",
         f"docker://{registry.host}/{name}:1.0", f"oci:{out}:1.0"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    index: dict[str, Any] = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.manifest
    blobs = out / "blobs" / "sha256"
    for blob in blobs.iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    for layer in image.layers:
        assert (blobs / layer.split(":", 1)[1]).is_file()


# ------------------------------------------------------------------------------ pulls


@pytest.mark.clients
def test_pulls_come_from_the_cache_and_survive_a_restart(
        compressed: Images, start: Start, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    registry = start(compressed.root, "--cache-dir", cache)
    names = ("gz", "zs")
    for name in names:
        skopeo_pull(registry, name, compressed.images[name], tmp_path / f"first-{name}")
    first = metrics(registry)
    assert first[DECOMPRESSIONS] == 2  # one indexing pass per archive, nothing more
    assert first[FILLS] == 2  # the two large layers, teed into the cache while indexing
    assert first[HITS] >= 2

    for name in names:
        skopeo_pull(registry, name, compressed.images[name], tmp_path / f"second-{name}")
    second = metrics(registry)
    assert second[DECOMPRESSIONS] == first[DECOMPRESSIONS]
    assert second[FILLS] == first[FILLS]
    assert second[HITS] >= first[HITS] + 2
    assert registry.stop() == 0

    # A new process over the same cache: indexes and blobs are found there.
    restarted = start(compressed.root, "--cache-dir", cache)
    for name in names:
        skopeo_pull(restarted, name, compressed.images[name], tmp_path / f"third-{name}")
    third = metrics(restarted)
    assert third[DECOMPRESSIONS] == 0
    assert third[FILLS] == 0
    assert third[HITS] >= 2


def test_concurrent_gets_of_an_evicted_blob_decompress_once(
        compressed: Images, start: Start, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    registry = start(compressed.root, "--cache-dir", str(cache))
    image = compressed.images["gz"]
    assert request(registry.url + "/v2/gz/manifests/1.0")[0] == 200  # indexed and filled
    cached = cache / "blobs" / "sha256" / image.big.split(":", 1)[1]
    assert cached.stat().st_size == image.big_size
    cached.unlink()  # evicted
    before = metrics(registry)[DECOMPRESSIONS]

    clients = 16
    ready = threading.Barrier(clients)
    results: list[tuple[int, str, int]] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            ready.wait()
            status, headers, body = request(f"{registry.url}/v2/gz/blobs/{image.big}")
            results.append((status, "sha256:" + hashlib.sha256(body).hexdigest(), len(body)))
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert results == [(200, image.big, image.big_size)] * clients
    assert metrics(registry)[DECOMPRESSIONS] == before + 1
    assert cached.stat().st_size == image.big_size  # back in the cache


# ------------------------------------------------------------------------------ damage


def test_blob_not_matching_its_digest_is_refused(compressed: Images, start: Start,
                                                 tmp_path: Path) -> None:
    registry = start(compressed.root, "--cache-dir", str(tmp_path / "cache"))
    image = compressed.images["bad"]
    # The rest of the image is intact and served.
    status, headers, body = request(registry.url + "/v2/bad/manifests/1.0")
    assert (status, headers["Docker-Content-Digest"]) == (200, image.manifest)
    assert request(f"{registry.url}/v2/bad/blobs/{image.layers[1]}")[0] == 200
    for _ in range(2):
        status, headers, body = request(f"{registry.url}/v2/bad/blobs/{image.big}")
        assert status == 404  # never the wrong bytes
        assert headers["Content-Type"].startswith("application/json")
        assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    log = registry.log()
    assert any("bad/1.0.oci" in line and image.big in line for line in log.splitlines()), log
    assert not (tmp_path / "cache" / "blobs" / "sha256" / image.big.split(":", 1)[1]).exists()


def test_head_agrees_with_get_on_a_damaged_compressed_blob(compressed: Images, start: Start,
                                                           tmp_path: Path) -> None:
    registry = start(compressed.root, "--cache-dir", str(tmp_path / "cache"))
    url = f"{registry.url}/v2/bad/blobs/{compressed.images['bad'].big}"
    assert request(url)[0] == 404
    assert request(url, "HEAD")[0] == 404


def test_damaged_in_memory_member_never_delivers_wrong_bytes(
        compressed: Images, start: Start, tmp_path: Path) -> None:
    registry = start(compressed.root, "--cache-dir", str(tmp_path / "cache"))
    image = compressed.images["badsmall"]
    try:
        status, _, body = request(f"{registry.url}/v2/badsmall/blobs/{image.big}")
    except (http.client.IncompleteRead, ConnectionError):
        return  # cut short: the client knows the transfer failed
    assert status == 404, "a complete response for bytes that do not match the digest"
    assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"


def test_damaged_in_memory_member_is_refused_like_a_cached_one(
        compressed: Images, start: Start, tmp_path: Path) -> None:
    registry = start(compressed.root, "--cache-dir", str(tmp_path / "cache"))
    image = compressed.images["badsmall"]
    status, _, body = request(f"{registry.url}/v2/badsmall/blobs/{image.big}")
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert any("badsmall/1.0.oci" in line and image.big in line
               for line in registry.log().splitlines())


def test_zstd_archive_is_served_through_the_cache_too(compressed: Images, start: Start,
                                                      tmp_path: Path) -> None:
    # Without skopeo: the zstd archive's blobs by plain GET, from the cache after indexing.
    registry = start(compressed.root, "--cache-dir", str(tmp_path / "cache"))
    image = compressed.images["zs"]
    archive = compressed.root / "zs" / "1.0.oci"
    assert archive.read_bytes()[:4] == zstandard.FRAME_HEADER
    for layer in image.layers:
        status, headers, body = request(f"{registry.url}/v2/zs/blobs/{layer}")
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == layer
        assert headers["Docker-Content-Digest"] == layer
    figures = metrics(registry)
    assert (figures[DECOMPRESSIONS], figures[FILLS]) == (1, 1)
    assert figures[HITS] >= 1


@pytest.fixture(scope="module")
def huge(tmp_path_factory: pytest.TempPathFactory) -> Images:
    """``huge:1.0``: a zstd archive with a 40 MiB layer, more than one sendfile chunk."""
    found = Images(tmp_path_factory.mktemp("huge") / "images")
    writer = LayoutWriter()
    layer = writer.add_layer(
        {"huge.bin": LayerFile.streamed(random_chunks(40 << 20, seed=40), 40 << 20)},
        compression="none")
    manifest = writer.add_image([layer])
    writer.tag(manifest, "1.0")
    writer.write_archive(found.root / "huge" / "1.0.oci", compression="zstd", level=1)
    found.images["huge"] = Image(manifest.digest, [layer.digest], layer.digest, layer.size)
    return found


def test_eviction_during_a_transfer_does_not_abort_it(huge: Images, start: Start,
                                                      tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    registry = start(huge.root, "--cache-dir", str(cache))
    image = huge.images["huge"]
    host, port = registry.host.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.connect()
    assert connection.sock is not None
    connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    connection.request("GET", f"/v2/huge/blobs/{image.big}")
    response = connection.getresponse()
    assert response.status == 200
    hasher = hashlib.sha256(response.read(1 << 20))
    # Evicted while the client is still reading (what BlobCache.evict does to the LRU blob).
    (cache / "blobs" / "sha256" / image.big.split(":", 1)[1]).unlink()
    received = 1 << 20
    try:
        while chunk := response.read(1 << 20):
            hasher.update(chunk)
            received += len(chunk)
    except http.client.IncompleteRead as exc:
        received += len(exc.partial)
    finally:
        connection.close()
    assert received == image.big_size
    assert "sha256:" + hasher.hexdigest() == image.big


# ------------------------------------------------------------------------------ inflaters


def test_gzip_archives_are_served_alike_without_the_isal_wheel(
        compressed: Images, tmp_path: Path) -> None:
    """gzip is inflated with ISA-L where the ``isal`` wheel is installed and with zlib where
    it is not (issue 12): the zlib process here cannot import isal, as on a machine the
    wheel is not published for, and must serve the same bytes and refuse the same damage."""
    shim = tmp_path / "no-isal"
    (shim / "isal").mkdir(parents=True)
    (shim / "isal" / "__init__.py").write_text(
        'raise ImportError("no isal wheel for this machine (test)")\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), env.get("PYTHONPATH")]))
    isal_installed = importlib.util.find_spec("isal") is not None
    runs = [("zlib", env)] + ([("ISA-L (isal)", dict(os.environ))] if isal_installed else [])
    for expected, run_env in runs:
        log_path = tmp_path / f"{expected[:4]}.log"
        with RegistryProcess(compressed.root, "--cache-dir", str(tmp_path / expected[:4]),
                             log_path=log_path, env=run_env) as registry:
            image = compressed.images["gz"]
            status, headers, _ = request(registry.url + "/v2/gz/manifests/1.0")
            assert (status, headers["Docker-Content-Digest"]) == (200, image.manifest)
            for layer in image.layers:
                status, _, body = request(f"{registry.url}/v2/gz/blobs/{layer}")
                assert (status, "sha256:" + hashlib.sha256(body).hexdigest()) == (200, layer)
            status, _, body = request(
                f"{registry.url}/v2/bad/blobs/{compressed.images['bad'].big}")
            assert status == 404
            assert metrics(registry)[DECOMPRESSIONS] >= 2
        assert f"gzip archives are decompressed with {expected}" in log_path.read_text()
