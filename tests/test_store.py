"""The image store (store.py): resolution, blob reachability, freshness, purging, verification."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import pytest

from simple_oci_registry import mediatypes
from simple_oci_registry.archive import open_archive
from simple_oci_registry.config import Config
from simple_oci_registry.directory import RACY_SECONDS
from simple_oci_registry.errors import ErrorCode, RegistryError
from simple_oci_registry.layoutwriter import MEDIA_TYPE_OCI_INDEX, LayoutWriter
from simple_oci_registry.reference import Digest, parse_digest
from simple_oci_registry.store import BlobLocation, ImageStore
from tests.images import StandardImages, build_standard_images, small_image

MISSING = parse_digest("sha256:" + "0" * 64)


def store_for(root: Path, grace: float = 300) -> ImageStore:
    return ImageStore(Config(directory=root, grace_period=grace))


async def read_all(store: ImageStore, name: str, location: BlobLocation) -> bytes:
    location, reader = await store.open_blob(name, location)
    try:
        chunks = []
        while chunk := await asyncio.to_thread(reader.read, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        reader.close()


async def expect(code: ErrorCode, call: object) -> RegistryError:
    with pytest.raises(RegistryError) as info:
        await call  # type: ignore[misc]
    assert info.value.code is code, info.value
    return info.value


def write_image(path: Path, text: str, tag: str | None, *, compression: str = "none",
                layers: int = 1) -> tuple[LayoutWriter, str, list[str]]:
    w = LayoutWriter()
    image, descs = small_image(w, text, layers=layers)
    w.tag(image, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    w.write_archive(path, compression=compression)  # type: ignore[arg-type]
    return w, image.digest, [d.digest for d in descs]


@pytest.fixture
def images(image_dir: Path) -> StandardImages:
    return build_standard_images(image_dir)


# --------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("key", ["app:1.0", "app:2.0", "multi:latest", "zipped:1.0",
                                 "pair:one", "pair:two", "team/full:3.1", "bare:v1"])
async def test_resolution_by_tag_and_digest(images: StandardImages, key: str) -> None:
    store = store_for(images.root)
    name, _, tag = key.rpartition(":")
    record = await store.manifest(name, tag)
    assert record.digest == images.manifests[key]
    by_digest = await store.manifest(name, parse_digest(record.digest))
    assert by_digest is record
    expected_type = mediatypes.OCI_INDEX if key == "multi:latest" else mediatypes.OCI_MANIFEST
    assert record.media_type == expected_type


async def test_index_children_resolve_by_digest(images: StandardImages) -> None:
    store = store_for(images.root)
    for child in images.children["multi:latest"].values():
        assert (await store.manifest("multi", parse_digest(child))).digest == child


async def test_unknown_name_versus_unknown_manifest(images: StandardImages) -> None:
    store = store_for(images.root)
    await expect(ErrorCode.NAME_UNKNOWN, store.manifest("nothing", "1.0"))
    await expect(ErrorCode.NAME_UNKNOWN, store.blob("nothing", MISSING))
    await expect(ErrorCode.NAME_UNKNOWN, store.tags("nothing"))
    await expect(ErrorCode.MANIFEST_UNKNOWN, store.manifest("app", "3.0"))
    await expect(ErrorCode.MANIFEST_UNKNOWN, store.manifest("app", MISSING))
    # A manifest of another name is unknown here, even by digest.
    error = await expect(ErrorCode.MANIFEST_UNKNOWN,
                         store.manifest("app", parse_digest(images.manifests["pair:one"])))
    assert error.detail == {"name": "app", "reference": images.manifests["pair:one"]}


async def test_tags(images: StandardImages) -> None:
    store = store_for(images.root)
    assert await store.tags("app") == ["1.0", "2.0"]
    assert await store.tags("pair") == ["one", "two"]
    assert await store.tags("team/full") == ["3.1"]
    assert await store.tags("team") == ["3.1"]  # team/full.oci is in team's directory


async def test_untagged_archive_serves_its_file_name_as_tag(image_dir: Path) -> None:
    _, digest, _ = write_image(image_dir / "x" / "5.0.oci", "untagged", None)
    _, beside, _ = write_image(image_dir / "y:6.0.oci", "beside", None)
    _, whole, _ = write_image(image_dir / "z.oci", "whole", None)
    store = store_for(image_dir)
    assert (await store.manifest("x", "5.0")).digest == digest
    assert await store.tags("x") == ["5.0"]
    assert (await store.manifest("y", "6.0")).digest == beside
    # <name>.oci has no file-name tag: only its digest reaches the image.
    assert await store.tags("z") == []
    assert (await store.manifest("z", parse_digest(whole))).digest == whole


async def test_own_file_wins_over_other_archives(image_dir: Path) -> None:
    _, first, _ = write_image(image_dir / "app" / "a.oci", "in-a", "1.0")
    _, own, _ = write_image(image_dir / "app" / "1.0.oci", "in-own", "1.0")
    store = store_for(image_dir)
    assert (await store.manifest("app", "1.0")).digest == own
    assert first != own


async def test_referrers_and_catalog(image_dir: Path) -> None:
    w = LayoutWriter()
    image, _ = small_image(w, "subject")
    sbom = w.add_image([], artifact_type="application/spdx+json", subject=image)
    w.tag(image, "1.0")
    w.tag(sbom, None)
    w.write_archive(image_dir / "signed.oci")
    store = store_for(image_dir)
    [referrer] = await store.referrers("signed", parse_digest(image.digest))
    assert referrer.digest == sbom.digest
    assert await store.referrers("signed", MISSING) == []
    assert await store.catalog() == ["signed"]


# --------------------------------------------------------------------------- blobs


async def test_blob_lookup_is_restricted_to_the_names_archives(images: StandardImages) -> None:
    store = store_for(images.root)
    layer = parse_digest(images.layers["app:1.0"][0])
    location = await store.blob("app", layer)
    assert location.layout is not None and location.media_type == mediatypes.OCTET_STREAM
    assert not location.compressed
    # Held only by app's archives: unknown to every other name.
    for other in ("pair", "multi", "zipped", "team/full"):
        await expect(ErrorCode.BLOB_UNKNOWN, store.blob(other, layer))
    await expect(ErrorCode.BLOB_UNKNOWN, store.blob("app", MISSING))


async def test_blob_bytes_match_their_digest(images: StandardImages) -> None:
    store = store_for(images.root)
    for key, name in (("app:1.0", "app"), ("zipped:1.0", "zipped")):
        for layer in images.layers[key]:
            location = await store.blob(name, parse_digest(layer))
            assert location.compressed == (name == "zipped")
            data = await read_all(store, name, location)
            assert len(data) == location.size
            assert "sha256:" + hashlib.sha256(data).hexdigest() == layer


async def test_manifest_fetched_as_blob_keeps_its_media_type(images: StandardImages) -> None:
    store = store_for(images.root)
    digest = images.manifests["multi:latest"]
    location = await store.blob("multi", parse_digest(digest))
    assert location.media_type == MEDIA_TYPE_OCI_INDEX
    assert location.body is not None and location.size == len(location.body)
    assert location.layout is None


async def test_damaged_blob_is_refused(image_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = image_dir / "bad" / "1.0.oci"
    w, _, layers = write_image(path, "bad", "1.0")
    member = open_archive(str(path)).members["blobs/sha256/" + layers[0].partition(":")[2]]
    with open(path, "r+b") as f:  # same size, other bytes: the tar stays readable
        # The gzip trailer, not the magic: a layer that is not gzip at all is refused with its
        # manifest when indexed (layout.py sniffs each layer's first bytes).
        f.seek(member.offset + member.size - 8)
        f.write(b"\xff" * 8)
    store = store_for(image_dir)
    digest = parse_digest(layers[0])
    error = await expect(ErrorCode.BLOB_UNKNOWN, store.blob("bad", digest))
    assert error.detail["reason"] == "stored content does not match the digest"
    assert "does not match its digest" in caplog.text
    # check_blob (HEAD) and open_blob (GET) refuse the same location too.
    layout = store._current[str(image_dir / "bad" / "1.0.oci")].layout
    location = BlobLocation(str(digest), member.size, mediatypes.OCTET_STREAM, layout)
    await expect(ErrorCode.BLOB_UNKNOWN, store.check_blob(location))
    await expect(ErrorCode.BLOB_UNKNOWN, store.open_blob("bad", location))
    # The manifest itself is intact and still served.
    assert (await store.manifest("bad", "1.0")).digest


async def test_damaged_copy_does_not_hide_an_intact_one(image_dir: Path) -> None:
    damaged = image_dir / "app" / "a.oci"
    w, _, layers = write_image(damaged, "shared", "1.0")
    w.write_archive(image_dir / "app" / "b.oci")
    member = open_archive(str(damaged)).members["blobs/sha256/" + layers[0].partition(":")[2]]
    with open(damaged, "r+b") as f:
        f.seek(member.offset)
        f.write(b"\xff" * 8)
    store = store_for(image_dir)
    location = await store.blob("app", parse_digest(layers[0]))
    assert location.layout is not None
    assert location.layout.archive.path.endswith("b.oci")


async def test_open_blob_follows_a_replaced_archive(image_dir: Path) -> None:
    path = image_dir / "app" / "1.0.oci"
    w, _, layers = write_image(path, "keep", "1.0")
    store = store_for(image_dir)
    location = await store.blob("app", parse_digest(layers[0]))
    w.tag(w.add_blob(b"extra", "text/plain"), None)  # same blobs plus one: a new file
    w.write_archive(path)
    data = await read_all(store, "app", location)
    assert len(data) == location.size


# --------------------------------------------------------------------------- freshness


@pytest.mark.parametrize("grace", [0, 300])
async def test_replaced_archive_is_seen_at_once(image_dir: Path, grace: float) -> None:
    path = image_dir / "app" / "1.0.oci"
    _, old, old_layers = write_image(path, "old", "1.0")
    store = store_for(image_dir, grace)
    assert (await store.manifest("app", "1.0")).digest == old
    st = path.stat()
    _, new, _ = write_image(path, "new-and-longer", "1.0")
    assert (await store.manifest("app", "1.0")).digest == new
    # Replaced again by a copy dated in the past (cp -p, rsync -t): still noticed.
    _, newer, _ = write_image(path, "third", "1.0")
    os.utime(path, ns=(st.st_atime_ns - 10**12, st.st_mtime_ns - 10**12))
    assert (await store.manifest("app", "1.0")).digest == newer
    if grace:
        # A pull that resolved the tag before the publish finishes: the replaced archive's
        # content stays reachable by digest (its pin keeps the bytes).
        assert (await store.manifest("app", parse_digest(old))).digest == old
        location = await store.blob("app", parse_digest(old_layers[0]))
        assert hashlib.sha256(await read_all(store, "app", location)).hexdigest() == \
            old_layers[0].partition(":")[2]
    else:
        await expect(ErrorCode.MANIFEST_UNKNOWN, store.manifest("app", parse_digest(old)))
        await expect(ErrorCode.BLOB_UNKNOWN, store.blob("app", parse_digest(old_layers[0])))


async def test_grace_period_ends(image_dir: Path) -> None:
    now = [1000.0]
    path = image_dir / "app" / "1.0.oci"
    _, old, _ = write_image(path, "old", "1.0")
    store = ImageStore(Config(directory=image_dir, grace_period=60), clock=lambda: now[0])
    assert (await store.manifest("app", "1.0")).digest == old
    path.unlink()
    await expect(ErrorCode.NAME_UNKNOWN, store.manifest("app", "1.0"))  # tags: newest state
    now[0] += 59
    assert (await store.manifest("app", parse_digest(old))).digest == old
    now[0] += 2
    await expect(ErrorCode.NAME_UNKNOWN, store.manifest("app", parse_digest(old)))
    assert store.snapshot()["retired"] == 0


async def test_every_request_sees_the_current_directory(image_dir: Path) -> None:
    path = image_dir / "app" / "1.0.oci"
    _, old, _ = write_image(path, "old", "1.0")
    store = store_for(image_dir)
    assert (await store.manifest("app", "1.0")).digest == old
    shutil.move(path, image_dir / "elsewhere.oci")
    _, new, _ = write_image(image_dir / "app" / "2.0.oci", "new", "2.0")
    # No window: the very next request sees the change (the directory's stat changed).
    assert (await store.manifest("app", "2.0")).digest == new
    await expect(ErrorCode.MANIFEST_UNKNOWN, store.manifest("app", "1.0"))


async def test_warm_requests_reuse_listings(image_dir: Path) -> None:
    for i in range(50):
        write_image(image_dir / f"flat:{i}.oci", f"v{i}", None)
    store = store_for(image_dir)
    time.sleep(RACY_SECONDS + 0.1)  # a listing read right after a change is read again
    assert (await store.manifest("flat", "7")).digest
    read = store.directory.listings_read
    for _ in range(20):
        assert (await store.manifest("flat", "7")).digest
        await expect(ErrorCode.NAME_UNKNOWN, store.manifest("unknown-name", "1"))
    # Unchanged directories are stat'ed, never listed again, whatever their size.
    assert store.directory.listings_read == read
    write_image(image_dir / "flat:new.oci", "new", None)
    assert (await store.manifest("flat", "new")).digest
    assert store.directory.listings_read > read


async def test_deleted_archive_is_purged(images: StandardImages) -> None:
    store = store_for(images.root, grace=0)
    await store.manifest("app", "1.0")
    await store.manifest("app", "2.0")
    assert store.snapshot()["archives"] == 2
    (images.root / "app" / "2.0.oci").unlink()
    await expect(ErrorCode.MANIFEST_UNKNOWN, store.manifest("app", "2.0"))
    assert store.snapshot()["archives"] == 1
    (images.root / "app" / "1.0.oci").unlink()
    await expect(ErrorCode.NAME_UNKNOWN, store.manifest("app", "1.0"))
    await expect(ErrorCode.NAME_UNKNOWN,
                 store.blob("app", parse_digest(images.layers["app:1.0"][0])))


async def test_rescan_retires_vanished_archives(images: StandardImages) -> None:
    now = [1000.0]
    store = ImageStore(Config(directory=images.root, grace_period=60), clock=lambda: now[0])
    await store.manifest("app", "1.0")
    await store.manifest("app", "2.0")
    await store.manifest("pair", "one")
    assert store.snapshot()["archives"] == 3
    (images.root / "app" / "2.0.oci").unlink()
    (images.root / "pair.oci").unlink()
    # Nobody asked for these names since: the periodic rescan notices the deletions.
    await store.rescan()
    assert store.stats.rescans == 1
    assert (store.snapshot()["archives"], store.snapshot()["retired"]) == (1, 2)
    await expect(ErrorCode.MANIFEST_UNKNOWN, store.manifest("app", "2.0"))
    await expect(ErrorCode.NAME_UNKNOWN, store.manifest("pair", "one"))
    now[0] += 61
    await store.rescan()
    assert (store.snapshot()["archives"], store.snapshot()["retired"]) == (1, 0)


async def test_broken_archive_is_logged_once(images: StandardImages,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="simple_oci_registry")
    broken = images.root / "broken" / "1.0.oci"
    broken.parent.mkdir()
    broken.write_bytes(b"this is not an archive" * 100)
    store = store_for(images.root)
    for _ in range(3):
        error = await expect(ErrorCode.MANIFEST_UNKNOWN, store.manifest("broken", "1.0"))
        assert error.detail["unservable"] == [
            "broken/1.0.oci: not a tar, gzip or zstd archive, nor an OCI layout directory"]
        assert (await store.manifest("app", "1.0")).digest == images.manifests["app:1.0"]
    assert await store.tags("broken") == []
    messages = [r.getMessage() for r in caplog.records if "cannot serve" in r.getMessage()]
    assert messages == ["cannot serve broken/1.0.oci: not a tar, gzip or zstd archive, "
                        "nor an OCI layout directory"]
    assert store.stats.archive_errors == 1
    assert store.snapshot()["broken"] == 1
    # Repaired: served again, without a restart.
    write_image(broken, "repaired", "1.0")
    assert (await store.manifest("broken", "1.0")).digest


async def test_concurrent_requests_index_an_archive_once(images: StandardImages) -> None:
    store = store_for(images.root)
    records = await asyncio.gather(*(store.manifest("app", "1.0") for _ in range(20)))
    assert {r.digest for r in records} == {images.manifests["app:1.0"]}
    assert store.stats.archives_indexed == 1
    layers = await asyncio.gather(*(store.blob("multi", parse_digest(d))
                                    for d in images.layers["multi:latest"] * 5))
    assert len(layers) == 10
    assert store.stats.archives_indexed == 2


async def test_directory_layout_is_indexed_once(image_dir: Path) -> None:
    w = LayoutWriter()
    image, _ = small_image(w, "dir")
    w.tag(image, "1.0")
    w.write_directory(image_dir / "app" / "1.0.oci")
    store = store_for(image_dir)
    for _ in range(3):
        assert (await store.manifest("app", "1.0")).digest == image.digest
    assert store.stats.archives_indexed == 1
    # A rewritten index.json (a new tag) is noticed.
    w.tag(image, "1.1")
    w.write_directory(image_dir / "app" / "1.0.oci")
    assert (await store.manifest("app", "1.1")).digest == image.digest


async def test_names_share_an_archive(images: StandardImages) -> None:
    # team/full.oci serves "team" (pattern 2) and "team/full" (pattern 5): indexed once.
    store = store_for(images.root)
    a = await store.manifest("team", "3.1")
    b = await store.manifest("team/full", "3.1")
    assert a is b
    assert store.stats.archives_indexed == 1


async def test_digest_argument_type(images: StandardImages) -> None:
    store = store_for(images.root)
    record = await store.manifest("app", Digest("sha256", images.manifests["app:1.0"][7:]))
    assert record.digest == images.manifests["app:1.0"]


async def test_blob_located_in_an_archive_replaced_after_its_manifest(image_dir: Path) -> None:
    path = image_dir / "app" / "1.0.oci"
    w, _, layers = write_image(path, "replaced", "1.0")
    store = store_for(image_dir)
    await store.manifest("app", "1.0")  # indexed; the layer is not verified yet
    w.write_archive(path)  # the same content in a new file (atomic rename)
    location = await store.blob("app", parse_digest(layers[0]))
    data = await read_all(store, "app", location)
    assert "sha256:" + hashlib.sha256(data).hexdigest() == layers[0]


async def test_a_name_first_seen_by_digest_then_by_tag(image_dir: Path) -> None:
    # The blob request remembers the name (no folder of its own); the tag request after it
    # must still look beside the name (regression: it looked nowhere and failed).
    _, digest, layers = write_image(image_dir / "solo.oci", "solo", "latest")
    store = store_for(image_dir)
    assert (await store.blob("solo", parse_digest(layers[0]))).digest == layers[0]
    assert (await store.manifest("solo", "latest")).digest == digest


async def test_catalog_lists_what_users_mean(image_dir: Path) -> None:
    # issue 13 item 13: app/a.oci and app/b.oci are app's tags a and b, not repositories
    # "app/a" and "app/b"; team/app.oci holding tag 1.0 is the whole of team/app (pattern 5).
    write_image(image_dir / "app" / "a.oci", "a", None)
    write_image(image_dir / "app" / "b.oci", "b", None)
    write_image(image_dir / "team" / "app.oci", "team-app", "1.0")
    write_image(image_dir / "registry.k8s.io" / "pause:3.9.oci", "pause", None)
    store = store_for(image_dir)
    assert await store.catalog() == ["app", "registry.k8s.io/pause", "team", "team/app"]
    assert (await store.manifest("registry.k8s.io/pause", "3.9")).digest
