"""Benchmark fixtures, built offline and deterministically with the project's ``LayoutWriter``.

Under the work directory::

    image-<bytes>/                     one big image, rebuilt only when missing or incomplete
        layout/blobs/sha256/<hex>      OCI layout directory: the layer file nginx serves
        registry/big/1.0.oci           plain archive            (ours: big:1.0)
        registry/bigz/1.0.oci          gzip-wrapped archive     (ours: bigz:1.0)
        nginx-root/v2/big/...          manifests/1.0, blobs/<digest>, tags/list for nginx
        image.json                     digests and sizes, written last: marks the build done
    cold-<count>/n00000/1.0.oci ...    <count> small archives, one name each
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from simple_oci_registry.layoutwriter import (
    MEDIA_TYPE_OCI_MANIFEST,
    ChunkFactory,
    Descriptor,
    LayerFile,
    LayoutWriter,
)

__all__ = [
    "ColdDir",
    "Image",
    "build_cold_dir",
    "build_image",
    "build_real_archive",
    "manifest_annotations",
]

_FORMAT: Final[int] = 1
"""Bump when the fixtures' content changes, so cached ones are rebuilt."""
_HALF_CHUNK: Final[int] = 512 * 1024
_MANIFEST_TARGET: Final[int] = 1536
NAME: Final[str] = "big"
GZIP_NAME: Final[str] = "bigz"
TAG: Final[str] = "1.0"


@dataclass(frozen=True, slots=True)
class Image:
    """What the big image's fixtures contain; also written to ``image.json``."""

    root: str
    registry_dir: str
    plain_archive: str
    gzip_archive: str
    nginx_root: str
    ref: str
    gzip_ref: str
    manifest_digest: str
    manifest_media_type: str
    manifest_bytes: int
    config_digest: str
    layer_digest: str
    layer_bytes: int
    plain_archive_bytes: int
    gzip_archive_bytes: int


@dataclass(frozen=True, slots=True)
class ColdDir:
    """A directory of ``count`` small archives; ``ref`` names one in the middle."""

    count: int
    path: Path
    ref: str


def _mixed_chunks(size: int, seed: int = 4) -> ChunkFactory:
    """Half pseudo-random, half repetitive text, in alternating 512 KiB runs.

    Random bytes alone would make gzip pointless and pure text would make it unrealistically
    good; the mix compresses to roughly half, like a typical binary-and-text layer.
    """
    line = b"2024-01-01T00:00:00Z INFO registry: served /v2/library/app/blobs/sha256 bytes=%08d\n"
    text = b"".join(line % i for i in range(_HALF_CHUNK // len(line) + 1))[:_HALF_CHUNK]

    def generate() -> Iterator[bytes]:
        rng = random.Random(seed)
        remaining = size
        random_turn = True
        while remaining > 0:
            n = min(_HALF_CHUNK, remaining)
            yield rng.randbytes(n) if random_turn else text[:n]
            remaining -= n
            random_turn = not random_turn

    return generate


def manifest_annotations(layer: Descriptor, config: dict[str, object]) -> dict[str, str]:
    """OCI annotations that bring the manifest to about 1.5 KB, a typical size."""
    annotations = {
        "org.opencontainers.image.created": "2024-01-01T00:00:00Z",
        "org.opencontainers.image.authors": "Simple OCI Registry benchmark <bench@example.com>",
        "org.opencontainers.image.url": "https://example.com/simple-oci-registry/bench",
        "org.opencontainers.image.source": "https://example.com/simple-oci-registry.git",
        "org.opencontainers.image.version": TAG,
        "org.opencontainers.image.revision": "0" * 40,
        "org.opencontainers.image.vendor": "Simple OCI Registry",
        "org.opencontainers.image.licenses": "MIT",
        "org.opencontainers.image.title": "bench",
        "org.opencontainers.image.description": "",
    }
    probe = LayoutWriter().add_image([layer], config=config, annotations=annotations)
    pad = max(0, _MANIFEST_TARGET - probe.size)
    annotations["org.opencontainers.image.description"] = ("benchmark image " * 200)[:pad]
    return annotations


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, encoded = digest.partition(":")
    return layout / "blobs" / algorithm / encoded


def build_image(work_dir: Path, layer_bytes: int) -> Image:
    """Build (or reuse) the big image: plain and gzip archives, layout dir, nginx tree."""
    root = work_dir / f"image-{layer_bytes}"
    stamp = root / "image.json"
    if stamp.is_file():
        data = json.loads(stamp.read_text())
        if data.pop("format", None) == _FORMAT:
            return Image(**data)
    shutil.rmtree(root, ignore_errors=True)
    registry = root / "registry"

    writer = LayoutWriter()
    files = {"bench/data.bin": LayerFile.streamed(_mixed_chunks(layer_bytes), layer_bytes)}
    layer = writer.add_layer(files, "none")
    config: dict[str, object] = {
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]}
    }
    manifest = writer.add_image(
        [layer], config=config, annotations=manifest_annotations(layer, config)
    )
    writer.tag(manifest, TAG)
    layout = writer.write_directory(root / "layout")
    plain = writer.write_archive(registry / NAME / f"{TAG}.oci", "none")
    gz = writer.write_archive(registry / GZIP_NAME / f"{TAG}.oci", "gzip")

    manifest_bytes = _blob_path(layout, manifest.digest).read_bytes()
    config_digest = json.loads(manifest_bytes)["config"]["digest"]
    nginx = root / "nginx-root" / "v2" / NAME
    _link_or_copy(_blob_path(layout, manifest.digest), nginx / "manifests" / TAG)
    _link_or_copy(_blob_path(layout, manifest.digest), nginx / "manifests" / manifest.digest)
    for digest in (layer.digest, config_digest):
        _link_or_copy(_blob_path(layout, digest), nginx / "blobs" / digest)
    (nginx / "tags").mkdir(parents=True, exist_ok=True)
    (nginx / "tags" / "list").write_text(json.dumps({"name": NAME, "tags": [TAG]}))

    image = Image(
        root=str(root),
        registry_dir=str(registry),
        plain_archive=str(plain),
        gzip_archive=str(gz),
        nginx_root=str(root / "nginx-root"),
        ref=f"{NAME}:{TAG}",
        gzip_ref=f"{GZIP_NAME}:{TAG}",
        manifest_digest=manifest.digest,
        manifest_media_type=MEDIA_TYPE_OCI_MANIFEST,
        manifest_bytes=len(manifest_bytes),
        config_digest=config_digest,
        layer_digest=layer.digest,
        layer_bytes=layer.size,
        plain_archive_bytes=plain.stat().st_size,
        gzip_archive_bytes=gz.stat().st_size,
    )
    stamp.write_text(json.dumps({"format": _FORMAT, **asdict(image)}, indent=1))
    return image


