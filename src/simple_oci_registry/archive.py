"""Byte windows inside image archives: the registry's only contact with ``tarfile``.

An archive is scanned once (per fingerprint) into a table ``member name → (offset, size)``;
nothing is extracted or copied. A plain tar's members are windows of the file itself, so blob
bytes can go to the socket with ``sendfile``. A gzip- or zstd-compressed tar has no such windows:
its members are located in the decompressed stream, small members are kept in memory during the
scan, and large ones are read back by decompressing again (the blob cache in a later layer makes
that a one-time cost). An OCI layout *directory* is treated as an archive whose members are files.

Besides the OCI layout's own members, the table keeps what a legacy ``docker save`` archive
consists of (``manifest.json``, ``<config>.json``, ``<id>/layer.tar`` or ``<hex>.tar``); links
among those are resolved to their targets' windows, since Docker and skopeo link repeated
layers. Members not named by their digest are hashed once per archive fingerprint
(:meth:`Archive.member_digests`), and every member's first bytes are at hand
(:meth:`Archive.head`) so a layer's content can be told from what its manifest declares; with
a blob cache, both are remembered across restarts beside the cache's archive indexes.

Everything here blocks (stat, open, read): callers run it in a worker thread.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import functools
import gzip
import hashlib
import io
import itertools
import json
import logging
import os
import posixpath
import re
import stat
import tarfile
import tempfile
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Final, cast

import zstandard

from simple_oci_registry.blobcache import BlobCache, CachedIndex
from simple_oci_registry.fingerprint import Fingerprint

__all__ = [
    "HEAD_BYTES",
    "Archive",
    "ArchiveError",
    "ArchiveKind",
    "ArchiveLimits",
    "GZIP",
    "ZLIB_GZIP",
    "FileRegion",
    "GzipInflater",
    "Hashed",
    "Member",
    "MemberReader",
    "StaleArchiveError",
    "detect_kind",
    "identify",
    "open_archive",
    "sniff",
]

log = logging.getLogger(__name__)

_GZIP_MAGIC: Final = b"\x1f\x8b"
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
_CHUNK: Final = 1 << 20
HEAD_BYTES: Final = 512  # one tar header block: enough to tell tar, gzip and zstd apart
# The members an OCI image layout consists of (image-spec, image-layout.md); anything else in
# the tar is ignored.
_MEMBER_RE: Final = re.compile(r"oci-layout|index\.json|blobs/[a-z0-9+._-]+/[a-zA-Z0-9=_-]+")
# What a legacy `docker save` archive consists of (moby image/spec/v1.2.md and its
# manifest.json): the manifest, image configs `<hex>.json`, layers `<id>/layer.tar` (Docker) or
# `<hex>.tar` (skopeo, podman). `<id>/json` and `VERSION` are v1 metadata nobody needs.
_DOCKER_MEMBER_RE: Final = re.compile(
    r"manifest\.json|[A-Za-z0-9_][A-Za-z0-9._-]*\.(?:json|tar)|[A-Za-z0-9_][A-Za-z0-9._-]*/layer\.tar")
_FACTS_VERSION: Final = 1


class ArchiveError(Exception):
    """The archive cannot be served; the message says why, for the log and the client."""


class StaleArchiveError(Exception):
    """The file changed since it was indexed: the caller must re-resolve."""


class ArchiveKind(enum.Enum):
    """What a file is, told from its first bytes (also used for the content of layers)."""

    TAR = "tar"
    GZIP = "gzip"
    ZSTD = "zstd"
    DIRECTORY = "directory"


def sniff(head: bytes) -> ArchiveKind | None:
    """The format of bytes starting with ``head``: gzip, zstd, tar, or None (something else).

    gzip: RFC 1952 §2.3.1 ID1 ID2; zstd: RFC 8878 §3.1.1 frame magic, or a skippable frame
    (§3.1.2, 0x184D2A5?) as zstd:chunked may write; tar: the POSIX ustar magic at offset 257
    (GNU tar writes "ustar  " there too), or an all-zero block, the end-of-archive marker that
    is all an empty layer holds.
    """
    if head.startswith(_GZIP_MAGIC):
        return ArchiveKind.GZIP
    if head.startswith(_ZSTD_MAGIC) or (len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18"
                                         and head[0] & 0xF0 == 0x50):
        return ArchiveKind.ZSTD
    if len(head) >= 262 and head[257:262] == b"ustar":
        return ArchiveKind.TAR
    if len(head) == HEAD_BYTES and not head.strip(b"\0"):
        return ArchiveKind.TAR
    return None


@dataclass(frozen=True, slots=True)
class ArchiveLimits:
    """Bounds that keep a hostile archive from exhausting memory or CPU."""

    max_members: int = 200_000  # tar headers of any kind (directories, other files too)
    small_member_bytes: int = 4 << 20  # manifests, configs, index.json (distribution caps at 4 MiB)
    max_small_total: int = 256 << 20  # small members a compressed archive may keep in memory
    max_expansion: int = 100  # decompressed bytes per compressed byte (gzip/zstd bombs)
    # Compressed bytes per second a scan may read (0: as fast as it can). Background
    # preparation sets it to bound its I/O where the I/O priority does not reach (NFS).
    read_bytes_per_second: int = 0


@dataclass(frozen=True, slots=True)
class Member:
    """One member of an archive: where its bytes start and how many there are."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class FileRegion:
    """A window of an open file that may be sent with ``sendfile``."""

    file: IO[bytes]
    offset: int


