"""Build a ready-made directory of demo images, offline: ``python tools/make_demo.py DIR``.

Why: a first run of the registry needs something to serve, and the machine may have no network
to pull images from. The directory shows each on-disk naming pattern the registry understands:

* ``busybox/1.36.oci`` and ``busybox/latest.oci`` -- repository as a directory, tag as the file
  name; a runnable image built from the host's static busybox (Debian ``busybox-static``) with
  applet symlinks, or a files-only stand-in (with a note) when ``/bin/busybox`` is missing;
* ``hello:1.0.oci`` -- ``name:tag`` in one file name;
* ``multiarch.oci`` -- the tag comes from ``index.json`` (a full reference,
  ``demo.local/multiarch:latest``), pointing at an index of linux/amd64 and linux/arm64 images;
* ``team/app/2.0.oci`` -- a nested repository name, archive gzip-compressed as a whole.

Every run writes the same bytes (the writer is deterministic) and overwrites earlier output
atomically, so it is safe to re-run while a registry is serving the directory.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

try:
    from simple_oci_registry.layoutwriter import Compression, LayerFile, LayoutWriter
except ModuleNotFoundError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from simple_oci_registry.layoutwriter import Compression, LayerFile, LayoutWriter

__all__ = ["DemoImage", "build_demo", "main"]

DEFAULT_BUSYBOX = Path("/bin/busybox")
MULTIARCH_REFERENCE = "demo.local/multiarch:latest"
# Used when the busybox binary cannot list its applets; enough for an interactive shell.
_FALLBACK_APPLETS = (
    "cat chmod cp date df du echo env false grep head hostname id ln ls mkdir mv ps pwd rm "
    "rmdir sed sh sleep sort tail tar touch true uname vi wc wget which"
).split()
# ELF e_machine values of the architectures Debian ships busybox-static for, as OCI names.
_ELF_MACHINES = {
    0x03: ("386", None),
    0x28: ("arm", "v7"),
    0x3E: ("amd64", None),
    0x15: ("ppc64le", None),
    0x16: ("s390x", None),
    0xB7: ("arm64", None),
    0xF3: ("riscv64", None),
}
_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True, slots=True)
class DemoImage:
    """One archive written: the name and tag it is served as, where it is, and any caveat."""

    name: str
    tag: str
    path: Path
    note: str = ""


@dataclass(frozen=True, slots=True)
class _Busybox:
    """What the host's busybox gives the demo: its layer files and platform."""

    files: dict[str, bytes | LayerFile]
    architecture: str
    variant: str | None
    runnable: bool


def _elf_platform(binary: Path) -> tuple[str, str | None]:
    """The OCI architecture of an ELF binary, read from its header (not from the host)."""
    header = binary.read_bytes()[:20]
    if header[:4] != b"\x7fELF":
        raise ValueError(f"{binary} is not an ELF binary")
    machine = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
    try:
        return _ELF_MACHINES[machine]
    except KeyError:
        raise ValueError(f"{binary}: unknown ELF machine {machine:#x}") from None


