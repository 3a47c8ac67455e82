"""What an image directory serves, and whether every archive in it is sound.

The server answers one name at a time and indexes archives lazily; operators also need the whole
picture at once: which ``name:tag`` comes from which file (``ls``, the catalog page), and which
files are broken, damaged or ambiguous before a node fails to pull them (``check``).

To show exactly what the server serves, nothing here re-decides resolution: names come from
:func:`resolver.walk_names`, a name's files from :func:`resolver.list_candidates` tried in
:func:`resolver.ordered` order, archives are read with :func:`archive.open_archive` and
:func:`layout.load_layout`, and a file's tags (the implicit tag of an untagged
``<name>/<tag>.oci`` included) come from the store's own tag rule.

Everything here blocks (directory walks, reads, hashing): async callers use a worker thread.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from simple_oci_registry.archive import (
    Archive,
    ArchiveError,
    ArchiveLimits,
    StaleArchiveError,
    open_archive,
)
from simple_oci_registry.config import Config
from simple_oci_registry.errors import RegistryError
from simple_oci_registry.fingerprint import Fingerprint
from simple_oci_registry.layout import (
    MAX_MANIFEST_BYTES,
    ImageLayout,
    ManifestRecord,
    load_layout,
)
from simple_oci_registry.mirror import display_name, host_folder_names, repository_of
from simple_oci_registry.reference import InvalidReference, parse_image_reference, valid_tag
from simple_oci_registry.resolver import (
    SUFFIX,
    Candidate,
    Pattern,
    fingerprint_of,
    list_candidates,
    ordered,
    walk_names,
)

# The store's tag rule, imported rather than restated so that ls, check and the catalog page
# cannot disagree with what the server answers for name:tag.
from simple_oci_registry.store import ImageStore, _implicit_tag, _tag_in

__all__ = [
    "ArchiveSummary",
    "CheckProgress",
    "CheckReport",
    "ImageCheck",
    "ImageStatus",
    "ImageEntry",
    "Listing",
    "ManifestSummary",
    "Problem",
    "ProblemKind",
    "SummaryCache",
    "check_directory",
    "check_images",
    "human_size",
    "list_images",
    "read_references",
    "summarize",
]

# BuildKit attaches attestation manifests to an index with this platform; nothing runs them.
_UNKNOWN_PLATFORM: Final = "unknown/unknown"

TagKey = tuple[Pattern, str]  # how a candidate names its file: (pattern, stem)


class ProblemKind(enum.StrEnum):
    """What kind of trouble a problem is, so scripts can filter without parsing reasons."""

    UNREADABLE = "unreadable"  # the file or a directory cannot be opened or listed
    STRUCTURE = "structure"  # not a usable OCI layout: the server skips the whole archive
    ENTRY = "entry"  # one manifest or index the server skips; the rest is served
    DIGEST = "digest"  # a blob's bytes do not hash to its name
    DUPLICATE_TAG = "duplicate-tag"  # the same name:tag in several files
    UNSERVED = "unserved"  # an archive no repository name leads to


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in the image directory. ``files`` lists every file involved."""

    kind: ProblemKind
    file: str  # relative to the image directory
    reason: str
    files: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"kind": str(self.kind), "file": self.file, "reason": self.reason,
                "files": list(self.files or (self.file,))}


@dataclass(frozen=True, slots=True)
class ManifestSummary:
    """What a listing shows about one top-level manifest or index of an archive."""

    digest: str
    media_type: str
    platforms: tuple[str, ...]  # "os/arch[/variant]"; an index's children, in its order
    size: int  # the manifest and everything it reaches in the archive, each blob counted once


