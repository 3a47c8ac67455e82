"""CPU time and memory of a server's whole process tree, read from ``/proc``.

A multi-worker server (ours, nginx) is a parent and its children, so every figure sums the tree:
``utime + stime`` from ``/proc/<pid>/stat``, ``VmRSS`` from ``/proc/<pid>/status`` and ``Pss``
from ``/proc/<pid>/smaps_rollup``. RSS counts a page shared by forked workers (the interpreter,
libraries, copy-on-write memory) once per process, so a sum of RSS overstates a pre-forking
server; PSS divides each shared page among the processes that map it, so its sum is what the
tree really holds.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["RssSampler", "TreeSample", "process_tree", "sample_tree"]

_PROC: Final[Path] = Path("/proc")
_CLK_TCK: Final[int] = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class TreeSample:
    """One reading of a process tree."""

    pids: tuple[int, ...]
    cpu_seconds: float
    rss_bytes: int
    pss_bytes: int
    """0 where ``smaps_rollup`` cannot be read (kernels before 4.14, another user's process)."""


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> tuple[int, ...]:
    """``root`` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))  # fields[1] is ppid
    tree: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tuple(sorted(tree))


def _rss_bytes(pid: int) -> int:
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _pss_bytes(pid: int) -> int:
    try:
        for line in (_PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the command name, utime and stime are the 12th and 13th fields (stat fields 14, 15).
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def sample_tree(root: int, pids: tuple[int, ...] | None = None) -> TreeSample:
    """Sum CPU seconds, RSS and PSS over ``pids`` (default: the current tree of ``root``)."""
    tree = process_tree(root) if pids is None else pids
    return TreeSample(
        pids=tree,
        cpu_seconds=sum(_cpu_seconds(p) for p in tree),
        rss_bytes=sum(_rss_bytes(p) for p in tree),
        pss_bytes=sum(_pss_bytes(p) for p in tree),
    )


class RssSampler:
    """Background thread that records the peak tree RSS while a measurement runs."""

    def __init__(self, pids: tuple[int, ...], interval: float = 0.02) -> None:
        self._pids = pids
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.peak_bytes = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = sum(_rss_bytes(p) for p in self._pids)
            self.peak_bytes = max(self.peak_bytes, rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, sum(_rss_bytes(p) for p in self._pids))
