"""The OCI meaning of one archive (layout.py): tags, manifests, indexes, referrers, problems."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simple_oci_registry import mediatypes
from simple_oci_registry.archive import (
    Archive,
    ArchiveError,
    ArchiveLimits,
    MemberReader,
    open_archive,
)
from simple_oci_registry.fingerprint import Fingerprint
from simple_oci_registry.layout import (
    MAX_INDEX_DEPTH,
    MAX_MANIFEST_BYTES,
    ImageLayout,
    blob_member,
    load_layout,
)
from simple_oci_registry.layoutwriter import (
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    Descriptor,
    LayoutWriter,
    Platform,
)
from tests.images import small_image


def short_id(value: object) -> str:
    """Readable test ids for bodies that may be 100 kB long."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}...({len(text)})"


def load(w: LayoutWriter, tmp_path: Path, name: str = "a.oci") -> ImageLayout:
    return load_layout(open_archive(str(w.write_archive(tmp_path / name))))


class MemoryArchive(Archive):
    """An archive held in a dict: lets properties feed load_layout any member bytes quickly."""

    def __init__(self, members: Mapping[str, bytes]) -> None:
        from simple_oci_registry.archive import ArchiveKind, Member

        self.kind = ArchiveKind.TAR
        self._data = dict(members)
        super().__init__("memory", Fingerprint(0, 0, 0, 0),
                         {n: Member(n, 0, len(d)) for n, d in members.items()})

    def read_member(self, name: str, limit: int) -> bytes:
        self._member(name, limit)
        return self._data[name]

    def open_member(self, name: str) -> MemberReader:
        raise NotImplementedError

    def head(self, name: str) -> bytes:
        return self._data[self._member(name).name][:512]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def memory_layout(index: Any, *blobs: bytes, layout: bytes | None = b'{"imageLayoutVersion":'
                  b'"1.0.0"}') -> MemoryArchive:
    members = {blob_member(sha256(b)): b for b in blobs}
    members["index.json"] = index if isinstance(index, bytes) else json.dumps(index).encode()
    if layout is not None:
        members["oci-layout"] = layout
    return MemoryArchive(members)


