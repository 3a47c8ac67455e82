"""The standard test images, written with the project's own layout writer.

Why a module rather than fixture files: every archive is generated (deterministically) in a
temporary directory, so tests can also damage, replace or delete them freely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from simple_oci_registry.layoutwriter import Descriptor, LayoutWriter

__all__ = ["MIRROR_FILES", "StandardImages", "build_mirror_images", "build_standard_images",
           "small_image"]


@dataclass(frozen=True, slots=True)
class StandardImages:
    """What :func:`build_standard_images` wrote: digests keyed by ``name:tag``."""

    root: Path
    manifests: dict[str, str] = field(default_factory=dict)  # "name:tag" -> manifest digest
    layers: dict[str, list[str]] = field(default_factory=dict)  # "name:tag" -> layer digests
    children: dict[str, dict[str, str]] = field(default_factory=dict)  # index -> arch -> digest


def small_image(
    writer: LayoutWriter, text: str, *, architecture: str = "amd64", layers: int = 1,
    include_media_type: bool = True, compression: str = "gzip",
) -> tuple[Descriptor, list[Descriptor]]:
    """An image of ``layers`` small layers whose content depends on ``text``."""
    descs = [
        writer.add_layer({f"layer{i}/{text}.txt": f"{text} {i}\n".encode() * (i + 1)},
                         compression=compression)  # type: ignore[arg-type]
        for i in range(layers)
    ]
    image = writer.add_image(descs, architecture=architecture,
                             include_media_type=include_media_type,
                             config={"config": {"Cmd": ["/bin/true"]}})
    return image, descs


def build_standard_images(root: Path) -> StandardImages:
    """Write the suite's images under ``root``:

    * ``app/1.0.oci`` — three-layer image tagged ``1.0`` (pattern ``<name>/<ref>.oci``)
    * ``app/2.0.oci`` — another image tagged ``2.0``
    * ``multi.oci`` — a linux/amd64 + linux/arm64 index tagged ``latest`` (``<name>.oci``)
    * ``zipped:1.0.oci`` — a gzip-compressed archive tagged ``1.0`` (``<name>:<ref>.oci``)
    * ``pair.oci`` — one archive holding two tags, ``one`` and ``two``
    * ``team/full.oci`` — tagged with a full reference ``example.com/team/full:3.1``
    * ``bare/v1.oci`` — umoci-style manifest without ``mediaType``, tagged ``v1``
    """
    root.mkdir(parents=True, exist_ok=True)
    images = StandardImages(root)

    def record(key: str, image: Descriptor, layers: list[Descriptor]) -> None:
        images.manifests[key] = image.digest
        images.layers[key] = [d.digest for d in layers]

    for tag, layer_count in (("1.0", 3), ("2.0", 1)):
        w = LayoutWriter()
        image, layers = small_image(w, f"app-{tag}", layers=layer_count)
        w.tag(image, tag)
        w.write_archive(root / "app" / f"{tag}.oci")
        record(f"app:{tag}", image, layers)

    w = LayoutWriter()
    amd, amd_layers = small_image(w, "multi-amd64", architecture="amd64")
    arm, arm_layers = small_image(w, "multi-arm64", architecture="arm64")
    index = w.add_index([amd, arm])
    w.tag(index, "latest")
    w.write_archive(root / "multi.oci")
    images.manifests["multi:latest"] = index.digest
    images.children["multi:latest"] = {"amd64": amd.digest, "arm64": arm.digest}
    images.layers["multi:latest"] = [d.digest for d in amd_layers + arm_layers]

    w = LayoutWriter()
    image, layers = small_image(w, "zipped", layers=2)
    w.tag(image, "1.0")
    w.write_archive(root / "zipped:1.0.oci", compression="gzip")
    record("zipped:1.0", image, layers)

    w = LayoutWriter()
    one, one_layers = small_image(w, "pair-one")
    two, two_layers = small_image(w, "pair-two")
    w.tag(one, "one")
    w.tag(two, "two")
    w.write_archive(root / "pair.oci")
    record("pair:one", one, one_layers)
    record("pair:two", two, two_layers)

    w = LayoutWriter()
    image, layers = small_image(w, "full")
    w.tag(image, "example.com/team/full:3.1")
    w.write_archive(root / "team" / "full.oci")
    record("team/full:3.1", image, layers)

    w = LayoutWriter()  # umoci: the index.json descriptor has mediaType, the manifest none
    image, layers = small_image(w, "bare", include_media_type=False)
    w.tag(image, "v1")
    w.write_archive(root / "bare" / "v1.oci")
    record("bare:v1", image, layers)
    return images



# Upstream names as mirror mode stores them: "name:tag" -> file, tagged inside or not.
MIRROR_FILES = {
    "docker.io/library/busybox:1.36": ("docker.io/library/busybox/1.36.oci", None),
    "registry.k8s.io/pause:3.9": ("registry.k8s.io/pause:3.9.oci", "3.9"),
    "registry.k8s.io/coredns/coredns:v1.11.1": (
        "registry.k8s.io/coredns/coredns:v1.11.1.oci", None),
    "quay.io/prometheus/node-exporter:v1.8.0": (
        "quay.io/prometheus/node-exporter/v1.8.0.oci", "v1.8.0"),
    "localhost_5000/team/app:1.0": ("localhost_5000/team/app/1.0.oci", None),
}


def build_mirror_images(root: Path) -> StandardImages:
    """Write one small image per :data:`MIRROR_FILES` entry under ``root``."""
    images = StandardImages(root)
    for key, (path, tag) in MIRROR_FILES.items():
        w = LayoutWriter()
        image, layers = small_image(w, key.replace("/", "-").replace(":", "-"))
        w.tag(image, tag)
        w.write_archive(root / path)
        images.manifests[key] = image.digest
        images.layers[key] = [d.digest for d in layers]
    return images