@dataclass(frozen=True, slots=True)
class ArchiveSummary:
    """One archive reduced to what listings need, so it can be cached without its bytes.

    ``tags`` is keyed by the shapes (pattern, stem) through which candidates reach the file,
    because the implicit tag of an untagged archive depends on how it is named.
    """

    path: str
    file: str
    modified_ns: int
    roots: tuple[str, ...] = ()
    manifests: Mapping[str, ManifestSummary] = field(default_factory=dict)
    tags: Mapping[TagKey, Mapping[str, str]] = field(default_factory=dict)
    problems: tuple[Problem, ...] = ()
    servable: bool = True


@dataclass(frozen=True, slots=True)
class ImageEntry:
    """One pullable ``name:tag`` (or, with ``tag`` None, an untagged ``name@digest``)."""

    name: str
    tag: str | None
    digest: str
    media_type: str
    platforms: tuple[str, ...]
    size: int
    file: str  # relative to the image directory, "/"-separated
    modified_ns: int

    @property
    def upstream(self) -> str:
        """The name as users write it in image references (``localhost:5000/app`` for the
        folder ``localhost_5000/app``); see :func:`mirror.display_name`."""
        return display_name(self.name)

    @property
    def reference(self) -> str:
        """What a client appends to the registry host to pull this entry."""
        return f"{self.name}:{self.tag}" if self.tag is not None else f"{self.name}@{self.digest}"

    @property
    def modified(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.modified_ns / 1e9, dt.UTC)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "upstream": self.upstream, "tag": self.tag,
                "digest": self.digest, "mediaType": self.media_type,
                "platforms": list(self.platforms), "size": self.size, "file": self.file,
                "modified": self.modified.isoformat(timespec="seconds").replace("+00:00", "Z")}


@dataclass(frozen=True, slots=True)
class Listing:
    """Every entry the directory serves, sorted by name, and what got in the way."""

    entries: tuple[ImageEntry, ...]
    problems: tuple[Problem, ...]
    archives: int


@dataclass(frozen=True, slots=True)
class CheckProgress:
    """Reported after each archive, for progress lines on long runs."""

    index: int
    total: int
    file: str
    problems: int


@dataclass(frozen=True, slots=True)
class CheckReport:
    """The outcome of :func:`check_directory`."""

    archives_checked: int
    blobs_hashed: int
    bytes_hashed: int
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "archives_checked": self.archives_checked,
                "blobs_hashed": self.blobs_hashed, "bytes_hashed": self.bytes_hashed,
                "problems": [p.to_json() for p in self.problems]}


def human_size(size: int) -> str:
    """``size`` in binary units, at most three digits before the point (``1.5 KiB``)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1000 or unit == "TiB":
            if unit == "B":
                return f"{size} B"
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------- summaries


def _relative(root: str, path: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _platform_text(value: object) -> str | None:
    if not isinstance(value, Mapping):
        return None
    os_name, arch, variant = value.get("os"), value.get("architecture"), value.get("variant")
    if not isinstance(os_name, str) or not isinstance(arch, str) or not os_name or not arch:
        return None
    text = f"{os_name}/{arch}"
    if isinstance(variant, str) and variant:
        text += f"/{variant}"
    return text


def _config_platform(layout: ImageLayout, record: ManifestRecord) -> str | None:
    """The platform an image's config declares (authoritative for single images)."""
    if not record.blobs:
        return None
    try:
        data = layout.archive.read_member(layout.member(record.blobs[0]), MAX_MANIFEST_BYTES)
        config = json.loads(data)
    except (ArchiveError, StaleArchiveError, OSError, ValueError, RecursionError):
        return None  # an artifact's config, or unreadable: no platform to show
    return _platform_text(config) if isinstance(config, dict) else None


def _platforms(layout: ImageLayout, record: ManifestRecord) -> list[str]:
    if not record.is_index:
        found = _config_platform(layout, record) or _platform_text(record.platform)
        return [found] if found else []
    platforms: list[str] = []
    for child_digest in record.children:
        child = layout.manifests[child_digest]
        if child.is_index:
            # load_layout bounds the nesting, so this recursion is bounded too.
            platforms += _platforms(layout, child)
            continue
        # In an index the descriptor's platform is what clients select by.
        found = _platform_text(child.platform) or _config_platform(layout, child)
        if found and found != _UNKNOWN_PLATFORM:
            platforms.append(found)
    return list(dict.fromkeys(platforms))