def entry(data: bytes, media_type: str = MEDIA_TYPE_OCI_MANIFEST, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


# --------------------------------------------------------------------------- tags


def test_tags_from_bare_full_and_containerd_names(tmp_path: Path) -> None:
    w = LayoutWriter()
    a, _ = small_image(w, "a")
    b, _ = small_image(w, "b")
    c, _ = small_image(w, "c")
    d, _ = small_image(w, "d")
    w.tag(a, "1.0")
    w.tag(b, "example.com:5000/team/app:2.0")
    w.tag(c, None, containerd_name="docker.io/library/app:3.0")
    w.tag(d, "4.0", containerd_name="docker.io/library/app:4.0-full")
    w.tag(a, "registry.local/app@" + a.digest)  # digest-pinned: no tag
    w.tag(b, "example.com/app")  # a name without a tag
    layout = load(w, tmp_path)
    assert layout.tags == {"1.0": a.digest, "2.0": b.digest, "3.0": c.digest,
                           "4.0": d.digest, "4.0-full": d.digest}
    assert layout.problems == ()
    assert layout.roots == (a.digest, b.digest, c.digest, d.digest, a.digest, b.digest)


def test_first_entry_wins_for_a_repeated_tag(tmp_path: Path) -> None:
    w = LayoutWriter()
    a, _ = small_image(w, "a")
    b, _ = small_image(w, "b")
    w.tag(a, "same")
    w.tag(b, "same")
    layout = load(w, tmp_path)
    assert layout.tags == {"same": a.digest}
    assert set(layout.manifests) == {a.digest, b.digest}


def test_untagged_entries_are_still_served_by_digest(tmp_path: Path) -> None:
    w = LayoutWriter()
    a, layers = small_image(w, "a", layers=2)
    w.tag(a, None)
    layout = load(w, tmp_path)
    assert layout.tags == {}
    record = layout.manifests[a.digest]
    assert record.media_type == MEDIA_TYPE_OCI_MANIFEST
    assert record.body == w.blob_bytes(a.digest)
    config = w.blob_json(a.digest)["config"]["digest"]
    assert record.blobs == (config, *(layer.digest for layer in layers))
    assert record.platform == {"architecture": "amd64", "os": "linux"}
    assert record.artifact_type == "application/vnd.oci.image.config.v1+json"
    assert layout.has_blob(layers[0].digest)
    assert layout.blob_size(layers[0].digest) == layers[0].size
    assert not layout.has_blob("sha256:" + "0" * 64)


# --------------------------------------------------------------------------- media types


def test_umoci_manifest_without_media_type_takes_the_descriptors(tmp_path: Path) -> None:
    w = LayoutWriter()
    image, _ = small_image(w, "bare", include_media_type=False)
    assert "mediaType" not in w.blob_json(image.digest)
    w.tag(image, "v1")
    layout = load(w, tmp_path)
    assert layout.manifests[image.digest].media_type == MEDIA_TYPE_OCI_MANIFEST
    assert layout.tags == {"v1": image.digest}


def test_docker_manifest_without_media_type_keeps_the_docker_type(tmp_path: Path) -> None:
    w = LayoutWriter()
    layer = w.add_layer({"f": b"x"})
    image = w.add_image([layer], docker=True, include_media_type=False)
    w.tag(image, "d")
    layout = load(w, tmp_path)
    assert layout.manifests[image.digest].media_type == MEDIA_TYPE_DOCKER_MANIFEST


def test_media_type_guessed_when_absent_everywhere() -> None:
    config = b"{}"
    manifest = json.dumps({"schemaVersion": 2, "config": entry(config, "x/config"),
                           "layers": []}).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {"digest": sha256(manifest), "size": len(manifest)}]}).encode()
    archive = memory_layout({"manifests": [{"digest": sha256(index), "size": len(index),
                                            "annotations": {
                                                "org.opencontainers.image.ref.name": "t"}}]},
                            config, manifest, index)
    layout = load_layout(archive)
    assert layout.manifests[sha256(index)].media_type == mediatypes.OCI_INDEX
    assert layout.manifests[sha256(manifest)].media_type == mediatypes.OCI_MANIFEST
    assert layout.tags == {"t": sha256(index)}


def test_unsupported_media_type_is_a_problem() -> None:
    good_config, bad = b"{}", b'{"mediaType":"application/vnd.oci.image.config.v1+json"}'
    good = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                       "config": entry(good_config, "x/config"), "layers": []}).encode()
    archive = memory_layout({"manifests": [entry(bad), entry(good)]}, bad, good, good_config)
    layout = load_layout(archive)
    assert set(layout.manifests) == {sha256(good)}
    assert len(layout.problems) == 1 and "unsupported manifest media type" in layout.problems[0]


# --------------------------------------------------------------------------- indexes


def test_nested_index_children_are_reachable(tmp_path: Path) -> None:
    w = LayoutWriter()
    amd, amd_layers = small_image(w, "amd", architecture="amd64")
    arm, _ = small_image(w, "arm", architecture="arm64")
    inner = w.add_index([amd, arm])
    outer = w.add_index([inner], docker=False)
    w.tag(outer, "latest")
    layout = load(w, tmp_path)
    assert layout.tags == {"latest": outer.digest}
    assert set(layout.manifests) == {outer.digest, inner.digest, amd.digest, arm.digest}
    assert layout.manifests[outer.digest].children == (inner.digest,)
    assert layout.manifests[inner.digest].children == (amd.digest, arm.digest)
    assert layout.manifests[inner.digest].is_index
    assert not layout.manifests[amd.digest].is_index
    assert layout.manifests[arm.digest].platform == {"architecture": "arm64", "os": "linux"}
    assert layout.has_blob(amd_layers[0].digest)
    assert layout.roots == (outer.digest,)


