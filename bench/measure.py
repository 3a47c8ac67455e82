"""The measurements: blob throughput, server CPU and RSS, request rates, cold starts, gzip pulls.

Every function returns ``{metric key: [one value per repetition]}``; ``bench.report`` names the
keys, summarises them (min, median) and compares servers. Responses are checked (status, full
body) before they count, so an error page can never pass for a fast answer.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from bench.httpclient import fetch, fetch_concurrently
from bench.load import ab_available, run_ab_head, run_wrk, wrk_available
from bench.procstat import RssSampler, process_tree, sample_tree
from bench.servers import HOST, RunningServer

__all__ = [
    "MANIFEST_ACCEPT",
    "RATE_CASES",
    "Measured",
    "RateCase",
    "Target",
    "blob_concurrent",
    "blob_single",
    "cold_first_manifest",
    "gzip_inflate",
    "gzip_pulls",
    "gzip_prepared_pulls",
    "missing_tool",
    "request_rate",
    "warm_up",
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


def warm_up(target: Target) -> None:
    """One unmeasured blob GET (page cache, lazy server state) and checked small requests."""
    port = target.server.port
    got = fetch(HOST, port, target.blob_path)
    if got.body_bytes != target.blob_bytes:
        raise RuntimeError(
            f"{target.name}: blob has {got.body_bytes} bytes, not {target.blob_bytes}"
        )
    fetch(HOST, port, target.manifest_path, headers=_ACCEPT)
    fetch(HOST, port, target.tags_path)


def blob_single(target: Target) -> Measured:
    """One whole-blob GET on its own: GB/s."""
    got = fetch(HOST, target.server.port, target.blob_path)
    if got.body_bytes != target.blob_bytes:
        raise RuntimeError(f"{target.name}: {got.body_bytes} bytes, not {target.blob_bytes}")
    return {"blob_single_gbps": [got.gbps]}


def blob_concurrent(target: Target, streams: int) -> Measured:
    """``streams`` simultaneous blob GETs, with server CPU and RSS (process tree) around them."""
    pids = process_tree(target.server.pid)
    before = sample_tree(target.server.pid, pids)
    with RssSampler(pids) as sampler:
        batch = fetch_concurrently(
            HOST, target.server.port, target.blob_path, streams, expect_bytes=target.blob_bytes
        )
    after = sample_tree(target.server.pid, pids)
    return {
        "blob_concurrent_gbps": [batch.gbps],
        "cpu_s_per_gb": [(after.cpu_seconds - before.cpu_seconds) / (batch.total_bytes / 1e9)],
        "rss_before_mb": [before.rss_bytes / _MB],
        "rss_after_mb": [after.rss_bytes / _MB],
        "rss_peak_mb": [sampler.peak_bytes / _MB],
        "rss_growth_mb": [(sampler.peak_bytes - before.rss_bytes) / _MB],
        **({"pss_before_mb": [before.pss_bytes / _MB], "pss_after_mb": [after.pss_bytes / _MB]}
           if before.pss_bytes and after.pss_bytes else {}),
        "server_processes": [float(len(pids))],
    }


@dataclass(frozen=True, slots=True)
class RateCase:
    """One request-rate measurement: which endpoint, which method, which tool."""

    key: str
    method: str
    headers: tuple[tuple[str, str], ...]

    @property
    def tool(self) -> str:
        # Debian's wrk 4.1 cannot time HEAD (see bench.load); ab can.
        return "ab" if self.method == "HEAD" else "wrk"

    def path(self, target: Target) -> str:
        return target.tags_path if self.key == "tags_list_rps" else target.manifest_path


RATE_CASES: Final[tuple[RateCase, ...]] = (
    RateCase("manifest_get_rps", "GET", _ACCEPT),
    RateCase("manifest_head_rps", "HEAD", _ACCEPT),
    RateCase("tags_list_rps", "GET", ()),
)


def missing_tool(case: RateCase) -> str | None:
    """Why ``case`` cannot be measured here, or None."""
    if case.tool == "wrk" and wrk_available() is None:
        return f"{case.key}: skipped, wrk is not installed (apt-get install -y wrk)"
    if case.tool == "ab" and ab_available() is None:
        return (
            f"{case.key}: skipped, ab is not installed (apt-get install -y apache2-utils); "
            "Debian's wrk 4.1 cannot time HEAD requests"
        )
    return None


def request_rate(
    target: Target,
    case: RateCase,
    *,
    scratch: Path,
    seconds: int,
    threads: int,
    connections: int,
    notes: Notes,
) -> Measured:
    """One load-generator run; a run with more than 1% errors gives no figure, only a note.

    The endpoint is checked with one request first: a load generator would happily count
    404s per second.
    """
    path = case.path(target)
    check = fetch(HOST, target.server.port, path, method=case.method, headers=case.headers)
    if case.method == "HEAD" and "content-length" not in check.headers:
        notes.append(f"{target.name}: HEAD {path} has no Content-Length")
    url = target.server.url + path
    pids = process_tree(target.server.pid)
    before = sample_tree(target.server.pid, pids)
    if case.tool == "ab":
        result = run_ab_head(url, seconds=seconds, connections=connections, headers=case.headers)
    else:
        result = run_wrk(
            url,
            scratch=scratch,
            seconds=seconds,
            threads=threads,
            connections=connections,
            headers=case.headers,
        )
    if result.non_2xx or result.errors:
        notes.append(
            f"{target.name} {case.key}: {result.tool} saw {result.non_2xx} non-2xx responses "
            f"and {result.errors} errors in {result.requests} requests"
        )
    spent = sample_tree(target.server.pid, pids).cpu_seconds - before.cpu_seconds
    if result.non_2xx + result.errors > result.requests // 100:
        return {}
    # Server CPU per request: on a shared machine neighbours move the rate far more than
    # this, so it shows a cost (the access log's) when the rates are too noisy to.
    return {
        case.key: [result.requests_per_second],
        case.key.removesuffix("_rps") + "_cpu_us": [spent / max(result.requests, 1) * 1e6],
    }


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
        try:
            with start(cache) as server:
                _pull(server.port, name, tag, layer_digest, "gzip_first", out)
                _pull(server.port, name, tag, layer_digest, "gzip_second", out)
        finally:
            shutil.rmtree(cache, ignore_errors=True)  # a decompressed copy of the archive
    return out


_PREPARED: Final = re.compile(rb'^registry_preparation_archives\{state="prepared"\} (\S+)$', re.M)
_PENDING: Final = re.compile(rb'^registry_preparation_archives\{state="pending"\} (\S+)$', re.M)


def _prepared(port: int) -> bool:
    """Has the server's background preparation finished every archive it wants ready?"""
    body = fetch(HOST, port, "/metrics", keep_body=True).body
    prepared, pending = _PREPARED.search(body), _PENDING.search(body)
    return (prepared is not None and float(prepared.group(1)) >= 1
            and pending is not None and float(pending.group(1)) == 0)


