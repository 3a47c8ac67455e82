"""What background preparation's walk costs in filesystem operations (preparation.py), counted
on a FUSE passthrough with attribute caching off (NFS ``noac``): a publish into a folder of many
archives costs a look at the new archive only, and a restarted server trusts what the node's
last survey saw instead of opening every archive of the shared directory again."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simple_oci_registry.blobcache import BlobCache
from simple_oci_registry.config import Config
from simple_oci_registry.directory import RACY_SECONDS
from simple_oci_registry.layoutwriter import LayoutWriter
from simple_oci_registry.preparation import KINDS_FILE, Preparer, load_kinds
from tests.images import small_image

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # ``bench`` is a top-level directory, not an installed package
    sys.path.insert(0, str(REPO))

from bench import latencyfs  # noqa: E402
from bench.latencyfs import FuseUnavailable, LatencyFS, Options, total  # noqa: E402

COUNT = 60


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[tuple[LatencyFS, Path, Path]]:
    source = tmp_path / "src"
    source.mkdir()
    writer = LayoutWriter()
    image, _ = small_image(writer, "survey")
    writer.tag(image, None)
    writer.write_archive(source / "n000:1.0.oci")
    for i in range(1, COUNT):
        shutil.copyfile(source / "n000:1.0.oci", source / f"n{i:03d}:1.0.oci")
    time.sleep(RACY_SECONDS + 0.1)  # listings read now are settled
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        with latencyfs.mount(source, mountpoint, Options(latency=0.0)) as fs:
            yield fs, source, mountpoint
    except FuseUnavailable as exc:
        pytest.skip(str(exc))


async def _walk(root: Path, cache: BlobCache) -> Preparer:
    preparer = Preparer(Config(directory=root), cache)
    assert not await preparer.step()  # nothing compressed: nothing to prepare
    return preparer


async def test_the_survey_follows_change_and_survives_a_restart(
        mounted: tuple[LatencyFS, Path, Path], tmp_path: Path) -> None:
    fs, source, root = mounted
    cache = BlobCache(tmp_path / "cache", 1 << 30)
    fs.take()
    first = await _walk(root, cache)
    new_node = fs.take()
    assert new_node.get("open", 0) >= COUNT  # a new node sniffs every archive once
    assert len(load_kinds(cache.directory)) == COUNT

    shutil.copyfile(source / "n000:1.0.oci", source / "new:1.0.oci")  # a publish
    fs.take()
    assert not await first.step()
    publish = fs.take()
    assert first.stats.surveys == 2
    # The folder's stat and listing, then the new archive only (opened once): a handful of
    # operations, where a look at each of the folder's archives would be several times COUNT.
    assert publish.get("open", 0) == 1, publish
    assert total(publish) <= 10, publish
    await first.close()

    fs.take()
    restarted = await _walk(root, cache)  # same node cache: a restart
    again = fs.take()
    await restarted.close()
    assert again.get("open", 0) == 0, again
    assert total(again) <= 8, again  # the folder's stat and listing, no archive's
    assert (cache.directory / KINDS_FILE).exists()
