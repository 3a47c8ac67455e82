"""Byte windows inside image archives (archive.py): plain, compressed, directories, hostile."""

from __future__ import annotations

import functools
import gzip
import io
import os
import random
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import simple_oci_registry.archive as archive_module
from simple_oci_registry.archive import (
    GZIP,
    HEAD_BYTES,
    ZLIB_GZIP,
    ArchiveError,
    ArchiveKind,
    ArchiveLimits,
    GzipInflater,
    StaleArchiveError,
    detect_kind,
    open_archive,
    sniff,
)
from simple_oci_registry.blobcache import BlobCache
from simple_oci_registry.layout import load_layout
from simple_oci_registry.layoutwriter import LayoutWriter
from tests.images import small_image

HEX = "ab" * 32


@pytest.fixture(params=["fastest", "zlib"])
def inflater(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> GzipInflater:
    """Run a gzip test with each inflater: the one the registry uses (ISA-L where the wheel is
    installed) and zlib, the fallback where it is not. Both must give the same answers."""
    chosen = GZIP if request.param == "fastest" else ZLIB_GZIP
    monkeypatch.setattr(archive_module, "GZIP", chosen)
    return chosen


def test_gzip_is_inflated_with_isal_where_its_wheel_is_installed() -> None:
    """The isal wheel is a dependency on this machine kind: without it the fast path (issue
    12) would silently be the zlib one and the tests below would test zlib twice."""
    pytest.importorskip("isal", reason="the isal wheel is not published for this machine")
    assert GZIP.name == "ISA-L (isal)"
    assert GZIP is not ZLIB_GZIP


def make_writer() -> tuple[LayoutWriter, str]:
    w = LayoutWriter()
    image, _ = small_image(w, "archive", layers=2)
    w.tag(image, "1.0")
    return w, image.digest


def expected_members(w: LayoutWriter) -> dict[str, bytes]:
    members = {"index.json": w.index_bytes(), "oci-layout": w.oci_layout_bytes()}
    for digest in w.digests():
        algorithm, _, encoded = digest.partition(":")
        members[f"blobs/{algorithm}/{encoded}"] = w.blob_bytes(digest)
    return members


def tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def header_with_size(name: str, size_field: bytes) -> bytes:
    """A ustar header whose 12-byte size field is given raw (octal or base-256)."""
    header = bytearray(tarfile.TarInfo(name).tobuf(format=tarfile.USTAR_FORMAT))
    header[124:136] = size_field
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def base256(value: int) -> bytes:
    """GNU base-256 numeric field: a marker byte and 11 bytes of two's complement."""
    return bytes([0xFF if value < 0 else 0x80]) + (value % (1 << 88)).to_bytes(11, "big")


# --------------------------------------------------------------------------- plain tar


def test_plain_tar_members_are_windows_of_the_file(tmp_path: Path) -> None:
    w, _ = make_writer()
    path = w.write_archive(tmp_path / "a.oci")
    archive = open_archive(str(path))
    assert archive.kind is ArchiveKind.TAR
    expected = expected_members(w)
    assert set(archive.members) == set(expected)
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, data in expected.items():
            member = archive.members[name]
            assert member.name == name
            assert member.size == len(data)
            assert member.offset % 512 == 0
            assert os.pread(fd, member.size, member.offset) == data
    finally:
        os.close(fd)
    assert archive.read_member("index.json", 1 << 20) == w.index_bytes()


def test_plain_tar_open_member_streams_and_exposes_its_region(tmp_path: Path) -> None:
    w, digest = make_writer()
    path = w.write_archive(tmp_path / "a.oci")
    archive = open_archive(str(path))
    name = "blobs/sha256/" + digest.partition(":")[2]
    with archive.open_member(name) as reader:
        region = reader.region()
        assert region is not None
        assert region.offset == archive.members[name].offset
        assert reader.size == archive.members[name].size
        chunks = []
        while chunk := reader.read(7):
            chunks.append(chunk)
        assert b"".join(chunks) == w.blob_bytes(digest)
        assert reader.unchanged()


def test_read_member_refuses_over_the_limit(tmp_path: Path) -> None:
    w, _ = make_writer()
    archive = open_archive(str(w.write_archive(tmp_path / "a.oci")))
    size = archive.members["index.json"].size
    assert archive.read_member("index.json", size) == w.index_bytes()
    with pytest.raises(ArchiveError, match="limit"):
        archive.read_member("index.json", size - 1)
    with pytest.raises(ArchiveError, match="missing"):
        archive.read_member("blobs/sha256/" + HEX, 100)


@pytest.mark.parametrize("prefix", ["./", "layout/", "./layout/"])
def test_member_prefix(tmp_path: Path, prefix: str) -> None:
    w, _ = make_writer()
    path = w.write_archive(tmp_path / "a.oci", member_prefix=prefix)
    archive = open_archive(str(path))
    if prefix == "./":
        assert set(archive.members) == set(expected_members(w))
        assert archive.read_member("oci-layout", 100) == w.oci_layout_bytes()
    else:
        # A layout nested in a subdirectory of the tar is not a layout at its root.
        assert archive.members == {}


def test_layout_order_and_directories_do_not_matter(tmp_path: Path) -> None:
    w, _ = make_writer()
    a = open_archive(str(w.write_archive(tmp_path / "a.oci", blobs_first=False,
                                         include_directories=False)))
    b = open_archive(str(w.write_archive(tmp_path / "b.oci")))
    assert set(a.members) == set(b.members) == set(expected_members(w))


def test_other_members_are_ignored(tmp_path: Path) -> None:
    data = tar_bytes([
        regular("index.json", b"{}"),
        regular("manifest.json", b"[]"),  # docker save's own index
        regular("blobs/sha256/" + HEX, b"x"),
        regular("blobs/sha256/" + HEX + "/extra", b"y"),
        regular("repositories", b"{}"),
        special("etc", tarfile.DIRTYPE),
        special("link-elsewhere", tarfile.SYMTYPE, "/etc/passwd"),
    ])
    (tmp_path / "a.oci").write_bytes(data)
    archive = open_archive(str(tmp_path / "a.oci"))
    # manifest.json is kept: without index.json it is what a legacy docker save serves from.
    assert set(archive.members) == {"index.json", "manifest.json", "blobs/sha256/" + HEX}


# --------------------------------------------------------------------------- compression


@pytest.mark.parametrize(("compression", "kind"), [("gzip", ArchiveKind.GZIP),
                                                   ("zstd", ArchiveKind.ZSTD)])
@pytest.mark.usefixtures("inflater")
def test_compressed_kinds_are_detected_by_content(tmp_path: Path, compression: str,
                                                  kind: ArchiveKind) -> None:
    w, digest = make_writer()
    # Misleading names: the content decides.
    path = w.write_archive(tmp_path / "plain.tar", compression=compression)  # type: ignore[arg-type]
    assert detect_kind(str(path)) is kind
    archive = open_archive(str(path))
    assert archive.kind is kind
    expected = expected_members(w)
    assert set(archive.members) == set(expected)
    for name, data in expected.items():
        assert archive.read_member(name, 1 << 20) == data
        with archive.open_member(name) as reader:
            assert reader.region() is None
            assert reader.size == len(data)
            assert reader.read(len(data) + 10) == data
            assert reader.read(10) == b""
            assert reader.unchanged()


def test_plain_tar_with_compressed_name_is_a_tar(tmp_path: Path) -> None:
    w, _ = make_writer()
    path = w.write_archive(tmp_path / "image.tar.gz")
    assert detect_kind(str(path)) is ArchiveKind.TAR


@pytest.mark.usefixtures("inflater")
def test_large_member_of_compressed_archive_is_streamed_not_kept(tmp_path: Path) -> None:
    w = LayoutWriter()
    big = w.add_blob(os.urandom(300_000), "application/octet-stream")
    w.tag(w.add_index([big]), "1")
    path = w.write_archive(tmp_path / "a.oci", compression="gzip")
    archive = open_archive(str(path), ArchiveLimits(small_member_bytes=100_000))
    name = "blobs/sha256/" + big.hex
    with pytest.raises(ArchiveError, match="too large"):
        archive.read_member(name, 1 << 20)
    with archive.open_member(name) as reader:
        data = b""
        while chunk := reader.read(65536):
            data += chunk
    assert data == w.blob_bytes(big.digest)


@pytest.mark.usefixtures("inflater")
def test_gzip_bomb_is_refused(tmp_path: Path) -> None:
    header = tarfile.TarInfo("blobs/sha256/" + HEX)
    header.size = 200 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    parts = [compressor.compress(header.tobuf())]
    zeros = bytes(1 << 20)
    parts += [compressor.compress(zeros) for _ in range(200)]
    parts.append(compressor.compress(bytes(1024)))
    parts.append(compressor.flush())
    path = tmp_path / "bomb.oci"
    path.write_bytes(b"".join(parts))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(ArchiveError, match="bomb"):
        open_archive(str(path), ArchiveLimits(max_expansion=20))


def test_zstd_bomb_is_refused(tmp_path: Path) -> None:
    header = tarfile.TarInfo("blobs/sha256/" + HEX)
    header.size = 64 << 20
    data = header.tobuf() + bytes(64 << 20) + bytes(1024)
    path = tmp_path / "bomb.oci"
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    with pytest.raises(ArchiveError, match="bomb"):
        open_archive(str(path), ArchiveLimits(max_expansion=20))


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.usefixtures("inflater")
def test_corrupt_compressed_stream_is_an_archive_error(tmp_path: Path, compression: str) -> None:
    w = LayoutWriter()
    blob = w.add_blob(os.urandom(50_000), "application/octet-stream")
    w.tag(w.add_index([blob]), "1")
    path = w.write_archive(tmp_path / "a.oci", compression=compression)  # type: ignore[arg-type]
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0x5A  # damage the deflate/zstd stream in the middle of the blob
    path.write_bytes(bytes(data))
    try:
        layout = load_layout(open_archive(str(path)))
    except ArchiveError:
        return  # gzip always lands here: its CRC-32 covers the whole stream
    # zstd frames without a content checksum cannot tell: raw blocks decode to other bytes,
    # and the digest check (here, or the store's before serving) refuses them.
    assert compression == "zstd"
    assert blob.digest not in layout.manifests
    assert any("does not match its digest" in problem for problem in layout.problems)


@pytest.mark.parametrize("size", [3 << 20, 6 << 20])  # kept in memory / skipped over
@pytest.mark.usefixtures("inflater")
def test_invalid_deflate_block_inside_a_member_is_an_archive_error(tmp_path: Path,
                                                                   size: int) -> None:
    # zlib raises zlib.error and ISA-L its IsalError, neither an OSError, for an invalid
    # block; past the first read-ahead it surfaces while tarfile reads or skips member data,
    # where tarfile does not wrap it.
    header = tarfile.TarInfo("blobs/sha256/" + HEX)
    header.size = size
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    data = (compressor.compress(header.tobuf())
            + compressor.compress(random.Random(0).randbytes(2 << 20))
            + compressor.flush(zlib.Z_FULL_FLUSH)
            + b"\x07" + bytes(64))  # BFINAL=1 with the reserved BTYPE=11 (RFC 1951 §3.2.3)
    path = tmp_path / "a.oci"
    path.write_bytes(data)
    # zlib says "invalid block type", ISA-L "Invalid deflate block found".
    with pytest.raises(ArchiveError, match="unreadable gzip archive: .*[Ii]nvalid"):
        open_archive(str(path))


@pytest.mark.usefixtures("inflater")
def test_truncated_gzip_is_an_archive_error(tmp_path: Path) -> None:
    w, _ = make_writer()
    path = w.write_archive(tmp_path / "a.oci", compression="gzip")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError):
        open_archive(str(path))


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize("content", [b"just some text, not a tar archive\n" * 40, b"",
                                     b"short"], ids=["text", "empty", "short"])
