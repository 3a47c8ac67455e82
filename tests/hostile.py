"""Broken and hostile image archives, written with ``tarfile`` directly, and the HTTP helpers
the reliability tests share (issue 6).

The layout writer refuses to produce broken archives, so this module writes tar streams
header by header: every member's header comes from ``tarfile.TarInfo.tobuf`` and its data,
padding and the end-of-archive blocks are written here, which lets a header lie about its
size, a member be a link or a FIFO, a name be non-UTF-8, or the file stop in the middle of a
header. The blobs themselves (layers, configs, manifests) come from the project's
``LayoutWriter``, so every archive starts from a valid image and breaks one thing.

:func:`write_hostile` puts every case of :data:`CASES` under an image directory; each case says
which request must fail, with which status and error code, and which words the server's log
line about the file must contain.

The HTTP helpers speak HTTP/1.1 over plain sockets (``raw_request``) so that paths reach the
server exactly as written, or through ``http.client`` for ordinary pulls (:func:`pull`, which
checks every manifest and blob against its digest).
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import random
import re
import socket
import tarfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import zstandard

from simple_oci_registry.layoutwriter import LayoutWriter

__all__ = [
    "CASES",
    "Entry",
    "Hostile",
    "Reply",
    "base_image",
    "error_codes",
    "fetch",
    "log_lines_naming",
    "pull",
    "pull_all",
    "raw_request",
    "sha256",
    "write_hostile",
    "write_tar",
]

BLOCK: Final = 512
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
ACCEPT: Final = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST,
                           "application/vnd.docker.distribution.manifest.v2+json"])


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------ tar writing


@dataclass(frozen=True, slots=True)
class Entry:
    """One tar member as this module writes it.

    ``name`` may be ``bytes`` (written as is, e.g. not UTF-8); ``declared`` overrides the size
    in the header (a lying header) while ``data`` is what actually follows it.
    """

    name: str | bytes
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    declared: int | None = None


@dataclass(frozen=True, slots=True)
class Written:
    """Where :func:`write_tar` put a member: its header and its data."""

    header: int
    data: int
    size: int


def _header(entry: Entry) -> bytes:
    name = entry.name if isinstance(entry.name, str) else entry.name.decode(
        "utf-8", "surrogateescape")
    info = tarfile.TarInfo(name)
    info.type = entry.type
    info.mode = 0o644
    info.mtime = 0
    info.linkname = entry.linkname
    info.size = entry.declared if entry.declared is not None else (
        len(entry.data) if entry.type == tarfile.REGTYPE else 0)
    # GNU format keeps names and sizes in the one 512-byte header (no PAX records), so the
    # byte positions this module reports are exactly where tarfile will look.
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def tar_bytes(entries: Iterable[Entry]) -> tuple[bytes, dict[str | bytes, Written]]:
    """A tar of ``entries`` in memory, with the position of every member."""
    out = bytearray()
    where: dict[str | bytes, Written] = {}
    for entry in entries:
        header = _header(entry)
        start = len(out)
        out += header
        where[entry.name] = Written(start, len(out), len(entry.data))
        out += entry.data
        out += bytes(-len(entry.data) % BLOCK)
    out += bytes(2 * BLOCK)
    return bytes(out), where


def write_tar(path: Path, entries: Iterable[Entry], *, cut: int | None = None
              ) -> dict[str | bytes, Written]:
    """Write a tar of ``entries`` to ``path`` (keeping only ``cut`` bytes when given)."""
    data, where = tar_bytes(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if cut is None else data[:cut])
    return where


# ------------------------------------------------------------------------------ a valid image


@dataclass(frozen=True, slots=True)
class Image:
    """A small valid single-layer image, as blobs, ready to be put in a tar in any order."""

    layer: bytes
    config: bytes
    manifest: bytes
    index: bytes
    layout: bytes = b'{"imageLayoutVersion":"1.0.0"}'

    @property
    def layer_digest(self) -> str:
        return sha256(self.layer)

    @property
    def config_digest(self) -> str:
        return sha256(self.config)

    @property
    def manifest_digest(self) -> str:
        return sha256(self.manifest)

    def blob_name(self, data: bytes) -> str:
        return "blobs/sha256/" + hashlib.sha256(data).hexdigest()

    def entries(self, *, blobs_first: bool = False) -> list[Entry]:
        """oci-layout, index.json, manifest, config, layer (or the blobs first)."""
        top = [Entry("oci-layout", self.layout), Entry("index.json", self.index)]
        blobs = [Entry(self.blob_name(b), b) for b in (self.manifest, self.config, self.layer)]
        return blobs + top if blobs_first else top + blobs

    def with_manifest(self, manifest: bytes) -> Image:
        """The same image with other manifest bytes, index.json pointing at them."""
        index = json.loads(self.index)
        index["manifests"][0]["digest"] = sha256(manifest)
        index["manifests"][0]["size"] = len(manifest)
        return replace(self, manifest=manifest, index=json.dumps(index).encode())


def base_image(text: str, *, layer_size: int = 48 * 1024, tag: str = "1.0") -> Image:
    """An image whose layer is ``layer_size`` pseudo-random bytes seeded by ``text``."""
    layer = random.Random(text).randbytes(layer_size)
    writer = LayoutWriter()
    layer_desc = writer.add_blob(layer, "application/vnd.oci.image.layer.v1.tar")
    image = writer.add_image([layer_desc], config={"config": {"Cmd": ["/bin/true"]}})
    writer.tag(image, tag)
    config_digest = writer.blob_json(image.digest)["config"]["digest"]
    return Image(layer, writer.blob_bytes(config_digest), writer.blob_bytes(image.digest),
                 writer.index_bytes())


# ------------------------------------------------------------------------------ the cases


@dataclass(frozen=True, slots=True)
class Hostile:
    """One broken archive: where it goes, what a pull of it must get, what the log says.

    ``probe`` is the request that must fail: ``manifest`` (GET/HEAD of ``name:tag``) or
    ``layer`` (the manifest is fine, GET/HEAD of the layer blob must be refused). ``reason`` is
    a regular expression the server's log line naming ``relpath`` must match. A case with
    ``servable`` set is tolerated damage: the image must pull intact.
    """

    key: str
    description: str
    build: Callable[[Path], None] = field(compare=False)
    probe: str = "manifest"
    status: int = 404
    codes: tuple[str, ...] = ("MANIFEST_UNKNOWN",)
    reason: str = ""
    servable: bool = False
    layer_digest: str | None = None
    kind: str = "file"  # "file" or "directory"

    @property
    def name(self) -> str:
        return "bad-" + self.key

    @property
    def relpath(self) -> str:
        return f"{self.name}/1.0.oci"


CASES: list[Hostile] = []


def _case(key: str, description: str, *, reason: str, probe: str = "manifest",
          codes: tuple[str, ...] = ("MANIFEST_UNKNOWN",), servable: bool = False,
          layer_of: Image | None = None, kind: str = "file"
          ) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    def register(build: Callable[[Path], None]) -> Callable[[Path], None]:
        CASES.append(Hostile(key, description, build, probe, 404 if not servable else 200,
                             codes, reason, servable,
                             layer_of.layer_digest if layer_of is not None else None, kind))
        return build
    return register


_IMG = base_image("hostile")
_BIG_LAYER_IMG = base_image("hostile-big", layer_size=256 * 1024)


@_case("truncated-mid-blob", "the file ends in the middle of the layer's data",
       reason=r"past the end|unexpected end|truncat")
def _truncated_mid_blob(path: Path) -> None:
    entries = _BIG_LAYER_IMG.entries()
    where = tar_bytes(entries)[1]
    layer = where[_BIG_LAYER_IMG.blob_name(_BIG_LAYER_IMG.layer)]
    write_tar(path, entries, cut=layer.data + layer.size // 2)


@_case("truncated-mid-header", "the file ends in the middle of the layer's tar header",
       reason=r"missing|unexpected end|truncat|unreadable")
def _truncated_mid_header(path: Path) -> None:
    entries = _IMG.entries()
    where = tar_bytes(entries)[1]
    write_tar(path, entries, cut=where[_IMG.blob_name(_IMG.layer)].header + 300)


@_case("truncated-in-index", "blobs first, then the file ends inside index.json",
       reason=r"past the end|unexpected end|truncat|missing|unreadable")
def _truncated_in_index(path: Path) -> None:
    entries = _IMG.entries(blobs_first=True)
    where = tar_bytes(entries)[1]
    write_tar(path, entries, cut=where["index.json"].data + 20)


@_case("size-lie-past-end", "the last member's header claims 1 MiB more than the file holds",
       reason=r"past the end|unexpected end|truncat")
def _size_lie_past_end(path: Path) -> None:
    entries = _IMG.entries()
    entries[-1] = replace(entries[-1], declared=len(_IMG.layer) + (1 << 20))
    write_tar(path, entries)


@_case("size-lie-swallows-next", "the layer's header claims more bytes, swallowing index.json",
       reason=r"missing|past the end|unexpected end|unreadable|invalid")
def _size_lie_swallows(path: Path) -> None:
    layer = Entry(_IMG.blob_name(_IMG.layer), _IMG.layer,
                  declared=len(_IMG.layer) + 3 * BLOCK)
    write_tar(path, [Entry(_IMG.blob_name(_IMG.manifest), _IMG.manifest),
                     Entry(_IMG.blob_name(_IMG.config), _IMG.config), layer,
                     Entry("index.json", _IMG.index), Entry("oci-layout", _IMG.layout)])


@_case("size-negative", "the manifest's header gives a negative size (GNU base-256 field)",
       reason=r"size|unreadable|invalid|negative")
def _size_negative(path: Path) -> None:
    entries = _IMG.entries()
    entries[2] = replace(entries[2], declared=-4096)
    write_tar(path, entries)


@_case("size-exabyte", "the config's header claims 2**60 bytes (an impossible size)",
       reason=r"size|past the end|unreadable|impossible|unexpected end")
def _size_exabyte(path: Path) -> None:
    entries = _IMG.entries()
    entries[3] = replace(entries[3], declared=1 << 60)
    write_tar(path, entries)


@_case("size-lie-short", "the layer's header claims 700 bytes fewer than follow it",
       probe="layer", codes=("BLOB_UNKNOWN",), reason=r"does not match", layer_of=_IMG)
def _size_lie_short(path: Path) -> None:
    entries = _IMG.entries()
    entries[-1] = replace(entries[-1], declared=len(_IMG.layer) - 700)
    write_tar(path, entries)


@_case("missing-manifest", "index.json points at a manifest that is not in the archive",
       reason=r"missing")
def _missing_manifest(path: Path) -> None:
    write_tar(path, [e for e in _IMG.entries() if e.data != _IMG.manifest])


@_case("missing-layer", "the manifest's layer is not in the archive", reason=r"missing")
def _missing_layer(path: Path) -> None:
    write_tar(path, [e for e in _IMG.entries() if e.data != _IMG.layer])


@_case("missing-config", "the manifest's config is not in the archive", reason=r"missing")
def _missing_config(path: Path) -> None:
    write_tar(path, [e for e in _IMG.entries() if e.data != _IMG.config])


@_case("layer-digest-mismatch", "one byte of the layer flipped (same size)", probe="layer",
       codes=("BLOB_UNKNOWN",), reason=r"does not match", layer_of=_IMG)
def _layer_mismatch(path: Path) -> None:
    bad = bytearray(_IMG.layer)
    bad[len(bad) // 2] ^= 0xFF
    write_tar(path, [e if e.data != _IMG.layer else replace(e, data=bytes(bad))
                     for e in _IMG.entries()])


@_case("manifest-digest-mismatch", "the manifest's bytes do not hash to its name",
       reason=r"does not match")
def _manifest_mismatch(path: Path) -> None:
    bad = _IMG.manifest.replace(b'"schemaVersion":2', b'"schemaVersion":3')
    assert bad != _IMG.manifest
    write_tar(path, [e if e.data != _IMG.manifest else replace(e, data=bad)
                     for e in _IMG.entries()])


@_case("manifest-size-mismatch", "index.json's descriptor gives the manifest a wrong size",
       reason=r"descriptor says|size")
def _manifest_size_mismatch(path: Path) -> None:
    index = json.loads(_IMG.index)
    index["manifests"][0]["size"] += 1
    write_tar(path, [e if e.name != "index.json" else replace(e, data=json.dumps(index).encode())
                     for e in _IMG.entries()])


@_case("symlink-blob", "the layer member is a symlink to /etc/passwd", reason=r"symbolic link")
def _symlink_blob(path: Path) -> None:
    write_tar(path, [e if e.data != _IMG.layer else
                     Entry(e.name, type=tarfile.SYMTYPE, linkname="/etc/passwd")
                     for e in _IMG.entries()])


@_case("symlink-index", "index.json is a symlink to ../../../../etc/passwd",
       reason=r"symbolic link")
def _symlink_index(path: Path) -> None:
    write_tar(path, [e if e.name != "index.json" else
                     Entry("index.json", type=tarfile.SYMTYPE,
                           linkname="../../../../etc/passwd")
                     for e in _IMG.entries()])


@_case("hardlink-blob", "the layer member is a hard link to index.json", reason=r"hard link")
def _hardlink_blob(path: Path) -> None:
    write_tar(path, [e if e.data != _IMG.layer else
                     Entry(e.name, type=tarfile.LNKTYPE, linkname="index.json")
                     for e in _IMG.entries()])


@_case("fifo-member", "the layer member is a FIFO", reason=r"special file|not a regular")
def _fifo_member(path: Path) -> None:
    write_tar(path, [e if e.data != _IMG.layer else Entry(e.name, type=tarfile.FIFOTYPE)
                     for e in _IMG.entries()])


@_case("directory-member", "the layer member is a directory", reason=r"directory")
def _directory_member(path: Path) -> None:
    write_tar(path, [e if e.data != _IMG.layer else Entry(e.name, type=tarfile.DIRTYPE)
                     for e in _IMG.entries()])


@_case("duplicate-index", "two index.json members, the second pointing elsewhere",
       reason=r"duplicate")
def _duplicate_index(path: Path) -> None:
    other = base_image("hostile-other")
    write_tar(path, [*_IMG.entries(), *other.entries()[1:]])


@_case("duplicate-blob", "the layer twice: the good bytes, then other bytes",
       reason=r"duplicate")
def _duplicate_blob(path: Path) -> None:
    entries = _IMG.entries()
    write_tar(path, [*entries, Entry(entries[-1].name, b"x" * len(_IMG.layer))])


@_case("duplicate-dot-slash", "index.json and ./index.json", reason=r"duplicate")
def _duplicate_dot_slash(path: Path) -> None:
    write_tar(path, [*_IMG.entries(), Entry("./index.json", b'{"manifests":[]}')])


@_case("index-not-json", "index.json is not JSON", reason=r"JSON")
def _index_not_json(path: Path) -> None:
    write_tar(path, [e if e.name != "index.json" else replace(e, data=b"{this is not json")
                     for e in _IMG.entries()])


@_case("index-not-object", "index.json is a JSON array", reason=r"JSON object")
def _index_not_object(path: Path) -> None:
    write_tar(path, [e if e.name != "index.json" else replace(e, data=b"[1, 2, 3]")
                     for e in _IMG.entries()])


@_case("index-no-manifests", "index.json's manifests is a string",
       reason=r"manifests")
def _index_no_manifests(path: Path) -> None:
    write_tar(path, [e if e.name != "index.json" else
                     replace(e, data=b'{"schemaVersion":2,"manifests":"sha256:x"}')
                     for e in _IMG.entries()])


@_case("huge-index", "index.json of 10 MB (valid JSON)", reason=r"limit|too large|bytes")
def _huge_index(path: Path) -> None:
    index = json.loads(_IMG.index)
    index["annotations"] = {"padding": "x" * (10 * 1000 * 1000)}
    write_tar(path, [e if e.name != "index.json" else replace(e, data=json.dumps(index).encode())
                     for e in _IMG.entries()])


@_case("huge-manifest", "a 5 MiB manifest that matches its digest",
       reason=r"limit|too large|bytes")
def _huge_manifest(path: Path) -> None:
    manifest = json.loads(_IMG.manifest)
    manifest["annotations"] = {"padding": "y" * (5 << 20)}
    image = _IMG.with_manifest(json.dumps(manifest).encode())
    write_tar(path, image.entries())


@_case("deep-nesting-manifest", "the manifest is '[' x 100000 (with its right digest)",
       reason=r"JSON|recursion|depth|nest")
def _deep_manifest(path: Path) -> None:
    write_tar(path, _IMG.with_manifest(b"[" * 100_000).entries())


@_case("deep-nesting-index", "index.json is '{\"a\":' x 100000", reason=r"JSON|recursion|nest")
def _deep_index(path: Path) -> None:
    write_tar(path, [e if e.name != "index.json" else replace(e, data=b'{"a":' * 100_000)
                     for e in _IMG.entries()])


@_case("invalid-layer-digest", "the manifest's layer digest is 'sha256:../../../etc/passwd'",
       reason=r"invalid digest|digest")
def _invalid_layer_digest(path: Path) -> None:
    manifest = json.loads(_IMG.manifest)
    manifest["layers"][0]["digest"] = "sha256:../../../etc/passwd"
    write_tar(path, _IMG.with_manifest(json.dumps(manifest).encode()).entries())


@_case("unsupported-media-type", "the manifest's mediaType is application/x-evil",
       reason=r"media type")
def _unsupported_media_type(path: Path) -> None:
    manifest = json.loads(_IMG.manifest)
    manifest["mediaType"] = "application/x-evil"
    write_tar(path, _IMG.with_manifest(json.dumps(manifest).encode()).entries())


@_case("layout-version-2", "oci-layout says imageLayoutVersion 2.0.0",
       reason=r"imageLayoutVersion")
def _layout_v2(path: Path) -> None:
    write_tar(path, [e if e.name != "oci-layout" else
                     replace(e, data=b'{"imageLayoutVersion":"2.0.0"}') for e in _IMG.entries()])


@_case("layout-not-json", "oci-layout is not JSON", reason=r"oci-layout")
def _layout_not_json(path: Path) -> None:
    write_tar(path, [e if e.name != "oci-layout" else replace(e, data=b"\x00\xff garbage")
                     for e in _IMG.entries()])


@_case("non-utf8-names", "every layout member's name ends in byte 0xff",
       reason=r"index\.json is missing|missing")
def _non_utf8_names(path: Path) -> None:
    write_tar(path, [replace(e, name=str(e.name).encode() + b"\xff") for e in _IMG.entries()])


@_case("non-utf8-extras", "a valid layout plus members with non-UTF-8 names (tolerated)",
       reason="", servable=True, codes=())
def _non_utf8_extras(path: Path) -> None:
    write_tar(path, [Entry(b"\xff\xfe junk \xc3\x28", b"junk"),
                     Entry(b"blobs/sha256/\xe9\xe9", b"more junk"),
                     *_IMG.entries()])


@_case("traversal-members", "layout members named ../index.json, /oci-layout, ../../blobs/…",
       reason=r"missing")
def _traversal_members(path: Path) -> None:
    prefixes = ["/", "../", "../../", "/../"]
    write_tar(path, [replace(e, name=prefixes[i % len(prefixes)] + str(e.name))
                     for i, e in enumerate(_IMG.entries())])


@_case("ustar-garbage", "random bytes with 'ustar' at offset 257 (a bad header checksum)",
       reason=r"unreadable|tar|checksum|header")
def _ustar_garbage(path: Path) -> None:
    data = bytearray(random.Random(7).randbytes(8192))
    data[257:263] = b"ustar\x00"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))


@_case("gzip-bomb", "gzip: a 1 GiB layer of zeros compressing to about 1 MB",
       reason=r"expansion|bomb|limit")
def _gzip_bomb(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_gzip_bomb_bytes())


@_case("zstd-bomb", "zstd: a 1 GiB layer of zeros compressing to about 40 KB",
       reason=r"expansion|bomb|limit")
def _zstd_bomb(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_zstd_bomb_bytes())


@_case("gzip-truncated", "a gzip-compressed archive cut in half",
       reason=r"unreadable|ended|truncat|end")
def _gzip_truncated(path: Path) -> None:
    data = zlib.compress(tar_bytes(_BIG_LAYER_IMG.entries())[0], 6, wbits=31)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])


@_case("gzip-corrupt", "a gzip-compressed archive with garbage in the middle of its stream",
       reason=r"unreadable|invalid|corrupt|error|CRC")
def _gzip_corrupt(path: Path) -> None:
    # Compressible text, so the deflate stream is made of Huffman blocks: garbage in the middle
    # breaks the decoder itself (zlib.error), not only the CRC at the end.
    text = ("".join(f"line {i} of a compressible layer\n" for i in range(20_000))).encode()
    image = base_image("hostile-gzip")
    image = replace(image, layer=text)
    manifest = json.loads(image.manifest)
    manifest["layers"][0]["digest"] = sha256(text)
    manifest["layers"][0]["size"] = len(text)
    image = image.with_manifest(json.dumps(manifest).encode())
    # The layer first and big, so the damage sits inside it, past the first headers.
    entries = [Entry(image.blob_name(text), text), *image.entries()[:-1]]
    data = bytearray(zlib.compress(tar_bytes(entries)[0], 6, wbits=31))
    middle = len(data) // 3
    data[middle: middle + 64] = random.Random(3).randbytes(64)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))


@_case("zstd-garbage", "zstd magic followed by garbage", reason=r"unreadable|zstd|error")
def _zstd_garbage(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x28\xb5\x2f\xfd" + random.Random(5).randbytes(4096))


@_case("empty-file", "an empty file", reason=r"not a tar|empty")
def _empty(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


@_case("random-bytes", "64 KiB of random bytes named .oci", reason=r"not a tar")
def _random_bytes(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(11).randbytes(64 * 1024))


@_case("dir-without-index", "a directory named 1.0.oci with oci-layout and blobs, no index.json",
       reason=r"index\.json is missing|missing", kind="directory")
def _dir_without_index(path: Path) -> None:
    _write_layout_dir(path, _IMG)
    (path / "index.json").unlink()


@_case("dir-symlinked-blob", "a layout directory whose layer file is a symlink to /etc/passwd",
       reason=r"not a regular file|symbolic", kind="directory")
def _dir_symlinked_blob(path: Path) -> None:
    _write_layout_dir(path, _IMG)
    layer = path / _IMG.blob_name(_IMG.layer)
    layer.unlink()
    layer.symlink_to("/etc/passwd")


@_case("dir-symlinked-index", "a layout directory whose index.json is a symlink outside it",
       reason=r"not a regular file|symbolic", kind="directory")
def _dir_symlinked_index(path: Path) -> None:
    _write_layout_dir(path, _IMG)
    (path / "index.json").unlink()
    outside = path.parent.parent.parent / "outside-index.json"
    outside.write_bytes(_IMG.index)
    (path / "index.json").symlink_to(outside)


def _write_layout_dir(path: Path, image: Image) -> None:
    path.mkdir(parents=True)
    for entry in image.entries():
        target = path / str(entry.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(entry.data)


# Everything after the bomb member's header is zeros (its data, then the end of the archive),
# so the compressed stream repeats one independently compressed block of zeros.
_BOMB_SIZE: Final = 1 << 30
_ZEROS: Final = bytes(1 << 20)


def _bomb_prefix() -> tuple[bytes, Image]:
    zero_digest = "sha256:" + _zeros_sha256()
    image = base_image("hostile-bomb")
    manifest = json.loads(image.manifest)
    manifest["layers"][0].update(digest=zero_digest, size=_BOMB_SIZE)
    image = image.with_manifest(json.dumps(manifest).encode())
    head = [e for e in image.entries() if e.data != image.layer]
    header = _header(Entry("blobs/sha256/" + zero_digest.partition(":")[2],
                           declared=_BOMB_SIZE))
    prefix = tar_bytes(head)[0][: -2 * BLOCK] + header
    return prefix, image


@functools.cache
def _zeros_sha256() -> str:
    hasher = hashlib.sha256()
    for _ in range(_BOMB_SIZE // len(_ZEROS)):
        hasher.update(_ZEROS)
    return hasher.hexdigest()


@functools.cache
def _gzip_bomb_bytes() -> bytes:
    prefix, _ = _bomb_prefix()
    tail = bytes(2 * BLOCK)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff",
             compressor.compress(prefix), compressor.flush(zlib.Z_FULL_FLUSH)]
    block = compressor.compress(_ZEROS) + compressor.flush(zlib.Z_FULL_FLUSH)
    # After a full flush the compressor starts afresh, so the same input gives the same block.
    again = compressor.compress(_ZEROS) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert again == block
    parts += [block] * (_BOMB_SIZE // len(_ZEROS))
    parts += [compressor.compress(tail), compressor.flush(zlib.Z_FINISH)]
    crc = zlib.crc32(prefix)
    for _ in range(_BOMB_SIZE // len(_ZEROS)):
        crc = zlib.crc32(_ZEROS, crc)
    crc = zlib.crc32(tail, crc)
    total = len(prefix) + _BOMB_SIZE + len(tail)
    parts.append(crc.to_bytes(4, "little") + (total & 0xFFFFFFFF).to_bytes(4, "little"))
    return b"".join(parts)


@functools.cache
def _zstd_bomb_bytes() -> bytes:
    prefix, _ = _bomb_prefix()
    compressor = zstandard.ZstdCompressor(level=3).compressobj()
    parts = [compressor.compress(prefix)]
    parts += [compressor.compress(_ZEROS) for _ in range(_BOMB_SIZE // len(_ZEROS))]
    parts += [compressor.compress(bytes(2 * BLOCK)), compressor.flush()]
    return b"".join(parts)


def write_hostile(root: Path, cases: Sequence[Hostile] = CASES) -> list[Hostile]:
    """Write every case under ``root`` (``bad-<key>/1.0.oci``); returns the cases written."""
    for case in cases:
        case.build(root / case.relpath)
    return list(cases)


# ------------------------------------------------------------------------------ HTTP


@dataclass(frozen=True, slots=True)
class Reply:
    """A response as received: status, headers (names lower-cased), the whole body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _address(url: str) -> tuple[str, int]:
    host, _, port = url.split("://", 1)[1].rstrip("/").rpartition(":")
    return host, int(port)


