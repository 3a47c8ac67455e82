"""The node-local cache that makes compressed archives as fast as plain ones after first use.

A member of a gzip/zstd archive has no byte window to ``sendfile`` from, so its decompressed
bytes are kept here, content-addressed (``blobs/<alg>/<encoded>``: a blob shared by several
archives is stored once) and verified against the digest before they are kept. Writes go to a
temporary file that is fsync'ed and renamed into place, so a crash never leaves a partial blob
under a final name; the cache survives restarts. Worker processes share the directory: an
``flock`` per blob (and per archive index) makes one of them do the work while the others wait
and then find the result. Least recently used blobs are evicted beyond ``max_bytes`` (an
evicted file still open by a transfer stays readable until that transfer closes it).

The cache also remembers archive indexes (member table and small members such as index.json
and manifests) keyed by the archive's path and fingerprint, so a restart does not decompress
an unchanged archive again just to find its members.

Everything here blocks: callers run it in worker threads.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from simple_oci_registry.fingerprint import Fingerprint

__all__ = ["BlobCache", "CacheStats", "CachedIndex"]

log = logging.getLogger(__name__)

_INDEX_VERSION: Final = 1
_EVICT_EVERY_BYTES: Final = 256 << 20
_RECORD_MAX_AGE: Final = 30 * 86400.0
_LOCK_MAX_AGE: Final = 86400.0


@dataclass(slots=True)
class CacheStats:
    """Counters for metrics and tests (a fill is one decompression of one blob)."""

    hits: int = 0
    fills: int = 0
    filled_bytes: int = 0
    evictions: int = 0
    index_hits: int = 0
    rejected: int = 0
    decompressions: int = 0  # passes over a compressed archive (scans and refills)
    size_bytes: int = 0  # blobs in the cache after the last eviction pass (node-wide)


@dataclass(frozen=True, slots=True)
class CachedIndex:
    """A compressed archive's member table and small members, as remembered."""

    members: dict[str, tuple[int, int]]
    small: dict[str, bytes]


