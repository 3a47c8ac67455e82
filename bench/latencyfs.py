"""Mount a directory through a slow, counting FUSE passthrough: a stand-in for NFS on one machine.

``mount(source, mountpoint, latency=0.001, attr_timeout=0, entry_timeout=0)`` mounts ``source``
read-only at ``mountpoint`` through ``bench.fusepassthrough`` (mfusepy over libfuse3, in its
own process) and yields a ``LatencyFS``: ``counts()`` tells how many filesystem operations of
each kind reached the filesystem, ``take()`` does the same and starts from zero. Every
metadata operation waits ``latency`` seconds first, as a round trip to a file server would.
The kernel's caching follows the timeouts: 0 models NFS ``noac`` (every lookup and stat is a
round trip), 1 models ``actimeo=1``. Changes are made in ``source`` (as another machine would
publish on NFS) and seen through the mount.

Used by the benchmark (``bench.fsscenarios``) and the tests (``tests/test_latencyfs.py``).
``unavailable()`` says why FUSE cannot be used here; a mount that the kernel refuses raises
``FuseUnavailable`` with the reason, so callers can skip rather than fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "METADATA_OPS",
    "FuseUnavailable",
    "LatencyFS",
    "LatencyFSError",
    "Options",
    "mount",
    "total",
    "unavailable",
]

_REPO: Final[Path] = Path(__file__).resolve().parent.parent
_MOUNT_TIMEOUT: Final[float] = 20.0
METADATA_OPS: Final[frozenset[str]] = frozenset(
    {
        "getattr",
        "access",
        "opendir",
        "readdir",
        "open",
        "statfs",
        "readlink",
        "getxattr",
        "listxattr",
    }
)
"""Operations that pay the latency; ``read``, ``release`` and ``releasedir`` do not."""
_REFUSED: Final[tuple[str, ...]] = (
    "Operation not permitted",
    "Permission denied",
    "fuse: device not found",
    "No such device",
)
"""fusermount3 messages that mean this machine cannot mount FUSE, not that the harness is
broken (a container without CAP_SYS_ADMIN, no fuse module)."""


class LatencyFSError(RuntimeError):
    """The passthrough failed: it did not mount, or its control socket did not answer."""


class FuseUnavailable(LatencyFSError):
    """FUSE cannot be used on this machine; the message says why (a reason to skip)."""


@dataclass(frozen=True, slots=True)
class Options:
    """How slow the filesystem is and how long the kernel may cache what it says."""

    latency: float = 0.001
    """Seconds added to every metadata operation."""
    attr_timeout: float = 0.0
    """Seconds the kernel keeps a file's attributes (0: NFS ``noac``)."""
    entry_timeout: float = 0.0
    """Seconds the kernel keeps a name-to-inode lookup."""
    negative_timeout: float = 0.0
    """Seconds the kernel remembers that a name does not exist."""

    @classmethod
    def cached(cls, seconds: float, latency: float = 0.001) -> Options:
        """Attribute, entry and negative caching of ``seconds``, like NFS ``actimeo``."""
        return cls(latency, seconds, seconds, seconds)