def test_docker_manifest_list(tmp_path: Path) -> None:
    w = LayoutWriter()
    layer = w.add_layer({"f": b"x"})
    image = w.add_image([layer], docker=True)
    listing = w.add_index([image], docker=True)
    w.tag(listing, "1")
    layout = load(w, tmp_path)
    assert layout.manifests[listing.digest].media_type == mediatypes.DOCKER_MANIFEST_LIST
    assert layout.manifests[listing.digest].children == (image.digest,)


def test_indexes_nested_too_deep_are_cut_off(tmp_path: Path) -> None:
    w = LayoutWriter()
    image, _ = small_image(w, "deep")
    top = image
    for _ in range(MAX_INDEX_DEPTH + 2):
        top = w.add_index([top])
    w.tag(top, "deep")
    layout = load(w, tmp_path)
    assert top.digest in layout.manifests
    assert image.digest not in layout.manifests
    assert any("nested deeper" in p for p in layout.problems)


def test_index_child_missing_is_skipped_but_index_kept(tmp_path: Path) -> None:
    w = LayoutWriter()
    amd, _ = small_image(w, "amd")
    arm, _ = small_image(w, "arm", architecture="arm64")
    index = w.add_index([amd, arm])
    w.tag(index, "multi")
    w.remove_blob(arm.digest)
    layout = load(w, tmp_path)
    assert layout.manifests[index.digest].children == (amd.digest,)
    assert arm.digest not in layout.manifests
    assert any(arm.digest in p and "missing" in p for p in layout.problems)


# --------------------------------------------------------------------------- broken entries


def test_manifest_not_matching_its_digest_is_skipped(tmp_path: Path) -> None:
    w = LayoutWriter()
    good, _ = small_image(w, "good")
    bad, _ = small_image(w, "bad")
    w.tag(bad, "bad")
    w.tag(good, "good")
    path = w.write_directory(tmp_path / "dir.oci")
    (path / "blobs" / "sha256" / bad.hex).write_bytes(w.blob_bytes(good.digest))
    layout = load_layout(open_archive(str(path)))
    assert set(layout.manifests) == {good.digest}
    assert layout.tags == {"good": good.digest}
    assert layout.roots == (good.digest,)
    assert layout.problems == (f"{bad.digest}: content does not match its digest",)


def test_descriptor_size_mismatch_is_skipped() -> None:
    config = b"{}"
    manifest = json.dumps({"schemaVersion": 2, "config": entry(config, "x/c"),
                           "layers": []}).encode()
    archive = memory_layout({"manifests": [entry(manifest, size=len(manifest) + 1),
                                           entry(manifest)]}, config, manifest)
    layout = load_layout(archive)
    # The first entry is refused; the second (same digest, right size) loads.
    assert set(layout.manifests) == {sha256(manifest)}
    assert any("descriptor says" in p for p in layout.problems)


def test_missing_layer_skips_the_entry(tmp_path: Path) -> None:
    w = LayoutWriter()
    broken, broken_layers = small_image(w, "broken", layers=2)
    fine, _ = small_image(w, "fine")
    w.tag(broken, "broken")
    w.tag(fine, "fine")
    w.remove_blob(broken_layers[1].digest)
    layout = load(w, tmp_path)
    assert set(layout.manifests) == {fine.digest}
    assert layout.tags == {"fine": fine.digest}
    assert layout.problems == (
        f"{broken.digest}: layer {broken_layers[1].digest} is missing from the archive",)


def test_missing_config_skips_the_entry(tmp_path: Path) -> None:
    w = LayoutWriter()
    image, _ = small_image(w, "noconfig")
    w.tag(image, "x")
    w.remove_blob(w.blob_json(image.digest)["config"]["digest"])
    with pytest.raises(ArchiveError, match="config .* is missing"):
        load(w, tmp_path)


def test_foreign_layers_need_not_be_present(tmp_path: Path) -> None:
    w = LayoutWriter()
    foreign = Descriptor("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                         "sha256:" + "1" * 64, 10)
    with_url = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip",
                          "sha256:" + "2" * 64, 10)
    layer = w.add_layer({"f": b"x"})
    config = w.add_json({"architecture": "amd64", "os": "linux"},
                        "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                "config": config.to_json(),
                "layers": [layer.to_json(), foreign.to_json(),
                           {**with_url.to_json(), "urls": ["https://example.com/l"]}]}
    image = w.add_json(manifest, MEDIA_TYPE_OCI_MANIFEST)
    w.tag(image, "win")
    layout = load(w, tmp_path)
    assert layout.manifests[image.digest].blobs == (config.digest, layer.digest)


