"""Stat fingerprints: how the registry notices that a file changed.

inotify sees nothing that other NFS clients do, so change detection polls ``stat``. Comparing a
full fingerprint for *inequality* (rather than ``mtime >``) also catches an archive replaced by an
older-dated copy (``cp -p``, ``rsync -t``). The inode change time is part of it because no tool
can set it back: an in-place rewrite of the same size whose mtime was restored with ``touch -r``
still changes ctime (POSIX: write and utime both update st_ctime).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass
from typing import Final

__all__ = ["Fingerprint", "fresh_stat"]


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """(device, inode, size, mtime and ctime in ns, link count) of one file, from ``stat``."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int = 0
    links: int = 1

    @classmethod
    def of(cls, st: os.stat_result) -> Fingerprint:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                   st.st_nlink)

    def same_bytes(self, now: Fingerprint) -> bool:
        """For an open descriptor: does the inode still hold the bytes it held before?

        Unlinking the file — a rename over its path (the safe way to publish), a deletion, a
        cache eviction — changes its ctime and drops its link count, but the open inode's
        bytes stay intact, so a transfer in flight from it may finish. Any other ctime change
        (a write whose mtime was restored) means the bytes may differ.
        """
        if (self.device, self.inode, self.size, self.mtime_ns) != (
                now.device, now.inode, now.size, now.mtime_ns):
            return False
        return now.ctime_ns == self.ctime_ns or now.links < self.links

    @classmethod
    def of_path(cls, path: str) -> Fingerprint:
        return cls.of(os.stat(path))

    @classmethod
    def of_fd(cls, fd: int) -> Fingerprint:
        return cls.of(os.fstat(fd))


# statx(2): AT_STATX_FORCE_SYNC makes a network filesystem fetch the attributes from the server
# (NFS: a GETATTR; FUSE: a getattr request) instead of answering from its attribute cache.
_AT_FDCWD: Final = -100
_AT_STATX_FORCE_SYNC: Final = 0x2000
_STATX_BASIC_STATS: Final = 0x7FF
_STATX_SIZE: Final = 256
_HEAD: Final = struct.Struct("<IIQIIIH")  # mask, blksize, attributes, nlink, uid, gid, mode
_IDS: Final = struct.Struct("<QQ")  # at offset 32: ino, size
_TIME: Final = struct.Struct("<qI")  # statx_timestamp: seconds, nanoseconds
_DEV: Final = struct.Struct("<II")  # at offset 136: dev major, minor


class _Statx:
    """glibc's statx wrapper through ctypes (os.statx arrives only in Python 3.14)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._call = getattr(libc, "statx", None)

    def fresh(self, path: str) -> tuple[Fingerprint, int] | None:
        """(fingerprint, st_mode) revalidated with the server, or None where statx is not
        available (then the caller falls back to a plain stat)."""
        if self._call is None:
            return None
        buffer = ctypes.create_string_buffer(_STATX_SIZE)
        if self._call(_AT_FDCWD, os.fsencode(path), _AT_STATX_FORCE_SYNC, _STATX_BASIC_STATS,
                      buffer) != 0:
            error = ctypes.get_errno()
            if error == errno.ENOSYS:
                return None
            raise OSError(error, os.strerror(error), path)
        raw = buffer.raw
        _, _, _, nlink, _, _, mode = _HEAD.unpack_from(raw, 0)
        inode, size = _IDS.unpack_from(raw, 32)
        ctime_s, ctime_ns = _TIME.unpack_from(raw, 64 + 16 * 2)
        mtime_s, mtime_ns = _TIME.unpack_from(raw, 64 + 16 * 3)
        major, minor = _DEV.unpack_from(raw, 136)
        return Fingerprint(os.makedev(major, minor), inode, size,
                           mtime_s * 10**9 + mtime_ns, ctime_s * 10**9 + ctime_ns,
                           nlink), mode


_STATX: Final = _Statx()


def fresh_stat(path: str) -> tuple[Fingerprint, int]:
    """Fingerprint and mode of ``path`` as the file server sees it now, bypassing the NFS
    attribute cache (``statx`` with ``AT_STATX_FORCE_SYNC``; a plain ``stat`` where the call
    is missing). Raises OSError like ``os.stat``."""
    got = _STATX.fresh(path)
    if got is not None:
        return got
    st = os.stat(path)
    return Fingerprint.of(st), st.st_mode
