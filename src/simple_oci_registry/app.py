"""``make_app(config)``: the one constructor of the web application, shared by CLI and tests.

It wires the store, the /v2/ dispatcher, the middlewares (metrics outermost, so every final
status is counted once; then the error renderer for the catalogue in :mod:`errors`; then the
in-flight limit and optional basic auth), the operational endpoints (``/healthz``, ``/readyz``,
``/metrics``) and the background tasks tied to the application's lifetime (periodic rescan,
metrics sync).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

from aiohttp import hdrs, web

from simple_oci_registry.auth import BasicAuth
from simple_oci_registry.catalogpage import CatalogPage
from simple_oci_registry.config import Config
from simple_oci_registry.errors import ErrorCode, RegistryError
from simple_oci_registry.handlers import Handlers
from simple_oci_registry.headers import API_VERSION, API_VERSION_VALUE
from simple_oci_registry.metrics import Metrics
from simple_oci_registry.routes import parse_v2_path
from simple_oci_registry.store import ImageStore

__all__ = ["CONFIG", "STORE", "make_app", "render_error"]

log = logging.getLogger(__name__)

CONFIG: Final = web.AppKey("config", Config)
STORE: Final = web.AppKey("store", ImageStore)
HANDLERS: Final = web.AppKey("handlers", Handlers)
METRICS: Final = web.AppKey("metrics", Metrics)
AUTH: Final = web.AppKey("auth", BasicAuth)
ENDPOINT: Final = "endpoint"  # request key: the endpoint label for metrics
READY_TIMEOUT: Final = 2.0
METRICS_SYNC_SECONDS: Final = 5.0


class InFlight:
    """Counts requests being answered, to refuse new ones past ``--max-connections``.

    aiohttp answers one request at a time per connection, so in-flight requests are the busy
    connections; idle keep-alive connections cost only a descriptor and are closed by aiohttp's
    keep-alive timeout.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0


LIMIT: Final = web.AppKey("limit", InFlight)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def render_error(error: RegistryError) -> web.Response:
    """The spec's JSON error envelope with the catalogue's status (the only renderer)."""
    headers = {API_VERSION: API_VERSION_VALUE, hdrs.CONTENT_TYPE: "application/json"}
    headers.update(error.headers)
    return web.Response(status=error.status, body=error.body(), headers=headers)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record every request once, from its final status."""
    started = time.perf_counter()
    status, sent = 500, 0
    try:
        response = await handler(request)
        status = response.status
        if request.method != hdrs.METH_HEAD and response.prepared:
            sent = response.content_length or response.body_length
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except (ConnectionResetError, asyncio.CancelledError):
        status = 499  # client went away (or the transfer was aborted): nginx's convention
        raise
    finally:
        request.app[METRICS].observe(request.get(ENDPOINT, "other"), request.method, status,
                                     sent, time.perf_counter() - started)


@web.middleware
async def limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse requests past the in-flight limit with 429 rather than queueing without bound."""
    limit = request.app[LIMIT]
    if limit.limit and limit.count >= limit.limit:
        raise RegistryError(ErrorCode.TOOMANYREQUESTS, {"limit": limit.limit},
                            headers={hdrs.RETRY_AFTER: "1"})
    limit.count += 1
    try:
        return await handler(request)
    finally:
        limit.count -= 1


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With --htpasswd, the /v2/ API needs basic auth; probes and metrics stay open."""
    auth = request.app.get(AUTH)
    if auth is not None and request.path.startswith("/v2"):
        await auth.check(request.headers.get(hdrs.AUTHORIZATION))
    return await handler(request)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into a JSON error; unexpected ones are logged, never shown."""
    try:
        return await handler(request)
    except RegistryError as error:
        return render_error(error)
    except web.HTTPException as exc:
        if exc.status == 405:
            return render_error(RegistryError(ErrorCode.METHOD_NOT_ALLOWED,
                                              headers={hdrs.ALLOW: exc.headers.get(hdrs.ALLOW,
                                                                                   "")}))
        if exc.status == 404:
            return render_error(RegistryError(ErrorCode.NOT_FOUND, {"path": request.path[:200]}))
        raise
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path[:200])
        return render_error(RegistryError(ErrorCode.UNKNOWN))


