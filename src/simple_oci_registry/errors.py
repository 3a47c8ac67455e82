"""The registry's one error catalogue.

Every failure a client can see is a :class:`RegistryError` carrying an :class:`ErrorCode`. The
code fixes the spec's error code string, a human message and the HTTP status, so that handlers
raise and a single middleware (:mod:`simple_oci_registry.app`) renders the OCI distribution
error body ``{"errors": [{"code", "message", "detail"}]}`` — distribution-spec, "Error Codes".
"""

from __future__ import annotations

import enum
import json
from typing import Any

__all__ = ["ErrorCode", "RegistryError"]


class ErrorCode(enum.Enum):
    """(code, message, HTTP status) for every error this registry can answer with."""

    BLOB_UNKNOWN = ("BLOB_UNKNOWN", "blob unknown to registry", 404)
    BLOB_UPLOAD_UNKNOWN = ("BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry", 404)
    DIGEST_INVALID = ("DIGEST_INVALID", "provided digest did not match uploaded content", 400)
    MANIFEST_UNKNOWN = ("MANIFEST_UNKNOWN", "manifest unknown", 404)
    MANIFEST_INVALID = ("MANIFEST_INVALID", "manifest invalid", 400)
    NAME_INVALID = ("NAME_INVALID", "invalid repository name", 400)
    NAME_UNKNOWN = ("NAME_UNKNOWN", "repository name not known to registry", 404)
    PAGINATION_NUMBER_INVALID = (
        "PAGINATION_NUMBER_INVALID", "invalid number of results requested", 400)
    RANGE_INVALID = ("RANGE_INVALID", "requested range not satisfiable", 416)
    UNAUTHORIZED = ("UNAUTHORIZED", "authentication required", 401)
    DENIED = ("DENIED", "requested access to the resource is denied", 403)
    UNSUPPORTED = ("UNSUPPORTED", "the operation is unsupported: this registry is read-only", 405)
    # The spec has no code for a path that is no endpoint at all; UNSUPPORTED is the nearest.
    NOT_FOUND = ("UNSUPPORTED", "no such endpoint", 404)
    METHOD_NOT_ALLOWED = ("UNSUPPORTED", "method not allowed on this endpoint", 405)
    TOOMANYREQUESTS = ("TOOMANYREQUESTS", "too many requests", 429)
    UNAVAILABLE = ("UNAVAILABLE", "the image store is not available", 503)
    UNKNOWN = ("UNKNOWN", "unknown error", 500)

    def __init__(self, code: str, message: str, status: int) -> None:
        self.code = code
        self.message = message
        self.status = status


class RegistryError(Exception):
    """A failure to be shown to the client as the spec's JSON error body.

    ``headers`` carries what the status needs beside the body (``Allow`` on 405,
    ``Content-Range`` on 416, ``WWW-Authenticate`` on 401).
    """

    def __init__(
        self,
        code: ErrorCode,
        detail: Any = None,
        *,
        message: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.code = code
        self.detail = detail
        self.message = message or code.message
        self.headers = dict(headers or {})
        super().__init__(f"{code.code}: {self.message}" + (f" ({detail})" if detail else ""))

    @property
    def status(self) -> int:
        return self.code.status

    def body(self) -> bytes:
        """The spec's error envelope, as bytes ready to send."""
        entry: dict[str, Any] = {"code": self.code.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return json.dumps({"errors": [entry]}, separators=(",", ":")).encode()
