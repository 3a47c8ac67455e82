"""Log setup: plain text for people, one JSON object per line for log collectors.

The access log goes through the same output and the same formats, so with ``--log-format json``
every line a node emits (requests and events alike) parses as JSON.

Every line leaves through one :class:`LogOutput` per process, which writes to stderr from a
background thread in batches. Two things made this necessary (issue 12): writing one line per
request through :mod:`logging` (a record, a formatter, ``strftime``, a locked ``write`` and a
``flush`` each time) halved the manifest request rate; and a blocking write on the event loop
thread stops all serving as soon as whoever reads stderr falls behind and the pipe fills. So
the event loop only appends a line to a bounded buffer; past that bound lines are *dropped and
counted* (``registry_log_lines_dropped_total`` in ``/metrics``, and a warning line once the
output drains), never waited for.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import select
import stat
import sys
import threading
import time
import weakref
from json.encoder import encode_basestring_ascii
from typing import IO, Any, Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

__all__ = ["ACCESS_LOGGER", "CUT_SHORT", "AccessLogger", "JsonFormatter", "LogOutput",
           "configure_logging", "dropped_lines", "was_cut_short"]

ACCESS_LOGGER: Final = "simple_oci_registry.access"
# Request key: set to True on a request whose response went out in part only (see AccessLogger).
CUT_SHORT: Final = web.RequestKey("cut_short", bool)


def was_cut_short(request: web.BaseRequest) -> bool:
    """Whether the request's response went out in part only (see CUT_SHORT).

    len() first: most requests carry no keys, and Mapping.get's miss (a KeyError raised and
    caught) costs more than the rest of this check; it runs twice per request (metrics and
    the access log).
    """
    return bool(len(request) and request.get(CUT_SHORT, False))


# Probes and scrapes arrive every few seconds on every node: logged at debug level only.
_QUIET_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})
_STANDARD_ATTRS: Final = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Unwritten log text one process keeps before it drops lines: ~25,000 access lines, a few
# seconds of a busy node, so a reader that pauses briefly loses nothing.
BUFFER_CHARS: Final = 4 << 20
# A batch is written once this much is waiting, or DELAY seconds after its first line.
BATCH_CHARS: Final = 64 << 10
DELAY: Final = 0.1
# A clean shutdown waits this long for the reader to take what is left.
CLOSE_TIMEOUT: Final = 5.0
# POSIX makes a pipe write of at most PIPE_BUF bytes atomic: with several workers on one
# pipe, writes cut at line ends no longer than this never interleave inside a line.
_PIPE_BUF: Final = select.PIPE_BUF


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON object: time, level, logger, message, and any extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _json_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _json_time(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) \
        + f".{int(created % 1 * 1000):03d}Z"


class _Clock:
    """The access log's timestamp, formatted once per second (``strftime`` costs more than
    the rest of the line), in the same form its output's formatter would write."""

    def __init__(self, json_format: bool) -> None:
        self._json = json_format
        self._second = -1
        self._prefix = ""

    def stamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            if self._json:
                self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            else:  # logging.Formatter's default asctime: local time, comma, milliseconds
                self._prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        millis = int((now - second) * 1000)
        return f"{self._prefix}.{millis:03d}Z" if self._json else f"{self._prefix},{millis:03d}"


