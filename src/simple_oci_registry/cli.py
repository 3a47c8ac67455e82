"""The ``simple-oci-registry`` command: flags (each with a ``SOR_*`` environment twin) → Config.

``serve`` (the default) runs the registry: with ``--workers N > 1`` the parent process binds and
listens on the port once, forks N workers that all accept from that one socket (they share
nothing else but the image directory), restarts a worker that dies, and forwards
SIGTERM/SIGINT so each worker drains its in-flight transfers before exiting. The socket is
never opened with SO_REUSEPORT: a second registry (or any other program) asking for the same
port gets EADDRINUSE instead of silently receiving every other connection.

``ls`` prints what the directory serves (name, tag, digest, platforms, size, file) and ``check``
validates every archive in it, exiting 1 when it finds problems, so both fit scripts and CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from aiohttp import web

from simple_oci_registry import __version__
from simple_oci_registry.archive import GZIP
from simple_oci_registry.config import DEFAULTS, Config
from simple_oci_registry.inventory import (
    CheckProgress,
    ImageEntry,
    ImageStatus,
    check_directory,
    check_images,
    human_size,
    list_images,
    read_references,
)
from simple_oci_registry.logs import ACCESS_LOGGER, AccessLogger, configure_logging
from simple_oci_registry.pins import PinTable, pins_usable, serve_pins
from simple_oci_registry.publish import PublishError, publish
from simple_oci_registry.tls import ReloadingTLS

__all__ = ["build_parser", "config_from_args", "main"]

log = logging.getLogger("simple_oci_registry")

ENV_PREFIX: Final = "SOR_"
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
_QUICK_FAILURE_SECONDS: Final = 5.0
_MAX_QUICK_FAILURES: Final = 5
_BACKLOG: Final = 1024
SUBCOMMANDS: Final = ("serve", "ls", "check", "publish")
T = TypeVar("T")


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def default_workers(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """One worker per CPU this process may use: its affinity mask, capped by a cgroup v2 CPU
    quota. In a pod os.cpu_count() is the whole node's count (64 workers on a 64-core node
    under a 2-CPU limit would each hold their own caches and starve each other)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = open(cgroup_cpu_max).read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def listen_arg(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6); port 0 asks the kernel for a free port."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port 0-65535, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


def directory_arg(value: str) -> Path:
    """The image directory must exist and be readable at start-up."""
    path = Path(value).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"image directory {str(path)!r} does not exist "
                                         "or is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"image directory {str(path)!r} is not readable")
    return path.resolve()


def readable_file_arg(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file() or not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{str(path)!r} is not a readable file")
    return path.resolve()


def _non_negative(kind: Callable[[str], T]) -> Callable[[str], T]:
    def parse(value: str) -> T:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if isinstance(number, float) and not math.isfinite(number):
            # NaN passes every comparison, so "< 0" alone would let it through.
            raise argparse.ArgumentTypeError(f"must be a finite number, got {value!r}")
        if number < 0:  # type: ignore[operator]
            raise argparse.ArgumentTypeError(f"must not be negative, got {value!r}")
        return number
    return parse


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


@dataclass(frozen=True, slots=True)
class _InvalidEnv:
    """An environment value that failed validation; reported as a usage error after parsing
    (argparse neither checks ``choices`` on defaults nor lets a default fail politely)."""

    message: str


def _add(parser: argparse.ArgumentParser, flag: str, *, default: Any, help: str,
         **kwargs: Any) -> None:
    """Add a flag whose default comes from its ``SOR_*`` environment twin when set."""
    env = _env_name(flag)
    value: Any = os.environ.get(env, default)
    choices = kwargs.get("choices")
    if env in os.environ and choices is not None:
        converted = kwargs.get("type", str)(value)
        if converted not in choices:
            value = _InvalidEnv(f"{env}: invalid choice {value!r} (choose from "
                                f"{', '.join(map(str, choices))})")
    parser.add_argument(flag, default=value,
                        help=f"{help} [env {env}; default: %(default)s]", **kwargs)


def _add_bool(parser: argparse.ArgumentParser, flag: str, *, default: bool, help: str) -> None:
    env = _env_name(flag)
    env_value = os.environ.get(env)
    value: bool | _InvalidEnv = default
    if env_value is not None:
        try:
            value = _bool(env_value)
        except argparse.ArgumentTypeError as exc:
            value = _InvalidEnv(f"{env}: {exc}")
    parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value,
                        help=f"{help} [env {env}; default: %(default)s]")