def test_compressed_stream_that_is_not_a_tar_says_so(tmp_path: Path, compression: str,
                                                     content: bytes) -> None:
    """Intact compression around something else: the message names what the file is, not a
    tarfile detail (\"invalid header\") that reads like a damaged download."""
    path = tmp_path / "a.oci"
    path.write_bytes(gzip.compress(content) if compression == "gzip"
                     else zstandard.ZstdCompressor().compress(content))
    with pytest.raises(ArchiveError) as raised:
        open_archive(str(path))
    assert str(raised.value).startswith(
        f"a {compression} stream whose content is not a tar archive"), raised.value


# --------------------------------------------------------------------------- directories


def test_layout_directory(tmp_path: Path) -> None:
    w, digest = make_writer()
    path = w.write_directory(tmp_path / "dir.oci")
    assert detect_kind(str(path)) is ArchiveKind.DIRECTORY
    archive = open_archive(str(path))
    assert archive.kind is ArchiveKind.DIRECTORY
    expected = expected_members(w)
    assert set(archive.members) == set(expected)
    for name, data in expected.items():
        assert archive.read_member(name, 1 << 20) == data
    name = "blobs/sha256/" + digest.partition(":")[2]
    with archive.open_member(name) as reader:
        assert reader.read(1 << 20) == w.blob_bytes(digest)
        region = reader.region()
        assert region is not None and region.offset == 0
    (path / "blobs" / "sha256" / "not-a-digest!").write_bytes(b"")
    (path / "stray.txt").write_bytes(b"")
    assert set(open_archive(str(path)).members) == set(expected)


