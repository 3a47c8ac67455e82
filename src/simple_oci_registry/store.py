"""The image store: what a repository name and reference mean, answered from indexed archives.

Three models meet here (docs/directory-model.md):

* the *directory view* (:mod:`directory`): every request re-stats the directories its answer
  depends on and reuses their listings until they change, so all workers of a node see what
  the node's kernel sees, never an older state than a request already answered from;
* *held archives*: an archive is indexed once per file (inode and stat fingerprint) and
  shared by every name that reaches it; the file it was read from is pinned (:mod:`pins`), and
  when its path comes to name another file, or nothing, it is *retired*: its manifests and
  blobs stay reachable by digest for the grace period, while tags always resolve to the
  newest state;
* *verification*: manifests are checked when indexed, blob bytes once per archive
  fingerprint before they are first served.

An archive that cannot be served is remembered with its fingerprint and reason, logged once,
and skipped until it changes, so one broken file costs neither log floods nor other images.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, TypeVar

from simple_oci_registry import mediatypes
from simple_oci_registry.archive import (
    ArchiveError,
    ArchiveKind,
    ArchiveLimits,
    MemberReader,
    StaleArchiveError,
    open_archive,
    pin_source,
)
from simple_oci_registry.blobcache import BlobCache
from simple_oci_registry.config import Config
from simple_oci_registry.directory import DirectoryView, Listing, Probe, Revalidated
from simple_oci_registry.errors import ErrorCode, RegistryError
from simple_oci_registry.fingerprint import Fingerprint
from simple_oci_registry.layout import ImageLayout, ManifestRecord, load_layout
from simple_oci_registry.mirror import host_folder_names
from simple_oci_registry.pins import LocalPins, Pinned, Pins, PinTable, pins_usable
from simple_oci_registry.reference import Digest
from simple_oci_registry.resolver import (
    Candidate,
    Pattern,
    names_in,
    ordered,
    own_candidates,
    parent_candidates,
    serves,
    split_name,
)

__all__ = ["BlobLocation", "ImageStore", "StoreStats"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_ATTEMPTS: Final = 4  # checks per request when the directory keeps changing under it
_MEMO_LIMIT: Final = 10_000
PRIME_SECONDS: Final = 10.0  # a worker's start waits this long at most for the root listing


@dataclass(frozen=True, slots=True)
class BlobLocation:
    """Where a blob's bytes are: a member of an indexed archive, or (for manifests) memory."""

    digest: str
    size: int
    media_type: str
    layout: ImageLayout | None = None
    body: bytes | None = None

    @property
    def compressed(self) -> bool:
        """True for members of gzip/zstd archives: the blob cache verifies them before keeping
        them, and without a cache they are hashed while they stream."""
        return self.layout is not None and self.layout.archive.kind in (
            ArchiveKind.GZIP, ArchiveKind.ZSTD)


@dataclass(slots=True)
class _Held:
    """An indexed archive and the pinned descriptor its bytes are read through."""

    layout: ImageLayout
    inode: int  # what the directory listing shows for the path while this is current
    pin: int | None = None  # owned duplicate of the node's pin (None: opened by path)
    retired_at: float | None = None
    _probe: Probe | None = None

    @property
    def path(self) -> str:
        return self.layout.archive.path

    def probe(self) -> Probe:
        """What a request stats to know this archive is unchanged (made once: every request
        for the archive asks for it, and hashes it)."""
        if self._probe is None:
            archive = self.layout.archive
            if archive.kind is ArchiveKind.DIRECTORY:
                self._probe = Probe(os.path.join(archive.path, "index.json"))
            else:
                self._probe = Probe(archive.path, self.pin)
        return self._probe

    def close(self) -> None:
        if self.pin is not None:
            with contextlib.suppress(OSError):
                os.close(self.pin)
            self.pin = None
            self._probe = None  # it named the descriptor just closed


@dataclass(frozen=True, slots=True)
class _Lookup:
    """A name's current candidates and the directories checked to find them."""

    checked: Revalidated
    candidates: list[Candidate]
    dirs: tuple[str, ...]
    own: bool  # the name's own folder exists and was checked


