"""The FUSE process behind ``bench.latencyfs``: a read-only passthrough that sleeps and counts.

Run as ``python -m bench.fusepassthrough SOURCE MOUNTPOINT --control SOCKET [options]`` by
``bench.latencyfs.mount``, never imported by the process that uses the mount: a filesystem
served by the same Python process that reads it can deadlock, and libfuse takes over signals.

Every operation is counted by name. Metadata operations (the ones an NFS client without attribute
caching sends to the server as a round trip: getattr, which libfuse's high-level API also uses
to answer the kernel's LOOKUP, opendir, readdir, open, statfs, readlink, access and the xattr
queries) first sleep for the configured latency; data reads and closes do not, so bytes flow
at local speed and only the metadata path is slowed down. The counters are read and reset over
a Unix socket (one JSON line per request), see ``bench.latencyfs``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import socketserver
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import mfusepy

__all__ = ["main"]

_STAT_FIELDS: Final[tuple[str, ...]] = (
    "st_mode",
    "st_ino",
    "st_dev",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_size",
    "st_blocks",
    "st_blksize",
    "st_rdev",
)
_WRITE_FLAGS: Final[int] = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class _Meter:
    """Operation counters and the injected latency, shared by libfuse's threads and the
    control socket's."""

    def __init__(self, latency: float) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._in_flight = 0
        self._peak = 0  # most metadata operations waiting at once since the last reset
        self.latency = latency

    def count(self, op: str) -> None:
        with self._lock:
            self._counts[op] += 1

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Around a metadata operation's latency: tracks how many overlap (a client that
        issues its stats side by side pays one round trip for them, not one each)."""
        with self._lock:
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def snapshot(self, reset: bool) -> tuple[dict[str, int], int]:
        with self._lock:
            counts, peak = dict(self._counts), self._peak
            if reset:
                self._counts.clear()
                self._peak = self._in_flight
        return counts, peak


def _type_bits(entry: os.DirEntry[str]) -> int:
    """The file type of a directory entry from ``d_type``, without a stat call."""
    if entry.is_symlink():
        return stat.S_IFLNK
    if entry.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    return stat.S_IFREG


def _metadata(method: Callable[..., Any]) -> Callable[..., Any]:
    """Count the operation, then wait the latency a remote server's round trip would add."""
    op = method.__name__

    def wrapped(self: _Passthrough, *args: Any) -> Any:
        self.meter.count(op)
        with self.meter.waiting():
            if self.meter.latency > 0:
                time.sleep(self.meter.latency)
            return method(self, *args)

    wrapped.__name__ = op
    wrapped.__doc__ = method.__doc__
    return wrapped


def _counted(method: Callable[..., Any]) -> Callable[..., Any]:
    """Count the operation; no latency (data reads and closes)."""
    op = method.__name__

    def wrapped(self: _Passthrough, *args: Any) -> Any:
        self.meter.count(op)
        return method(self, *args)

    wrapped.__name__ = op
    wrapped.__doc__ = method.__doc__
    return wrapped