def test_layout_directory_without_index_is_refused(tmp_path: Path) -> None:
    w, _ = make_writer()
    path = w.write_directory(tmp_path / "dir.oci")
    (path / "index.json").unlink()
    with pytest.raises(ArchiveError, match="index.json"):
        open_archive(str(path))


def test_layout_directory_refuses_symlinked_members(tmp_path: Path) -> None:
    w, digest = make_writer()
    path = w.write_directory(tmp_path / "dir.oci")
    blob = path / "blobs" / "sha256" / digest.partition(":")[2]
    target = tmp_path / "elsewhere"
    target.write_bytes(blob.read_bytes())
    blob.unlink()
    blob.symlink_to(target)
    with pytest.raises(ArchiveError, match="not a regular file"):
        open_archive(str(path))


def test_layout_directory_does_not_follow_a_symlinked_blobs_directory(tmp_path: Path) -> None:
    w, _ = make_writer()
    path = w.write_directory(tmp_path / "dir.oci")
    outside = tmp_path / "outside"
    (path / "blobs").rename(outside)
    (path / "blobs").symlink_to(outside)
    archive = open_archive(str(path))
    assert set(archive.members) == {"index.json", "oci-layout"}


def test_layout_directory_blob_replaced_after_indexing(tmp_path: Path) -> None:
    w, digest = make_writer()
    path = w.write_directory(tmp_path / "dir.oci")
    archive = open_archive(str(path))
    name = "blobs/sha256/" + digest.partition(":")[2]
    replacement = path / "replacement"
    replacement.write_bytes(b"other bytes")
    os.replace(replacement, path / name)
    with pytest.raises(StaleArchiveError):
        archive.open_member(name)


