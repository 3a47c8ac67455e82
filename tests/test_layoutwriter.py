"""Tests for the OCI image-layout writer.

The writer produces every fixture the registry is tested against, so a bug here would hide bugs
there: these tests check its output against the image-spec independently (hashlib, tarfile,
gzip, zstandard) and, when installed, against real consumers (skopeo, umoci).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from simple_oci_registry.layoutwriter import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    MEDIA_TYPE_DOCKER_CONFIG,
    MEDIA_TYPE_DOCKER_LAYER_GZIP,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_EMPTY,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_LAYER,
    MEDIA_TYPE_OCI_LAYER_GZIP,
    MEDIA_TYPE_OCI_LAYER_ZSTD,
    MEDIA_TYPE_OCI_MANIFEST,
    BlobChangedError,
    Compression,
    Descriptor,
    LayerFile,
    LayoutWriter,
    Platform,
    digest_file,
    random_chunks,
    sha256_digest,
)

REPO = Path(__file__).resolve().parent.parent
SKOPEO = shutil.which("skopeo")
UMOCI = shutil.which("umoci")
needs_skopeo = pytest.mark.skipif(
    SKOPEO is None, reason="skopeo not installed (apt-get install skopeo)"
)
needs_umoci = pytest.mark.skipif(
    UMOCI is None, reason="umoci not installed (apt-get install umoci)"
)


def sample_writer() -> tuple[LayoutWriter, Descriptor]:
    """A small single-image layout tagged "1.0"."""
    writer = LayoutWriter()
    layer = writer.add_layer(
        {
            "/hello.txt": b"hello\n",
            "bin/tool": LayerFile.executable(b"#!/bin/sh\necho hi\n"),
            "bin/alias": LayerFile.link("tool"),
        }
    )
    image = writer.add_image([layer], config={"config": {"Cmd": ["/bin/tool"]}})
    writer.tag(image, "1.0")
    return writer, image


def read_tar(data: bytes) -> dict[str, bytes]:
    """Regular-file members of a tar (as bytes) by name."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar.getmembers():
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                out[member.name] = extracted.read()
    return out