def _reachable_sizes(layout: ImageLayout, record: ManifestRecord, sizes: dict[str, int]) -> None:
    """Add the sizes of ``record`` and everything it reaches; a digest counts once."""
    if record.digest in sizes:
        return
    sizes[record.digest] = len(record.body)
    for child in record.children:
        _reachable_sizes(layout, layout.manifests[child], sizes)
    for blob in record.blobs:
        if blob not in sizes and layout.has_blob(blob):
            sizes[blob] = layout.blob_size(blob)


def _describe(layout: ImageLayout, record: ManifestRecord) -> ManifestSummary:
    sizes: dict[str, int] = {}
    _reachable_sizes(layout, record, sizes)
    return ManifestSummary(record.digest, record.media_type,
                           tuple(_platforms(layout, record)), sum(sizes.values()))


def summarize(layout: ImageLayout, candidates: Sequence[Candidate], *, root: str) -> ArchiveSummary:
    """Reduce a loaded layout to an :class:`ArchiveSummary` for the given candidates."""
    path = layout.archive.path
    file = _relative(root, path)
    tags: dict[TagKey, dict[str, str]] = {}
    for candidate in candidates:
        names = set(layout.tags)
        implicit = _implicit_tag(layout, candidate)
        if implicit is not None:
            names.add(implicit)
        resolved: dict[str, str] = {}
        for tag in sorted(names):
            digest = _tag_in(layout, candidate, tag)
            if digest is not None:
                resolved[tag] = digest
        tags[(candidate.pattern, candidate.stem)] = resolved
    manifests = {digest: _describe(layout, layout.manifests[digest]) for digest in layout.roots}
    problems = tuple(Problem(ProblemKind.ENTRY, file, f"skipped by the server: {problem}")
                     for problem in layout.problems)
    return ArchiveSummary(path, file, layout.archive.fingerprint.mtime_ns, layout.roots,
                          manifests, tags, problems)


@dataclass(frozen=True, slots=True)
class _Opened:
    """An archive as far as it could be read: the summary always, archive and layout if read."""

    summary: ArchiveSummary
    archive: Archive | None = None
    layout: ImageLayout | None = None


def _unservable(root: str, path: str, kind: ProblemKind, reason: str,
                archive: Archive | None = None) -> _Opened:
    file = _relative(root, path)
    try:
        modified = os.stat(path).st_mtime_ns
    except OSError:
        modified = 0
    summary = ArchiveSummary(path, file, modified, problems=(Problem(kind, file, reason),),
                             servable=False)
    return _Opened(summary, archive)


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "no such file (a dangling symlink?)"
    return exc.strerror or str(exc)


def _open(root: str, path: str, candidates: Sequence[Candidate], limits: ArchiveLimits) -> _Opened:
    """Open and load one archive the way the store does, turning failures into problems."""
    try:
        archive = open_archive(path, limits)
    except OSError as exc:
        return _unservable(root, path, ProblemKind.UNREADABLE, _os_reason(exc))
    except (ArchiveError, StaleArchiveError) as exc:
        return _unservable(root, path, ProblemKind.STRUCTURE, str(exc))
    try:
        layout = load_layout(archive)
        return _Opened(summarize(layout, candidates, root=root), archive, layout)
    except OSError as exc:
        return _unservable(root, path, ProblemKind.UNREADABLE, _os_reason(exc), archive)
    except (ArchiveError, StaleArchiveError) as exc:
        return _unservable(root, path, ProblemKind.STRUCTURE, str(exc), archive)