# --------------------------------------------------------------------------- broken tars


def test_truncated_tar_is_an_archive_error(tmp_path: Path) -> None:
    w = LayoutWriter()
    blob = w.add_blob(os.urandom(20_000), "application/octet-stream")
    w.tag(w.add_index([blob]), "1")
    path = w.write_archive(tmp_path / "a.oci", blobs_first=False)  # the blob comes last
    full = open_archive(str(path)).members["blobs/sha256/" + blob.hex]
    with open(path, "r+b") as f:
        f.truncate(full.offset + 100)  # cut inside the blob's data
    with pytest.raises(ArchiveError):
        open_archive(str(path))


def test_member_size_past_end_of_file(tmp_path: Path) -> None:
    # The last member's header claims 1 MiB; the file holds 512 bytes of it and stops.
    data = tar_bytes([regular("index.json", b"{}")])
    path = tmp_path / "a.oci"
    path.write_bytes(data[:1024] + header_with_size("blobs/sha256/" + HEX, b"%011o\0" % (1 << 20))
                     + b"x" * 512)
    with pytest.raises(ArchiveError):
        open_archive(str(path))


@pytest.mark.parametrize("size", [-1024, -512, 1 << 40, (1 << 63) + 5, 1 << 80])
@pytest.mark.usefixtures("inflater")
def test_absurd_member_sizes_are_archive_errors(tmp_path: Path, size: int) -> None:
    # GNU base-256 size fields can be negative or enormous; tarfile would seek to match.
    before = tar_bytes([regular("index.json", b"{}"), regular("oci-layout", b"{}")])[:2048]
    data = before + header_with_size("other", base256(size)) + b"x" * 512 + bytes(1024)
    for compression in ("none", "gzip"):
        path = tmp_path / f"{compression}.oci"
        path.write_bytes(data if compression == "none" else gzip.compress(data))
        with pytest.raises(ArchiveError):
            open_archive(str(path))


def test_negative_size_cannot_loop_back(tmp_path: Path) -> None:
    # c's data starts at 2560; a size of -1536 points the next header back at b's (1024),
    # and tarfile would read b, c, b, c, ... forever.
    first = tar_bytes([regular("a", b"x" * 512), regular("b", b"y" * 512)])[:2048]
    data = first + header_with_size("c", base256(-1536)) + bytes(1024)
    path = tmp_path / "loop.oci"
    path.write_bytes(data)
    with pytest.raises(ArchiveError):
        open_archive(str(path))


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME,
                                  tarfile.GNUTYPE_LONGLINK])
