"""Legacy ``docker save`` archives, served by synthesising the manifests they do not contain.

Docker before 25, ``skopeo copy … docker-archive:`` and ``podman save`` (its default format)
write the "combined image JSON + filesystem changeset" format (moby image/spec/v1.2.md)::

    manifest.json         [{"Config": "<hex>.json", "RepoTags": ["app:1.0"],
                            "Layers": ["<id>/layer.tar", …]}, …]
    <hex>.json            the image config (its file name is its digest)
    <id>/layer.tar        a layer, uncompressed (skopeo: "<hex>.tar", "<id>/layer.tar" a link)
    repositories, <id>/json, <id>/VERSION   v1 metadata, unused

There is no registry manifest in it, so one is made per entry: a Docker schema2 manifest
(image-manifest-v2-2.md) whose config is the config member and whose layers are the layer
members as they are stored — ``rootfs.diff.tar`` for a plain tar, ``rootfs.diff.tar.gzip`` for
a member that is gzip-compressed by content — so every blob is served straight from its tar
member. The layers' digests are found by hashing the members, once per archive fingerprint
(remembered with the blob cache, see :meth:`Archive.member_digests`). The manifest is canonical
JSON (sorted keys, no whitespace, ASCII), so its bytes and digest are the same in every worker
and after every restart: a client that pinned the digest can pull it again.

Tags come from each entry's ``RepoTags``, read like an index.json reference (the text after the
last colon of the last path segment); the repository part is ignored, as it is for index.json.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from simple_oci_registry import mediatypes
from simple_oci_registry.archive import Archive, ArchiveError, ArchiveKind, sniff
from simple_oci_registry.layout import (
    MAX_MANIFEST_BYTES,
    MAX_MANIFESTS,
    ImageLayout,
    ManifestRecord,
    describe_format,
)
from simple_oci_registry.reference import tag_of_ref_name

__all__ = ["MANIFEST_JSON", "canonical_json", "load_docker_layout"]

MANIFEST_JSON: Final = "manifest.json"
# How each layer content is declared: Docker schema2 names no zstd layer type.
_LAYER_TYPES: Final[Mapping[ArchiveKind, str]] = {
    ArchiveKind.TAR: mediatypes.DOCKER_LAYER,
    ArchiveKind.GZIP: mediatypes.DOCKER_LAYER_GZIP,
}


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII only: the same bytes for the same value, always."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True, slots=True)
class _Layer:
    """A layer of an entry: an archive member, or a foreign layer fetched from its URLs."""

    member: str | None
    media_type: str
    descriptor: Mapping[str, Any] | None = None  # foreign: as manifest.json's LayerSources say


@dataclass(frozen=True, slots=True)
class _Plan:
    """One manifest.json entry, checked as far as it can be without hashing its layers."""

    label: str
    tags: tuple[str, ...]
    config: bytes
    config_member: str
    config_doc: Mapping[str, Any]
    layers: tuple[_Layer, ...]


class _Rejected(Exception):
    """This entry cannot be served; the message says why."""


def _member_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Rejected(f"{what} is not a file name")
    while value.startswith("./"):
        value = value[2:]
    return value


def _repo_tags(value: object) -> tuple[str, ...]:
    """The tags of ``RepoTags`` (``["example.com/app:1.0", …]``, or null when untagged)."""
    if not isinstance(value, list):
        return ()
    tags: list[str] = []
    for ref in value:
        # RepoTags always carry a tag; a bare name would be read as a tag by tag_of_ref_name.
        if not isinstance(ref, str) or ":" not in ref.rsplit("/", 1)[-1]:
            continue
        tag = tag_of_ref_name(ref)
        if tag is not None and tag not in tags:
            tags.append(tag)
    return tuple(tags)


def _diff_ids(config: Mapping[str, Any]) -> list[str] | None:
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if isinstance(ids, list) and all(isinstance(d, str) for d in ids):
        return ids
    return None


def _foreign(sources: object, diff_id: str | None) -> Mapping[str, Any] | None:
    """The descriptor of a layer left out of the archive because it is fetched from URLs.

    ``docker save`` lists such (Windows base) layers in ``LayerSources``, keyed by diff_id,
    with the descriptor a registry manifest gives them (image-manifest-v2-2.md, ``urls``).
    """
    if not isinstance(sources, dict) or diff_id is None:
        return None
    desc = sources.get(diff_id)
    if (not isinstance(desc, dict) or not isinstance(desc.get("mediaType"), str)
            or not isinstance(desc.get("digest"), str) or not isinstance(desc.get("size"), int)
            or not isinstance(desc.get("urls"), list)):
        return None
    return {k: desc[k] for k in ("mediaType", "size", "digest", "urls") if k in desc}


class _Reader:
    """Turns manifest.json entries into plans, and plans into manifests."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self._formats: dict[str, ArchiveKind | None] = {}  # member -> sniffed content

    def _format(self, name: str) -> ArchiveKind | None:
        """What a layer member holds; entries share layers, so each is read once."""
        target = self.archive.aliases.get(name, name)
        if target not in self._formats:
            self._formats[target] = sniff(self.archive.head(target))
        return self._formats[target]

    def plan(self, entry: object, label: str) -> _Plan:
        if not isinstance(entry, dict):
            raise _Rejected("not a JSON object")
        config_member = _member_name(entry.get("Config"), "Config")
        layer_names = entry.get("Layers")
        if not isinstance(layer_names, list):
            raise _Rejected("Layers is not a list")
        if config_member not in self.archive.members:
            raise _Rejected(f"config {config_member} is missing from the archive")
        try:
            config = self.archive.read_member(config_member, MAX_MANIFEST_BYTES)
            config_doc = json.loads(config)
        except (ValueError, RecursionError) as exc:
            raise _Rejected(f"config {config_member} is not valid JSON") from exc
        if not isinstance(config_doc, dict):
            raise _Rejected(f"config {config_member} is not a JSON object")
        diff_ids = _diff_ids(config_doc)
        layers: list[_Layer] = []
        for position, value in enumerate(layer_names):
            name = _member_name(value, "a layer")
            if name not in self.archive.members:
                diff_id = diff_ids[position] if diff_ids and position < len(diff_ids) else None
                foreign = _foreign(entry.get("LayerSources"), diff_id)
                if foreign is None:
                    raise _Rejected(f"layer {name} is missing from the archive")
                layers.append(_Layer(None, str(foreign["mediaType"]), foreign))
                continue
            kind = self._format(name)
            media_type = _LAYER_TYPES.get(kind) if kind is not None else None
            if media_type is None:
                raise _Rejected(f"layer {name} is {describe_format(kind)}: a docker-save "
                                "layer must be a tar or a gzip-compressed tar")
            layers.append(_Layer(name, media_type))
        return _Plan(label, _repo_tags(entry.get("RepoTags")), config, config_member,
                     config_doc, tuple(layers))

    def build(self, plan: _Plan, digests: Mapping[str, str]) -> tuple[ManifestRecord,
                                                                        dict[str, str]]:
        """The synthesised manifest and the blobs (digest → member) it references."""
        config_digest = "sha256:" + hashlib.sha256(plan.config).hexdigest()
        blobs = {config_digest: plan.config_member}
        diff_ids = _diff_ids(plan.config_doc)
        # Only then are diff_ids the layers' own digests (image-spec config.md: diff_ids
        # are the digests of the *uncompressed* layers, in order).
        check_diff_ids = diff_ids is not None and len(diff_ids) == len(plan.layers)
        descriptors: list[Mapping[str, Any]] = []
        for position, layer in enumerate(plan.layers):
            if layer.member is None:
                assert layer.descriptor is not None
                descriptors.append(layer.descriptor)
                continue
            digest = digests[layer.member]
            if (check_diff_ids and diff_ids is not None
                    and layer.media_type == mediatypes.DOCKER_LAYER
                    and diff_ids[position] != digest):
                raise _Rejected(f"layer {layer.member} hashes to {digest}, but the config "
                                f"lists diff_id {diff_ids[position]} (damaged?)")
            blobs[digest] = layer.member
            descriptors.append({"mediaType": layer.media_type,
                                "size": self.archive.members[layer.member].size,
                                "digest": digest})
        manifest = {
            "schemaVersion": 2,
            "mediaType": mediatypes.DOCKER_MANIFEST,
            "config": {"mediaType": mediatypes.DOCKER_CONFIG, "size": len(plan.config),
                       "digest": config_digest},
            "layers": descriptors,
        }
        body = canonical_json(manifest)
        record = ManifestRecord(
            "sha256:" + hashlib.sha256(body).hexdigest(), mediatypes.DOCKER_MANIFEST, body,
            artifact_type=mediatypes.DOCKER_CONFIG, platform=_platform(plan.config_doc),
            blobs=tuple(dict.fromkeys(blobs)))
        return record, blobs