def gzip_prepared_pulls(
    start: Callable[[Path], RunningServer],
    ref: str,
    layer_digest: str,
    cache_root: Path,
    reps: int,
    timeout: float = 600.0,
) -> Measured:
    """Fresh server and empty cache dir per rep: wait (polling /metrics) until its background
    preparation has the gzip archive ready, then time the first pull. The wait, from the
    server answering to the archive reported prepared, is the preparation time."""
    name, _, tag = ref.rpartition(":")
    out: Measured = {}
    for rep in range(reps):
        cache = cache_root / f"cache-{rep}-{time.monotonic_ns()}"
        cache.mkdir(parents=True)
        try:
            with start(cache) as server:
                started = time.perf_counter()
                deadline = started + timeout
                while not _prepared(server.port):
                    if time.perf_counter() > deadline:
                        raise TimeoutError("background preparation did not finish")
                    time.sleep(0.02)
                _append(out, "gzip_preparation_s", time.perf_counter() - started)
                _pull(server.port, name, tag, layer_digest, "gzip_prepared", out)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    return out


def served_manifest_digest(port: int, path: str) -> str:
    """sha256 of the manifest bytes a server sends for ``path`` (to check a seeded copy)."""
    got = fetch(HOST, port, path, headers=_ACCEPT, keep_body=True)
    return "sha256:" + hashlib.sha256(got.body).hexdigest()


def _inflate_rate(path: Path, open_stream: Callable[[IO[bytes]], IO[bytes]]) -> float:
    """Decompressed MB per second of this thread's CPU time (the machine is shared: wall
    time would measure the neighbours), reading 1 MiB at a time as the registry does."""
    total = 0
    with path.open("rb") as raw, open_stream(raw) as stream:
        started = time.thread_time()
        while chunk := stream.read(1 << 20):
            total += len(chunk)
        spent = time.thread_time() - started
    return total / _MB / max(spent, 1e-9)


def gzip_inflate(path: Path, reps: int, notes: Notes) -> Measured:
    """ISA-L (isal, what the registry uses where its wheel is installed) against zlib, on
    the same gzip archive of real files, repetitions interleaved."""
    out: Measured = {}

    def with_zlib(raw: IO[bytes]) -> IO[bytes]:
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]

    try:
        from isal import igzip
    except ImportError:
        notes.append("gzip_inflate: the isal wheel is not installed, zlib measured alone")
        igzip = None  # type: ignore[assignment]
    for _ in range(reps):
        _append(out, "gzip_inflate_zlib_mbps", _inflate_rate(path, with_zlib))
        if igzip is not None:
            _append(out, "gzip_inflate_isal_mbps", _inflate_rate(
                path, lambda raw: igzip.IGzipFile(fileobj=raw, mode="rb")))  # type: ignore[no-untyped-call]
    return out