@pytest.mark.usefixtures("inflater")
def test_huge_extended_header_is_refused_before_it_is_read(tmp_path: Path, kind: bytes) -> None:
    # tarfile reads pax records and GNU long names into memory whole: a header claiming
    # gigabytes in a sparse file (no disk used) would allocate them (256 MiB here, so that a
    # regression fails this test rather than the machine).
    info = tarfile.TarInfo("././@LongLink")
    info.type = kind
    header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    header[124:136] = b"%011o\0" % (256 << 20)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    path = tmp_path / "a.oci"
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(512 + (256 << 20) + 1024)  # a hole: reads as zeros
    with pytest.raises(ArchiveError, match="extended header"):
        open_archive(str(path))
    gz = tmp_path / "b.oci"
    gz.write_bytes(gzip.compress(bytes(header) + bytes(1 << 20)))
    with pytest.raises(ArchiveError):
        open_archive(str(gz))


@pytest.mark.parametrize("compression", ["none", "gzip"])
@pytest.mark.usefixtures("inflater")
def test_pax_and_gnu_long_names_are_read(tmp_path: Path, compression: str) -> None:
    # sha512 member names are 141 characters: pax records or GNU long names carry them.
    long_name = "blobs/sha512/" + "ab" * 64
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for name, data in (("./index.json", b"{}"), ("./" + long_name, b"blob")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.pax_headers = {"comment": "x" * 2000}
                tf.addfile(info, io.BytesIO(data))
        data = buf.getvalue()
        path = tmp_path / f"{fmt}.oci"
        path.write_bytes(gzip.compress(data) if compression == "gzip" else data)
        archive = open_archive(str(path))
        assert set(archive.members) == {"index.json", long_name}
        assert archive.read_member(long_name, 100) == b"blob"


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_links_are_refused(tmp_path: Path, kind: bytes) -> None:
    name = "blobs/sha256/" + HEX
    data = tar_bytes([regular("index.json", b"{}"), special(name, kind, "index.json")])
    path = tmp_path / "a.oci"
    path.write_bytes(data)
    with pytest.raises(ArchiveError, match="link"):
        open_archive(str(path))


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.FIFOTYPE, tarfile.DIRTYPE])
def test_special_files_are_refused(tmp_path: Path, kind: bytes) -> None:
    data = tar_bytes([regular("oci-layout", b"{}"), special("index.json", kind)])
    path = tmp_path / "a.oci"
    path.write_bytes(data)
    with pytest.raises(ArchiveError, match="not a regular file"):
        open_archive(str(path))


@pytest.mark.parametrize("second", ["index.json", "./index.json", "././index.json"])
def test_duplicate_members_are_refused(tmp_path: Path, second: str) -> None:
    data = tar_bytes([regular("index.json", b"{}"), regular(second, b'{"a":1}')])
    path = tmp_path / "a.oci"
    path.write_bytes(data)
    with pytest.raises(ArchiveError, match="duplicate"):
        open_archive(str(path))


@pytest.mark.usefixtures("inflater")
def test_duplicate_members_are_refused_in_compressed_archives(tmp_path: Path) -> None:
    data = tar_bytes([regular("index.json", b"{}"), regular("index.json", b"[]")])
    path = tmp_path / "a.oci"
    path.write_bytes(gzip.compress(data))
    with pytest.raises(ArchiveError, match="duplicate"):
        open_archive(str(path))


def test_too_many_members(tmp_path: Path) -> None:
    data = tar_bytes([regular(f"blobs/sha256/{i:064x}", b"") for i in range(10)])
    path = tmp_path / "a.oci"
    path.write_bytes(data)
    assert len(open_archive(str(path)).members) == 10
    with pytest.raises(ArchiveError, match="more than 5"):
        open_archive(str(path), ArchiveLimits(max_members=5))


@pytest.mark.parametrize("compression", ["none", "gzip"])
@pytest.mark.usefixtures("inflater")
def test_too_many_entries_of_any_kind(tmp_path: Path, compression: str) -> None:
    # Entries outside the layout are ignored, but each costs tarfile a TarInfo: they count.
    data = tar_bytes([regular("index.json", b"{}"),
                      *(regular(f"junk/{i}", b"") for i in range(10))])
    path = tmp_path / "a.oci"
    path.write_bytes(gzip.compress(data) if compression == "gzip" else data)
    assert set(open_archive(str(path), ArchiveLimits(max_members=11)).members) == {"index.json"}
    with pytest.raises(ArchiveError, match="more than 10"):
        open_archive(str(path), ArchiveLimits(max_members=10))


