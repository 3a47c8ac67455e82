"""The node's view of the image directory: one listing per directory, reused until it changes.

A directory's listing is read once and kept with the directory's own stat fingerprint. Every
request re-stats the few directories its answer depends on (after it arrived, so it never sees
a state older than one another request already saw) and reads a listing again only when that
stat changed. The work a request costs is therefore a few ``stat`` calls whatever the size of
the directory, and on NFS those are answered from the client's attribute cache, so ``actimeo``
is the one freshness knob. Every worker process on a node asks the same kernel, which is what
makes the workers agree: there is no per-worker time window during which one of them may still
believe an older listing (docs/directory-model.md).

Two details keep the stat comparison exact:

* *Racy listings* (git's racy-git rule): a change made within the same timestamp tick as our
  read can leave the directory's mtime unchanged. A listing read less than ``RACY_SECONDS``
  after the directory's last change is marked unsettled and read again at the next check, until
  it is old enough to be trusted.
* *Batching*: checks requested while a check is running wait for the next one, which starts
  after they arrived; a burst of requests shares one worker-thread hop instead of paying one
  each, and no request is answered from a stat taken before it arrived.
* *Fan-out on slow storage*: the stats of one check are independent, so where a stat costs a
  round trip (NFS, measured: the recent average is over ``SLOW_STAT_SECONDS``) they are issued
  side by side on a few threads, and a warm request waits for one round trip, not one per
  directory and file it depends on. On a local disk a stat costs microseconds and they stay on
  one thread, where spreading them would only add hand-offs.

A miss (about to become a 404) looks again, asking the file server rather than the attribute
cache (``statx`` with ``AT_STATX_FORCE_SYNC``), at most once per ``MISS_RECHECK_SECONDS`` per
directory, so a flood of requests for unknown names cannot become a flood of directory reads:
unknown names are answered from the cached listings.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final, TypeVar

from simple_oci_registry.fingerprint import Fingerprint, fresh_stat

__all__ = ["SUFFIX", "DirectoryView", "Entry", "Listing", "Probe", "Revalidated", "inside",
           "read_listing"]

log = logging.getLogger(__name__)
T = TypeVar("T")

SUFFIX: Final = ".oci"
# Coarse timestamps tick every few ms on a local disk; an NFS server's clock may also differ
# from ours by a little. A listing newer than this relative to the directory's change is read
# again at the next check.
RACY_SECONDS: Final = 2.0
MISS_RECHECK_SECONDS: Final = 1.0
# A local stat takes a few microseconds, an NFS GETATTR a network round trip (100 us to
# milliseconds). Above this running average the stats of a check are issued in parallel.
SLOW_STAT_SECONDS: Final = 100e-6
FAN_OUT_THREADS: Final = 8
_AVERAGE_WEIGHT: Final = 0.2  # of the newest sample in the running average of stat times


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a listing that can matter to a name: an archive or a subdirectory."""

    name: str
    path: str
    inode: int  # of the symlink's target for symlinks: what opening the path reaches
    is_dir: bool


@dataclass(frozen=True, slots=True)
class Listing:
    """A directory's entries as read at one stat fingerprint of the directory.

    ``archives`` are its ``*.oci`` entries sorted by name (pattern 2 when the directory is a
    name's own folder); ``beside`` groups them by the part before ``:`` and ``whole`` by their
    stem (patterns 4 and 5 when it is the parent), so resolution in a flat directory of ten
    thousand archives is a dictionary lookup, not a scan. Plain subdirectories are kept by
    name only (``folders``): a root of ten thousand name folders costs no object per folder.
    """

    path: str
    fingerprint: Fingerprint | None  # None: the directory does not exist (or is unusable)
    entries: Mapping[str, Entry] = field(default_factory=dict)  # the archives, by file name
    folders: frozenset[str] = frozenset()
    settled: bool = True
    archives: tuple[Entry, ...] = ()
    beside: Mapping[str, tuple[Entry, ...]] = field(default_factory=dict)
    whole: Mapping[str, Entry] = field(default_factory=dict)

    @property
    def exists(self) -> bool:
        return self.fingerprint is not None

    def subdirectories(self) -> list[tuple[str, str]]:
        """``(name, path)`` of each plain subdirectory, sorted (for walks of the tree)."""
        return [(name, os.path.join(self.path, name)) for name in sorted(self.folders)]


