"""Start, probe and stop the three servers under test: ours, nginx and CNCF distribution.

Each server runs in its own session (process group), so ``stop()`` can end it and every worker it
forked with one ``killpg`` on the id of the group this harness created, and nothing else.
"""

from __future__ import annotations

import os
import pwd
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Final

from bench.httpclient import HttpError, fetch

__all__ = [
    "HOST",
    "REPO_ROOT",
    "RunningServer",
    "ServerError",
    "free_port",
    "ours_help",
    "ours_unavailable",
    "seed_distribution",
    "start_distribution",
    "start_nginx",
    "start_ours",
    "tool",
]

HOST: Final[str] = "127.0.0.1"
REPO_ROOT: Final[Path] = Path(__file__).resolve().parent.parent
_URL = re.compile(r"http://(?:[^\s/:]+|\[[^\]\s]+\]):(\d+)")
_START_TIMEOUT: Final[float] = 60.0


class ServerError(RuntimeError):
    """A server failed to start, or a step that prepares it failed."""


def tool(name: str, *fallbacks: str) -> str | None:
    """Path of an installed binary, looking in sbin directories too (nginx lives there)."""
    for candidate in (name, *fallbacks):
        found = shutil.which(candidate) or shutil.which(
            candidate, path="/usr/sbin:/usr/local/sbin:/sbin"
        )
        if found:
            return found
    return None


def free_port() -> int:
    """A loopback port that was free a moment ago, for servers that cannot bind port 0."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class _Drain:
    """Reads a child's stdout in a thread so the pipe never fills; keeps the last lines."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.tail: deque[str] = deque(maxlen=40)
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            self.tail.append(line)
            self.lines.put(line)
        self.lines.put(None)


class RunningServer:
    """A started server process (and its process group) listening on ``HOST:port``."""

    def __init__(
        self, name: str, process: subprocess.Popen[bytes], port: int, log_path: Path
    ) -> None:
        self.name = name
        self.process = process
        self.port = port
        self.log_path = log_path
        self.drain: _Drain | None = None
        self.reader: subprocess.Popen[bytes] | None = None
        """The process copying the server's stderr pipe to ``log_path`` (see _spawn_piped)."""

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, lines: int = 15) -> str:
        text = ""
        if self.drain is not None:
            text += "\n".join(self.drain.tail)
        try:
            text += "\n" + self.log_path.read_text(errors="replace")
        except OSError:
            pass
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the server's process group, then SIGKILL whatever is left after 10 s."""
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; workers of the same group may linger for a moment.
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        if self.process.poll() is None:
            self.process.wait(timeout=5)
        if self.reader is not None:
            try:  # EOF once every process holding the pipe has exited
                self.reader.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.reader.kill()
                self.reader.wait()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _spawn(
    argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    try:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            start_new_session=True,
        )
    finally:
        log.close()


