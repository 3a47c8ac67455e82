"""Log setup: plain text for people, one JSON object per line for log collectors.

The access log goes through the same formatter, so with ``--log-format json`` every line a node
emits (requests and events alike) parses as JSON.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

__all__ = ["CUT_SHORT", "AccessLogger", "JsonFormatter", "configure_logging"]

ACCESS_LOGGER: Final = "simple_oci_registry.access"
# Request key: set to True on a request whose response went out in part only (see AccessLogger).
CUT_SHORT: Final = web.RequestKey("cut_short", bool)
# Probes and scrapes arrive every few seconds on every node: logged at debug level only.
_QUIET_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})
_STANDARD_ATTRS: Final = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON object: time, level, logger, message, and any extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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


class AccessLogger(AbstractAccessLogger):
    """One line per request with the fields operators filter on, as ``extra`` attributes."""

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
        complete = not request.get(CUT_SHORT, False)
        size = _body_bytes(request, response) if complete else None
        self.logger.log(
            level, '%s "%s %s" %d %s %.3fs%s', remote, request.method, request.path_qs[:300],
            response.status, "-" if size is None else size, time,
            "" if complete else " cut short",
            extra={"remote": remote, "method": request.method, "path": request.path[:300],
                   "status": response.status, "bytes": size, "complete": complete,
                   "duration_s": round(time, 6),
                   "user_agent": request.headers.get("User-Agent", "")[:200]})


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


def configure_logging(level: str, fmt: str) -> None:
    """Install one stderr handler on the root logger with the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