def _python_has_mfusepy() -> str | None:
    done = subprocess.run(
        [sys.executable, "-c", "import mfusepy"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode == 0:
        return None
    last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
    return f"`import mfusepy` fails ({last}): pip install mfusepy, apt-get install libfuse3-3"


def unavailable() -> str | None:
    """Why a FUSE mount cannot be attempted here, or None when everything it needs is present."""
    if not sys.platform.startswith("linux"):
        return f"FUSE passthrough needs Linux, not {sys.platform}"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install -y fuse3)"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        return f"/dev/fuse is not usable: {exc.strerror}"
    os.close(fd)
    return _python_has_mfusepy()


class LatencyFS:
    """A mounted passthrough: where it is, and its operation counters."""

    def __init__(self, mountpoint: Path, control: Path, options: Options) -> None:
        self.mountpoint = mountpoint
        self.options = options
        self._control = control
        self.peak = 0
        """Most metadata operations in flight at once, over the period the last ``counts()``
        or ``take()`` reported on."""

    def _ask(self, request: str) -> dict[str, object]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10.0)
            try:
                sock.connect(str(self._control))
                sock.sendall(request.encode() + b"\n")
                reply = sock.makefile("rb").readline()
            except OSError as exc:
                raise LatencyFSError(f"control socket {self._control}: {exc}") from exc
        answer = json.loads(reply) if reply else {"error": "no answer"}
        if "error" in answer:
            raise LatencyFSError(str(answer["error"]))
        return dict(answer)

    def _ops(self, answer: Mapping[str, object]) -> dict[str, int]:
        ops, peak = answer.get("ops"), answer.get("peak")
        if not isinstance(ops, dict) or not isinstance(peak, int):
            raise LatencyFSError(f"unexpected answer {answer!r}")
        self.peak = peak
        return {str(k): int(v) for k, v in ops.items()}

    def counts(self) -> dict[str, int]:
        """Operations served since the mount or the last ``take()``, by kind."""
        return self._ops(self._ask("stats"))

    def take(self) -> dict[str, int]:
        """The counts, then zero them (one atomic step in the filesystem process)."""
        return self._ops(self._ask("take"))

    def set_latency(self, seconds: float) -> None:
        """Change the injected latency while mounted (0 turns it off)."""
        self._ask(f"latency {seconds!r}")


def total(counts: Mapping[str, int], kinds: frozenset[str] = METADATA_OPS) -> int:
    """How many of ``counts`` are of ``kinds`` (by default: those that paid the latency)."""
    return sum(n for op, n in counts.items() if op in kinds)


def _unmount(mountpoint: Path) -> str | None:
    """``fusermount3 -u``; lazily (``-z``) when busy. Returns an error message or None."""
    for argv in (
        ["fusermount3", "-u", str(mountpoint)],
        ["fusermount3", "-u", "-z", str(mountpoint)],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode == 0 or not os.path.ismount(mountpoint):
            return None
    return done.stderr.strip()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH", "")) if p)
    # mfusepy looks for libfuse 2 first; libfuse3 is the one this harness is written against.
    env.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    return env


@contextlib.contextmanager
def mount(source: Path, mountpoint: Path, options: Options | None = None) -> Iterator[LatencyFS]:
    """Mount ``source`` at ``mountpoint`` (an existing empty directory) for the ``with`` block.

    Raises ``FuseUnavailable`` when the machine cannot mount FUSE, ``LatencyFSError`` when the
    filesystem process fails otherwise. Unmounted with ``fusermount3 -u`` on the way out.
    """
    options = options or Options()
    reason = unavailable()
    if reason is not None:
        raise FuseUnavailable(reason)
    with tempfile.TemporaryDirectory(prefix="latencyfs-") as tmp:
        control = Path(tmp) / "control.sock"
        log = Path(tmp) / "fs.log"
        argv = [
            sys.executable,
            "-m",
            "bench.fusepassthrough",
            str(source),
            str(mountpoint),
            "--control",
            str(control),
            "--latency",
            repr(options.latency),
            "--attr-timeout",
            repr(options.attr_timeout),
            "--entry-timeout",
            repr(options.entry_timeout),
            "--negative-timeout",
            repr(options.negative_timeout),
        ]
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=_env()
            )
        try:
            _wait_mounted(process, mountpoint, control, log)
            yield LatencyFS(mountpoint, control, options)
        finally:
            problem = _unmount(mountpoint) if os.path.ismount(mountpoint) else None
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.terminate()  # libfuse's handler unmounts and returns from its loop
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if problem is not None:
                raise LatencyFSError(f"could not unmount {mountpoint}: {problem}")


def _wait_mounted(
    process: subprocess.Popen[bytes], mountpoint: Path, control: Path, log: Path
) -> None:
    deadline = time.monotonic() + _MOUNT_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = log.read_text(errors="replace").strip()
            kind = FuseUnavailable if any(m in text for m in _REFUSED) else LatencyFSError
            raise kind(f"FUSE mount failed (exit {process.returncode}): {text[-600:]}")
        if os.path.ismount(mountpoint) and control.exists():
            return
        time.sleep(0.02)
    process.terminate()
    raise LatencyFSError(f"{mountpoint} was not mounted within {_MOUNT_TIMEOUT:.0f} s")
