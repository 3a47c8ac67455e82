"""The HTTP API in process: every endpoint, header and error the distribution spec asks for.

Each test builds the application with ``make_app`` (the constructor the CLI uses) over the
standard images and talks to it with aiohttp's test client. Paths a client library would
normalise (``..``, ``%2e%2e``) are sent over a raw socket so the server sees them as written.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import RawTestServer, TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simple_oci_registry.app import make_app
from simple_oci_registry.config import Config
from simple_oci_registry.layoutwriter import (
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    LayoutWriter,
)
from tests.images import StandardImages, small_image

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]

OCI_MANIFEST = MEDIA_TYPE_OCI_MANIFEST
OCI_INDEX = MEDIA_TYPE_OCI_INDEX
MISSING = "sha256:" + "0" * 64
SIGNATURE_TYPE = "application/vnd.example.signature.v1"
SBOM_TYPE = "application/vnd.example.sbom.v1"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def client_for(aiohttp_client: MakeClient, directory: Path) -> Client:
    registry = make_app(Config(directory=directory))
    return await aiohttp_client(RawTestServer(registry.handle))


@pytest.fixture
async def client(aiohttp_client: MakeClient, shared_images: StandardImages) -> Client:
    return await client_for(aiohttp_client, shared_images.root)


async def assert_error(response: ClientResponse, status: int, *codes: str) -> dict[str, Any]:
    """The spec's error envelope: ``{"errors": [{"code", "message", ...}]}`` with ``status``."""
    assert response.status == status, await response.text()
    assert response.headers["Content-Type"].startswith("application/json")
    document = json.loads(await response.read())
    assert isinstance(document, dict) and set(document) == {"errors"}
    errors = document["errors"]
    assert isinstance(errors, list) and errors
    for error in errors:
        assert isinstance(error["code"], str) and isinstance(error["message"], str)
    if codes:
        assert errors[0]["code"] in codes, errors
    return errors[0]  # type: ignore[no-any-return]


