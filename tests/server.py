"""A real registry process on a free loopback port, for functional tests.

Functional tests talk to the server the way clients do: a separate process started through the
console entry point (``python -m simple_oci_registry``), bound to port 0 and found through the
URL it prints, so no test depends on a fixed port or on in-process shortcuts.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["RegistryProcess", "child_pids"]

_URL = re.compile(r"(https?://[^\s/]+)/")


class RegistryProcess:
    """Start ``simple-oci-registry serve`` and stop it again."""

    def __init__(self, directory: Path, *args: str, log_path: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.args = args
        self.log_path = log_path or directory.parent / "registry.log"
        self.env = env
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as clients write it in image references."""
        return self.url.split("://", 1)[1]

    def start(self, timeout: float = 20.0) -> RegistryProcess:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        isolation: list[str] = []
        if "--cache-dir" not in self.args:
            # Never the machine's /var/cache: each test's server gets its own blob cache.
            isolation = ["--cache-dir", str(self.log_path.parent / "registry-cache")]
        command = [sys.executable, "-m", "simple_oci_registry", "serve",
                   "--dir", str(self.directory), "--listen", "127.0.0.1:0",
                   "--workers", "1", "--log-level", "debug", *isolation, *self.args]
        self._log = open(self.log_path, "a")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log,
                                        text=True, env=env)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        match = _URL.search(line)
        if match is None:
            self.stop()
            raise RuntimeError(f"registry did not print its URL: {line!r}\n{self.log()}")
        self.url = match.group(1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/v2/", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"registry did not become ready:\n{self.log()}") from None
                time.sleep(0.05)

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> RegistryProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def child_pids(pid: int) -> set[int]:
    """The live (not zombie) child processes of ``pid``, read from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found
