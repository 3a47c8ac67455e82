"""Node-wide pins (pins.py): a replaced file stays readable, across processes, for the grace."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from simple_oci_registry.fingerprint import Fingerprint
from simple_oci_registry.pins import PinClient, PinTable, serve_pins


def replace(path: Path, data: bytes) -> None:
    temporary = path.with_name("." + path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def read_pinned(fd: int) -> bytes:
    with open(f"/proc/self/fd/{fd}", "rb") as f:
        return f.read()


def test_pins_keep_replaced_bytes_until_the_grace_ends(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "app" / "1.0.oci"
    path.parent.mkdir()
    path.write_bytes(b"old")
    table = PinTable(str(tmp_path), grace=60, clock=lambda: now[0])
    got = table.pin(str(path))
    assert got is not None
    old_fp, old_fd = got
    assert table.superseded("app") == []  # the path still names it
    replace(path, b"new")
    [(where, fingerprint, fd)] = table.superseded("app")  # noticed by a stat of the path
    assert (where, fingerprint) == (str(path), old_fp)
    assert read_pinned(fd) == b"old"
    os.close(fd)
    assert table.superseded("other") == []
    now[0] += 61
    assert table.superseded("app") == [] and table.size() == 0
    assert read_pinned(old_fd) == b"old"  # the caller's own duplicate outlives the table's
    os.close(old_fd)


def test_the_same_file_is_pinned_once(tmp_path: Path) -> None:
    path = tmp_path / "x.oci"
    path.write_bytes(b"x")
    table = PinTable(str(tmp_path), grace=60)
    first, second = table.pin(str(path)), table.pin(str(path))
    assert first is not None and second is not None and first[0] == second[0]
    assert table.size() == 1
    os.close(first[1])
    os.close(second[1])
    assert table.pin(str(tmp_path)) is None  # directories are not pinned
    table.gone(str(path), Fingerprint.of_path(str(path)))
    assert [p for p, _, fd in table.superseded("x") if not os.close(fd)] == [str(path)]


def test_workers_receive_pins_over_their_socket(tmp_path: Path) -> None:
    path = tmp_path / "app.oci"
    path.write_bytes(b"v1")
    table = PinTable(str(tmp_path), grace=60)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    thread = threading.Thread(target=serve_pins, args=(table, ours), daemon=True)
    thread.start()
    client = PinClient(theirs)
    pinned = client.pin(str(path))
    assert pinned is not None and read_pinned(pinned.fd) == b"v1"
    replace(path, b"v2")
    client.gone(str(path), pinned.fingerprint, time.monotonic())
    [old] = client.superseded("app")
    assert old.fingerprint == pinned.fingerprint and read_pinned(old.fd) == b"v1"
    assert client.pin(str(tmp_path / "missing.oci")) is None
    for fd in (pinned.fd, old.fd):
        os.close(fd)
    theirs.close()
    thread.join(timeout=5)
    assert not thread.is_alive()  # the service ends with its worker


def test_the_grace_period_starts_when_the_worker_saw_the_file_go(tmp_path: Path) -> None:
    """Workers send ``gone`` in the background: a message that arrives late must not give
    the pin a longer grace period than the one the worker started."""
    now = [1000.0]
    path = tmp_path / "app.oci"
    path.write_bytes(b"v1")
    table = PinTable(str(tmp_path), grace=60, clock=lambda: now[0])
    got = table.pin(str(path))
    assert got is not None
    os.close(got[1])
    path.unlink()
    now[0] = 1030.0  # the message arrives 30 s after the worker retired the archive
    table.gone(str(path), got[0], at=1000.0)
    now[0] = 1061.0
    assert table.superseded("app") == []  # expired 60 s after 1000, not after 1030


def test_superseded_duplicates_only_what_it_returns(tmp_path: Path) -> None:
    # Regression: every superseded pin was duplicated and all but the newest 200 leaked,
    # until the supervisor ran out of descriptors after a few hundred publishes.
    path = tmp_path / "app" / "latest.oci"
    path.parent.mkdir()
    table = PinTable(str(tmp_path), grace=600)
    for i in range(260):
        replace(path, b"v%d" % i)
        got = table.pin(str(path))
        assert got is not None
        os.close(got[1])
    before = len(os.listdir("/proc/self/fd"))
    found = table.superseded("app")
    assert len(found) == 200
    assert read_pinned(found[-1][2]) == b"v258"  # the newest superseded is included
    for _, _, fd in found:
        os.close(fd)
    assert len(os.listdir("/proc/self/fd")) == before
    table.close()