def _platform(config: Mapping[str, Any]) -> dict[str, str] | None:
    platform = {k: config[k] for k in ("architecture", "os", "variant")
                if isinstance(config.get(k), str) and config[k]}
    return platform if "architecture" in platform and "os" in platform else None


def _entries(archive: Archive) -> Sequence[object]:
    data = archive.read_member(MANIFEST_JSON, MAX_MANIFEST_BYTES)
    try:
        entries = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ArchiveError(f"{MANIFEST_JSON} is not valid JSON: {str(exc)[:120]}") from exc
    if not isinstance(entries, list):
        raise ArchiveError(f"{MANIFEST_JSON} is not a JSON array")
    if len(entries) > MAX_MANIFESTS:
        raise ArchiveError(f"{MANIFEST_JSON} has more than {MAX_MANIFESTS} entries")
    return entries


def load_docker_layout(archive: Archive) -> ImageLayout:
    """Read a legacy docker-save archive (blocking); hashes its layers on first use.

    Raises ArchiveError if no entry can be served; otherwise broken entries are problems, and
    their tags remember why (as for index.json entries).
    """
    reader = _Reader(archive)
    plans: list[_Plan] = []
    problems: list[str] = []
    rejected: dict[str, str] = {}

    def reject(label: str, tags: Sequence[str], reason: str) -> None:
        problems.append(f"{label}: {reason}")
        for tag in tags:
            rejected.setdefault(tag, f"{label}: {reason}")

    for position, entry in enumerate(_entries(archive)):
        refs = entry.get("RepoTags") if isinstance(entry, dict) else None
        entry_tags = _repo_tags(refs)
        names = [r for r in refs if isinstance(r, str)] if isinstance(refs, list) else []
        label = f"{MANIFEST_JSON} entry {position} ({', '.join(names[:3]) or 'untagged'})"
        try:
            plans.append(reader.plan(entry, label))
        except (_Rejected, ArchiveError) as exc:
            reject(label, entry_tags, str(exc))
    # Every layer of every servable entry at once: one lock and one remembered file.
    digests = archive.member_digests(
        [layer.member for plan in plans for layer in plan.layers if layer.member is not None])
    manifests: dict[str, ManifestRecord] = {}
    tags: dict[str, str] = {}
    blobs: dict[str, str] = {}
    for plan in plans:
        try:
            record, found = reader.build(plan, digests)
        except _Rejected as exc:
            reject(plan.label, plan.tags, str(exc))
            continue
        manifests.setdefault(record.digest, record)
        blobs.update(found)
        for tag in plan.tags:
            tags.setdefault(tag, record.digest)
    if not manifests and problems:
        raise ArchiveError("; ".join(problems[:3]))
    return ImageLayout(
        archive, manifests, tags, tuple(manifests), tuple(problems), blobs=blobs,
        # Hashed from the members themselves for this archive fingerprint (now, or remembered).
        verified=frozenset(blobs),
        rejected={t: r for t, r in rejected.items() if t not in tags})