def test_manifest_missing_from_archive(tmp_path: Path) -> None:
    w = LayoutWriter()
    image, _ = small_image(w, "gone")
    other, _ = small_image(w, "other")
    w.tag(image, "gone")
    w.tag(other, "other")
    w.remove_blob(image.digest)
    layout = load(w, tmp_path)
    assert set(layout.manifests) == {other.digest}
    assert layout.problems == (f"{image.digest}: blob is missing from the archive",)


@pytest.mark.parametrize("body", [
    b"not json", b"\xff\xfe\x00", b"[1, 2]", b'"a string"', b"", b"{", b"[" * 100_000,
    b'{"a":' * 100_000, b'{"n": 1' + b"0" * 5000 + b"}",
    b'{"schemaVersion": 2, "config": "x", "layers": []}',
    b'{"schemaVersion": 2, "config": {}, "layers": []}',
    b'{"schemaVersion": 2, "config": {"digest": "sha256:short"}, "layers": []}',
    b'{"schemaVersion": 2, "config": {"digest": "md5:' + b"0" * 32 + b'"}, "layers": []}',
    b'{"schemaVersion": 2, "layers": {}}',
    b'{"mediaType": "application/vnd.oci.image.index.v1+json", "manifests": 3}',
    b'{"mediaType": 7, "config": [], "layers": null}',
    b'{"subject": "sha256:abc", "config": {}, "layers": []}',
], ids=short_id)
def test_bad_manifest_bodies_are_problems_not_crashes(body: bytes) -> None:
    good_config = b'{"architecture":"amd64","os":"linux"}'
    good = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                       "config": entry(good_config, "x/config"), "layers": []}).encode()
    archive = memory_layout({"manifests": [entry(body), entry(good)]}, body, good, good_config)
    layout = load_layout(archive)
    assert set(layout.manifests) == {sha256(good)}
    assert len(layout.problems) == 1
    assert layout.problems[0].startswith(sha256(body))
    # Alone in an archive, the broken entry makes the archive unusable: an ArchiveError.
    with pytest.raises(ArchiveError):
        load_layout(memory_layout({"manifests": [entry(body)]}, body))


def test_huge_manifest_is_a_problem(tmp_path: Path) -> None:
    w = LayoutWriter()
    huge = w.add_json({"schemaVersion": 2, "padding": "x" * (MAX_MANIFEST_BYTES + 1)},
                      MEDIA_TYPE_OCI_MANIFEST)
    fine, _ = small_image(w, "fine")
    w.tag(huge, "huge")
    w.tag(fine, "fine")
    layout = load(w, tmp_path)
    assert set(layout.manifests) == {fine.digest}
    assert len(layout.problems) == 1 and "limit" in layout.problems[0]


@pytest.mark.parametrize("index", [
    b"not json", b"[" * 100_000, b'{"a":' * 100_000, b"[]", b"{}", b'{"manifests": {}}',
    b'{"manifests": "x"}', b"\x00" * 10, b"x" * (MAX_MANIFEST_BYTES + 1),
], ids=short_id)
def test_bad_index_json_is_an_archive_error(index: bytes) -> None:
    with pytest.raises(ArchiveError):
        load_layout(memory_layout(index))


def test_index_json_entries_that_are_not_objects() -> None:
    config = b"{}"
    good = json.dumps({"schemaVersion": 2, "config": entry(config, "x/c"),
                       "layers": []}).encode()
    entries: list[Any] = [1, "x", None, [], {"digest": 5}]
    layout = load_layout(memory_layout({"manifests": [*entries, entry(good)]}, config, good))
    assert set(layout.manifests) == {sha256(good)}
    assert len(layout.problems) == 5
    with pytest.raises(ArchiveError, match="non-object entry"):
        load_layout(memory_layout({"manifests": entries}))


