"""Pins: open descriptors that keep an archive's bytes readable after it is replaced or removed.

A pull straddles a publish: containerd resolves ``app:latest`` to a manifest digest, then
fetches that manifest and its blobs by digest, each perhaps on another connection that the
kernel hands to another worker process. If ``app/latest.oci`` is renamed over in between, the
old file's bytes are still on disk for whoever holds it open (rename(2), unlink(2)), but only
for them. So every archive is opened once per node, by the node's :class:`PinTable`, *before*
any of its content is served, and that descriptor is kept for ``grace`` seconds after the path
stops naming it. Workers receive duplicates of it (``SCM_RIGHTS`` over a Unix socket pair
from the supervisor, or directly when there is one process) and read through
``/proc/self/fd/N``, so any worker can still serve a superseded archive's digests, however it
learnt of them. Where the bytes are gone anyway (another NFS client removed the file: ESTALE),
reads fail and the answer is a clean 404.

Pins are bounded by a share of the open-files limit; past it, archives are opened by path as
before and simply get no grace.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from simple_oci_registry.fingerprint import Fingerprint
from simple_oci_registry.resolver import serves

__all__ = ["LocalPins", "PinClient", "PinTable", "Pinned", "Pins", "pin_budget", "serve_pins"]

log = logging.getLogger(__name__)

_MAX_MESSAGE: Final = 1 << 20
_MAX_FDS: Final = 200  # below SCM_MAX_FD (253) descriptors per message
_TIMEOUT: Final = 10.0
PROC_FD: Final = "/proc/self/fd"


@dataclass(frozen=True, slots=True)
class Pinned:
    """A duplicate of a node-wide pin, owned by the receiver (close ``fd`` when done)."""

    path: str
    fingerprint: Fingerprint
    fd: int


class Pins(Protocol):
    """What the store asks of the node's pin table (blocking calls: run them in a thread)."""

    def pin(self, path: str) -> Pinned | None:
        """Pin the file now at ``path``; None if it is not a regular file or cannot be pinned."""
        ...

    def superseded(self, name: str) -> list[Pinned]:
        """Pins still in their grace period whose path no longer names them, among the
        archives ``name`` can reach."""
        ...

    def gone(self, path: str, fingerprint: Fingerprint, at: float) -> None:
        """Tell the table that ``path`` no longer names this file (deleted, or renamed over)
        since ``at`` (CLOCK_MONOTONIC, the same in every process of the node): its pin's
        grace period starts then, however late the message arrives."""
        ...


def pin_budget() -> int:
    """How many archives may be pinned: a quarter of the open-files limit (each worker holds
    a duplicate of each pin, beside its connections and open blobs)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(0, soft // 4 - 256)


def pins_usable() -> bool:
    return os.path.isdir(PROC_FD)


@dataclass(slots=True)
class _Pin:
    path: str
    fingerprint: Fingerprint
    fd: int
    superseded_at: float | None = None


@dataclass
class PinTable:
    """The node's pins, by path (newest last). Thread-safe: the supervisor serves each worker
    from its own thread."""

    root: str
    grace: float
    budget: int = field(default_factory=pin_budget)
    clock: Callable[[], float] = time.monotonic
    _pins: dict[str, list[_Pin]] = field(default_factory=dict)
    _count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def pin(self, path: str) -> tuple[Fingerprint, int] | None:
        """Open ``path`` and pin it, or reuse the pin of the same file; returns a duplicate
        descriptor owned by the caller."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return None
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        fingerprint = Fingerprint.of(st)
        with self._lock:
            self._expire()
            held = self._pins.setdefault(path, [])
            for pin in held:
                if pin.fingerprint == fingerprint:
                    os.close(fd)
                    pin.superseded_at = None  # the path names it (again)
                    return fingerprint, os.dup(pin.fd)
            if self._count >= self.budget or self.grace <= 0:
                os.close(fd)
                if not held:
                    del self._pins[path]
                return None
            now = self.clock()
            for pin in held:
                if pin.superseded_at is None:
                    pin.superseded_at = now
            held.append(_Pin(path, fingerprint, fd))
            self._count += 1
            return fingerprint, os.dup(fd)

    def superseded(self, name: str) -> list[tuple[str, Fingerprint, int]]:
        """Pins of ``name``'s archives whose path names another file or nothing now.

        A pin nobody reported gone is checked here with a stat of its path: a worker that
        never held an archive learns of its deletion only by asking for one of its digests.
        """
        with self._lock:
            self._expire()
            mine = [p for path, held in self._pins.items() if serves(self.root, name, path)
                    for p in held]
        self._supersede_moved([p for p in mine if p.superseded_at is None])
        with self._lock:
            gone = [p for p in mine if p.superseded_at is not None and p.fd >= 0]
            gone.sort(key=lambda p: p.superseded_at or 0.0)
            # The most recently superseded first: those are what straddling pulls ask for.
            return [(p.path, p.fingerprint, os.dup(p.fd)) for p in gone[-_MAX_FDS:]]

    def gone(self, path: str, fingerprint: Fingerprint, at: float | None = None) -> None:
        with self._lock:
            now = self.clock() if at is None else min(at, self.clock())
            for pin in self._pins.get(path, ()):
                if pin.superseded_at is None and pin.fingerprint == fingerprint:
                    pin.superseded_at = now
            self._expire()

    def sweep(self) -> None:
        """Start the grace period of pins whose path names another file or nothing now (a
        deletion no worker asked about), and close expired ones."""
        with self._lock:
            current = [held[-1] for held in self._pins.values()
                       if held and held[-1].superseded_at is None]
        self._supersede_moved(current)
        with self._lock:
            self._expire()

    def _supersede_moved(self, pins: list[_Pin]) -> None:
        """Start the grace period of pins whose path no longer names their file (a stat per
        pin, outside the lock: NFS may be slow)."""
        for pin in pins:
            try:
                same = Fingerprint.of_path(pin.path) == pin.fingerprint
            except OSError:
                same = False
            if not same:
                with self._lock:
                    if pin.superseded_at is None:
                        pin.superseded_at = self.clock()

    def size(self) -> int:
        return self._count

    def close(self) -> None:
        with self._lock:
            for held in self._pins.values():
                for pin in held:
                    os.close(pin.fd)
            self._pins.clear()
            self._count = 0

    def _expire(self) -> None:
        now = self.clock()
        for path in list(self._pins):
            held = self._pins[path]
            keep = []
            for pin in held:
                if pin.superseded_at is not None and now - pin.superseded_at >= self.grace:
                    os.close(pin.fd)
                    pin.fd = -1  # closed: a caller's snapshot must not duplicate it
                    self._count -= 1
                else:
                    keep.append(pin)
            if keep:
                self._pins[path] = keep
            else:
                del self._pins[path]