async def raw_request(client: Client, method: str, target: str,
                      headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """Send a request line exactly as written (no client-side path normalisation)."""
    server = client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {server.host}:{server.port}",
             "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        parsed[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), parsed, body


# ------------------------------------------------------------------------------ /v2/


@pytest.mark.parametrize("path", ["/v2/", "/v2"])
async def test_api_version_check(client: Client, path: str) -> None:
    response = await client.get(path)
    assert response.status == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert json.loads(await response.read()) == {}


async def test_unknown_paths_are_json_404(client: Client) -> None:
    for path in ("/nope", "/v2/app/whatever", "/v2/app/manifests", "/v1/_ping", "/index.html"):
        await assert_error(await client.get(path), 404)


# ------------------------------------------------------------------------------ manifests


@pytest.mark.parametrize("key", ["app:1.0", "app:2.0", "pair:one", "pair:two", "zipped:1.0",
                                 "team/full:3.1", "bare:v1", "multi:latest"])
async def test_manifest_by_tag_and_digest(client: Client, shared_images: StandardImages,
                                          key: str) -> None:
    name, tag = key.rsplit(":", 1)
    digest = shared_images.manifests[key]
    expected_type = OCI_INDEX if key == "multi:latest" else OCI_MANIFEST
    bodies = []
    for reference in (tag, digest):
        response = await client.get(f"/v2/{name}/manifests/{reference}")
        assert response.status == 200
        body = await response.read()
        bodies.append(body)
        assert sha256(body) == digest  # the exact stored bytes
        # The manifest's own media type, without parameters; for the umoci-style manifest
        # (no mediaType field) it comes from the index.json descriptor.
        assert response.headers["Content-Type"] == expected_type
        assert response.headers["Content-Length"] == str(len(body))
        assert response.headers["Docker-Content-Digest"] == digest
        assert response.headers["ETag"] == f'"{digest}"'
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"

        head = await client.head(f"/v2/{name}/manifests/{reference}")
        assert head.status == 200
        assert await head.read() == b""
        for header in ("Content-Type", "Content-Length", "Docker-Content-Digest", "ETag"):
            assert head.headers[header] == response.headers[header], header
    assert bodies[0] == bodies[1]
    if key == "bare:v1":
        assert "mediaType" not in json.loads(bodies[0])


async def test_multi_arch_children_by_digest(client: Client,
                                             shared_images: StandardImages) -> None:
    index = json.loads(await (await client.get("/v2/multi/manifests/latest")).read())
    listed = {m["platform"]["architecture"]: m["digest"] for m in index["manifests"]}
    assert listed == shared_images.children["multi:latest"]
    for digest in listed.values():
        response = await client.get(f"/v2/multi/manifests/{digest}")
        assert response.status == 200
        assert response.headers["Content-Type"] == OCI_MANIFEST
        assert response.headers["Docker-Content-Digest"] == digest
        assert sha256(await response.read()) == digest


async def test_if_none_match_gives_304(client: Client, shared_images: StandardImages) -> None:
    digest = shared_images.manifests["app:1.0"]
    for method in ("GET", "HEAD"):
        for value in (f'"{digest}"', f'W/"{digest}"', f'"other", "{digest}"', "*"):
            response = await client.request(method, "/v2/app/manifests/1.0",
                                            headers={"If-None-Match": value})
            assert response.status == 304, value
            assert await response.read() == b""
            assert response.headers["Docker-Content-Digest"] == digest
        response = await client.request(method, "/v2/app/manifests/1.0",
                                        headers={"If-None-Match": f'"{MISSING}"'})
        assert response.status == 200


async def test_unknown_manifest(client: Client, shared_images: StandardImages) -> None:
    await assert_error(await client.get("/v2/app/manifests/9.9"), 404, "MANIFEST_UNKNOWN")
    await assert_error(await client.get(f"/v2/app/manifests/{MISSING}"), 404, "MANIFEST_UNKNOWN")
    # Another name's manifest is not reachable through this name.
    other = shared_images.manifests["pair:one"]
    await assert_error(await client.get(f"/v2/app/manifests/{other}"), 404, "MANIFEST_UNKNOWN")
    await assert_error(await client.get("/v2/nosuch/manifests/1.0"), 404,
                       "NAME_UNKNOWN", "MANIFEST_UNKNOWN")
    head = await client.head("/v2/nosuch/manifests/1.0")
    assert head.status == 404


# ------------------------------------------------------------------------------ blobs


async def test_blob_get_and_head(client: Client, shared_images: StandardImages) -> None:
    for key in ("app:1.0", "multi:latest", "zipped:1.0", "bare:v1"):
        name = key.rsplit(":", 1)[0]
        for digest in shared_images.layers[key]:
            response = await client.get(f"/v2/{name}/blobs/{digest}",
                                        headers={"Accept-Encoding": "zstd, gzip, deflate"})
            assert response.status == 200
            body = await response.read()
            assert sha256(body) == digest
            assert response.headers["Content-Length"] == str(len(body))
            assert response.headers["Docker-Content-Digest"] == digest
            assert response.headers["Accept-Ranges"] == "bytes"
            # Blobs are opaque bytes: never a Content-Encoding (containerd sends gzip/zstd).
            assert "Content-Encoding" not in response.headers
            head = await client.head(f"/v2/{name}/blobs/{digest}")
            assert head.status == 200
            assert await head.read() == b""
            for header in ("Content-Length", "Docker-Content-Digest", "Content-Type",
                           "Accept-Ranges"):
                assert head.headers[header] == response.headers[header]


async def test_config_blob(client: Client, shared_images: StandardImages) -> None:
    manifest = json.loads(await (await client.get("/v2/app/manifests/1.0")).read())
    config = manifest["config"]
    response = await client.get(f"/v2/app/blobs/{config['digest']}")
    assert response.status == 200
    body = await response.read()
    assert len(body) == config["size"] and sha256(body) == config["digest"]
    assert json.loads(body)["architecture"] == "amd64"


@pytest.mark.parametrize("name", ["app", "zipped"])
async def test_blob_ranges(client: Client, shared_images: StandardImages, name: str) -> None:
    digest = shared_images.layers[f"{name}:1.0"][0]
    path = f"/v2/{name}/blobs/{digest}"
    whole = await (await client.get(path)).read()
    size = len(whole)
    assert size > 20
    cases = {"bytes=0-9": (0, 9), "bytes=5-": (5, size - 1), "bytes=-5": (size - 5, size - 1),
             f"bytes=3-{size + 100}": (3, size - 1), f"bytes={size - 1}-": (size - 1, size - 1)}
    for header, (first, last) in cases.items():
        for method in ("GET", "HEAD"):
            response = await client.request(method, path, headers={"Range": header})
            assert response.status == 206, header
            assert response.headers["Content-Range"] == f"bytes {first}-{last}/{size}"
            assert response.headers["Content-Length"] == str(last - first + 1)
            assert response.headers["Docker-Content-Digest"] == digest
            body = await response.read()
            assert body == (whole[first:last + 1] if method == "GET" else b""), header


async def test_unsatisfiable_ranges(client: Client, shared_images: StandardImages) -> None:
    digest = shared_images.layers["app:1.0"][0]
    path = f"/v2/app/blobs/{digest}"
    size = len(await (await client.get(path)).read())
    for header in (f"bytes={size}-", f"bytes={size + 500}-{size + 600}", "bytes=500-0",
                   "bytes=-0"):
        response = await client.get(path, headers={"Range": header})
        await assert_error(response, 416, "RANGE_INVALID")
        assert response.headers["Content-Range"] == f"bytes */{size}"
        head = await client.head(path, headers={"Range": header})
        assert head.status == 416
        assert head.headers["Content-Range"] == f"bytes */{size}"


async def test_ignored_ranges_give_the_whole_blob(client: Client,
                                                  shared_images: StandardImages) -> None:
    digest = shared_images.layers["app:1.0"][0]
    path = f"/v2/app/blobs/{digest}"
    whole = await (await client.get(path)).read()
    # Multi-range (no multipart/byteranges, which podman cannot read), garbage, another unit,
    # and If-Range with a validator that does not match (RFC 9110 §13.1.5): all get a 200.
    for headers in ({"Range": "bytes=0-1,4-5"}, {"Range": "bytes=x-y"}, {"Range": "items=0-1"},
                    {"Range": "bytes=0-9", "If-Range": '"sha256:other"'}):
        response = await client.get(path, headers=headers)
        assert response.status == 200, headers
        assert "Content-Range" not in response.headers
        assert await response.read() == whole
    response = await client.get(path, headers={"Range": "bytes=0-9", "If-Range": f'"{digest}"'})
    assert response.status == 206


async def test_blob_if_none_match(client: Client, shared_images: StandardImages) -> None:
    digest = shared_images.layers["app:1.0"][0]
    response = await client.get(f"/v2/app/blobs/{digest}",
                                headers={"If-None-Match": f'"{digest}"'})
    assert response.status == 304
    assert await response.read() == b""


async def test_manifest_fetched_as_blob_keeps_its_media_type(
        client: Client, shared_images: StandardImages) -> None:
    # containerd falls back to HEAD /blobs/<manifest digest> (containerd#7391, #13007).
    cases = [("multi", shared_images.manifests["multi:latest"], OCI_INDEX),
             ("multi", shared_images.children["multi:latest"]["arm64"], OCI_MANIFEST),
             ("app", shared_images.manifests["app:1.0"], OCI_MANIFEST),
             ("bare", shared_images.manifests["bare:v1"], OCI_MANIFEST),
             ("zipped", shared_images.manifests["zipped:1.0"], OCI_MANIFEST)]
    for name, digest, media_type in cases:
        for method in ("GET", "HEAD"):
            response = await client.request(method, f"/v2/{name}/blobs/{digest}")
            assert response.status == 200
            assert response.headers["Content-Type"] == media_type
            assert response.headers["Docker-Content-Digest"] == digest
            body = await response.read()
            if method == "GET":
                assert sha256(body) == digest
                assert response.headers["Content-Length"] == str(len(body))


async def test_blob_of_another_name_is_unknown(client: Client,
                                               shared_images: StandardImages) -> None:
    layer = shared_images.layers["app:1.0"][0]
    await assert_error(await client.get(f"/v2/pair/blobs/{layer}"), 404, "BLOB_UNKNOWN")
    assert (await client.head(f"/v2/pair/blobs/{layer}")).status == 404
    await assert_error(await client.get(f"/v2/app/blobs/{MISSING}"), 404, "BLOB_UNKNOWN")
    await assert_error(await client.get(f"/v2/nosuch/blobs/{layer}"), 404,
                       "NAME_UNKNOWN", "BLOB_UNKNOWN")


# ------------------------------------------------------------------------------ listings


async def test_tags_list(client: Client) -> None:
    response = await client.get("/v2/pair/tags/list")
    assert response.status == 200
    assert json.loads(await response.read()) == {"name": "pair", "tags": ["one", "two"]}
    assert "Link" not in response.headers
    body = json.loads(await (await client.get("/v2/app/tags/list")).read())
    assert body == {"name": "app", "tags": ["1.0", "2.0"]}
    body = json.loads(await (await client.get("/v2/team/full/tags/list")).read())
    assert body["tags"] == ["3.1"]
    await assert_error(await client.get("/v2/nosuch/tags/list"), 404, "NAME_UNKNOWN")


async def test_tags_list_pagination(client: Client) -> None:
    response = await client.get("/v2/app/tags/list?n=1")
    assert json.loads(await response.read())["tags"] == ["1.0"]
    assert response.headers["Link"] == '</v2/app/tags/list?n=1&last=1.0>; rel="next"'
    response = await client.get("/v2/app/tags/list?n=1&last=1.0")
    assert json.loads(await response.read())["tags"] == ["2.0"]
    assert "Link" not in response.headers
    response = await client.get("/v2/app/tags/list?last=2.0")
    assert json.loads(await response.read())["tags"] == []
    response = await client.get("/v2/app/tags/list?n=0")
    assert json.loads(await response.read())["tags"] == []
    response = await client.get("/v2/app/tags/list?n=5")
    assert json.loads(await response.read())["tags"] == ["1.0", "2.0"]
    assert "Link" not in response.headers
    for bad in ("-1", "x", "1.5", "99999999999999999999"):
        await assert_error(await client.get(f"/v2/app/tags/list?n={bad}"), 400)


async def test_catalog_and_pagination(client: Client) -> None:
    response = await client.get("/v2/_catalog")
    assert response.status == 200
    names = json.loads(await response.read())["repositories"]
    assert names == sorted(names)
    for name in ("app", "multi", "zipped", "pair", "team/full", "bare"):
        assert name in names
    # Walk the catalog two at a time following Link headers.
    collected: list[str] = []
    url: str | None = "/v2/_catalog?n=2"
    pages = 0
    while url is not None:
        response = await client.get(url)
        page = json.loads(await response.read())["repositories"]
        assert len(page) <= 2
        collected += page
        link = response.headers.get("Link")
        url = None
        if link is not None:
            assert link.endswith('>; rel="next"') and link.startswith("</v2/_catalog?")
            url = link[1:link.index(">")]
        pages += 1
        assert pages < 20
    assert collected == names
    response = await client.get(f"/v2/_catalog?last={names[-2]}")
    assert json.loads(await response.read())["repositories"] == [names[-1]]
    await assert_error(await client.get("/v2/_catalog?n=abc"), 400)


# ------------------------------------------------------------------------------ referrers


@pytest.fixture
async def referrers_client(aiohttp_client: MakeClient, image_dir: Path) -> tuple[Client, dict[
        str, str]]:
    writer = LayoutWriter()
    image, _ = small_image(writer, "signed")
    lonely, _ = small_image(writer, "lonely")
    signature = writer.add_image([], subject=image, artifact_type=SIGNATURE_TYPE)
    sbom = writer.add_image([writer.add_blob(b'{"sbom":true}', "application/json")],
                            subject=image, artifact_type=SBOM_TYPE)
    writer.tag(image, "1.0")
    writer.tag(lonely, "lonely")
    writer.tag(signature, None)
    writer.tag(sbom, None)
    writer.write_archive(image_dir / "signed.oci")
    digests = {"image": image.digest, "lonely": lonely.digest, "signature": signature.digest,
               "sbom": sbom.digest}
    return await client_for(aiohttp_client, image_dir), digests


async def test_referrers(referrers_client: tuple[Client, dict[str, str]]) -> None:
    client, digests = referrers_client
    response = await client.get(f"/v2/signed/referrers/{digests['image']}")
    assert response.status == 200
    assert response.headers["Content-Type"] == OCI_INDEX
    assert "OCI-Filters-Applied" not in response.headers
    index = json.loads(await response.read())
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    listed = {d["digest"]: d for d in index["manifests"]}
    assert set(listed) == {digests["signature"], digests["sbom"]}
    assert listed[digests["signature"]]["artifactType"] == SIGNATURE_TYPE
    assert listed[digests["sbom"]]["artifactType"] == SBOM_TYPE
    for digest, descriptor in listed.items():
        manifest = await client.get(f"/v2/signed/manifests/{digest}")
        body = await manifest.read()
        assert descriptor["mediaType"] == OCI_MANIFEST
        assert descriptor["size"] == len(body) and sha256(body) == digest
        assert json.loads(body)["subject"]["digest"] == digests["image"]


async def test_referrers_filtered(referrers_client: tuple[Client, dict[str, str]]) -> None:
    client, digests = referrers_client
    response = await client.get(f"/v2/signed/referrers/{digests['image']}",
                                params={"artifactType": SBOM_TYPE})
    assert response.status == 200
    assert response.headers["OCI-Filters-Applied"] == "artifactType"
    index = json.loads(await response.read())
    assert [d["digest"] for d in index["manifests"]] == [digests["sbom"]]
    response = await client.get(f"/v2/signed/referrers/{digests['image']}",
                                params={"artifactType": "application/none"})
    assert json.loads(await response.read())["manifests"] == []


async def test_referrers_empty_is_200(referrers_client: tuple[Client, dict[str, str]]) -> None:
    client, digests = referrers_client
    for digest in (digests["lonely"], MISSING):
        response = await client.get(f"/v2/signed/referrers/{digest}")
        assert response.status == 200
        assert response.headers["Content-Type"] == OCI_INDEX
        index = json.loads(await response.read())
        assert index == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    await assert_error(await client.get("/v2/signed/referrers/sha256:zz"), 400,
                       "DIGEST_INVALID")


# ------------------------------------------------------------------------------ writes


@pytest.mark.parametrize("method,path", [
    ("POST", "/v2/app/blobs/uploads/"),
    ("POST", "/v2/app/blobs/uploads/?mount=sha256:" + "1" * 64 + "&from=other"),
    ("PATCH", "/v2/app/blobs/uploads/some-session"),
    ("PUT", "/v2/app/blobs/uploads/some-session?digest=" + MISSING),
    ("DELETE", "/v2/app/blobs/uploads/some-session"),
    ("PUT", "/v2/app/manifests/t"),
    ("DELETE", "/v2/app/manifests/1.0"),
    ("DELETE", f"/v2/app/blobs/{MISSING}"),
    ("PATCH", "/v2/app/manifests/1.0"),
    ("POST", "/v2/_catalog"),
])
async def test_writes_are_refused(client: Client, method: str, path: str) -> None:
    response = await client.request(method, path, data=b"{}")
    await assert_error(response, 405, "UNSUPPORTED")
    assert "Allow" in response.headers
    assert "POST" not in response.headers["Allow"]


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("endpoint", ["manifests", "blobs", "referrers"])
@pytest.mark.parametrize("digest", [
    "sha256:abc", "sha256:" + "A" * 64, "sha256:" + "0" * 63, "sha256:" + "0" * 65,
    "md5:d41d8cd98f00b204e9800998ecf8427e", "sha256:", ":" + "0" * 64, "sha256:%2e%2e",
    "sha256:" + "g" * 64, "SHA256:" + "0" * 64, "sha256:" + "0" * 64 + ":x",
])
async def test_malformed_digest_is_400(client: Client, endpoint: str, digest: str) -> None:
    response = await client.get(f"/v2/app/{endpoint}/{digest}")
    await assert_error(response, 400, "DIGEST_INVALID")


async def test_malformed_digests_never_500_on_head(client: Client) -> None:
    for endpoint in ("manifests", "blobs", "referrers"):
        response = await client.head(f"/v2/app/{endpoint}/sha256:nothex")
        assert response.status == 400


@pytest.mark.parametrize("name", ["App", "UPPER/case", "a//b", "-app", "app-", "a..b",
                                  "a_._b", "app/", "x" * 300])
async def test_invalid_names(client: Client, name: str) -> None:
    for path in (f"/v2/{name}/manifests/latest", f"/v2/{name}/tags/list",
                 f"/v2/{name}/blobs/{MISSING}"):
        response = await client.get(path)
        await assert_error(response, response.status, "NAME_INVALID", "UNSUPPORTED")
        assert response.status in (400, 404)


@pytest.mark.parametrize("tag", ["-bad", ".bad", "x" * 200])
async def test_invalid_tags_are_client_errors(client: Client, tag: str) -> None:
    response = await client.get(f"/v2/app/manifests/{tag}")
    await assert_error(response, response.status)
    assert 400 <= response.status < 500


@pytest.fixture
async def traversal_client(aiohttp_client: MakeClient, tmp_path: Path,
                           image_dir: Path) -> tuple[Client, str]:
    """A valid image OUTSIDE the image directory, and one inside for comparison."""
    writer = LayoutWriter()
    image, _ = small_image(writer, "secret")
    writer.tag(image, "latest")
    writer.write_archive(tmp_path / "outside.oci")  # tmp_path/images is the served dir
    (tmp_path / "outside").mkdir()
    writer.write_archive(tmp_path / "outside" / "latest.oci")
    writer.write_archive(image_dir / "inside.oci")
    return await client_for(aiohttp_client, image_dir), image.digest


@pytest.mark.parametrize("target", [
    "/v2/../outside/manifests/latest",
    "/v2/%2e%2e/outside/manifests/latest",
    "/v2/%2E%2E/outside/manifests/latest",
    "/v2/..%2foutside/manifests/latest",
    "/v2/%2e%2e%2foutside/manifests/latest",
    "/v2/inside/../../outside/manifests/latest",
    "/v2/x/%2e%2e/%2e%2e/outside/manifests/latest",
    "/v2/./../outside/manifests/latest",
    "/v2/..\\outside/manifests/latest",
    "/v2/%2e%2e/outside/tags/list",
    "/v2/%2e%2e/outside/blobs/{layer}",
    "/v2/%2e%2e/outside/referrers/{digest}",
    "/v2/%2e%2e/images/inside/manifests/latest",
    "/v2//outside/manifests/latest",
    "/v2/%2Ftmp/outside/manifests/latest",
])
async def test_traversal_never_escapes(traversal_client: tuple[Client, str], target: str) -> None:
    client, digest = traversal_client
    target = target.replace("{digest}", digest).replace("{layer}", digest)
    for method in ("GET", "HEAD"):
        status, headers, body = await raw_request(client, method, target)
        assert status in (400, 404), (target, status, body)
        assert digest.encode() not in body
        assert headers.get("docker-content-digest") != digest
        if method == "GET":
            errors = json.loads(body)["errors"]
            assert errors[0]["code"] in ("NAME_INVALID", "UNSUPPORTED", "NAME_UNKNOWN",
                                         "MANIFEST_UNKNOWN", "BLOB_UNKNOWN"), errors
    # The same image is servable from inside the directory: the refusals above are not accidents.
    status, headers, _ = await raw_request(client, "GET", "/v2/inside/manifests/latest")
    assert status == 200 and headers["docker-content-digest"] == digest


async def test_symlinks_out_of_the_directory_are_refused(
        traversal_client: tuple[Client, str], tmp_path: Path, image_dir: Path) -> None:
    client, digest = traversal_client
    (image_dir / "linked.oci").symlink_to(tmp_path / "outside.oci")
    (image_dir / "linkdir").symlink_to(tmp_path / "outside")
    for path in ("/v2/linked/manifests/latest", "/v2/linkdir/manifests/latest",
                 f"/v2/linked/manifests/{digest}", f"/v2/linkdir/blobs/{digest}"):
        response = await client.get(path)
        await assert_error(response, 404)


async def test_catalog_omits_symlinks_out_of_the_directory(
        traversal_client: tuple[Client, str], tmp_path: Path, image_dir: Path) -> None:
    client, _ = traversal_client
    (image_dir / "linked.oci").symlink_to(tmp_path / "outside.oci")
    (image_dir / "linkdir").symlink_to(tmp_path / "outside")
    catalog = json.loads(await (await client.get("/v2/_catalog")).read())["repositories"]
    assert "inside" in catalog
    assert "linkdir" not in catalog
    assert "linked" not in catalog


_SEGMENT = st.text(alphabet=st.sampled_from("aZ09._-:/%2e\\@+ ~"), min_size=0, max_size=12)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=_SEGMENT, endpoint=st.sampled_from(["manifests", "blobs", "tags", "referrers",
                                                "uploads", "_catalog", ""]),
       argument=_SEGMENT, method=st.sampled_from(["GET", "HEAD", "DELETE", "PUT"]))