def test_empty_index_is_an_empty_layout() -> None:
    layout = load_layout(memory_layout({"schemaVersion": 2, "manifests": []}))
    assert layout.manifests == {} and layout.tags == {} and layout.problems == ()


def test_missing_index_json() -> None:
    with pytest.raises(ArchiveError, match="index.json is missing"):
        load_layout(MemoryArchive({"oci-layout": b'{"imageLayoutVersion":"1.0.0"}'}))


@pytest.mark.parametrize("marker", [
    b'{"imageLayoutVersion": "2.0.0"}', b'{"imageLayoutVersion": 1}', b"{}", b"[]",
    b"not json", b'{"imageLayoutVersion": "10.0"}', b"[" * 100_000, b" " * 5000,
], ids=short_id)
def test_unsupported_image_layout_version(marker: bytes) -> None:
    with pytest.raises(ArchiveError):
        load_layout(memory_layout({"manifests": []}, layout=marker))


@pytest.mark.parametrize("marker", [b'{"imageLayoutVersion": "1.0.0"}',
                                    b'{"imageLayoutVersion": "1.1.0"}', None])
def test_supported_or_absent_image_layout_version(marker: bytes | None) -> None:
    assert load_layout(memory_layout({"manifests": []}, layout=marker)).manifests == {}


# --------------------------------------------------------------------------- referrers


def test_referrers_via_subject(tmp_path: Path) -> None:
    w = LayoutWriter()
    image, _ = small_image(w, "subject")
    sbom = w.add_image([], artifact_type="application/spdx+json", subject=image,
                       annotations={"org.example": "sbom"})
    signature = w.add_image([], config_media_type="application/vnd.example.sig",
                            config=b"sig", subject=image)
    unrelated, _ = small_image(w, "unrelated")
    w.tag(image, "1.0")
    w.tag(sbom, None)
    w.tag(signature, None)
    w.tag(unrelated, "2.0")
    layout = load(w, tmp_path)
    found = {r.digest: r for r in layout.referrers(image.digest)}
    assert set(found) == {sbom.digest, signature.digest}
    assert found[sbom.digest].subject == image.digest
    assert found[sbom.digest].artifact_type == "application/spdx+json"
    # distribution-spec: artifactType falls back to the config's media type.
    assert found[signature.digest].artifact_type == "application/vnd.example.sig"
    assert found[sbom.digest].descriptor() == {
        "mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": sbom.digest, "size": sbom.size,
        "artifactType": "application/spdx+json", "annotations": {"org.example": "sbom"}}
    assert layout.referrers(unrelated.digest) == []


def test_index_as_referrer(tmp_path: Path) -> None:
    w = LayoutWriter()
    image, _ = small_image(w, "subject")
    child = w.add_image([], artifact_type="application/vnd.example.att")
    attestations = w.add_index([child], subject=image, artifact_type="application/vnd.ex")
    w.tag(image, "1")
    w.tag(attestations, None)
    layout = load(w, tmp_path)
    [referrer] = layout.referrers(image.digest)
    assert referrer.digest == attestations.digest
    assert referrer.media_type == MEDIA_TYPE_OCI_INDEX
    assert referrer.artifact_type == "application/vnd.ex"


def test_bad_subject_is_a_problem() -> None:
    config = b"{}"
    manifest = json.dumps({"schemaVersion": 2, "config": entry(config, "x/c"), "layers": [],
                           "subject": {"digest": "sha256:nothex"}}).encode()
    with pytest.raises(ArchiveError, match="subject has an invalid digest"):
        load_layout(memory_layout({"manifests": [entry(manifest)]}, config, manifest))


# --------------------------------------------------------------------------- properties

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.sampled_from([MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_OCI_INDEX, "sha256:" + "a" * 64]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["mediaType", "digest", "size", "manifests", "config",
                                       "layers", "subject", "annotations", "platform",
                                       "artifactType", "urls", "x"]), children, max_size=5),
    max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=_json, manifest=_json, config=_json)
