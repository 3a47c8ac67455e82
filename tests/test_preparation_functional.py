"""Background preparation of compressed archives, observed on a real server process.

The server indexes gzip/zstd archives into its blob cache before anyone asks; what it did is
visible in /metrics (``registry_preparation_*``, ``registry_decompressions_total``), in the
status file in the cache directory, at ``/`` and in the cache directory's blob files, which is
what these tests look at. Layers above 4 MiB go through the blob cache (smaller ones stay in
the remembered index), so each image carries one.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from simple_oci_registry.layoutwriter import LayerFile, LayoutWriter, random_chunks
from simple_oci_registry.publish import publish
from tests.server import RegistryProcess, child_pids

BIG = 6 << 20
DECOMPRESSIONS = "registry_decompressions_total"

Start = Callable[..., RegistryProcess]


@dataclass(frozen=True)
class Image:
    manifest: str
    big: str
    size: int


def write_image(path: Path, text: str, *, seed: int) -> Image:
    """A gzip'd OCI archive ``path`` tagged 1.0 with a 6 MiB layer (random: incompressible)."""
    writer = LayoutWriter()
    big = writer.add_layer({f"{text}/big.bin": LayerFile.streamed(random_chunks(BIG, seed=seed),
                                                                  BIG)}, compression="gzip")
    manifest = writer.add_image([big], config={"config": {"Cmd": ["/bin/true"]}})
    writer.tag(manifest, "1.0")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_archive(path, compression="gzip")
    return Image(manifest.digest, big.digest, big.size)


def cached(cache: Path, digest: str) -> bool:
    return (cache / "blobs" / "sha256" / digest.split(":", 1)[1]).is_file()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def metrics(registry: RegistryProcess) -> dict[str, float]:
    """Every sample of /metrics by name and labels (``name{k=v}``)."""
    status, body = get(registry.url + "/metrics")
    assert status == 200
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def state(registry: RegistryProcess, name: str) -> float:
    return metrics(registry).get(f"registry_preparation_archives{{state={name}}}", 0.0)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_compressed_archive_is_prepared_before_any_request(
        image_dir: Path, start_registry: Start, tmp_path: Path) -> None:
    image = write_image(image_dir / "app" / "1.0.oci", "app", seed=1)
    cache = tmp_path / "cache"
    registry = start_registry(image_dir, "--cache-dir", str(cache))
    wait_for(lambda: state(registry, "prepared") == 1, "the archive to be prepared")

    assert cached(cache, image.big)  # decompressed, verified and kept without a request
    before = metrics(registry)
    assert before[DECOMPRESSIONS] == 1
    assert before["registry_blob_cache_fills_total"] == 1
    assert before["registry_preparation_filled_bytes_total"] >= BIG
    assert before["registry_preparation_active"] == 1
    assert before["registry_preparation_archives{state=pending}"] == 0
    assert before["registry_preparation_last_progress_timestamp_seconds"] > time.time() - 120
    assert before.get("registry_http_requests_total{endpoint=manifest,method=GET,status=200}",
                      0) == 0

    # The first pull finds it ready: no decompression of its own.
    assert get(registry.url + "/v2/app/manifests/1.0")[0] == 200
    status, body = get(registry.url + f"/v2/app/blobs/{image.big}")
    assert status == 200 and len(body) == image.size
    assert metrics(registry)[DECOMPRESSIONS] == 1

    status, page = get(registry.url + "/")
    assert status == 200
    assert b"Compressed archives ready ahead: 1 of 1 archive prepared, 0 pending" in page


def test_request_during_preparation_waits_for_it(
        image_dir: Path, start_registry: Start, tmp_path: Path) -> None:
    archive = image_dir / "slow" / "1.0.oci"
    image = write_image(archive, "slow", seed=2)
    cache = tmp_path / "cache"
    # Reads paced so that preparing takes about six seconds: a request surely lands in it.
    rate = archive.stat().st_size // 6
    registry = start_registry(image_dir, "--cache-dir", str(cache),
                              "--prepare-read-rate", str(rate))
    status_file = cache / "preparation.json"
    wait_for(lambda: status_file.is_file()
             and json.loads(status_file.read_text())["preparing"] == "slow/1.0.oci",
             "preparation to start")
    time.sleep(1.5)  # the child process has started and holds the archive's index lock

    started = time.monotonic()
    assert get(registry.url + "/v2/slow/manifests/1.0")[0] == 200
    waited = time.monotonic() - started
    assert waited > 1.0  # it waited for the preparation under way...
    wait_for(lambda: state(registry, "prepared") == 1, "the preparation to be recorded")
    # ...and started no second pass over the archive.
    assert metrics(registry)[DECOMPRESSIONS] == 1
    status, body = get(registry.url + f"/v2/slow/blobs/{image.big}")
    assert status == 200 and len(body) == image.size
    assert metrics(registry)[DECOMPRESSIONS] == 1