async def v2_dispatch(request: web.Request) -> web.StreamResponse:
    """Route a /v2/ request by its path (never its query string) and method."""
    # "/v2" (no trailing slash) has no "rest" and is the same API check as "/v2/".
    route = parse_v2_path(request.match_info.get("rest", ""))
    request[ENDPOINT] = route.endpoint.label if route is not None else "unknown"
    if route is None:
        raise RegistryError(ErrorCode.NOT_FOUND, {"path": request.path[:200]})
    if request.method not in route.endpoint.methods:
        # A read-only registry: uploads, manifest PUT and DELETE are refused the same way
        # distribution's read-only mode does (405), with the spec's JSON error and Allow.
        raise RegistryError(ErrorCode.UNSUPPORTED, {"method": request.method},
                            headers={hdrs.ALLOW: ", ".join(sorted(route.endpoint.methods))})
    return await request.app[HANDLERS].handle(request, route)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    request[ENDPOINT] = "healthz"
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the image directory can be listed (a hung NFS mount counts as not ready)."""
    request[ENDPOINT] = "readyz"
    store = request.app[STORE]
    try:
        ready = await asyncio.wait_for(asyncio.to_thread(store.ready), READY_TIMEOUT)
    except TimeoutError:
        ready = False
    if not ready:
        return web.json_response({"status": "image directory not readable"}, status=503)
    return web.json_response({"status": "ready"})


async def metrics_endpoint(request: web.Request) -> web.Response:
    request[ENDPOINT] = "metrics"
    metrics = request.app[METRICS]
    metrics.sync(request.app[STORE])
    body, content_type = metrics.render()
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type})


async def _metrics_sync_loop(app: web.Application) -> AsyncIterator[None]:
    """Keep store figures current in shared metrics even when this worker gets no scrape."""
    metrics, store = app[METRICS], app[STORE]

    async def loop() -> None:
        while True:
            await asyncio.sleep(METRICS_SYNC_SECONDS)
            metrics.sync(store)

    task = asyncio.create_task(loop(), name="metrics-sync")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _rescan_loop(app: web.Application) -> AsyncIterator[None]:
    """Re-list every known name every ``rescan_interval`` seconds (0 disables it)."""
    config, store = app[CONFIG], app[STORE]
    if config.rescan_interval <= 0:
        yield
        return

    async def loop() -> None:
        while True:
            await asyncio.sleep(config.rescan_interval)
            try:
                await store.rescan()
            except Exception:  # keep rescanning whatever one pass hit
                log.exception("periodic rescan failed")

    task = asyncio.create_task(loop(), name="rescan")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def make_app(config: Config) -> web.Application:
    """Build the registry application for ``config``."""
    middlewares = [metrics_middleware, error_middleware, limit_middleware, auth_middleware]
    app = web.Application(middlewares=middlewares, handler_args={
        # Bounds on what a client may send before we answer (documented in README).
        "max_line_size": 8190, "max_field_size": 8190,
    })
    store = ImageStore(config)
    app[CONFIG] = config
    app[STORE] = store
    app[HANDLERS] = Handlers(store)
    app[METRICS] = Metrics()
    app[LIMIT] = InFlight(config.max_connections)
    if config.htpasswd is not None:
        app[AUTH] = BasicAuth(config.htpasswd)
    app.router.add_route("*", "/v2", v2_dispatch)
    app.router.add_route("*", "/v2/{rest:.*}", v2_dispatch)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/", CatalogPage(config, auth=app.get(AUTH)).handle)
    app.cleanup_ctx.append(_rescan_loop)
    app.cleanup_ctx.append(_metrics_sync_loop)
    return app

