"""``simple-oci-registry serve`` as an operator runs it: drain on SIGTERM, worker processes,
environment twins of the flags, start-up errors, an idle process that stays idle.

Every test starts the real command. Nothing asserts on elapsed time: waits are bounded loops
that fail with a message when the behaviour never shows, and the idle check measures CPU
seconds the process used (a resource bound), not wall time.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from simple_oci_registry.layoutwriter import (
    MEDIA_TYPE_OCI_LAYER,
    LayoutWriter,
    random_chunks,
)
from tests.images import StandardImages, small_image
from tests.server import RegistryProcess, child_pids

BIG = 64 << 20
POLL_LIMIT = 30.0  # seconds; only reached when the behaviour is broken


@dataclass(frozen=True)
class BigImage:
    root: Path
    digest: str


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> BigImage:
    """``big:1.0``: one 64 MiB layer of incompressible bytes in a plain archive."""
    root = tmp_path_factory.mktemp("big") / "images"
    writer = LayoutWriter()
    layer = writer.add_blob_stream(random_chunks(BIG, seed=64), MEDIA_TYPE_OCI_LAYER)
    writer.tag(writer.add_image([layer]), "1.0")
    writer.write_archive(root / "big" / "1.0.oci")
    return BigImage(root, layer.digest)


Start = Callable[..., RegistryProcess]


@pytest.fixture
def start(start_registry: Start) -> Start:
    """Registry processes with their own log files (conftest's start_registry)."""
    return start_registry


def poll(check: Callable[[], bool], what: str, limit: float = POLL_LIMIT) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def address(registry: RegistryProcess) -> tuple[str, int]:
    host, port = registry.host.rsplit(":", 1)
    return host, int(port)


def refuses_connections(registry: RegistryProcess) -> bool:
    try:
        socket.create_connection(address(registry), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def start_download(registry: RegistryProcess, digest: str) -> tuple[http.client.HTTPConnection,
                                                                   http.client.HTTPResponse]:
    """A blob GET from a client with a small receive buffer, so the server is kept waiting."""
    host, port = address(registry)
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.connect()
    assert connection.sock is not None
    connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    connection.request("GET", f"/v2/big/blobs/{digest}")
    response = connection.getresponse()
    assert response.status == 200
    assert int(response.headers["Content-Length"]) == BIG
    return connection, response


# ------------------------------------------------------------------------------ SIGTERM


def test_sigterm_lets_an_inflight_download_finish(big_image: BigImage, start: Start) -> None:
    registry = start(big_image.root, "--shutdown-timeout", "20")
    assert registry.process is not None
    connection, response = start_download(registry, big_image.digest)
    hasher = hashlib.sha256()
    first = response.read(1 << 20)
    hasher.update(first)
    received = len(first)

    registry.process.send_signal(signal.SIGTERM)
    # The listener closes at once: new clients are refused (and can go to another node) ...
    poll(lambda: refuses_connections(registry), "new connections refused after SIGTERM")
    assert registry.process.poll() is None  # ... while the transfer is still going.

    while chunk := response.read(1 << 20):  # slowly: the transfer outlives the signal
        hasher.update(chunk)
        received += len(chunk)
        time.sleep(0.005)
    connection.close()
    assert received == BIG
    assert "sha256:" + hasher.hexdigest() == big_image.digest
    assert registry.process.wait(timeout=20 + 10) == 0
    assert "shutting down" in registry.log()


def test_shutdown_timeout_bounds_a_stalled_download(big_image: BigImage, start: Start) -> None:
    registry = start(big_image.root, "--shutdown-timeout", "1")
    assert registry.process is not None
    connection, response = start_download(registry, big_image.digest)
    received = len(response.read(1 << 20))
    registry.process.send_signal(signal.SIGTERM)
    # The client reads nothing more: the process gives up on it after the timeout.
    assert registry.process.wait(timeout=POLL_LIMIT) == 0
    try:
        while chunk := response.read(1 << 20):
            received += len(chunk)
    except (http.client.IncompleteRead, ConnectionError) as exc:
        if isinstance(exc, http.client.IncompleteRead):
            received += len(exc.partial)
    connection.close()
    assert received < BIG  # cut short, never reported as complete


# ------------------------------------------------------------------------------ workers




def all_ok(registry: RegistryProcess, paths: list[str], rounds: int) -> None:
    for _ in range(rounds):
        for path in paths:
            status, _ = get(registry.url + path)
            assert status == 200, path


def test_workers_run_as_children_and_a_killed_one_is_replaced(
        shared_images: StandardImages, start: Start) -> None:
    registry = start(shared_images.root, "--workers", "2", "--log-format", "json")
    assert registry.process is not None
    supervisor = registry.process.pid
    paths = ["/v2/app/manifests/1.0", f"/v2/app/blobs/{shared_images.layers['app:1.0'][0]}"]
    try:
        poll(lambda: len(child_pids(supervisor)) == 2, "two worker processes")
        workers = child_pids(supervisor)
        all_ok(registry, paths, 10)

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        poll(lambda: victim not in child_pids(supervisor), "the killed worker gone")
        # Connections the kernel had already queued on the killed worker's socket are reset
        # (SO_REUSEPORT keeps one accept queue per worker); new ones reach the other worker.
        with contextlib.suppress(ConnectionError):
            get(registry.url + paths[0])
        all_ok(registry, paths, 10)  # the other worker answers meanwhile
        poll(lambda: len(child_pids(supervisor)) == 2, "a replacement worker")
        replacement = child_pids(supervisor) - workers
        assert len(replacement) == 1 and victim not in replacement
        all_ok(registry, paths, 20)
        assert registry.process.poll() is None
    finally:
        assert registry.stop() == 0
    assert child_pids(supervisor) == set()
    entries = [json.loads(line) for line in registry.log().splitlines()]
    assert any(f"worker {victim} exited" in e["message"] for e in entries)


def wchan(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/wchan") as file:
            return file.read()
    except OSError:
        return ""


def test_sigterm_while_a_worker_is_being_replaced(shared_images: StandardImages,
                                                  start: Start) -> None:
    registry = start(shared_images.root, "--workers", "2")
    assert registry.process is not None
    supervisor = registry.process.pid
    poll(lambda: len(child_pids(supervisor)) == 2, "two worker processes")
    os.kill(min(child_pids(supervisor)), signal.SIGKILL)
    # Signal the supervisor while it sleeps before starting the replacement (the only
    # nanosleep in its loop; it otherwise blocks in wait4).
    poll(lambda: "nanosleep" in wchan(supervisor), "the supervisor's pause before respawning")
    registry.process.send_signal(signal.SIGTERM)
    try:
        registry.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("the supervisor did not exit after SIGTERM (a worker it never signalled)")
    assert registry.process.returncode == 0
    assert child_pids(supervisor) == set()


# ------------------------------------------------------------------------------ environment


def test_environment_twins_configure_a_real_process(tmp_path: Path) -> None:
    root = tmp_path / "images"
    writer = LayoutWriter()
    old, _ = small_image(writer, "old")
    writer.tag(old, "1.0")
    writer.write_archive(root / "app" / "1.0.oci")
    env = dict(os.environ, SOR_DIR=str(root), SOR_LISTEN="127.0.0.1:0",
               SOR_GRACE_PERIOD="0", SOR_WORKERS="1", SOR_LOG_FORMAT="json",
               PYTHONUNBUFFERED="1")
    with open(tmp_path / "registry.log", "w") as log, subprocess.Popen(
            [sys.executable, "-m", "simple_oci_registry"],  # no flags, no subcommand
            stdout=subprocess.PIPE, stderr=log, text=True, env=env) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert f"serving {root} on http://127.0.0.1:" in line, line
            url = line.split(" on ", 1)[1].split()[0].rstrip("/")
            poll(lambda: get_or_none(url + "/v2/") == 200, "the registry answering")
            assert manifest_digest(url) == old.digest

            writer = LayoutWriter()
            new, _ = small_image(writer, "new")
            writer.tag(new, "1.0")
            writer.write_archive(root / "app" / "1.0.oci")  # replaced by rename
            # Grace period 0 (from SOR_GRACE_PERIOD): the replaced archive is gone at once.
            assert manifest_digest(url) == new.digest
            assert get_or_none(f"{url}/v2/app/manifests/{old.digest}") == 404
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=POLL_LIMIT) == 0
    for line in (tmp_path / "registry.log").read_text().splitlines():
        json.loads(line)  # SOR_LOG_FORMAT=json


def get_or_none(url: str) -> int | None:
    try:
        return get(url)[0]
    except (urllib.error.URLError, ConnectionError):
        return None


def manifest_digest(url: str) -> str:
    with urllib.request.urlopen(url + "/v2/app/manifests/1.0", timeout=10) as response:
        body = response.read()
        digest: str = response.headers["Docker-Content-Digest"]
    assert digest == "sha256:" + hashlib.sha256(body).hexdigest()
    return digest


@pytest.mark.parametrize("how", ["flag", "env", "file"])
def test_bad_image_directory_exits_2_with_a_clear_message(tmp_path: Path, how: str) -> None:
    missing = tmp_path / "no-such-dir"
    a_file = tmp_path / "file.oci"
    a_file.write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOR_")}
    command = [sys.executable, "-m", "simple_oci_registry", "serve", "--listen", "127.0.0.1:0"]
    if how == "flag":
        command += ["--dir", str(missing)]
    elif how == "env":
        env["SOR_DIR"] = str(missing)
    else:
        command += ["--dir", str(a_file)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""  # never claimed to be serving
    shown = a_file if how == "file" else missing
    assert f"image directory '{shown}' does not exist or is not a directory" in result.stderr
    assert "--dir" in result.stderr


# ------------------------------------------------------------------------------ rescan


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (its threads included), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_rescan_interval_zero_disables_the_rescan(
        shared_images: StandardImages, start: Start) -> None:
    idle = start(shared_images.root, "--rescan-interval", "0")
    busy = start(shared_images.root, "--rescan-interval", "0.2")
    for registry in (idle, busy):
        assert get(registry.url + "/v2/app/manifests/1.0")[0] == 200  # a name to rescan
    assert idle.process is not None
    before = cpu_seconds(idle.process.pid)
    # The interval-0.2 process shows what a rescan logs (RegistryProcess logs at debug) ...
    poll(lambda: busy.log().count("rescan:") >= 3, "periodic rescans at interval 0.2")
    time.sleep(2.0)
    # ... and the interval-0 one never rescans, nor spins: about no CPU over ~2 s idle.
    used = cpu_seconds(idle.process.pid) - before
    assert used < 0.5, f"{used:.2f} CPU seconds while idle"
    assert "rescan:" not in idle.log()
    assert get(idle.url + "/v2/app/manifests/1.0")[0] == 200