def test_changed_archive_is_prepared_again(
        image_dir: Path, start_registry: Start, tmp_path: Path) -> None:
    archive = image_dir / "app" / "1.0.oci"
    first = write_image(archive, "app", seed=3)
    cache = tmp_path / "cache"
    registry = start_registry(image_dir, "--cache-dir", str(cache))
    wait_for(lambda: cached(cache, first.big), "the first version to be prepared")

    staged = tmp_path / "staged.oci"
    second = write_image(staged, "app", seed=4)
    publish(str(staged), str(archive))  # renamed into place, as publishers should
    wait_for(lambda: cached(cache, second.big), "the new version to be prepared")
    wait_for(lambda: metrics(registry)[DECOMPRESSIONS] == 2, "the count to reach the metrics")
    assert state(registry, "prepared") == 1

    status, body = get(registry.url + "/v2/app/manifests/1.0")
    assert status == 200 and json.loads(body)["layers"][0]["digest"] == second.big
    assert metrics(registry)[DECOMPRESSIONS] == 2


def test_only_the_newest_archives_within_the_cache_share_are_prepared(
        image_dir: Path, start_registry: Start, tmp_path: Path) -> None:
    old = write_image(image_dir / "old" / "1.0.oci", "old", seed=5)
    new = write_image(image_dir / "new" / "1.0.oci", "new", seed=6)
    os.utime(image_dir / "old" / "1.0.oci", (time.time() - 3600, time.time() - 3600))
    cache = tmp_path / "cache"
    # Half of 16 MiB holds one 6 MiB layer, not two.
    registry = start_registry(image_dir, "--cache-dir", str(cache),
                              "--cache-max-bytes", str(16 << 20))
    wait_for(lambda: state(registry, "prepared") == 1 and state(registry, "deferred") == 1,
             "one archive prepared and one deferred")
    time.sleep(0.5)
    assert cached(cache, new.big)
    assert not cached(cache, old.big)  # left for its first pull
    assert metrics(registry)[DECOMPRESSIONS] == 1

    # The deferred archive is served on first use, as without preparation.
    status, body = get(registry.url + f"/v2/old/blobs/{old.big}")
    assert status == 200 and len(body) == old.size
    status, page = get(registry.url + "/")
    assert b"1 left for their first pull" in page


def test_only_one_worker_prepares_for_the_node(
        image_dir: Path, start_registry: Start, tmp_path: Path) -> None:
    image = write_image(image_dir / "app" / "1.0.oci", "app", seed=7)
    cache = tmp_path / "cache"
    registry = start_registry(image_dir, "--cache-dir", str(cache), "--workers", "2")
    wait_for(lambda: cached(cache, image.big), "the archive to be prepared")
    assert registry.process is not None
    workers = child_pids(registry.process.pid)
    assert len(workers) == 2
    preparers = [pid for worker in workers for pid in child_pids(worker)
                 if b"simple_oci_registry.preparation" in Path(f"/proc/{pid}/cmdline")
                 .read_bytes()]
    assert len(preparers) == 1
    # Summed over live workers (multiprocess mode), whichever worker answers the scrape.
    wait_for(lambda: metrics(registry).get("registry_preparation_active") == 1,
             "the preparing worker's metrics")
    for _ in range(4):
        found = metrics(registry)
        assert found["registry_preparation_active"] == 1
        assert found["registry_preparation_archives{state=prepared}"] == 1
        assert found[DECOMPRESSIONS] == 1


def test_preparation_can_be_turned_off(
        image_dir: Path, start_registry: Start, tmp_path: Path) -> None:
    image = write_image(image_dir / "app" / "1.0.oci", "app", seed=8)
    cache = tmp_path / "cache"
    registry = start_registry(image_dir, "--cache-dir", str(cache), "--no-prepare-ahead")
    time.sleep(1.0)
    assert not cached(cache, image.big)
    assert metrics(registry).get(DECOMPRESSIONS, 0) == 0
    assert get(registry.url + f"/v2/app/blobs/{image.big}")[0] == 200
    assert cached(cache, image.big)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path
