"""HEAD and GET agree on every resource of the standard images, on a real server process.

containerd takes a manifest's media type and size from HEAD (containerd#7390, #3238) and
spegel#1378 shows what a HEAD 200 / GET 404 disagreement does to a puller, so for every
resource — manifests by tag and by digest, the children of the multi-arch index, every config
and layer blob (plain and compressed archives), manifests fetched as blobs, byte ranges, tag
lists, referrers, and the usual errors — the server is asked HEAD, then GET, then HEAD again
(the first HEAD reaches each resource cold), and status, Content-Length, Content-Type,
Docker-Content-Digest, ETag and Content-Range must be the same in all three. GET bodies are
checked against Content-Length and, for content, against the digest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.hostile import ACCEPT, Reply, error_codes, fetch, sha256
from tests.images import StandardImages, build_standard_images
from tests.server import RegistryProcess

COMPARED = ("content-length", "content-type", "docker-content-digest", "etag", "content-range",
            "docker-distribution-api-version")
MISSING = "sha256:" + "0" * 64
CHECKED: list[str] = []


@dataclass(frozen=True, slots=True)
class Served:
    process: RegistryProcess
    images: StandardImages


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("consistency")
    images = build_standard_images(base / "images")
    with RegistryProcess(images.root, "--cache-dir", str(base / "cache"),
                         log_path=base / "registry.log") as process:
        yield Served(process, images)


def agree(served: Served, path: str, headers: dict[str, str] | None = None) -> Reply:
    """HEAD, GET, HEAD of ``path``: the same answer each time; returns the GET."""
    headers = {"Accept": ACCEPT, **(headers or {})}
    url = served.process.url
    first = fetch(url, path, method="HEAD", headers=headers)
    get = fetch(url, path, headers=headers)
    second = fetch(url, path, method="HEAD", headers=headers)
    CHECKED.append(path)
    assert first.body == second.body == b""
    for head in (first, second):
        assert head.status == get.status, (path, headers, head.status, get.status, get.body[:200])
        for name in COMPARED:
            assert head.headers.get(name) == get.headers.get(name), (path, headers, name)
    if get.status != 304:  # a 304 has no body and need not say how long one would be
        assert get.headers.get("content-length") == str(len(get.body)), (path, headers)
    if get.status >= 400:
        assert error_codes(get), get
    return get


def resources(served: Served, key: str) -> list[tuple[str, dict[str, str]]]:
    """Every path a pull of ``key`` touches (found by walking what the server returns)."""
    name, _, tag = key.rpartition(":")
    found: list[tuple[str, dict[str, str]]] = [(f"/v2/{name}/manifests/{tag}", {}),
                                                (f"/v2/{name}/tags/list", {}),
                                                (f"/v2/{name}/tags/list?n=1", {})]
    pending = [served.images.manifests[key]]
    while pending:
        digest = pending.pop()
        found += [(f"/v2/{name}/manifests/{digest}", {}), (f"/v2/{name}/blobs/{digest}", {}),
                  (f"/v2/{name}/blobs/{digest}", {"Range": "bytes=0-9"}),
                  (f"/v2/{name}/referrers/{digest}", {})]
        reply = fetch(served.process.url, f"/v2/{name}/manifests/{digest}",
                      headers={"Accept": ACCEPT})
        assert reply.status == 200
        document = json.loads(reply.body)
        if "manifests" in document:
            pending += [child["digest"] for child in document["manifests"]]
            continue
        for blob in [document["config"], *document["layers"]]:
            path = f"/v2/{name}/blobs/{blob['digest']}"
            found += [(path, {}), (path, {"Range": "bytes=3-"}), (path, {"Range": "bytes=-4"}),
                      (path, {"Range": "bytes=1-2"}), (path, {"Range": f"bytes={10 ** 9}-"}),
                      (path, {"If-None-Match": f'"{blob["digest"]}"'})]
    return found


KEYS = ["app:1.0", "app:2.0", "multi:latest", "zipped:1.0", "pair:one", "pair:two",
        "team/full:3.1", "bare:v1"]


@pytest.mark.parametrize("key", KEYS)
def test_head_and_get_agree_on_every_resource(served: Served, key: str) -> None:
    assert set(KEYS) == set(served.images.manifests)
    for path, headers in resources(served, key):
        get = agree(served, path, headers)
        status = get.status
        if "If-None-Match" in headers:
            assert status == 304, (path, status)
        elif f"bytes={10 ** 9}-" in headers.get("Range", ""):
            assert status == 416 and error_codes(get) == ["RANGE_INVALID"], (path, get)
        elif "Range" in headers:
            assert status == 206, (path, headers, status)
        else:
            assert status == 200, (path, status, get.body[:200])
        if status == 200 and ("/manifests/sha256:" in path or "/blobs/" in path):
            digest = path.rsplit("/", 1)[1]
            assert sha256(get.body) == digest == get.headers["docker-content-digest"]


@pytest.mark.parametrize(("path", "status", "code"), [
    ("/v2/", 200, None),
    ("/v2/_catalog", 200, None),
    ("/v2/_catalog?n=2", 200, None),
    ("/v2/app/manifests/9.9", 404, "MANIFEST_UNKNOWN"),
    (f"/v2/app/manifests/{MISSING}", 404, "MANIFEST_UNKNOWN"),
    (f"/v2/app/blobs/{MISSING}", 404, "BLOB_UNKNOWN"),
    ("/v2/nosuch/manifests/1.0", 404, "NAME_UNKNOWN"),
    ("/v2/nosuch/tags/list", 404, "NAME_UNKNOWN"),
    ("/v2/App/manifests/1.0", 400, "NAME_INVALID"),
    ("/v2/app/blobs/sha256:short", 400, "DIGEST_INVALID"),
    ("/v2/app/manifests/sha256:short", 400, "DIGEST_INVALID"),
    ("/v2/app/tags/list?n=x", 400, "PAGINATION_NUMBER_INVALID"),
    ("/v2/app/nothing", 404, None),
])
def test_head_and_get_agree_elsewhere(served: Served, path: str, status: int,
                                      code: str | None) -> None:
    get = agree(served, path)
    assert get.status == status, get
    if code is not None:
        assert error_codes(get) == [code], get


def test_blob_of_another_name(served: Served) -> None:
    """A digest that exists, asked under a name that does not hold it: 404 both ways."""
    layer = served.images.layers["app:1.0"][0]
    get = agree(served, f"/v2/pair/blobs/{layer}")
    assert get.status == 404 and error_codes(get) == ["BLOB_UNKNOWN"]


def test_consistency_count() -> None:
    print(f"\nHEAD/GET/HEAD consistency: {len(CHECKED)} resources compared "
          f"({len(set(CHECKED))} distinct paths)")
    assert len(CHECKED) > 100 or not CHECKED