async def test_no_path_gives_a_server_error(client: Client, name: str, endpoint: str,
                                            argument: str, method: str) -> None:
    target = "/v2/" + "/".join(part for part in (name, endpoint, argument) if part)
    target = target.replace(" ", "%20")
    status, headers, body = await raw_request(client, method, target)
    assert status < 500, (target, status, body)
    if status >= 400 and method != "HEAD":
        errors = json.loads(body)["errors"]
        assert errors and isinstance(errors[0]["code"], str), target


async def test_routing_ignores_other_query_parameters(client: Client,
                                                     shared_images: StandardImages) -> None:
    digest = shared_images.manifests["app:1.0"]
    status, headers, _ = await raw_request(client, "HEAD", "/v2/app/manifests/1.0?x=/../y")
    assert status == 200 and headers["docker-content-digest"] == digest
    response = await client.get("/v2/?ns=docker.io")  # ns means nothing outside a repository
    assert response.status == 200
    response = await client.get("/v2/_catalog?ns=x/../y")
    assert response.status == 200


# ------------------------------------------------------------------------------ mirror mode


@pytest.fixture(scope="module")
def mirror_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Upstream names under host folders, plus flat names that must not answer for them."""
    root = tmp_path_factory.mktemp("mirror")
    found: dict[str, Any] = {"root": root}

    def write(path: str, text: str, tag: str | None, *, signed: bool = False) -> None:
        writer = LayoutWriter()
        image, layers = small_image(writer, text)
        writer.tag(image, tag)  # untagged: the tag comes from the file name
        if signed:
            signature = writer.add_image([], subject=image, artifact_type=SIGNATURE_TYPE)
            writer.tag(signature, None)
            found[f"{text}-signature"] = signature.digest
        writer.write_archive(root / path)
        found[text] = image.digest
        found[f"{text}-layer"] = layers[0].digest

    write("docker.io/library/busybox/1.36.oci", "busybox", "1.36", signed=True)
    write("registry.k8s.io/pause:3.9.oci", "pause", "3.9")
    write("quay.io/prometheus/node-exporter.oci", "exporter", "v1.8.0")
    write("localhost_5000/team/app/1.0.oci", "ported", None)
    # Flat names: what an existing (non-mirror) directory holds.
    write("library/busybox/1.36.oci", "flat-busybox", None)
    write("prometheus/node-exporter/v1.8.0.oci", "flat-exporter", None)
    return found


@pytest.fixture
async def mirror(aiohttp_client: MakeClient, mirror_dir: dict[str, Any]) -> Client:
    return await client_for(aiohttp_client, mirror_dir["root"])


@pytest.mark.parametrize("path, query", [
    ("library/busybox", "?ns=docker.io"),  # containerd
    ("busybox", "?ns=docker.io"),  # library/ added for Docker Hub's one-part names
    ("library/busybox", "?ns=index.docker.io"),  # Docker Hub's aliases
    ("library/busybox", "?ns=registry-1.docker.io"),
    ("library/busybox", "?ns=DOCKER.IO"),  # hosts are case-insensitive
    ("docker.io/library/busybox", ""),  # CRI-O, podman, skopeo: the host in the path
    ("docker.io/busybox", ""),
    ("index.docker.io/library/busybox", ""),
    ("docker.io/library/busybox", "?ns=docker.io"),  # containerd with override_path
])
async def test_both_mirror_forms_reach_the_host_folder(mirror: Client, mirror_dir: dict[str, Any],
                                                      path: str, query: str) -> None:
    digest, layer = mirror_dir["busybox"], mirror_dir["busybox-layer"]
    for method in ("HEAD", "GET"):
        response = await mirror.request(method, f"/v2/{path}/manifests/1.36{query}")
        assert response.status == 200, await response.text()
        assert response.headers["Docker-Content-Digest"] == digest
    response = await mirror.get(f"/v2/{path}/manifests/{digest}{query}")
    assert response.status == 200
    response = await mirror.get(f"/v2/{path}/blobs/{layer}{query}")
    assert response.status == 200 and sha256(await response.read()) == layer
    response = await mirror.get(f"/v2/{path}/tags/list{query}")
    assert json.loads(await response.read()) == {"name": "docker.io/library/busybox",
                                                  "tags": ["1.36"]}
    response = await mirror.get(f"/v2/{path}/referrers/{digest}{query}")
    listed = json.loads(await response.read())["manifests"]
    assert [d["digest"] for d in listed] == [mirror_dir["busybox-signature"]]


@pytest.mark.parametrize("path, ns, key, tag", [
    ("pause", "registry.k8s.io", "pause", "3.9"),
    ("prometheus/node-exporter", "quay.io", "exporter", "v1.8.0"),
    ("team/app", "localhost:5000", "ported", "1.0"),
])
async def test_other_registries_and_ports(mirror: Client, mirror_dir: dict[str, Any],
                                          path: str, ns: str, key: str, tag: str) -> None:
    response = await mirror.get(f"/v2/{path}/manifests/{tag}?ns={ns}")
    assert response.status == 200, await response.text()
    assert response.headers["Docker-Content-Digest"] == mirror_dir[key]
    folder = ns.replace(":", "_")
    response = await mirror.get(f"/v2/{folder}/{path}/manifests/{tag}")
    assert response.headers["Docker-Content-Digest"] == mirror_dir[key]


async def test_ns_never_falls_back_to_the_flat_name(mirror: Client,
                                                   mirror_dir: dict[str, Any]) -> None:
    """The documented rule: with ns the host folder alone answers. quay.io's and Docker Hub's
    prometheus/node-exporter are different images; the flat one must not stand in."""
    response = await mirror.get("/v2/prometheus/node-exporter/manifests/v1.8.0?ns=docker.io")
    await assert_error(response, 404, "NAME_UNKNOWN", "MANIFEST_UNKNOWN")
    response = await mirror.get(f"/v2/prometheus/node-exporter/blobs/"
                                f"{mirror_dir['flat-exporter-layer']}?ns=docker.io")
    await assert_error(response, 404, "NAME_UNKNOWN", "BLOB_UNKNOWN")
    # The host folder's own image, not the flat one, answers for quay.io.
    response = await mirror.get("/v2/prometheus/node-exporter/manifests/v1.8.0?ns=quay.io")
    assert response.headers["Docker-Content-Digest"] == mirror_dir["exporter"]


async def test_requests_without_ns_use_the_path_as_before(mirror: Client,
                                                         mirror_dir: dict[str, Any]) -> None:
    response = await mirror.get("/v2/library/busybox/manifests/1.36")
    assert response.headers["Docker-Content-Digest"] == mirror_dir["flat-busybox"]
    response = await mirror.get("/v2/prometheus/node-exporter/manifests/v1.8.0")
    assert response.headers["Docker-Content-Digest"] == mirror_dir["flat-exporter"]
    response = await mirror.get("/v2/registry.k8s.io/pause/manifests/3.9")
    assert response.headers["Docker-Content-Digest"] == mirror_dir["pause"]


async def test_a_missing_upstream_name_is_404(mirror: Client) -> None:
    response = await mirror.get("/v2/library/nginx/manifests/1.25?ns=docker.io")
    await assert_error(response, 404, "NAME_UNKNOWN", "MANIFEST_UNKNOWN")


@pytest.mark.parametrize("query", [
    "ns=", "ns=..", "ns=../..", "ns=a/b", "ns=%2e%2e%2fetc", "ns=" + "a" * 300,
    "ns=[::1]:5000", "ns=host:99999", "ns=-a.com", "ns=a%00b", "ns=*.io",
    "ns=docker.io&ns=quay.io",
])
async def test_bad_ns_is_a_400_before_the_filesystem(mirror: Client, query: str) -> None:
    for path in ("library/busybox/manifests/1.36", "library/busybox/tags/list",
                 f"library/busybox/blobs/{MISSING}", f"library/busybox/referrers/{MISSING}"):
        status, headers, body = await raw_request(mirror, "GET", f"/v2/{path}?{query}")
        assert status == 400, (query, path, status, body)
        (error,) = json.loads(body)["errors"]
        assert error["code"] == "NAME_INVALID" and "ns" in error["message"], error


# ------------------------------------------------------------------------------ HEAD == GET

KEYS = ["app:1.0", "app:2.0", "multi:latest", "zipped:1.0", "pair:one", "pair:two",
        "team/full:3.1", "bare:v1"]
KINDS = ["manifest-by-tag", "manifest-by-digest", "manifest-as-blob", "layers", "ranged-layer",
         "tags", "referrers", "children"]
GLOBAL = ["/v2/", "/v2", "/v2/_catalog", "/v2/_catalog?n=1",
          # Errors must agree too (spegel#1378: HEAD 200 with GET 404 loops forever).
          "/v2/app/manifests/9.9", f"/v2/app/blobs/{MISSING}", "/v2/nosuch/manifests/1.0",
          "/v2/app/manifests/sha256:bad", "/v2/App/tags/list", "/v2/app/nothing",
          "/v2/app/tags/list?n=x", f"/v2/app/referrers/{MISSING}"]


def _requests(images: StandardImages, key: str, kind: str) -> list[tuple[str, str | None]]:
    name, tag = key.rsplit(":", 1)
    digest = images.manifests[key]
    layers = images.layers[key]
    if kind == "manifest-by-tag":
        return [(f"/v2/{name}/manifests/{tag}", None)]
    if kind == "manifest-by-digest":
        return [(f"/v2/{name}/manifests/{digest}", None)]
    if kind == "manifest-as-blob":
        return [(f"/v2/{name}/blobs/{digest}", None), (f"/v2/{name}/blobs/{digest}", "bytes=0-3")]
    if kind == "layers":
        return [(f"/v2/{name}/blobs/{layer}", None) for layer in layers]
    if kind == "ranged-layer":
        path = f"/v2/{name}/blobs/{layers[0]}"
        return [(path, "bytes=2-7"), (path, "bytes=-3"), (path, "bytes=4-"),
                (path, "bytes=99999-")]
    if kind == "tags":
        return [(f"/v2/{name}/tags/list", None), (f"/v2/{name}/tags/list?n=1", None)]
    if kind == "referrers":
        return [(f"/v2/{name}/referrers/{digest}", None)]
    assert kind == "children"
    return [(f"/v2/{name}/{endpoint}/{child}", None)
            for child in images.children.get(key, {}).values()
            for endpoint in ("manifests", "blobs")]


async def _assert_agree(client: Client, path: str, byte_range: str | None) -> None:
    headers = {"Range": byte_range} if byte_range else {}
    get = await client.get(path, headers=headers)
    body = await get.read()
    head = await client.head(path, headers=headers)
    assert await head.read() == b""
    assert head.status == get.status, path
    assert get.headers.get("Content-Length") == str(len(body)), path
    for header in ("Content-Length", "Content-Type", "Docker-Content-Digest", "Content-Range",
                   "ETag", "Docker-Distribution-API-Version"):
        assert head.headers.get(header) == get.headers.get(header), (path, header)
    if get.status >= 400:
        await assert_error(get, get.status)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("key", KEYS)
async def test_head_and_get_agree(client: Client, shared_images: StandardImages, key: str,
                                  kind: str) -> None:
    for path, byte_range in _requests(shared_images, key, kind):
        await _assert_agree(client, path, byte_range)


@pytest.mark.parametrize("path", GLOBAL)
async def test_head_and_get_agree_elsewhere(client: Client, path: str) -> None:
    await _assert_agree(client, path, None)


# ------------------------------------------------------------------------------ other shapes


@pytest.fixture
async def shapes_client(aiohttp_client: MakeClient,
                        image_dir: Path) -> tuple[Client, dict[str, tuple[str, str, list[str]]]]:
    """Archives in the other shapes tools write: name -> (tag, manifest digest, layer digests)."""
    shapes: dict[str, tuple[str, str, list[str]]] = {}

    def image(writer: LayoutWriter, text: str, **kwargs: Any) -> tuple[Any, list[str]]:
        descriptor, layers = small_image(writer, text, layers=2, **kwargs)
        return descriptor, [d.digest for d in layers]

    w = LayoutWriter()
    desc, layers = image(w, "zstd", compression="zstd")
    w.tag(desc, "1")
    w.write_archive(image_dir / "zstd.oci", compression="zstd")
    shapes["zstd"] = ("1", desc.digest, layers)

    w = LayoutWriter()
    amd = w.add_image([w.add_layer({"a": b"amd"})], docker=True)
    arm = w.add_image([w.add_layer({"a": b"arm"})], docker=True, architecture="arm64")
    listing = w.add_index([amd, arm], docker=True)
    w.tag(listing, "docker.io/library/dock:2")
    w.write_archive(image_dir / "dock.oci")
    shapes["dock"] = ("2", listing.digest, [])
    shapes["dock-child"] = ("", amd.digest, [])

    w = LayoutWriter()
    desc, layers = image(w, "dotted")
    w.tag(desc, "3")
    w.write_archive(image_dir / "dotted.oci", member_prefix="./", include_directories=False,
                    blobs_first=False)
    shapes["dotted"] = ("3", desc.digest, layers)

    w = LayoutWriter()
    desc, layers = image(w, "dir")
    w.tag(desc, "4")
    w.write_directory(image_dir / "dir.oci")
    shapes["dir"] = ("4", desc.digest, layers)

    w = LayoutWriter()  # untagged single image named <name>/<tag>.oci: the file names the tag
    desc, layers = image(w, "untagged")
    w.tag(desc, None)
    w.write_archive(image_dir / "untagged" / "5.oci")
    shapes["untagged"] = ("5", desc.digest, layers)
    return await client_for(aiohttp_client, image_dir), shapes


@pytest.mark.parametrize("name", ["zstd", "dotted", "dir", "untagged"])
async def test_other_archive_shapes(shapes_client: tuple[Client, dict[str, tuple[str, str,
                                                                                  list[str]]]],
                                    name: str) -> None:
    client, shapes = shapes_client
    tag, digest, layers = shapes[name]
    response = await client.get(f"/v2/{name}/manifests/{tag}")
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == digest
    assert sha256(await response.read()) == digest
    for layer in layers:
        whole = await (await client.get(f"/v2/{name}/blobs/{layer}")).read()
        assert sha256(whole) == layer
        for header, part in (("bytes=3-12", whole[3:13]), ("bytes=-4", whole[-4:]),
                             ("bytes=7-", whole[7:])):
            response = await client.get(f"/v2/{name}/blobs/{layer}", headers={"Range": header})
            assert response.status == 206 and await response.read() == part, header
            head = await client.head(f"/v2/{name}/blobs/{layer}", headers={"Range": header})
            assert head.headers["Content-Length"] == str(len(part))
    tags = json.loads(await (await client.get(f"/v2/{name}/tags/list")).read())["tags"]
    assert tags == [tag]


async def test_docker_manifest_list(shapes_client: tuple[Client, dict[str, tuple[str, str,
                                                                                 list[str]]]]
                                    ) -> None:
    client, shapes = shapes_client
    _, digest, _ = shapes["dock"]
    for method in ("GET", "HEAD"):
        response = await client.request(method, "/v2/dock/manifests/2")
        assert response.status == 200
        assert response.headers["Content-Type"] == (
            "application/vnd.docker.distribution.manifest.list.v2+json")
        assert response.headers["Docker-Content-Digest"] == digest
    _, child, _ = shapes["dock-child"]
    response = await client.get(f"/v2/dock/manifests/{child}")
    assert response.headers["Content-Type"] == (
        "application/vnd.docker.distribution.manifest.v2+json")
    response = await client.head(f"/v2/dock/blobs/{child}")
    assert response.headers["Content-Type"] == (
        "application/vnd.docker.distribution.manifest.v2+json")


async def test_concurrent_requests_share_one_indexing(
        shapes_client: tuple[Client, dict[str, tuple[str, str, list[str]]]]) -> None:
    client, shapes = shapes_client
    _, digest, layers = shapes["zstd"]

    async def fetch(path: str) -> bytes:
        response = await client.get(path)
        assert response.status == 200, path
        return await response.read()

    paths = [f"/v2/zstd/blobs/{layers[i % 2]}" for i in range(20)]
    paths += [f"/v2/zstd/manifests/{digest}"] * 10
    bodies = await asyncio.gather(*(fetch(path) for path in paths))
    for path, body in zip(paths, bodies, strict=True):
        assert sha256(body) == path.rsplit("/", 1)[1]
