"""Hand-assembled ``docker save`` archives, in both formats, for the docker-archive tests.

Why by hand: no Docker engine runs here, and skopeo writes only one flavour of the legacy
format (``<hex>.tar`` layers, ``<id>/layer.tar`` links). Docker before 25 wrote regular
``<id>/layer.tar`` files and linked a repeated layer to its first copy; Docker 25 writes an OCI
layout (index.json with ``io.containerd.image.name`` and a bare
``org.opencontainers.image.ref.name``) plus the legacy ``manifest.json``. Everything is
deterministic (fixed mtimes, sorted entries).

The expected manifest is computed here independently of the registry (sorted-key compact JSON
of a Docker schema2 manifest), so tests compare what clients receive with what it must be.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["LegacyImage", "WrittenImage", "docker25_archive", "expected_image", "layer_tar",
           "legacy_archive", "sha256"]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: Mapping[str, bytes]) -> bytes:
    """A deterministic uncompressed layer holding ``files``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    return out.getvalue()


@dataclass(frozen=True, slots=True)
class LegacyImage:
    """One manifest.json entry: its layers as stored (plain tar, or gzip bytes) and tags."""

    layers: Sequence[bytes]
    repo_tags: Sequence[str] | None = ("example.com/app:1.0",)
    architecture: str = "amd64"
    diff_ids: Sequence[str] | None = None  # default: the layers' own digests (uncompressed)
    extra: Mapping[str, Any] = field(default_factory=dict)  # more manifest.json entry fields

    def config(self) -> bytes:
        diff_ids = list(self.diff_ids) if self.diff_ids is not None else [
            sha256(gzip.decompress(layer) if layer[:2] == b"\x1f\x8b" else layer)
            for layer in self.layers]
        return json.dumps({"architecture": self.architecture, "os": "linux",
                           "config": {"Cmd": ["/bin/true"]},
                           "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()


@dataclass(frozen=True, slots=True)
class WrittenImage:
    """What a client must receive for one entry."""

    manifest: bytes
    config: str
    layers: tuple[str, ...]
    tags: tuple[str, ...]

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


def expected_image(config: bytes, layers: Sequence[bytes],
                   repo_tags: Sequence[str] = ()) -> WrittenImage:
    """What the registry must serve for a docker-save entry with these members."""
    descriptors = [{"digest": sha256(layer), "mediaType": DOCKER_LAYER_GZIP
                    if layer[:2] == b"\x1f\x8b" else DOCKER_LAYER, "size": len(layer)}
                   for layer in layers]
    manifest = {"config": {"digest": sha256(config), "mediaType": DOCKER_CONFIG,
                           "size": len(config)},
                "layers": descriptors, "mediaType": DOCKER_MANIFEST, "schemaVersion": 2}
    tags = tuple(t.rsplit(":", 1)[1] for t in repo_tags)
    return WrittenImage(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode(),
                        sha256(config), tuple(sha256(layer) for layer in layers), tags)


def _expected(image: LegacyImage) -> WrittenImage:
    return expected_image(image.config(), image.layers, image.repo_tags or ())


class _Tar:
    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buffer, mode="w", format=tarfile.PAX_FORMAT)

    def file(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def link(self, name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = target
        self.tar.addfile(info)

    def directory(self, name: str) -> None:
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        self.tar.addfile(info)

    def close(self) -> bytes:
        self.tar.close()
        return self.buffer.getvalue()


def legacy_archive(path: Path, images: Sequence[LegacyImage], *,
                   style: Literal["docker", "skopeo"] = "docker",
                   compression: Literal["none", "gzip"] = "none",
                   drop: Sequence[str] = ()) -> list[WrittenImage]:
    """Write a legacy docker-save archive at ``path``; returns what each entry must serve.

    ``docker``: each layer in ``<id>/layer.tar`` (a repeated layer is a symlink to its first
    copy, as moby's tarexport writes it); ``skopeo``: layers as ``<hex>.tar`` with
    ``<id>/layer.tar`` symlinks to them. ``drop`` leaves members out (broken archives).
    """
    out = _Tar()
    entries: list[dict[str, Any]] = []
    written: dict[str, str] = {}  # layer digest -> member holding it
    repositories: dict[str, dict[str, str]] = {}
    for number, image in enumerate(images):
        config = image.config()
        config_name = sha256(config).split(":")[1] + ".json"
        layer_names: list[str] = []
        for position, layer in enumerate(image.layers):
            digest = sha256(layer)
            layer_id = hashlib.sha256(f"{number}/{position}/{digest}".encode()).hexdigest()
            legacy = f"{layer_id}/layer.tar"
            out.directory(layer_id)
            if style == "skopeo":
                blob = digest.split(":")[1] + ".tar"
                if digest not in written and blob not in drop:
                    out.file(blob, layer)
                written.setdefault(digest, blob)
                out.link(legacy, "../" + blob)
                layer_names.append(blob)
            else:
                if legacy not in drop:
                    if digest in written:
                        out.link(legacy, "../" + written[digest])
                    else:
                        out.file(legacy, layer)
                        written[digest] = legacy
                layer_names.append(legacy)
            out.file(f"{layer_id}/VERSION", b"1.0")
            out.file(f"{layer_id}/json", json.dumps({"id": layer_id}).encode())
        if config_name not in drop:
            out.file(config_name, config)
        entries.append({"Config": config_name, "RepoTags": list(image.repo_tags)
                        if image.repo_tags is not None else None, "Layers": layer_names,
                        **image.extra})
        for ref in image.repo_tags or ():
            repo, _, tag = ref.rpartition(":")
            repositories.setdefault(repo, {})[tag] = layer_names[-1].split("/")[0]
    out.file("manifest.json", json.dumps(entries).encode())
    out.file("repositories", json.dumps(repositories).encode())
    data = out.close()
    if compression == "gzip":
        data = gzip.compress(data, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return [_expected(image) for image in images]


def docker25_archive(path: Path, image: LegacyImage, full_name: str) -> WrittenImage:
    """A Docker ≥ 25 ``docker save``: an OCI layout (blobs/sha256, index.json, oci-layout)
    whose index.json entry names the image twice, plus the legacy manifest.json."""
    expected = _expected(image)
    out = _Tar()
    out.directory("blobs")
    out.directory("blobs/sha256")
    config = image.config()
    blobs = {sha256(config): config, expected.digest: expected.manifest}
    blobs.update({sha256(layer): layer for layer in image.layers})
    for digest in sorted(blobs):
        out.file("blobs/sha256/" + digest.split(":")[1], blobs[digest])
    tag = full_name.rsplit(":", 1)[1]
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": DOCKER_MANIFEST, "digest": expected.digest,
                            "size": len(expected.manifest),
                            "annotations": {"io.containerd.image.name": full_name,
                                            "org.opencontainers.image.ref.name": tag}}]}
    out.file("index.json", json.dumps(index).encode())
    manifest_json = [{"Config": "blobs/sha256/" + sha256(config).split(":")[1],
                      "RepoTags": [full_name],
                      "Layers": ["blobs/sha256/" + d.split(":")[1] for d in expected.layers]}]
    out.file("manifest.json", json.dumps(manifest_json).encode())
    out.file("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    out.file("repositories", json.dumps({full_name.rsplit(":", 1)[0]: {tag: "x"}}).encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.close())
    return WrittenImage(expected.manifest, expected.config, expected.layers, (tag,))
