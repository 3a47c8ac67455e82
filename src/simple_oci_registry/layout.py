"""The OCI meaning of one archive: its tags, manifests, indexes and referrers.

:func:`load_layout` reads ``oci-layout`` and ``index.json``, then every manifest and index they
reach (nested indexes included), each read whole, size-capped and verified against its digest
before it is kept. Problems are collected rather than raised when they concern one entry, so a
broken entry costs only itself: the rest of the archive stays servable.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from simple_oci_registry import mediatypes
from simple_oci_registry.archive import Archive, ArchiveError, StaleArchiveError
from simple_oci_registry.errors import RegistryError
from simple_oci_registry.reference import parse_digest, tag_of_ref_name

__all__ = ["ImageLayout", "ManifestRecord", "blob_member", "load_layout"]

log = logging.getLogger(__name__)

REF_NAME: Final = "org.opencontainers.image.ref.name"
CONTAINERD_NAME: Final = "io.containerd.image.name"
MAX_MANIFEST_BYTES: Final = 4 << 20  # distribution refuses manifests over 4 MiB
MAX_INDEX_DEPTH: Final = 8
MAX_MANIFESTS: Final = 10_000
# Layers a registry need not hold: they are fetched from their URLs (image-spec layer.md).
_FOREIGN_MARKERS: Final = ("nondistributable", "foreign")


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    """A verified manifest or index, with what the API needs to answer about it."""

    digest: str
    media_type: str
    body: bytes
    artifact_type: str | None = None
    subject: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Mapping[str, Any] | None = None
    children: tuple[str, ...] = ()
    blobs: tuple[str, ...] = ()

    @property
    def is_index(self) -> bool:
        return self.media_type in mediatypes.INDEX_TYPES

    def descriptor(self) -> dict[str, Any]:
        """An OCI descriptor for this manifest (used in referrers responses)."""
        desc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                                "size": len(self.body)}
        if self.artifact_type:
            desc["artifactType"] = self.artifact_type
        if self.annotations:
            desc["annotations"] = dict(self.annotations)
        return desc


@dataclass(frozen=True, slots=True)
class ImageLayout:
    """Everything servable in one archive, indexed by digest and by tag."""

    archive: Archive
    manifests: Mapping[str, ManifestRecord]
    tags: Mapping[str, str]
    roots: tuple[str, ...]
    problems: tuple[str, ...]

    def has_blob(self, digest: str) -> bool:
        return blob_member(digest) in self.archive.members

    def blob_size(self, digest: str) -> int:
        return self.archive.members[blob_member(digest)].size

    def referrers(self, subject: str) -> list[ManifestRecord]:
        return [m for m in self.manifests.values() if m.subject == subject]


def blob_member(digest: str) -> str:
    """The member name of a blob (image-spec image-layout.md: ``blobs/<alg>/<encoded>``)."""
    algorithm, _, encoded = digest.partition(":")
    return f"blobs/{algorithm}/{encoded}"


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ArchiveError(f"{what} is not valid JSON: {str(exc)[:120]}") from exc
    if not isinstance(value, dict):
        raise ArchiveError(f"{what} is not a JSON object")
    return value


def _str_map(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def _digest_of(descriptor: object, what: str) -> str:
    if not isinstance(descriptor, dict) or not isinstance(descriptor.get("digest"), str):
        raise ArchiveError(f"{what} has no digest")
    try:
        return str(parse_digest(descriptor["digest"]))
    except RegistryError as exc:
        raise ArchiveError(f"{what} has an invalid digest") from exc


def _guess_media_type(body: dict[str, Any]) -> str:
    if isinstance(body.get("manifests"), list):
        return mediatypes.OCI_INDEX
    return mediatypes.OCI_MANIFEST


class _Loader:
    """Walks index.json and the manifests it reaches, collecting records and problems."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.manifests: dict[str, ManifestRecord] = {}
        self.problems: list[str] = []

    def load(self, descriptor: dict[str, Any], depth: int) -> ManifestRecord | None:
        """Load one manifest or index; None (with a problem noted) when it cannot be served."""
        try:
            digest = _digest_of(descriptor, "a descriptor")
        except ArchiveError as exc:
            self.problems.append(str(exc))
            return None
        if digest in self.manifests:
            return self.manifests[digest]
        if depth > MAX_INDEX_DEPTH:
            self.problems.append(f"{digest}: indexes nested deeper than {MAX_INDEX_DEPTH}")
            return None
        if len(self.manifests) >= MAX_MANIFESTS:
            self.problems.append(f"more than {MAX_MANIFESTS} manifests")
            return None
        try:
            record = self._read(descriptor, digest, depth)
        except ArchiveError as exc:
            self.problems.append(f"{digest}: {exc}")
            return None
        self.manifests[digest] = record
        return record

    def _read(self, descriptor: dict[str, Any], digest: str, depth: int) -> ManifestRecord:
        member = blob_member(digest)
        if member not in self.archive.members:
            raise ArchiveError("blob is missing from the archive")
        body = self.archive.read_member(member, MAX_MANIFEST_BYTES)
        algorithm, _, encoded = digest.partition(":")
        if hashlib.new(algorithm, body).hexdigest() != encoded:
            raise ArchiveError("content does not match its digest")
        declared_size = descriptor.get("size")
        if isinstance(declared_size, int) and declared_size != len(body):
            raise ArchiveError(f"descriptor says {declared_size} bytes, blob has {len(body)}")
        doc = _json_object(body, "manifest")
        # umoci writes manifests without "mediaType": the pointing descriptor then decides
        # (image-spec manifest.md: mediaType SHOULD be present, descriptor's is authoritative).
        media_type = doc.get("mediaType")
        if not isinstance(media_type, str):
            desc_type = descriptor.get("mediaType")
            media_type = desc_type if isinstance(desc_type, str) else _guess_media_type(doc)
        if not mediatypes.is_manifest_like(media_type):
            raise ArchiveError(f"unsupported manifest media type {media_type!r}")
        platform = descriptor.get("platform")
        subject = doc.get("subject")
        subject_digest = _digest_of(subject, "subject") if subject is not None else None
        annotations = _str_map(doc.get("annotations"))
        artifact_type = doc.get("artifactType")
        if media_type in mediatypes.INDEX_TYPES:
            children = doc.get("manifests")
            if not isinstance(children, list):
                raise ArchiveError("index has no manifests list")
            child_digests: list[str] = []
            for child in children:
                record = self.load(child, depth + 1) if isinstance(child, dict) else None
                if record is not None:
                    child_digests.append(record.digest)
            return ManifestRecord(
                digest, media_type, body,
                artifact_type=artifact_type if isinstance(artifact_type, str) else None,
                subject=subject_digest, annotations=annotations,
                platform=platform if isinstance(platform, dict) else None,
                children=tuple(child_digests))
        config = doc.get("config")
        layers = doc.get("layers")
        if not isinstance(config, dict) or not isinstance(layers, list):
            raise ArchiveError("image manifest lacks config or layers")
        blobs = [_digest_of(config, "config")]
        for layer in layers:
            layer_digest = _digest_of(layer, "layer")
            layer_type = str(layer.get("mediaType", ""))
            if blob_member(layer_digest) not in self.archive.members:
                if any(m in layer_type for m in _FOREIGN_MARKERS) or layer.get("urls"):
                    continue  # fetched by the client from its URLs, not from us
                raise ArchiveError(f"layer {layer_digest} is missing from the archive")
            blobs.append(layer_digest)
        if blob_member(blobs[0]) not in self.archive.members:
            raise ArchiveError(f"config {blobs[0]} is missing from the archive")
        if not isinstance(artifact_type, str):
            config_type = config.get("mediaType")
            # distribution-spec referrers: artifactType falls back to config.mediaType.
            artifact_type = config_type if isinstance(config_type, str) else None
        return ManifestRecord(
            digest, media_type, body, artifact_type=artifact_type, subject=subject_digest,
            annotations=annotations,
            platform=platform if isinstance(platform, dict) else None, blobs=tuple(blobs))


