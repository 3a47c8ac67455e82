"""``make_app(config)``: the one constructor of the web application, shared by CLI and tests.

It wires the store, the /v2/ dispatcher, the error middleware that renders every failure from
the catalogue in :mod:`errors`, and the periodic rescan tied to the application's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

from aiohttp import hdrs, web

from simple_oci_registry.config import Config
from simple_oci_registry.errors import ErrorCode, RegistryError
from simple_oci_registry.handlers import Handlers
from simple_oci_registry.headers import API_VERSION, API_VERSION_VALUE
from simple_oci_registry.routes import parse_v2_path
from simple_oci_registry.store import ImageStore

__all__ = ["CONFIG", "STORE", "make_app", "render_error"]

log = logging.getLogger(__name__)

CONFIG: Final = web.AppKey("config", Config)
STORE: Final = web.AppKey("store", ImageStore)
HANDLERS: Final = web.AppKey("handlers", Handlers)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def render_error(error: RegistryError) -> web.Response:
    """The spec's JSON error envelope with the catalogue's status (the only renderer)."""
    headers = {API_VERSION: API_VERSION_VALUE, hdrs.CONTENT_TYPE: "application/json"}
    headers.update(error.headers)
    return web.Response(status=error.status, body=error.body(), headers=headers)


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
    if route is None:
        raise RegistryError(ErrorCode.NOT_FOUND, {"path": request.path[:200]})
    if request.method not in route.endpoint.methods:
        # A read-only registry: uploads, manifest PUT and DELETE are refused the same way
        # distribution's read-only mode does (405), with the spec's JSON error and Allow.
        raise RegistryError(ErrorCode.UNSUPPORTED, {"method": request.method},
                            headers={hdrs.ALLOW: ", ".join(sorted(route.endpoint.methods))})
    return await request.app[HANDLERS].handle(request, route)


async def _rescan_loop(app: web.Application) -> AsyncIterator[None]:
    """Re-list every known name every ``rescan_interval`` seconds, for the app's lifetime."""
    config, store = app[CONFIG], app[STORE]

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
    app = web.Application(middlewares=[error_middleware], handler_args={
        # Bounds on what a client may send before we answer (documented in README).
        "max_line_size": 8190, "max_field_size": 8190,
    })
    store = ImageStore(config)
    app[CONFIG] = config
    app[STORE] = store
    app[HANDLERS] = Handlers(store)
    app.router.add_route("*", "/v2", v2_dispatch)
    app.router.add_route("*", "/v2/{rest:.*}", v2_dispatch)
    app.cleanup_ctx.append(_rescan_loop)
    return app