class _Parser(argparse.ArgumentParser):
    """Reports environment values that failed validation as usage errors (exit status 2)."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None,
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        for value in vars(parsed).values():
            if isinstance(value, _InvalidEnv):
                self.error(value.message)
        return parsed, rest


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="simple-oci-registry",
        description="A read-only OCI registry serving images straight from .oci archives.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve the image directory (the default command)")
    _add(serve, "--dir", default=DEFAULTS.directory, type=directory_arg,
         help="the image directory")
    _add(serve, "--listen", default=DEFAULTS.listen, type=listen_arg,
         help="address to listen on, HOST:PORT ([ADDRESS]:PORT for IPv6; port 0 picks a free "
              "port)")
    _add(serve, "--workers", default=default_workers(), type=_non_negative(int),
         help="worker processes accepting from the one listening socket (0 counts as 1); the "
              "default is the CPUs this process may use (affinity, cgroup CPU quota)")
    _add(serve, "--rescan-interval", default=DEFAULTS.rescan_interval,
         type=_non_negative(float),
         help="seconds between full rescans of known names (0: never)")
    _add(serve, "--freshness-window", default=None, type=_non_negative(float),
         help="retired and ignored: every request checks the directories it depends on by "
              "stat, so the filesystem's attribute cache (NFS actimeo) sets the freshness")
    _add(serve, "--grace-period", default=DEFAULTS.grace_period, type=_non_negative(float),
         help="seconds a replaced or removed archive's manifests and blobs stay downloadable "
              "by digest, so pulls that straddle a publish finish (0: none)")
    _add(serve, "--tls-cert", default=None, type=readable_file_arg,
         help="PEM certificate chain; with --tls-key serves HTTPS (both files are re-read "
              "when they change)")
    _add(serve, "--tls-key", default=None, type=readable_file_arg, help="PEM private key")
    _add(serve, "--log-level", default=DEFAULTS.log_level,
         choices=["debug", "info", "warning", "error"], type=str.lower, help="log level")
    _add(serve, "--shutdown-timeout", default=DEFAULTS.shutdown_timeout,
         type=_non_negative(float),
         help="seconds in-flight transfers may take to finish after SIGTERM")
    _add(serve, "--log-format", default=DEFAULTS.log_format, choices=["text", "json"],
         type=str.lower, help="log line format (json: one object per line, access log too)")
    _add_bool(serve, "--access-log", default=True, help="log every request")
    _add(serve, "--cache-dir", default=DEFAULTS.cache_dir, type=Path,
         help="node-local directory for blobs decompressed from gzip/zstd archives and "
              "digests computed for old docker save archives")
    _add(serve, "--cache-max-bytes", default=DEFAULTS.cache_max_bytes,
         type=_non_negative(int),
         help="size bound of --cache-dir (least recently used go first; 0: no cache)")
    _add_bool(serve, "--prepare-ahead", default=True,
              help="index gzip/zstd archives into --cache-dir in the background, newest first "
                   "up to half of --cache-max-bytes, so their first pull finds them ready")
    _add(serve, "--prepare-read-rate", default=DEFAULTS.prepare_read_rate,
         type=_non_negative(int),
         help="compressed bytes per second that background preparation may read (0: no "
              "bound beyond its idle I/O priority, which NFS ignores)")
    _add(serve, "--htpasswd", default=None, type=readable_file_arg,
         help="htpasswd file with bcrypt hashes: require HTTP basic auth; re-read when it "
              "changes (default: anonymous)")
    _add(serve, "--max-connections", default=DEFAULTS.max_connections,
         type=_non_negative(int),
         help="requests in flight per worker; beyond it new requests get 429 with Retry-After "
              "(0: no limit)")
    _add_bool(serve, "--allow-outside-symlinks", default=False,
              help="serve archives whose symlinks resolve outside the image directory")
    _add_inventory_commands(commands)
    return parser


def _add_inventory_commands(commands: Any) -> None:
    """``ls`` and ``check``: the directory as the server sees it, without starting one."""
    ls = commands.add_parser("ls", help="list every name:tag the directory serves")
    check = commands.add_parser(
        "check", help="validate every archive (structure, blob digests, duplicate tags); "
                      "exit 1 on problems. With --images FILE: tell which image references "
                      "the directory serves instead; exit 1 when any is missing")
    for parser in (ls, check):
        _add(parser, "--dir", default=DEFAULTS.directory, type=directory_arg,
             help="the image directory")
        _add_bool(parser, "--json", default=False, help="print JSON instead of text")
        _add_bool(parser, "--allow-outside-symlinks", default=False,
                  help="follow symlinks that resolve outside the image directory, as serve "
                       "does with the same flag")
    _add_bool(ls, "--full-digests", default=False, help="show digests untruncated")
    publish = commands.add_parser(
        "publish", help="validate an archive as check does, then copy it into the image "
                        "directory atomically (temporary name, fsync, rename)")
    publish.add_argument("source", help="the .oci archive to publish")
    publish.add_argument("target", help="where it goes, e.g. DIR/NAME/TAG.oci")
    check.add_argument("--images", metavar="FILE", default=None,
                       help="image references, one per line or space-separated ('-' reads "
                            "stdin), normalised as container runtimes do (nginx is "
                            "docker.io/library/nginx:latest) and looked up where mirror mode "
                            "keeps them; reports which are served, missing or malformed")
    env = _env_name("--progress")
    env_value = os.environ.get(env)
    check.add_argument("--progress", action=argparse.BooleanOptionalAction,
                       default=_bool(env_value) if env_value is not None else None,
                       help="print one line per archive to stderr [env SOR_PROGRESS; "
                            "default: when stderr is a terminal]")


def config_from_args(args: argparse.Namespace) -> Config:
    host, port = args.listen
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("simple-oci-registry: --tls-cert and --tls-key go together")
    return Config(
        directory=args.dir, host=host, port=port, workers=max(1, args.workers),
        rescan_interval=args.rescan_interval,
        tls_cert=args.tls_cert, tls_key=args.tls_key, log_level=args.log_level,
        log_format=args.log_format, access_log=args.access_log,
        shutdown_timeout=args.shutdown_timeout, cache_dir=args.cache_dir,
        cache_max_bytes=args.cache_max_bytes, htpasswd=args.htpasswd,
        max_connections=args.max_connections, grace_period=args.grace_period,
        allow_outside_symlinks=args.allow_outside_symlinks,
        prepare_ahead=args.prepare_ahead, prepare_read_rate=args.prepare_read_rate)


def _listen(config: Config) -> socket.socket:
    """The one listening socket of this server, inherited by every worker.

    SO_REUSEADDR only lets a restarted server bind while connections of its predecessor sit
    in TIME_WAIT; it never lets two listeners share a port. SO_REUSEPORT is deliberately
    not set: any process of the same user could then join the port and take a share of the
    connections (a second registry with another --dir answering 404 for every other pull).
    """
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, config.port))
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


async def _serve_socket(config: Config, sock: socket.socket) -> None:
    """Run one worker on a listening socket until SIGTERM/SIGINT, then drain and exit."""
    # Imported here so that prometheus-client sees PROMETHEUS_MULTIPROC_DIR set by serve().
    from simple_oci_registry.app import make_app

    registry = make_app(config)
    server = registry.server(
        access_log=logging.getLogger(ACCESS_LOGGER) if config.access_log else None,
        access_log_class=AccessLogger, keepalive_timeout=15.0,
        # Bounds on what a client may send before we answer (documented in README).
        max_line_size=8190, max_field_size=8190)
    runner = web.ServerRunner(server, handle_signals=False,
                              shutdown_timeout=config.shutdown_timeout)
    await runner.setup()
    await registry.startup()
    tls = ReloadingTLS(config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key \
        else None
    # asyncio takes "backlog" both for listen() and as the number of connections one worker
    # accepts per wake-up. Workers share one accept queue, so a worker that drained a burst
    # of connections alone would serve all of them while the others idle: each worker takes
    # one connection per wake-up, and the queue keeps its full length (listen() again).
    site = web.SockSite(runner, sock, ssl_context=tls.context if tls else None,
                        backlog=1 if config.workers > 1 else _BACKLOG)
    await site.start()
    sock.listen(_BACKLOG)
    watcher = asyncio.create_task(tls.watch()) if tls else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining in-flight requests for up to %.0fs",
             config.shutdown_timeout)
    if watcher is not None:
        watcher.cancel()
    # Stops accepting, lets in-flight transfers finish up to shutdown_timeout, then cancels.
    await runner.cleanup()
    await registry.cleanup()


def _start_pin_service(table: PinTable) -> tuple[socket.socket, socket.socket]:
    """A socket pair for one worker: the supervisor's end is served by a thread."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    threading.Thread(target=serve_pins, args=(table, ours), name="pins", daemon=True).start()
    return ours, theirs