class BlobCache:
    """A content-addressed directory of verified, decompressed blobs."""

    def __init__(self, directory: Path, max_bytes: int, *, tidy: bool = True) -> None:
        """``tidy``: drop crash leftovers and old records (at server start). A helper process
        that joins a running server's cache passes False: the temporary files it would remove
        are the running workers' fills in progress."""
        self.directory = directory
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._since_evict = 0
        for sub in ("blobs", "tmp", "indexes", "locks", "used"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        if not tidy:
            return
        # Leftovers of a crash mid-write: never final, safe to drop.
        for leftover in (directory / "tmp").iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
        self.forget_old_records()

    def forget_old_records(self, now: float | None = None) -> int:
        """Drop bookkeeping nobody needs any more; returns how many files went.

        Remembered archive indexes and facts are written once per archive version and never
        rewritten, so they pile up as archives are replaced: those older than
        ``_RECORD_MAX_AGE`` go (one still in use costs one more decompression, then is
        written again). Lock files older than ``_LOCK_MAX_AGE`` go when nobody holds them;
        should a filler open one just before it goes, two fillers may decompress the same
        blob once, which the verified, atomic writes make harmless.
        """
        now = time.time() if now is None else now
        removed = 0
        for sub, max_age in (("indexes", _RECORD_MAX_AGE), ("facts", _RECORD_MAX_AGE)):
            for record in _files(self.directory / sub):
                with contextlib.suppress(OSError):
                    if now - record.stat().st_mtime > max_age:
                        record.unlink()
                        removed += 1
        for lock in _files(self.directory / "locks"):
            with contextlib.suppress(OSError):
                if now - lock.stat().st_mtime <= _LOCK_MAX_AGE:
                    continue
                fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: skip (raises)
                    lock.unlink()
                    removed += 1
                finally:
                    os.close(fd)
        return removed

    @classmethod
    def create(cls, directory: Path | None, max_bytes: int) -> BlobCache | None:
        """The cache, or None (with a warning) when the directory cannot be used."""
        if directory is None or max_bytes == 0:
            return None
        try:
            cache = cls(directory, max_bytes)
            probe = tempfile.NamedTemporaryFile(dir=directory / "tmp")  # noqa: SIM115
            probe.close()
            cache.evict()  # fits the bound at once (it may have shrunk), and knows its size
            return cache
        except OSError as exc:
            log.warning("blob cache %s unusable (%s): compressed archives will be streamed "
                        "and decompressed on every pull", directory, exc.strerror or exc)
            return None

    def count_decompression(self) -> None:
        with self._lock:
            self.stats.decompressions += 1

    # ------------------------------------------------------------------ blobs

    def path(self, digest: str) -> Path:
        algorithm, _, encoded = digest.partition(":")
        return self.directory / "blobs" / algorithm / encoded

    def open(self, digest: str, size: int) -> IO[bytes] | None:
        """The cached blob opened for reading, or None. Marks it recently used."""
        path = self.path(digest)
        try:
            file = open(path, "rb", buffering=0)  # noqa: SIM115 - returned to the caller
        except FileNotFoundError:
            return None
        if os.fstat(file.fileno()).st_size != size:
            file.close()
            return None
        self._mark_used(digest)
        with self._lock:
            self.stats.hits += 1
        return file

    def _used_path(self, digest: str) -> Path:
        algorithm, _, encoded = digest.partition(":")
        return self.directory / "used" / algorithm / encoded

    def _mark_used(self, digest: str) -> None:
        """Stamp the blob as just used, on a file beside it (LRU order is this mtime order).

        Never on the blob itself: touching it changes its ctime (and mtime), which every
        transfer in flight from that file checks between chunks (archive._FdReader), so each
        hit aborted the other downloads of the same blob that were under way.
        """
        used = self._used_path(digest)
        try:
            used.touch()
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                used.parent.mkdir(parents=True, exist_ok=True)
                used.touch()
        except OSError:
            pass

    def _last_used_ns(self, path: Path, st: os.stat_result) -> int:
        """The later of the blob's write and its last use."""
        try:
            used = (self.directory / "used" / path.parent.name / path.name).stat().st_mtime_ns
        except OSError:
            return st.st_mtime_ns
        return max(st.st_mtime_ns, used)

    def contains(self, digest: str, size: int) -> bool:
        try:
            return self.path(digest).stat().st_size == size
        except OSError:
            return False

    @contextlib.contextmanager
    def _flock(self, key: str) -> Iterator[None]:
        lock_path = self.directory / "locks" / (hashlib.sha256(key.encode()).hexdigest()[:32])
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def filling(self, digest: str, size: int) -> Iterator[bool]:
        """Hold the fill lock of ``digest``; yields False when it is already cached.

        Concurrent fillers (threads or worker processes) queue on the lock; the later ones
        find the blob in place and skip the work.
        """
        with self._flock("blob:" + digest):
            yield not self.contains(digest, size)

    def store(self, digest: str, size: int, chunks: Iterable[bytes]) -> bool:
        """Write ``chunks`` as ``digest``: verified, fsync'ed, renamed into place.

        Returns False (nothing kept) when the bytes do not match the digest or size. The
        caller holds :meth:`filling`. Every chunk is consumed even after a mismatch, so a
        caller may pass a stream it must read through anyway.
        """
        algorithm, _, encoded = digest.partition(":")
        hasher = hashlib.new(algorithm)
        written = 0
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory / "tmp", prefix=encoded[:16])
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    hasher.update(chunk)
                    written += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if written != size or hasher.hexdigest() != encoded:
                with self._lock:
                    self.stats.rejected += 1
                log.error("not caching %s: decompressed bytes do not match the digest", digest)
                return False
            os.replace(tmp, final)
            tmp = ""
            _fsync_dir(final.parent)
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        with self._lock:
            self.stats.fills += 1
            self.stats.filled_bytes += size
            self._since_evict += size
            evict = self._since_evict >= _EVICT_EVERY_BYTES
            if evict:
                self._since_evict = 0
        if evict or size > self.max_bytes // 8:
            self.evict()
        return True

    def evict(self) -> None:
        """Remove least recently used blobs until the cache fits ``max_bytes``."""
        entries: list[tuple[int, int, Path]] = []
        total = 0
        for path in (self.directory / "blobs").glob("*/*"):
            try:
                st = path.stat()
            except OSError:
                continue
            entries.append((self._last_used_ns(path, st), st.st_size, path))
            total += st.st_size
        entries.sort()
        for _mtime, size, path in entries:
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
                with self._lock:
                    self.stats.evictions += 1
            with contextlib.suppress(OSError):
                (self.directory / "used" / path.parent.name / path.name).unlink()
        self.stats.size_bytes = total

    # ------------------------------------------------------------------ archive indexes

    def _index_path(self, archive: str, fingerprint: Fingerprint) -> Path:
        # ctime too, as in the store's own fingerprint: an in-place rewrite of the same size
        # with its mtime restored (cp -p, touch -r) changes only ctime, and must not be answered
        # with the old version's member table and manifests.
        key = json.dumps([archive, fingerprint.device, fingerprint.inode, fingerprint.size,
                          fingerprint.mtime_ns, fingerprint.ctime_ns])
        return self.directory / "indexes" / (hashlib.sha256(key.encode()).hexdigest() + ".json")

    @contextlib.contextmanager
    def indexing(self, archive: str, fingerprint: Fingerprint) -> Iterator[None]:
        """Hold the index lock of one archive version (one worker scans, others wait)."""
        with self._flock(f"index:{archive}:{fingerprint}"):
            yield

    def load_index(self, archive: str, fingerprint: Fingerprint) -> CachedIndex | None:
        try:
            raw = json.loads(self._index_path(archive, fingerprint).read_bytes())
            if raw.get("version") != _INDEX_VERSION:
                return None
            members = {str(k): (int(v[0]), int(v[1])) for k, v in raw["members"].items()}
            # validate=True: by default b64decode drops what is not base64, so a damaged file
            # would give other bytes (index.json is not digest-checked) instead of a miss.
            small = {str(k): base64.b64decode(v, validate=True) for k, v in raw["small"].items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            return None
        if any(members.get(name, (0, -1))[1] != len(data) for name, data in small.items()):
            return None  # the scan checks the same for what it reads (archive.py)
        with self._lock:
            self.stats.index_hits += 1
        return CachedIndex(members, small)

    def save_index(self, archive: str, fingerprint: Fingerprint, index: CachedIndex) -> None:
        document: dict[str, Any] = {
            "version": _INDEX_VERSION,
            "archive": archive,
            "members": {k: list(v) for k, v in index.members.items()},
            "small": {k: base64.b64encode(v).decode() for k, v in index.small.items()},
        }
        target = self._index_path(archive, fingerprint)
        fd, tmp = tempfile.mkstemp(dir=self.directory / "tmp", prefix="index")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(document, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            log.warning("cannot remember the index of %s: %s", archive, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _files(directory: Path) -> list[Path]:
    try:
        return [entry for entry in directory.iterdir() if entry.is_file()]
    except OSError:
        return []


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