class SummaryCache:
    """Archive summaries by path, reused while the file's stat fingerprint is unchanged.

    Why: the catalog page is rebuilt every few seconds at most, and indexing a compressed
    archive means decompressing all of it; an unchanged file is never read twice. Summaries hold
    no archive bytes, so the cache stays small. Not thread-safe: one builder at a time.
    """

    def __init__(self, limits: ArchiveLimits | None = None) -> None:
        self._limits = limits or ArchiveLimits()
        self._entries: dict[str, tuple[Fingerprint, ArchiveSummary]] = {}

    def summary(self, root: str, candidates: Sequence[Candidate]) -> ArchiveSummary:
        """The summary of the one file ``candidates`` (all for the same path) point at."""
        first = candidates[0]
        try:
            fingerprint: Fingerprint | None = fingerprint_of(first.path)
        except OSError:
            fingerprint = None  # vanished since listed: opening it says why
        held = self._entries.get(first.path)
        if held is not None and fingerprint is not None and held[0] == fingerprint and (
                not held[1].servable
                or all((c.pattern, c.stem) in held[1].tags for c in candidates)):
            return held[1]
        summary = _open(root, first.path, candidates, self._limits).summary
        if fingerprint is not None:
            self._entries[first.path] = (fingerprint, summary)
        return summary

    def retain(self, paths: Iterable[str]) -> None:
        """Forget every file not in ``paths`` (deleted or no longer reachable)."""
        keep = set(paths)
        for path in [p for p in self._entries if p not in keep]:
            del self._entries[path]


# ---------------------------------------------------------------------------- resolution


def _candidates_by_name(root: str, allow_outside: bool) -> dict[str, tuple[Candidate, ...]]:
    names: dict[str, tuple[Candidate, ...]] = {}
    walked = walk_names(root, allow_outside=allow_outside)
    hidden = host_folder_names(walked)
    for name in walked:
        if name in hidden:
            continue
        candidates = list_candidates(root, name, allow_outside=allow_outside)
        if candidates:
            names[name] = candidates
    return names


def _by_path(names: Mapping[str, tuple[Candidate, ...]]) -> dict[str, list[Candidate]]:
    grouped: dict[str, list[Candidate]] = {}
    for candidates in names.values():
        for candidate in candidates:
            grouped.setdefault(candidate.path, []).append(candidate)
    return grouped


def _short(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm}:{encoded[:12]}"


def _entry(name: str, tag: str | None, digest: str, summary: ArchiveSummary) -> ImageEntry:
    manifest = summary.manifests[digest]
    return ImageEntry(name, tag, digest, manifest.media_type, manifest.platforms, manifest.size,
                      summary.file, summary.modified_ns)


def _tag_files(names: Mapping[str, tuple[Candidate, ...]],
               summaries: Mapping[str, ArchiveSummary]) -> set[str]:
    """Archives named ``<dir>/<tag>.oci`` that serve ``<dir>:<tag>``.

    Pattern 5 (``<name>.oci``) also makes such a file pullable as ``<dir>/<tag>``; people
    reading a listing expect ``busybox/1.36.oci`` to be ``busybox:1.36``, not a repository
    ``busybox/1.36`` besides, so listings leave those aliases out (the server still serves
    them, and ``/v2/_catalog`` still names them).
    """
    found: set[str] = set()
    for candidates in names.values():
        for c in candidates:
            if (c.pattern is Pattern.IN_DIRECTORY and summaries[c.path].servable
                    and c.stem in summaries[c.path].tags.get((c.pattern, c.stem), {})):
                found.add(c.path)
    return found