class LogOutput(logging.Handler):
    """A handler that never blocks its caller: lines go to a bounded buffer, a background
    thread writes them to ``stream`` in batches.

    ``write_line`` is the access log's way in (a line formatted without a record); ``emit``
    takes ordinary records. Warnings and errors are written at once, by the caller when that
    cannot block (see _write_now); the rest within ``DELAY`` seconds or as soon as a batch is
    full. When the buffer is full a line is dropped and
    counted (``dropped``); once the output takes lines again, a warning says how many went.
    ``flush`` and ``close`` (run by :func:`logging.shutdown` at exit) wait for the buffer to be
    written, at most ``CLOSE_TIMEOUT`` seconds, so a clean shutdown loses nothing unless the
    reader has stopped reading.
    """

    def __init__(self, stream: IO[str], *, json_format: bool, buffer_chars: int = BUFFER_CHARS,
                 batch_chars: int = BATCH_CHARS, delay: float = DELAY) -> None:
        super().__init__()
        self.stream = stream
        self.json_format = json_format
        self.clock = _Clock(json_format)
        self.setFormatter(JsonFormatter() if json_format else logging.Formatter(TEXT_FORMAT))
        self._buffer_chars = buffer_chars
        self._batch_chars = batch_chars
        self._delay = delay
        self._fd: int | None = None
        self._chunk = 0
        try:
            fd = stream.fileno()
            # Regular files: one write per batch. Pipes, sockets, terminals: see _PIPE_BUF.
            self._chunk = 0 if stat.S_ISREG(os.fstat(fd).st_mode) else _PIPE_BUF
            self._fd = fd
        except (OSError, ValueError, AttributeError):  # no descriptor (a test's StringIO)
            pass
        self.dropped = 0  # lines dropped since this process started
        self._reset()
        # A forked worker must not inherit the parent's thread (it does not run in the
        # child), its lock (possibly held) or its pending lines (the parent writes those).
        os.register_at_fork(after_in_child=functools.partial(_after_fork, weakref.ref(self)))

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the writer waits here for lines
        self._drained = threading.Condition(self._lock)  # flush() waits here for the writer
        self._pending: list[str] = []
        self._pending_chars = 0
        self._writing_chars = 0
        self._urgent = False
        self._closing = False
        self._unreported = 0  # dropped lines not yet announced in the output
        self._thread: threading.Thread | None = None

    def write_line(self, line: str, urgent: bool = False) -> bool:
        """Queue one line (ending in a newline); False when it was dropped."""
        size = len(line)
        with self._lock:
            if self._pending_chars + self._writing_chars + size > self._buffer_chars \
                    or self._closing:
                self.dropped += 1
                self._unreported += 1
                return False
            wake = not self._pending or urgent
            self._pending.append(line)
            self._pending_chars += size
            if urgent:
                self._urgent = True
            if self._pending_chars >= self._batch_chars:
                wake = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="log-output",
                                                daemon=True)
                self._thread.start()
            if wake:
                self._work.notify()
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        urgent = record.levelno >= logging.WARNING
        if urgent and self._write_now(line):
            return
        self.write_line(line, urgent=urgent)

    def _write_now(self, line: str) -> bool:
        """Write a warning or error in the caller's thread, if that cannot block.

        So it is out before whatever the caller does next (an error response, an exit): an
        operator or a test reading the log after a failed request finds its reason there. A
        line no longer than PIPE_BUF goes into a pipe that poll() calls writable without
        waiting; a regular file always takes it. Otherwise (a full pipe, a long traceback)
        the line is queued like the rest, never waited for. It may overtake access lines
        still queued: their timestamps keep the order.
        """
        if self._fd is None:
            return False
        data = line.encode("utf-8", "backslashreplace")
        if self._chunk and len(data) > self._chunk:
            return False
        with self._lock:
            if self._closing:
                return False
            try:
                if self._chunk:
                    poller = select.poll()
                    poller.register(self._fd, select.POLLOUT)
                    if not poller.poll(0):
                        return False
                done = 0
                while done < len(data):  # a pipe takes it whole; a file nearly always does
                    done += os.write(self._fd, data[done:])
            except OSError:
                return False
        return True

    def flush(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Wait until every queued line is written (or ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._thread is None:
                return
            self._urgent = True
            self._work.notify()
            while self._pending or self._writing_chars:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._drained.wait(left)

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._closing = True
            self._work.notify()
        super().close()

    # ------------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._work.wait()
                if not self._pending:  # closing, all written
                    return
                if not self._urgent and self._pending_chars < self._batch_chars:
                    self._work.wait(self._delay)  # let a batch gather
                lines, self._pending = self._pending, []
                self._writing_chars, self._pending_chars = self._pending_chars, 0
                self._urgent = False
            self._write("".join(lines))
            with self._lock:
                self._writing_chars = 0
                notice, self._unreported = self._unreported, 0
                self._drained.notify_all()
            if notice:
                self._write(self._notice(notice))

    def _notice(self, count: int) -> str:
        record = logging.LogRecord(
            __name__, logging.WARNING, __file__, 0,
            "%d log line(s) dropped: stderr was not read fast enough", (count,), None)
        record.dropped_lines = count
        return self.format(record) + "\n"

    def _write(self, text: str) -> None:
        data = text.encode("utf-8", "backslashreplace")
        if self._fd is None:
            self.stream.write(text)
            self.stream.flush()
            return
        start = 0
        while start < len(data):
            end = len(data)
            if self._chunk and end - start > self._chunk:
                cut = data.rfind(b"\n", start, start + self._chunk)
                # A line longer than PIPE_BUF cannot be atomic anyway: cut it.
                end = cut + 1 if cut >= start else start + self._chunk
            try:
                start += self._write_some(data, start, end)
            except OSError:
                # The reader is gone (EPIPE) or the descriptor is: these lines are lost.
                lost = data.count(b"\n", start)
                with self._lock:
                    self.dropped += lost
                return

    def _write_some(self, data: bytes, start: int, end: int) -> int:
        assert self._fd is not None
        view = memoryview(data)[start:end]
        try:
            return os.write(self._fd, view)
        except BlockingIOError:
            # Someone made the shared descriptor non-blocking: wait until it takes more.
            select.select([], [self._fd], [], 1.0)
            return 0


def _after_fork(output: weakref.ref[LogOutput]) -> None:
    handler = output()
    if handler is not None:
        handler.dropped = 0
        handler._reset()


def dropped_lines() -> int:
    """Lines this process's log output has dropped so far (0 without a LogOutput)."""
    return sum(h.dropped for h in logging.getLogger().handlers if isinstance(h, LogOutput))


def _only_output(logger: logging.Logger) -> LogOutput | None:
    """The LogOutput that alone receives ``logger``'s records, if one does (the access log's
    fast path bypasses records, so it is taken only when no other handler would see them)."""
    found: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        found.extend(current.handlers)
        current = current.parent if current.propagate else None
    if len(found) == 1 and isinstance(found[0], LogOutput) and found[0].level == logging.NOTSET:
        return found[0]
    return None


class AccessLogger(AbstractAccessLogger):
    """One line per request with the fields operators filter on.

    aiohttp makes one per connection. When the process logs through a :class:`LogOutput`
    alone (a served registry), the line is formatted here, as the output's formatter would
    write it, and queued directly: a :class:`logging.LogRecord` per request costs more than
    the request. Otherwise (tests capturing records) it is an ordinary record whose fields are
    ``extra`` attributes.
    """

    __slots__ = ("_output",)

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._output = _only_output(logger)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        level = logging.DEBUG if request.path in _QUIET_PATHS and response.status < 400 \
            else logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        remote = request.remote or "-"
        # A transfer cut short after its headers (client hang-up, or aborted because its
        # source changed) is logged with the status the headers carried. aiohttp sees such a
        # response as finished, so whoever cuts it short marks the request (CUT_SHORT): its
        # body size is then unknown (sendfile does not say how much the client got), and it
        # must not be logged as the Content-Length it promised.
        complete = not was_cut_short(request)
        size = _body_bytes(request, response) if complete else None
        message = (f'{remote} "{request.method} {request.path_qs[:300]}" {response.status} '
                   f'{"-" if size is None else size} {time:.3f}s'
                   f'{"" if complete else " cut short"}')
        output = self._output
        if output is not None and not output.json_format:
            if "\n" in message or "\r" in message:  # a decoded %0A in the path: keep one line
                message = message.replace("\r", "\\r").replace("\n", "\\n")
            name = "INFO" if level == logging.INFO else "DEBUG"
            stamp = output.clock.stamp(_now())
            output.write_line(f"{stamp} {name} {self.logger.name}: {message}\n")
            return
        path = request.path[:300]
        agent = request.headers.get("User-Agent", "")[:200]
        if output is None:
            self.logger.log(level, "%s", message, extra={
                "remote": remote, "method": request.method, "path": path,
                "status": response.status, "bytes": size, "complete": complete,
                "duration_s": round(time, 6), "user_agent": agent})
            return
        # What JsonFormatter makes of the record above (same keys, order and spacing; a test
        # holds them equal), written out directly: json.dumps of a dict costs twice as much.
        output.write_line(
            f'{{"time": "{output.clock.stamp(_now())}", '
            f'"level": "{"info" if level == logging.INFO else "debug"}", '
            f'"logger": {_quote(self.logger.name)}, "message": {_quote(message)}, '
            f'"remote": {_quote(remote)}, "method": {_quote(request.method)}, '
            f'"path": {_quote(path)}, "status": {response.status}, '
            f'"bytes": {"null" if size is None else size}, '
            f'"complete": {"true" if complete else "false"}, '
            f'"duration_s": {round(time, 6)!r}, "user_agent": {_quote(agent)}}}\n')


_quote: Final = encode_basestring_ascii  # a JSON string literal, as json.dumps writes it
_now: Final = time.time


def _body_bytes(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """Body bytes of a completed response, headers excluded.

    Not ``body_length``: aiohttp counts the header block in it and nothing that ``sendfile``
    sent, so a 145-byte blob was logged as 462 bytes and a 64 MiB one as a few hundred. For a
    complete response the Content-Length is what went out.
    """
    if request.method == "HEAD" or response.status in (204, 304) or response.status < 200:
        return 0
    if response.content_length is not None:
        return response.content_length
    return response.body_length  # chunked: the best figure aiohttp has


def configure_logging(level: str, fmt: str) -> LogOutput:
    """Send every log record to stderr through one :class:`LogOutput` in the chosen format."""
    output = LogOutput(sys.stderr, json_format=fmt == "json")
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [output]
    root.setLevel(level.upper())
    return output
