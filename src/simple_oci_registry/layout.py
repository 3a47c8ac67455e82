"""The OCI meaning of one archive: its tags, manifests, indexes and referrers.

:func:`load_layout` reads ``oci-layout`` and ``index.json``, then every manifest and index they
reach (nested indexes included), each read whole, size-capped and verified against its digest
before it is kept. Each layer's first bytes are compared with the compression its media type
declares, so an image whose layers a client could not unpack is refused here rather than after
the client has downloaded it. Problems are collected rather than raised when they concern one
entry, so a broken entry costs only itself: the rest of the archive stays servable, and the
entry's tags and digest remember why they are not (:meth:`ImageLayout.rejection`).

An archive without ``index.json`` but with a ``manifest.json`` is a legacy ``docker save``
archive, read by :mod:`dockerarchive` into the same :class:`ImageLayout`: which is why a layout
maps each blob digest to the member holding it instead of assuming ``blobs/<alg>/<encoded>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from simple_oci_registry import mediatypes
from simple_oci_registry.archive import (
    Archive,
    ArchiveError,
    ArchiveKind,
    MemberReader,
    StaleArchiveError,
    sniff,
)
from simple_oci_registry.errors import RegistryError
from simple_oci_registry.reference import parse_digest, tag_of_ref_name

__all__ = ["ImageLayout", "ManifestRecord", "blob_member", "declared_format", "describe_format",
           "load_layout", "oci_blobs", "tags_of"]

log = logging.getLogger(__name__)

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
    """Everything servable in one archive, indexed by digest and by tag.

    ``blobs`` maps each blob digest to the archive member holding it: ``blobs/<alg>/<encoded>``
    in an OCI layout, any name in a docker-save archive. ``verified`` holds digests whose
    members were already hashed for this archive fingerprint (no need to hash them again
    before serving). ``rejected`` says, for the tags and digests of entries that could not be
    served, why not.
    """

    archive: Archive
    manifests: Mapping[str, ManifestRecord]
    tags: Mapping[str, str]
    roots: tuple[str, ...]
    problems: tuple[str, ...]
    blobs: Mapping[str, str] = field(default_factory=dict)
    verified: frozenset[str] = frozenset()
    rejected: Mapping[str, str] = field(default_factory=dict)

    def has_blob(self, digest: str) -> bool:
        return digest in self.blobs

    def blob_size(self, digest: str) -> int:
        return self.archive.members[self.member(digest)].size

    def member(self, digest: str) -> str:
        """The archive member holding blob ``digest``."""
        name = self.blobs.get(digest)
        if name is None:
            raise ArchiveError(f"{digest} is missing from the archive")
        return name

    def open_blob(self, digest: str) -> MemberReader:
        """Open blob ``digest`` for streaming (blocking; StaleArchiveError if replaced)."""
        return self.archive.open_blob(self.member(digest), digest)

    def prepare_blob(self, digest: str) -> None:
        """Make :meth:`open_blob` fast (fills the blob cache for compressed archives)."""
        self.archive.prepare(self.member(digest), digest)

    def rejection(self, reference: str) -> str | None:
        """Why the entry a tag or digest names was not served, if it was refused."""
        return self.rejected.get(reference)

    def referrers(self, subject: str) -> list[ManifestRecord]:
        return [m for m in self.manifests.values() if m.subject == subject]


def blob_member(digest: str) -> str:
    """The member name of a blob (image-spec image-layout.md: ``blobs/<alg>/<encoded>``)."""
    algorithm, _, encoded = digest.partition(":")
    return f"blobs/{algorithm}/{encoded}"


def oci_blobs(archive: Archive) -> dict[str, str]:
    """Digest → member for every ``blobs/<alg>/<encoded>`` member of an archive."""
    found: dict[str, str] = {}
    for name in archive.members:
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "blobs":
            found[f"{parts[1]}:{parts[2]}"] = name
    return found


def tags_of(annotations: Mapping[str, str]) -> list[str]:
    """The tags an index.json entry carries (bare or full reference, containerd's name)."""
    tags: list[str] = []
    for key in (mediatypes.ANNOTATION_REF_NAME, mediatypes.ANNOTATION_CONTAINERD_NAME):
        tag = tag_of_ref_name(annotations[key]) if key in annotations else None
        if tag is not None and tag not in tags:
            tags.append(tag)
    return tags


def declared_format(media_type: str) -> ArchiveKind | None:
    """The compression a layer media type declares, or None when it declares no tar.

    image-spec media-types.md and layer.md: ``…tar`` is an uncompressed tar, ``+gzip`` and
    ``+zstd`` its compressed forms; Docker's image-manifest-v2-2.md spells gzip ``.tar.gzip``.
    Artifact types follow the same suffix convention (``…chart.content.v1.tar+gzip``).
    """
    if media_type.endswith(("+gzip", ".gzip")):
        return ArchiveKind.GZIP
    if media_type.endswith(("+zstd", ".zstd")):
        return ArchiveKind.ZSTD
    if media_type.endswith(".tar"):
        return ArchiveKind.TAR
    return None


def describe_format(kind: ArchiveKind | None) -> str:
    """What sniffed bytes are, for a message."""
    if kind is ArchiveKind.GZIP:
        return "gzip-compressed"
    if kind is ArchiveKind.ZSTD:
        return "zstd-compressed"
    if kind is ArchiveKind.TAR:
        return "an uncompressed tar"
    return "neither tar, gzip nor zstd"


def _contradicts(declared: ArchiveKind, actual: ArchiveKind | None) -> bool:
    if declared is ArchiveKind.TAR:
        # A tar without the ustar magic (V7) is still a tar: only refuse what is surely not.
        return actual in (ArchiveKind.GZIP, ArchiveKind.ZSTD)
    return actual is not declared


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
        self.failures: dict[str, str] = {}  # digest -> why it was not kept
        self._formats: dict[str, ArchiveKind | None] = {}  # layer digest -> sniffed format

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
            self._fail(digest, f"indexes nested deeper than {MAX_INDEX_DEPTH}")
            return None
        if len(self.manifests) >= MAX_MANIFESTS:
            self.failures[digest] = f"more than {MAX_MANIFESTS} manifests"
            self.problems.append(self.failures[digest])
            return None
        try:
            record = self._read(descriptor, digest, depth)
        except ArchiveError as exc:
            self._fail(digest, str(exc))
            return None
        self.manifests[digest] = record
        return record

    def _fail(self, digest: str, reason: str) -> None:
        self.failures[digest] = reason
        self.problems.append(f"{digest}: {reason}")

    def _check_layer(self, digest: str, media_type: str) -> None:
        """Refuse a layer whose bytes are not in the compression its media type declares.

        A client trusts the declared type to pick a decompressor; a lying one fails only after
        the whole download (or, for a plain tar declared gzip, unpacks garbage). One small read
        per layer: the first bytes, which compressed archives recorded during their scan.
        """
        declared = declared_format(media_type)
        if declared is None:
            return
        if digest not in self._formats:
            self._formats[digest] = sniff(self.archive.head(blob_member(digest)))
        actual = self._formats[digest]
        if _contradicts(declared, actual):
            raise ArchiveError(f"layer {digest} is declared {media_type} but its bytes are "
                               f"{describe_format(actual)}")

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
            self._check_layer(layer_digest, layer_type)
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
    if "index.json" not in archive.members and "manifest.json" in archive.members:
        # Imported here: dockerarchive builds on this module's types.
        from simple_oci_registry.dockerarchive import load_docker_layout

        return load_docker_layout(archive)
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
    rejected: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            loader.problems.append("index.json holds a non-object entry")
            continue
        try:
            record = loader.load(entry, 0)
        except StaleArchiveError:
            raise
        entry_tags = tags_of(_str_map(entry.get("annotations")))
        if record is None:
            digest = entry.get("digest")
            reason = loader.failures.get(digest) if isinstance(digest, str) else None
            for tag in entry_tags:
                rejected.setdefault(tag, f"{digest}: {reason or 'invalid descriptor'}")
            continue
        roots.append(record.digest)
        for tag in entry_tags:
            tags.setdefault(tag, record.digest)
    if not loader.manifests and loader.problems:
        raise ArchiveError("; ".join(loader.problems[:3]))
    # A digest refused through one descriptor (a wrong size) may load through another.
    rejected.update({d: r for d, r in loader.failures.items() if d not in loader.manifests})
    return ImageLayout(archive, loader.manifests, tags, tuple(roots), tuple(loader.problems),
                       blobs=oci_blobs(archive),
                       rejected={k: v for k, v in rejected.items() if k not in tags})
