"""Request-rate figures from load generators: ``wrk`` for GET, ApacheBench for HEAD.

Debian's wrk 4.1.0 cannot measure HEAD: its response parser is not told the request was HEAD,
so it waits for the ``Content-Length`` bytes of a body that never comes and counts 0 requests.
``ab -i`` (apache2-utils) parses HEAD responses correctly; it is single-threaded, which caps it
near 130k req/s here, far above what the registries under test answer.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "LoadResult",
    "ab_available",
    "parse_ab",
    "parse_wrk",
    "run_ab_head",
    "run_wrk",
    "wrk_available",
]

_WRK_RPS: Final = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_WRK_REQUESTS: Final = re.compile(r"^\s*(\d+) requests in", re.MULTILINE)
_WRK_NON_2XX: Final = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_WRK_SOCKET: Final = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_AB_RPS: Final = re.compile(r"^Requests per second:\s+([\d.]+)", re.MULTILINE)
_AB_COMPLETE: Final = re.compile(r"^Complete requests:\s+(\d+)", re.MULTILINE)
_AB_FAILED: Final = re.compile(r"^Failed requests:\s+(\d+)", re.MULTILINE)
_AB_NON_2XX: Final = re.compile(r"^Non-2xx responses:\s+(\d+)", re.MULTILINE)
_AB_MAX_REQUESTS: Final = 100_000_000


@dataclass(frozen=True, slots=True)
class LoadResult:
    tool: str
    requests_per_second: float
    requests: int
    non_2xx: int
    errors: int
    """Socket errors (wrk: connect+read+write+timeout) or failed requests (ab)."""


def wrk_available() -> str | None:
    return shutil.which("wrk")


def ab_available() -> str | None:
    return shutil.which("ab")


def _lua_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _run(argv: Sequence[str], timeout: float) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


def _int(pattern: re.Pattern[str], text: str) -> int:
    match = pattern.search(text)
    return int(match.group(1)) if match else 0


def run_wrk(
    url: str,
    *,
    scratch: Path,
    seconds: int,
    threads: int,
    connections: int,
    headers: Sequence[tuple[str, str]] = (),
) -> LoadResult:
    """``wrk -tT -cC -dDs -s script URL`` (GET), headers set by a generated Lua script."""
    binary = wrk_available()
    if binary is None:
        raise FileNotFoundError("wrk is not installed (apt-get install -y wrk)")
    script = scratch / "wrk-headers.lua"
    script.write_text(
        "".join(f"wrk.headers[{_lua_quote(k)}] = {_lua_quote(v)}\n" for k, v in headers)
    )
    argv = [binary, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url]
    return parse_wrk(_run(argv, seconds + 60))


def parse_wrk(out: str) -> LoadResult:
    """The figures in wrk's summary."""
    rps = _WRK_RPS.search(out)
    if rps is None:
        raise RuntimeError(f"could not parse wrk output:\n{out}")
    socket_errors = _WRK_SOCKET.search(out)
    return LoadResult(
        tool="wrk",
        requests_per_second=float(rps.group(1)),
        requests=_int(_WRK_REQUESTS, out),
        non_2xx=_int(_WRK_NON_2XX, out),
        errors=sum(int(g) for g in socket_errors.groups()) if socket_errors else 0,
    )


def run_ab_head(
    url: str,
    *,
    seconds: int,
    connections: int,
    headers: Sequence[tuple[str, str]] = (),
) -> LoadResult:
    """``ab -k -i -c C -t S`` : HEAD requests on keep-alive connections for ``seconds``."""
    binary = ab_available()
    if binary is None:
        raise FileNotFoundError("ab is not installed (apt-get install -y apache2-utils)")
    argv = [binary, "-k", "-i", "-r", "-q", "-c", str(connections), "-t", str(seconds)]
    argv += ["-n", str(_AB_MAX_REQUESTS)]  # after -t, which would otherwise cap at 50,000
    for name, value in headers:
        argv += ["-H", f"{name}: {value}"]
    return parse_ab(_run([*argv, url], seconds + 60))


def parse_ab(out: str) -> LoadResult:
    """The figures in ApacheBench's summary."""
    rps = _AB_RPS.search(out)
    if rps is None:
        raise RuntimeError(f"could not parse ab output:\n{out}")
    return LoadResult(
        tool="ab",
        requests_per_second=float(rps.group(1)),
        requests=_int(_AB_COMPLETE, out),
        non_2xx=_int(_AB_NON_2XX, out),
        errors=_int(_AB_FAILED, out),
    )