@pytest.mark.parametrize("content", [
    b"", b"hello", b"x" * 4096, b"\x1f", b"\x28\xb5\x2f", bytes(1024), b"PK\x03\x04" + bytes(600),
])
def test_garbage_is_an_archive_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "a.oci"
    path.write_bytes(content)
    with pytest.raises(ArchiveError):
        open_archive(str(path))


@pytest.mark.usefixtures("inflater")
def test_gzip_magic_then_garbage(tmp_path: Path) -> None:
    path = tmp_path / "a.oci"
    path.write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    with pytest.raises(ArchiveError):
        open_archive(str(path))


def _with_fifo_released(fifo: Path, call: Callable[[], object]) -> BaseException | None:
    """Run ``call`` in a thread; if it blocks on the FIFO, unblock it (then fail the test)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # a blocked reader's open() returns
        os.close(fd)
        thread.join(5)
        pytest.fail("opening a FIFO blocked")
    return outcome[0]


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.oci"
    os.mkfifo(fifo)
    error = _with_fifo_released(fifo, lambda: open_archive(str(fifo)))
    assert isinstance(error, ArchiveError) and "not a regular file" in str(error)


def test_archive_replaced_by_a_fifo_is_stale(tmp_path: Path) -> None:
    w, _ = make_writer()
    path = w.write_archive(tmp_path / "a.oci")
    archive = open_archive(str(path))
    path.unlink()
    os.mkfifo(path)
    error = _with_fifo_released(path, lambda: archive.open_member("index.json"))
    assert isinstance(error, StaleArchiveError)


# --------------------------------------------------------------------------- staleness


def test_open_member_on_replaced_file_is_stale(tmp_path: Path) -> None:
    w, digest = make_writer()
    path = w.write_archive(tmp_path / "a.oci")
    archive = open_archive(str(path))
    other, _ = make_writer()
    other.tag(other.add_blob(b"new", "text/plain"), "x")
    other.write_archive(path)  # atomic rename: a new inode at the same path
    name = "blobs/sha256/" + digest.partition(":")[2]
    with pytest.raises(StaleArchiveError):
        archive.open_member(name)
    with pytest.raises(StaleArchiveError):
        archive.read_member("index.json", 1 << 20)


def test_open_member_on_deleted_file_is_stale(tmp_path: Path) -> None:
    w, _ = make_writer()
    path = w.write_archive(tmp_path / "a.oci")
    archive = open_archive(str(path))
    path.unlink()
    with pytest.raises(StaleArchiveError):
        archive.open_member("index.json")


@pytest.mark.usefixtures("inflater")
def test_compressed_open_member_on_replaced_file_is_stale(tmp_path: Path) -> None:
    w = LayoutWriter()
    big = w.add_blob(os.urandom(50_000), "application/octet-stream")
    w.tag(w.add_index([big]), "1")
    path = w.write_archive(tmp_path / "a.oci", compression="zstd")
    # Members over small_member_bytes are not kept in memory: they are read from the file.
    archive = open_archive(str(path), ArchiveLimits(small_member_bytes=10_000))
    w.write_archive(path, compression="zstd")  # same bytes, new inode
    with pytest.raises(StaleArchiveError):
        archive.open_member("blobs/sha256/" + big.hex)


def test_reader_notices_in_place_rewrite(tmp_path: Path) -> None:
    w, digest = make_writer()
    path = w.write_archive(tmp_path / "a.oci")
    archive = open_archive(str(path))
    name = "blobs/sha256/" + digest.partition(":")[2]
    reader = archive.open_member(name)
    try:
        assert reader.unchanged()
        st = path.stat()
        with open(path, "r+b") as f:  # same inode, same size: only content and mtime change
            f.seek(archive.members[name].offset)
            f.write(b"\0" * 16)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_007))
        assert not reader.unchanged()
    finally:
        reader.close()
    with pytest.raises(StaleArchiveError):
        archive.open_member(name)


# --------------------------------------------------------------------------- properties


@functools.cache
def valid_archive(compression: str) -> bytes:
    w = LayoutWriter()
    image, _ = small_image(w, "fuzz", layers=1)
    w.tag(image, "1.0")
    w.tag(w.add_index([image]), "example.com/fuzz:idx")
    with tempfile.TemporaryDirectory() as tmp:
        path = w.write_archive(Path(tmp) / "a.oci", compression=compression,  # type: ignore[arg-type]
                               include_directories=False)
        return path.read_bytes()


def open_and_load(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "a.oci")
        with open(path, "wb") as f:
            f.write(data)
        try:
            archive = open_archive(path, ArchiveLimits(max_expansion=50))
            layout = load_layout(archive)
            for name in list(archive.members)[:4]:
                with archive.open_member(name) as reader:
                    while reader.read(1 << 16):
                        pass
            assert set(layout.manifests) >= set(layout.roots)
        except (ArchiveError, StaleArchiveError):
            pass


_fuzz = settings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_fuzz
@given(st.binary(max_size=4096)
       | st.binary(max_size=600).map(lambda b: b"\x1f\x8b" + b)
       | st.binary(max_size=600).map(lambda b: b"\x28\xb5\x2f\xfd" + b)
       | st.binary(min_size=512, max_size=2048).map(lambda b: b[:257] + b"ustar" + b[262:]))
def test_random_bytes_only_raise_archive_errors(data: bytes) -> None:
    open_and_load(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(valid_archive(draw(st.sampled_from(["none", "gzip", "zstd"]))))
    for _ in range(draw(st.integers(1, 8))):
        action = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if action == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            data[at] = draw(st.sampled_from([0x00, 0x20, 0x30, 0x37, 0x80, 0xFF]))
        elif action == "truncate":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=600))
        else:
            del data[at: at + draw(st.integers(1, 600))]
    return bytes(data)


@_fuzz
@given(mutated())
def test_mutated_archives_only_raise_archive_errors(data: bytes) -> None:
    open_and_load(data)


@_fuzz
@given(st.sampled_from(["none", "gzip", "zstd"]), st.data())
def test_header_field_mutations_only_raise_archive_errors(compression: str,
                                                          data: st.DataObject) -> None:
    # Target the numeric fields of tar headers (size, mode, checksum, type) directly.
    raw = bytearray(valid_archive("none"))
    headers = [off for off in range(0, len(raw) - 512, 512)
               if raw[off + 257: off + 262] == b"ustar"]
    header = data.draw(st.sampled_from(headers))
    start, end = data.draw(st.sampled_from([(124, 136), (100, 108), (148, 156), (156, 157),
                                            (0, 100), (345, 500)]))
    field = data.draw(st.binary(min_size=end - start, max_size=end - start))
    raw[header + start: header + end] = field
    if data.draw(st.booleans()):  # keep the checksum valid so tarfile reads the header
        raw[header + 148: header + 156] = b" " * 8
        raw[header + 148: header + 156] = b"%06o\0 " % sum(raw[header: header + 512])
    payload = bytes(raw)
    if compression == "gzip":
        payload = gzip.compress(payload)
    elif compression == "zstd":
        payload = zstandard.ZstdCompressor().compress(payload)
    open_and_load(payload)


# --------------------------------------------------------------------------- sniffing, heads


@pytest.mark.parametrize(("head", "kind"), [
    (gzip.compress(b"x"), ArchiveKind.GZIP),
    (zstandard.ZstdCompressor().compress(b"x"), ArchiveKind.ZSTD),
    (b"\x5f\x2a\x4d\x18\0\0\0\0", ArchiveKind.ZSTD),  # skippable frame (RFC 8878 §3.1.2)
    (tar_bytes([regular("f", b"x")])[:512], ArchiveKind.TAR),
    (b"\0" * 512, ArchiveKind.TAR),  # an empty tar: end-of-archive blocks only
    (b"\0" * 100, None),  # too short to be a tar block
    (b"\x1f", None), (b"", None), (b"BZh91AY&SY", None), (b"\0" * 511 + b"\1", None),
])
def test_sniff(head: bytes, kind: ArchiveKind | None) -> None:
    assert sniff(head[:HEAD_BYTES]) is kind


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd", "directory"])
@pytest.mark.usefixtures("inflater")
def test_head_is_the_members_first_bytes(tmp_path: Path, compression: str) -> None:
    w = LayoutWriter()
    small = w.add_blob(b"tiny", "application/octet-stream")
    big = w.add_blob(os.urandom(40_000), "application/octet-stream")
    w.tag(w.add_index([]), "x")
    if compression == "directory":
        path = w.write_directory(tmp_path / "d.oci")
    else:
        path = w.write_archive(tmp_path / "a.oci", compression)  # type: ignore[arg-type]
    archive = open_archive(str(path), ArchiveLimits(small_member_bytes=10_000))
    assert archive.head("blobs/sha256/" + small.hex) == b"tiny"
    assert archive.head("blobs/sha256/" + big.hex) == w.blob_bytes(big.digest)[:HEAD_BYTES]


def docker_members(link_kind: bytes) -> bytes:
    layer = tar_bytes([regular("etc/f", b"layer\n")])
    return tar_bytes([
        regular("aa/layer.tar", layer),
        special("bb/layer.tar", link_kind, "../aa/layer.tar" if link_kind == tarfile.SYMTYPE
                else "aa/layer.tar"),
        special("cc/layer.tar", tarfile.SYMTYPE, "../bb/layer.tar"),  # a link to a link
        special("dd/layer.tar", tarfile.SYMTYPE, "/etc/passwd"),  # outside: never served
        special("ee/layer.tar", tarfile.SYMTYPE, "../ee/layer.tar"),  # a loop
        regular(HEX + ".json", b"{}"),
        regular(HEX + ".tar", layer),
        regular("aa/json", b"{}"), regular("aa/VERSION", b"1.0"), regular("repositories", b"{}"),
        special("zz.tar", tarfile.DIRTYPE),
        regular("manifest.json", b"[]"),
    ])


@pytest.mark.parametrize("link_kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_docker_save_members_and_their_links(tmp_path: Path, link_kind: bytes,
                                             compression: str) -> None:
    data = docker_members(link_kind)
    (tmp_path / "a.oci").write_bytes(gzip.compress(data) if compression == "gzip" else data)
    archive = open_archive(str(tmp_path / "a.oci"))
    assert set(archive.members) == {"aa/layer.tar", "bb/layer.tar", "cc/layer.tar",
                                    HEX + ".json", HEX + ".tar", "manifest.json"}
    assert archive.aliases == {"bb/layer.tar": "aa/layer.tar", "cc/layer.tar": "aa/layer.tar"}
    first = archive.members["aa/layer.tar"]
    assert (archive.members["cc/layer.tar"].offset, archive.members["cc/layer.tar"].size) == (
        first.offset, first.size)
    with archive.open_member("cc/layer.tar") as reader:
        linked = reader.read(1 << 20)
    with archive.open_member("aa/layer.tar") as reader:
        assert reader.read(1 << 20) == linked
    digests = archive.member_digests(["aa/layer.tar", "bb/layer.tar", HEX + ".tar"])
    assert len(set(digests.values())) == 1


def test_a_link_named_like_an_oci_member_is_still_refused(tmp_path: Path) -> None:
    data = tar_bytes([regular("x.tar", b"x"), special("index.json", tarfile.SYMTYPE, "x.tar")])
    (tmp_path / "a.oci").write_bytes(data)
    with pytest.raises(ArchiveError, match="symbolic link"):
        open_archive(str(tmp_path / "a.oci"))


def test_a_link_beside_a_member_of_the_same_name_is_a_duplicate(tmp_path: Path) -> None:
    data = tar_bytes([regular("a.tar", b"x"), regular("b.tar", b"y"),
                      special("a.tar", tarfile.SYMTYPE, "b.tar")])
    (tmp_path / "a.oci").write_bytes(data)
    with pytest.raises(ArchiveError, match="duplicate"):
        open_archive(str(tmp_path / "a.oci"))


def test_member_digests_of_a_directory_layout(tmp_path: Path) -> None:
    w, _ = make_writer()
    archive = open_archive(str(w.write_directory(tmp_path / "d.oci")))
    names = [n for n in archive.members if n.startswith("blobs/")]
    digests = archive.member_digests(names)
    assert digests == {n: "sha256:" + n.rsplit("/", 1)[1] for n in names}


def test_compressed_index_without_remembered_heads_is_scanned_again(tmp_path: Path) -> None:
    # An index remembered by an older version (no facts file) lacks the large members' first
    # bytes: the archive is scanned again rather than served without them.
    w, _ = make_writer()
    big = w.add_blob(os.urandom(40_000), "application/octet-stream")
    path = w.write_archive(tmp_path / "a.oci", "gzip")
    limits = ArchiveLimits(small_member_bytes=10_000)
    cache = BlobCache(tmp_path / "cache", 1 << 30)
    open_archive(str(path), limits, cache)
    for facts in (tmp_path / "cache" / "facts").iterdir():
        facts.write_text("damaged")
    again = BlobCache(tmp_path / "cache", 1 << 30)
    archive = open_archive(str(path), limits, again)
    assert again.stats.decompressions == 1
    assert archive.head("blobs/sha256/" + big.hex) == w.blob_bytes(big.digest)[:HEAD_BYTES]
    third = BlobCache(tmp_path / "cache", 1 << 30)
    open_archive(str(path), limits, third)
    assert third.stats.decompressions == 0
