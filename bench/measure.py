"""The measurements: blob throughput, server CPU and RSS, request rates, cold starts, gzip pulls.

Every function returns ``{metric key: [one value per repetition]}``; ``bench.report`` names the
keys, summarises them (min, median) and compares servers. Responses are checked (status, full
body) before they count, so an error page can never pass for a fast answer.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.httpclient import fetch, fetch_concurrently
from bench.load import LoadResult, ab_available, run_ab_head, run_wrk, wrk_available
from bench.procstat import RssSampler, process_tree, sample_tree
from bench.servers import HOST, RunningServer

__all__ = [
    "MANIFEST_ACCEPT",
    "Measured",
    "Target",
    "blob_concurrent",
    "blob_single",
    "cold_first_manifest",
    "gzip_pulls",
    "request_rates",
    "served_manifest_digest",
]

MANIFEST_ACCEPT: Final[str] = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)
_ACCEPT: Final[tuple[tuple[str, str], ...]] = (("Accept", MANIFEST_ACCEPT),)
_MB: Final[float] = 1e6

Measured = dict[str, list[float]]
Notes = list[str]


@dataclass(frozen=True, slots=True)
class Target:
    """Where one server serves the benchmark image."""

    server: RunningServer
    manifest_path: str
    blob_path: str
    tags_path: str
    blob_bytes: int

    @property
    def name(self) -> str:
        return self.server.name


def _append(into: Measured, key: str, value: float) -> None:
    into.setdefault(key, []).append(value)


def blob_single(target: Target, reps: int) -> Measured:
    """One stream at a time: GB/s of ``reps`` whole-blob GETs, after one unmeasured warm-up."""
    port = target.server.port
    buffer = bytearray(1024 * 1024)
    fetch(HOST, port, target.blob_path, buffer=buffer)  # warms the page cache
    out: Measured = {}
    for _ in range(reps):
        got = fetch(HOST, port, target.blob_path, buffer=buffer)
        if got.body_bytes != target.blob_bytes:
            raise RuntimeError(f"{target.name}: {got.body_bytes} bytes, not {target.blob_bytes}")
        _append(out, "blob_single_gbps", got.gbps)
    return out


def blob_concurrent(target: Target, reps: int, streams: int) -> Measured:
    """``streams`` simultaneous GETs of the blob, with server CPU and RSS around each batch."""
    port = target.server.port
    out: Measured = {}
    for _ in range(reps):
        pids = process_tree(target.server.pid)
        before = sample_tree(target.server.pid, pids)
        with RssSampler(pids) as sampler:
            batch = fetch_concurrently(
                HOST, port, target.blob_path, streams, expect_bytes=target.blob_bytes
            )
        after = sample_tree(target.server.pid, pids)
        _append(out, "blob_concurrent_gbps", batch.gbps)
        gigabytes = batch.total_bytes / 1e9
        _append(out, "cpu_s_per_gb", (after.cpu_seconds - before.cpu_seconds) / gigabytes)
        _append(out, "rss_before_mb", before.rss_bytes / _MB)
        _append(out, "rss_after_mb", after.rss_bytes / _MB)
        _append(out, "rss_peak_mb", sampler.peak_bytes / _MB)
        _append(out, "rss_growth_mb", (sampler.peak_bytes - before.rss_bytes) / _MB)
    out["server_processes"] = [float(len(process_tree(target.server.pid)))]
    return out


def request_rates(
    target: Target,
    *,
    scratch: Path,
    reps: int,
    seconds: int,
    threads: int,
    connections: int,
    notes: Notes,
) -> Measured:
    """Request rates for manifest GET by tag and tag list (wrk), manifest HEAD by tag (ab).

    A tool that is not installed skips its rows with a note. Each endpoint is first checked
    with one request: a load generator would happily count 404s per second.
    """
    port = target.server.port
    url = target.server.url
    out: Measured = {}

    def record(key: str, result: LoadResult) -> None:
        if result.non_2xx or result.errors:
            notes.append(
                f"{target.name} {key}: {result.tool} saw {result.non_2xx} non-2xx responses and "
                f"{result.errors} errors in {result.requests} requests"
            )
        if result.non_2xx + result.errors <= result.requests // 100:  # else: not a figure
            _append(out, key, result.requests_per_second)

    wrk_cases = (
        ("manifest_get_rps", target.manifest_path, _ACCEPT),
        ("tags_list_rps", target.tags_path, ()),
    )
    for key, path, headers in wrk_cases:
        if wrk_available() is None:
            notes.append(f"{key}: skipped, wrk is not installed (apt-get install -y wrk)")
            break
        fetch(HOST, port, path, headers=headers)
        for _ in range(reps):
            record(
                key,
                run_wrk(
                    url + path,
                    scratch=scratch,
                    seconds=seconds,
                    threads=threads,
                    connections=connections,
                    headers=headers,
                ),
            )
    if ab_available() is None:
        notes.append(
            "manifest_head_rps: skipped, ab is not installed (apt-get install -y "
            "apache2-utils); Debian's wrk 4.1 cannot time HEAD requests"
        )
        return out
    head = fetch(HOST, port, target.manifest_path, method="HEAD", headers=_ACCEPT)
    if "content-length" not in head.headers:
        notes.append(f"{target.name}: HEAD {target.manifest_path} has no Content-Length")
    for _ in range(reps):
        record(
            "manifest_head_rps",
            run_ab_head(
                url + target.manifest_path,
                seconds=seconds,
                connections=connections,
                headers=_ACCEPT,
            ),
        )
    return out


def cold_first_manifest(
    start: Callable[[Path], RunningServer],
    directories: Sequence[tuple[int, Path, str]],
    reps: int,
) -> Measured:
    """Fresh server per directory and repetition; time its first manifest GET, then a second.

    ``directories`` holds (archive count, directory, ``name:tag`` to ask for). The first
    request's time counts from the connect to the last body byte, on a new connection.
    """
    out: Measured = {}
    for count, directory, ref in directories:
        name, _, tag = ref.rpartition(":")
        path = f"/v2/{name}/manifests/{tag}"
        for _ in range(reps):
            with start(directory) as server:
                first = fetch(HOST, server.port, path, headers=_ACCEPT)
                second = fetch(HOST, server.port, path, headers=_ACCEPT)
            _append(out, f"cold_manifest_ms_{count}", first.elapsed * 1000)
            _append(out, f"warm_manifest_ms_{count}", second.elapsed * 1000)
    return out


def _pull(port: int, name: str, tag: str, layer_digest: str, prefix: str, into: Measured) -> None:
    """Manifest by tag, config blob, layer blob: what a client does, timed from the start."""
    started = time.perf_counter()
    manifest = fetch(HOST, port, f"/v2/{name}/manifests/{tag}", headers=_ACCEPT, keep_body=True)
    document = json.loads(manifest.body)
    fetch(HOST, port, f"/v2/{name}/blobs/{document['config']['digest']}")
    layer = fetch(HOST, port, f"/v2/{name}/blobs/{layer_digest}")
    _append(into, f"{prefix}_manifest_ms", manifest.elapsed * 1000)
    _append(into, f"{prefix}_ttfb_ms", (layer.first_byte - started) * 1000)
    _append(into, f"{prefix}_gbps", layer.gbps)
    _append(into, f"{prefix}_pull_s", layer.finished - started)


def gzip_pulls(
    start: Callable[[Path], RunningServer],
    ref: str,
    layer_digest: str,
    cache_root: Path,
    reps: int,
) -> Measured:
    """First pull from a gzip archive with an empty cache dir, then a second pull, per rep."""
    name, _, tag = ref.rpartition(":")
    out: Measured = {}
    for rep in range(reps):
        cache = cache_root / f"cache-{rep}-{time.monotonic_ns()}"
        cache.mkdir(parents=True)
        with start(cache) as server:
            _pull(server.port, name, tag, layer_digest, "gzip_first", out)
            _pull(server.port, name, tag, layer_digest, "gzip_second", out)
    return out


def served_manifest_digest(port: int, path: str) -> str:
    """sha256 of the manifest bytes a server sends for ``path`` (to check a seeded copy)."""
    got = fetch(HOST, port, path, headers=_ACCEPT, keep_body=True)
    return "sha256:" + hashlib.sha256(got.body).hexdigest()