def _sweep_pins(table: PinTable, interval: float) -> None:
    while True:
        time.sleep(interval)
        try:
            table.sweep()
        except Exception:  # keep sweeping whatever one pass hit
            log.exception("pin sweep failed")


def _supervise(config: Config, sock: socket.socket) -> int:
    """Fork the workers, which accept from ``sock``, and keep them running until told to stop.

    A worker that dies is replaced; workers that keep dying right after they start (a bad
    certificate, an unusable directory) make the supervisor give up and exit non-zero, so
    the pod restarts visibly instead of holding the port with nobody answering.
    """
    children: dict[int, int] = {}
    started: dict[int, float] = {}
    # The node's pins live here, in the one process that outlives every worker (pins.py).
    table = PinTable(config.root, config.grace_period) if pins_usable() else None
    if table is not None:
        interval = max(1.0, min(config.grace_period, config.rescan_interval or 60.0) / 4)
        threading.Thread(target=_sweep_pins, args=(table, interval), name="pin-sweep",
                         daemon=True).start()
    signalled: set[int] = set()  # workers told to stop: their exit status is the shutdown's
    quick_failures = 0
    stopping = False

    def spawn(slot: int) -> None:
        pair = _start_pin_service(table) if table is not None else None
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            code = 0
            worker_config = config
            if pair is not None:
                pair[0].detach()  # the supervisor's end: not this process's to use or close
                worker_config = dataclasses.replace(config, pin_socket_fd=pair[1].detach())
            try:
                asyncio.run(_serve_socket(worker_config, sock))
            except BaseException:
                log.exception("worker failed")
                code = 1
            # os._exit skips atexit: write out the buffered log lines (logs.LogOutput) first.
            logging.shutdown()
            os._exit(code)
        if pair is not None:
            pair[1].close()
        children[pid] = slot
        started[pid] = time.monotonic()

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        # The socket closes for good once the workers have closed their copies too, so new
        # clients are refused (and try another node) rather than queued for nobody.
        sock.close()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
                signalled.add(pid)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for slot in range(config.workers):
        spawn(slot)
    exit_code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        slot = children.pop(pid, -1)
        if slot < 0:
            continue
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
        lived = time.monotonic() - started.pop(pid, 0.0)
        quick_failures = quick_failures + 1 if lived < _QUICK_FAILURE_SECONDS else 0
        if not stopping and quick_failures >= _MAX_QUICK_FAILURES:
            log.error("workers keep failing right after they start; giving up")
            forward(signal.SIGTERM, None)
            exit_code = 1
        elif not stopping:
            log.error("worker %d exited (status %d); starting a new one", pid, status)
            time.sleep(0.5)  # no tight restart loop if a worker dies at once
            if not stopping:  # SIGTERM may have arrived during the pause
                spawn(slot)
        elif pid not in signalled:
            # Died on its own just before the stop request (a worker killed and not yet
            # reaped): reported, but not a failure of the shutdown itself.
            log.error("worker %d exited (status %d) while stopping", pid, status)
        elif os.waitstatus_to_exitcode(status) not in (0, -signal.SIGTERM, -signal.SIGINT):
            exit_code = 1
    return exit_code


