"""Compressed archives made ready before their first pull (background preparation).

A gzip/zstd archive cannot be served until it has been decompressed once: skopeo writes
``index.json`` after the blobs, so nothing is known before the end of the stream. Done on the
first request, that pass makes the first pull of a 200 MiB archive wait a second. Here the
server does it ahead: it walks the image directory with the node's directory view (one
``stat`` per directory, listings re-read only where they changed), and every compressed
archive it has not prepared at its current fingerprint is indexed into the blob cache (member
table, small members, and every large blob decompressed, verified and stored), which is exactly
what a request would otherwise do on first use.

Who does the work, and how gently:

* One worker per node: the worker holding an ``flock`` lease on ``preparer.lock`` in the cache
  directory (the cache is node-local and shared by the workers). Another worker takes the lease
  over within ``LEASE_RETRY_SECONDS`` if that one dies; in single-process mode the only worker
  holds it.
* One archive at a time, in a dedicated child process at the lowest CPU priority (nice 19) and
  the idle I/O class, so serving threads never compete with it for the GIL, a core or the disk.
  Where I/O priorities do not reach (NFS), ``--prepare-read-rate`` bounds its reads.
* A request for an archive being prepared does not start a second pass: the blob cache's
  per-archive ``indexing`` lock (an ``flock`` in the same cache directory) makes the request
  wait for the child, then read the remembered index (no decompression).

What is prepared ahead (the policy for large directories and small caches): compressed archives
newest first (by modification time: what was just published is what nodes pull next), as long
as the blob bytes they need fit in ``PREPARE_SHARE`` of ``--cache-max-bytes``; an archive that
does not fit is *deferred* (left for its first pull) and older, smaller ones may still fit. The
size of an archive not prepared yet is estimated by its compressed size (close for OCI
archives, whose layers are already compressed), and replaced by the real size once known. The
other half of the cache stays for what pulls bring in, so preparing never evicts a whole
working set.

Progress is published as :class:`PreparationStatus`: to this worker's metrics, and to a status
file in the cache directory that the catalog page of any worker reads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import json
import logging
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from simple_oci_registry.archive import (
    ArchiveError,
    ArchiveKind,
    ArchiveLimits,
    StaleArchiveError,
    identify,
    open_archive,
)
from simple_oci_registry.blobcache import BlobCache
from simple_oci_registry.config import Config
from simple_oci_registry.directory import DirectoryView, Listing
from simple_oci_registry.fingerprint import Fingerprint
from simple_oci_registry.layout import load_layout

__all__ = ["KINDS_FILE", "PREPARE_SHARE", "Outcome", "Plan", "PreparationStats",
           "PreparationStatus", "Preparer", "Survey", "load_kinds", "plan_preparation",
           "prepare_archive", "read_status", "save_kinds", "write_status"]

log = logging.getLogger(__name__)
T = TypeVar("T")
Kind = tuple[Fingerprint, bool]  # an archive's fingerprint when sniffed, and "is compressed"

PREPARE_SHARE: Final = 0.5  # of --cache-max-bytes, prepared ahead; the rest is for first use
PREPARE_INTERVAL_SECONDS: Final = 5.0  # between walks when nothing is left to prepare
LEASE_RETRY_SECONDS: Final = 5.0
# Background walks keep to a share of the filesystem's time: after each archive they check,
# they wait this many times as long as the check took (nothing on a local disk; on a slow NFS
# server, a fifth of what one client asks of it).
SURVEY_IDLE_FACTOR: Final = 4.0
WALK_CHUNK: Final = 64  # directories checked per step of a walk, between its pauses
LEASE_FILE: Final = "preparer.lock"
STATUS_FILE: Final = "preparation.json"
KINDS_FILE: Final = "preparation-survey.json"  # what the last survey saw, kept over restarts
_COMPRESSED: Final = (ArchiveKind.GZIP, ArchiveKind.ZSTD)
_REASON_MAX: Final = 500


@dataclass(frozen=True, slots=True)
class PreparationStatus:
    """How far background preparation is, as the node's preparing worker last saw it."""

    prepared: int = 0
    pending: int = 0
    failed: int = 0
    deferred: int = 0  # over the cache share: left for their first pull
    last_progress: float = 0.0  # wall clock of the last archive finished (0: none yet)
    preparing: str | None = None  # the archive being prepared now, relative to --dir

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class PreparationStats:
    """Counters the metrics endpoint reads: work the child process did for this worker."""

    jobs: int = 0
    surveys: int = 0  # walks of the image directory finished
    decompressions: int = 0
    fills: int = 0
    filled_bytes: int = 0
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Survey:
    """One compressed archive as the last walk saw it."""

    path: str
    fingerprint: Fingerprint