def _resolve(names: Mapping[str, tuple[Candidate, ...]],
             summaries: Mapping[str, ArchiveSummary]) -> tuple[list[ImageEntry], list[Problem]]:
    """Every name's entries as the store resolves them, and the tags several files claim."""
    entries: list[ImageEntry] = []
    conflicts: list[Problem] = []
    tag_files = _tag_files(names, summaries)
    for name in sorted(names):
        usable = [c for c in names[name] if summaries[c.path].servable
                  and not (c.pattern is Pattern.WHOLE and c.path in tag_files)]
        tag_maps = {c.path: summaries[c.path].tags.get((c.pattern, c.stem), {}) for c in usable}
        tagged: set[str] = set()
        # A file's implicit tag comes from its name: "coredns:v1.11.1.oci" in a folder would
        # give the folder a tag "coredns:v1.11.1" that no request can name (the grammar refuses
        # it before the store is asked), so it is not listed as pullable.
        for tag in sorted({t for tags in tag_maps.values() for t in tags if valid_tag(t)}):
            holders = [c for c in ordered(usable, tag) if tag in tag_maps[c.path]]
            served = summaries[holders[0].path]
            digest = tag_maps[served.path][tag]
            tagged.add(digest)
            entries.append(_entry(name, tag, digest, served))
            if len(holders) > 1:
                files = tuple(summaries[c.path].file for c in holders)
                claims = ", ".join(f"{summaries[c.path].file} ({_short(tag_maps[c.path][tag])})"
                                   for c in holders)
                conflicts.append(Problem(
                    ProblemKind.DUPLICATE_TAG, served.file,
                    f"{name}:{tag} is in {len(holders)} files: {claims}; "
                    f"the server answers from {served.file}", files))
        # Roots no tag of this name reaches are still pullable by digest.
        untagged: dict[str, ImageEntry] = {}
        for candidate in usable:
            summary = summaries[candidate.path]
            for digest in summary.roots:
                if digest not in tagged and digest not in untagged:
                    untagged[digest] = _entry(name, None, digest, summary)
        entries.extend(untagged[d] for d in sorted(untagged))
    return entries, conflicts


def list_images(root: str, *, allow_outside: bool = False,
                cache: SummaryCache | None = None) -> Listing:
    """Everything ``root`` serves (``root`` absolute and symlink-resolved, like Config.root).

    Pass a :class:`SummaryCache` kept between calls to re-read only archives that changed.
    """
    cache = cache or SummaryCache()
    names = _candidates_by_name(root, allow_outside)
    grouped = _by_path(names)
    summaries = {path: cache.summary(root, candidates) for path, candidates in grouped.items()}
    cache.retain(grouped)
    entries, conflicts = _resolve(names, summaries)
    problems = [p for path in sorted(summaries, key=lambda p: summaries[p].file)
                for p in summaries[path].problems]
    return Listing(tuple(entries), tuple(problems + conflicts), len(summaries))


# ---------------------------------------------------------------------------- check


def _find_archives(root: str, allow_outside: bool) -> tuple[list[str], list[Problem]]:
    """Every file or layout directory named like an archive, as walk_names sees them."""
    found: list[str] = []
    problems: list[Problem] = []

    def unlistable(exc: OSError) -> None:
        where = _relative(root, exc.filename) if exc.filename else "."
        problems.append(Problem(ProblemKind.UNREADABLE, where,
                                f"cannot list the directory: {_os_reason(exc)}"))

    for directory, dirnames, filenames in os.walk(root, onerror=unlistable,
                                                   followlinks=allow_outside):
        for entry in (*filenames, *dirnames):
            if entry.endswith(SUFFIX) and not entry.startswith("."):
                found.append(os.path.join(directory, entry))
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not d.endswith(SUFFIX)]
    return sorted(found, key=lambda p: _relative(root, p)), problems


def _unserved_reason(root: str, path: str, allow_outside: bool) -> str:
    real = os.path.realpath(path)
    if not allow_outside and not (real == root or real.startswith(root + os.sep)):
        return ("resolves outside the image directory, so the server refuses it "
                "(see --allow-outside-symlinks)")
    return ("no valid repository name or tag follows from its path (names are lowercase "
            "letters, digits and . _ - separated by /), so the server never serves it")


@dataclass(frozen=True, slots=True)
class _Hashed:
    blobs: int
    size: int
    problems: tuple[Problem, ...]


