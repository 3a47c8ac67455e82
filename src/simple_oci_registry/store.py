"""The image store: what a repository name and reference mean, answered from cached archives.

Caching follows the original design, made exact:

* a *name view* remembers the name's candidate archives with their stat fingerprints; it is
  trusted for ``freshness_window`` seconds, then listed again, so a new, replaced (even by an
  older-dated copy), rewritten or deleted archive is seen by the next request after the window;
* an archive is indexed once per fingerprint (:mod:`archive`, :mod:`layout`) and shared by every
  name that reaches it; concurrent requests for the same archive wait for one indexing;
* an archive that cannot be served is remembered with its fingerprint and reason, logged once,
  and skipped until it changes, so one broken file costs neither log floods nor other images;
* a full rescan every ``rescan_interval`` re-lists every known name and purges archives that
  disappeared;
* blob bytes from uncompressed archives are verified against their digest once per archive
  fingerprint before they are first served (manifests and indexes are verified when indexed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from simple_oci_registry import mediatypes
from simple_oci_registry.archive import (
    ArchiveError,
    ArchiveKind,
    ArchiveLimits,
    MemberReader,
    StaleArchiveError,
    open_archive,
)
from simple_oci_registry.blobcache import BlobCache
from simple_oci_registry.config import Config
from simple_oci_registry.errors import ErrorCode, RegistryError
from simple_oci_registry.fingerprint import Fingerprint
from simple_oci_registry.layout import ImageLayout, ManifestRecord, load_layout
from simple_oci_registry.reference import Digest
from simple_oci_registry.resolver import Candidate, Pattern, list_candidates, ordered, walk_names

__all__ = ["BlobLocation", "ImageStore", "StoreStats"]

log = logging.getLogger(__name__)

T = TypeVar("T")


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
class _NameView:
    candidates: tuple[Candidate, ...]
    checked_at: float
    orders: dict[str, list[Candidate]] = field(default_factory=dict)  # tag -> try order

    def ordered(self, tag: str) -> list[Candidate]:
        order = self.orders.get(tag)
        if order is None:
            if len(self.orders) > 1024:  # bounded: tags come from requests
                self.orders.clear()
            order = self.orders[tag] = ordered(self.candidates, tag)
        return order


@dataclass(slots=True)
class StoreStats:
    """Counters the metrics endpoint reads (mutated only by the store that owns them)."""

    index_seconds: float = 0.0
    archives_indexed: int = 0
    archive_errors: int = 0
    rescans: int = 0
    verified_bytes: int = 0


class ImageStore:
    """Resolves names, references and digests to manifests and blob locations."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._root = config.root
        self._window = config.freshness_window
        self._allow_outside = config.allow_outside_symlinks
        self._clock = clock
        self._limits = ArchiveLimits()
        self._views: dict[str, _NameView] = {}
        self._layouts: dict[str, ImageLayout] = {}
        self._broken: dict[str, tuple[Fingerprint, str]] = {}
        self._verified: dict[tuple[str, Fingerprint, str], bool] = {}
        self._inflight: dict[object, asyncio.Future[object]] = {}
        self._catalog: tuple[float, list[str]] | None = None
        self.stats = StoreStats()
        self.cache = BlobCache.create(config.cache_dir, config.cache_max_bytes)

    # ------------------------------------------------------------------ public API

    async def manifest(self, name: str, reference: str | Digest) -> ManifestRecord:
        """The manifest or index ``name:reference`` resolves to."""
        candidates = await self._candidates(name)
        view = self._views.get(name)
        if isinstance(reference, Digest):
            digest = str(reference)
            for held in await self._layouts_of(candidates):
                record = held.manifests.get(digest)
                if record is not None:
                    return record
        else:
            order = view.ordered(reference) if view is not None else ordered(candidates,
                                                                              reference)
            for candidate in order:
                layout = await self._layout(candidate)
                if layout is None:
                    continue
                found = _tag_in(layout, candidate, reference)
                if found is not None:
                    return layout.manifests[found]
        raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, self._why_missing(name, candidates,
                                                                        str(reference)))

    async def blob(self, name: str, digest: Digest) -> BlobLocation:
        """Locate a blob reachable from one of the name's archives.

        Locating verifies the member, which reads the archive: if the file was replaced or
        vanished since it was listed (within the freshness window, or ESTALE/EIO from NFS),
        the name is listed again and the lookup retried once rather than failing.
        """
        for attempt in range(2):
            try:
                return await self._locate_blob(name, digest)
            except (StaleArchiveError, OSError) as exc:
                log.info("re-resolving %s@%s: %s", name, digest, exc)
                self._views.pop(name, None)
                if attempt:
                    raise RegistryError(ErrorCode.BLOB_UNKNOWN, {
                        "digest": str(digest), "reason": "archive changed while reading"},
                    ) from None
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _locate_blob(self, name: str, digest: Digest) -> BlobLocation:
        key = str(digest)
        candidates = await self._candidates(name)
        detail: dict[str, str] = {"digest": key}
        for layout in await self._layouts_of(candidates):
            record = layout.manifests.get(key)
            if record is not None:
                # A manifest fetched as a blob keeps its own media type (containerd#7391).
                return BlobLocation(key, len(record.body), record.media_type, body=record.body)
            if layout.has_blob(key):
                location = BlobLocation(key, layout.blob_size(key), mediatypes.OCTET_STREAM,
                                        layout)
                if await self._intact(location):
                    return location
                # A digest names content, not a file (image-spec descriptor.md): a damaged copy
                # must not hide an intact one in another of the name's archives.
                detail["reason"] = "stored content does not match the digest"
        raise RegistryError(ErrorCode.BLOB_UNKNOWN, detail)

    async def open_blob(self, name: str, location: BlobLocation) -> tuple[BlobLocation,
                                                                         MemberReader]:
        """Open a located blob's bytes, verified, re-resolving once if the archive changed.

        The returned location may differ from the argument when the archive was replaced in the
        meantime and the blob now lives elsewhere.
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
                # ESTALE/EIO from NFS, or a replaced file: look again rather than fail.
                log.info("re-resolving %s@%s: %s", name, location.digest, exc)
                self._views.pop(name, None)
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
        """Every tag in the name's candidate archives, sorted."""
        candidates = await self._candidates(name)
        found: set[str] = set()
        for candidate in candidates:
            layout = await self._layout(candidate)
            if layout is not None:
                found.update(layout.tags)
                implicit = _implicit_tag(layout, candidate)
                if implicit is not None:
                    found.add(implicit)
        return sorted(found)

    async def referrers(self, name: str, digest: Digest) -> list[ManifestRecord]:
        """Manifests in the name's archives whose ``subject`` is ``digest``."""
        seen: dict[str, ManifestRecord] = {}
        for layout in await self._layouts_of(await self._candidates(name)):
            for record in layout.referrers(str(digest)):
                seen.setdefault(record.digest, record)
        return sorted(seen.values(), key=lambda r: r.digest)

    async def catalog(self) -> list[str]:
        """Every repository name the directory serves (cached for the freshness window)."""
        now = self._clock()
        if self._catalog is not None and now - self._catalog[0] < max(self._window, 1.0):
            return self._catalog[1]
        names = await self._single_flight(
            "catalog", lambda: asyncio.to_thread(walk_names, self._root,
                                                 allow_outside=self._allow_outside))
        self._catalog = (now, names)
        return names

    async def rescan(self) -> None:
        """Re-list every known name and drop archives that are gone (the periodic rescan)."""
        self.stats.rescans += 1
        started = time.perf_counter()
        for name in list(self._views):
            self._views.pop(name, None)
            try:
                candidates = await self._candidates(name)
                await self._layouts_of(candidates)  # re-index changed archives ahead of use
            except RegistryError:
                continue
        live = {c.path for view in self._views.values() for c in view.candidates}
        for path in [p for p in self._layouts if p not in live]:
            del self._layouts[path]
        for path in [p for p in self._broken if p not in live]:
            del self._broken[path]
        current = {path: layout.archive.fingerprint for path, layout in self._layouts.items()}
        self._verified = {k: v for k, v in self._verified.items() if current.get(k[0]) == k[1]}
        self._catalog = None
        log.debug("rescan: %d names, %d archives indexed, %d unservable, %.3fs",
                  len(self._views), len(self._layouts), len(self._broken),
                  time.perf_counter() - started)

    def snapshot(self) -> dict[str, int]:
        """Cache sizes, for metrics."""
        return {"names": len(self._views), "archives": len(self._layouts),
                "broken": len(self._broken), "verified_blobs": len(self._verified)}

    def ready(self) -> bool:
        """True when the image directory can be listed (readiness)."""
        return os.access(self._root, os.R_OK | os.X_OK) and os.path.isdir(self._root)

    # ------------------------------------------------------------------ internals

    async def _candidates(self, name: str) -> tuple[Candidate, ...]:
        view = self._views.get(name)
        now = self._clock()
        if view is not None and now - view.checked_at < self._window:
            return view.candidates
        candidates = await self._single_flight(
            ("list", name),
            lambda: asyncio.to_thread(list_candidates, self._root, name,
                                      allow_outside=self._allow_outside))
        if view is not None and view.candidates != candidates:
            self._forget_missing(view.candidates, candidates)
        if candidates:
            self._views[name] = _NameView(candidates, now)
        else:
            self._views.pop(name, None)  # unknown names are not cached: no growth from probes
            raise RegistryError(ErrorCode.NAME_UNKNOWN, {"name": name})
        return candidates

    def _forget_missing(self, before: tuple[Candidate, ...], after: tuple[Candidate, ...]) -> None:
        """Purge archives that left a name's view and that no other view still holds."""
        remaining = {c.path for c in after}
        for candidate in before:
            if candidate.path in remaining:
                continue
            if any(candidate.path == c.path for v in self._views.values() for c in v.candidates
                   if v.candidates is not before):
                continue
            self._layouts.pop(candidate.path, None)
            self._broken.pop(candidate.path, None)

    async def _layouts_of(self, candidates: tuple[Candidate, ...]) -> list[ImageLayout]:
        """The candidates' layouts in order, already-indexed ones without any await."""
        layouts: list[ImageLayout] = []
        for candidate in candidates:
            layout = await self._layout(candidate)
            if layout is not None:
                layouts.append(layout)
        return layouts

    async def _layout(self, candidate: Candidate) -> ImageLayout | None:
        layout = self._layouts.get(candidate.path)
        if layout is not None and layout.archive.fingerprint == candidate.fingerprint:
            return layout
        broken = self._broken.get(candidate.path)
        if broken is not None and broken[0] == candidate.fingerprint:
            return None
        return await self._single_flight(("index", candidate.path, candidate.fingerprint),
                                         lambda: self._index(candidate))

    async def _index(self, candidate: Candidate) -> ImageLayout | None:
        started = time.perf_counter()
        try:
            layout = await asyncio.to_thread(self._read_layout, candidate.path)
        except (ArchiveError, StaleArchiveError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._broken[candidate.path] = (candidate.fingerprint, reason)
            self._layouts.pop(candidate.path, None)
            self.stats.archive_errors += 1
            log.warning("cannot serve %s: %s", self._relative(candidate.path), reason)
            return None
        finally:
            self.stats.index_seconds += time.perf_counter() - started
        self.stats.archives_indexed += 1
        for problem in layout.problems:
            log.warning("%s: skipped an entry: %s", self._relative(candidate.path), problem)
        self._layouts[candidate.path] = layout
        self._forget_verifications(candidate.path, keep=layout.archive.fingerprint)
        if layout.archive.fingerprint != candidate.fingerprint:
            # Changed between listing and indexing: make the next request list again.
            for view in self._views.values():
                view.checked_at = float("-inf")
        return layout

    def _forget_verifications(self, path: str, *, keep: Fingerprint) -> None:
        """Drop verdicts about earlier versions of ``path``: a replaced archive's digests
        would otherwise stay for ever, one entry per blob per replacement."""
        stale = [k for k in self._verified if k[0] == path and k[1] != keep]
        for key in stale:
            del self._verified[key]

    def _read_layout(self, path: str) -> ImageLayout:
        return load_layout(open_archive(path, self._limits, self.cache))

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

    def _why_missing(self, name: str, candidates: tuple[Candidate, ...],
                     reference: str) -> dict[str, object]:
        detail: dict[str, object] = {"name": name, "reference": reference}
        broken = [f"{self._relative(c.path)}: {self._broken[c.path][1]}"
                  for c in candidates if c.path in self._broken]
        if broken:
            detail["unservable"] = broken[:5]
        # An entry that was refused when indexed (missing blob, a layer whose bytes are not
        # what its media type says): tell the client why, not only that it is unknown.
        rejected = [f"{self._relative(c.path)}: {why}" for c in candidates
                    if (held := self._layouts.get(c.path)) is not None
                    and (why := held.rejection(reference)) is not None]
        if rejected:
            detail["rejected"] = rejected[:5]
        return detail

    def _relative(self, path: str) -> str:
        return os.path.relpath(path, self._root)


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