def _applets(binary: Path) -> list[str]:
    try:
        listed = subprocess.run(
            [str(binary), "--list"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        listed = []
    return sorted(set(listed or _FALLBACK_APPLETS) - {"busybox"})


def _base_files() -> dict[str, bytes | LayerFile]:
    """A minimal root filesystem skeleton so ``id``, ``ls /`` and friends behave."""
    return {
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        "etc/group": b"root:x:0:\nnobody:x:65534:\n",
        "etc/hostname": b"busybox\n",
        "root": LayerFile.dir(0o700),
        "tmp": LayerFile.dir(0o1777),
        "proc": LayerFile.dir(),
        "sys": LayerFile.dir(),
        "dev": LayerFile.dir(),
        "home": LayerFile.dir(),
        "var": LayerFile.dir(),
        "usr/bin": LayerFile.dir(),
    }


def _busybox(binary: Path | None) -> _Busybox:
    files = _base_files()
    if binary is not None and binary.is_file():
        architecture, variant = _elf_platform(binary)
        files["bin/busybox"] = LayerFile.from_path(binary, mode=0o755)
        for applet in _applets(binary):
            files[f"bin/{applet}"] = LayerFile.link("busybox")
        return _Busybox(files, architecture, variant, runnable=True)
    files["README.txt"] = (
        b"No busybox binary was available when this demo was built (apt-get install\n"
        b"busybox-static), so this image holds files only and cannot run a shell.\n"
    )
    return _Busybox(files, "amd64", None, runnable=False)


def _busybox_image(busybox: _Busybox, tag: str) -> LayoutWriter:
    writer = LayoutWriter()
    layer = writer.add_layer(busybox.files, "gzip")
    config = {"config": {"Env": [_PATH_ENV], "Cmd": ["sh"]}}
    image = writer.add_image(
        [layer],
        config=config,
        architecture=busybox.architecture,
        variant=busybox.variant,
        annotations={"org.opencontainers.image.title": "busybox"},
    )
    writer.tag(image, tag)
    return writer


def _hello_image() -> LayoutWriter:
    writer = LayoutWriter()
    layer = writer.add_layer({"hello.txt": b"Hello from Simple OCI Registry!\n"}, "gzip")
    image = writer.add_image(
        [layer], config={"config": {"Labels": {"demo": "hello"}, "Cmd": ["/hello.txt"]}}
    )
    writer.tag(image, "1.0")
    return writer


def _multiarch_image() -> LayoutWriter:
    writer = LayoutWriter()
    children = []
    for architecture, variant in (("amd64", None), ("arm64", "v8")):
        text = f"This is the linux/{architecture} image of the multiarch demo.\n"
        layer = writer.add_layer({"etc/arch.txt": text.encode()}, "gzip")
        children.append(
            writer.add_image(
                [layer],
                architecture=architecture,
                variant=variant,
                config={"config": {"Labels": {"demo": "multiarch"}}},
            )
        )
    index = writer.add_index(children)
    writer.tag(index, MULTIARCH_REFERENCE)
    return writer


def _app_image(busybox: _Busybox) -> LayoutWriter:
    writer = LayoutWriter()
    layers = [writer.add_layer(busybox.files, "gzip")] if busybox.runnable else []
    # gzip rather than zstd: older clients (umoci 0.4, Docker < 23) cannot unpack zstd layers.
    compression: Compression = "gzip"
    layers.append(
        writer.add_layer(
            {
                "app/run.sh": LayerFile.executable(
                    b'#!/bin/sh\necho "team/app 2.0: $(cat /app/message.txt)"\n'
                ),
                "app/message.txt": b"served from a gzip-compressed .oci archive\n",
            },
            compression,
        )
    )
    image = writer.add_image(
        layers,
        config={
            "config": {
                "Env": [_PATH_ENV],
                "Entrypoint": ["/app/run.sh"] if busybox.runnable else [],
                "WorkingDir": "/app",
                "Labels": {"org.opencontainers.image.version": "2.0"},
            }
        },
        architecture=busybox.architecture if busybox.runnable else "amd64",
        variant=busybox.variant if busybox.runnable else None,
    )
    writer.tag(image, "2.0")
    return writer


def build_demo(root: Path, busybox_binary: Path | None = DEFAULT_BUSYBOX) -> list[DemoImage]:
    """Write every demo archive under ``root`` (created if needed) and describe them."""
    busybox = _busybox(busybox_binary)
    note = "" if busybox.runnable else f"{busybox_binary} missing: files-only stand-in"
    made: list[DemoImage] = []
    for tag in ("1.36", "latest"):
        path = _busybox_image(busybox, tag).write_archive(root / "busybox" / f"{tag}.oci")
        made.append(DemoImage("busybox", tag, path, note))
    made.append(DemoImage("hello", "1.0", _hello_image().write_archive(root / "hello:1.0.oci")))
    multiarch = _multiarch_image().write_archive(root / "multiarch.oci")
    made.append(DemoImage("multiarch", "latest", multiarch, f"index.json: {MULTIARCH_REFERENCE}"))
    app = _app_image(busybox).write_archive(root / "team" / "app" / "2.0.oci", "gzip")
    made.append(DemoImage("team/app", "2.0", app, "gzip-compressed archive"))
    return made


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints ``name:tag -> file`` for each archive."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("directory", type=Path, help="where to write the demo images")
    parser.add_argument(
        "--busybox",
        type=Path,
        default=DEFAULT_BUSYBOX,
        help=f"static busybox binary to build the runnable image from (default {DEFAULT_BUSYBOX})",
    )
    args = parser.parse_args(argv)
    root: Path = args.directory
    made = build_demo(root, args.busybox)
    width = max(len(f"{image.name}:{image.tag}") for image in made)
    for image in made:
        line = f"{image.name}:{image.tag}".ljust(width)
        line += f"  ->  {image.path.relative_to(root)}"
        if image.note:
            line += f"  ({image.note})"
        print(line)
    if any(image.note.endswith("stand-in") for image in made):
        print(
            f"note: {args.busybox} not found; install Debian's busybox-static for a runnable image"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