def _blob_members(archive: Archive, layout: ImageLayout | None) -> dict[str, str]:
    """Digest → member of every blob: the layout's map when the layout loaded (it also knows
    docker-save members such as ``<id>/layer.tar``), else the ``blobs/<alg>/<hex>`` names."""
    found = {f"{n.split('/')[1]}:{n.split('/')[2]}": n for n in archive.members
             if n.startswith("blobs/") and n.count("/") == 2}
    if layout is not None:
        found.update(layout.blobs)
    return found


def _hash_blobs(archive: Archive, blob_members: Mapping[str, str], file: str,
                already_reported: Iterable[Problem]) -> _Hashed:
    """Hash every blob member, streamed, and compare it with its digest."""
    reported = [p.reason for p in already_reported]
    blobs = hashed = 0
    problems: list[Problem] = []
    for digest, name in sorted(blob_members.items()):
        member = archive.members[name]
        algorithm, _, encoded = digest.partition(":")
        if algorithm not in hashlib.algorithms_available:
            problems.append(Problem(ProblemKind.DIGEST, file,
                                    f"blob {digest}: unsupported digest algorithm"))
            continue
        read = 0
        actual = ""
        try:
            # Small members of compressed archives come from memory, others stream.
            with archive.open_member(name) as reader:
                hashed_member = reader.hash_rest(algorithm)
            read, actual = hashed_member.size, hashed_member.hexdigest
        except StaleArchiveError as exc:
            problems.append(Problem(ProblemKind.STRUCTURE, file,
                                    f"changed while being checked: {exc}"))
            break
        except (ArchiveError, OSError, EOFError, ValueError) as exc:
            problems.append(Problem(ProblemKind.DIGEST, file, f"blob {digest}: unreadable: {exc}"))
            continue
        finally:
            blobs += 1
            hashed += read
        if read != member.size:
            problems.append(Problem(ProblemKind.DIGEST, file,
                                    f"blob {digest}: {read} of {member.size} bytes readable"))
        elif actual != encoded:
            # The loader already said so for a manifest it could not verify.
            if not any(digest in reason for reason in reported):
                problems.append(Problem(
                    ProblemKind.DIGEST, file,
                    f"blob {digest}: content hashes to {_short(f'{algorithm}:{actual}')}…, "
                    "not to its name (damaged or altered)"))
    return _Hashed(blobs, hashed, tuple(problems))


def check_directory(root: str, *, allow_outside: bool = False,
                    limits: ArchiveLimits | None = None,
                    progress: Callable[[CheckProgress], None] | None = None) -> CheckReport:
    """Validate every archive under ``root``: structure, blob digests, names and tags.

    ``progress`` is called after each archive (``index`` counts from 1 to ``total``).
    """
    limits = limits or ArchiveLimits()
    names = _candidates_by_name(root, allow_outside)
    grouped = _by_path(names)
    files, problems = _find_archives(root, allow_outside)
    files += sorted(set(grouped) - set(files))  # reached through a followed symlink
    summaries: dict[str, ArchiveSummary] = {}
    blobs = hashed = 0
    for index, path in enumerate(files, 1):
        candidates = grouped.get(path, [])
        opened = _open(root, path, candidates, limits)
        found = list(opened.summary.problems)
        if opened.archive is not None:
            result = _hash_blobs(opened.archive, _blob_members(opened.archive, opened.layout),
                                 opened.summary.file, found)
            blobs += result.blobs
            hashed += result.size
            found += result.problems
        if candidates:
            summaries[path] = opened.summary
        elif opened.summary.servable:
            found.append(Problem(ProblemKind.UNSERVED, opened.summary.file,
                                 _unserved_reason(root, path, allow_outside)))
        problems += found
        if progress is not None:
            progress(CheckProgress(index, len(files), opened.summary.file, len(found)))
    _, conflicts = _resolve(names, summaries)
    return CheckReport(len(files), blobs, hashed, tuple(problems + conflicts))


