"""The node-local blob cache on its own: verified writes, eviction, fill locks, index files.

Everything here is the blocking API the store calls from worker threads, used directly; the
cache serving real pulls is tested against a real process in test_compressed_functional.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from simple_oci_registry.blobcache import BlobCache, CachedIndex
from simple_oci_registry.fingerprint import Fingerprint


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def leftovers(cache: BlobCache) -> list[Path]:
    return sorted((cache.directory / "tmp").iterdir())


@pytest.fixture
def cache(tmp_path: Path) -> BlobCache:
    created = BlobCache.create(tmp_path / "cache", 1 << 30)
    assert created is not None
    return created


# ------------------------------------------------------------------------------ store / open


def test_store_verifies_and_renames_into_place(cache: BlobCache) -> None:
    data = b"layer bytes " * 1000
    digest = digest_of(data)
    assert not cache.contains(digest, len(data))
    assert cache.open(digest, len(data)) is None
    assert cache.store(digest, len(data), [data[:100], data[100:5000], data[5000:]])
    path = cache.path(digest)
    assert path == cache.directory / "blobs" / "sha256" / digest.split(":", 1)[1]
    assert path.read_bytes() == data
    assert cache.contains(digest, len(data))
    assert leftovers(cache) == []
    assert (cache.stats.fills, cache.stats.filled_bytes, cache.stats.rejected) == (1, len(data), 0)
    file = cache.open(digest, len(data))
    assert file is not None
    with file:
        assert file.read() == data
    assert cache.stats.hits == 1
    # A file of another size under the name is not the blob (and not a hit).
    assert cache.open(digest, len(data) + 1) is None
    assert not cache.contains(digest, len(data) + 1)
    assert cache.stats.hits == 1


@pytest.mark.parametrize("case", ["other bytes", "short", "long"])
def test_mismatching_bytes_are_not_kept(cache: BlobCache, case: str,
                                        caplog: pytest.LogCaptureFixture) -> None:
    data = b"the real content\n" * 100
    digest = digest_of(data)
    given = {"other bytes": data.replace(b"real", b"fake"), "short": data[:-1],
             "long": data + b"!"}[case]
    consumed: list[bytes] = []

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(given), 256):
            consumed.append(given[start:start + 256])
            yield given[start:start + 256]

    with caplog.at_level(logging.ERROR, logger="simple_oci_registry.blobcache"):
        assert cache.store(digest, len(data), chunks()) is False
    assert b"".join(consumed) == given  # read through to the end, as documented
    assert not cache.path(digest).exists()
    assert not cache.contains(digest, len(data))
    assert leftovers(cache) == []
    assert (cache.stats.rejected, cache.stats.fills) == (1, 0)
    assert digest in caplog.text


def test_failing_source_leaves_no_file(cache: BlobCache) -> None:
    data = b"x" * 10_000

    def chunks() -> Iterator[bytes]:
        yield data[:5000]
        raise OSError("decompression failed")

    with pytest.raises(OSError, match="decompression failed"):
        cache.store(digest_of(data), len(data), chunks())
    assert not cache.path(digest_of(data)).exists()
    assert leftovers(cache) == []


def test_tmp_leftovers_are_removed_at_start(tmp_path: Path) -> None:
    first = BlobCache(tmp_path / "cache", 1 << 20)
    data = b"kept across restarts"
    assert first.store(digest_of(data), len(data), [data])
    # A crash mid-write leaves temporary files behind; they are never final.
    for name in ("abcdef0123456789xyz", "index1234"):
        (first.directory / "tmp" / name).write_bytes(b"partial")
    again = BlobCache.create(tmp_path / "cache", 1 << 20)
    assert again is not None
    assert leftovers(again) == []
    assert again.contains(digest_of(data), len(data))


# ------------------------------------------------------------------------------ eviction


def test_least_recently_used_blobs_are_evicted_first(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", max_bytes=3000)
    blobs = [bytes([i]) * 1000 for i in range(4)]
    digests = [digest_of(b) for b in blobs]
    for age, (blob, digest) in enumerate(zip(blobs[:3], digests[:3], strict=True)):
        assert cache.store(digest, len(blob), [blob])
        # Explicit mtimes (LRU order is mtime order): blob 0 oldest, blob 2 newest.
        stamp = 1_000_000_000 + age * 1000
        os.utime(cache.path(digest), (stamp, stamp))
    # Reading blob 0 makes it the most recently used. Blob 1 was read long ago (its use
    # stamp, set back here, is older than blob 2's write).
    for digest in digests[1], digests[0]:
        file = cache.open(digest, 1000)
        assert file is not None
        file.close()
    stamp = cache.directory / "used" / "sha256" / digests[1].split(":", 1)[1]
    os.utime(stamp, (1_000_000_500, 1_000_000_500))
    # Blob 3 takes the cache past max_bytes: the least recently used one (1) goes.
    assert cache.store(digests[3], 1000, [blobs[3]])
    assert [cache.contains(d, 1000) for d in digests] == [True, False, True, True]
    assert cache.stats.evictions == 1
    assert not stamp.exists()  # the use stamp goes with the blob
    # An explicit pass with room to spare removes nothing more.
    cache.evict()
    assert cache.stats.evictions == 1


def test_a_hit_leaves_the_blob_file_untouched(cache: BlobCache) -> None:
    # Transfers from a cached file check its stat fingerprint between chunks: a hit by
    # another request must not change it (it did, via utime, and aborted those transfers).
    data = b"shared layer" * 1000
    digest = digest_of(data)
    assert cache.store(digest, len(data), [data])
    first = cache.open(digest, len(data))
    assert first is not None
    with first:
        before = os.fstat(first.fileno())
        for _ in range(3):
            again = cache.open(digest, len(data))
            assert again is not None
            again.close()
        after = os.fstat(first.fileno())
    assert (after.st_mtime_ns, after.st_ctime_ns) == (before.st_mtime_ns, before.st_ctime_ns)
    assert cache.stats.hits == 4


def test_evicted_blob_still_open_stays_readable(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", max_bytes=1500)
    old, new = b"o" * 1000, b"n" * 1000
    assert cache.store(digest_of(old), 1000, [old])
    os.utime(cache.path(digest_of(old)), (1_000_000_000, 1_000_000_000))
    reader = cache.open(digest_of(old), 1000)
    assert reader is not None
    os.utime(cache.path(digest_of(old)), (1_000_000_000, 1_000_000_000))
    with reader:
        assert cache.store(digest_of(new), 1000, [new])
        assert not cache.contains(digest_of(old), 1000)
        assert reader.read() == old  # a transfer in flight keeps its bytes


# ------------------------------------------------------------------------------ fill locks


def test_concurrent_fillers_fill_once(cache: BlobCache) -> None:
    data = os.urandom(256 << 10)
    digest = digest_of(data)
    threads = 12
    start = threading.Barrier(threads)
    filled: list[int] = []
    readers_ok: list[bool] = []
    errors: list[BaseException] = []
    first_in = threading.Event()

    def chunks() -> Iterator[bytes]:
        first_in.set()
        for offset in range(0, len(data), 16 << 10):
            yield data[offset:offset + (16 << 10)]

    def fill(number: int) -> None:
        try:
            start.wait()
            with cache.filling(digest, len(data)) as needed:
                if needed:
                    filled.append(number)
                    assert cache.store(digest, len(data), chunks())
            file = cache.open(digest, len(data))
            assert file is not None
            with file:
                readers_ok.append(file.read() == data)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    workers = [threading.Thread(target=fill, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not errors, errors
    assert len(filled) == 1
    assert readers_ok == [True] * threads
    assert cache.stats.fills == 1
    assert leftovers(cache) == []


def test_fill_lock_is_per_blob(cache: BlobCache) -> None:
    # Holding one blob's fill lock does not block the fill of another.
    one, two = b"one" * 100, b"two" * 100
    with cache.filling(digest_of(one), len(one)) as needed:
        assert needed
        done = threading.Event()

        def other() -> None:
            with cache.filling(digest_of(two), len(two)) as needed_two:
                assert needed_two
                assert cache.store(digest_of(two), len(two), [two])
            done.set()

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(30)
        assert done.is_set()
        assert cache.store(digest_of(one), len(one), [one])
    with cache.filling(digest_of(one), len(one)) as needed:
        assert not needed  # already cached: later fillers skip the work


# ------------------------------------------------------------------------------ indexes


def archive_fingerprint(path: Path) -> Fingerprint:
    return Fingerprint.of_path(str(path))


def test_index_round_trip(cache: BlobCache, tmp_path: Path) -> None:
    archive = tmp_path / "app.oci"
    archive.write_bytes(b"pretend this is a gzip archive")
    fingerprint = archive_fingerprint(archive)
    index = CachedIndex(
        members={"index.json": (1536, 19), "oci-layout": (2560, 256),
                 "blobs/sha256/" + "a" * 64: (4096, 10 << 20)},
        small={"index.json": b'{"schemaVersion":2}', "oci-layout": bytes(range(256))})
    assert cache.load_index(str(archive), fingerprint) is None
    cache.save_index(str(archive), fingerprint, index)
    assert leftovers(cache) == []
    loaded = cache.load_index(str(archive), fingerprint)
    assert loaded == index
    assert cache.stats.index_hits == 1
    # A new cache object over the same directory (a restart) finds it too.
    restarted = BlobCache(cache.directory, cache.max_bytes)
    assert restarted.load_index(str(archive), fingerprint) == index
    # Another archive path or version does not.
    assert cache.load_index(str(tmp_path / "other.oci"), fingerprint) is None
    archive.write_bytes(b"a new version of the archive, longer")
    assert cache.load_index(str(archive), archive_fingerprint(archive)) is None


def test_index_of_an_in_place_rewrite_is_not_reused(cache: BlobCache, tmp_path: Path) -> None:
    # Same inode, size and (restored) mtime: only ctime tells the rewrite, as it does for the
    # store's own fingerprint, so the remembered member table must not be taken for it.
    archive = tmp_path / "app.oci"
    archive.write_bytes(b"version one of the archive")
    before = archive_fingerprint(archive)
    cache.save_index(str(archive), before, CachedIndex({"index.json": (0, 10)},
                                                       {"index.json": b"v1 index.."}))
    with open(archive, "r+b") as handle:
        handle.write(b"VERSION TWO")
    os.utime(archive, ns=(before.mtime_ns, before.mtime_ns))
    after = archive_fingerprint(archive)
    assert (after.inode, after.size, after.mtime_ns) == (before.inode, before.size,
                                                        before.mtime_ns)
    if after.ctime_ns == before.ctime_ns:
        pytest.skip("the filesystem's ctime did not advance")
    assert cache.load_index(str(archive), after) is None


@pytest.mark.parametrize("content", [
    b"not json", b"[]", b'{"version": 99}', b'{"version": 1}',
    b'{"version": 1, "members": {"a": [1]}, "small": {}}',
    b'{"version": 1, "members": {"a": [0, 0]}, "small": {"a": "!!"}}',  # not base64
    b'{"version": 1, "members": {"a": [0, 9]}, "small": {"a": "YWJj"}}',  # size mismatch
    b'{"version": 1, "members": {}, "small": {"a": "YWJj"}}',  # not a member
])
def test_damaged_index_files_are_ignored(cache: BlobCache, tmp_path: Path,
                                         content: bytes) -> None:
    archive = tmp_path / "app.oci"
    archive.write_bytes(b"archive")
    fingerprint = archive_fingerprint(archive)
    cache.save_index(str(archive), fingerprint, CachedIndex({}, {}))
    [saved] = (cache.directory / "indexes").iterdir()
    json.loads(saved.read_bytes())  # what save_index writes is JSON
    saved.write_bytes(content)
    assert cache.load_index(str(archive), fingerprint) is None


# ------------------------------------------------------------------------------ create


def test_unusable_directory_gives_no_cache_and_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a directory")
    with caplog.at_level(logging.WARNING, logger="simple_oci_registry.blobcache"):
        assert BlobCache.create(blocker, 1 << 20) is None
        assert BlobCache.create(blocker / "below", 1 << 20) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all("unusable" in r.getMessage() and str(blocker) in r.getMessage()
               for r in warnings)


def test_no_directory_or_no_room_means_no_cache(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert BlobCache.create(None, 1 << 20) is None
        assert BlobCache.create(tmp_path / "cache", 0) is None
    assert not (tmp_path / "cache").exists()
    assert caplog.records == []  # not configured is not a problem worth a warning


def test_old_records_and_unheld_old_locks_are_forgotten(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", 1 << 20)
    now = 1_000_000_000.0
    month_and_more = now - 40 * 86400
    (tmp_path / "cache" / "facts").mkdir()
    old_index = tmp_path / "cache" / "indexes" / "old.json"
    new_index = tmp_path / "cache" / "indexes" / "new.json"
    old_facts = tmp_path / "cache" / "facts" / "old.json"
    old_lock = tmp_path / "cache" / "locks" / "free"
    held_lock = tmp_path / "cache" / "locks" / "held"
    for path in (old_index, new_index, old_facts, old_lock, held_lock):
        path.write_text("{}")
    for path in (old_index, old_facts, old_lock, held_lock):
        os.utime(path, (month_and_more, month_and_more))
    os.utime(new_index, (now - 60, now - 60))
    holder = os.open(held_lock, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # a filler at work right now
        assert cache.forget_old_records(now=now) == 3
    finally:
        os.close(holder)
    assert not old_index.exists() and not old_facts.exists() and not old_lock.exists()
    assert new_index.exists() and held_lock.exists()