@dataclass(frozen=True, slots=True)
class Outcome:
    """What preparing one archive version gave."""

    fingerprint: Fingerprint
    ok: bool
    blob_bytes: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Plan:
    """What to prepare (``pending``, in order), and how every surveyed archive stands."""

    prepared: tuple[str, ...]
    pending: tuple[str, ...]
    failed: tuple[str, ...]
    deferred: tuple[str, ...]


def plan_preparation(surveyed: Iterable[Survey], done: Mapping[str, Outcome],
                     budget: int) -> Plan:
    """Newest first, every archive whose blob bytes still fit in ``budget`` is wanted; wanted
    ones not prepared (or failed) at their current fingerprint are pending."""
    prepared: list[str] = []
    pending: list[str] = []
    failed: list[str] = []
    deferred: list[str] = []
    left = budget
    for item in sorted(surveyed, key=lambda s: (-s.fingerprint.mtime_ns, s.path)):
        outcome = done.get(item.path)
        current = outcome is not None and outcome.fingerprint == item.fingerprint
        if current and outcome is not None and not outcome.ok:
            failed.append(item.path)
            continue
        size = outcome.blob_bytes if current and outcome is not None else item.fingerprint.size
        if size > left:
            deferred.append(item.path)
            continue
        left -= size
        (prepared if current else pending).append(item.path)
    return Plan(tuple(prepared), tuple(pending), tuple(failed), tuple(deferred))