def test_any_json_gives_a_layout_or_an_archive_error(index: Any, manifest: Any,
                                                     config: Any) -> None:
    config_bytes = json.dumps(config).encode()
    if isinstance(manifest, dict):
        manifest = {**manifest, "config": entry(config_bytes, "x/c")}
    manifest_bytes = json.dumps(manifest).encode()
    if isinstance(index, dict) and isinstance(index.get("manifests"), list):
        index["manifests"].append(entry(manifest_bytes))
    archive = memory_layout(index, manifest_bytes, config_bytes)
    try:
        layout = load_layout(archive)
    except ArchiveError:
        return
    assert set(layout.roots) <= set(layout.manifests)
    assert set(layout.tags.values()) <= set(layout.manifests)
    for digest, record in layout.manifests.items():
        assert sha256(record.body) == digest
        assert mediatypes.is_manifest_like(record.media_type)
        assert set(record.children) <= set(layout.manifests)
        assert all(layout.has_blob(b) for b in record.blobs)


# --------------------------------------------------------------------------- blobs by digest


def test_blobs_map_every_blob_member_to_its_digest(tmp_path: Path) -> None:
    w = LayoutWriter()
    image, layers = small_image(w, "map", layers=2)
    w.tag(image, "1.0")
    layout = load(w, tmp_path)
    assert layout.blobs == {d: blob_member(d) for d in w.digests()}
    assert layout.member(layers[1].digest) == blob_member(layers[1].digest)
    with layout.open_blob(layers[1].digest) as reader:
        assert reader.read(1 << 20) == w.blob_bytes(layers[1].digest)
    with pytest.raises(ArchiveError, match="missing"):
        layout.member("sha256:" + "0" * 64)
    assert layout.verified == frozenset()


# --------------------------------------------------------------------------- layer contents


def lying_image(w: LayoutWriter, data: bytes, media_type: str) -> Descriptor:
    layer = w.add_blob(data, media_type)
    config = w.add_json({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [layer.digest]}},
                        "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                "config": config.to_json(), "layers": [layer.to_json()]}
    return w.add_json(manifest, MEDIA_TYPE_OCI_MANIFEST)


def plain_tar() -> bytes:
    w = LayoutWriter()
    layer = w.add_layer({"f.txt": b"content\n"}, compression="none")
    return w.blob_bytes(layer.digest)


TAR = plain_tar()
GZIP = gzip.compress(TAR, mtime=0)
ZSTD = zstandard.ZstdCompressor().compress(TAR)
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


@pytest.mark.parametrize(("data", "media_type", "actual"), [
    (ZSTD, OCI_GZIP, "zstd-compressed"),
    (TAR, OCI_GZIP, "an uncompressed tar"),
    (GZIP, OCI_TAR, "gzip-compressed"),
    (ZSTD, OCI_TAR, "zstd-compressed"),
    (GZIP, OCI_ZSTD, "gzip-compressed"),
    (TAR, DOCKER_GZIP, "an uncompressed tar"),
    (b"PK\x03\x04 a zip file", OCI_GZIP, "neither tar, gzip nor zstd"),
    (b"", OCI_GZIP, "neither tar, gzip nor zstd"),
])
def test_layer_lying_about_its_compression_refuses_the_entry(
        tmp_path: Path, data: bytes, media_type: str, actual: str) -> None:
    w = LayoutWriter()
    liar = lying_image(w, data, media_type)
    good, _ = small_image(w, "honest")
    w.tag(liar, "liar")
    w.tag(good, "good")
    layout = load(w, tmp_path)
    assert layout.tags == {"good": good.digest}
    reason = layout.rejection("liar")
    assert reason is not None
    assert f"declared {media_type} but its bytes are {actual}" in reason
    assert layout.rejection(liar.digest) == reason.split(": ", 1)[1]
    assert layout.rejection("good") is None and layout.rejection("nope") is None
    assert any(actual in p for p in layout.problems)