def fetch(url: str, path: str, *, method: str = "GET", headers: dict[str, str] | None = None,
          timeout: float = 30.0) -> Reply:
    """One request with ``http.client`` (it sends ``path`` unmodified)."""
    host, port = _address(url)
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
    finally:
        connection.close()


def raw_request(url: str, request: bytes, *, timeout: float = 30.0) -> Reply:
    """Send ``request`` bytes as they are and read the response until the server closes.

    The request should carry ``Connection: close``. Bodies are framed by Content-Length when
    present (HEAD responses carry one but no body), else read to the end.
    """
    host, port = _address(url)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request)
        data = bytearray()
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    match = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    assert match is not None, f"not an HTTP response: {bytes(data)[:200]!r}"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    is_head = request.split(b" ", 1)[0] == b"HEAD"
    if is_head:
        body = b""
    elif "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return Reply(int(match.group(1)), headers, body)


def raw_get(url: str, target: str, *, method: str = "GET", timeout: float = 30.0) -> Reply:
    """``METHOD target HTTP/1.1`` with the target byte for byte as given."""
    request = (f"{method} {target} HTTP/1.1\r\nHost: registry\r\nAccept: {ACCEPT}\r\n"
               "Connection: close\r\n\r\n").encode("utf-8", "surrogateescape")
    return raw_request(url, request, timeout=timeout)