class LocalPins:
    """The pin table of a single-process server, used directly."""

    def __init__(self, table: PinTable) -> None:
        self.table = table

    def pin(self, path: str) -> Pinned | None:
        got = self.table.pin(path)
        return None if got is None else Pinned(path, got[0], got[1])

    def superseded(self, name: str) -> list[Pinned]:
        return [Pinned(p, f, fd) for p, f, fd in self.table.superseded(name)]

    def gone(self, path: str, fingerprint: Fingerprint, at: float) -> None:
        self.table.gone(path, fingerprint, at)


def _encode_fp(fp: Fingerprint) -> list[int]:
    return [fp.device, fp.inode, fp.size, fp.mtime_ns, fp.ctime_ns, fp.links]


def _decode_fp(values: list[int]) -> Fingerprint:
    return Fingerprint(*values)


class PinClient:
    """A worker's end of its socket pair to the supervisor's :class:`PinTable`.

    Requests are rare (an archive seen for the first time, a digest not found), so one lock
    serialises them; each is one datagram each way (SOCK_SEQPACKET keeps message bounds).
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        # A supervisor that stopped answering must not hang a worker's threads for ever:
        # past the timeout the archive is opened by path (no grace), as without pins.
        self._sock.settimeout(_TIMEOUT)
        self._lock = threading.Lock()
        self._broken = False

    def _call(self, request: dict[str, object]) -> tuple[dict[str, object], list[int]]:
        with self._lock:
            if self._broken:
                raise ConnectionError("the pin table stopped answering earlier")
            try:
                self._sock.sendall(json.dumps(request).encode())
                data, fds, _flags, _addr = socket.recv_fds(self._sock, _MAX_MESSAGE,
                                                           _MAX_FDS + 1)
            except TimeoutError:
                # A late answer would be read as the next request's: stop using the socket.
                self._broken = True
                raise
        if not data:
            for fd in fds:
                os.close(fd)
            raise ConnectionError("the supervisor's pin table closed its socket")
        reply: dict[str, object] = json.loads(data)
        return reply, fds

    def pin(self, path: str) -> Pinned | None:
        try:
            reply, fds = self._call({"op": "pin", "path": path})
        except (OSError, ValueError) as exc:
            log.warning("pin table unavailable (%s): %s opened without a pin", exc, path)
            return None
        values = reply.get("fp")
        if not isinstance(values, list) or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return None
        return Pinned(path, _decode_fp(values), fds[0])

    def superseded(self, name: str) -> list[Pinned]:
        try:
            reply, fds = self._call({"op": "superseded", "name": name})
        except (OSError, ValueError) as exc:
            log.warning("pin table unavailable: %s", exc)
            return []
        items = reply.get("pins")
        pinned: list[Pinned] = []
        if isinstance(items, list) and len(items) == len(fds):
            for (path, values), fd in zip(items, fds, strict=True):
                pinned.append(Pinned(path, _decode_fp(values), fd))
        else:
            for fd in fds:
                os.close(fd)
        return pinned

    def gone(self, path: str, fingerprint: Fingerprint, at: float) -> None:
        try:
            self._call({"op": "gone", "path": path, "fp": _encode_fp(fingerprint), "at": at})
        except (OSError, ValueError) as exc:
            log.warning("pin table unavailable: %s", exc)


def serve_pins(table: PinTable, sock: socket.socket) -> None:
    """Answer one worker's requests until it closes its end (run in a supervisor thread)."""
    with sock:
        while True:
            try:
                data = sock.recv(_MAX_MESSAGE)
            except OSError:
                return
            if not data:
                return
            fds: list[int] = []
            try:
                request = json.loads(data)
                op = request.get("op")
                reply: dict[str, object] = {}
                if op == "pin":
                    got = table.pin(str(request["path"]))
                    if got is not None:
                        reply["fp"] = _encode_fp(got[0])
                        fds = [got[1]]
                elif op == "superseded":
                    found = table.superseded(str(request["name"]))
                    reply["pins"] = [[path, _encode_fp(fp)] for path, fp, _ in found]
                    fds = [fd for _, _, fd in found]
                elif op == "gone":
                    table.gone(str(request["path"]), _decode_fp(request["fp"]),
                               float(request["at"]))
                socket.send_fds(sock, [json.dumps(reply).encode()], fds)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):  # out of descriptors: no pin
                    log.error("pin table: %s", exc)
                    with contextlib.suppress(OSError):
                        sock.sendall(b"{}")
                    continue
                return  # the worker is gone
            except Exception:  # keep serving this worker whatever one request hit
                log.exception("pin table: cannot answer %r", data[:200])
                with contextlib.suppress(OSError):
                    sock.sendall(b"{}")
            finally:
                for fd in fds:
                    os.close(fd)