@pytest.mark.parametrize(("data", "media_type"), [
    (TAR, OCI_TAR), (GZIP, OCI_GZIP), (ZSTD, OCI_ZSTD), (GZIP, DOCKER_GZIP),
    (TAR, "application/vnd.docker.image.rootfs.diff.tar"),
    (b"\0" * 1024, OCI_TAR),  # an empty layer: only the end-of-archive blocks
    (b"a V7 tar has no magic", OCI_TAR),  # only what surely is not a tar is refused
    (GZIP, "application/vnd.cncf.helm.chart.content.v1.tar+gzip"),
    (b"not checked", "application/vnd.wasm.content.layer.v1+wasm"),
    (b"\x50\x2a\x4d\x18\x04\0\0\0skip" + ZSTD, OCI_ZSTD),  # a zstd skippable frame first
    (GZIP, "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"),
])
def test_layers_in_their_declared_format_load(tmp_path: Path, data: bytes,
                                              media_type: str) -> None:
    w = LayoutWriter()
    image = lying_image(w, data, media_type)
    w.tag(image, "ok")
    layout = load(w, tmp_path)
    assert layout.tags == {"ok": image.digest}
    assert layout.problems == ()


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_layer_sniffed_in_every_archive_kind(tmp_path: Path, compression: str) -> None:
    big = os.urandom(64 << 10)  # a large member: compressed archives record its first bytes
    w = LayoutWriter()
    liar = lying_image(w, gzip.compress(big, mtime=0), OCI_TAR)
    w.tag(liar, "liar")
    good, _ = small_image(w, "fine")
    w.tag(good, "good")
    path = w.write_archive(tmp_path / "a.oci", compression)  # type: ignore[arg-type]
    archive = open_archive(str(path), ArchiveLimits(small_member_bytes=16 << 10))
    layout = load_layout(archive)
    assert set(layout.tags) == {"good"}
    assert "gzip-compressed" in (layout.rejection("liar") or "")
    directory = load_layout(open_archive(str(w.write_directory(tmp_path / "dir.oci"))))
    assert set(directory.tags) == {"good"}


def test_shared_layer_is_sniffed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = LayoutWriter()
    layer = w.add_layer({"shared": b"x"})
    for arch in ("amd64", "arm64", "ppc64le"):
        w.tag(w.add_image([layer], architecture=arch), arch)
    path = w.write_archive(tmp_path / "a.oci")
    archive = open_archive(str(path))
    heads: list[str] = []
    original = archive.head

    def counting(name: str) -> bytes:
        heads.append(name)
        return original(name)

    monkeypatch.setattr(archive, "head", counting)
    assert len(load_layout(archive).tags) == 3
    assert heads == [blob_member(layer.digest)]


def test_rejected_child_of_an_index_is_named_by_digest(tmp_path: Path) -> None:
    w = LayoutWriter()
    amd, _ = small_image(w, "amd")
    arm = replace(lying_image(w, ZSTD, OCI_GZIP),
                  platform=Platform("arm64", "linux"))
    index = w.add_index([amd, arm])
    w.tag(index, "multi")
    layout = load(w, tmp_path)
    assert layout.tags == {"multi": index.digest}
    assert layout.manifests[index.digest].children == (amd.digest,)
    assert "zstd-compressed" in (layout.rejection(arm.digest) or "")
    assert layout.rejection("multi") is None


def test_rejected_tag_served_by_another_entry_is_not_rejected(tmp_path: Path) -> None:
    w = LayoutWriter()
    liar = lying_image(w, TAR, OCI_GZIP)
    good, _ = small_image(w, "good")
    w.tag(liar, "1.0")
    w.tag(good, "1.0")
    layout = load(w, tmp_path)
    assert layout.tags == {"1.0": good.digest}
    assert layout.rejection("1.0") is None


def test_missing_blob_reason_is_kept_for_the_tag(tmp_path: Path) -> None:
    w = LayoutWriter()
    image, layers = small_image(w, "gone", layers=2)
    other, _ = small_image(w, "other")
    w.tag(image, "gone", containerd_name="docker.io/library/x:gone-too")
    w.tag(other, "other")
    w.remove_blob(layers[1].digest)
    layout = load(w, tmp_path)
    for tag in ("gone", "gone-too"):
        assert f"layer {layers[1].digest} is missing" in (layout.rejection(tag) or "")