def error_codes(reply: Reply) -> list[str]:
    """The codes of a spec error envelope ``{"errors":[{"code","message",…}]}`` (asserted)."""
    assert reply.headers.get("content-type", "").startswith("application/json"), reply
    document = reply.json()
    assert isinstance(document, dict) and isinstance(document.get("errors"), list), document
    assert document["errors"], document
    codes: list[str] = []
    for error in document["errors"]:
        assert isinstance(error, dict) and isinstance(error.get("code"), str), document
        assert isinstance(error.get("message"), str), document
        codes.append(error["code"])
    return codes


@dataclass(slots=True)
class Pulled:
    """What :func:`pull` fetched: every manifest and blob digest, and the bytes received."""

    manifests: list[str] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)
    bytes: int = 0


def pull(url: str, name: str, reference: str, *, timeout: float = 60.0) -> Pulled:
    """Pull ``name:reference`` like a client: the manifest (and an index's children), then
    every config and layer, each checked against its digest. Asserts on any failure."""
    host, port = _address(url)
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    pulled = Pulled()

    def get(path: str) -> tuple[http.client.HTTPResponse, bytes]:
        connection.request("GET", path, headers={"Accept": ACCEPT})
        response = connection.getresponse()
        return response, response.read()

    def manifest(reference: str) -> None:
        response, body = get(f"/v2/{name}/manifests/{reference}")
        assert response.status == 200, (name, reference, response.status, body[:300])
        digest = response.getheader("Docker-Content-Digest")
        assert digest == sha256(body), (name, reference, digest)
        if reference.startswith("sha256:"):
            assert digest == reference
        pulled.manifests.append(digest)
        pulled.bytes += len(body)
        document = json.loads(body)
        if "manifests" in document:
            for child in document["manifests"]:
                manifest(child["digest"])
            return
        for descriptor in [document["config"], *document["layers"]]:
            blob_response, blob = get(f"/v2/{name}/blobs/{descriptor['digest']}")
            assert blob_response.status == 200, (name, descriptor, blob_response.status)
            assert sha256(blob) == descriptor["digest"], (name, descriptor["digest"])
            assert len(blob) == descriptor["size"]
            pulled.blobs.append(descriptor["digest"])
            pulled.bytes += len(blob)

    try:
        manifest(reference)
    finally:
        connection.close()
    return pulled


def pull_all(url: str, references: Iterable[str]) -> int:
    """Pull every ``name:tag``; returns the number of manifests and blobs checked."""
    checked = 0
    for reference in references:
        name, _, tag = reference.rpartition(":")
        pulled = pull(url, name, tag)
        checked += len(pulled.manifests) + len(pulled.blobs)
    return checked


def log_lines_naming(log: str, needle: str) -> list[str]:
    """Lines of the server log that mention ``needle``, except access-log lines."""
    return [line for line in log.splitlines()
            if needle in line and "simple_oci_registry.access" not in line]


def file_size(path: Path) -> int:
    return os.stat(path).st_size
