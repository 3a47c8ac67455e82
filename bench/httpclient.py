"""A minimal HTTP/1.1 client that discards bodies cheaply, for throughput and latency figures.

Bodies are read with ``recv_into`` into one reused buffer, so the client copies each byte once (the
kernel's copy) and never allocates per chunk. Every request opens its own connection, as a pulling
client's blob download would, and checks that the whole announced body arrived.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = ["Concurrent", "Fetch", "HttpError", "fetch", "fetch_concurrently"]

_BUFSIZE: Final[int] = 1024 * 1024
_HEAD_LIMIT: Final[int] = 64 * 1024


class HttpError(Exception):
    """The server answered badly: wrong status, truncated body, closed connection."""


@dataclass(frozen=True, slots=True)
class Fetch:
    """Timings of one request, all from ``time.perf_counter()``."""

    status: int
    body_bytes: int
    started: float
    first_byte: float
    finished: float
    headers: Mapping[str, str]
    body: bytes
    """The body itself, only when the caller asked to keep it (small documents)."""

    @property
    def ttfb(self) -> float:
        return self.first_byte - self.started

    @property
    def elapsed(self) -> float:
        return self.finished - self.started

    @property
    def gbps(self) -> float:
        """Body gigabytes (10**9 bytes) per second over the whole request."""
        return self.body_bytes / self.elapsed / 1e9 if self.elapsed > 0 else 0.0


def _parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError) as exc:
        raise HttpError(f"bad status line {lines[0]!r}") from exc
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, headers


def fetch(
    host: str,
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: Sequence[tuple[str, str]] = (),
    keep_body: bool = False,
    expect: int | None = 200,
    buffer: bytearray | None = None,
    timeout: float = 120.0,
) -> Fetch:
    """Send one request on a fresh connection and read the response to its end."""
    buf = buffer if buffer is not None else bytearray(_BUFSIZE)
    view = memoryview(buf)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        received = b""
        first_byte = 0.0
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not first_byte:
                first_byte = time.perf_counter()
            if not chunk:
                raise HttpError(f"{method} {path}: connection closed before the headers ended")
            received += chunk
            if len(received) > _HEAD_LIMIT:
                raise HttpError(f"{method} {path}: response headers too long")
        head, _, rest = received.partition(b"\r\n\r\n")
        status, response_headers = _parse_head(head)
        if expect is not None and status != expect:
            raise HttpError(f"{method} {path}: status {status}, expected {expect}")
        kept = bytearray(rest) if keep_body else bytearray()
        body_bytes = len(rest)
        if method == "HEAD" or status in (204, 304):
            remaining = 0
        elif "content-length" in response_headers:
            remaining = int(response_headers["content-length"]) - len(rest)
        else:  # Connection: close delimits the body (we asked for it; chunked is not expected).
            remaining = -1
        while remaining != 0:
            want = len(buf) if remaining < 0 else min(len(buf), remaining)
            n = sock.recv_into(view, want)
            if n == 0:
                if remaining < 0:
                    break
                raise HttpError(f"{method} {path}: body truncated, {remaining} bytes missing")
            body_bytes += n
            if keep_body:
                kept += view[:n]
            if remaining > 0:
                remaining -= n
        finished = time.perf_counter()
    return Fetch(
        status=status,
        body_bytes=body_bytes,
        started=started,
        first_byte=first_byte,
        finished=finished,
        headers=response_headers,
        body=bytes(kept),
    )


@dataclass(frozen=True, slots=True)
class Concurrent:
    """Outcome of N simultaneous fetches."""

    fetches: tuple[Fetch, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.body_bytes for f in self.fetches)

    @property
    def wall(self) -> float:
        return max(f.finished for f in self.fetches) - min(f.started for f in self.fetches)

    @property
    def gbps(self) -> float:
        return self.total_bytes / self.wall / 1e9 if self.wall > 0 else 0.0


def fetch_concurrently(
    host: str,
    port: int,
    path: str,
    count: int,
    *,
    headers: Sequence[tuple[str, str]] = (),
    expect_bytes: int | None = None,
) -> Concurrent:
    """Start ``count`` fetches of ``path`` at once (one thread each) and wait for all of them.

    Threads suit this: ``recv_into`` releases the GIL, and each thread owns its buffer.
    """
    barrier = threading.Barrier(count)
    results: list[Fetch | BaseException] = [HttpError("not run")] * count

    def worker(index: int) -> None:
        buffer = bytearray(_BUFSIZE)
        barrier.wait()
        try:
            results[index] = fetch(host, port, path, headers=headers, buffer=buffer)
        except BaseException as exc:  # reported below, in the calling thread
            results[index] = exc

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    fetches: list[Fetch] = []
    for result in results:
        if isinstance(result, BaseException):
            raise HttpError(f"one of {count} concurrent fetches failed: {result}") from result
        if expect_bytes is not None and result.body_bytes != expect_bytes:
            raise HttpError(f"got {result.body_bytes} bytes, expected {expect_bytes}")
        fetches.append(result)
    return Concurrent(tuple(fetches))
