"""The error catalogue (errors.py) and its one renderer: the spec's JSON envelope."""

from __future__ import annotations

import json

import pytest

from simple_oci_registry.app import render_error
from simple_oci_registry.errors import ErrorCode, RegistryError

# distribution-spec "Error Codes", plus the codes distribution itself registers beyond them
# (PAGINATION_NUMBER_INVALID, RANGE_INVALID, UNAVAILABLE, UNKNOWN).
SPEC_CODES = {
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
    "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED", "TOOMANYREQUESTS",
}
DISTRIBUTION_CODES = {"PAGINATION_NUMBER_INVALID", "RANGE_INVALID", "UNAVAILABLE", "UNKNOWN"}

STATUSES = {
    ErrorCode.BLOB_UNKNOWN: 404, ErrorCode.BLOB_UPLOAD_UNKNOWN: 404,
    ErrorCode.DIGEST_INVALID: 400, ErrorCode.MANIFEST_UNKNOWN: 404,
    ErrorCode.MANIFEST_INVALID: 400, ErrorCode.NAME_INVALID: 400, ErrorCode.NAME_UNKNOWN: 404,
    ErrorCode.PAGINATION_NUMBER_INVALID: 400, ErrorCode.RANGE_INVALID: 416,
    ErrorCode.UNAUTHORIZED: 401, ErrorCode.DENIED: 403, ErrorCode.UNSUPPORTED: 405,
    ErrorCode.NOT_FOUND: 404, ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.TOOMANYREQUESTS: 429, ErrorCode.UNAVAILABLE: 503, ErrorCode.UNKNOWN: 500,
}


def test_every_code_has_its_status() -> None:
    assert {code: code.status for code in ErrorCode} == STATUSES


def test_codes_are_spec_codes() -> None:
    for code in ErrorCode:
        assert code.code in SPEC_CODES | DISTRIBUTION_CODES, code
        assert code.message and code.message == code.message.strip()


def test_members_are_not_aliases() -> None:
    # Members sharing a wire code (UNSUPPORTED) must stay distinct enum members.
    assert len(list(ErrorCode)) == len(STATUSES) == 17
    sharing = [c for c in ErrorCode if c.code == "UNSUPPORTED"]
    assert [c.name for c in sharing] == ["UNSUPPORTED", "NOT_FOUND", "METHOD_NOT_ALLOWED"]
    assert {c.status for c in sharing} == {404, 405}


@pytest.mark.parametrize("code", list(ErrorCode))
def test_body_shape(code: ErrorCode) -> None:
    error = RegistryError(code, {"digest": "sha256:x"})
    assert error.status == code.status
    document = json.loads(error.body())
    assert document == {"errors": [{"code": code.code, "message": code.message,
                                    "detail": {"digest": "sha256:x"}}]}


def test_detail_is_left_out_when_none_and_kept_when_falsy() -> None:
    assert json.loads(RegistryError(ErrorCode.UNKNOWN).body()) == {
        "errors": [{"code": "UNKNOWN", "message": "unknown error"}]}
    assert json.loads(RegistryError(ErrorCode.UNKNOWN, {}).body())["errors"][0]["detail"] == {}
    assert json.loads(RegistryError(ErrorCode.UNKNOWN, 0).body())["errors"][0]["detail"] == 0


def test_message_override_headers_and_str() -> None:
    headers = {"Content-Range": "bytes */10"}
    error = RegistryError(ErrorCode.RANGE_INVALID, {"size": 10}, message="nope", headers=headers)
    headers["Content-Range"] = "changed"  # the error keeps its own copy
    assert error.headers == {"Content-Range": "bytes */10"}
    assert error.message == "nope"
    assert json.loads(error.body())["errors"][0]["message"] == "nope"
    assert str(error) == "RANGE_INVALID: nope ({'size': 10})"
    assert str(RegistryError(ErrorCode.NAME_UNKNOWN)) == (
        "NAME_UNKNOWN: repository name not known to registry")
    assert isinstance(error, Exception)


def test_body_is_compact_json() -> None:
    body = RegistryError(ErrorCode.NAME_INVALID, {"name": "Bad"}).body()
    assert b" " not in body.replace(b"invalid repository name", b"")
    assert body.startswith(b'{"errors":[')


def test_render_error() -> None:
    error = RegistryError(ErrorCode.UNSUPPORTED, {"method": "PUT"},
                          headers={"Allow": "GET, HEAD"})
    response = render_error(error)
    assert response.status == 405
    assert response.headers["Allow"] == "GET, HEAD"
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert response.body == error.body()
    assert render_error(RegistryError(ErrorCode.RANGE_INVALID, {"size": 5}, headers={
        "Content-Range": "bytes */5"})).headers["Content-Range"] == "bytes */5"
