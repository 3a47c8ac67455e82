"""``make_app(config)``: the one constructor of the registry, shared by the CLI and the tests.

The registry is served by aiohttp's low-level :class:`aiohttp.web.Server` with one request
pipeline (:meth:`Registry.handle`) instead of an ``Application`` with a router and a chain of
middlewares: routing is our own (:mod:`routes` parses /v2/ paths by their last keyword), so the
router would add nothing, and on two cores the router and middleware machinery cost a third of
the manifest request rate (measured: 22k req/s for an empty ``Application`` handler against 32k
for ``web.Server``; nginx serves 105k on the same machine).

The pipeline does, in order, what middlewares would: count the request once in metrics from its
final status; render every failure from the catalogue in :mod:`errors` (unexpected ones are
logged, never shown); refuse requests past the in-flight limit; check basic auth when enabled.
Background tasks (periodic rescan, metrics sync) run between :meth:`Registry.startup` and
:meth:`Registry.cleanup`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import hdrs, web

from simple_oci_registry.auth import BasicAuth
from simple_oci_registry.catalogpage import CatalogPage
from simple_oci_registry.config import Config
from simple_oci_registry.errors import ErrorCode, RegistryError
from simple_oci_registry.handlers import Handlers
from simple_oci_registry.headers import API_VERSION, API_VERSION_VALUE
from simple_oci_registry.logs import was_cut_short
from simple_oci_registry.metrics import Metrics
from simple_oci_registry.pins import PinClient
from simple_oci_registry.preparation import PreparationStatus, Preparer, read_status
from simple_oci_registry.routes import Route, parse_v2_path
from simple_oci_registry.store import ImageStore

__all__ = ["Registry", "make_app", "render_error"]

log = logging.getLogger(__name__)

READY_TIMEOUT: Final = 2.0
METRICS_SYNC_SECONDS: Final = 5.0
_READ_METHODS: Final = frozenset({hdrs.METH_GET, hdrs.METH_HEAD})

Operation = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def render_error(error: RegistryError) -> web.Response:
    """The spec's JSON error envelope with the catalogue's status (the only renderer)."""
    headers = {API_VERSION: API_VERSION_VALUE, hdrs.CONTENT_TYPE: "application/json"}
    headers.update(error.headers)
    return web.Response(status=error.status, body=error.body(), headers=headers)


class Registry:
    """The registry's state and its request pipeline."""

    def __init__(self, config: Config) -> None:
        self.config = config
        pins = None
        if config.pin_socket_fd is not None:
            pins = PinClient(socket.socket(fileno=config.pin_socket_fd))
        self.store = ImageStore(config, pins=pins)
        self.handlers = Handlers(self.store)
        self.preparer = Preparer.create(config, self.store.cache)
        self.metrics = Metrics()
        self.auth = BasicAuth(config.htpasswd) if config.htpasswd is not None else None
        self.in_flight = 0
        self._tasks: list[asyncio.Task[None]] = []
        # Endpoints outside /v2/, by exact path. Probes and metrics stay open under auth.
        self._operations: dict[str, tuple[str, Operation]] = {
            "/healthz": ("healthz", self.healthz),
            "/readyz": ("readyz", self.readyz),
            "/metrics": ("metrics", self.metrics_page),
            "/": ("catalog-page", CatalogPage(config, auth=self.auth,
                                              preparation=self._preparation_status).handle),
        }

    # ------------------------------------------------------------------ lifecycle

    async def startup(self) -> None:
        """Read the image directory's listing and start the background tasks (call once the
        event loop runs, before accepting connections)."""
        await self.store.prime()
        if self.config.rescan_interval > 0:  # 0 disables the periodic rescan
            self._tasks.append(asyncio.create_task(self._rescan_loop(), name="rescan"))
        self._tasks.append(asyncio.create_task(self._metrics_loop(), name="metrics-sync"))
        if self.preparer is not None:
            self._tasks.append(asyncio.create_task(self.preparer.run(), name="preparation"))

    async def cleanup(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.preparer is not None:
            await self.preparer.close()
        if self.auth is not None:
            self.auth.close()
        self.store.close()
        self.metrics.flush()  # the last requests' tally, before the worker exits

    def server(self, **kwargs: object) -> web.Server:
        """The aiohttp protocol factory serving this registry (kwargs go to ``web.Server``)."""
        return web.Server(self.handle, **kwargs)  # type: ignore[arg-type]

    async def _rescan_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.rescan_interval)
            try:
                await self.store.rescan()
            except Exception:  # keep rescanning whatever one pass hit
                log.exception("periodic rescan failed")

    async def _metrics_loop(self) -> None:
        """Keep store figures current in shared metrics even when this worker gets no scrape."""
        while True:
            await asyncio.sleep(METRICS_SYNC_SECONDS)
            self.metrics.sync(self.store, self.preparer)

    def _preparation_status(self) -> PreparationStatus | None:
        """Background preparation's progress for the catalog page (blocking: may read the
        status file the node's preparing worker, possibly another one, wrote)."""
        if self.preparer is None or self.store.cache is None:
            return None
        if self.preparer.active:
            return self.preparer.status
        return read_status(self.store.cache.directory)

    # ------------------------------------------------------------------ pipeline

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer one request; every outcome is counted once, every error rendered here."""
        started = time.perf_counter()
        endpoint, status, sent = "unknown", 500, 0
        try:
            path = request.path
            try:
                if path == "/v2" or path.startswith("/v2/"):
                    # "/v2" (no trailing slash) is the same API check as "/v2/".
                    route = parse_v2_path(path[4:])
                    if route is None:
                        raise RegistryError(ErrorCode.NOT_FOUND, {"path": path[:200]})
                    endpoint = route.endpoint.label
                    response = await self._guarded(request, route)
                else:
                    operation = self._operations.get(path)
                    if operation is None:
                        raise RegistryError(ErrorCode.NOT_FOUND, {"path": path[:200]})
                    endpoint = operation[0]
                    if request.method not in _READ_METHODS:
                        raise RegistryError(ErrorCode.METHOD_NOT_ALLOWED,
                                            headers={hdrs.ALLOW: "GET, HEAD"})
                    response = await operation[1](request)
            except RegistryError as error:
                response = render_error(error)
            except (ConnectionError, asyncio.CancelledError):
                # The client went away (reset, or EPIPE from sendfile) or the transfer was
                # aborted: nothing to answer, nothing to log as an error (nginx's 499).
                status = 499
                raise
            except Exception:
                log.exception("unexpected error serving %s %s", request.method, path[:200])
                response = render_error(RegistryError(ErrorCode.UNKNOWN))
            status = response.status
            if was_cut_short(request):
                status = 499  # answered in part: the client left or the transfer was aborted
            elif request.method != hdrs.METH_HEAD and response.prepared:
                sent = response.content_length or response.body_length
            elif request.method != hdrs.METH_HEAD:
                sent = response.content_length or 0
            return response
        finally:
            self.metrics.observe(endpoint, request.method, status, sent,
                                 time.perf_counter() - started)

    async def _guarded(self, request: web.BaseRequest, route: Route) -> web.StreamResponse:
        """Apply the in-flight limit, basic auth and the method check, then the handler.

        Credentials come before the method check, as in distribution: an anonymous client of a
        protected registry learns it must authenticate (401), whatever it tried.
        """
        limit = self.config.max_connections
        if limit and self.in_flight >= limit:
            # aiohttp answers one request at a time per connection, so requests in flight
            # are the busy connections; refuse past the limit rather than queue without bound.
            raise RegistryError(ErrorCode.TOOMANYREQUESTS, {"limit": limit},
                                headers={hdrs.RETRY_AFTER: "1"})
        self.in_flight += 1
        try:
            if self.auth is not None:
                await self.auth.check(request.headers.get(hdrs.AUTHORIZATION))
            if request.method not in route.endpoint.methods:
                # Read-only: uploads, manifest PUT and DELETE are refused as distribution's
                # read-only mode does (405), with the spec's JSON error and Allow.
                raise RegistryError(
                    ErrorCode.UNSUPPORTED, {"method": request.method},
                    headers={hdrs.ALLOW: ", ".join(sorted(route.endpoint.methods))})
            return await self.handlers.handle(request, route)
        finally:
            self.in_flight -= 1

    # ------------------------------------------------------------------ operations

    async def healthz(self, request: web.BaseRequest) -> web.Response:
        """Liveness: the event loop answers."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.BaseRequest) -> web.Response:
        """Readiness: the image directory can be listed (a hung NFS mount is not ready)."""
        try:
            ready = await asyncio.wait_for(asyncio.to_thread(self.store.ready), READY_TIMEOUT)
        except TimeoutError:
            ready = False
        if not ready:
            return web.json_response({"status": "image directory not readable"}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics_page(self, request: web.BaseRequest) -> web.Response:
        self.metrics.sync(self.store, self.preparer)
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type})


def make_app(config: Config) -> Registry:
    """Build the registry for ``config``."""
    return Registry(config)
