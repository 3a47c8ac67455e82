"""Mapping /v2/ paths onto endpoints (routes.py), including names made of endpoint keywords."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simple_oci_registry.routes import Endpoint, Route, parse_v2_path

# No per-example deadline: a slow machine must not fail a test on timing.
_no_deadline = settings(deadline=None)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("rest", "route"), [
    ("", Route(Endpoint.BASE)),
    ("_catalog", Route(Endpoint.CATALOG)),
    ("_catalog/", Route(Endpoint.CATALOG)),
    ("app/manifests/latest", Route(Endpoint.MANIFEST, "app", "latest")),
    (f"app/manifests/{DIGEST}", Route(Endpoint.MANIFEST, "app", DIGEST)),
    ("team/app/manifests/1.0", Route(Endpoint.MANIFEST, "team/app", "1.0")),
    (f"team/app/blobs/{DIGEST}", Route(Endpoint.BLOB, "team/app", DIGEST)),
    ("team/app/tags/list", Route(Endpoint.TAGS, "team/app")),
    (f"team/app/referrers/{DIGEST}", Route(Endpoint.REFERRERS, "team/app", DIGEST)),
    # Names made of the endpoint keywords: the *last* keyword decides.
    ("manifests/manifests/latest", Route(Endpoint.MANIFEST, "manifests", "latest")),
    ("a/manifests/b/manifests/c", Route(Endpoint.MANIFEST, "a/manifests/b", "c")),
    (f"blobs/blobs/{DIGEST}", Route(Endpoint.BLOB, "blobs", DIGEST)),
    ("tags/tags/list", Route(Endpoint.TAGS, "tags")),
    ("tags/list/tags/list", Route(Endpoint.TAGS, "tags/list")),
    ("blobs/manifests/tags", Route(Endpoint.MANIFEST, "blobs", "tags")),
    ("manifests/tags/list", Route(Endpoint.TAGS, "manifests")),
    (f"referrers/referrers/{DIGEST}", Route(Endpoint.REFERRERS, "referrers", DIGEST)),
    ("uploads/manifests/1", Route(Endpoint.MANIFEST, "uploads", "1")),
    ("a/blobs/uploads/manifests/1", Route(Endpoint.MANIFEST, "a/blobs/uploads", "1")),
    ("_catalog/manifests/x", Route(Endpoint.MANIFEST, "_catalog", "x")),
    # Uploads (POST .../blobs/uploads/ and .../blobs/uploads/<uuid>): refused later, routed here.
    ("app/blobs/uploads/", Route(Endpoint.UPLOAD, "app", "")),
    ("team/app/blobs/uploads/", Route(Endpoint.UPLOAD, "team/app", "")),
    ("app/blobs/uploads/3f1c-uuid", Route(Endpoint.UPLOAD, "app", "3f1c-uuid")),
    ("blobs/blobs/uploads/", Route(Endpoint.UPLOAD, "blobs", "")),
    ("a/blobs/uploads/blobs/uploads/x", Route(Endpoint.UPLOAD, "a/blobs/uploads", "x")),
    # Without the trailing slash "uploads" is a blob argument (an invalid digest, later).
    ("app/blobs/uploads", Route(Endpoint.BLOB, "app", "uploads")),
    # Empty names and arguments are routed; the handler's validation rejects them.
    ("/manifests/latest", Route(Endpoint.MANIFEST, "", "latest")),
    ("app/manifests/", Route(Endpoint.MANIFEST, "app", "")),
])
def test_routes(rest: str, route: Route) -> None:
    assert parse_v2_path(rest) == route


@pytest.mark.parametrize("rest", [
    "app", "app/", "manifests/latest", "app/tags", "app/tags/", "app/tags/lists",
    "app/tags/list/", "app/unknown/x", "app/manifest/latest", "app/blob/x", "_catalog/x",
    "app/manifests/latest/", "app/MANIFESTS/latest", "tags/list",
    "app/_catalog", "v2/", "app/referrer/x",
])
def test_unknown_paths(rest: str) -> None:
    assert parse_v2_path(rest) is None


def test_endpoint_methods() -> None:
    for endpoint in (Endpoint.BASE, Endpoint.CATALOG, Endpoint.MANIFEST, Endpoint.BLOB,
                     Endpoint.TAGS, Endpoint.REFERRERS):
        assert endpoint.methods == {"GET", "HEAD"}
    assert Endpoint.UPLOAD.methods == frozenset()
    # Equal method sets must not turn members into aliases of each other.
    assert len(set(Endpoint)) == 7
    assert len({e.label for e in Endpoint}) == 7


_segment = st.sampled_from(["manifests", "blobs", "tags", "list", "uploads", "referrers",
                            "_catalog", "", "app", "a.b", ".."]) | st.text(max_size=10)


@_no_deadline
@given(st.text(max_size=200) | st.lists(_segment, max_size=8).map("/".join))
def test_parse_never_raises(rest: str) -> None:
    route = parse_v2_path(rest)
    if route is None:
        return
    assert isinstance(route.endpoint, Endpoint)
    if route.endpoint not in (Endpoint.BASE, Endpoint.CATALOG):
        # The name is a prefix of the path and the argument its last segment.
        assert rest.startswith(route.name)
        assert rest.endswith(route.argument)
        assert "/" not in route.argument


_names = st.lists(st.sampled_from(["manifests", "blobs", "tags", "list", "uploads",
                                   "referrers", "app", "team", "x1"]),
                  min_size=1, max_size=5).map("/".join)
_arguments = st.sampled_from(["latest", "1.0", DIGEST, "manifests", "blobs", "list", "tags"])


@_no_deadline
@given(_names, st.sampled_from([Endpoint.MANIFEST, Endpoint.BLOB, Endpoint.REFERRERS]),
       _arguments)
def test_any_name_round_trips(name: str, endpoint: Endpoint, argument: str) -> None:
    word = {Endpoint.MANIFEST: "manifests", Endpoint.BLOB: "blobs",
            Endpoint.REFERRERS: "referrers"}[endpoint]
    assert parse_v2_path(f"{name}/{word}/{argument}") == Route(endpoint, name, argument)
    assert parse_v2_path(f"{name}/tags/list") == Route(Endpoint.TAGS, name)
    assert parse_v2_path(f"{name}/blobs/uploads/") == Route(Endpoint.UPLOAD, name, "")