def check_archive(path: str, *, limits: ArchiveLimits | None = None) -> list[Problem]:
    """Validate one archive as :func:`check_directory` validates each (structure and every
    blob digest), wherever it lies: the producer's side of publishing."""
    path = os.path.realpath(path)
    opened = _open(os.path.dirname(path), path, [], limits or ArchiveLimits())
    problems = list(opened.summary.problems)
    if opened.archive is not None:
        problems += _hash_blobs(opened.archive, _blob_members(opened.archive, opened.layout),
                                opened.summary.file, problems).problems
    return problems


# ---------------------------------------------------------------------------- check --images


class ImageStatus(enum.StrEnum):
    """What the directory can do for one image reference a cluster uses."""

    SERVED = "served"
    MISSING = "missing"
    MALFORMED = "malformed"


@dataclass(frozen=True, slots=True)
class ImageCheck:
    """One reference as written, normalised as runtimes do, and the directory's answer."""

    written: str
    status: ImageStatus
    reference: str = ""  # normalised: docker.io/library/nginx:1.25
    repository: str = ""  # the name it is served under (path form): docker.io/library/nginx
    digest: str = ""  # the manifest or index a pull gets, when served
    reason: str = ""  # why it is missing or malformed

    def to_json(self) -> dict[str, Any]:
        return {"written": self.written, "status": str(self.status),
                "reference": self.reference or None, "repository": self.repository or None,
                "digest": self.digest or None, "reason": self.reason or None}


def read_references(text: str) -> list[str]:
    """Image references from ``text``: one per line as ``kubectl get pods -o jsonpath``
    prints them with a newline per image, or separated by spaces as ``{..image}`` prints
    them. ``#`` starts a comment; repeats are kept once, in first-seen order."""
    found: dict[str, None] = {}
    for line in text.splitlines():
        for word in line.partition("#")[0].split():
            found.setdefault(word, None)
    return list(found)


def _missing_reason(error: RegistryError) -> str:
    detail = error.detail if isinstance(error.detail, Mapping) else {}
    extra = [str(item) for key in ("unservable", "rejected") for item in detail.get(key, ())]
    return "; ".join([error.message, *extra])


async def _check_images(config: Config, references: Sequence[str]) -> list[ImageCheck]:
    store = ImageStore(config)
    try:
        return await _check_each(store, references)
    finally:
        store.close()


async def _check_each(store: ImageStore, references: Sequence[str]) -> list[ImageCheck]:
    results: list[ImageCheck] = []
    seen: set[str] = set()
    for written in references:
        try:
            reference = parse_image_reference(written)
        except InvalidReference as exc:
            results.append(ImageCheck(written, ImageStatus.MALFORMED, reason=str(exc)))
            continue
        if str(reference) in seen:
            continue  # kubectl's {..image} lists spec and status forms of the same image
        seen.add(str(reference))
        repository = repository_of(reference)
        wanted = reference.digest if reference.digest is not None else reference.tag
        assert wanted is not None  # parse_image_reference sets one of them
        try:
            record = await store.manifest(repository, wanted)
        except RegistryError as error:
            results.append(ImageCheck(written, ImageStatus.MISSING, str(reference), repository,
                                      reason=_missing_reason(error)))
            continue
        results.append(ImageCheck(written, ImageStatus.SERVED, str(reference), repository,
                                  record.digest))
    return results


def check_images(root: str, references: Sequence[str], *,
                 allow_outside: bool = False) -> tuple[ImageCheck, ...]:
    """Which of ``references`` the directory serves, answered by the server's own store (so a
    reference counts as served exactly when a node's pull of its manifest would succeed).
    References that normalise to one already checked are reported once.

    References are normalised as container runtimes do and looked up where mirror mode
    keeps them (``nginx`` under ``docker.io/library/nginx``); see :mod:`mirror`.
    """
    config = Config(directory=Path(root), grace_period=0, cache_dir=None,
                    allow_outside_symlinks=allow_outside)
    return tuple(asyncio.run(_check_images(config, references)))
