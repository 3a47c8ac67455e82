"""What a request costs in filesystem operations (directory.py, store.py), counted on a FUSE
passthrough with attribute caching off (the model of NFS ``noac``): warm requests and 404s
cost a few stats whatever the size of the directory, and never a directory read."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simple_oci_registry.config import Config
from simple_oci_registry.directory import RACY_SECONDS, SLOW_STAT_SECONDS
from simple_oci_registry.errors import ErrorCode, RegistryError
from simple_oci_registry.layoutwriter import LayoutWriter
from simple_oci_registry.store import ImageStore
from tests.images import small_image

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # ``bench`` is a top-level directory, not an installed package
    sys.path.insert(0, str(REPO))

from bench import latencyfs  # noqa: E402
from bench.latencyfs import FuseUnavailable, LatencyFS, Options, total  # noqa: E402

FLAT = 300


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[tuple[LatencyFS, Path]]:
    source = tmp_path / "src"
    (source / "app").mkdir(parents=True)
    writer = LayoutWriter()
    image, _ = small_image(writer, "cost")
    writer.tag(image, None)  # untagged: each file's name gives its tag
    writer.write_archive(source / "app" / "1.0.oci")
    for i in range(FLAT):
        shutil.copyfile(source / "app" / "1.0.oci", source / f"n{i:03d}:1.0.oci")
    time.sleep(RACY_SECONDS + 0.1)  # listings read now are settled
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        with latencyfs.mount(source, mountpoint, Options(latency=0.0)) as fs:
            yield fs, mountpoint
    except FuseUnavailable as exc:
        pytest.skip(str(exc))


async def test_warm_requests_and_misses_cost_a_few_stats(
        mounted: tuple[LatencyFS, Path]) -> None:
    fs, root = mounted
    store = ImageStore(Config(directory=root))
    try:
        for name in ("app", "n007"):
            await store.manifest(name, "1.0")  # first sight: listings read, archives indexed
            await store.manifest(name, "1.0")
        fs.take()
        await store.manifest("app", "1.0")  # pattern 1: its folder, the pinned archive
        warm_own = fs.take()
        await store.manifest("n007", "1.0")  # pattern 3 in a flat folder of 300
        warm_flat = fs.take()
        for i in range(20):
            with pytest.raises(RegistryError) as info:
                await store.manifest(f"never-seen-{i}", "1.0")
            assert info.value.code is ErrorCode.NAME_UNKNOWN
        misses = fs.take()
    finally:
        store.close()
    print("warm own", warm_own, "warm flat", warm_flat, "20 misses", misses)
    for counts in (warm_own, warm_flat, misses):
        assert counts.get("readdir", 0) == 0 and counts.get("opendir", 0) == 0, counts
    assert total(warm_own) <= 3, warm_own
    assert total(warm_flat) <= 3, warm_flat
    # One stat of the parent each: the first one asks the file server (a name never seen
    # most likely ends in a 404), which makes it the only look; the others may not ask it
    # again within the second, so their plain stat is their look.
    assert total(misses) == 20, misses


async def test_a_request_issues_its_stats_side_by_side_on_slow_storage(
        mounted: tuple[LatencyFS, Path]) -> None:
    """A warm pattern-1 manifest depends on its folder and its pinned archive: on storage where
    a stat is a round trip, both are asked at once (one round trip), which the passthrough
    sees as two operations in flight together (on a local disk they stay on one thread:
    tests/test_directory.py)."""
    fs, root = mounted
    store = ImageStore(Config(directory=root))
    try:
        await store.manifest("app", "1.0")
        fs.set_latency(0.005)  # 5 ms a metadata operation: a distant file server
        for _ in range(3):  # the running average of a stat learns the storage is slow
            await store.manifest("app", "1.0")
        fs.take()
        await store.manifest("app", "1.0")
        counts = fs.take()
    finally:
        store.close()
    assert store.directory.stat_seconds > SLOW_STAT_SECONDS
    assert total(counts) <= 3 and fs.peak >= 2, (counts, fs.peak)


async def test_first_sight_opens_the_archive_once(mounted: tuple[LatencyFS, Path]) -> None:
    """Indexing reads the tar headers, index.json, the manifest and the config through the
    pinned descriptor (pread) and checks the file once at the end: one open, not one per
    member read (each open and its fstat are round trips on NFS). Before, a first sight cost
    8 opens and about 50 operations; without attribute caching each read still asks for the
    file's attributes (as an NFS ``noac`` client does), which the bound leaves room for.
    The directory's listing was read when the worker started, so its ten thousand entries
    are not what the first request waits for."""
    fs, root = mounted
    store = ImageStore(Config(directory=root))
    try:
        await store.prime()  # what a worker does before it accepts connections
        fs.take()
        await store.manifest("n011", "1.0")
        first = fs.take()
    finally:
        store.close()
    print("first sight", first)
    assert first.get("open", 0) == 1, first
    assert first.get("opendir", 0) == 0, first  # the flat folder's listing was read at start
    assert total(first) <= 14, first