@dataclass(frozen=True, slots=True)
class Probe:
    """A file whose fingerprint a request depends on: a pinned descriptor, or a path."""

    path: str
    fd: int | None = None

    def fingerprint(self) -> Fingerprint | None:
        try:
            if self.fd is not None:
                return Fingerprint.of_fd(self.fd)
            return Fingerprint.of_path(self.path)
        except OSError:
            return None


def inside(root: str, path: str) -> bool:
    """Does ``path`` resolve (symlinks followed) to ``root`` or below it?"""
    real = os.path.realpath(path)
    return real == root or real.startswith(root + os.sep)


_Hop = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Revalidated]", Callable[[], "Revalidated"]]


def _serve_hops(jobs: queue.SimpleQueue[_Hop | None]) -> None:
    """A view's thread: run each check's stats and hand the result back to its loop."""
    while (item := jobs.get()) is not None:
        loop, future, job = item
        try:
            result = job()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            _deliver(loop, future, None, exc)
        else:
            _deliver(loop, future, result, None)


def _deliver(loop: asyncio.AbstractEventLoop, future: asyncio.Future[T], result: T | None,
             exc: BaseException | None) -> None:
    def settle() -> None:
        if future.done():
            return  # cancelled meanwhile (shutdown)
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    with contextlib.suppress(RuntimeError):  # the loop closed while the stats ran
        loop.call_soon_threadsafe(settle)


