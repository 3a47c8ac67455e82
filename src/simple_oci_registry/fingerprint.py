"""Stat fingerprints: how the registry notices that a file changed.

inotify sees nothing that other NFS clients do, so change detection polls ``stat``. Comparing a
full fingerprint for *inequality* (rather than ``mtime >``) also catches an archive replaced by an
older-dated copy (``cp -p``, ``rsync -t``). The inode change time is part of it because no tool
can set it back: an in-place rewrite of the same size whose mtime was restored with ``touch -r``
still changes ctime (POSIX: write and utime both update st_ctime).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Fingerprint"]


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """(device, inode, size, mtime and ctime in ns) of one file as seen by ``stat``."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int = 0

    @classmethod
    def of(cls, st: os.stat_result) -> Fingerprint:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @classmethod
    def of_path(cls, path: str) -> Fingerprint:
        return cls.of(os.stat(path))

    @classmethod
    def of_fd(cls, fd: int) -> Fingerprint:
        return cls.of(os.fstat(fd))
