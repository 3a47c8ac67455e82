"""Legacy docker-save archives (dockerarchive.py): synthesised manifests, tags, digests,
refusals."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from simple_oci_registry import mediatypes
from simple_oci_registry.archive import Archive, ArchiveError, ArchiveLimits, open_archive
from simple_oci_registry.blobcache import BlobCache
from simple_oci_registry.dockerarchive import canonical_json
from simple_oci_registry.layout import ImageLayout, load_layout
from tests.dockersave import (
    LegacyImage,
    WrittenImage,
    docker25_archive,
    layer_tar,
    legacy_archive,
    sha256,
)

BASE = layer_tar({"etc/base": b"base\n"})
APP = layer_tar({"app/run": b"#!/bin/true\n"})
EMPTY = b"\0" * 1024  # what Docker stores for a layer without changes


def load(path: Path, cache: BlobCache | None = None,
         limits: ArchiveLimits | None = None) -> ImageLayout:
    return load_layout(open_archive(str(path), limits, cache))


def read_blob(layout: ImageLayout, digest: str) -> bytes:
    with layout.open_blob(digest) as reader:
        return reader.read(1 << 30)


def assert_serves(layout: ImageLayout, expected: WrittenImage) -> None:
    """The synthesised manifest is the expected bytes, and every blob it names is there."""
    record = layout.manifests[expected.digest]
    assert record.body == expected.manifest
    assert record.media_type == mediatypes.DOCKER_MANIFEST
    for tag in expected.tags:
        assert layout.tags[tag] == expected.digest
    for digest in (expected.config, *expected.layers):
        assert layout.has_blob(digest)
        data = read_blob(layout, digest)
        assert sha256(data) == digest
        assert layout.blob_size(digest) == len(data)
        assert digest in layout.verified


@pytest.mark.parametrize("style", ["docker", "skopeo"])
@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_legacy_archive_serves_a_docker_schema2_manifest(tmp_path: Path, style: str,
                                                         compression: str) -> None:
    image = LegacyImage([BASE, EMPTY, APP, BASE], ("example.com/team/app:1.0", "app:latest"))
    [expected] = legacy_archive(tmp_path / "a.oci", [image], style=style,  # type: ignore[arg-type]
                                compression=compression)  # type: ignore[arg-type]
    layout = load(tmp_path / "a.oci")
    assert layout.problems == ()
    assert set(layout.tags) == {"1.0", "latest"}
    assert layout.roots == (expected.digest,)
    assert_serves(layout, expected)
    manifest = json.loads(layout.manifests[expected.digest].body)
    assert manifest["config"]["mediaType"] == mediatypes.DOCKER_CONFIG
    assert {layer["mediaType"] for layer in manifest["layers"]} == {mediatypes.DOCKER_LAYER}
    assert layout.manifests[expected.digest].platform == {"architecture": "amd64", "os": "linux"}


def test_manifest_bytes_are_canonical_and_stable(tmp_path: Path) -> None:
    image = LegacyImage([BASE, APP])
    [expected] = legacy_archive(tmp_path / "a.oci", [image])
    first = load(tmp_path / "a.oci")
    # Another archive object (another worker, a restart) makes the same bytes.
    second = load(tmp_path / "a.oci")
    assert first.manifests[expected.digest].body == second.manifests[expected.digest].body
    body = first.manifests[expected.digest].body
    assert body == canonical_json(json.loads(body))
    assert canonical_json({"b": 1, "a": "é"}) == b'{"a":"\\u00e9","b":1}'


def test_gzip_compressed_layer_member_is_declared_tar_gzip(tmp_path: Path) -> None:
    zipped = gzip.compress(APP, mtime=0)
    image = LegacyImage([BASE, zipped])
    [expected] = legacy_archive(tmp_path / "a.oci", [image])
    layout = load(tmp_path / "a.oci")
    layers = json.loads(layout.manifests[expected.digest].body)["layers"]
    assert [layer["mediaType"] for layer in layers] == [
        mediatypes.DOCKER_LAYER, "application/vnd.docker.image.rootfs.diff.tar.gzip"]
    assert layers[1]["digest"] == sha256(zipped)  # the stored bytes, not the diff_id
    assert_serves(layout, expected)


def test_several_entries_and_an_untagged_one(tmp_path: Path) -> None:
    images = [LegacyImage([BASE], ("app:1.0",)),
              LegacyImage([BASE, APP], ("app:2.0", "app:latest"), architecture="arm64"),
              LegacyImage([APP], None)]
    written = legacy_archive(tmp_path / "a.oci", images)
    layout = load(tmp_path / "a.oci")
    assert layout.tags == {"1.0": written[0].digest, "2.0": written[1].digest,
                           "latest": written[1].digest}
    assert layout.roots == tuple(w.digest for w in written)
    for expected in written:
        assert_serves(layout, expected)
    assert layout.manifests[written[1].digest].platform == {"architecture": "arm64",
                                                            "os": "linux"}


def test_first_entry_wins_a_repeated_tag(tmp_path: Path) -> None:
    images = [LegacyImage([BASE], ("app:1.0",)), LegacyImage([APP], ("other/app:1.0",))]
    written = legacy_archive(tmp_path / "a.oci", images)
    assert load(tmp_path / "a.oci").tags == {"1.0": written[0].digest}


def test_docker25_archive_is_served_from_its_index(tmp_path: Path) -> None:
    expected = docker25_archive(tmp_path / "a.oci", LegacyImage([BASE, APP]),
                                "docker.io/library/app:1.0")
    layout = load(tmp_path / "a.oci")
    assert layout.tags == {"1.0": expected.digest}
    assert layout.blobs[expected.layers[0]] == "blobs/sha256/" + expected.layers[0][7:]
    assert layout.verified == frozenset()  # an OCI layout: verified when first served
    assert layout.manifests[expected.digest].body == expected.manifest


def test_without_index_json_blobs_paths_in_manifest_json_work_too(tmp_path: Path) -> None:
    # A docker 25 archive whose index.json was dropped: manifest.json names blobs/sha256/….
    expected = docker25_archive(tmp_path / "full.oci", LegacyImage([BASE, APP]), "app:1.0")
    with tarfile.open(tmp_path / "full.oci") as src, \
            tarfile.open(tmp_path / "a.oci", "w") as dst:
        for member in src.getmembers():
            if member.name not in ("index.json", "oci-layout"):
                dst.addfile(member, src.extractfile(member) if member.isreg() else None)
    layout = load(tmp_path / "a.oci")
    assert layout.tags == {"1.0": expected.digest}
    assert_serves(layout, expected)


def test_foreign_layer_from_layer_sources_is_listed_not_served(tmp_path: Path) -> None:
    foreign_diff = sha256(b"windows base")
    descriptor = {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                  "size": 1234, "digest": sha256(b"compressed windows base"),
                  "urls": ["https://example.com/base.tar.gz"]}
    image = LegacyImage([b"", APP], diff_ids=[foreign_diff, sha256(APP)],
                        extra={"LayerSources": {foreign_diff: descriptor}})
    legacy_archive(tmp_path / "a.oci", [image])
    # docker save leaves the foreign layer's file out: rewrite without the stand-in member.
    manifest_entry = json.loads(_member(tmp_path / "a.oci", "manifest.json"))[0]
    legacy_archive(tmp_path / "b.oci", [image], drop=[manifest_entry["Layers"][0]])
    layout = load(tmp_path / "b.oci")
    assert layout.problems == ()
    [record] = layout.manifests.values()
    layers = json.loads(record.body)["layers"]
    assert layers[0] == descriptor
    assert not layout.has_blob(descriptor["digest"])
    assert record.blobs[1:] == (sha256(APP),)


def _member(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tar:
        extracted = tar.extractfile(name)
        assert extracted is not None
        return extracted.read()


# --------------------------------------------------------------------------- refusals


def test_missing_layer_refuses_the_entry_with_a_reason(tmp_path: Path) -> None:
    images = [LegacyImage([BASE], ("app:good",)), LegacyImage([APP], ("app:bad",))]
    first = legacy_archive(tmp_path / "x.oci", images)
    bad_layer = json.loads(_member(tmp_path / "x.oci", "manifest.json"))[1]["Layers"][0]
    legacy_archive(tmp_path / "a.oci", images, drop=[bad_layer])
    layout = load(tmp_path / "a.oci")
    assert layout.tags == {"good": first[0].digest}
    reason = layout.rejection("bad")
    assert reason is not None and "missing from the archive" in reason and bad_layer in reason
    assert layout.rejection("good") is None
    assert len(layout.problems) == 1 and "(app:bad)" in layout.problems[0]


def test_missing_config(tmp_path: Path) -> None:
    image = LegacyImage([BASE], ("app:1.0",))
    config_name = sha256(image.config())[7:] + ".json"
    legacy_archive(tmp_path / "a.oci", [image, LegacyImage([APP], ("app:2.0",))],
                   drop=[config_name])
    layout = load(tmp_path / "a.oci")
    assert set(layout.tags) == {"2.0"}
    assert "config" in (layout.rejection("1.0") or "")


def test_zstd_layer_member_is_refused(tmp_path: Path) -> None:
    zstd = zstandard.ZstdCompressor().compress(APP)
    legacy_archive(tmp_path / "a.oci", [LegacyImage([BASE], ("app:ok",)),
                                        LegacyImage([zstd], ("app:zstd",))])
    layout = load(tmp_path / "a.oci")
    assert set(layout.tags) == {"ok"}
    assert "zstd-compressed" in (layout.rejection("zstd") or "")


def test_layer_that_is_no_tar_is_refused(tmp_path: Path) -> None:
    legacy_archive(tmp_path / "a.oci", [LegacyImage([os.urandom(2048)], ("app:1.0",))])
    with pytest.raises(ArchiveError, match="neither tar, gzip nor zstd"):
        load(tmp_path / "a.oci")


def test_layer_not_matching_its_diff_id_is_refused(tmp_path: Path) -> None:
    image = LegacyImage([BASE, APP], ("app:1.0",), diff_ids=[sha256(BASE), sha256(b"other")])
    legacy_archive(tmp_path / "a.oci", [image, LegacyImage([BASE], ("app:2.0",))])
    layout = load(tmp_path / "a.oci")
    assert set(layout.tags) == {"2.0"}
    assert "diff_id" in (layout.rejection("1.0") or "")


@pytest.mark.parametrize("body", [b"not json", b'{"Config": "x"}', b"[" * 100_000])
def test_unreadable_manifest_json_is_an_archive_error(tmp_path: Path, body: bytes) -> None:
    with tarfile.open(tmp_path / "a.oci", "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    with pytest.raises(ArchiveError, match="manifest.json"):
        load(tmp_path / "a.oci")


@pytest.mark.parametrize("entry", [
    "a string", {"Layers": []}, {"Config": 5, "Layers": []}, {"Config": "c.json"},
    {"Config": "c.json", "Layers": [7]}, {"Config": "c.json", "Layers": "x"},
])
def test_malformed_entries_are_problems(tmp_path: Path, entry: object) -> None:
    images = [LegacyImage([BASE], ("app:1.0",))]
    legacy_archive(tmp_path / "good.oci", images)
    entries = json.loads(_member(tmp_path / "good.oci", "manifest.json"))
    with tarfile.open(tmp_path / "good.oci") as src, tarfile.open(tmp_path / "a.oci", "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member) if member.isreg() else None
            if member.name == "manifest.json":
                body = json.dumps([entry, *entries]).encode()
                member.size = len(body)
                data = io.BytesIO(body)
            dst.addfile(member, data)
    layout = load(tmp_path / "a.oci")
    assert set(layout.tags) == {"1.0"}
    assert len(layout.problems) == 1


def test_empty_manifest_json_is_an_empty_layout(tmp_path: Path) -> None:
    legacy_archive(tmp_path / "a.oci", [])
    layout = load(tmp_path / "a.oci")
    assert layout.manifests == {} and layout.problems == ()


# --------------------------------------------------------------------------- digests remembered


def count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    hashed: list[str] = []
    original = Archive._hash

    def counting(self: Archive, name: str) -> str:
        hashed.append(name)
        return original(self, name)

    monkeypatch.setattr(Archive, "_hash", counting)
    return hashed


def test_digests_are_hashed_once_and_remembered_in_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed = count_hashing(monkeypatch)
    image = LegacyImage([BASE, APP, BASE], ("app:1.0",))
    [expected] = legacy_archive(tmp_path / "a.oci", [image])
    cache = BlobCache(tmp_path / "cache", 1 << 30)
    assert load(tmp_path / "a.oci", cache).tags == {"1.0": expected.digest}
    assert len(hashed) == 2  # each layer member once, the repeated one too
    # A restart (new cache and archive objects): nothing is hashed again.
    again = load(tmp_path / "a.oci", BlobCache(tmp_path / "cache", 1 << 30))
    assert again.tags == {"1.0": expected.digest} and len(hashed) == 2
    # Without a cache, every load hashes.
    load(tmp_path / "a.oci")
    assert len(hashed) == 4


def test_a_changed_archive_is_hashed_again(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    hashed = count_hashing(monkeypatch)
    cache = BlobCache(tmp_path / "cache", 1 << 30)
    legacy_archive(tmp_path / "a.oci", [LegacyImage([BASE], ("app:1.0",))])
    load(tmp_path / "a.oci", cache)
    [second] = legacy_archive(tmp_path / "a.oci", [LegacyImage([APP], ("app:1.0",))])
    assert load(tmp_path / "a.oci", cache).tags == {"1.0": second.digest}
    assert len(hashed) == 2


def test_damaged_remembered_digests_are_recomputed(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cache = BlobCache(tmp_path / "cache", 1 << 30)
    [expected] = legacy_archive(tmp_path / "a.oci", [LegacyImage([BASE], ("app:1.0",))])
    load(tmp_path / "a.oci", cache)
    [facts] = (tmp_path / "cache" / "facts").iterdir()
    document = json.loads(facts.read_text())
    document["digests"] = {k: "sha256:" + "0" * 63 for k in document["digests"]}  # not a digest
    facts.write_text(json.dumps(document))
    hashed = count_hashing(monkeypatch)
    assert load(tmp_path / "a.oci", cache).tags == {"1.0": expected.digest}
    assert len(hashed) == 1


def test_compressed_legacy_archive_caches_large_layers_in_one_pass(tmp_path: Path) -> None:
    big = layer_tar({"big.bin": os.urandom(300_000)})
    image = LegacyImage([BASE, big], ("app:1.0",))
    [expected] = legacy_archive(tmp_path / "a.oci", [image], compression="gzip")
    limits = ArchiveLimits(small_member_bytes=100_000)
    cache = BlobCache(tmp_path / "cache", 1 << 30)
    layout = load(tmp_path / "a.oci", cache, limits)
    assert cache.stats.decompressions == 1
    assert cache.contains(sha256(big), len(big))  # hashed and cached during the scan
    assert_serves(layout, expected)
    assert cache.stats.decompressions == 1  # served from the cache, not decompressed again
    # Restart: member table, digests and the layer's first bytes are all remembered.
    restarted = BlobCache(tmp_path / "cache", 1 << 30)
    again = load(tmp_path / "a.oci", restarted, limits)
    assert restarted.stats.decompressions == 0
    assert_serves(again, expected)


def test_compressed_legacy_archive_without_a_cache(tmp_path: Path) -> None:
    big = layer_tar({"big.bin": os.urandom(300_000)})
    [expected] = legacy_archive(tmp_path / "a.oci", [LegacyImage([big, big], ("app:1.0",))],
                                compression="gzip")
    layout = load(tmp_path / "a.oci", None, ArchiveLimits(small_member_bytes=100_000))
    assert_serves(layout, expected)


def test_layers_shared_by_entries_are_read_once(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    hashed = count_hashing(monkeypatch)
    images = [LegacyImage([BASE, APP], ("app:1.0",)), LegacyImage([BASE, APP, BASE], ("app:2.0",))]
    written = legacy_archive(tmp_path / "a.oci", images)  # docker style: repeats are links
    archive = open_archive(str(tmp_path / "a.oci"))
    heads: list[str] = []
    original = archive.head

    def counting(name: str) -> bytes:
        heads.append(name)
        return original(name)

    monkeypatch.setattr(archive, "head", counting)
    layout = load_layout(archive)
    assert layout.tags == {"1.0": written[0].digest, "2.0": written[1].digest}
    # Five layer references, two distinct layers (the writer links every repeat to the first
    # copy, as Docker does): each is sniffed and hashed once.
    assert len(heads) == len(set(heads)) == len(hashed) == 2