def read_status(cache_dir: Path) -> PreparationStatus | None:
    """The status the node's preparing worker last wrote (for the catalog page of any worker);
    None when nothing was written or it cannot be read."""
    try:
        raw = json.loads((cache_dir / STATUS_FILE).read_bytes())
        return PreparationStatus(
            prepared=int(raw["prepared"]), pending=int(raw["pending"]),
            failed=int(raw["failed"]), deferred=int(raw["deferred"]),
            last_progress=float(raw["last_progress"]),
            preparing=str(raw["preparing"]) if raw.get("preparing") is not None else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_status(cache_dir: Path, status: PreparationStatus) -> None:
    _write_json(cache_dir, STATUS_FILE, status.as_json())


def load_kinds(cache_dir: Path) -> dict[str, Kind]:
    """What the node's last survey saw (``KINDS_FILE``), or nothing when it is unreadable:
    then the first survey looks at every archive again, as on a new node."""
    try:
        raw = json.loads((cache_dir / KINDS_FILE).read_bytes())
        return {str(path): (Fingerprint(*(int(v) for v in item[:6])), bool(item[6]))
                for path, item in raw.items()}
    except (OSError, ValueError, TypeError, AttributeError, IndexError):
        return {}


def save_kinds(cache_dir: Path, kinds: Mapping[str, Kind]) -> None:
    """Remember the survey in the node's cache, so that a restarted server does not open
    every archive of the shared directory again to learn what it already knew."""
    _write_json(cache_dir, KINDS_FILE, {
        path: [*dataclasses.astuple(fingerprint), compressed]
        for path, (fingerprint, compressed) in kinds.items()})


def _write_json(cache_dir: Path, name: str, document: object) -> None:
    """Replace ``cache_dir/name`` atomically (readers in other workers see the old or the
    new document, never half of one); a failure is only logged: both files are hints."""
    fd, tmp = tempfile.mkstemp(dir=cache_dir / "tmp", prefix=name)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(document, out)
        os.replace(tmp, cache_dir / name)
    except OSError as exc:
        log.debug("cannot write %s: %s", name, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _try_lease(cache_dir: Path) -> int | None:
    """The lease descriptor if this process now holds the node's preparation lease."""
    fd = os.open(cache_dir / LEASE_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class Preparer:
    """Walks the image directory and has compressed archives prepared ahead, one at a time."""

    def __init__(self, config: Config, cache: BlobCache, *,
                 interval: float = PREPARE_INTERVAL_SECONDS) -> None:
        self._root = config.root
        # Its own view and thread: a walk of the whole tree must not queue requests' stats
        # behind it (they share nothing but the kernel's caches, which is the point).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self._directory = DirectoryView(config.root,
                                        allow_outside=config.allow_outside_symlinks,
                                        executor=self._executor, fan_out=False)
        self._cache_dir = cache.directory
        self._max_bytes = cache.max_bytes
        self._budget = int(cache.max_bytes * PREPARE_SHARE)
        self._read_rate = config.prepare_read_rate
        self._interval = interval
        # Archives rewritten in place keep their folder's stat: a full survey re-stats every
        # archive, as often as the store's full rescan (0 there means never: hourly here).
        self._full_survey_seconds = config.rescan_interval or 3600.0
        self._lease: int | None = None
        self._child: asyncio.subprocess.Process | None = None
        self._surveyed: dict[str, tuple[Listing, dict[str, Fingerprint]]] = {}
        self._kinds: dict[str, Kind] = {}  # path -> (seen at, compressed)
        self._kinds_loaded = False
        self._kinds_changed = False  # sniffed since the survey was last saved
        self._done: dict[str, Outcome] = {}
        self._full_survey_at = float("-inf")
        self.active = False  # holds the node's lease
        self.status = PreparationStatus()
        self.stats = PreparationStats()

    @classmethod
    def create(cls, config: Config, cache: BlobCache | None) -> Preparer | None:
        """The preparer, or None when there is nothing to keep the work in (no blob cache) or
        the operator turned it off."""
        if not config.prepare_ahead or cache is None:
            return None
        return cls(config, cache)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Wait for the node's lease, then prepare for as long as this worker lives."""
        while self._lease is None:
            try:
                self._lease = await self._run(_try_lease, self._cache_dir)
            except OSError as exc:
                log.warning("cannot take the preparation lease in %s (%s): compressed "
                            "archives are decompressed on their first pull", self._cache_dir,
                            exc.strerror or exc)
                return
            if self._lease is None:
                await asyncio.sleep(LEASE_RETRY_SECONDS)
        self.active = True
        log.info("preparing compressed archives ahead for this node (pid %d)", os.getpid())
        while True:
            try:
                worked = await self.step()
            except Exception:  # keep preparing whatever one step hit
                log.exception("background preparation failed")
                worked = False
            if not worked:
                await asyncio.sleep(self._interval)

    async def close(self) -> None:
        """Stop the child process and give the lease back (at shutdown)."""
        child, self._child = self._child, None
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()
        if self._lease is not None:
            os.close(self._lease)
            self._lease = None
        self.active = False
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, call: Callable[..., T], *args: object) -> T:
        """Blocking work on the preparer's own thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(call, *args))

    # ------------------------------------------------------------------ one step

    async def step(self) -> bool:
        """Walk, plan, and prepare the first pending archive; False when none was pending."""
        surveyed = await self._survey(await self._walk())
        plan = plan_preparation(surveyed.values(), self._done, self._budget)
        self._done = {p: d for p, d in self._done.items() if p in surveyed}  # bounded
        if not plan.pending:
            await self._publish(plan, None)
            return False
        path = plan.pending[0]
        await self._publish(plan, path)
        outcome = await self._prepare(path)
        if outcome.fingerprint != surveyed[path].fingerprint:
            # Changed while being prepared: what was prepared is the newer file; the next
            # walk sees the same newer fingerprint, so it is not prepared twice.
            self._invalidate(path)
        self._done[path] = outcome
        if outcome.ok:
            self.status = dataclasses.replace(self.status, last_progress=time.time())
        else:
            log.warning("cannot prepare %s ahead: %s", os.path.relpath(path, self._root),
                        outcome.reason)
        after = {**surveyed, path: Survey(path, outcome.fingerprint)}
        await self._publish(plan_preparation(after.values(), self._done, self._budget), None)
        return True

    async def _walk(self) -> list[Listing]:
        """Every directory's current listing (one stat each; re-read only where changed).

        Paced like the survey: directories are checked ``WALK_CHUNK`` at a time, with a pause
        of ``SURVEY_IDLE_FACTOR`` times each chunk's duration after it. A new node's first
        walk reads every listing (ten thousand name folders: half a second of Python work),
        and done in one go that work held the interpreter against the requests of the same
        worker (the first manifest on a fresh server took 11 ms instead of 4).
        """
        found: list[Listing] = []
        level = [self._root]
        seen: set[int] = set()
        while level:
            following: list[str] = []
            for start in range(0, len(level), WALK_CHUNK):
                chunk = level[start:start + WALK_CHUNK]
                started = time.monotonic()
                checked = await self._directory.check(chunk)
                for path in chunk:
                    listing = checked.listings[path]
                    if listing.fingerprint is None or listing.fingerprint.inode in seen:
                        continue
                    seen.add(listing.fingerprint.inode)
                    found.append(listing)
                    following += [sub for _, sub in listing.subdirectories()]
                if len(level) > WALK_CHUNK:
                    await asyncio.sleep((time.monotonic() - started) * SURVEY_IDLE_FACTOR)
            level = following
        return found

    async def _survey(self, listings: Sequence[Listing]) -> dict[str, Survey]:
        """The compressed archives of ``listings`` with their fingerprints.

        Work follows change: an unchanged listing's archives are not looked at again, and in
        a changed listing only the entries that are new (a name or an inode not seen before)
        are stat'ed and sniffed, so a publish into a folder of a thousand archives costs one
        archive's look, not a thousand. Archives rewritten in place keep their inode and
        their directory's stat: a full survey every ``--rescan-interval`` stats them all.
        """
        now = time.monotonic()
        if not self._kinds_loaded:
            self._kinds_loaded = True
            self._kinds = await self._run(load_kinds, self._cache_dir)
            if self._kinds:
                # A restart on a node that surveyed before: what the node saw is trusted
                # for as long as an inode did not change, until the next full survey.
                self._full_survey_at = now
        full = now - self._full_survey_at >= self._full_survey_seconds
        if full:
            self._full_survey_at = now
        stale = [listing for listing in listings if full
                 or (old := self._surveyed.get(listing.path)) is None or old[0] is not listing]
        fresh = await self._run(self._stat_archives, stale, full)
        keep = {listing.path for listing in listings}
        self._surveyed = {p: v for p, v in self._surveyed.items() if p in keep}
        self._surveyed.update(fresh)
        alive = {entry.path for listing, _ in self._surveyed.values()
                 for entry in listing.archives}
        kept = {p: k for p, k in self._kinds.items() if p in alive}
        if self._kinds_changed or len(kept) != len(self._kinds):
            self._kinds_changed = False
            await self._run(save_kinds, self._cache_dir, kept)
        self._kinds = kept
        self.stats.surveys += 1
        return {path: Survey(path, fingerprint) for _, files in self._surveyed.values()
                for path, fingerprint in files.items()}

    def _stat_archives(self, listings: Sequence[Listing], full: bool,
                       ) -> dict[str, tuple[Listing, dict[str, Fingerprint]]]:
        """Blocking: stat each new archive file (each one on a full survey) and read the
        first bytes of new versions only."""
        result: dict[str, tuple[Listing, dict[str, Fingerprint]]] = {}
        for listing in listings:
            files: dict[str, Fingerprint] = {}
            for entry in listing.archives:
                if entry.is_dir:
                    continue  # layout directories have nothing to decompress
                known = self._kinds.get(entry.path)
                if full or known is None or known[0].inode != entry.inode:
                    known = self._look(entry.path, known)
                if known is None:
                    continue
                if known[1]:
                    files[entry.path] = known[0]
            result[listing.path] = (listing, files)
        return result

    def _look(self, path: str, known: Kind | None) -> Kind | None:
        """Blocking and paced: stat one archive, and sniff its kind when it is a new version;
        None when it is gone or not an archive (the request path reports that)."""
        started = time.monotonic()
        try:
            # A known archive's stat tells whether it changed; a new one (or a changed one)
            # is opened once for its fingerprint and its first bytes.
            if known is not None and Fingerprint.of_path(path) == known[0]:
                return known
            fingerprint, kind = identify(path)
            known = self._kinds[path] = (fingerprint, kind in _COMPRESSED)
            self._kinds_changed = True  # kept in the cache directory after this survey
            return known
        except (OSError, ArchiveError):
            return None
        finally:
            time.sleep((time.monotonic() - started) * SURVEY_IDLE_FACTOR)

    def _invalidate(self, path: str) -> None:
        """Make the next walk stat the archive's directory's archives again."""
        self._surveyed.pop(os.path.dirname(path), None)

    async def _publish(self, plan: Plan, preparing: str | None) -> None:
        status = dataclasses.replace(
            self.status, prepared=len(plan.prepared), pending=len(plan.pending),
            failed=len(plan.failed), deferred=len(plan.deferred),
            preparing=os.path.relpath(preparing, self._root) if preparing else None)
        if status != self.status:
            self.status = status
            await self._run(write_status, self._cache_dir, status)

    # ------------------------------------------------------------------ the child process

    async def _prepare(self, path: str) -> Outcome:
        """Have the child prepare one archive; its answer, or a failure if it died."""
        child = await self._start_child()
        assert child.stdin is not None and child.stdout is not None
        try:
            child.stdin.write(json.dumps({"path": path}).encode() + b"\n")
            await child.stdin.drain()
            line = await child.stdout.readline()
        except (ConnectionError, OSError):
            line = b""
        if not line:
            code = await child.wait()
            self._child = None
            fingerprint = await self._run(_fingerprint_or_none, path)
            return Outcome(fingerprint or Fingerprint(0, 0, 0, 0), False,
                         reason=f"the preparation process exited (status {code})")
        answer = json.loads(line)
        self.stats.jobs += 1
        self.stats.decompressions += int(answer["decompressions"])
        self.stats.fills += int(answer["fills"])
        self.stats.filled_bytes += int(answer["filled_bytes"])
        self.stats.seconds += float(answer["seconds"])
        fingerprint = Fingerprint(*answer["fingerprint"])
        log.debug("prepared %s in %.3fs: %d blob bytes, %d decompressions",
                  os.path.relpath(path, self._root), answer["seconds"], answer["blob_bytes"],
                  answer["decompressions"])
        return Outcome(fingerprint, bool(answer["ok"]), int(answer["blob_bytes"]),
                     str(answer["reason"]))

    async def _start_child(self) -> asyncio.subprocess.Process:
        if self._child is not None and self._child.returncode is None:
            return self._child
        self._child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "simple_oci_registry.preparation",
            "--cache-dir", str(self._cache_dir), "--cache-max-bytes", str(self._max_bytes),
            "--read-rate", str(self._read_rate),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        return self._child


def _fingerprint_or_none(path: str) -> Fingerprint | None:
    try:
        return Fingerprint.of_path(path)
    except OSError:
        return None


# ---------------------------------------------------------------------- the child's side


def prepare_archive(path: str, cache: BlobCache, limits: ArchiveLimits) -> dict[str, Any]:
    """Index one archive into the blob cache and fill the cache with its large blobs
    (blocking): what the first request would otherwise do. Returns the answer sent back."""
    started = time.perf_counter()
    before = dataclasses.replace(cache.stats)
    ok, reason, blob_bytes = True, "", 0
    fingerprint = _fingerprint_or_none(path) or Fingerprint(0, 0, 0, 0)
    try:
        archive = open_archive(path, limits, cache)
        fingerprint = archive.fingerprint
        layout = load_layout(archive)
        for digest in layout.blobs:
            size = layout.blob_size(digest)
            if size > limits.small_member_bytes:  # small ones live in the index itself
                layout.prepare_blob(digest)
                blob_bytes += size
    except (ArchiveError, StaleArchiveError, OSError) as exc:
        ok = False
        reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc))
    after = cache.stats
    return {"fingerprint": dataclasses.astuple(fingerprint), "ok": ok,
            "reason": reason[:_REASON_MAX], "blob_bytes": blob_bytes,
            "decompressions": after.decompressions - before.decompressions,
            "fills": after.fills - before.fills,
            "filled_bytes": after.filled_bytes - before.filled_bytes,
            "seconds": time.perf_counter() - started}


# ioprio_set(2): the syscall has no wrapper in Python or glibc.
_IOPRIO_SET: Final = {"x86_64": 251, "aarch64": 30, "arm64": 30}
_IOPRIO_WHO_PROCESS: Final = 1
_IOPRIO_CLASS_IDLE: Final = 3
_IOPRIO_CLASS_SHIFT: Final = 13


def lower_priority() -> None:
    """Nice 19 and the idle I/O class for this process: it gets a core and the disk only
    when nothing else wants them (best effort: either may be refused)."""
    with contextlib.suppress(OSError):
        os.nice(19)
    number = _IOPRIO_SET.get(platform.machine())
    if number is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(number, _IOPRIO_WHO_PROCESS, 0,
                     _IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT)


def child_main(argv: Sequence[str] | None = None) -> int:
    """Answer one JSON line per archive path read from stdin, until stdin closes."""
    parser = argparse.ArgumentParser(prog="python -m simple_oci_registry.preparation")
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--cache-max-bytes", type=int, required=True)
    parser.add_argument("--read-rate", type=int, default=0)
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # failures go back in the answers; the worker logs
    # Ctrl-C in a terminal reaches the whole process group: the worker ends this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lower_priority()
    cache = BlobCache(args.cache_dir, args.cache_max_bytes, tidy=False)
    limits = ArchiveLimits(read_bytes_per_second=args.read_rate)
    for line in sys.stdin:
        request = json.loads(line)
        answer = prepare_archive(str(request["path"]), cache, limits)
        try:
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            # The worker died (killed, then replaced by the supervisor): what was prepared
            # is in the cache already; leave without a traceback in the node's log.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
