"""Prometheus metrics at ``/metrics`` (prometheus-client).

Request counts, durations and bytes are recorded once, by the request pipeline, from the
final status (so no handler path can forget or double-count), into a per-worker tally that
reaches prometheus-client once per event-loop iteration (see :meth:`Metrics.observe`). Store
figures (archives indexed, index time, rescans, archive errors, cache entries) are copied from
the store's counters by a small periodic sync, and so is the count of log lines dropped (see
:class:`logs.LogOutput`).
With several worker processes, prometheus-client's multiprocess mode keeps the
values in files under ``PROMETHEUS_MULTIPROC_DIR`` so that a scrape answered by any worker
reports the whole node.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import math
import os
from collections.abc import Iterable
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from simple_oci_registry.blobcache import CacheStats
from simple_oci_registry.logs import dropped_lines
from simple_oci_registry.preparation import PreparationStats, Preparer
from simple_oci_registry.store import ImageStore, StoreStats

__all__ = ["MULTIPROC_ENV", "Metrics"]

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                   10, 30, 60, 300)
# Upper bounds as prometheus-client keeps them: the last bucket (+Inf) takes the rest.
_UPPER_BOUNDS: Final = (*(float(b) for b in _BUCKETS), math.inf)


class _Series:
    """One (endpoint, method, status): its prometheus-client children (looked up once), and
    the requests it answered since the last flush."""

    __slots__ = ("buckets", "count", "duration", "requests", "response_bytes", "seconds",
                 "sent")

    def __init__(self, requests: Counter, response_bytes: Counter, duration: Histogram) -> None:
        self.requests = requests
        self.response_bytes = response_bytes
        self.duration = duration
        self.count = 0
        self.sent = 0
        self.seconds = 0.0
        self.buckets: dict[int, int] = {}  # bucket index -> count (not cumulative)

    def add(self, sent: int, seconds: float) -> None:
        self.count += 1
        self.sent += sent
        self.seconds += seconds
        # The first bucket whose upper bound is >= seconds, as Histogram.observe picks it.
        bucket = bisect.bisect_left(_UPPER_BOUNDS, seconds)
        self.buckets[bucket] = self.buckets.get(bucket, 0) + 1

    def flush(self) -> None:
        """Add the tally to prometheus-client's values and start a new one (first, so that
        a failed update cannot leave a tally behind that no flush would take again)."""
        count, sent, seconds, buckets = self.count, self.sent, self.seconds, self.buckets
        self.count = self.sent = 0
        self.seconds = 0.0
        self.buckets = {}
        self.requests.inc(count)
        if sent:
            self.response_bytes.inc(sent)
        _observe_tallied(self.duration, seconds, buckets)


class Metrics:
    """One worker's metrics; ``render()`` answers a scrape for the whole process group."""

    def __init__(self) -> None:
        self._multiproc_dir = os.environ.get(MULTIPROC_ENV)
        self.registry = CollectorRegistry()
        # In multiprocess mode values live in files; registering here would double-report.
        reg = None if self._multiproc_dir else self.registry
        self.requests = Counter("registry_http_requests", "HTTP requests answered",
                                ["endpoint", "method", "status"], registry=reg)
        self.response_bytes = Counter("registry_http_response_bytes",
                                      "Body bytes sent (blob, manifest and API responses)",
                                      ["endpoint"], registry=reg)
        self.duration = Histogram("registry_http_request_duration_seconds",
                                  "Time from request to the end of the response", ["endpoint"],
                                  buckets=_BUCKETS, registry=reg)
        self.archives_indexed = Counter("registry_archives_indexed",
                                        "Archives scanned and interpreted", registry=reg)
        self.index_seconds = Counter("registry_archive_index_seconds",
                                     "Time spent indexing archives", registry=reg)
        self.archive_errors = Counter("registry_archive_errors",
                                      "Archives or blobs found unservable", registry=reg)
        self.rescans = Counter("registry_rescans", "Periodic full rescans run", registry=reg)
        self.verified_bytes = Counter("registry_blob_verified_bytes",
                                      "Blob bytes hashed to check their digest", registry=reg)
        self.cache_bytes = Gauge(
            "registry_blob_cache_bytes", "Bytes of blobs in the node's blob cache, as of the "
            "last eviction pass", multiprocess_mode="max", registry=reg)
        self.cache_max_bytes = Gauge(
            "registry_blob_cache_max_bytes", "The blob cache's bound (--cache-max-bytes)",
            multiprocess_mode="max", registry=reg)
        self.grace_hits = Counter(
            "registry_grace_hits", "Digests served from archives replaced or removed within "
            "the grace period", registry=reg)
        self.listings_read = Counter(
            "registry_directory_listings_read", "Directory listings read because the "
            "directory changed (or was seen for the first time)", registry=reg)
        self.directory_stats = Counter(
            "registry_directory_stat_calls", "stat/fstat calls made to check that directories "
            "and archives are unchanged", registry=reg)
        self.cache_entries = Gauge("registry_cache_entries", "Entries in the store's caches",
                                   ["cache"], multiprocess_mode="livesum", registry=reg)
        self.decompressions = Counter(
            "registry_decompressions", "Passes over a gzip/zstd archive (scans and refills)",
            registry=reg)
        self.cache_fills = Counter("registry_blob_cache_fills",
                                   "Blobs decompressed into the blob cache", registry=reg)
        self.cache_hits = Counter("registry_blob_cache_hits",
                                  "Blob transfers served from the blob cache", registry=reg)
        self.cache_evictions = Counter("registry_blob_cache_evictions",
                                       "Blobs evicted from the blob cache", registry=reg)
        self.log_lines_dropped = Counter(
            "registry_log_lines_dropped",
            "Log lines (access log included) dropped because stderr was not read fast enough",
            registry=reg)
        # Background preparation (preparation.py): only the worker holding the node's lease
        # sets these, so the live maximum over workers is that worker's value, and a worker
        # that died (and handed the lease on) no longer counts.
        self.preparation_archives = Gauge(
            "registry_preparation_archives",
            "Compressed archives by background preparation state (prepared, pending, failed, "
            "deferred: over the cache share, left for first use)", ["state"],
            multiprocess_mode="livemax", registry=reg)
        for state in ("prepared", "pending", "failed", "deferred"):
            # Exported from the start (0 until the preparer reports), so alerts and dashboards
            # see the series on every node, preparing or not (livemax keeps the preparer's).
            self.preparation_archives.labels(state)
        self.preparation_progress = Gauge(
            "registry_preparation_last_progress_timestamp_seconds",
            "When background preparation last finished an archive (Unix time; 0: never)",
            multiprocess_mode="livemax", registry=reg)
        self.preparation_active = Gauge(
            "registry_preparation_active",
            "1 in the worker that prepares compressed archives for the node (sums to 1)",
            multiprocess_mode="livesum", registry=reg)
        self.preparation_bytes = Counter(
            "registry_preparation_filled_bytes",
            "Blob bytes background preparation decompressed into the blob cache", registry=reg)
        self.preparation_surveys = Counter(
            "registry_preparation_surveys",
            "Walks of the image directory background preparation finished (the first one "
            "tells that a new node knows which archives it has to prepare)", registry=reg)
        self.preparation_seconds = Counter(
            "registry_preparation_seconds", "Time background preparation spent on archives",
            registry=reg)
        self._synced_preparation = PreparationStats()
        self._synced = StoreStats()
        self._synced_dropped = 0
        self._synced_dir = (0, 0)
        self._synced_cache = CacheStats()
        # By (endpoint, method, status). Bounded: endpoint comes from a fixed set, method is
        # folded onto one (see observe), status from HTTP.
        self._series: dict[tuple[str, str, int], _Series] = {}
        self._touched: list[_Series] = []  # series that answered requests since the last flush
        self._flush_scheduled = False

    def observe(self, endpoint: str, method: str, status: int, sent: int,
                seconds: float) -> None:
        """Record one answered request.

        On the hot path, so it only adds to this worker's tally; prometheus-client's values
        are updated once per event-loop iteration for all the requests answered in it (see
        :meth:`flush`). Each of its updates costs a lock and, in multiprocess mode, a write
        to a memory-mapped file: four per request (count, bytes, duration sum and bucket)
        were 4% of a manifest GET's CPU. Values lag by at most that one iteration, and a
        scrape flushes the worker answering it first.
        """
        # Methods other than these are answered (405/404) and counted like the rest. aiohttp's
        # C parser knows ~40 methods (WebDAV and others), its pure-Python parser (no C
        # extension, AIOHTTP_NO_EXTENSIONS) takes any token: as labels they would add series
        # for good (and children here), up to without bound. One label value bounds it.
        if method not in _METHODS:
            method = "other"
        key = (endpoint, method, status)
        series = self._series.get(key)
        if series is None:  # memoised: labels() takes a lock and builds a key on every call
            series = self._series[key] = _Series(
                self.requests.labels(endpoint, method, str(status)),
                self.response_bytes.labels(endpoint), self.duration.labels(endpoint))
        if not series.count:
            self._touched.append(series)
        series.add(sent, seconds)
        if not self._flush_scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # called outside the event loop: nothing to batch with
                self.flush()
                return
            loop.call_soon(self.flush)
            self._flush_scheduled = True

    def flush(self) -> None:
        """Add the requests tallied since the last flush to prometheus-client's values."""
        touched, self._touched = self._touched, []
        self._flush_scheduled = False
        for series in touched:
            series.flush()

    def sync(self, store: ImageStore, preparer: Preparer | None = None) -> None:
        """Copy the store's, the blob cache's and background preparation's counters (as
        deltas) and gauges."""
        now, last = store.stats, self._synced
        _add_deltas((
            (self.archives_indexed, now.archives_indexed, last.archives_indexed),
            (self.index_seconds, now.index_seconds, last.index_seconds),
            (self.archive_errors, now.archive_errors, last.archive_errors),
            (self.rescans, now.rescans, last.rescans),
            (self.verified_bytes, now.verified_bytes, last.verified_bytes),
            (self.grace_hits, now.grace_hits, last.grace_hits),
            (self.listings_read, store.directory.listings_read, self._synced_dir[0]),
            (self.directory_stats, store.directory.stats_calls, self._synced_dir[1]),
        ))
        self._synced = dataclasses.replace(now)
        dropped = dropped_lines()
        _add_deltas(((self.log_lines_dropped, dropped, self._synced_dropped),))
        self._synced_dropped = dropped
        self._synced_dir = (store.directory.listings_read, store.directory.stats_calls)
        if store.cache is not None:
            blobs, seen = store.cache.stats, self._synced_cache
            _add_deltas((
                (self.decompressions, blobs.decompressions, seen.decompressions),
                (self.cache_fills, blobs.fills, seen.fills),
                (self.cache_hits, blobs.hits, seen.hits),
                (self.cache_evictions, blobs.evictions, seen.evictions),
            ))
            self._synced_cache = dataclasses.replace(blobs)
            self.cache_bytes.set(blobs.size_bytes)
            self.cache_max_bytes.set(store.cache.max_bytes)
        for cache, size in store.snapshot().items():
            self.cache_entries.labels(cache).set(size)
        if preparer is not None:
            self._sync_preparation(preparer)

    def _sync_preparation(self, preparer: Preparer) -> None:
        # The child process's decompressions and fills are the node's too: they count in the
        # same totals as the ones requests cause.
        now, last = preparer.stats, self._synced_preparation
        _add_deltas((
            (self.decompressions, now.decompressions, last.decompressions),
            (self.cache_fills, now.fills, last.fills),
            (self.preparation_bytes, now.filled_bytes, last.filled_bytes),
            (self.preparation_seconds, now.seconds, last.seconds),
            (self.preparation_surveys, now.surveys, last.surveys),
        ))
        self._synced_preparation = dataclasses.replace(now)
        self.preparation_active.set(1 if preparer.active else 0)
        if preparer.active:
            status = preparer.status
            for state, count in (("prepared", status.prepared), ("pending", status.pending),
                                 ("failed", status.failed), ("deferred", status.deferred)):
                self.preparation_archives.labels(state).set(count)
            self.preparation_progress.set(status.last_progress)

    def render(self) -> tuple[bytes, str]:
        self.flush()
        if self._multiproc_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
                registry, path=self._multiproc_dir)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _observe_tallied(histogram: Histogram, seconds: float, buckets: dict[int, int]) -> None:
    """What ``histogram.observe`` of each tallied duration would have done (their sum is
    ``seconds``, their count by bucket index ``buckets``), in one update per touched bucket.

    prometheus-client has no batch observe, so this adds to the child's sum and bucket
    values as ``observe`` does (``_sum``, ``_buckets``: internal names, stable since 0.4;
    tests/test_metrics.py holds the rendered result equal to ``observe``'s).
    """
    histogram._sum.inc(seconds)
    values = histogram._buckets
    for index, count in buckets.items():
        values[index].inc(count)


def _add_deltas(pairs: Iterable[tuple[Counter, float, float]]) -> None:
    """Advance each counter by what its source counted since the last sync."""
    for counter, current, previous in pairs:
        if current > previous:
            counter.inc(current - previous)
