"""The /v2/ endpoint handlers: thin translations between HTTP and the image store.

Handlers validate what the request names (:mod:`reference`), ask the store, and shape the
response. They never see paths, files or tar members: bytes come through the store's readers.
"""

from __future__ import annotations

import json
from typing import Any, Final

from aiohttp import hdrs, web
from multidict import CIMultiDict

from simple_oci_registry import mediatypes
from simple_oci_registry.blobresponse import send_member
from simple_oci_registry.errors import ErrorCode, RegistryError
from simple_oci_registry.headers import (
    API_VERSION,
    API_VERSION_VALUE,
    CONTENT_DIGEST,
    FILTERS_APPLIED,
)
from simple_oci_registry.layout import ManifestRecord
from simple_oci_registry.logs import CUT_SHORT
from simple_oci_registry.mirror import repository_name
from simple_oci_registry.ranges import parse_range
from simple_oci_registry.reference import parse_digest, parse_reference, validate_name
from simple_oci_registry.routes import Endpoint, Route
from simple_oci_registry.store import BlobLocation, ImageStore

__all__ = ["Handlers"]

JSON: Final = "application/json"
MAX_PAGE: Final = 10_000
# Blobs and digest-addressed manifests never change: let caches keep them (distribution does
# the same in storage/blobserver.go).
IMMUTABLE: Final = "max-age=31536000, immutable"


def _json(document: Any, *, headers: dict[str, str] | None = None,
          content_type: str = JSON) -> web.Response:
    body = json.dumps(document, separators=(",", ":")).encode()
    all_headers = {API_VERSION: API_VERSION_VALUE, hdrs.CONTENT_TYPE: content_type}
    all_headers.update(headers or {})
    return web.Response(body=body, headers=all_headers)


def _etag_matches(request: web.BaseRequest, etag: str) -> bool:
    """RFC 9110 §13.1.2 If-None-Match, weak comparison."""
    header = request.headers.get(hdrs.IF_NONE_MATCH)
    if header is None:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag in tags


def _page(request: web.BaseRequest, items: list[str], path: str, key: str,
          extra: dict[str, Any]) -> web.Response:
    """Apply ``n``/``last`` pagination (distribution-spec, "Listing Tags") with a Link header."""
    last = request.query.get("last")
    if last:
        items = [item for item in items if item > last]
    n_text = request.query.get("n")
    headers: dict[str, str] = {}
    if n_text is not None:
        if not n_text.isdigit() or int(n_text) > MAX_PAGE:
            raise RegistryError(ErrorCode.PAGINATION_NUMBER_INVALID, {"n": n_text[:20]})
        n = int(n_text)
        if len(items) > n:
            items = items[:n]
            if items:
                # RFC 8288 Link with rel="next", as distribution and zot send it.
                headers[hdrs.LINK] = f'<{path}?n={n}&last={items[-1]}>; rel="next"'
    return _json({**extra, key: items}, headers=headers)