def _spawn_piped(
    argv: Sequence[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    *,
    stdout_too: bool = False,
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """Start a server whose stderr (its log) is a pipe that ``cat`` copies to ``log_path``.

    That is where a container's log goes: a pipe read by the runtime (containerd-shim, conmon)
    and written to a file. The reader is not in the server's process tree, so its CPU is not
    counted as the server's, as the runtime's is not. ``stdout_too``: stdout goes there as
    well (distribution writes its access log to stdout), else it is a pipe for the caller.
    Returns (server, reader).
    """
    with log_path.open("wb") as log:
        reader = subprocess.Popen(
            ["cat"], stdin=subprocess.PIPE, stdout=log, start_new_session=True
        )
    assert reader.stdin is not None
    try:
        server = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=reader.stdin if stdout_too else subprocess.PIPE,
            stderr=reader.stdin,
            env=env,
            start_new_session=True,
        )
    except BaseException:
        reader.kill()
        reader.wait()
        raise
    finally:
        reader.stdin.close()  # the server holds the write end; cat ends when it exits
    return server, reader


def _wait_http(server: RunningServer, path: str, expect: int | None, deadline: float) -> None:
    """Poll ``path`` until the server answers (with ``expect``, when given)."""
    last = "no answer"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerError(
                f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        try:
            fetch(HOST, server.port, path, expect=expect, timeout=2.0)
            return
        except (OSError, HttpError) as exc:
            last = str(exc)
        time.sleep(0.05)
    raise ServerError(f"{server.name} did not answer {path} in time ({last}):\n{server.log_tail()}")


def _ours_env() -> dict[str, str]:
    env = dict(os.environ)
    src = REPO_ROOT / "src"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH", "")) if p)
    return env


def ours_unavailable() -> str | None:
    """Why our server cannot be started here, or None when ``simple_oci_registry.cli`` imports."""
    done = subprocess.run(
        [sys.executable, "-c", "import simple_oci_registry.cli"],
        env=_ours_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode == 0:
        return None
    last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
    return f"`import simple_oci_registry.cli` fails: {last}"


def ours_help() -> str:
    """``serve --help`` of our server, to find out which optional flags it has."""
    done = subprocess.run(
        [sys.executable, "-m", "simple_oci_registry", "serve", "--help"],
        env=_ours_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout


def start_ours(
    registry_dir: Path,
    scratch: Path,
    *,
    workers: int | None,
    cache_dir: Path | None = None,
    label: str = "ours",
    log_level: str | None = None,
    access_log: bool = True,
) -> RunningServer:
    """``python -m simple_oci_registry serve`` on port 0; the port comes from its first line.

    ``workers`` or ``log_level`` None leaves the flag out: the server's default, as users run
    it (log level info, access log on). Its stderr goes into a pipe, as a container's does (see
    _spawn_piped); ``access_log=False`` adds ``--no-access-log``.
    """
    argv = [
        sys.executable,
        "-m",
        "simple_oci_registry",
        "serve",
        "--dir",
        str(registry_dir),
        "--listen",
        f"{HOST}:0",
    ]
    if workers is not None:
        argv += ["--workers", str(workers)]
    if log_level is not None:
        argv += ["--log-level", log_level]
    if not access_log:
        argv.append("--no-access-log")
    if cache_dir is not None:
        argv += ["--cache-dir", str(cache_dir)]
    log_path = scratch / f"{label}.log"
    process, reader = _spawn_piped(argv, log_path, env=_ours_env())
    server = RunningServer(label, process, 0, log_path)
    server.reader = reader
    try:
        assert process.stdout is not None
        server.drain = _Drain(process.stdout)
        deadline = time.monotonic() + _START_TIMEOUT
        while server.port == 0:
            try:
                line = server.drain.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise ServerError(
                    f"{label}: no URL printed in time:\n{server.log_tail()}"
                ) from None
            if line is None:
                process.wait(timeout=10)
                raise ServerError(
                    f"{label} exited with {process.returncode} before printing its URL:\n"
                    f"{server.log_tail()}"
                )
            match = _URL.search(line)
            if match:
                server.port = int(match.group(1))
        _wait_http(server, "/v2/", 200, deadline)
    except BaseException:
        server.stop()
        raise
    return server


_NGINX_CONF = """\
{user}
worker_processes {workers};
daemon off;
master_process on;
pid {scratch}/nginx.pid;
error_log {scratch}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {access_log};
    sendfile on;
    sendfile_max_chunk 0;
    tcp_nopush off;
    tcp_nodelay on;
    keepalive_requests 100000000;
    client_body_temp_path {scratch}/nginx-tmp/body;
    proxy_temp_path {scratch}/nginx-tmp/proxy;
    fastcgi_temp_path {scratch}/nginx-tmp/fastcgi;
    uwsgi_temp_path {scratch}/nginx-tmp/uwsgi;
    scgi_temp_path {scratch}/nginx-tmp/scgi;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen {host}:{port};
        root {root};
        location /v2/{name}/manifests/ {{
            default_type {manifest_type};
            add_header Docker-Content-Digest {manifest_digest};
        }}
        location /v2/{name}/tags/ {{
            default_type application/json;
        }}
    }}
}}
"""


def start_nginx(
    root: Path,
    scratch: Path,
    *,
    name: str,
    manifest_type: str,
    manifest_digest: str,
    workers: int = 2,
    label: str = "nginx",
    access_log: bool = True,
) -> RunningServer:
    """nginx serving the static tree under ``root`` (``v2/<name>/…`` files) with sendfile.

    Logging as Debian's packaged nginx.conf has it: ``access_log <file>;`` (the combined
    format, no ``buffer=``: one write per request); ``access_log=False`` turns it off.
    """
    binary = tool("nginx")
    if binary is None:
        raise ServerError("nginx is not installed (apt-get install -y nginx-light)")
    scratch = scratch / label
    (scratch / "nginx-tmp").mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = scratch / "nginx.conf"
    conf.write_text(
        _NGINX_CONF.format(
            # As root, nginx's workers would switch to "nobody", who may not read the fixtures.
            user=f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else "",
            workers=workers,
            access_log=scratch / "access.log" if access_log else "off",
            scratch=scratch,
            host=HOST,
            port=port,
            root=root,
            name=name,
            manifest_type=manifest_type,
            manifest_digest=manifest_digest,
        )
    )
    error_log = scratch / "nginx-error.log"
    argv = [binary, "-p", str(scratch), "-c", str(conf), "-e", str(error_log)]
    server = RunningServer(label, _spawn(argv, error_log), port, error_log)
    try:
        assert server.process.stdout is not None
        server.drain = _Drain(server.process.stdout)
        _wait_http(server, "/", None, time.monotonic() + _START_TIMEOUT)
    except BaseException:
        server.stop()
        raise
    return server


_DISTRIBUTION_CONF = """\
version: 0.1
log:
{log}
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: false
  cache:
    blobdescriptor: inmemory
http:
  addr: {host}:{port}
"""


# Debian's /etc/docker/registry/config.yml sets no level (info) and leaves the access log on.
_DISTRIBUTION_DEFAULT_LOG: Final = "  fields:\n    service: registry"
_DISTRIBUTION_NO_LOG: Final = "  level: warn\n  accesslog:\n    disabled: true"


def start_distribution(
    storage: Path, scratch: Path, *, label: str = "distribution", access_log: bool = True
) -> RunningServer:
    """CNCF distribution (Debian's ``docker-registry``) with filesystem storage, logging as
    Debian's packaged config has it (level info, access log on) into a pipe, as a container's;
    ``access_log=False``: level warn, access log off."""
    binary = tool("docker-registry", "registry")
    if binary is None:
        raise ServerError("CNCF distribution is not installed (apt-get install -y docker-registry)")
    storage.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = scratch / f"{label}.yml"
    log = _DISTRIBUTION_DEFAULT_LOG if access_log else _DISTRIBUTION_NO_LOG
    conf.write_text(_DISTRIBUTION_CONF.format(log=log, storage=storage, host=HOST, port=port))
    log_path = scratch / f"{label}.log"
    process, reader = _spawn_piped([binary, "serve", str(conf)], log_path, stdout_too=True)
    server = RunningServer(label, process, port, log_path)
    server.reader = reader
    try:
        _wait_http(server, "/v2/", 200, time.monotonic() + _START_TIMEOUT)
    except BaseException:
        server.stop()
        raise
    return server


def seed_distribution(server: RunningServer, archive: Path, ref: str, scratch: Path) -> None:
    """Push ``archive`` to ``server`` as ``ref`` (``name:tag``) with skopeo, digests preserved."""
    binary = tool("skopeo")
    if binary is None:
        raise ServerError("skopeo is not installed (apt-get install -y skopeo): cannot seed it")
    policy = scratch / "policy.json"
    policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')
    tmp = scratch / "skopeo-tmp"
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp))
    argv = [
        binary,
        "--policy",
        str(policy),
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        f"oci-archive:{archive}",
        f"docker://{HOST}:{server.port}/{ref}",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    if done.returncode != 0:
        raise ServerError(f"skopeo copy failed ({done.returncode}): {done.stderr.strip()[-800:]}")