@dataclass(frozen=True, slots=True)
class Hashed:
    """What :meth:`MemberReader.hash_rest` read: the hex digest and how many bytes."""

    hexdigest: str
    size: int


class MemberReader(ABC):
    """An open member. Own file object per reader, because sendfile moves the file position."""

    size: int

    def hash_rest(self, algorithm: str) -> Hashed:
        """Hash what is left of the member, chunk by chunk (never all of it in memory).

        The one place members are hashed for verification: the store before serving,
        ``check``, and the digests of docker-save layers all go through it.
        """
        hasher = hashlib.new(algorithm)
        size = 0
        while chunk := self.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
        return Hashed(hasher.hexdigest(), size)

    def region(self) -> FileRegion | None:
        """The file window holding the member, when the bytes are stored as they are served."""
        return None

    @abstractmethod
    def read(self, n: int) -> bytes:
        """The next up to ``n`` bytes of the member (sequential)."""

    @abstractmethod
    def unchanged(self) -> bool:
        """False once the underlying file no longer is what was indexed."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> MemberReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Archive(ABC):
    """An indexed image archive: its identity at scan time and the members it holds.

    ``cache`` (set by :func:`open_archive`) is where facts that cost a pass over the bytes
    (member digests, a compressed member's first bytes) are remembered across restarts.
    """

    kind: ArchiveKind

    def __init__(self, path: str, fingerprint: Fingerprint, members: Mapping[str, Member],
                 cache: BlobCache | None = None) -> None:
        self.path = path
        # Where the bytes are opened: the path itself, or /proc/self/fd/N for an archive held
        # open by a pin (pins.py), which stays readable after a rename over its path.
        self.source = path
        self.fingerprint = fingerprint
        self.members = members
        self.cache = cache
        self.aliases: Mapping[str, str] = {}  # link member -> the member it links to
        self._digests: dict[str, str] = {}
        self._lent: int | None = None  # a descriptor to read through during one pass

    @contextlib.contextmanager
    def lent(self, fd: int) -> Iterator[None]:
        """Read members through ``fd`` (an open descriptor of this archive's file, owned by
        the caller for the whole block) instead of opening the file for each read.

        Indexing reads a handful of members; on a file server each open and its fstat are
        round trips, so the pass reads with ``pread`` and checks the file once, at the end:
        if the bytes changed meanwhile (rewritten in place) StaleArchiveError is raised and
        the caller indexes again. Readers opened for streaming never use ``fd``: they must
        outlive the block.
        """
        self._lent = fd
        try:
            yield
        finally:
            self._lent = None
        if not self.fingerprint.same_bytes(Fingerprint.of_fd(fd)):
            raise StaleArchiveError(f"{self.path} changed while it was indexed")

    @abstractmethod
    def read_member(self, name: str, limit: int) -> bytes:
        """The whole member, refused when larger than ``limit`` (it is parsed in memory)."""

    @abstractmethod
    def open_member(self, name: str) -> MemberReader:
        """Open a member for streaming; raises StaleArchiveError if the file changed."""

    def open_blob(self, name: str, digest: str) -> MemberReader:
        """Open the member holding blob ``digest`` (compressed archives cache it by digest)."""
        return self.open_member(name)

    def prepare(self, name: str, digest: str | None = None) -> None:  # noqa: B027 - a hook
        """Make ``open_blob(name, digest)`` fast (compressed archives fill the blob cache)."""

    def head(self, name: str) -> bytes:
        """The member's first bytes (up to HEAD_BYTES): enough to tell what format it is in."""
        with self.open_member(name) as reader:
            return reader.read(HEAD_BYTES)

    def member_digests(self, names: Collection[str]) -> dict[str, str]:
        """The sha256 digests of members that are not named by digest (docker-save layers).

        Each member is hashed once per archive fingerprint: the result is remembered by this
        object and, with a cache, in a file beside the cache's archive indexes, so a restart or
        another worker process reads it instead of hashing gigabytes again. The caller must
        not trust more than the fingerprint vouches for: the file is re-checked whenever a
        member is opened.
        """
        # A link (a repeated layer) has its target's bytes: hash those once.
        targets = {n: self.aliases.get(n, n) for n in names}
        wanted = [n for n in dict.fromkeys(targets.values()) if n not in self._digests]
        if wanted and self.cache is not None:
            with self.cache.indexing(self.path, self.fingerprint):
                facts = _load_facts(self.cache, self.path, self.fingerprint)
                if facts is not None:
                    self._digests.update(facts.digests)
                missing = [n for n in wanted if n not in self._digests]
                if missing:
                    for name in missing:
                        self._digests[name] = self._hash(name)
                    _save_facts(self.cache, self.path, self.fingerprint, _Facts(
                        dict(self._digests), facts.heads if facts is not None else {}))
        else:
            for name in wanted:
                self._digests[name] = self._hash(name)
        return {n: self._digests[target] for n, target in targets.items()}

    def _hash(self, name: str) -> str:
        with self.open_member(name) as reader:
            return "sha256:" + reader.hash_rest("sha256").hexdigest

    def _member(self, name: str, limit: int | None = None) -> Member:
        member = self.members.get(name)
        if member is None:
            raise ArchiveError(f"{name} is missing from the archive")
        if limit is not None and member.size > limit:
            raise ArchiveError(f"{name} is {member.size} bytes, over the {limit}-byte limit")
        return member


def _open_regular(path: str, buffering: int = -1) -> IO[bytes]:
    """Open a file for reading, refusing anything but a regular file.

    O_NONBLOCK keeps open() itself from waiting for a writer when the path is a FIFO (POSIX
    open(2)); it has no effect on regular files, and fstat then checks the opened object.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    file = os.fdopen(fd, "rb", buffering=buffering)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        file.close()
        raise ArchiveError("not a regular file or a directory")
    return file


def pin_source(fd: int) -> str:
    """A path that opens the file behind ``fd`` again, even once it is renamed over or
    unlinked (Linux /proc magic link), with its own file offset."""
    return f"/proc/self/fd/{fd}"


def detect_kind(path: str) -> ArchiveKind:
    """Tell the archive's format from its content, never from its name."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        return ArchiveKind.DIRECTORY
    with _open_regular(path) as f:
        head = f.read(512)
    return _archive_kind(head)


def identify(path: str) -> tuple[Fingerprint, ArchiveKind]:
    """An archive file's fingerprint and format from one open, one fstat and one read: a
    survey of a shared directory pays a round trip per call (directories are refused)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # see _open_regular
    try:
        st, kind = _identify_fd(fd)
    finally:
        os.close(fd)
    return Fingerprint.of(st), kind


def _identify_fd(fd: int) -> tuple[os.stat_result, ArchiveKind]:
    """The stat and format of the regular file open at ``fd`` (positional read: the
    descriptor's offset may be shared)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ArchiveError("not a regular file")
    return st, _archive_kind(os.pread(fd, HEAD_BYTES, 0))


def _archive_kind(head: bytes) -> ArchiveKind:
    """The format of an archive file whose first 512 bytes are ``head``."""
    if head.startswith(_GZIP_MAGIC):
        return ArchiveKind.GZIP
    if head.startswith(_ZSTD_MAGIC):
        return ArchiveKind.ZSTD
    # POSIX ustar and GNU tar put a magic at offset 257 (POSIX.1-1988 ustar header).
    if len(head) == 512 and head[257:262] == b"ustar":
        return ArchiveKind.TAR
    raise ArchiveError("not a tar, gzip or zstd archive, nor an OCI layout directory")


def open_archive(path: str, limits: ArchiveLimits | None = None,
                 cache: BlobCache | None = None, *, source: str | None = None,
                 fd: int | None = None) -> Archive:
    """Index the archive at ``path`` (blocking); ``cache`` serves compressed archives.

    ``source``, when given, is where the file is opened instead of ``path`` (a pinned
    descriptor, :func:`pin_source`); ``path`` stays the archive's name in logs and cache keys.
    ``fd``, an open descriptor of that file, is read with ``pread`` for the scan of an
    uncompressed tar instead of opening it again (each open is a round trip on NFS).
    """
    limits = limits or ArchiveLimits()
    st: os.stat_result | None = None
    if fd is not None:
        st, kind = _identify_fd(fd)  # a pin is always a regular file
    else:
        kind = detect_kind(source or path)
    archive: Archive
    if kind is ArchiveKind.TAR and fd is not None and st is not None:
        archive = TarArchive.scan_fd(path, limits, fd, Fingerprint.of(st), source=source)
    elif kind is ArchiveKind.TAR:
        archive = TarArchive.scan(path, limits, source=source)
    elif kind is ArchiveKind.DIRECTORY:
        archive = DirectoryArchive.scan(path, limits)
    else:
        return CompressedTarArchive.scan(path, kind, limits, cache, source=source)
    archive.cache = cache  # remembers the digests of members not named by digest
    return archive


@dataclass(frozen=True, slots=True)
class _Facts:
    """What a pass over an archive's bytes found out, remembered beside the cache's indexes."""

    digests: dict[str, str]  # member name -> sha256 digest, for members not named by digest
    heads: dict[str, bytes]  # member name -> first bytes, for large compressed members


def _facts_path(cache: BlobCache, path: str, fingerprint: Fingerprint) -> str:
    # Keyed like the cache's own index files (path and the full fingerprint, ctime included):
    # an in-place rewrite must not be answered with the old version's digests.
    key = json.dumps([path, fingerprint.device, fingerprint.inode, fingerprint.size,
                      fingerprint.mtime_ns, fingerprint.ctime_ns])
    return os.path.join(cache.directory, "facts",
                        hashlib.sha256(key.encode()).hexdigest() + ".json")


def _load_facts(cache: BlobCache, path: str, fingerprint: Fingerprint) -> _Facts | None:
    """The remembered facts, or None when absent or damaged (then they are found again)."""
    try:
        with open(_facts_path(cache, path, fingerprint), "rb") as f:
            raw = json.loads(f.read())
        if raw.get("version") != _FACTS_VERSION or raw.get("archive") != path:
            return None
        digests = {str(k): str(v) for k, v in raw["digests"].items()}
        heads = {str(k): base64.b64decode(v, validate=True) for k, v in raw["heads"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not all(re.fullmatch(r"sha256:[0-9a-f]{64}", d) for d in digests.values()):
        return None
    return _Facts(digests, heads)


def _save_facts(cache: BlobCache, path: str, fingerprint: Fingerprint, facts: _Facts) -> None:
    """Write the facts atomically (temporary file, fsync, rename); failure only costs time."""
    target = _facts_path(cache, path, fingerprint)
    document = {"version": _FACTS_VERSION, "archive": path, "digests": facts.digests,
                "heads": {k: base64.b64encode(v).decode() for k, v in facts.heads.items()}}
    tmp = ""
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.directory / "tmp", prefix="facts")
        with os.fdopen(fd, "w") as out:
            json.dump(document, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
        tmp = ""
    except OSError as exc:
        log.warning("cannot remember member digests of %s: %s", path, exc)
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _strip(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _normalise(name: str) -> str | None:
    """The archive-relative name of a tar member, or None when no image format uses it."""
    name = _strip(name)
    return name if _MEMBER_RE.fullmatch(name) or _DOCKER_MEMBER_RE.fullmatch(name) else None


@dataclass(frozen=True, slots=True)
class _Table:
    """The member table, and which of its names are links to which other member."""

    members: dict[str, Member]
    aliases: dict[str, str]


def _link_target(info: tarfile.TarInfo, name: str) -> str:
    # A symlink's target is relative to its own directory; a hard link's names a member
    # (POSIX pax, typeflag 1 and 2).
    if info.issym():
        return posixpath.normpath(posixpath.join(posixpath.dirname(name), info.linkname))
    return _strip(info.linkname)


def _collect(entries: list[tuple[tarfile.TarInfo, str]], limits: ArchiveLimits) -> _Table:
    """Turn scanned tar headers into the member table, refusing what must not be served."""
    members: dict[str, Member] = {}
    links: dict[str, str] = {}
    duplicates: set[str] = set()
    for info, name in entries:
        oci = _MEMBER_RE.fullmatch(name) is not None
        if not info.isreg() or info.sparse is not None:
            if not oci and (info.issym() or info.islnk()):
                # Docker and skopeo link a layer that an image repeats to its first copy
                # (moby image/tarexport/save.go): the link serves the target's window.
                links[name] = _link_target(info, name)
                continue
            if not oci and info.isdir():
                continue  # a directory named like a layer file is no layer
            # Links could point anywhere and sparse files have holes the window doesn't map:
            # neither is a byte window we can vouch for.
            raise ArchiveError(f"{name} is a {_type_name(info)}, not a regular file")
        if name in members:
            duplicates.add(name)
        members[name] = Member(name, info.offset_data, info.size)
    if duplicates or set(links) & set(members):
        both = duplicates | (set(links) & set(members))
        raise ArchiveError(f"duplicate members: {', '.join(sorted(both)[:5])}")
    if len(members) > limits.max_members:
        raise ArchiveError(f"more than {limits.max_members} members")
    aliases: dict[str, str] = {}
    for name, target in links.items():
        for _hop in range(8):  # a link to a link; a loop or a dangling link serves nothing
            if target not in links:
                break
            target = links[target]
        if target in members:
            aliases[name] = target
            members[name] = Member(name, members[target].offset, members[target].size)
    return _Table(members, aliases)


# Pax records and GNU long names of real archives are a few hundred bytes; tarfile reads such
# header data into memory whole, so a header claiming gigabytes (a sparse file costs no disk)
# would allocate them before any member is seen.
_MAX_HEADER_DATA: Final = 1 << 20
_HEADER_DATA_TYPES: Final = frozenset({tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
                                       tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE})


class _GuardedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized header data before tarfile reads it."""

    def _proc_member(self, owner: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _HEADER_DATA_TYPES and not 0 <= self.size <= _MAX_HEADER_DATA:
            raise ArchiveError(f"a {self.size}-byte extended header (over {_MAX_HEADER_DATA})")
        return super()._proc_member(owner)  # type: ignore[misc,no-any-return]


def _check_extent(info: tarfile.TarInfo, end: int, what: str) -> None:
    """Refuse a member whose data cannot lie between its header and ``end``."""
    if info.size < 0:
        raise ArchiveError(f"{info.name} has a negative size")
    if info.offset_data + info.size > end:
        raise ArchiveError(f"{info.name} extends past {what}")


def _check_count(count: int, limits: ArchiveLimits) -> None:
    # Every header counts, not only layout members: tarfile keeps a TarInfo for each one, so
    # millions of empty entries under other names would fill memory just as well.
    if count > limits.max_members:
        raise ArchiveError(f"more than {limits.max_members} members")


def _type_name(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "symbolic link"
    if info.islnk():
        return "hard link"
    if info.isdir():
        return "directory"
    if info.sparse is not None:
        return "sparse file"
    return "special file"


class _FdReader(MemberReader):
    """A member that is a plain window ``[offset, offset+size)`` of an open file."""

    def __init__(self, file: IO[bytes], offset: int, size: int, fingerprint: Fingerprint) -> None:
        self._file = file
        self._offset = offset
        self._pos = 0
        self.size = size
        self._fingerprint = fingerprint

    def region(self) -> FileRegion:
        return FileRegion(self._file, self._offset)

    def read(self, n: int) -> bytes:
        n = min(n, self.size - self._pos)
        if n <= 0:
            return b""
        data = os.pread(self._file.fileno(), n, self._offset + self._pos)
        self._pos += len(data)
        return data

    def unchanged(self) -> bool:
        try:
            return self._fingerprint.same_bytes(Fingerprint.of_fd(self._file.fileno()))
        except OSError:
            return False

    def close(self) -> None:
        self._file.close()


def _open_checked(path: str, fingerprint: Fingerprint) -> IO[bytes]:
    """Open ``path`` and make sure the opened file is the one that was indexed.

    Checking the *descriptor* (not the path) closes the race between stat and open: if the file
    was replaced, the caller re-resolves instead of serving other bytes under an old digest.
    """
    try:
        file = _open_regular(path, buffering=0)  # handed to the reader (pread, sendfile)
    except FileNotFoundError as exc:
        raise StaleArchiveError(f"{path} disappeared") from exc
    except ArchiveError as exc:
        raise StaleArchiveError(f"{path} is no longer a regular file") from exc
    try:
        # same_bytes: a pinned archive renamed over (or removed) still holds its bytes.
        if not fingerprint.same_bytes(Fingerprint.of_fd(file.fileno())):
            raise StaleArchiveError(f"{path} changed since it was indexed")
    except BaseException:
        file.close()
        raise
    return file


class TarArchive(Archive):
    """An uncompressed tar: every member is a window of the file, served with sendfile."""

    kind = ArchiveKind.TAR

    @classmethod
    def scan(cls, path: str, limits: ArchiveLimits, *, source: str | None = None) -> TarArchive:
        with _open_regular(source or path) as f:
            return cls._scan(path, limits, f, Fingerprint.of_fd(f.fileno()), source)

    @classmethod
    def scan_fd(cls, path: str, limits: ArchiveLimits, fd: int, fingerprint: Fingerprint, *,
                source: str | None = None) -> TarArchive:
        """Scan through a descriptor the caller keeps open, with positional reads (its file
        offset may be shared with other processes holding the same pin)."""
        # Headers of small members often share one 64 KiB read (seeks within the buffer
        # cost nothing); after a large member the next header is one more read.
        with io.BufferedReader(_PositionalReader(fd), buffer_size=1 << 16) as f:
            return cls._scan(path, limits, cast(IO[bytes], f), fingerprint, source)

    @classmethod
    def _scan(cls, path: str, limits: ArchiveLimits, f: IO[bytes], fingerprint: Fingerprint,
              source: str | None) -> TarArchive:
        entries: list[tuple[tarfile.TarInfo, str]] = []
        try:
            with tarfile.open(fileobj=f, mode="r:", tarinfo=_GuardedTarInfo) as tf:
                for count, info in enumerate(tf, 1):
                    # A header may announce more bytes than the file holds (truncated
                    # copy, lying size), or a negative size (GNU base-256), which makes
                    # tarfile seek backwards, possibly onto an earlier header forever.
                    _check_extent(info, fingerprint.size, "the end of the file (truncated?)")
                    _check_count(count, limits)
                    name = _normalise(info.name)
                    if name is not None:
                        entries.append((info, name))
        except (tarfile.TarError, EOFError) as exc:
            raise ArchiveError(f"unreadable tar: {exc}") from exc
        table = _collect(entries, limits)
        archive = cls(path, fingerprint, table.members)
        archive.aliases = table.aliases
        archive.source = source or path
        return archive

    def read_member(self, name: str, limit: int) -> bytes:
        member = self._member(name, limit)
        if self._lent is not None:
            data = os.pread(self._lent, member.size, member.offset)  # checked when returned
        else:
            with _open_checked(self.source, self.fingerprint) as f:
                data = os.pread(f.fileno(), member.size, member.offset)
        if len(data) != member.size:
            raise StaleArchiveError(f"{self.path} is shorter than indexed")
        return data

    def open_member(self, name: str) -> MemberReader:
        member = self._member(name)
        return _FdReader(_open_checked(self.source, self.fingerprint), member.offset, member.size,
                         self.fingerprint)

    def head(self, name: str) -> bytes:
        member = self._member(name)
        size = min(member.size, HEAD_BYTES)
        if self._lent is not None:
            return os.pread(self._lent, size, member.offset)
        with _open_checked(self.source, self.fingerprint) as f:
            return os.pread(f.fileno(), size, member.offset)


class _PositionalReader(io.RawIOBase):
    """A read-only file over a descriptor it does not own (closing it leaves the descriptor
    open), keeping its own position: every read is a ``pread``, so the descriptor's shared
    offset is never used or moved."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = os.preadv(self._fd, [buffer], self._pos)
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._pos
        elif whence == os.SEEK_END:
            offset += os.fstat(self._fd).st_size
        if offset < 0:
            raise ValueError("negative seek position")
        self._pos = offset
        return offset

    def tell(self) -> int:
        return self._pos


class _BoundedReader(io.RawIOBase):
    """Counts decompressed bytes and stops a decompression bomb."""

    def __init__(self, inner: IO[bytes], budget: int) -> None:
        self._inner = inner
        self._budget = budget
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._inner.read(len(buffer))
        self.consumed += len(data)
        if self.consumed > self._budget:
            raise ArchiveError("decompressed size exceeds the expansion limit (compression bomb?)")
        buffer[: len(data)] = data
        return len(data)


@dataclass(frozen=True, slots=True)
class GzipInflater:
    """One way to read a gzip stream: its name (logged at start), how to open a stream, and
    what it raises for a corrupt deflate stream (neither zlib's nor ISA-L's error is an
    OSError). Truncation (EOFError) and a bad header, CRC or length (gzip.BadGzipFile) are
    alike in both; tests hold them to the same answers on hostile input."""

    name: str
    open: Callable[[IO[bytes]], IO[bytes]]
    errors: tuple[type[BaseException], ...]


def _zlib_gzip(raw: IO[bytes]) -> IO[bytes]:
    return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]


ZLIB_GZIP: Final = GzipInflater("zlib", _zlib_gzip, (zlib.error,))


def _fastest_gzip() -> GzipInflater:
    """ISA-L's inflate (the ``isal`` wheel) reads layer tars 2-3x as fast as zlib (issue 12);
    zlib where that wheel is not installed (machines it is not published for)."""
    try:
        from isal import igzip, igzip_lib
    except ImportError:
        return ZLIB_GZIP

    def open_isal(raw: IO[bytes]) -> IO[bytes]:
        return cast(IO[bytes], igzip.IGzipFile(fileobj=raw, mode="rb"))  # type: ignore[no-untyped-call]

    # The stubs declare the error an Exception instance; it is the exception class.
    return GzipInflater("ISA-L (isal)", open_isal,
                        (zlib.error, cast(type[BaseException], igzip_lib.IsalError)))


GZIP: Final = _fastest_gzip()
# What a pass over a compressed tar raises for a broken archive.
_UNREADABLE: Final[tuple[type[BaseException], ...]] = (
    tarfile.TarError, EOFError, OSError, *GZIP.errors, zstandard.ZstdError)


class _PacedReader(io.RawIOBase):
    """Reads no faster than ``rate`` bytes per second on average (sleeping between reads)."""

    def __init__(self, inner: IO[bytes], rate: int) -> None:
        self._inner = inner
        self._rate = rate
        self._started = time.monotonic()
        self._read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        # At most a quarter second's worth at a time, so the pace stays even.
        data = self._inner.read(min(len(buffer), max(1, self._rate // 4)))
        self._read += len(data)
        ahead = self._read / self._rate - (time.monotonic() - self._started)
        if ahead > 0:
            time.sleep(ahead)
        buffer[: len(data)] = data
        return len(data)


def _decompressor(kind: ArchiveKind, raw: IO[bytes]) -> IO[bytes]:
    if kind is ArchiveKind.GZIP:
        return GZIP.open(raw)
    # zstd has no multi-threaded decompression; reading the file 1 MiB at a time instead of
    # zstd's 128 KiB input block inflates ~15% faster (1.23 -> 1.45 GB/s of CPU time on a
    # 347 MB tar of /usr, measured for issue 12).
    return zstandard.ZstdDecompressor().stream_reader(raw, read_size=_CHUNK,
                                                      read_across_frames=True)


class _StreamReader(MemberReader):
    """A member of a compressed tar, read by decompressing from the start of the archive."""

    def __init__(self, raw: IO[bytes], kind: ArchiveKind, member: Member,
                 fingerprint: Fingerprint) -> None:
        self._raw = raw
        self._stream = _decompressor(kind, raw)
        self._fingerprint = fingerprint
        self.size = member.size
        self._left = member.size
        skip = member.offset
        while skip:
            got = len(self._stream.read(min(skip, _CHUNK)))
            if not got:
                raise StaleArchiveError("archive ended before the member")
            skip -= got

    def read(self, n: int) -> bytes:
        n = min(n, self._left)
        if n <= 0:
            return b""
        data = self._stream.read(n)
        if not data:
            raise StaleArchiveError("archive ended inside the member")
        self._left -= len(data)
        return data

    def unchanged(self) -> bool:
        try:
            return self._fingerprint.same_bytes(Fingerprint.of_fd(self._raw.fileno()))
        except OSError:
            return False

    def close(self) -> None:
        self._stream.close()
        self._raw.close()


class _BytesReader(MemberReader):
    """A small member already held in memory (index.json, manifests, configs)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self.size = len(data)

    def read(self, n: int) -> bytes:
        chunk = self._data[self._pos: self._pos + n]
        self._pos += len(chunk)
        return chunk

    def unchanged(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _blob_digest(name: str) -> str | None:
    """``blobs/<alg>/<encoded>`` → ``<alg>:<encoded>``; the cache is keyed by digest."""
    parts = name.split("/")
    return f"{parts[1]}:{parts[2]}" if len(parts) == 3 and parts[0] == "blobs" else None


class CompressedTarArchive(Archive):
    """A gzip- or zstd-compressed tar (the original project's format: ``docker save | gzip``).

    With a blob cache, the one decompression pass that indexing needs anyway (skopeo writes
    index.json *after* the blobs, so nothing is known before the end) also stores every large
    blob in the cache, verified; blobs are then served from there with sendfile. Large members
    of a legacy docker-save archive are not named by digest: the pass hashes them on the way
    and caches them under the digest it found. The member table, small members, those digests
    and every large member's first bytes are remembered in the cache too, so an unchanged
    archive is not decompressed again after a restart, nor by a second worker process.
    Without a cache, members are decompressed again for each transfer.
    """

    def __init__(self, path: str, fingerprint: Fingerprint, members: Mapping[str, Member],
                 kind: ArchiveKind, small: Mapping[str, bytes],
                 cache: BlobCache | None = None, heads: Mapping[str, bytes] | None = None,
                 digests: Mapping[str, str] | None = None) -> None:
        super().__init__(path, fingerprint, members, cache)
        self.kind = kind
        self._small = small
        self._heads = dict(heads or {})
        self._digests.update(digests or {})

    @classmethod
    def scan(cls, path: str, kind: ArchiveKind, limits: ArchiveLimits,
             cache: BlobCache | None = None, *,
             source: str | None = None) -> CompressedTarArchive:
        archive = cls._scan_cached(path, kind, limits, cache, source or path)
        archive.source = source or path
        return archive

    @classmethod
    def _scan_cached(cls, path: str, kind: ArchiveKind, limits: ArchiveLimits,
                     cache: BlobCache | None, source: str) -> CompressedTarArchive:
        if cache is None:
            return cls._scan(path, kind, limits, None, source)
        fingerprint = Fingerprint.of_path(source)
        with cache.indexing(path, fingerprint):
            remembered = cache.load_index(path, fingerprint)
            facts = _load_facts(cache, path, fingerprint)
            if remembered is not None and facts is not None:
                # Blobs evicted since are decompressed again on demand, one at a time.
                members = {n: Member(n, off, size) for n, (off, size) in remembered.members.items()}
                return cls(path, fingerprint, members, kind, remembered.small, cache,
                           facts.heads, facts.digests)
            archive = cls._scan(path, kind, limits, cache, source)
            cache.save_index(path, archive.fingerprint, CachedIndex(
                {m.name: (m.offset, m.size) for m in archive.members.values()},
                dict(archive._small)))
            _save_facts(cache, path, archive.fingerprint,
                        _Facts(dict(archive._digests), archive._heads))
            return archive

    @classmethod
    def _scan(cls, path: str, kind: ArchiveKind, limits: ArchiveLimits,
              cache: BlobCache | None, source: str) -> CompressedTarArchive:
        entries: list[tuple[tarfile.TarInfo, str]] = []
        small: dict[str, bytes] = {}
        heads: dict[str, bytes] = {}
        digests: dict[str, str] = {}
        small_total = 0
        with _open_regular(source) as raw:
            fingerprint = Fingerprint.of_fd(raw.fileno())
            budget = limits.max_expansion * fingerprint.size + (1 << 20)
            if cache is not None:
                cache.count_decompression()
            compressed: IO[bytes] = raw
            if limits.read_bytes_per_second > 0:
                compressed = io.BufferedReader(_PacedReader(raw, limits.read_bytes_per_second),
                                               _CHUNK)
            try:
                with _decompressor(kind, compressed) as stream:
                    bounded = io.BufferedReader(_BoundedReader(stream, budget), _CHUNK)
                    try:
                        # Opening reads the first header; decompression errors are not
                        # ReadError, so this one means the decompressed bytes are no tar.
                        tf = tarfile.open(fileobj=bounded, mode="r|", tarinfo=_GuardedTarInfo)
                    except tarfile.ReadError as exc:
                        raise ArchiveError(f"a {kind.value} stream whose content is not a tar "
                                           f"archive (the tar reader says: {exc})") from exc
                    with tf:
                        for count, info in enumerate(tf, 1):
                            # Checked before tarfile skips the data: an enormous size would
                            # have it read an empty stream block by block for ages.
                            _check_extent(info, budget,
                                          "the expansion limit (compression bomb?)")
                            _check_count(count, limits)
                            name = _normalise(info.name)
                            if name is None:
                                continue
                            entries.append((info, name))
                            if not info.isreg():
                                continue
                            extracted = tf.extractfile(info)
                            if extracted is None:
                                continue
                            if info.size <= limits.small_member_bytes:
                                small_total += info.size
                                if small_total > limits.max_small_total:
                                    raise ArchiveError("too many small members")
                                small[name] = extracted.read()
                                continue
                            # Large: keep the first bytes (what a layer really is), then
                            # cache it under its digest, hashing it first if not named by it.
                            head = extracted.read(HEAD_BYTES)
                            heads[name] = head
                            chunks = itertools.chain(
                                (head,), iter(functools.partial(extracted.read, _CHUNK), b""))
                            digest = _blob_digest(name)
                            if digest is None:
                                digests[name] = _hash_into(cache, info.size, chunks)
                            elif cache is not None:
                                _tee_into(cache, digest, info.size, chunks)
            except _UNREADABLE as exc:
                raise ArchiveError(f"unreadable {kind.value} archive: {exc}") from exc
        table = _collect(entries, limits)
        for name, data in small.items():
            if len(data) != table.members[name].size:
                raise ArchiveError(f"{name} is truncated")
        for name, target in table.aliases.items():
            if target in small:
                small[name] = small[target]
            if target in heads:
                heads[name] = heads[target]
            if target in digests:
                digests[name] = digests[target]
        archive = cls(path, fingerprint, table.members, kind, small, cache, heads, digests)
        archive.aliases = table.aliases
        return archive

    def read_member(self, name: str, limit: int) -> bytes:
        self._member(name, limit)
        data = self._small.get(name)
        if data is None:
            raise ArchiveError(f"{name} is too large to read into memory")
        return data

    def head(self, name: str) -> bytes:
        self._member(name)
        data = self._small.get(name)
        if data is None:
            data = self._heads.get(name)
        if data is None:  # not recorded (cannot happen for a scanned member): read it
            return super().head(name)
        return data[:HEAD_BYTES]

    def open_member(self, name: str) -> MemberReader:
        return self.open_blob(name, _blob_digest(name) or self._digests.get(name, ""))

    def open_blob(self, name: str, digest: str) -> MemberReader:
        member = self._member(name)
        data = self._small.get(name)
        if data is not None:
            return _BytesReader(data)
        if self.cache is not None and digest:
            cached = self._from_cache(digest, member)
            if cached is not None:
                return cached
        raw = _open_checked(self.source, self.fingerprint)
        try:
            return _StreamReader(raw, self.kind, member, self.fingerprint)
        except BaseException:
            raw.close()
            raise

    def prepare(self, name: str, digest: str | None = None) -> None:
        member = self._member(name)
        digest = digest or _blob_digest(name)
        if (self.cache is not None and digest is not None and name not in self._small
                and not self.cache.contains(digest, member.size)):
            reader = self._from_cache(digest, member)
            if reader is not None:
                reader.close()

    def _from_cache(self, digest: str, member: Member) -> MemberReader | None:
        """The cached blob, decompressing it into the cache first if it was evicted.

        The fill lock makes concurrent requests, in this process or another worker, wait
        for one decompression instead of each doing their own.
        """
        assert self.cache is not None
        file = self.cache.open(digest, member.size)
        if file is None:
            with self.cache.filling(digest, member.size) as needed:
                if needed:
                    raw = _open_checked(self.source, self.fingerprint)
                    self.cache.count_decompression()
                    with _StreamReader(raw, self.kind, member, self.fingerprint) as reader:
                        if not self.cache.store(digest, member.size,
                                                iter(lambda: reader.read(_CHUNK), b"")):
                            raise ArchiveError(f"{member.name} does not match its digest")
            file = self.cache.open(digest, member.size)
        if file is None:
            return None
        return _FdReader(file, 0, member.size, Fingerprint.of_fd(file.fileno()))


def _tee_into(cache: BlobCache, digest: str, size: int, chunks: Iterator[bytes]) -> None:
    """Store a member that the scan is reading through anyway, unless it is cached already."""
    if cache.contains(digest, size):
        return
    with cache.filling(digest, size) as needed:
        if needed:
            cache.store(digest, size, chunks)


def _hash_into(cache: BlobCache | None, size: int, chunks: Iterator[bytes]) -> str:
    """Hash a member that is not named by its digest; with a cache, keep it under that digest.

    The digest is known only at the end, so the bytes go to an unnamed temporary file in the
    cache's own directory first (same filesystem, never seen by others) and are stored from
    there: a local copy instead of decompressing the archive again on the first pull.
    """
    hasher = hashlib.sha256()
    if cache is None:
        for chunk in chunks:
            hasher.update(chunk)
        return "sha256:" + hasher.hexdigest()
    with tempfile.TemporaryFile(dir=cache.directory / "tmp") as spool:
        for chunk in chunks:
            hasher.update(chunk)
            spool.write(chunk)
        digest = "sha256:" + hasher.hexdigest()
        spool.seek(0)
        _tee_into(cache, digest, size, iter(lambda: spool.read(_CHUNK), b""))
    return digest


class DirectoryArchive(Archive):
    """An OCI image layout directory: each member is its own file.

    The archive's fingerprint is that of ``index.json``: tools rewrite it on every change to the
    layout, while blob files are immutable by name (and verified against their digests anyway).
    """

    kind = ArchiveKind.DIRECTORY

    def __init__(self, path: str, fingerprint: Fingerprint, members: Mapping[str, Member],
                 files: Mapping[str, Fingerprint]) -> None:
        super().__init__(path, fingerprint, members)
        self._files = files

    @classmethod
    def scan(cls, path: str, limits: ArchiveLimits) -> DirectoryArchive:
        members: dict[str, Member] = {}
        files: dict[str, Fingerprint] = {}

        def add(name: str) -> None:
            st = os.stat(os.path.join(path, name), follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise ArchiveError(f"{name} is not a regular file")
            members[name] = Member(name, 0, st.st_size)
            files[name] = Fingerprint.of(st)

        try:
            for top in ("oci-layout", "index.json"):
                if os.path.lexists(os.path.join(path, top)):
                    add(top)
            blobs = os.path.join(path, "blobs")
            # A symlinked blobs/ could lead anywhere: treat it like a symlinked alg_dir below.
            if os.path.isdir(blobs) and not os.path.islink(blobs):
                for algorithm in sorted(os.listdir(blobs)):
                    alg_dir = os.path.join(blobs, algorithm)
                    if not os.path.isdir(alg_dir) or os.path.islink(alg_dir):
                        continue
                    for encoded in os.listdir(alg_dir):
                        name = f"blobs/{algorithm}/{encoded}"
                        if _MEMBER_RE.fullmatch(name):
                            add(name)
                        if len(members) > limits.max_members:
                            raise ArchiveError(f"more than {limits.max_members} members")
        except OSError as exc:
            raise ArchiveError(f"unreadable layout directory: {exc}") from exc
        if "index.json" not in files:
            raise ArchiveError("index.json is missing from the layout directory")
        return cls(path, files["index.json"], members, files)

    def read_member(self, name: str, limit: int) -> bytes:
        self._member(name, limit)
        with self._open(name) as reader:
            data = reader.read(limit + 1)
        return data

    def open_member(self, name: str) -> MemberReader:
        self._member(name)
        return self._open(name)

    def head(self, name: str) -> bytes:
        self._member(name)
        with self._open(name) as reader:
            return reader.read(HEAD_BYTES)

    def _open(self, name: str) -> MemberReader:
        fingerprint = self._files[name]
        path = os.path.join(self.path, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise StaleArchiveError(f"{path}: {exc.strerror}") from exc
        file = os.fdopen(fd, "rb", buffering=0)
        if Fingerprint.of_fd(fd) != fingerprint:
            file.close()
            raise StaleArchiveError(f"{path} changed since it was indexed")
        return _FdReader(file, 0, fingerprint.size, fingerprint)
