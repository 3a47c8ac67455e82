"""The slow, counting FUSE passthrough (``bench.latencyfs``) that models NFS for tests and bench.

Real mounts through /dev/fuse and fusermount3; skipped with the reason where the machine cannot
mount FUSE. Figures are operation counts, never timings; the one time check is a lower bound
(``time.sleep`` never returns early), so a slow machine cannot make it fail.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # ``bench`` is a top-level directory, not an installed package
    sys.path.insert(0, str(REPO))

from bench import latencyfs  # noqa: E402
from bench.latencyfs import FuseUnavailable, LatencyFS, Options  # noqa: E402

NEVER: Options = Options(latency=0.0)
"""No latency, no caching: every lookup and stat reaches the filesystem."""
FOREVER: Options = Options.cached(60.0, latency=0.0)
"""Caches that outlive any test: a repeated lookup never reaches the filesystem."""


@contextmanager
def mounted(source: Path, tmp_path: Path, options: Options) -> Iterator[LatencyFS]:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir(exist_ok=True)
    try:
        with latencyfs.mount(source, mountpoint, options) as fs:
            fs.take()  # the mount's own checks are not the test's
            yield fs
    except FuseUnavailable as exc:  # no /dev/fuse, no fusermount3, or mounting refused
        pytest.skip(str(exc))
    assert not os.path.ismount(mountpoint)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "app").mkdir(parents=True)
    (root / "app" / "1.0.oci").write_bytes(b"small archive\n")
    (root / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    for i in range(50):
        (root / f"n{i:02d}:1.0.oci").write_bytes(b"%d" % i)
    (root / "link.oci").symlink_to("app/1.0.oci")
    return root


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_files_read_back_byte_identical_by_read_and_sendfile(source: Path, tmp_path: Path) -> None:
    with mounted(source, tmp_path, NEVER) as fs:
        seen = fs.mountpoint
        assert _digest(seen / "big.bin") == _digest(source / "big.bin")
        assert (seen / "link.oci").read_bytes() == b"small archive\n"
        assert os.readlink(seen / "link.oci") == "app/1.0.oci"
        # The registry sends blobs with sendfile from an offset of the archive: do the same.
        size = (source / "big.bin").stat().st_size
        offset = 1_000_003
        received = bytearray()
        left, right = socket.socketpair()
        with left, right, open(seen / "big.bin", "rb") as f:
            right.settimeout(10)
            sent = 0
            while sent < size - offset:
                n = os.sendfile(left.fileno(), f.fileno(), offset + sent, 65536)
                assert n > 0
                sent += n
                while len(received) < sent:
                    received += right.recv(1 << 20)
        assert bytes(received) == (source / "big.bin").read_bytes()[offset:]
        counts = fs.counts()
    assert counts["read"] > 0 and counts["open"] >= 2 and counts["readlink"] >= 1


def test_every_stat_and_listing_is_counted_without_caching(source: Path, tmp_path: Path) -> None:
    with mounted(source, tmp_path, NEVER) as fs:
        for _ in range(5):
            os.stat(fs.mountpoint / "app" / "1.0.oci")
        stats = fs.take()
        names = os.listdir(fs.mountpoint)
        listing = fs.take()
        for _ in range(3):
            with pytest.raises(FileNotFoundError):
                os.stat(fs.mountpoint / "missing:1.0.oci")
        misses = fs.take()
    # Each stat looks up "app" and "1.0.oci" again (entry_timeout=0): at least 2 per call.
    assert stats.get("getattr", 0) >= 10
    assert sorted(names) == sorted(p.name for p in source.iterdir())
    assert listing.get("opendir") == 1 and listing.get("readdir") == 1
    assert misses.get("getattr", 0) >= 3
    assert latencyfs.total(stats) == sum(stats.values())


def test_timeouts_let_the_kernel_answer_repeated_lookups(source: Path, tmp_path: Path) -> None:
    with mounted(source, tmp_path, FOREVER) as fs:
        target = fs.mountpoint / "app" / "1.0.oci"
        os.stat(target)
        with pytest.raises(FileNotFoundError):
            os.stat(fs.mountpoint / "missing:1.0.oci")
        first = fs.take()
        for _ in range(5):
            os.stat(target)
            with pytest.raises(FileNotFoundError):
                os.stat(fs.mountpoint / "missing:1.0.oci")
        again = fs.take()
    assert first.get("getattr", 0) >= 3
    assert again == {}, "cached positive and negative lookups must not reach the filesystem"


def test_a_file_replaced_by_rename_in_the_source_is_seen_at_once_without_caching(
    source: Path, tmp_path: Path
) -> None:
    with mounted(source, tmp_path, NEVER) as fs:
        seen = fs.mountpoint / "app" / "1.0.oci"
        before = os.stat(seen)
        assert before.st_ino == os.stat(source / "app" / "1.0.oci").st_ino
        staged = source / "app" / ".1.0.oci.tmp"
        staged.write_bytes(b"a newer archive\n")
        os.rename(staged, source / "app" / "1.0.oci")
        after = os.stat(seen)
        assert after.st_ino != before.st_ino
        assert seen.read_bytes() == b"a newer archive\n"


def test_the_mount_is_read_only(source: Path, tmp_path: Path) -> None:
    with mounted(source, tmp_path, NEVER) as fs:
        with pytest.raises(OSError) as raised:
            open(fs.mountpoint / "app" / "1.0.oci", "r+b")
        assert raised.value.errno == errno.EROFS
        with pytest.raises(OSError):
            (fs.mountpoint / "new.oci").write_bytes(b"x")
    assert not (source / "new.oci").exists()


def test_metadata_operations_wait_the_latency(source: Path, tmp_path: Path) -> None:
    latency = 0.02
    with mounted(source, tmp_path, Options(latency=latency)) as fs:
        started = time.perf_counter()
        for _ in range(5):
            os.stat(fs.mountpoint / "app" / "1.0.oci")
        elapsed = time.perf_counter() - started
        counts = fs.take()
        fs.set_latency(0.0)
        assert fs.counts() == {}
    # One thread, one operation at a time: each counted operation slept at least ``latency``.
    waited = latencyfs.total(counts)
    assert waited >= 10
    assert elapsed >= waited * latency


def test_unavailable_names_the_missing_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    reason = latencyfs.unavailable()
    assert reason is not None and "fusermount3" in reason
    with pytest.raises(FuseUnavailable, match="fusermount3"):
        with latencyfs.mount(Path("/"), Path("/nonexistent")):
            pass