def build_cold_dir(work_dir: Path, count: int) -> ColdDir:
    """``count`` copies of one small archive as ``n00000/1.0.oci`` … (reused when complete).

    Copies, not hard links: a server that keys its cache on (device, inode) must not be able to
    recognise the 10,000 archives as one.
    """
    root = work_dir / f"cold-{count}"
    ref = f"n{count // 2:05d}:{TAG}"
    done = root / ".complete"
    if done.is_file() and done.read_text() == str(_FORMAT):
        return ColdDir(count, root, ref)
    shutil.rmtree(root, ignore_errors=True)
    writer = LayoutWriter()
    layer = writer.add_layer({"etc/motd": b"hello from a small benchmark image\n"}, "gzip")
    writer.tag(writer.add_image([layer], config={"config": {"Cmd": ["cat", "/etc/motd"]}}), TAG)
    template = writer.write_archive(work_dir / f".small-{count}.oci")
    for i in range(count):
        target = root / f"n{i:05d}" / f"{TAG}.oci"
        target.parent.mkdir(parents=True)
        shutil.copyfile(template, target)
    template.unlink()
    done.write_text(str(_FORMAT))
    return ColdDir(count, root, ref)


_REAL_SOURCES: Final[tuple[str, ...]] = ("/usr/share", "/usr/lib")


def build_real_archive(work_dir: Path, size: int) -> Path:
    """A gzip -6 tar of about ``size`` bytes of real files from this machine (/usr/share, then
    /usr/lib, in sorted order): text, binaries and already-compressed files, as layers hold.
    Random bytes do not compress and would time a copy, not an inflate. Built once per work
    directory; the gzip binary when there is one (what publishers run), else Python's."""
    target = work_dir / f"real-{size}.tar.gz"
    if target.is_file():
        return target
    plain = work_dir / f"real-{size}.tar.building"
    total = 0
    with tarfile.open(plain, "w", format=tarfile.PAX_FORMAT) as tar:
        for root in _REAL_SOURCES:
            for directory, dirs, files in os.walk(root):
                dirs.sort()
                for name in sorted(files):
                    path = os.path.join(directory, name)
                    if total >= size:
                        break
                    if os.path.islink(path) or not os.path.isfile(path):
                        continue
                    try:
                        tar.add(path, recursive=False)
                    except OSError:  # unreadable: skip it
                        continue
                    total += os.path.getsize(path)
                if total >= size:
                    break
            if total >= size:
                break
    partial = target.parent / (target.name + ".partial")
    gzip_binary = shutil.which("gzip")
    with plain.open("rb") as source, partial.open("wb") as sink:
        if gzip_binary is not None:
            subprocess.run([gzip_binary, "-6", "-c"], stdin=source, stdout=sink, check=True)
        else:
            with gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=6, mtime=0) as zipped:
                shutil.copyfileobj(source, zipped, 1 << 20)
    plain.unlink()
    partial.rename(target)
    return target