@dataclass(slots=True)
class _Memo:
    """What resolving a name learnt: whether its answers need the parent directory (patterns
    3-5) and which archive served each tag, so the next request checks just those."""

    parent: bool = False
    own: bool = True  # the name has a folder of its own (patterns 1-2)
    winners: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class StoreStats:
    """Counters the metrics endpoint reads (mutated only by the store that owns them)."""

    index_seconds: float = 0.0
    archives_indexed: int = 0
    archive_errors: int = 0
    rescans: int = 0
    verified_bytes: int = 0
    grace_hits: int = 0


class ImageStore:
    """Resolves names, references and digests to manifests and blob locations."""

    def __init__(self, config: Config, *, pins: Pins | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._root = config.root
        self._grace = config.grace_period
        self._clock = clock
        self._limits = ArchiveLimits()
        self.directory = DirectoryView(self._root, allow_outside=config.allow_outside_symlinks,
                                       clock=clock)
        self._local_pins: PinTable | None = None
        if pins is None and pins_usable():
            self._local_pins = PinTable(self._root, self._grace, clock=clock)
            pins = LocalPins(self._local_pins)
        self._pins = pins
        self._current: dict[str, _Held] = {}
        self._retired: list[_Held] = []
        self._broken: dict[str, tuple[Fingerprint, str]] = {}
        self._verified: dict[tuple[str, Fingerprint, str], bool] = {}
        self._inflight: dict[object, asyncio.Future[object]] = {}
        self._memo: dict[str, _Memo] = {}
        self._by_dir: dict[str, set[str]] = {}  # directory -> paths in _current
        self._reconciled: dict[str, Listing] = {}  # directory -> listing last reconciled
        self._catalog: tuple[tuple[object, ...], list[str]] | None = None
        self._tag_file_cache: dict[str, tuple[Listing, frozenset[str]]] = {}
        self.stats = StoreStats()
        self.cache = BlobCache.create(config.cache_dir, config.cache_max_bytes)

    # ------------------------------------------------------------------ public API

    async def manifest(self, name: str, reference: str | Digest) -> ManifestRecord:
        """The manifest or index ``name:reference`` resolves to."""
        if isinstance(reference, Digest):
            digest = str(reference)

            async def pick(held: _Held) -> ManifestRecord | None:
                return held.layout.manifests.get(digest)
            found, candidates = await self._by_digest(name, pick)
            if found is not None:
                return found
            raise RegistryError(ErrorCode.MANIFEST_UNKNOWN,
                                self._why_missing(name, candidates, digest))
        return await self._by_tag(name, reference)

    async def blob(self, name: str, digest: Digest) -> BlobLocation:
        """Locate a blob reachable from one of the name's archives (current ones first, then
        ones replaced or removed less than the grace period ago)."""
        key = str(digest)
        detail: dict[str, str] = {"digest": key}

        async def locate(held: _Held) -> BlobLocation | None:
            layout = held.layout
            record = layout.manifests.get(key)
            if record is not None:
                # A manifest fetched as a blob keeps its own media type (containerd#7391).
                return BlobLocation(key, len(record.body), record.media_type, body=record.body)
            if layout.has_blob(key):
                location = BlobLocation(key, layout.blob_size(key), mediatypes.OCTET_STREAM,
                                        layout)
                try:
                    intact = await self._intact(location)
                except (StaleArchiveError, OSError) as exc:
                    # Rewritten in place, or its bytes gone (ESTALE): look elsewhere.
                    log.info("%s@%s: %s", name, key, exc)
                    detail["reason"] = "archive changed while reading"
                    return None
                if intact:
                    return location
                # A digest names content, not a file (image-spec descriptor.md): a damaged
                # copy must not hide an intact one in another of the name's archives.
                detail["reason"] = "stored content does not match the digest"
            return None
        found, _ = await self._by_digest(name, locate)
        if found is None:
            raise RegistryError(ErrorCode.BLOB_UNKNOWN, detail)
        return found

    async def open_blob(self, name: str, location: BlobLocation) -> tuple[BlobLocation,
                                                                         MemberReader]:
        """Open a located blob's bytes, verified, re-resolving once if the archive changed.

        The returned location may differ from the argument when the archive was replaced in
        place in the meantime and the blob now lives elsewhere.
        """
        for attempt in range(2):
            try:
                await self._verify(location)
                layout = location.layout
                assert layout is not None
                # For compressed archives _verify has filled the blob cache, once for all
                # concurrent requests; open_blob refills it only if evicted since.
                reader = await asyncio.to_thread(layout.open_blob, location.digest)
                return location, reader
            except ArchiveError as exc:
                self.stats.archive_errors += 1
                source = location.layout.archive.path if location.layout else "?"
                log.error("%s: cannot serve blob %s: %s", self._relative(source),
                          location.digest, exc)
                raise RegistryError(ErrorCode.BLOB_UNKNOWN, {
                    "digest": location.digest, "reason": str(exc)}) from None
            except (StaleArchiveError, OSError) as exc:
                # ESTALE from NFS (the bytes are gone), or a file rewritten in place.
                log.info("re-resolving %s@%s: %s", name, location.digest, exc)
                if attempt:
                    break
                location = await self.blob(name, Digest(*location.digest.split(":", 1)))
                if location.layout is None:  # now a manifest held in memory: not this path
                    raise RegistryError(ErrorCode.BLOB_UNKNOWN,
                                        {"digest": location.digest}) from None
        raise RegistryError(ErrorCode.BLOB_UNKNOWN, {"digest": location.digest,
                                                     "reason": "archive changed while opening"})

    async def check_blob(self, location: BlobLocation) -> None:
        """Raise as GET would for a blob whose stored bytes do not match its digest."""
        await self._verify(location)

    async def tags(self, name: str) -> list[str]:
        """Every tag in the name's current archives, sorted."""
        found: set[str] = set()
        for candidate, held in await self._all_current(name):
            found.update(held.layout.tags)
            implicit = _implicit_tag(held.layout, candidate)
            if implicit is not None:
                found.add(implicit)
        return sorted(found)

    async def referrers(self, name: str, digest: Digest) -> list[ManifestRecord]:
        """Manifests in the name's current archives whose ``subject`` is ``digest``."""
        seen: dict[str, ManifestRecord] = {}
        for _, held in await self._all_current(name):
            for record in held.layout.referrers(str(digest)):
                seen.setdefault(record.digest, record)
        return sorted(seen.values(), key=lambda r: r.digest)

    async def catalog(self) -> list[str]:
        """Every repository name the directory serves: one stat per directory of the tree,
        listings read again only where a directory changed."""
        listings: list[tuple[Listing, str]] = []
        level = [(self._root, "")]
        seen: set[int] = set()
        while level:
            checked = await self.directory.check(path for path, _ in level)
            following: list[tuple[str, str]] = []
            for path, rel in level:
                listing = checked.listings[path]
                if listing.fingerprint is None or listing.fingerprint.inode in seen:
                    continue
                seen.add(listing.fingerprint.inode)
                listings.append((listing, rel))
                following += [(sub, f"{rel}/{name}" if rel else name)
                              for name, sub in listing.subdirectories()]
            level = following
        key = tuple(listing for listing, _ in listings)
        if self._catalog is not None and len(self._catalog[0]) == len(key) and all(
                a is b for a, b in zip(self._catalog[0], key, strict=True)):
            return self._catalog[1]
        names: set[str] = set()
        for listing, rel in listings:
            names |= names_in(listing, rel, await self._tag_files(listing) if rel else ())
        names -= host_folder_names(names)
        result = sorted(names)
        self._catalog = (key, result)
        return result

    async def _tag_files(self, listing: Listing) -> frozenset[str]:
        """The archives of a (non-root) folder that serve ``<folder>:<stem>``, decided by
        their content once per listing: the catalog lists them as tags, not as repositories
        of their own (README, "Where images live")."""
        cached = self._tag_file_cache.get(listing.path)
        if cached is not None and cached[0] is listing:
            return cached[1]
        candidates = own_candidates(listing)
        checked = await self.directory.check((), [
            held.probe() for c in candidates if (held := self._current.get(c.path)) is not None])
        found: set[str] = set()
        for candidate in candidates:
            if ":" in candidate.stem:
                continue  # <stem> with a colon names no pattern-5 alias
            layout = await self._held(candidate, checked)
            if layout is not None and _tag_in(layout.layout, candidate, candidate.stem):
                found.add(os.path.basename(candidate.path))
        result = frozenset(found)
        if len(self._tag_file_cache) > 10_000:  # bounded by the folders of the directory
            self._tag_file_cache.clear()
        self._tag_file_cache[listing.path] = (listing, result)
        return result

    async def prime(self, timeout: float = PRIME_SECONDS) -> None:
        """Read the image directory's listing before serving (worker startup).

        Nearly every name's answer depends on the root's listing (the parent of a one-part
        name, and where every host folder lives). Read here, the first request of a new
        worker costs a stat of it instead of a read of ten thousand entries. Bounded: a
        file server that does not answer must not keep the worker from serving health
        probes; the first request then reads the listing itself.
        """
        started = time.perf_counter()
        try:
            checked = await asyncio.wait_for(self.directory.check([self._root]), timeout)
        except TimeoutError:
            log.warning("the image directory did not answer within %.0fs; serving anyway",
                        timeout)
            return
        listing = checked.listings[self._root]
        log.debug("read the image directory (%d archives, %d folders) in %.1f ms",
                  len(listing.entries), len(listing.folders),
                  (time.perf_counter() - started) * 1000)

    async def rescan(self) -> None:
        """Re-check every directory seen, retire archives that are gone, and forget what the
        grace period no longer covers (the periodic rescan)."""
        self.stats.rescans += 1
        started = time.perf_counter()
        checked = await self.directory.check({*self.directory.known(), *self._by_dir})
        self.directory.forget(lambda p: checked.listings.get(p) is not None
                              and checked.listings[p].exists)
        self._reconcile(checked)
        self._reconciled = {p: v for p, v in self._reconciled.items() if p in self._by_dir}
        if self._local_pins is not None:
            await asyncio.to_thread(self._local_pins.sweep)
        self._expire()
        broken = list(self._broken.items())
        still = await asyncio.to_thread(_unchanged, broken)
        self._broken = dict(b for b, keep in zip(broken, still, strict=True) if keep)
        live = {(h.path, h.layout.archive.fingerprint) for h in self._helds()}
        self._verified = {k: v for k, v in self._verified.items() if (k[0], k[1]) in live}
        self._memo.clear()
        log.debug("rescan: %d directories, %d archives current, %d retired, %d unservable, "
                  "%.3fs", len(checked.listings), len(self._current), len(self._retired),
                  len(self._broken), time.perf_counter() - started)

    def snapshot(self) -> dict[str, int]:
        """Cache sizes, for metrics."""
        return {"names": len(self._memo), "archives": len(self._current),
                "retired": len(self._retired), "broken": len(self._broken),
                "verified_blobs": len(self._verified),
                "listings": len(self.directory.known())}

    def ready(self) -> bool:
        """True when the image directory can be listed (readiness)."""
        return os.access(self._root, os.R_OK | os.X_OK) and os.path.isdir(self._root)

    def close(self) -> None:
        """Release every pinned descriptor (at shutdown)."""
        for held in self._helds():
            held.close()
        self._current.clear()
        self._retired.clear()
        if self._local_pins is not None:
            self._local_pins.close()
        self.directory.close()

    # ------------------------------------------------------------------ resolution

    async def _by_tag(self, name: str, tag: str) -> ManifestRecord:
        """Patterns in order: the name's own folder first and, only when it does not hold the
        tag, the parent; a name never seen before starts from the parent's listing, which
        says whether the name's folder exists at all."""
        name_dir, parent, base = split_name(self._root, name)
        memo = self._memo.get(name)
        own = memo is not None and memo.own  # look into the name's folder
        beside = not own or memo is None or memo.parent  # look beside it (patterns 3-5)
        candidates: list[Candidate] = []
        forced = self._first_look(name)
        for _attempt in range(_ATTEMPTS):
            dirs = ([name_dir] if own else []) + ([parent] if beside else [])
            hint = self._current.get(memo.winners.get(tag, "")) if memo is not None else None
            probes = [hint.probe()] if hint is not None else []
            checked = await self.directory.check(dirs, probes, miss=forced)
            if not own and _has_folder(checked.listings[parent], base):
                own = True  # first sight of a name with a folder of its own
                continue
            candidates = self._candidates(checked, name_dir if own else None,
                                          parent if beside else None, base)
            for candidate in ordered(candidates, tag):
                held = await self._held(candidate, checked)
                if held is None:
                    continue
                digest = _tag_in(held.layout, candidate, tag)
                if digest is None:
                    continue
                self._remember(name, own, candidate.pattern is not Pattern.IN_DIRECTORY,
                               tag, candidate.path)
                return held.layout.manifests[digest]
            if not beside:
                beside = True  # nothing in the name's folder: look beside it (3-5)
                continue
            if forced or not self.directory.recheck_due(dirs):
                break
            forced = True  # a miss looks again, with the file server, before its 404
        if not candidates:
            raise RegistryError(ErrorCode.NAME_UNKNOWN, {"name": name})
        raise RegistryError(ErrorCode.MANIFEST_UNKNOWN,
                            self._why_missing(name, candidates, tag))

    def _first_look(self, name: str) -> bool:
        """Should the first look for ``name`` ask the file server (as a miss does)?

        Yes for a name this worker never answered, when its parent may be re-asked now: such
        a request most likely ends in a 404, and that 404 must come from a look with the file
        server; taking it first makes it the only look (one round trip, not two). The same
        per-directory rate limit as a miss's recheck bounds a flood of unknown names.
        """
        if name in self._memo:
            return False
        _, parent, _ = split_name(self._root, name)
        return self.directory.recheck_due([parent])

    async def _lookup(self, name: str, *, miss: bool = False) -> _Lookup:
        """Every current candidate of ``name`` (both folders), with the directories checked."""
        name_dir, parent, base = split_name(self._root, name)
        memo = self._memo.get(name)
        if memo is None or not memo.own:
            checked = await self.directory.check([parent], miss=miss)
            if not _has_folder(checked.listings[parent], base):
                return _Lookup(checked, self._candidates(checked, None, parent, base),
                               (parent,), own=False)
        checked = await self.directory.check([name_dir, parent], miss=miss)
        return _Lookup(checked, self._candidates(checked, name_dir, parent, base),
                       (name_dir, parent), own=True)

    async def _by_digest(self, name: str,
                         pick: Callable[[_Held], Awaitable[T | None]],
                         ) -> tuple[T | None, list[Candidate]]:
        """The first of the name's archives for which ``pick`` finds something: current ones
        in candidate order, then retired ones, then pins other workers retired."""
        candidates: list[Candidate] = []
        adopted = self._pins is None or self._grace <= 0
        forced = self._first_look(name)
        for _attempt in range(_ATTEMPTS):
            looked = await self._lookup(name, miss=forced)
            candidates = looked.candidates
            helds = [h for c in candidates
                     if (h := await self._held(c, looked.checked)) is not None]
            for held in helds:
                found = await pick(held)
                if found is not None:
                    self._remember(name, looked.own, False)
                    return found, candidates
            self._expire()
            for held in [h for h in self._retired if serves(self._root, name, h.path)]:
                found = await pick(held)
                if found is not None:
                    self.stats.grace_hits += 1
                    return found, candidates
            if not adopted:
                await self._adopt_superseded(name)  # what other workers saw replaced
                adopted = True
                continue
            if forced or not self.directory.recheck_due(looked.dirs):
                break
            forced = True
        if not candidates:
            raise RegistryError(ErrorCode.NAME_UNKNOWN, {"name": name})
        return None, candidates

    async def _all_current(self, name: str) -> list[tuple[Candidate, _Held]]:
        forced = self._first_look(name)
        for _attempt in range(_ATTEMPTS):
            looked = await self._lookup(name, miss=forced)
            if looked.candidates:
                found: list[tuple[Candidate, _Held]] = []
                for candidate in looked.candidates:
                    held = await self._held(candidate, looked.checked)
                    if held is not None:
                        found.append((candidate, held))
                self._remember(name, looked.own, False)
                return found
            if forced or not self.directory.recheck_due(looked.dirs):
                break
            forced = True  # a miss looks again before it answers 404
        raise RegistryError(ErrorCode.NAME_UNKNOWN, {"name": name})

    def _candidates(self, checked: Revalidated, name_dir: str | None, parent: str | None,
                    base: str) -> list[Candidate]:
        self._reconcile(checked)
        found = own_candidates(checked.listings[name_dir]) if name_dir is not None else []
        if parent is not None:
            found += parent_candidates(checked.listings[parent], base)
        return found

    def _reconcile(self, checked: Revalidated) -> None:
        """Retire held archives that a changed listing no longer shows (deleted, or renamed
        over): work proportional to change, since an unchanged listing is the same object."""
        for path, listing in checked.listings.items():
            if self._reconciled.get(path) is listing:
                continue
            held_here = self._by_dir.get(path)
            if held_here:
                for archive in list(held_here):
                    entry = listing.entries.get(os.path.basename(archive))
                    held = self._current.get(archive)
                    if held is not None and (entry is None or entry.inode != held.inode):
                        self._retire(archive)
            if listing.exists:
                self._reconciled[path] = listing
            else:
                self._reconciled.pop(path, None)

    def _remember(self, name: str, own: bool, parent: bool, tag: str | None = None,
                  path: str = "") -> None:
        """Remember what answered for an existing name (bounded: names come from requests)."""
        memo = self._memo.get(name)
        if memo is None:
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            memo = self._memo[name] = _Memo(own=own)
        memo.own = memo.own or own
        memo.parent = memo.parent or parent
        if tag is not None:
            if len(memo.winners) >= 1024:
                memo.winners.clear()
            memo.winners[tag] = path

    # ------------------------------------------------------------------ held archives

    async def _held(self, candidate: Candidate, checked: Revalidated) -> _Held | None:
        """The indexed archive at ``candidate.path`` as the listing shows it, fresh as of this
        request: indexed now if new, re-indexed if its bytes changed in place; None when it
        cannot be served (or changed again while being indexed: the caller checks again)."""
        held = self._current.get(candidate.path)
        if held is not None and held.inode == candidate.inode:
            probe = held.probe()
            now = checked.files.get(probe)
            if probe not in checked.files:
                now = (await self.directory.check((), [probe])).files[probe]
            if now == held.layout.archive.fingerprint:
                return held
        broken = self._broken.get(candidate.path)
        if broken is not None and broken[0].inode == candidate.inode:
            return None
        # The path is opened (pinned) now: if it was renamed over again since the listing was
        # read, this is the newer file, which is as monotonic an answer as the listing's.
        return await self._single_flight(("index", candidate.path, candidate.inode),
                                         lambda: self._index(candidate))

    async def _index(self, candidate: Candidate) -> _Held | None:
        """Pin and index what ``candidate.path`` names now; the held archive it replaces (if
        any) is retired."""
        started = time.perf_counter()
        current = self._current.get(candidate.path)
        same = current.layout.archive.fingerprint if current is not None else None
        try:
            held = await asyncio.to_thread(self._read, candidate, same)
        except FileNotFoundError:
            # Removed since the listing was read: gone, not broken (the next check sees it).
            log.debug("%s vanished before it was indexed", self._relative(candidate.path))
            return None
        except StaleArchiveError as exc:
            # Rewritten while it was read: not broken either; the newer bytes are indexed
            # by the next look (remembering them as broken would hide them until they
            # change again).
            log.debug("%s: %s", self._relative(candidate.path), exc)
            return None
        except (ArchiveError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            with contextlib.suppress(OSError):
                fingerprint = await asyncio.to_thread(Fingerprint.of_path, candidate.path)
                self._broken[candidate.path] = (fingerprint, reason)
            self.stats.archive_errors += 1
            log.warning("cannot serve %s: %s", self._relative(candidate.path), reason)
            return None
        finally:
            self.stats.index_seconds += time.perf_counter() - started
        if held is None:  # the file held already (a request with an older listing)
            return self._current.get(candidate.path)
        self.stats.archives_indexed += 1
        for problem in held.layout.problems:
            log.warning("%s: skipped an entry: %s", self._relative(candidate.path), problem)
        self._broken.pop(candidate.path, None)
        if candidate.path in self._current:
            self._retire(candidate.path)
        self._current[candidate.path] = held
        self._by_dir.setdefault(os.path.dirname(candidate.path), set()).add(candidate.path)
        self._forget_verifications(candidate.path)
        return held

    def _read(self, candidate: Candidate, held: Fingerprint | None) -> _Held | None:
        """Pin and index one archive (blocking); None when the pinned file is the one
        already held (``held`` is its fingerprint)."""
        pinned = None if candidate.is_dir or self._pins is None else \
            self._pins.pin(candidate.path)
        if pinned is not None and pinned.fingerprint == held:
            os.close(pinned.fd)
            return None
        if pinned is None:
            layout = load_layout(open_archive(candidate.path, self._limits, self.cache))
            inode = candidate.inode if candidate.is_dir else layout.archive.fingerprint.inode
            return _Held(layout, inode)
        try:
            archive = open_archive(candidate.path, self._limits, self.cache,
                                   source=pin_source(pinned.fd), fd=pinned.fd)
            with archive.lent(pinned.fd):  # reads through the pin: no open per member
                layout = load_layout(archive)
        except BaseException:
            os.close(pinned.fd)
            raise
        return _Held(layout, pinned.fingerprint.inode, pinned.fd)

    async def _adopt_superseded(self, name: str) -> None:
        """Index archives other workers saw replaced or removed (within the grace period)
        that this worker never held, so it serves their digests too."""
        assert self._pins is not None
        pinned = await asyncio.to_thread(self._pins.superseded, name)
        known = {(h.path, h.layout.archive.fingerprint) for h in self._helds()}
        for pin in pinned:
            if (pin.path, pin.fingerprint) in known:
                os.close(pin.fd)
                continue
            try:
                held = await asyncio.to_thread(self._read_pinned, pin)
            except (ArchiveError, StaleArchiveError, OSError) as exc:
                os.close(pin.fd)
                log.info("%s: superseded archive unreadable: %s", self._relative(pin.path), exc)
                continue
            held.retired_at = self._clock()
            self._retired.append(held)
            known.add((pin.path, pin.fingerprint))

    def _read_pinned(self, pin: Pinned) -> _Held:
        layout = load_layout(open_archive(pin.path, self._limits, self.cache,
                                          source=pin_source(pin.fd)))
        return _Held(layout, pin.fingerprint.inode, pin.fd)

    def _retire(self, path: str) -> None:
        """The path no longer names this archive: keep it for digests during the grace
        period (its pin keeps the bytes), and tell the node's pin table."""
        held = self._current.pop(path, None)
        if held is None:
            return
        siblings = self._by_dir.get(os.path.dirname(path))
        if siblings is not None:
            siblings.discard(path)
            if not siblings:
                del self._by_dir[os.path.dirname(path)]
        now = self._clock()
        if self._grace <= 0 or held.pin is None:
            held.close()
        else:
            held.retired_at = now
            self._retired.append(held)
        self._expire()
        if self._pins is not None and held.pin is not None:
            pins, fingerprint = self._pins, held.layout.archive.fingerprint
            # Sent in the background: the grace period starts now, not when it arrives.
            task = asyncio.get_running_loop().run_in_executor(None, pins.gone, path,
                                                              fingerprint, now)
            task.add_done_callback(lambda f: f.exception())

    def _expire(self) -> None:
        now = self._clock()
        keep: list[_Held] = []
        for held in self._retired:
            if held.retired_at is not None and now - held.retired_at >= self._grace:
                held.close()
            else:
                keep.append(held)
        self._retired = keep

    def _helds(self) -> Iterable[_Held]:
        yield from self._current.values()
        yield from self._retired

    def _forget_verifications(self, path: str) -> None:
        """Drop verdicts about versions of ``path`` no longer held: a replaced archive's
        digests would otherwise stay for ever, one entry per blob per replacement."""
        held = {h.layout.archive.fingerprint for h in self._helds() if h.path == path}
        stale = [k for k in self._verified if k[0] == path and k[1] not in held]
        for key in stale:
            del self._verified[key]

    # ------------------------------------------------------------------ verification

    async def _verify(self, location: BlobLocation) -> None:
        """Refuse (BLOB_UNKNOWN) a member whose stored bytes do not match its digest."""
        if not await self._intact(location):
            raise RegistryError(ErrorCode.BLOB_UNKNOWN, {
                "digest": location.digest, "reason": "stored content does not match the digest"})

    async def _intact(self, location: BlobLocation) -> bool:
        """False when the member's bytes do not hash to its digest (checked once per archive
        fingerprint, so HEAD and GET give the same answer).

        Members of plain archives and layout directories are hashed where they lie. Small
        members of compressed archives are in memory and hashed there; large ones are
        decompressed into the blob cache, which keeps only bytes matching their digest.
        Without a cache, a large compressed member is hashed while it streams instead.
        """
        layout = location.layout
        if layout is None:
            return True
        key = (layout.archive.path, layout.archive.fingerprint, location.digest)
        ok = self._verified.get(key)
        if ok is None:
            ok = await self._single_flight(("verify", key),
                                           lambda: asyncio.to_thread(self._check, location))
            self._verified[key] = ok
            if not ok:
                self.stats.archive_errors += 1
                log.error("%s: blob %s does not match its digest; refusing to serve it",
                          self._relative(layout.archive.path), location.digest)
        return ok

    def _check(self, location: BlobLocation) -> bool:
        assert location.layout is not None
        if location.compressed and location.size > self._limits.small_member_bytes:
            if self.cache is None:
                return True  # verified while it streams; the last piece is held back
            try:
                location.layout.prepare_blob(location.digest)
            except ArchiveError:
                return False  # the cache refused bytes that do not match the digest
            return True
        if location.digest in location.layout.verified:
            return True  # hashed when indexed (docker-save layers are found by hashing)
        return self._hash_member(location)

    def _hash_member(self, location: BlobLocation) -> bool:
        assert location.layout is not None
        algorithm, _, encoded = location.digest.partition(":")
        with location.layout.open_blob(location.digest) as reader:
            hashed = reader.hash_rest(algorithm)
        self.stats.verified_bytes += hashed.size
        return hashed.hexdigest == encoded

    async def _single_flight(self, key: object, start: Callable[[], Awaitable[T]]) -> T:
        """Run ``start()`` once for concurrent callers with the same key; all get its result."""
        future = self._inflight.get(key)
        if future is None:
            task: asyncio.Future[T] = asyncio.ensure_future(start())
            self._inflight[key] = task  # type: ignore[assignment]
            task.add_done_callback(lambda _f: self._inflight.pop(key, None))
            return await asyncio.shield(task)
        return await asyncio.shield(future)  # type: ignore[arg-type]

    def _why_missing(self, name: str, candidates: list[Candidate],
                     reference: str) -> dict[str, object]:
        detail: dict[str, object] = {"name": name, "reference": reference}
        broken = [f"{self._relative(c.path)}: {self._broken[c.path][1]}"
                  for c in candidates if c.path in self._broken]
        if broken:
            detail["unservable"] = broken[:5]
        # An entry that was refused when indexed (missing blob, a layer whose bytes are not
        # what its media type says): tell the client why, not only that it is unknown.
        rejected = [f"{self._relative(c.path)}: {why}" for c in candidates
                    if (held := self._current.get(c.path)) is not None
                    and (why := held.layout.rejection(reference)) is not None]
        if rejected:
            detail["rejected"] = rejected[:5]
        return detail

    def _relative(self, path: str) -> str:
        return os.path.relpath(path, self._root)


def _has_folder(listing: Listing, base: str) -> bool:
    return base in listing.folders


def _unchanged(broken: list[tuple[str, tuple[Fingerprint, str]]]) -> list[bool]:
    """Which unservable archives are still the same file (blocking)."""
    result = []
    for path, (fingerprint, _) in broken:
        try:
            result.append(Fingerprint.of_path(path) == fingerprint)
        except OSError:
            result.append(False)
    return result


def _implicit_tag(layout: ImageLayout, candidate: Candidate) -> str | None:
    """An untagged single-image archive named ``<name>/<tag>.oci`` or ``<name>:<tag>.oci``
    serves that tag: skopeo writes no tag annotation for ``oci-archive:FILE`` without one."""
    if (candidate.pattern is not Pattern.WHOLE and not layout.tags and len(layout.roots) == 1
            and candidate.stem):
        return candidate.stem
    return None


def _tag_in(layout: ImageLayout, candidate: Candidate, tag: str) -> str | None:
    digest = layout.tags.get(tag)
    if digest is None and _implicit_tag(layout, candidate) == tag:
        digest = layout.roots[0]
    return digest