def decompress_layer(data: bytes, media_type: str) -> bytes:
    if media_type.endswith("+gzip") or media_type.endswith(".tar.gzip"):
        return gzip.decompress(data)
    if media_type.endswith("+zstd"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def blob_json(root: Path, digest: str) -> Any:
    return json.loads((root / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes())


# ---- digests and layout files -----------------------------------------------------------------


def test_descriptor_digest_and_size_match_content() -> None:
    writer = LayoutWriter()
    data = b"some blob bytes"
    descriptor = writer.add_blob(data, "application/octet-stream")
    assert descriptor.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert descriptor.size == len(data)
    assert writer.blob_bytes(descriptor.digest) == data
    assert descriptor.to_json() == {
        "mediaType": "application/octet-stream",
        "digest": descriptor.digest,
        "size": len(data),
    }


def test_every_written_blob_hashes_to_its_file_name(tmp_path: Path) -> None:
    writer, _ = sample_writer()
    root = writer.write_directory(tmp_path / "layout")
    blobs = sorted((root / "blobs" / "sha256").iterdir())
    assert [f"sha256:{p.name}" for p in blobs] == writer.digests()
    for blob in blobs:
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def test_layout_marker_and_index_are_valid(tmp_path: Path) -> None:
    writer, image = sample_writer()
    root = writer.write_directory(tmp_path / "layout")
    assert json.loads((root / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((root / "index.json").read_bytes())
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == MEDIA_TYPE_OCI_INDEX
    [entry] = index["manifests"]
    assert entry["digest"] == image.digest
    assert entry["size"] == image.size
    assert entry["mediaType"] == MEDIA_TYPE_OCI_MANIFEST
    assert entry["annotations"] == {ANNOTATION_REF_NAME: "1.0"}
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}


def test_index_media_type_can_be_omitted() -> None:
    writer = LayoutWriter(index_media_type=False)
    assert "mediaType" not in writer.index_json()


def test_image_manifest_and_config_follow_the_spec() -> None:
    writer, image = sample_writer()
    manifest = writer.blob_json(image.digest)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == MEDIA_TYPE_OCI_MANIFEST
    assert manifest["config"]["mediaType"] == MEDIA_TYPE_OCI_CONFIG
    [layer] = manifest["layers"]
    assert layer["mediaType"] == MEDIA_TYPE_OCI_LAYER_GZIP
    config = writer.blob_json(manifest["config"]["digest"])
    assert config["architecture"] == "amd64"
    assert config["os"] == "linux"
    assert config["config"] == {"Cmd": ["/bin/tool"]}
    raw_tar = gzip.decompress(writer.blob_bytes(layer["digest"]))
    assert config["rootfs"] == {"type": "layers", "diff_ids": [sha256_digest(raw_tar)]}
    assert image.platform == Platform("amd64", "linux")


# ---- layers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("compression", "media_type"),
    [
        ("none", MEDIA_TYPE_OCI_LAYER),
        ("gzip", MEDIA_TYPE_OCI_LAYER_GZIP),
        ("zstd", MEDIA_TYPE_OCI_LAYER_ZSTD),
    ],
)
def test_layer_media_type_and_diff_id(compression: Compression, media_type: str) -> None:
    writer = LayoutWriter()
    layer = writer.add_layer({"a.txt": b"a"}, compression)
    assert layer.media_type == media_type
    raw = decompress_layer(writer.blob_bytes(layer.digest), media_type)
    assert writer.diff_id(layer) == sha256_digest(raw)
    assert read_tar(raw) == {"a.txt": b"a"}


def test_layer_tar_is_deterministic_with_modes_links_and_parents() -> None:
    writer = LayoutWriter()
    layer = writer.add_layer(
        {
            "usr/bin/tool": LayerFile.executable(b"x"),
            "usr/bin/t": LayerFile.link("tool"),
            "tmp": LayerFile.dir(0o1777),
            "etc/motd": b"hi",
        },
        "none",
    )
    with tarfile.open(fileobj=io.BytesIO(writer.blob_bytes(layer.digest))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        names = [m.name for m in tar.getmembers()]
    assert names == sorted(names)
    assert set(names) == {"etc", "etc/motd", "tmp", "usr", "usr/bin", "usr/bin/t", "usr/bin/tool"}
    assert members["usr/bin/tool"].mode == 0o755
    assert members["etc/motd"].mode == 0o644
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777
    assert members["usr"].isdir() and members["usr"].mode == 0o755
    assert members["usr/bin/t"].issym() and members["usr/bin/t"].linkname == "tool"
    for member in members.values():
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (
            0,
            0,
            0,
            "",
            "",
        )


def test_layer_rejects_escaping_and_duplicate_paths() -> None:
    writer = LayoutWriter()
    with pytest.raises(ValueError):
        writer.add_layer({"../etc/passwd": b""})
    with pytest.raises(ValueError):
        writer.add_layer({"/a": b"", "a": b""})
    with pytest.raises(ValueError):
        LayerFile(data=b"x", symlink="y")


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(
        st.lists(
            st.text("abcxyz_.-", min_size=1, max_size=8).filter(lambda s: s not in {".", ".."}),
            min_size=1,
            max_size=3,
        ).map("/".join),
        st.binary(max_size=600),
        max_size=6,
    ),
    st.sampled_from(["none", "gzip", "zstd"]),
)
def test_layer_round_trips_arbitrary_files(
    files: dict[str, bytes], compression: Compression
) -> None:
    # A path that is also a parent directory of another path is not a valid file tree.
    prefixes = {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}
    files = {k: v for k, v in files.items() if k not in prefixes}
    writer = LayoutWriter()
    layer = writer.add_layer(files, compression)
    raw = decompress_layer(writer.blob_bytes(layer.digest), layer.media_type)
    assert read_tar(raw) == files
    again = LayoutWriter().add_layer(files, compression)
    assert again == layer


# ---- archives ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_archive_is_byte_for_byte_deterministic(tmp_path: Path, compression: Compression) -> None:
    first = sample_writer()[0].write_archive(tmp_path / "a.oci", compression)
    second = sample_writer()[0].write_archive(tmp_path / "b.oci", compression)
    assert first.read_bytes() == second.read_bytes()


def test_compressed_archives_decompress_to_the_plain_tar(tmp_path: Path) -> None:
    writer, _ = sample_writer()
    plain = writer.write_archive(tmp_path / "plain.oci").read_bytes()
    gz = writer.write_archive(tmp_path / "gz.oci", "gzip").read_bytes()
    zst = writer.write_archive(tmp_path / "zst.oci", "zstd").read_bytes()
    assert gz[:2] == b"\x1f\x8b"
    assert zst[:4] == b"\x28\xb5\x2f\xfd"
    assert gzip.decompress(gz) == plain
    assert zstandard.ZstdDecompressor().decompressobj().decompress(zst) == plain
    assert len(plain) % 10240 == 0


def test_archive_members_and_order(tmp_path: Path) -> None:
    writer, _ = sample_writer()
    blob_names = [f"blobs/sha256/{d.removeprefix('sha256:')}" for d in writer.digests()]

    def names(**kwargs: Any) -> list[str]:
        path = writer.write_archive(tmp_path / "x.oci", **kwargs)
        with tarfile.open(path) as tar:
            return tar.getnames()

    assert names() == ["blobs", "blobs/sha256", *blob_names, "index.json", "oci-layout"]
    assert names(blobs_first=False, include_directories=False) == [
        "oci-layout",
        "index.json",
        *blob_names,
    ]
    assert names(member_prefix="./") == [
        ".",
        "./blobs",
        "./blobs/sha256",
        *[f"./{n}" for n in blob_names],
        "./index.json",
        "./oci-layout",
    ]
    with pytest.raises(ValueError):
        writer.write_archive(tmp_path / "x.oci", member_prefix="/abs/")


def test_archive_content_matches_directory(tmp_path: Path) -> None:
    writer, _ = sample_writer()
    root = writer.write_directory(tmp_path / "dir")
    archive = writer.write_archive(tmp_path / "a.oci")
    members = read_tar(archive.read_bytes())
    on_disk = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert members == on_disk


def test_write_is_atomic_and_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "img:1.0.oci"
    target.parent.mkdir()
    target.write_bytes(b"old")
    writer, _ = sample_writer()
    writer.write_archive(target)
    assert target.read_bytes() != b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["img:1.0.oci"]


def test_failed_write_leaves_no_temp_file_and_keeps_old_archive(tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(b"original content")
    writer = LayoutWriter()
    blob = writer.add_blob_file(source, "application/octet-stream")
    writer.tag(blob, "x")
    target = tmp_path / "out" / "a.oci"
    writer.write_archive(target)
    before = target.read_bytes()
    source.write_bytes(b"modified content")
    with pytest.raises(BlobChangedError):
        writer.write_archive(target)
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["a.oci"]


# ---- large and streamed blobs -----------------------------------------------------------------


def test_blob_file_is_streamed_into_archive(tmp_path: Path) -> None:
    source = tmp_path / "payload.bin"
    source.write_bytes(bytes(range(256)) * 20000)
    writer = LayoutWriter()
    descriptor = writer.add_blob_file(source, MEDIA_TYPE_OCI_LAYER)
    assert descriptor.digest == digest_file(source).digest
    writer.tag(writer.add_image([descriptor], config={"rootfs": {}}), None)
    members = read_tar(writer.write_archive(tmp_path / "a.oci").read_bytes())
    assert members[f"blobs/sha256/{descriptor.hex}"] == source.read_bytes()


def test_streamed_blob_and_layer_match_in_memory_equivalents(tmp_path: Path) -> None:
    size = 3 * (1 << 20) + 17
    factory = random_chunks(size, seed=7, chunk_size=1 << 20)
    data = b"".join(factory())
    assert len(data) == size and data == b"".join(factory())

    streamed = LayoutWriter()
    blob = streamed.add_blob_stream(factory, "application/octet-stream")
    assert blob.digest == sha256_digest(data) and blob.size == size
    assert streamed.blob_bytes(blob.digest) == data

    source = tmp_path / "file.bin"
    source.write_bytes(data)
    for compression in ("none", "gzip", "zstd"):
        in_memory = LayoutWriter().add_layer({"big": data}, compression)
        from_generator = LayoutWriter()
        layer = from_generator.add_layer({"big": LayerFile.streamed(factory, size)}, compression)
        from_file = LayoutWriter().add_layer({"big": LayerFile.from_path(source)}, compression)
        assert in_memory == layer == from_file
        raw = decompress_layer(from_generator.blob_bytes(layer.digest), layer.media_type)
        assert from_generator.diff_id(layer) == sha256_digest(raw)


def test_diff_id_of_foreign_compressed_layer_is_computed() -> None:
    maker = LayoutWriter()
    plain = maker.add_layer({"f": b"content"}, "none")
    raw = maker.blob_bytes(plain.digest)
    writer = LayoutWriter()
    gz = writer.add_blob(gzip.compress(raw, mtime=0), MEDIA_TYPE_OCI_LAYER_GZIP)
    zst = writer.add_blob(zstandard.ZstdCompressor().compress(raw), MEDIA_TYPE_OCI_LAYER_ZSTD)
    image = writer.add_image([gz, zst])
    config = writer.blob_json(writer.blob_json(image.digest)["config"]["digest"])
    assert config["rootfs"]["diff_ids"] == [sha256_digest(raw), sha256_digest(raw)]


# ---- manifests, indexes, tags -----------------------------------------------------------------


def test_multi_arch_index_round_trips(tmp_path: Path) -> None:
    writer = LayoutWriter()
    children = []
    for arch, variant in (("amd64", None), ("arm64", "v8")):
        layer = writer.add_layer({"arch": arch.encode()})
        children.append(writer.add_image([layer], architecture=arch, variant=variant))
    index = writer.add_index(children, annotations={"org.example": "yes"})
    writer.tag(index, "demo.local/multiarch:latest")
    root = writer.write_directory(tmp_path / "layout")

    top = json.loads((root / "index.json").read_bytes())
    [entry] = top["manifests"]
    assert entry["mediaType"] == MEDIA_TYPE_OCI_INDEX
    assert entry["annotations"] == {ANNOTATION_REF_NAME: "demo.local/multiarch:latest"}
    assert "platform" not in entry
    document = blob_json(root, entry["digest"])
    assert document["mediaType"] == MEDIA_TYPE_OCI_INDEX
    assert document["annotations"] == {"org.example": "yes"}
    platforms = [m["platform"] for m in document["manifests"]]
    assert platforms == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    for child in document["manifests"]:
        manifest = blob_json(root, child["digest"])
        config = blob_json(root, manifest["config"]["digest"])
        assert config["architecture"] == child["platform"]["architecture"]
        assert config.get("variant") == child["platform"].get("variant")
        layer_file = root / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]
        assert read_tar(gzip.decompress(layer_file.read_bytes())) == {
            "arch": config["architecture"].encode()
        }


def test_manifest_without_media_type_really_omits_it() -> None:
    writer = LayoutWriter()
    layer = writer.add_layer({"f": b"x"})
    image = writer.add_image([layer], include_media_type=False)
    raw = writer.blob_bytes(image.digest)
    assert b'mediaType":"application/vnd.oci.image.manifest' not in raw
    manifest = json.loads(raw)
    assert "mediaType" not in manifest
    assert manifest["config"]["mediaType"] == MEDIA_TYPE_OCI_CONFIG
    # The descriptor still says what it is: index.json entries need a media type.
    assert image.media_type == MEDIA_TYPE_OCI_MANIFEST


def test_docker_media_types() -> None:
    writer = LayoutWriter()
    layer = writer.add_layer({"f": b"x"}, "gzip")
    image = writer.add_image([layer], docker=True)
    assert image.media_type == MEDIA_TYPE_DOCKER_MANIFEST
    manifest = writer.blob_json(image.digest)
    assert manifest["mediaType"] == MEDIA_TYPE_DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == MEDIA_TYPE_DOCKER_CONFIG
    assert [entry["mediaType"] for entry in manifest["layers"]] == [MEDIA_TYPE_DOCKER_LAYER_GZIP]
    assert manifest["layers"][0]["digest"] == layer.digest
    manifest_list = writer.add_index([image], docker=True)
    assert manifest_list.media_type == MEDIA_TYPE_DOCKER_MANIFEST_LIST
    document = writer.blob_json(manifest_list.digest)
    assert document["mediaType"] == MEDIA_TYPE_DOCKER_MANIFEST_LIST
    assert document["manifests"][0]["mediaType"] == MEDIA_TYPE_DOCKER_MANIFEST
    assert document["manifests"][0]["platform"] == {"architecture": "amd64", "os": "linux"}
    with pytest.raises(ValueError):
        writer.add_image([layer], docker=True, artifact_type="application/x.sig")


def test_artifacts_and_referrers() -> None:
    writer, image = sample_writer()
    signature = writer.add_blob(b"sig", "application/vnd.example.signature", annotations={"k": "v"})
    referrer = writer.add_image(
        [signature],
        subject=image,
        artifact_type="application/vnd.example.sig.v1",
        annotations={"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
    )
    manifest = writer.blob_json(referrer.digest)
    assert manifest["artifactType"] == "application/vnd.example.sig.v1"
    assert manifest["config"] == {
        "mediaType": MEDIA_TYPE_OCI_EMPTY,
        "digest": sha256_digest(b"{}"),
        "size": 2,
    }
    assert manifest["subject"] == {
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "digest": image.digest,
        "size": image.size,
    }
    assert manifest["layers"][0]["annotations"] == {"k": "v"}
    assert referrer.artifact_type == "application/vnd.example.sig.v1"
    assert referrer.platform is None

    helm_config = "application/vnd.cncf.helm.config.v1+json"
    chart = writer.add_image(
        [writer.add_blob(b"chart", "application/vnd.cncf.helm.chart.content.v1.tar+gzip")],
        config={"name": "demo", "version": "0.1.0"},
        config_media_type=helm_config,
    )
    chart_manifest = writer.blob_json(chart.digest)
    assert chart_manifest["config"]["mediaType"] == helm_config
    assert writer.blob_json(chart_manifest["config"]["digest"]) == {
        "name": "demo",
        "version": "0.1.0",
    }
    assert chart.artifact_type == helm_config


def test_tags_untagged_entries_and_containerd_names() -> None:
    writer, image = sample_writer()
    writer.tag(image, "example.com/team/app:1.0", containerd_name="example.com/team/app:1.0")
    writer.tag(image, None)
    entries = writer.index_json()["manifests"]
    assert [e["digest"] for e in entries] == [image.digest] * 3
    assert entries[0]["annotations"] == {ANNOTATION_REF_NAME: "1.0"}
    assert entries[1]["annotations"] == {
        ANNOTATION_CONTAINERD_NAME: "example.com/team/app:1.0",
        ANNOTATION_REF_NAME: "example.com/team/app:1.0",
    }
    assert "annotations" not in entries[2]


def test_removed_blob_is_not_written(tmp_path: Path) -> None:
    writer, image = sample_writer()
    layer_digest = writer.blob_json(image.digest)["layers"][0]["digest"]
    writer.remove_blob(layer_digest)
    root = writer.write_directory(tmp_path / "broken")
    assert not (root / "blobs" / "sha256" / layer_digest[7:]).exists()


def test_descriptor_rejects_bad_digest_and_is_immutable() -> None:
    with pytest.raises(ValueError):
        Descriptor("x", "nodigest", 1)
    source = {"a": "b"}
    descriptor = Descriptor("x", sha256_digest(b""), 0, annotations=source)
    source["a"] = "changed"
    assert descriptor.annotations == {"a": "b"}
    assert hash(descriptor) == hash(Descriptor("x", sha256_digest(b""), 0))


# ---- real consumers ---------------------------------------------------------------------------


@needs_skopeo
@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_skopeo_accepts_written_archive(tmp_path: Path, compression: Compression) -> None:
    writer, image = sample_writer()
    archive = writer.write_archive(tmp_path / "image.oci", compression)
    assert SKOPEO is not None
    raw = subprocess.run(
        [SKOPEO, "inspect", "--raw", f"oci-archive:{archive}"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    assert sha256_digest(raw) == image.digest


@needs_skopeo
def test_skopeo_copies_multi_arch_archive(tmp_path: Path) -> None:
    writer = LayoutWriter()
    children = [
        writer.add_image([writer.add_layer({"arch": arch.encode()})], architecture=arch)
        for arch in ("amd64", "arm64")
    ]
    writer.tag(writer.add_index(children), "demo.local/multiarch:latest")
    archive = writer.write_archive(tmp_path / "multi.oci", member_prefix="./")
    assert SKOPEO is not None
    subprocess.run(
        [
            SKOPEO,
            "copy",
            "--quiet",
            "--all",
            f"oci-archive:{archive}:demo.local/multiarch:latest",
            f"dir:{tmp_path / 'copy'}",
        ],
        capture_output=True,
        check=True,
        timeout=120,
    )
    assert (tmp_path / "copy" / "manifest.json").read_bytes() == writer.blob_bytes(
        writer.entries[0].digest
    )


@needs_umoci
def test_umoci_lists_written_directory(tmp_path: Path) -> None:
    writer, image = sample_writer()
    writer.tag(image, "latest")
    root = writer.write_directory(tmp_path / "layout")
    assert UMOCI is not None
    listed = subprocess.run(
        [UMOCI, "ls", "--layout", str(root)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    assert listed == ["1.0", "latest"]


def test_make_demo_builds_every_naming_pattern(tmp_path: Path) -> None:
    output = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_demo.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    expected = [
        "busybox/1.36.oci",
        "busybox/latest.oci",
        "hello:1.0.oci",
        "multiarch.oci",
        "team/app/2.0.oci",
    ]
    for relative in expected:
        assert (tmp_path / relative).is_file(), output
        assert relative in output
    assert (tmp_path / "team/app/2.0.oci").read_bytes()[:2] == b"\x1f\x8b"
    with tarfile.open(tmp_path / "multiarch.oci") as tar:
        index_file = tar.extractfile("index.json")
        assert index_file is not None
        index = json.load(index_file)
    assert index["manifests"][0]["annotations"] == {
        ANNOTATION_REF_NAME: "demo.local/multiarch:latest"
    }