def load_layout(archive: Archive) -> ImageLayout:
    """Read an archive's layout (blocking). Raises ArchiveError if nothing in it is usable."""
    if "oci-layout" in archive.members:
        marker = _json_object(archive.read_member("oci-layout", 4096), "oci-layout")
        version = marker.get("imageLayoutVersion")
        # image-spec image-layout.md: imageLayoutVersion is "1.0.0"; a new major means a format
        # we do not know how to read.
        if not isinstance(version, str) or not version.startswith("1."):
            raise ArchiveError(f"unsupported imageLayoutVersion {version!r}")
    if "index.json" not in archive.members:
        raise ArchiveError("index.json is missing: not an OCI image layout")
    index = _json_object(archive.read_member("index.json", MAX_MANIFEST_BYTES), "index.json")
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ArchiveError("index.json has no manifests list")
    loader = _Loader(archive)
    tags: dict[str, str] = {}
    roots: list[str] = []
    for entry in entries:
        if not isinstance(entry, dict):
            loader.problems.append("index.json holds a non-object entry")
            continue
        try:
            record = loader.load(entry, 0)
        except StaleArchiveError:
            raise
        if record is None:
            continue
        roots.append(record.digest)
        annotations = _str_map(entry.get("annotations"))
        for key in (REF_NAME, CONTAINERD_NAME):
            tag = tag_of_ref_name(annotations[key]) if key in annotations else None
            if tag is not None:
                tags.setdefault(tag, record.digest)
    if not loader.manifests and loader.problems:
        raise ArchiveError("; ".join(loader.problems[:3]))
    return ImageLayout(archive, loader.manifests, tags, tuple(roots), tuple(loader.problems))