class _Passthrough(mfusepy.Operations):  # type: ignore[misc]
    """Mirror ``source`` read-only. Paths from libfuse are absolute within the mount."""

    use_ns = True  # mfusepy: timestamps in integer nanoseconds, so mtimes pass through exactly

    def __init__(self, source: Path, meter: _Meter) -> None:
        self.source = source
        self.meter = meter

    def _real(self, path: str) -> str:
        return str(self.source) + path

    @_metadata
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        # On a handle: the open file's attributes, also after its name was renamed over (as an
        # NFS client asks by file handle, not by name).
        st = os.fstat(fh) if fh is not None else os.lstat(self._real(path))
        attrs: dict[str, Any] = {name: getattr(st, name) for name in _STAT_FIELDS}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    @_metadata
    def access(self, path: str, amode: int) -> int:
        if amode & os.W_OK:
            raise mfusepy.FuseOSError(errno.EROFS)
        if not os.access(self._real(path), amode):
            raise mfusepy.FuseOSError(errno.EACCES)
        return 0

    @_metadata
    def opendir(self, path: str) -> int:
        # A real descriptor, so that getattr on the handle is an fstat like for files.
        return os.open(self._real(path), os.O_RDONLY | os.O_DIRECTORY)

    @_metadata
    def readdir(self, path: str, fh: int) -> Iterator[tuple[str, dict[str, int], int]]:
        # One call returns the whole listing; libfuse keeps it and answers the kernel's later
        # READDIR requests for this handle from that buffer, so a listing costs one latency.
        # Each entry carries its inode number: with use_ino, an entry without one has inode 0,
        # which readdir(3) skips.
        real = self._real(path)
        here = os.stat(real)
        yield ".", {"st_ino": here.st_ino, "st_mode": stat.S_IFDIR}, 0
        yield "..", {"st_ino": here.st_ino, "st_mode": stat.S_IFDIR}, 0
        with os.scandir(real) as entries:
            for entry in entries:
                yield entry.name, {"st_ino": entry.inode(), "st_mode": _type_bits(entry)}, 0

    @_counted
    def releasedir(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    @_metadata
    def open(self, path: str, flags: int) -> int:
        if flags & _WRITE_FLAGS:
            raise mfusepy.FuseOSError(errno.EROFS)
        return os.open(self._real(path), os.O_RDONLY)

    @_counted
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    @_counted
    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    @_metadata
    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._real(path))
        names = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree")
        return {name: getattr(st, name) for name in (*names, "f_favail", "f_namemax")}

    @_metadata
    def readlink(self, path: str) -> str:
        return os.readlink(self._real(path))

    @_metadata
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        raise mfusepy.FuseOSError(errno.ENODATA)

    @_metadata
    def listxattr(self, path: str) -> list[str]:
        return []


class _ControlHandler(socketserver.StreamRequestHandler):
    """One request per line: ``stats``, ``take`` (stats, then reset), ``latency SECONDS``."""

    server: _ControlServer

    def handle(self) -> None:
        for raw in self.rfile:
            words = raw.decode("utf-8", "replace").split()
            meter = self.server.meter
            reply: dict[str, Any]
            if words == ["stats"] or words == ["take"]:
                ops, peak = meter.snapshot(reset=words[0] == "take")
                reply = {"ops": ops, "peak": peak, "latency": meter.latency}
            elif len(words) == 2 and words[0] == "latency":
                try:
                    meter.latency = max(0.0, float(words[1]))
                    reply = {"latency": meter.latency}
                except ValueError:
                    reply = {"error": f"not a number of seconds: {words[1]!r}"}
            else:
                reply = {"error": f"unknown request {raw!r}; expected stats, take or latency S"}
            self.wfile.write(json.dumps(reply).encode() + b"\n")
            self.wfile.flush()


class _ControlServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, meter: _Meter) -> None:
        self.meter = meter
        super().__init__(path, _ControlHandler)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fusepassthrough")
    parser.add_argument("source", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--control", required=True, help="Unix socket for the counters")
    parser.add_argument("--latency", type=float, default=0.001, help="seconds per metadata op")
    for name in ("attr", "entry", "negative"):
        parser.add_argument(f"--{name}-timeout", type=float, default=0.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    meter = _Meter(args.latency)
    control = _ControlServer(args.control, meter)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    try:
        mfusepy.FUSE(
            _Passthrough(args.source.resolve(), meter),
            str(args.mountpoint),
            foreground=True,
            ro=True,
            fsname="latencyfs",
            subtype="latencyfs",
            # The kernel caches per these options; 0 sends every lookup and stat to us (NFS
            # noac), 1 lets it answer from its cache for a second (NFS actimeo=1).
            attr_timeout=args.attr_timeout,
            entry_timeout=args.entry_timeout,
            negative_timeout=args.negative_timeout,
            # Inode numbers of the source, as NFS reports the server's: a file replaced by
            # rename gets a new one, which stat fingerprints rely on.
            use_ino=True,
            # Unmounted by fusermount3 if this process dies without doing it.
            auto_unmount=True,
        )
    finally:
        control.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
