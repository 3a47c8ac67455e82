"""The preparation policy (newest first, within the cache share), the status file, and one
archive prepared in this process against a real blob cache."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import time
from pathlib import Path

import pytest

from simple_oci_registry.archive import ArchiveLimits
from simple_oci_registry.blobcache import BlobCache
from simple_oci_registry.catalogpage import render_page
from simple_oci_registry.config import Config
from simple_oci_registry.fingerprint import Fingerprint
from simple_oci_registry.inventory import Listing
from simple_oci_registry.layoutwriter import LayerFile, LayoutWriter, random_chunks
from simple_oci_registry.preparation import (
    LEASE_FILE,
    STATUS_FILE,
    Outcome,
    PreparationStatus,
    Preparer,
    Survey,
    plan_preparation,
    prepare_archive,
    read_status,
    write_status,
)


def survey(path: str, size: int, mtime: int) -> Survey:
    return Survey(path, Fingerprint(1, hash(path) & 0xFFFF, size, mtime))


def test_newest_first_until_the_share_is_used() -> None:
    items = [survey("old", 40, 1), survey("mid", 50, 2), survey("new", 30, 3),
             survey("tiny", 5, 0)]
    plan = plan_preparation(items, {}, 100)
    # new (30) + mid (50) fit; old (40) would not, but the tiny oldest one still does.
    assert plan.pending == ("new", "mid", "tiny")
    assert plan.deferred == ("old",)
    assert plan.prepared == () and plan.failed == ()


def test_prepared_archives_count_with_their_real_size_and_failures_are_not_retried() -> None:
    new, mid, old = survey("new", 10, 3), survey("mid", 10, 2), survey("old", 10, 1)
    done = {"new": Outcome(new.fingerprint, True, blob_bytes=60),
            "mid": Outcome(mid.fingerprint, False, reason="broken"),
            "old": Outcome(Fingerprint(9, 9, 9, 9), True, blob_bytes=1)}  # another version
    plan = plan_preparation([new, mid, old], done, 65)
    assert plan.prepared == ("new",)
    assert plan.failed == ("mid",)  # until it changes
    assert plan.deferred == ("old",)  # 60 + 10 > 65: its current version is not prepared
    assert plan.pending == ()


def test_status_file_round_trip(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    assert read_status(tmp_path) is None
    status = PreparationStatus(2, 1, 0, 3, 1234.5, "a/1.0.oci")
    write_status(tmp_path, status)
    assert read_status(tmp_path) == status
    (tmp_path / STATUS_FILE).write_text("{not json")
    assert read_status(tmp_path) is None


def test_page_shows_the_preparation_progress() -> None:
    page = render_page(Listing((), (), 0), "example:5000", secure=True,
                       preparation=PreparationStatus(2, 1, 1, 3))
    assert ("Compressed archives ready ahead: 2 of 7 archives prepared, 1 pending, 1 failed, "
            "3 left for their first pull") in page
    assert "ready ahead" not in render_page(Listing((), (), 0), "example:5000", secure=True,
                                           preparation=PreparationStatus())


def write_archive(path: Path, size: int) -> str:
    writer = LayoutWriter()
    layer = writer.add_layer({"big.bin": LayerFile.streamed(random_chunks(size, seed=1), size)},
                             compression="gzip")
    writer.tag(writer.add_image([layer], config={}), "1.0")
    writer.write_archive(path, compression="gzip")
    return layer.digest


def test_prepare_archive_fills_the_cache_once(tmp_path: Path) -> None:
    archive = tmp_path / "app.oci"
    digest = write_archive(archive, 5 << 20)
    cache = BlobCache(tmp_path / "cache", 1 << 30)
    first = prepare_archive(str(archive), cache, ArchiveLimits())
    assert first["ok"] and first["decompressions"] == 1 and first["fills"] == 1
    assert first["blob_bytes"] == cache.path(digest).stat().st_size
    assert tuple(first["fingerprint"]) == _astuple(archive)
    # Prepared already: the remembered index and the cached blob suffice.
    second = prepare_archive(str(archive), cache, ArchiveLimits())
    assert second["ok"] and second["decompressions"] == 0 and second["fills"] == 0
    # Evicted: the blob comes back, with one more pass.
    cache.path(digest).unlink()
    third = prepare_archive(str(archive), cache, ArchiveLimits())
    assert third["ok"] and third["decompressions"] == 1 and cache.contains(digest, third[
        "blob_bytes"])


def _astuple(archive: Path) -> tuple[int, ...]:
    fp = Fingerprint.of_path(str(archive))
    return (fp.device, fp.inode, fp.size, fp.mtime_ns, fp.ctime_ns, fp.links)


def test_an_unreadable_archive_fails_with_the_reason(tmp_path: Path) -> None:
    archive = tmp_path / "bad.oci"
    archive.write_bytes(gzip.compress(b"not a tar archive" * 100))
    answer = prepare_archive(str(archive), BlobCache(tmp_path / "cache", 1 << 30),
                             ArchiveLimits())
    assert not answer["ok"]
    assert answer["reason"]
    assert tuple(answer["fingerprint"]) == _astuple(archive)


def test_read_rate_paces_the_scan(tmp_path: Path) -> None:
    archive = tmp_path / "app.oci"
    write_archive(archive, 1 << 20)
    rate = archive.stat().st_size * 2  # half a second's worth
    started = time.monotonic()
    answer = prepare_archive(str(archive), BlobCache(tmp_path / "cache", 1 << 30),
                             ArchiveLimits(read_bytes_per_second=rate))
    assert answer["ok"]
    assert time.monotonic() - started >= 0.45


async def test_an_unusable_lease_file_turns_preparation_off_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = BlobCache(tmp_path / "cache", 1 << 30)
    (cache.directory / LEASE_FILE).mkdir()  # cannot be opened for writing: EISDIR
    config = Config(directory=tmp_path)
    preparer = Preparer.create(config, cache)
    assert preparer is not None
    await asyncio.wait_for(preparer.run(), 5)  # returns instead of retrying for ever
    assert not preparer.active
    assert "cannot take the preparation lease" in caplog.text
    assert Preparer.create(dataclasses.replace(config, prepare_ahead=False), cache) is None
    assert Preparer.create(config, None) is None
