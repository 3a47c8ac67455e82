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