def serve(config: Config) -> int:
    configure_logging(config.log_level, config.log_format)
    metrics_dir: str | None = None
    if config.workers > 1 and not os.environ.get(MULTIPROC_ENV):
        # Workers share metric values through files here (prometheus-client multiprocess mode).
        metrics_dir = tempfile.mkdtemp(prefix="simple-oci-registry-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        return _serve(config)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _raise_open_files_limit() -> None:
    """Use the hard limit on open descriptors: every connection and every open blob holds
    one, and the soft limit (often 1024) would make accept() fail under a burst of pulls or
    a crowd of slow clients long before memory or CPU run out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _serve(config: Config) -> int:
    _raise_open_files_limit()
    try:
        sock = _listen(config)
    except OSError as exc:
        # An operator's mistake (port taken, address not on this host, privileged port), not
        # a bug: one line that names the address, and a failed exit for the service manager.
        shown = f"[{config.host}]" if ":" in config.host else config.host
        reason = (exc.strerror or str(exc)).lower()
        if exc.errno == errno.EADDRINUSE:
            reason += " (another program or another registry holds this port)"
        print(f"simple-oci-registry: error: cannot listen on {shown}:{config.port}: {reason}",
              file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    scheme = "https" if config.tls_cert else "http"
    shown_host = f"[{host}]" if ":" in host else host
    print(f"simple-oci-registry {__version__} serving {config.directory} on "
          f"{scheme}://{shown_host}:{port}/ with {config.workers} worker(s)", flush=True)
    log.info("gzip archives are decompressed with %s", GZIP.name)
    if config.workers == 1:
        asyncio.run(_serve_socket(config, sock))
        return 0
    return _supervise(config, sock)


def _table(rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> list[str]:
    """Rows as aligned columns (``right``: column numbers aligned right, such as sizes)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                 for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return lines


def _ls_row(entry: ImageEntry, full_digests: bool) -> list[str]:
    digest = entry.digest
    if not full_digests:
        algorithm, _, encoded = digest.partition(":")
        digest = f"{algorithm}:{encoded[:12]}"
    return [entry.upstream, entry.tag if entry.tag is not None else "<none>", digest,
            ",".join(entry.platforms) or "-", human_size(entry.size), entry.file]


def run_ls(args: argparse.Namespace) -> int:
    listing = list_images(os.path.realpath(args.dir), allow_outside=args.allow_outside_symlinks)
    for problem in listing.problems:
        print(f"warning: {problem.file}: {problem.reason}", file=sys.stderr)
    if args.json:
        print(json.dumps([entry.to_json() for entry in listing.entries], indent=2))
        return 0
    if not listing.entries:
        print(f"no images in {args.dir}", file=sys.stderr)
        return 0
    header = ["NAME", "TAG", "DIGEST", "PLATFORMS", "SIZE", "FILE"]
    rows = [header, *(_ls_row(entry, args.full_digests) for entry in listing.entries)]
    for line in _table(rows, right=frozenset({4})):
        print(line)
    return 0


def _print_progress(step: CheckProgress) -> None:
    outcome = "ok" if not step.problems else (
        f"{step.problems} problem{'s' if step.problems != 1 else ''}")
    print(f"[{step.index}/{step.total}] {step.file} {outcome}", file=sys.stderr, flush=True)


def _read_images_file(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    try:
        return Path(name).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise SystemExit(f"simple-oci-registry: check --images: cannot read {name}: "
                         f"{exc.strerror or exc}") from None


def run_check_images(args: argparse.Namespace) -> int:
    """``check --images FILE``: which references of a cluster the directory serves."""
    references = read_references(_read_images_file(args.images))
    results = check_images(os.path.realpath(args.dir), references,
                           allow_outside=args.allow_outside_symlinks)
    counts = {status: sum(1 for r in results if r.status is status) for status in ImageStatus}
    ok = counts[ImageStatus.SERVED] == len(results)
    if args.json:
        print(json.dumps({"ok": ok, "images": [r.to_json() for r in results]}, indent=2))
        return 0 if ok else 1
    rows = [["STATUS", "IMAGE", "WRITTEN", "DETAIL"]]
    for result in results:
        detail = _short_digest(result.digest) if result.digest else result.reason
        if result.status is ImageStatus.MISSING:
            detail += f" (looked under {result.repository}/)"
        shown = result.reference or result.written
        rows.append([str(result.status), shown,
                     result.written if result.written != shown else "", detail])
    if results:
        for line in _table(rows):
            print(line)
    summary = ", ".join(f"{counts[s]} {s}" for s in ImageStatus)
    print(f"{len(results)} image reference{'s' if len(results) != 1 else ''}: {summary}")
    return 0 if ok else 1


def _short_digest(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm}:{encoded[:12]}"


def run_check(args: argparse.Namespace) -> int:
    if args.images is not None:
        return run_check_images(args)
    show_progress = args.progress if args.progress is not None else sys.stderr.isatty()
    started = time.monotonic()
    report = check_directory(os.path.realpath(args.dir),
                             allow_outside=args.allow_outside_symlinks,
                             progress=_print_progress if show_progress else None)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for problem in report.problems:
            print(f"{problem.file}: {problem.kind}: {problem.reason}")
        count = len(report.problems)
        verdict = "no problems" if report.ok else f"{count} problem{'s' if count != 1 else ''}"
        print(f"checked {report.archives_checked} archives, hashed {report.blobs_hashed} blobs "
              f"({human_size(report.bytes_hashed)}) in {time.monotonic() - started:.1f}s: "
              f"{verdict}")
    return 0 if report.ok else 1


def run_publish(args: argparse.Namespace) -> int:
    try:
        done = publish(args.source, args.target)
    except PublishError as exc:
        print(f"simple-oci-registry publish: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"simple-oci-registry publish: {exc.filename or args.target}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"published {done.target} ({human_size(done.size)})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0] not in SUBCOMMANDS
                         and args_list[0] not in ("-h", "--help", "--version")):
        args_list.insert(0, "serve")  # the original took "--dir" with no subcommand
    args = build_parser().parse_args(args_list)
    if args.command == "serve":
        config = config_from_args(args)
        if args.freshness_window is not None:
            # Retired, not refused: a DaemonSet written for an older version keeps starting.
            configure_logging(config.log_level, config.log_format)
            log.warning("--freshness-window is ignored: every request checks the directory by "
                        "stat, and NFS actimeo sets how fresh that is")
        return serve(config)
    if args.command == "ls":
        return run_ls(args)
    if args.command == "check":
        return run_check(args)
    if args.command == "publish":
        return run_publish(args)
    build_parser().print_help()
    return 2