def _timed(job: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    result = job()
    return result, time.perf_counter() - started


def _missing(path: str) -> Listing:
    return Listing(path, None)


def read_listing(path: str, root: str, *, allow_outside: bool = False,
                 seen: tuple[Fingerprint, int] | None = None) -> Listing:
    """Stat and list one directory (blocking).

    The stat comes first (or is ``seen``, the fingerprint and mode the caller's check just
    took, which saves a round trip on NFS): a change made while the entries are read then
    shows up as a different fingerprint at the next check. Hidden entries (temporary files
    of a publisher, ``.nfsXXXX`` silly-renamed files) are skipped; so are entries that
    resolve outside ``root`` unless the operator allows it.
    """
    read_at = time.time_ns()
    if seen is None:
        try:
            seen = _stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return _missing(path)
        except OSError as exc:
            log.warning("cannot stat %s: %s", path, exc.strerror or exc)
            return _missing(path)
    fingerprint, mode = seen
    if not stat.S_ISDIR(mode):
        return _missing(path)
    if not allow_outside and path != root and not inside(root, path):
        log.warning("refusing %s: it resolves outside the image directory", path)
        return _missing(path)
    entries: dict[str, Entry] = {}
    folders: set[str] = set()
    try:
        with os.scandir(path) as it:
            for item in it:
                name = item.name
                if name[0] == ".":
                    continue
                if not name.endswith(SUFFIX):
                    # The common case, kept cheap: d_type tells a folder without a stat.
                    try:
                        if item.is_dir(follow_symlinks=False):
                            folders.add(name)
                            continue
                        if not item.is_symlink():
                            continue
                    except OSError:
                        continue
                entry = _entry(item, root, allow_outside)
                if entry is None:
                    continue
                if name.endswith(SUFFIX):
                    entries[name] = entry
                elif entry.is_dir:
                    folders.add(name)  # a symlink to a folder inside the root
    except OSError as exc:
        # EACCES (lost+found, another team's folder), ELOOP, EIO/ESTALE from NFS: nothing
        # there can be served, but everything else still can.
        log.warning("cannot list %s: %s", path, exc.strerror or exc)
        return _missing(path)
    archives = tuple(sorted(entries.values(), key=lambda e: e.name))
    beside: dict[str, list[Entry]] = {}
    whole: dict[str, Entry] = {}
    for entry in archives:
        stem = entry.name[: -len(SUFFIX)]
        base, colon, _ = stem.partition(":")
        if colon:
            beside.setdefault(base, []).append(entry)
        else:
            whole[stem] = entry
    changed = max(fingerprint.mtime_ns, fingerprint.ctime_ns)
    settled = read_at - changed > RACY_SECONDS * 1e9
    return Listing(path, fingerprint, entries, frozenset(folders), settled, archives,
                   {k: tuple(v) for k, v in beside.items()}, whole)


def _stat(path: str) -> tuple[Fingerprint, int]:
    st = os.stat(path)
    return Fingerprint.of(st), st.st_mode


def _entry(item: os.DirEntry[str], root: str, allow_outside: bool) -> Entry | None:
    """An archive entry, or a symlink (followed, refused when it leaves ``root``)."""
    try:
        if item.is_symlink():
            target = os.stat(item.path)  # a dangling link raises: nothing to serve
            if not allow_outside and not inside(root, item.path):
                log.warning("refusing %s: it resolves outside the image directory", item.path)
                return None
            is_dir, inode = stat.S_ISDIR(target.st_mode), target.st_ino
        else:
            is_dir, inode = item.is_dir(follow_symlinks=False), item.inode()
    except OSError:
        return None  # vanished while listed
    if not is_dir and not item.name.endswith(SUFFIX):
        return None
    return Entry(item.name, item.path, inode, is_dir)


@dataclass(frozen=True, slots=True)
class Revalidated:
    """What one check found: current listings by path and fingerprints by probe."""

    listings: Mapping[str, Listing]
    files: Mapping[Probe, Fingerprint | None]


class DirectoryView:
    """This worker's cache of listings, revalidated by stat for every request that uses them."""

    def __init__(self, root: str, *, allow_outside: bool = False,
                 clock: Callable[[], float] = time.monotonic,
                 executor: Executor | None = None, fan_out: bool = True) -> None:
        self.root = root
        # Background walkers also say no to the fan-out: they are meant to be gentle.
        self._may_fan_out = fan_out
        # None: this view's own thread (see _hop). Background walkers (preparation.py) pass
        # their own executor, so a walk of ten thousand folders never delays a request's stats.
        self._executor = executor
        self._allow_outside = allow_outside
        self._clock = clock
        self._listings: dict[str, Listing] = {}
        self._forced: dict[str, float] = {}  # directory -> when a miss last forced a look
        self._dirs: set[str] = set()
        self._probes: set[Probe] = set()
        self._force: set[str] = set()
        self._waiters: list[asyncio.Future[Revalidated]] = []
        self._job: asyncio.Task[None] | None = None
        self._queue: queue.SimpleQueue[_Hop | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None  # started by the first check
        self._fan_out: ThreadPoolExecutor | None = None  # created once storage proves slow
        self.stat_seconds = 0.0  # running average of one stat, deciding the fan-out
        self.stats_calls = 0  # metadata calls made, for metrics and tests
        self.listings_read = 0

    def cached(self, path: str) -> Listing | None:
        """The listing last seen for ``path`` (no I/O; possibly stale)."""
        return self._listings.get(path)

    def known(self) -> list[str]:
        return list(self._listings)

    async def check(self, dirs: Iterable[str], probes: Iterable[Probe] = (), *,
                    miss: bool = False) -> Revalidated:
        """Current listings of ``dirs`` and fingerprints of ``probes``, from stats taken after
        this call began. With ``miss``, directories are revalidated with the file server
        (rate-limited per directory), for an answer that is about to be a 404."""
        dirs = list(dirs)
        if miss:
            now = self._clock()
            for path in dirs:
                if now - self._forced.get(path, float("-inf")) >= MISS_RECHECK_SECONDS:
                    self._forced[path] = now
                    self._force.add(path)
            if len(self._forced) > 4096:  # bounded: names come from requests
                self._forced = {p: t for p, t in self._forced.items()
                                if now - t < MISS_RECHECK_SECONDS}
        self._dirs.update(dirs)
        self._probes.update(probes)
        waiter: asyncio.Future[Revalidated] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._job is None:
            self._job = asyncio.create_task(self._run())
        # A cancelled request (client gone) cancels only its own future: the batch skips it.
        return await waiter

    def recheck_due(self, dirs: Iterable[str]) -> bool:
        """Would a miss on ``dirs`` be allowed to ask the file server again now?"""
        now = self._clock()
        return any(now - self._forced.get(path, float("-inf")) >= MISS_RECHECK_SECONDS
                   for path in dirs)

    async def _run(self) -> None:
        try:
            while self._waiters:
                dirs, probes, force, waiters = self._dirs, self._probes, self._force, \
                    self._waiters
                self._dirs, self._probes, self._force, self._waiters = set(), set(), set(), []
                try:
                    result = await self._hop(
                        functools.partial(self._revalidate, dirs, probes, force))
                except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                for path, listing in result.listings.items():
                    if listing.exists:
                        self._listings[path] = listing
                    else:
                        # Missing directories are not remembered: names come from requests,
                        # and an unknown one must not grow the cache.
                        self._listings.pop(path, None)
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(result)
        finally:
            self._job = None

    def _hop(self, job: Callable[[], Revalidated]) -> asyncio.Future[Revalidated]:
        """Run ``job`` off the event loop: on the caller's executor, or on this view's own
        thread. Every request takes this hop, so it is kept cheap: a queue and one
        ``call_soon_threadsafe`` back, where ``run_in_executor`` adds a second future, its
        lock and its chaining (measured: about half the CPU per hop)."""
        loop = asyncio.get_running_loop()
        if self._executor is not None:
            return loop.run_in_executor(self._executor, job)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=_serve_hops, args=(self._queue,),
                                            name="directory", daemon=True)
            self._thread.start()
        future: asyncio.Future[Revalidated] = loop.create_future()
        self._queue.put((loop, future, job))
        return future

    def _revalidate(self, dirs: set[str], probes: set[Probe], force: set[str]) -> Revalidated:
        """Blocking: one stat per directory (a listing only where it changed) and per probe,
        side by side when storage is slow."""
        ordered = list(dirs)
        jobs: list[Callable[[], Listing | Fingerprint | None]] = [
            *(functools.partial(self._current, path, fresh=path in force) for path in ordered),
            *(probe.fingerprint for probe in probes)]
        pool = self._pool(len(jobs))
        if pool is None:
            timed = [_timed(job) for job in jobs]
        else:
            # The first job runs here, the others on the pool: one round trip for all.
            pending = [pool.submit(_timed, job) for job in jobs[1:]]
            timed = [_timed(jobs[0]), *(future.result() for future in pending)]
        listings: dict[str, Listing] = {}
        samples: list[float] = []
        for path, (listing, seconds) in zip(ordered, timed[:len(ordered)], strict=True):
            assert isinstance(listing, Listing)
            listings[path] = listing
            if listing is self._listings.get(path):
                samples.append(seconds)  # one stat; a listing read is not a sample
            elif listing.exists:
                self.listings_read += 1
        files: dict[Probe, Fingerprint | None] = {}
        for probe, (fingerprint, seconds) in zip(probes, timed[len(ordered):], strict=True):
            assert fingerprint is None or isinstance(fingerprint, Fingerprint)
            files[probe] = fingerprint
            samples.append(seconds)
        self.stats_calls += len(jobs)
        if samples:
            sample = sum(samples) / len(samples)
            self.stat_seconds += (sample - self.stat_seconds) * _AVERAGE_WEIGHT
        return Revalidated(listings, files)

    def _pool(self, jobs: int) -> ThreadPoolExecutor | None:
        """The fan-out threads, for a batch worth spreading on storage measured as slow."""
        if jobs < 2 or not self._may_fan_out or self.stat_seconds < SLOW_STAT_SECONDS:
            return None
        if self._fan_out is None:
            log.info("stats average %.0f us: issuing a request's stats in parallel",
                     self.stat_seconds * 1e6)
            self._fan_out = ThreadPoolExecutor(max_workers=FAN_OUT_THREADS,
                                               thread_name_prefix="stat")
        return self._fan_out

    def close(self) -> None:
        """Stop this view's threads (at shutdown)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread = None
        if self._fan_out is not None:
            self._fan_out.shutdown(wait=False, cancel_futures=True)
            self._fan_out = None

    def _current(self, path: str, *, fresh: bool = False) -> Listing:
        """The listing of ``path`` as of now; ``fresh`` asks the file server rather than the
        attribute cache (statx AT_STATX_FORCE_SYNC: one GETATTR on NFS), for a miss."""
        cached = self._listings.get(path)
        if cached is not None and cached.settled:
            try:
                now = fresh_stat(path) if fresh else _stat(path)
            except OSError:
                return _missing(path)
            if now[0] == cached.fingerprint:
                return cached
            return read_listing(path, self.root, allow_outside=self._allow_outside, seen=now)
        seen = None
        if fresh:
            with contextlib.suppress(OSError):
                seen = fresh_stat(path)  # the file server's view, not the attribute cache's
        return read_listing(path, self.root, allow_outside=self._allow_outside, seen=seen)

    def forget(self, keep: Callable[[str], bool]) -> None:
        """Drop cached listings of directories ``keep`` rejects (rescan housekeeping)."""
        self._listings = {p: v for p, v in self._listings.items() if keep(p)}