class Handlers:
    """Endpoint handlers bound to one store."""

    def __init__(self, store: ImageStore) -> None:
        self._store = store

    async def handle(self, request: web.BaseRequest, route: Route) -> web.StreamResponse:
        if route.endpoint is Endpoint.BASE:
            return _json({})
        if route.endpoint is Endpoint.CATALOG:
            names = await self._store.catalog()
            return _page(request, names, "/v2/_catalog", "repositories", {})
        name = self._repository(request, route)
        if route.endpoint is Endpoint.MANIFEST:
            return await self.manifest(request, name, route.argument)
        if route.endpoint is Endpoint.BLOB:
            return await self.blob(request, name, route.argument)
        if route.endpoint is Endpoint.TAGS:
            tags = await self._store.tags(name)
            return _page(request, tags, f"/v2/{name}/tags/list", "tags", {"name": name})
        if route.endpoint is Endpoint.REFERRERS:
            return await self.referrers(request, name, route.argument)
        raise RegistryError(ErrorCode.NOT_FOUND)

    @staticmethod
    def _repository(request: web.BaseRequest, route: Route) -> str:
        """The repository the request means: its path name, mapped by :mod:`mirror` when the
        path or containerd's ``ns`` parameter names an upstream registry."""
        name = validate_name(route.name)
        if not request.query_string:  # the common case, without parsing a query
            return repository_name(name, None)
        ns_values = request.query.getall("ns", [])
        if len(ns_values) > 1:
            raise RegistryError(ErrorCode.NAME_INVALID, {"ns": [v[:100] for v in ns_values]},
                                message="invalid ns parameter: given more than once")
        return repository_name(name, ns_values[0] if ns_values else None)

    async def manifest(self, request: web.BaseRequest, name: str, reference: str) -> web.Response:
        record = await self._store.manifest(name, parse_reference(reference))
        return self._manifest_response(request, record)

    @staticmethod
    def _manifest_response(request: web.BaseRequest, record: ManifestRecord) -> web.Response:
        etag = f'"{record.digest}"'
        headers = {
            API_VERSION: API_VERSION_VALUE,
            # distribution-spec: Content-Type is the manifest's own media type, and HEAD must
            # carry it (containerd#7390 reads the type from HEAD).
            hdrs.CONTENT_TYPE: record.media_type,
            CONTENT_DIGEST: record.digest,
            hdrs.ETAG: etag,
        }
        if _etag_matches(request, etag):
            return web.Response(status=304, headers=headers)
        if request.method == hdrs.METH_HEAD:
            headers[hdrs.CONTENT_LENGTH] = str(len(record.body))
            return web.Response(headers=headers)
        return web.Response(body=record.body, headers=headers)

    async def blob(self, request: web.BaseRequest, name: str,
                   digest_text: str) -> web.StreamResponse:
        digest = parse_digest(digest_text)
        location = await self._store.blob(name, digest)
        etag = f'"{location.digest}"'
        byte_range = parse_range(request.headers.get(hdrs.RANGE), location.size)
        if_range = request.headers.get(hdrs.IF_RANGE)
        if byte_range is not None and if_range is not None and if_range.strip() != etag:
            byte_range = None  # RFC 9110 §13.1.5: the validator does not match, send it all
        headers = CIMultiDict({
            API_VERSION: API_VERSION_VALUE,
            hdrs.CONTENT_TYPE: location.media_type,
            CONTENT_DIGEST: location.digest,
            hdrs.ETAG: etag,
            hdrs.ACCEPT_RANGES: "bytes",
            hdrs.CACHE_CONTROL: IMMUTABLE,
        })
        status = 200
        length = location.size
        if byte_range is not None:
            status = 206
            length = byte_range.length
            headers[hdrs.CONTENT_RANGE] = byte_range.content_range()
        if _etag_matches(request, etag):
            return web.Response(status=304, headers=headers)
        if location.body is not None:
            return self._memory_blob(request, location, status, headers, byte_range)
        if request.method == hdrs.METH_HEAD:
            # HEAD and GET must agree (spegel#1378): refuse here what GET would refuse.
            await self._store.check_blob(location)
            headers[hdrs.CONTENT_LENGTH] = str(length)
            return web.Response(status=status, headers=headers)
        location, reader = await self._store.open_blob(name, location)
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = length
        try:
            return await send_member(request, response, reader, byte_range, location.digest)
        except ConnectionError:
            # The client hung up (reset, EPIPE) or the transfer was aborted because its source
            # changed. Headers are out, so there is nothing to answer: make sure the connection
            # is closed and hand the response back; aiohttp then logs it as a reset, not a 500.
            if request.transport is not None:
                request.transport.abort()
            request[CUT_SHORT] = True  # for the access log and metrics: not a complete 200
            return response
        finally:
            reader.close()

    @staticmethod
    def _memory_blob(request: web.BaseRequest, location: BlobLocation, status: int,
                     headers: CIMultiDict[str], byte_range: Any) -> web.Response:
        body = location.body or b""
        if byte_range is not None:
            body = body[byte_range.start: byte_range.end + 1]
        if request.method == hdrs.METH_HEAD:
            headers[hdrs.CONTENT_LENGTH] = str(len(body))
            return web.Response(status=status, headers=headers)
        return web.Response(status=status, body=body, headers=headers)

    async def referrers(self, request: web.BaseRequest, name: str,
                        digest_text: str) -> web.Response:
        digest = parse_digest(digest_text)
        records = await self._store.referrers(name, digest)
        descriptors = [r.descriptor() for r in records]
        headers: dict[str, str] = {}
        wanted = request.query.get("artifactType")
        if wanted is not None:
            descriptors = [d for d in descriptors if d.get("artifactType") == wanted]
            headers[FILTERS_APPLIED] = "artifactType"
        # distribution-spec "Listing Referrers": always an image index, empty when none.
        document = {"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX,
                    "manifests": descriptors}
        return _json(document, headers=headers, content_type=mediatypes.OCI_INDEX)
