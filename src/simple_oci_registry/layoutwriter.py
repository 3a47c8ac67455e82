"""Deterministic writer for OCI image layouts, as directories or as ``.oci`` tar archives.

The registry serves images straight from image-layout archives, so the test suite, the demo
builder (``tools/make_demo.py``) and the benchmark all need archives whose every byte they
control: which members exist and in which order, whether a manifest carries ``mediaType``,
Docker or OCI media types, compressed or plain tars, a 200 MiB layer. Tools such as skopeo or
umoci cannot be told to produce most of these shapes and are not always installed, so this
module writes layouts itself.

Determinism is a feature, not a nicety: two runs with the same inputs give byte-identical
archives (fixed mtime, uid/gid 0, empty user/group names, sorted members, gzip without a
timestamp, single-threaded zstd), so digests in tests can be asserted and benchmarks compare
like with like.

Memory: blobs may live in memory (``add_blob``), in a file on disk (``add_blob_file``) or be
produced by a repeatable generator (``add_blob_stream``, ``LayerFile.streamed``); the latter two
are never loaded whole, they are hashed once when added and streamed again when written (and
re-hashed then, so a file that changed in between is an error rather than a corrupt archive).

This module deliberately shares no code with the registry's reading side: it is the independent
producer the reader is tested against, so its media-type constants are its own.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import random
import re
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias

import zstandard

from simple_oci_registry import mediatypes

__all__ = [
    "ANNOTATION_CONTAINERD_NAME",
    "ANNOTATION_REF_NAME",
    "BlobChangedError",
    "ChunkFactory",
    "Compression",
    "Descriptor",
    "DigestSize",
    "EMPTY_JSON",
    "LayerFile",
    "LayoutWriter",
    "MEDIA_TYPE_DOCKER_CONFIG",
    "MEDIA_TYPE_DOCKER_LAYER",
    "MEDIA_TYPE_DOCKER_LAYER_GZIP",
    "MEDIA_TYPE_DOCKER_MANIFEST",
    "MEDIA_TYPE_DOCKER_MANIFEST_LIST",
    "MEDIA_TYPE_OCI_CONFIG",
    "MEDIA_TYPE_OCI_EMPTY",
    "MEDIA_TYPE_OCI_INDEX",
    "MEDIA_TYPE_OCI_LAYER",
    "MEDIA_TYPE_OCI_LAYER_GZIP",
    "MEDIA_TYPE_OCI_LAYER_ZSTD",
    "MEDIA_TYPE_OCI_MANIFEST",
    "OCI_LAYOUT_VERSION",
    "Platform",
    "canonical_json",
    "digest_chunks",
    "digest_file",
    "random_chunks",
    "sha256_digest",
]

# The spec's strings live in mediatypes.py; the writer re-exports them under its own names.
OCI_LAYOUT_VERSION: Final = mediatypes.OCI_LAYOUT_VERSION
MEDIA_TYPE_OCI_MANIFEST: Final = mediatypes.OCI_MANIFEST
MEDIA_TYPE_OCI_INDEX: Final = mediatypes.OCI_INDEX
MEDIA_TYPE_OCI_CONFIG: Final = mediatypes.OCI_CONFIG
MEDIA_TYPE_OCI_EMPTY: Final = mediatypes.OCI_EMPTY
MEDIA_TYPE_OCI_LAYER: Final = mediatypes.OCI_LAYER
MEDIA_TYPE_OCI_LAYER_GZIP: Final = mediatypes.OCI_LAYER_GZIP
MEDIA_TYPE_OCI_LAYER_ZSTD: Final = mediatypes.OCI_LAYER_ZSTD
MEDIA_TYPE_DOCKER_MANIFEST: Final = mediatypes.DOCKER_MANIFEST
MEDIA_TYPE_DOCKER_MANIFEST_LIST: Final = mediatypes.DOCKER_MANIFEST_LIST
MEDIA_TYPE_DOCKER_CONFIG: Final = mediatypes.DOCKER_CONFIG
MEDIA_TYPE_DOCKER_LAYER: Final = mediatypes.DOCKER_LAYER
MEDIA_TYPE_DOCKER_LAYER_GZIP: Final = mediatypes.DOCKER_LAYER_GZIP
ANNOTATION_REF_NAME: Final = mediatypes.ANNOTATION_REF_NAME
ANNOTATION_CONTAINERD_NAME: Final = mediatypes.ANNOTATION_CONTAINERD_NAME
EMPTY_JSON: Final = b"{}"

Compression: TypeAlias = Literal["none", "gzip", "zstd"]
ChunkFactory: TypeAlias = Callable[[], Iterable[bytes]]
"""A zero-argument callable that yields the same bytes every time it is called."""

_CHUNK: Final = 1 << 20
# Layers with more file content than this are streamed even if given as bytes, so the tar and
# its compressed form are never held in memory beside the caller's data.
_IN_MEMORY_LAYER_LIMIT: Final = 16 << 20
_BLOCK: Final = 512
_RECORD: Final = 20 * _BLOCK
_DIGEST_RE: Final = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_LAYER_MEDIA_TYPES: Final[Mapping[Compression, str]] = MappingProxyType(
    {
        "none": MEDIA_TYPE_OCI_LAYER,
        "gzip": MEDIA_TYPE_OCI_LAYER_GZIP,
        "zstd": MEDIA_TYPE_OCI_LAYER_ZSTD,
    }
)
# Docker schema2 has no zstd layer type; layers of other types keep theirs in Docker images.
_DOCKER_LAYER_TYPES: Final[Mapping[str, str]] = MappingProxyType(
    {
        MEDIA_TYPE_OCI_LAYER: MEDIA_TYPE_DOCKER_LAYER,
        MEDIA_TYPE_OCI_LAYER_GZIP: MEDIA_TYPE_DOCKER_LAYER_GZIP,
    }
)
_UNCOMPRESSED_TARS: Final = frozenset({MEDIA_TYPE_OCI_LAYER, MEDIA_TYPE_DOCKER_LAYER})
_GZIP_TARS: Final = frozenset({MEDIA_TYPE_OCI_LAYER_GZIP, MEDIA_TYPE_DOCKER_LAYER_GZIP})
_IMAGE_CONFIG_TYPES: Final = frozenset({MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_DOCKER_CONFIG})


class BlobChangedError(RuntimeError):
    """A file- or generator-backed blob no longer hashes to the digest it was added with.

    Raised while writing instead of silently producing an archive whose content does not match
    its own manifests.
    """


# --------------------------------------------------------------------------------------------
# Digests and JSON


@dataclass(frozen=True, slots=True)
class DigestSize:
    """The content address and length of some bytes: what a descriptor needs to know."""

    digest: str
    size: int


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``, the only digest algorithm this writer produces."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_chunks(chunks: Iterable[bytes]) -> DigestSize:
    """Digest and size of a byte stream without holding it in memory."""
    hasher = hashlib.sha256()
    size = 0
    for chunk in chunks:
        hasher.update(chunk)
        size += len(chunk)
    return DigestSize("sha256:" + hasher.hexdigest(), size)


def digest_file(path: str | os.PathLike[str]) -> DigestSize:
    """Digest and size of a file, read in chunks (files may be hundreds of MiB)."""
    return digest_chunks(_file_chunks(Path(path)))


def canonical_json(value: Any) -> bytes:
    """Compact UTF-8 JSON, the encoding every JSON blob written here uses.

    Keys keep their insertion order (the writer builds its dicts in a fixed order), so the
    bytes, and hence the digests, are stable across runs.
    """
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def random_chunks(size: int, *, seed: int = 0, chunk_size: int = _CHUNK) -> ChunkFactory:
    """A repeatable generator of ``size`` pseudo-random (incompressible) bytes.

    Meant for large benchmark blobs and layer files: pass the result to ``add_blob_stream`` or
    ``LayerFile.streamed`` and the bytes are produced on demand, twice (to hash, then to write),
    but never held in memory as a whole. Python's Mersenne Twister gives the same bytes for the
    same seed on every platform and version, so digests are stable.
    """
    if size < 0 or chunk_size <= 0:
        raise ValueError("size must be >= 0 and chunk_size > 0")

    def generate() -> Iterator[bytes]:
        rng = random.Random(seed)
        remaining = size
        while remaining > 0:
            n = min(chunk_size, remaining)
            yield rng.randbytes(n)
            remaining -= n

    return generate


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            yield chunk


# --------------------------------------------------------------------------------------------
# Descriptors


@dataclass(frozen=True, slots=True)
class Platform:
    """The platform of an image, as put in descriptors of image indexes."""

    architecture: str
    os: str
    variant: str | None = None
    os_version: str | None = None
    os_features: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The ``platform`` object of the image-spec, fields in the spec's order."""
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version is not None:
            out["os.version"] = self.os_version
        if self.os_features:
            out["os.features"] = list(self.os_features)
        if self.variant is not None:
            out["variant"] = self.variant
        return out


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI content descriptor: what a manifest, an index or ``index.json`` points at.

    ``annotations`` is copied into a read-only mapping so a descriptor cannot change after it
    was handed out; it is excluded from hashing (mappings are unhashable) but not from equality.
    """

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] | None = field(default=None, hash=False)
    platform: Platform | None = None
    artifact_type: str | None = None

    def __post_init__(self) -> None:
        if not _DIGEST_RE.fullmatch(self.digest):
            raise ValueError(f"not a digest: {self.digest!r}")
        if self.size < 0:
            raise ValueError(f"negative size: {self.size}")
        if self.annotations is not None:
            object.__setattr__(self, "annotations", MappingProxyType(dict(self.annotations)))

    @property
    def hex(self) -> str:
        """The encoded part of the digest: the file name under ``blobs/<algorithm>/``."""
        return self.digest.partition(":")[2]

    def to_json(self) -> dict[str, Any]:
        """The descriptor as image-spec JSON (``mediaType``, ``digest``, ``size``, ...)."""
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        if self.artifact_type is not None:
            out["artifactType"] = self.artifact_type
        return out

    def core(self) -> Descriptor:
        """Only media type, digest and size: the form used for ``config`` and ``subject``."""
        return Descriptor(self.media_type, self.digest, self.size)


# --------------------------------------------------------------------------------------------
# Layer entries


@dataclass(frozen=True, slots=True)
class LayerFile:
    """One entry of a layer built by ``LayoutWriter.add_layer`` when plain bytes are not enough.

    Exactly one kind: a regular file with in-memory ``data`` (the default), a regular file whose
    content is streamed from ``source`` (a path) or from ``generate`` (with its ``size``), a
    symlink (``symlink`` is the target), or a directory. ``mode`` defaults to 0644 for files,
    0755 for directories and 0777 for symlinks. Prefer the constructors below.
    """

    data: bytes = b""
    mode: int | None = None
    symlink: str | None = None
    directory: bool = False
    source: Path | None = None
    generate: ChunkFactory | None = field(default=None, compare=False)
    size: int | None = None

    def __post_init__(self) -> None:
        kinds = [
            self.symlink is not None,
            self.directory,
            self.source is not None,
            self.generate is not None,
        ]
        if sum(kinds) > 1 or (any(kinds) and self.data):
            raise ValueError("a LayerFile is exactly one of data, source, generate, symlink, dir")
        if (self.generate is None) != (self.size is None):
            raise ValueError("generate and size go together")
        if self.size is not None and self.size < 0:
            raise ValueError("size must be >= 0")
        if self.mode is not None and not 0 <= self.mode <= 0o7777:
            raise ValueError(f"mode out of range: {self.mode:o}")

    @classmethod
    def file(cls, data: bytes, mode: int = 0o644) -> LayerFile:
        """A regular file with the given bytes and mode."""
        return cls(data=data, mode=mode)

    @classmethod
    def executable(cls, data: bytes) -> LayerFile:
        """A regular file with mode 0755."""
        return cls(data=data, mode=0o755)

    @classmethod
    def link(cls, target: str) -> LayerFile:
        """A symbolic link to ``target`` (relative targets resolve from the link's directory)."""
        return cls(symlink=target)

    @classmethod
    def dir(cls, mode: int = 0o755) -> LayerFile:
        """An explicit directory entry (parents of files are added implicitly with 0755)."""
        return cls(directory=True, mode=mode)

    @classmethod
    def from_path(cls, source: str | os.PathLike[str], mode: int = 0o644) -> LayerFile:
        """A regular file whose content is streamed from ``source`` when the layer is built."""
        return cls(source=Path(source), mode=mode)

    @classmethod
    def streamed(cls, generate: ChunkFactory, size: int, mode: int = 0o644) -> LayerFile:
        """A regular file of ``size`` bytes produced by a repeatable generator."""
        return cls(generate=generate, size=size, mode=mode)

    @property
    def is_streamed(self) -> bool:
        """Whether the content comes from disk or a generator rather than memory."""
        return self.source is not None or self.generate is not None


LayerContent: TypeAlias = bytes | LayerFile


# --------------------------------------------------------------------------------------------
# Tar streaming


@dataclass(frozen=True, slots=True)
class _TarMember:
    """One member of a tar being streamed; ``chunks`` produces a regular file's content."""

    name: str
    type: bytes
    mode: int
    size: int = 0
    linkname: str = ""
    chunks: Callable[[], Iterable[bytes]] | None = field(default=None, compare=False)


def _tar_header(member: _TarMember, mtime: int) -> bytes:
    info = tarfile.TarInfo(member.name)
    info.type = member.type
    info.mode = member.mode
    info.size = member.size if member.type == tarfile.REGTYPE else 0
    info.linkname = member.linkname
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _tar_stream(members: Iterable[_TarMember], mtime: int) -> Iterator[bytes]:
    """A POSIX tar of ``members``, produced chunk by chunk, padded like ``tarfile`` pads."""
    total = 0
    for member in members:
        header = _tar_header(member, mtime)
        total += len(header)
        yield header
        if member.type != tarfile.REGTYPE or member.chunks is None:
            continue
        written = 0
        for chunk in member.chunks():
            written += len(chunk)
            yield chunk
        if written != member.size:
            raise BlobChangedError(
                f"{member.name}: produced {written} bytes, header says {member.size}"
            )
        padding = -written % _BLOCK
        if padding:
            yield bytes(padding)
        total += written + padding
    trailer = 2 * _BLOCK
    trailer += -(total + trailer) % _RECORD
    yield bytes(trailer)


def _normalize_member_path(name: str) -> str:
    cleaned = posixpath.normpath("/" + name.strip()).lstrip("/")
    if not cleaned or cleaned == "." or any(p == ".." for p in name.split("/")):
        raise ValueError(f"bad path in layer: {name!r}")
    return cleaned


def _layer_members(files: Mapping[str, LayerContent]) -> list[_TarMember]:
    """Entries of a layer tar: the given files plus implicit parent directories, sorted."""
    entries: dict[str, LayerFile] = {}
    for raw_name, content in files.items():
        name = _normalize_member_path(raw_name)
        if name in entries:
            raise ValueError(f"duplicate path in layer: {raw_name!r}")
        entries[name] = content if isinstance(content, LayerFile) else LayerFile(data=content)
    for name in list(entries):
        parent = posixpath.dirname(name)
        while parent and parent not in entries:
            entries[parent] = LayerFile.dir()
            parent = posixpath.dirname(parent)
    members: list[_TarMember] = []
    for name in sorted(entries):
        entry = entries[name]
        if entry.directory:
            mode = 0o755 if entry.mode is None else entry.mode
            members.append(_TarMember(name, tarfile.DIRTYPE, mode))
        elif entry.symlink is not None:
            mode = 0o777 if entry.mode is None else entry.mode
            members.append(_TarMember(name, tarfile.SYMTYPE, mode, linkname=entry.symlink))
        else:
            mode = 0o644 if entry.mode is None else entry.mode
            size, chunks = _entry_content(entry)
            members.append(_TarMember(name, tarfile.REGTYPE, mode, size, chunks=chunks))
    return members


def _entry_content(entry: LayerFile) -> tuple[int, Callable[[], Iterable[bytes]]]:
    if entry.source is not None:
        source = entry.source
        return source.stat().st_size, lambda: _file_chunks(source)
    if entry.generate is not None:
        assert entry.size is not None
        return entry.size, entry.generate
    data = entry.data
    return len(data), lambda: (data,)


# --------------------------------------------------------------------------------------------
# Compression


def _compress(
    chunks: Iterable[bytes], compression: Compression, level: int | None
) -> Iterator[bytes]:
    """Compress a stream deterministically (gzip header with mtime 0 and no file name)."""
    if compression == "none":
        yield from chunks
    elif compression == "gzip":
        deflate = zlib.compressobj(6 if level is None else level, zlib.DEFLATED, 31)
        for chunk in chunks:
            out = deflate.compress(chunk)
            if out:
                yield out
        yield deflate.flush()
    elif compression == "zstd":
        zstd = zstandard.ZstdCompressor(level=3 if level is None else level).compressobj()
        for chunk in chunks:
            out = zstd.compress(chunk)
            if out:
                yield out
        yield zstd.flush()
    else:
        raise ValueError(f"unknown compression: {compression!r}")


class _ChunkReader(io.RawIOBase):
    """A read-only file over an iterator of chunks, for the stdlib's streaming decompressors."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        super().__init__()
        self._chunks = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = chunk
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _decompressed(chunks: Iterable[bytes], media_type: str) -> Iterator[bytes]:
    """The tar inside a layer blob of a known tar media type, chunk by chunk."""
    if media_type in _UNCOMPRESSED_TARS:
        yield from chunks
        return
    raw = io.BufferedReader(_ChunkReader(chunks), _CHUNK)
    if media_type in _GZIP_TARS:
        with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            while chunk := gz.read(_CHUNK):
                yield chunk
    elif media_type == MEDIA_TYPE_OCI_LAYER_ZSTD:
        with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as zst:
            while chunk := zst.read(_CHUNK):
                yield chunk
    else:
        raise ValueError(f"not a layer tar media type: {media_type}")


# --------------------------------------------------------------------------------------------
# Blob sources


@dataclass(frozen=True, slots=True)
class _BytesSource:
    data: bytes


@dataclass(frozen=True, slots=True)
class _FileSource:
    path: Path


@dataclass(frozen=True, slots=True)
class _StreamSource:
    factory: Callable[[], Iterable[bytes]] = field(compare=False)


_Source: TypeAlias = _BytesSource | _FileSource | _StreamSource


@dataclass(frozen=True, slots=True)
class _StoredBlob:
    source: _Source
    size: int


def _source_chunks(source: _Source) -> Iterable[bytes]:
    if isinstance(source, _BytesSource):
        return (source.data,)
    if isinstance(source, _FileSource):
        return _file_chunks(source.path)
    return source.factory()


def _atomic_write(path: Path, chunks: Iterable[bytes]) -> None:
    """Write via a hidden temp file in the same directory, then rename over ``path``.

    Readers (the registry scanning a directory of archives) never see a half-written file, and
    the temp name starts with a dot so directory scanners that skip hidden files ignore it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.chmod(0o644)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# The writer


class LayoutWriter:
    """Accumulates blobs and ``index.json`` entries, then writes an OCI image layout.

    Typical use::

        w = LayoutWriter()
        layer = w.add_layer({"hello.txt": b"hi\\n"})
        image = w.add_image([layer], config={"config": {"Cmd": ["cat", "/hello.txt"]}})
        w.tag(image, "1.0")
        w.write_archive(Path("hello:1.0.oci"))

    Blobs are content-addressed: adding the same bytes twice stores them once. Nothing is
    written until ``write_archive`` / ``write_directory``, which may be called any number of
    times (and with different options) on the same writer.

    ``index_media_type=False`` omits ``mediaType`` from ``index.json`` (older skopeo did);
    ``mtime`` is the timestamp of every tar member, in layers and in the archive.
    """

    def __init__(self, *, index_media_type: bool = True, mtime: int = 0) -> None:
        self._index_media_type = index_media_type
        self._mtime = mtime
        self._blobs: dict[str, _StoredBlob] = {}
        self._diff_ids: dict[str, str] = {}
        self._entries: list[Descriptor] = []

    # ---- blobs ---------------------------------------------------------------------------

    def add_blob(
        self,
        data: bytes,
        media_type: str,
        *,
        annotations: Mapping[str, str] | None = None,
        artifact_type: str | None = None,
    ) -> Descriptor:
        """Store in-memory bytes as a blob; the descriptor carries the given media type."""
        digest = sha256_digest(data)
        self._blobs.setdefault(digest, _StoredBlob(_BytesSource(bytes(data)), len(data)))
        return Descriptor(media_type, digest, len(data), annotations, None, artifact_type)

    def add_json(
        self,
        value: Any,
        media_type: str,
        *,
        annotations: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Store a JSON value (``canonical_json``) as a blob: an escape hatch for hand-made
        manifests, e.g. deliberately malformed ones in tests."""
        return self.add_blob(canonical_json(value), media_type, annotations=annotations)

    def add_blob_file(
        self,
        path: str | os.PathLike[str],
        media_type: str,
        *,
        annotations: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Reference a file on disk as a blob without loading it.

        The file is hashed now and streamed (and re-hashed) when the layout is written; it must
        not change in between (``BlobChangedError`` otherwise).
        """
        source = Path(path).resolve()
        info = digest_file(source)
        self._blobs.setdefault(info.digest, _StoredBlob(_FileSource(source), info.size))
        return Descriptor(media_type, info.digest, info.size, annotations)

    def add_blob_stream(
        self,
        factory: ChunkFactory,
        media_type: str,
        *,
        annotations: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Store a blob produced by a repeatable generator (see ``random_chunks``).

        ``factory`` is called once now to compute digest and size, and again for every write;
        it must yield the same bytes each time. Nothing is held in memory.
        """
        info = digest_chunks(factory())
        self._blobs.setdefault(info.digest, _StoredBlob(_StreamSource(factory), info.size))
        return Descriptor(media_type, info.digest, info.size, annotations)

    def remove_blob(self, digest: str) -> None:
        """Forget a blob, so the layout references content it does not contain.

        Only useful for building broken fixtures (a missing layer or manifest).
        """
        del self._blobs[digest]

    def has_blob(self, digest: str) -> bool:
        """Whether ``digest`` will be written under ``blobs/``."""
        return digest in self._blobs

    def digests(self) -> list[str]:
        """Every stored blob's digest, sorted (the order they are written in)."""
        return sorted(self._blobs)

    def blob_bytes(self, digest: str) -> bytes:
        """A stored blob's bytes, read whole: for tests inspecting small blobs."""
        return b"".join(_source_chunks(self._blobs[digest].source))

    def blob_json(self, digest: str) -> Any:
        """A stored JSON blob (manifest, index, config), parsed."""
        return json.loads(self.blob_bytes(digest))

    # ---- layers, images, indexes ---------------------------------------------------------

    def add_layer(
        self,
        files: Mapping[str, LayerContent],
        compression: Compression = "gzip",
        *,
        level: int | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Build a deterministic tar layer of ``files`` and store it compressed.

        Keys are paths inside the image (a leading ``/`` is optional); values are file bytes or
        a ``LayerFile`` (mode, symlink, directory, or content streamed from disk / a generator).
        Parent directories are added with mode 0755; entries are sorted; mtime, uid and gid are
        fixed. The media type follows ``compression``: ``...layer.v1.tar``, ``+gzip``,
        ``+zstd``. The uncompressed digest (diff_id) is remembered for the image config.

        Layers with only in-memory content are built in memory; a layer with any streamed
        entry is itself streamed (built twice: once to hash, once to write).
        """
        if compression not in _LAYER_MEDIA_TYPES:
            raise ValueError(f"unknown compression: {compression!r}")
        media_type = _LAYER_MEDIA_TYPES[compression]
        members = _layer_members(files)
        mtime = self._mtime

        def tar() -> Iterator[bytes]:
            return _tar_stream(members, mtime)

        content_size = sum(m.size for m in members if m.type == tarfile.REGTYPE)
        streamed = content_size > _IN_MEMORY_LAYER_LIMIT or any(
            isinstance(v, LayerFile) and v.is_streamed for v in files.values()
        )
        raw_hasher = hashlib.sha256()
        if streamed:

            def tapped() -> Iterator[bytes]:
                for chunk in tar():
                    raw_hasher.update(chunk)
                    yield chunk

            def blob() -> Iterator[bytes]:
                return _compress(tar(), compression, level)

            info = digest_chunks(_compress(tapped(), compression, level))
            self._blobs.setdefault(info.digest, _StoredBlob(_StreamSource(blob), info.size))
            descriptor = Descriptor(media_type, info.digest, info.size, annotations)
        else:
            raw = b"".join(tar())
            raw_hasher.update(raw)
            data = b"".join(_compress((raw,), compression, level))
            descriptor = self.add_blob(data, media_type, annotations=annotations)
        self._diff_ids[descriptor.digest] = "sha256:" + raw_hasher.hexdigest()
        return descriptor

    def diff_id(self, layer: Descriptor) -> str:
        """The digest of a layer's uncompressed tar, as listed in ``rootfs.diff_ids``.

        Known for layers made by ``add_layer``; computed by decompressing for other stored
        blobs with a tar media type.
        """
        known = self._diff_ids.get(layer.digest)
        if known is not None:
            return known
        if layer.media_type in _UNCOMPRESSED_TARS:
            return layer.digest
        if layer.digest not in self._blobs:
            raise ValueError(
                f"layer {layer.digest} is not stored here; pass a config with rootfs instead"
            )
        chunks = _source_chunks(self._blobs[layer.digest].source)
        diff_id = digest_chunks(_decompressed(chunks, layer.media_type)).digest
        self._diff_ids[layer.digest] = diff_id
        return diff_id

    def add_image(
        self,
        layers: Sequence[Descriptor],
        *,
        config: Mapping[str, Any] | bytes | None = None,
        architecture: str = "amd64",
        os: str = "linux",
        variant: str | None = None,
        include_media_type: bool = True,
        docker: bool = False,
        subject: Descriptor | None = None,
        artifact_type: str | None = None,
        config_media_type: str | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Write a config blob and an image manifest referencing it and ``layers``.

        Image config (``config_media_type`` unset or an image config type): ``config`` is a
        mapping merged over defaults (``architecture``, ``os``, ``variant``, ``config: {}``,
        ``rootfs`` with the layers' diff_ids), so ``{"config": {"Cmd": ["sh"]}}`` is enough;
        raw ``bytes`` are written as given. The returned descriptor carries the platform
        (taken from the final config), ready for ``add_index``.

        Artifacts (OCI 1.1): a non-image ``config_media_type`` writes ``config`` (mapping or
        bytes; ``{}`` if None) as that type; ``artifact_type`` without ``config_media_type`` and
        without ``config`` uses the empty config (``application/vnd.oci.empty.v1+json``,
        ``{}``). ``subject`` makes the manifest a referrer of another manifest. Artifact
        descriptors carry ``artifact_type`` (or the config type) and no platform.

        ``include_media_type=False`` omits the manifest's ``mediaType`` field, as umoci does.
        ``docker=True`` writes Docker schema2 media types for manifest, config and
        gzip/uncompressed layers (Docker has no artifacts, so no subject/artifact_type then).

        The returned descriptor has no annotations; manifest ``annotations`` go in the manifest.
        """
        if docker and (subject is not None or artifact_type is not None):
            raise ValueError("Docker schema2 manifests have no subject or artifactType")
        image_config_type = MEDIA_TYPE_DOCKER_CONFIG if docker else MEDIA_TYPE_OCI_CONFIG
        if config_media_type is None:
            if artifact_type is not None and config is None:
                config_media_type = MEDIA_TYPE_OCI_EMPTY
            else:
                config_media_type = image_config_type
        is_image = config_media_type in _IMAGE_CONFIG_TYPES

        platform: Platform | None = None
        if is_image and not isinstance(config, bytes):
            merged = self._image_config(layers, config, architecture, os, variant)
            config_bytes = canonical_json(merged)
            platform = Platform(
                str(merged.get("architecture", architecture)),
                str(merged.get("os", os)),
                merged.get("variant"),
            )
        elif is_image:
            assert isinstance(config, bytes)
            config_bytes = config
            platform = Platform(architecture, os, variant)
        elif isinstance(config, bytes):
            config_bytes = config
        elif config is None:
            config_bytes = EMPTY_JSON
        else:
            config_bytes = canonical_json(dict(config))
        config_descriptor = self.add_blob(config_bytes, config_media_type)

        media_type = MEDIA_TYPE_DOCKER_MANIFEST if docker else MEDIA_TYPE_OCI_MANIFEST
        manifest: dict[str, Any] = {"schemaVersion": 2}
        if include_media_type:
            manifest["mediaType"] = media_type
        if artifact_type is not None:
            manifest["artifactType"] = artifact_type
        manifest["config"] = config_descriptor.to_json()
        manifest["layers"] = [
            self._docker_layer(layer).to_json() if docker else layer.to_json() for layer in layers
        ]
        if subject is not None:
            manifest["subject"] = subject.core().to_json()
        if annotations:
            manifest["annotations"] = dict(annotations)
        descriptor = self.add_json(manifest, media_type)
        if not is_image:
            return replace(descriptor, artifact_type=artifact_type or config_media_type)
        return replace(descriptor, platform=platform, artifact_type=artifact_type)

    def _image_config(
        self,
        layers: Sequence[Descriptor],
        config: Mapping[str, Any] | None,
        architecture: str,
        os_name: str,
        variant: str | None,
    ) -> dict[str, Any]:
        merged: dict[str, Any] = {"architecture": architecture, "os": os_name}
        if variant is not None:
            merged["variant"] = variant
        merged["config"] = {}
        user = dict(config or {})
        if "rootfs" not in user:
            merged["rootfs"] = {
                "type": "layers",
                "diff_ids": [self.diff_id(layer) for layer in layers],
            }
        merged.update(user)
        return merged

    @staticmethod
    def _docker_layer(layer: Descriptor) -> Descriptor:
        docker_type = _DOCKER_LAYER_TYPES.get(layer.media_type)
        return layer if docker_type is None else replace(layer, media_type=docker_type)

    def add_index(
        self,
        manifests: Sequence[Descriptor],
        *,
        docker: bool = False,
        annotations: Mapping[str, str] | None = None,
        include_media_type: bool = True,
        subject: Descriptor | None = None,
        artifact_type: str | None = None,
    ) -> Descriptor:
        """Write an image index (``docker=True``: a Docker manifest list) over ``manifests``.

        Children are listed with their platform, annotations and artifactType as carried by
        their descriptors (``add_image`` sets the platform). ``subject`` / ``artifact_type``
        are OCI 1.1 index fields; ``include_media_type=False`` omits ``mediaType``.
        """
        if docker and (subject is not None or artifact_type is not None):
            raise ValueError("Docker manifest lists have no subject or artifactType")
        media_type = MEDIA_TYPE_DOCKER_MANIFEST_LIST if docker else MEDIA_TYPE_OCI_INDEX
        index: dict[str, Any] = {"schemaVersion": 2}
        if include_media_type:
            index["mediaType"] = media_type
        if artifact_type is not None:
            index["artifactType"] = artifact_type
        index["manifests"] = [m.to_json() for m in manifests]
        if subject is not None:
            index["subject"] = subject.core().to_json()
        if annotations:
            index["annotations"] = dict(annotations)
        descriptor = self.add_json(index, media_type)
        return replace(descriptor, artifact_type=artifact_type)

    # ---- index.json ----------------------------------------------------------------------

    def tag(
        self,
        descriptor: Descriptor,
        ref_name: str | None,
        *,
        containerd_name: str | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Add an entry for ``descriptor`` to the top-level ``index.json``.

        ``ref_name`` becomes ``org.opencontainers.image.ref.name``: a bare tag (``"1.0"``) or a
        full reference (``"example.com/team/app:1.0"``), or None for an untagged entry.
        ``containerd_name`` adds ``io.containerd.image.name`` (as ``ctr export`` writes).
        The same descriptor may be tagged any number of times; entries keep their order.
        Returns the entry as written.
        """
        merged = dict(descriptor.annotations or {})
        merged.update(annotations or {})
        if containerd_name is not None:
            merged[ANNOTATION_CONTAINERD_NAME] = containerd_name
        if ref_name is not None:
            merged[ANNOTATION_REF_NAME] = ref_name
        entry = replace(descriptor, annotations=merged or None)
        self._entries.append(entry)
        return entry

    @property
    def entries(self) -> tuple[Descriptor, ...]:
        """The ``index.json`` entries added so far, in order."""
        return tuple(self._entries)

    def index_json(self) -> dict[str, Any]:
        """The top-level ``index.json`` document."""
        index: dict[str, Any] = {"schemaVersion": 2}
        if self._index_media_type:
            index["mediaType"] = MEDIA_TYPE_OCI_INDEX
        index["manifests"] = [entry.to_json() for entry in self._entries]
        return index

    def index_bytes(self) -> bytes:
        """``index.json`` as written."""
        return canonical_json(self.index_json())

    @staticmethod
    def oci_layout_bytes() -> bytes:
        """The ``oci-layout`` marker file as written."""
        return canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION})

    # ---- output --------------------------------------------------------------------------

    def _blob_chunks(self, digest: str) -> Iterator[bytes]:
        """A blob's bytes; file- and generator-backed blobs are re-hashed on the way."""
        stored = self._blobs[digest]
        if isinstance(stored.source, _BytesSource):
            yield stored.source.data
            return
        hasher = hashlib.sha256()
        size = 0
        for chunk in _source_chunks(stored.source):
            hasher.update(chunk)
            size += len(chunk)
            yield chunk
        if "sha256:" + hasher.hexdigest() != digest or size != stored.size:
            raise BlobChangedError(f"blob {digest} changed since it was added")

    def _archive_members(
        self, prefix: str, blobs_first: bool, include_directories: bool
    ) -> list[_TarMember]:
        def small(name: str, data: bytes) -> _TarMember:
            return _TarMember(
                prefix + name, tarfile.REGTYPE, 0o644, len(data), chunks=lambda: (data,)
            )

        def directory(name: str) -> _TarMember:
            return _TarMember(name, tarfile.DIRTYPE, 0o755)

        def blob(digest: str) -> _TarMember:
            algorithm, _, encoded = digest.partition(":")
            return _TarMember(
                f"{prefix}blobs/{algorithm}/{encoded}",
                tarfile.REGTYPE,
                0o644,
                self._blobs[digest].size,
                chunks=lambda: self._blob_chunks(digest),
            )

        head: list[_TarMember] = []
        blobs: list[_TarMember] = []
        if include_directories:
            parts = prefix.rstrip("/").split("/") if prefix else []
            head = [directory("/".join(parts[: i + 1]) + "/") for i in range(len(parts))]
            algorithms = sorted({d.partition(":")[0] for d in self._blobs})
            blobs.append(directory(f"{prefix}blobs/"))
            blobs.extend(directory(f"{prefix}blobs/{a}/") for a in algorithms)
        blobs.extend(blob(d) for d in self.digests())
        index = small("index.json", self.index_bytes())
        layout = small("oci-layout", self.oci_layout_bytes())
        if blobs_first:
            return [*head, *blobs, index, layout]
        return [*head, layout, index, *blobs]

    def write_archive(
        self,
        path: str | os.PathLike[str],
        compression: Compression = "none",
        *,
        member_prefix: str = "",
        blobs_first: bool = True,
        include_directories: bool = True,
        level: int | None = None,
    ) -> Path:
        """Write the layout as a tar archive (an ``.oci`` file), atomically.

        Members: ``blobs/``, ``blobs/sha256/``, each blob (sorted by digest), ``index.json``,
        ``oci-layout`` (the order skopeo's directory walk gives) when ``blobs_first``; else
        ``oci-layout``, ``index.json`` and then the blobs. ``member_prefix`` such as ``"./"``
        mimics ``tar -C dir -cf x.tar .``; ``include_directories=False`` leaves out directory
        entries. ``compression`` wraps the whole tar in gzip or zstd. Large blobs are streamed
        from their files or generators. The archive goes to a hidden temp file in the target
        directory first and is renamed into place, so readers never see a partial file.
        """
        if member_prefix and (
            not member_prefix.endswith("/")
            or member_prefix.startswith("/")
            or ".." in member_prefix.split("/")
        ):
            raise ValueError(f"member_prefix must be relative and end with '/': {member_prefix!r}")
        target = Path(path)
        members = self._archive_members(member_prefix, blobs_first, include_directories)
        _atomic_write(target, _compress(_tar_stream(members, self._mtime), compression, level))
        return target

    def write_directory(self, path: str | os.PathLike[str]) -> Path:
        """Write the layout as a directory (``oci-layout``, ``index.json``, ``blobs/...``).

        Writes into an existing directory too, each file atomically, ``index.json`` last so a
        concurrent reader never sees an index pointing at missing blobs. Blobs already there
        that this writer does not know are left alone.
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        for digest in self.digests():
            algorithm, _, encoded = digest.partition(":")
            _atomic_write(root / "blobs" / algorithm / encoded, self._blob_chunks(digest))
        _atomic_write(root / "oci-layout", (self.oci_layout_bytes(),))
        _atomic_write(root / "index.json", (self.index_bytes(),))
        return root
