"""Cache behaviour of a real registry process while archives change underneath it.

Every request re-checks the directories it depends on by stat; an archive is indexed once per
stat fingerprint; the periodic rescan retires archives nobody asked about since they went.
``--grace-period 0`` makes a replaced archive's digests go at once, as these tests expect.
These tests change files the way operators and sync tools do (write beside, then
``os.replace``; ``cp -p``-style older mtimes; delete) and check what the next requests
see. Nothing here asserts on timing: where a change may take a while to show, the test
polls for it with a generous bound.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from simple_oci_registry.layoutwriter import Descriptor, LayoutWriter
from tests.server import RegistryProcess

StartRegistry = Callable[..., RegistryProcess]
FRESH = ("--grace-period", "0", "--rescan-interval", "0.2")
POLL_LIMIT = 30.0  # seconds; only ever reached when the behaviour is broken


class Image:
    """One written archive: its manifest digest, tag and layer digests."""

    def __init__(self, digest: str, layers: list[str]) -> None:
        self.digest = digest
        self.layers = layers


def build(text: str, tag: str, *, shared: bytes | None = None) -> tuple[LayoutWriter, Image]:
    """An image whose content depends on ``text``; ``shared`` adds a layer other images share."""
    writer = LayoutWriter()
    layers: list[Descriptor] = []
    if shared is not None:
        layers.append(writer.add_layer({"shared.txt": shared}))
    layers.append(writer.add_layer({f"{text}.txt": f"{text}\n".encode() * 50}))
    image = writer.add_image(layers, config={"config": {"Cmd": ["/bin/echo", text]}})
    writer.tag(image, tag)
    return writer, Image(image.digest, [layer.digest for layer in layers])


def write(path: Path, text: str, tag: str, *, shared: bytes | None = None) -> Image:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer, image = build(text, tag, shared=shared)
    writer.write_archive(path)
    return image


def replace(path: Path, text: str, tag: str, *, mtime_ns: int | None = None,
            shared: bytes | None = None) -> Image:
    """Write the new archive under a temporary name in the same directory, then rename it."""
    writer, image = build(text, tag, shared=shared)
    temporary = path.with_name(f".{path.name}.incoming")
    writer.write_archive(temporary)
    if mtime_ns is not None:
        os.utime(temporary, ns=(mtime_ns, mtime_ns))
    os.replace(temporary, path)
    return image


def request(registry: RegistryProcess, path: str,
            method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(registry.url + path, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def manifest_digest(registry: RegistryProcess, name: str, reference: str) -> str | None:
    status, headers, body = request(registry, f"/v2/{name}/manifests/{reference}")
    if status != 200:
        return None
    assert "sha256:" + hashlib.sha256(body).hexdigest() == headers["Docker-Content-Digest"]
    return headers["Docker-Content-Digest"]


def error_code(registry: RegistryProcess, path: str) -> tuple[int, str]:
    status, _, body = request(registry, path)
    assert status >= 400, path
    head_status = request(registry, path, "HEAD")[0]
    assert head_status == status, path  # HEAD and GET agree on the change too
    return status, json.loads(body)["errors"][0]["code"]


def blob_ok(registry: RegistryProcess, name: str, digest: str) -> bool:
    status, headers, body = request(registry, f"/v2/{name}/blobs/{digest}")
    if status != 200:
        return False
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    assert headers["Docker-Content-Digest"] == digest
    return True


def poll(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + POLL_LIMIT
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


# ------------------------------------------------------------------------------ window 0


def test_replaced_archive_is_served_on_the_next_request(
        image_dir: Path, start_registry: StartRegistry) -> None:
    path = image_dir / "app" / "1.0.oci"
    old = write(path, "old", "1.0")
    registry = start_registry(image_dir, *FRESH)
    assert manifest_digest(registry, "app", "1.0") == old.digest
    assert all(blob_ok(registry, "app", layer) for layer in old.layers)

    new = replace(path, "new", "1.0")
    assert manifest_digest(registry, "app", "1.0") == new.digest
    assert all(blob_ok(registry, "app", layer) for layer in new.layers)
    # What only the old archive held is gone with it.
    assert error_code(registry, f"/v2/app/manifests/{old.digest}") == (404, "MANIFEST_UNKNOWN")
    assert error_code(registry, f"/v2/app/blobs/{old.layers[0]}") == (404, "BLOB_UNKNOWN")


def test_replacement_with_an_older_mtime_is_noticed(
        image_dir: Path, start_registry: StartRegistry) -> None:
    path = image_dir / "app" / "1.0.oci"
    old = write(path, "current", "1.0")
    registry = start_registry(image_dir, *FRESH)
    assert manifest_digest(registry, "app", "1.0") == old.digest
    older = path.stat().st_mtime_ns - 3600 * 10**9  # as "cp -p" / "rsync -t" of an old build
    restored = replace(path, "restored", "1.0", mtime_ns=older)
    assert path.stat().st_mtime_ns == older
    assert manifest_digest(registry, "app", "1.0") == restored.digest
    assert all(blob_ok(registry, "app", layer) for layer in restored.layers)


def test_in_place_rewrite_with_an_older_mtime_is_noticed(
        image_dir: Path, start_registry: StartRegistry) -> None:
    # Same inode, same directory entry: only size and mtime can tell the change.
    path = image_dir / "app" / "1.0.oci"
    old = write(path, "aaaa", "1.0")
    registry = start_registry(image_dir, *FRESH)
    assert manifest_digest(registry, "app", "1.0") == old.digest
    before = path.stat()
    writer, new = build("bbbb", "1.0")
    staging = image_dir.parent / "staging.oci"
    writer.write_archive(staging)
    data = staging.read_bytes()
    with open(path, "r+b") as handle:
        handle.write(data)
        handle.truncate()
    older = before.st_mtime_ns - 10**9
    os.utime(path, ns=(older, older))
    assert path.stat().st_ino == before.st_ino
    assert manifest_digest(registry, "app", "1.0") == new.digest
    assert all(blob_ok(registry, "app", layer) for layer in new.layers)


def test_deleted_archive_is_gone_on_the_next_request(
        image_dir: Path, start_registry: StartRegistry) -> None:
    one = write(image_dir / "app" / "1.0.oci", "one", "1.0")
    two = write(image_dir / "app" / "2.0.oci", "two", "2.0")
    solo = write(image_dir / "solo.oci", "solo", "latest")
    registry = start_registry(image_dir, *FRESH)
    assert manifest_digest(registry, "app", "2.0") == two.digest
    assert manifest_digest(registry, "solo", "latest") == solo.digest
    assert blob_ok(registry, "app", two.layers[0])

    (image_dir / "app" / "2.0.oci").unlink()
    assert error_code(registry, "/v2/app/manifests/2.0") == (404, "MANIFEST_UNKNOWN")
    assert error_code(registry, f"/v2/app/manifests/{two.digest}") == (404, "MANIFEST_UNKNOWN")
    assert error_code(registry, f"/v2/app/blobs/{two.layers[0]}") == (404, "BLOB_UNKNOWN")
    assert manifest_digest(registry, "app", "1.0") == one.digest
    status, _, body = request(registry, "/v2/app/tags/list")
    assert status == 200 and json.loads(body)["tags"] == ["1.0"]

    (image_dir / "solo.oci").unlink()
    status, code = error_code(registry, "/v2/solo/manifests/latest")
    assert status == 404 and code in ("NAME_UNKNOWN", "MANIFEST_UNKNOWN")
    status, code = error_code(registry, f"/v2/solo/blobs/{solo.layers[0]}")
    assert status == 404 and code in ("NAME_UNKNOWN", "BLOB_UNKNOWN")
    assert error_code(registry, "/v2/solo/tags/list") == (404, "NAME_UNKNOWN")


def test_digest_stays_servable_while_another_archive_holds_it(
        image_dir: Path, start_registry: StartRegistry) -> None:
    # A client resolved app:1.0 to a digest; then 1.0.oci is replaced by a new build. The old
    # image is still in app/archive.oci, so the digest it was handed must keep working.
    shared = b"a base layer both builds use\n" * 20
    first = write(image_dir / "app" / "1.0.oci", "first", "1.0", shared=shared)
    writer, _ = build("first", "archived", shared=shared)
    writer.write_archive(image_dir / "app" / "archive.oci")
    registry = start_registry(image_dir, *FRESH)
    handed_out = manifest_digest(registry, "app", "1.0")
    assert handed_out == first.digest
    assert blob_ok(registry, "app", first.layers[0])  # served from 1.0.oci (tried first)

    second = replace(image_dir / "app" / "1.0.oci", "second", "1.0", shared=shared)
    assert second.layers[0] == first.layers[0]
    assert manifest_digest(registry, "app", "1.0") == second.digest
    assert manifest_digest(registry, "app", handed_out) == handed_out
    assert all(blob_ok(registry, "app", layer) for layer in first.layers)

    (image_dir / "app" / "1.0.oci").unlink()
    # The shared layer is now only in archive.oci, and still served.
    assert blob_ok(registry, "app", first.layers[0])
    assert manifest_digest(registry, "app", handed_out) == handed_out
    assert manifest_digest(registry, "app", "archived") == handed_out
    (image_dir / "app" / "archive.oci").unlink()
    status, code = error_code(registry, f"/v2/app/blobs/{first.layers[0]}")
    assert status == 404 and code in ("NAME_UNKNOWN", "BLOB_UNKNOWN")


def test_broken_archive_is_retried_once_fixed(image_dir: Path,
                                              start_registry: StartRegistry) -> None:
    path = image_dir / "app" / "1.0.oci"
    path.parent.mkdir()
    path.write_bytes(b"not a tar archive at all" * 100)
    registry = start_registry(image_dir, *FRESH)
    for _ in range(3):  # remembered as broken: answered without re-reading it
        assert error_code(registry, "/v2/app/manifests/1.0") == (404, "MANIFEST_UNKNOWN")
    assert registry.log().count("cannot serve app/1.0.oci") == 1
    fixed = replace(path, "fixed", "1.0")
    assert manifest_digest(registry, "app", "1.0") == fixed.digest


def test_new_archive_and_name_appear(image_dir: Path, start_registry: StartRegistry) -> None:
    write(image_dir / "app" / "1.0.oci", "one", "1.0")
    registry = start_registry(image_dir, *FRESH)
    assert manifest_digest(registry, "fresh", "1.0") is None
    image = write(image_dir / "fresh" / "1.0.oci", "fresh", "1.0")
    assert manifest_digest(registry, "fresh", "1.0") == image.digest

    def listed() -> bool:
        return "fresh" in json.loads(request(registry, "/v2/_catalog")[2])["repositories"]

    poll(listed, "the new name in /v2/_catalog")


# ------------------------------------------------------------------------------ defaults


def test_default_settings_see_a_change_on_the_next_request(
        image_dir: Path, start_registry: StartRegistry) -> None:
    path = image_dir / "app" / "1.0.oci"
    old = write(path, "old", "1.0")
    registry = start_registry(image_dir, "--workers", "2")  # defaults otherwise
    assert manifest_digest(registry, "app", "1.0") == old.digest
    new = replace(path, "new", "1.0")
    # No freshness window: whichever worker answers has stat'ed the directory since.
    for _ in range(10):
        assert manifest_digest(registry, "app", "1.0") == new.digest
    assert all(blob_ok(registry, "app", layer) for layer in new.layers)
    # Within the grace period the replaced archive's blobs still download by digest.
    assert all(blob_ok(registry, "app", layer) for layer in old.layers)
    (image_dir / "app" / "1.0.oci").unlink()
    for _ in range(10):
        assert manifest_digest(registry, "app", "1.0") is None


def corrupt_member(path: Path, digest: str) -> None:
    """Flip bytes inside a blob's tar member, in place (same size, new mtime).

    The last byte (gzip's ISIZE trailer), not the first ones: a layer whose magic is gone is
    refused with its manifest when indexed (layout.py sniffs each layer's first bytes).
    """
    with tarfile.open(path) as tar:
        member = tar.getmember("blobs/sha256/" + digest.split(":", 1)[1])
        offset = member.offset_data + member.size - 2
    with open(path, "r+b") as handle:
        handle.seek(offset + 1)
        byte = handle.read(1)
        handle.seek(offset + 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_corrupted_blob_is_refused(image_dir: Path, start_registry: StartRegistry) -> None:
    path = image_dir / "app" / "1.0.oci"
    image = write(path, "intact", "1.0")
    registry = start_registry(image_dir, *FRESH)
    assert blob_ok(registry, "app", image.layers[0])
    corrupt_member(path, image.layers[0])
    # Verified once per fingerprint: the rewrite makes it check again, and refuse.
    assert error_code(registry, f"/v2/app/blobs/{image.layers[0]}") == (404, "BLOB_UNKNOWN")
    assert "does not match its digest" in registry.log()
    assert manifest_digest(registry, "app", "1.0") == image.digest


def test_corrupted_copy_falls_back_to_an_intact_one(image_dir: Path,
                                                    start_registry: StartRegistry) -> None:
    shared = b"a base layer both builds use\n" * 20
    first = write(image_dir / "app" / "1.0.oci", "first", "1.0", shared=shared)
    second = write(image_dir / "app" / "2.0.oci", "second", "2.0", shared=shared)
    assert first.layers[0] == second.layers[0]
    corrupt_member(image_dir / "app" / "1.0.oci", first.layers[0])
    registry = start_registry(image_dir, *FRESH)
    # 1.0.oci is tried first and its copy is bad; 2.0.oci holds the same digest intact.
    for method in ("HEAD", "GET"):
        status = request(registry, f"/v2/app/blobs/{first.layers[0]}", method)[0]
        assert status == 200, method
    assert blob_ok(registry, "app", first.layers[0])
