"""Real clients against a real registry process: skopeo pulls every kind of standard image.

Each pull lands in an OCI layout directory, which is then checked the way a consumer would:
index.json names the digest the registry advertised, and every blob file hashes to its name.
One archive is also built with real tools (umoci, then skopeo into an ``oci-archive:``) and
pulled back, so the registry is not only tested against archives of its own writer.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.images import StandardImages
from tests.server import RegistryProcess

pytestmark = pytest.mark.clients

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture(scope="module")
def skopeo() -> str:
    return require("skopeo")


def run(*command: str, cwd: Path | None = None) -> str:
    """Run a client; on failure show its output (and nothing is retried)."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert result.returncode == 0, (f"{' '.join(command)} exited {result.returncode}\n"
                                    f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return result.stdout


def pull(skopeo: str, registry: RegistryProcess, reference: str, out: Path, tag: str,
         *extra: str) -> dict[str, Any]:
    """``skopeo copy docker://HOST/reference oci:out:tag``; returns the layout's index.json."""
    run(skopeo, "copy", "--src-tls-verify=false", *extra,
        f"docker://{registry.host}/{reference}", f"oci:{out}:{tag}")
    return check_layout(out)


def check_layout(out: Path) -> dict[str, Any]:
    """Every blob of an OCI layout hashes to its file name; returns index.json."""
    assert json.loads((out / "oci-layout").read_text())["imageLayoutVersion"] == "1.0.0"
    blobs = sorted((out / "blobs" / "sha256").iterdir())
    assert blobs
    for blob in blobs:
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, blob
    index: dict[str, Any] = json.loads((out / "index.json").read_text())
    return index


def blob(out: Path, digest: str) -> bytes:
    algorithm, _, encoded = digest.partition(":")
    return (out / "blobs" / algorithm / encoded).read_bytes()


def entry(index: dict[str, Any], tag: str) -> dict[str, Any]:
    found = [m for m in index["manifests"]
             if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    assert len(found) == 1, index
    return found[0]  # type: ignore[no-any-return]


def assert_image(out: Path, manifest_digest: str, layers: list[str]) -> dict[str, Any]:
    """The pulled manifest is byte-identical and all its blobs were fetched."""
    manifest: dict[str, Any] = json.loads(blob(out, manifest_digest))
    assert [layer["digest"] for layer in manifest["layers"]] == layers
    blob(out, manifest["config"]["digest"])
    for layer in layers:
        blob(out, layer)
    return manifest


@pytest.mark.parametrize("key", ["app:1.0", "app:2.0", "pair:two", "zipped:1.0",
                                 "team/full:3.1", "bare:v1"])
def test_pull_by_tag(skopeo: str, shared_registry: RegistryProcess,
                     shared_images: StandardImages, tmp_path: Path, key: str) -> None:
    # zipped: a gzip-wrapped archive; team/full: tagged "example.com/team/full:3.1" in
    # index.json; bare: umoci-style manifest without mediaType.
    name, tag = key.rsplit(":", 1)
    out = tmp_path / "out"
    index = pull(skopeo, shared_registry, f"{name}:{tag}", out, tag)
    digest = shared_images.manifests[key]
    assert entry(index, tag)["digest"] == digest
    assert entry(index, tag)["mediaType"] == OCI_MANIFEST
    assert_image(out, digest, shared_images.layers[key])


def test_pull_by_digest(skopeo: str, shared_registry: RegistryProcess,
                        shared_images: StandardImages, tmp_path: Path) -> None:
    digest = shared_images.manifests["app:1.0"]
    out = tmp_path / "out"
    index = pull(skopeo, shared_registry, f"app@{digest}", out, "pinned")
    assert entry(index, "pinned")["digest"] == digest
    assert_image(out, digest, shared_images.layers["app:1.0"])


def test_pull_multi_arch_index(skopeo: str, shared_registry: RegistryProcess,
                               shared_images: StandardImages, tmp_path: Path) -> None:
    out = tmp_path / "out"
    index = pull(skopeo, shared_registry, "multi:latest", out, "latest", "--all",
                 "--preserve-digests")
    digest = shared_images.manifests["multi:latest"]
    top = entry(index, "latest")
    assert top["digest"] == digest and top["mediaType"] == OCI_INDEX
    pulled_index = json.loads(blob(out, digest))
    children = {m["platform"]["architecture"]: m["digest"] for m in pulled_index["manifests"]}
    assert children == shared_images.children["multi:latest"]
    layers = shared_images.layers["multi:latest"]
    for child, layer in zip(children.values(), layers, strict=True):
        assert_image(out, child, [layer])


def test_pull_one_platform_of_the_index(skopeo: str, shared_registry: RegistryProcess,
                                        shared_images: StandardImages, tmp_path: Path) -> None:
    out = tmp_path / "out"
    index = pull(skopeo, shared_registry, "multi:latest", out, "arm", "--override-arch",
                 "arm64")
    arm = shared_images.children["multi:latest"]["arm64"]
    assert entry(index, "arm")["digest"] == arm
    raw = run(skopeo, "inspect", "--tls-verify=false", "--override-arch", "arm64",
              f"docker://{shared_registry.host}/multi:latest")
    # skopeo 1.9 reports the index's digest as "Digest"; the platform shows what it read.
    assert json.loads(raw)["Architecture"] == "arm64"


@pytest.mark.parametrize("key", ["app:1.0", "multi:latest", "bare:v1", "zipped:1.0"])
def test_inspect_raw_returns_exact_bytes(skopeo: str, shared_registry: RegistryProcess,
                                         shared_images: StandardImages, key: str) -> None:
    name, tag = key.rsplit(":", 1)
    result = subprocess.run([skopeo, "inspect", "--tls-verify=false", "--raw",
                             f"docker://{shared_registry.host}/{name}:{tag}"],
                            capture_output=True, timeout=60, check=True)
    digest = shared_images.manifests[key]
    assert "sha256:" + hashlib.sha256(result.stdout).hexdigest() == digest


def test_list_tags(skopeo: str, shared_registry: RegistryProcess) -> None:
    for name, tags in (("app", ["1.0", "2.0"]), ("pair", ["one", "two"]),
                       ("team/full", ["3.1"]), ("multi", ["latest"])):
        listed = json.loads(run(skopeo, "list-tags", "--tls-verify=false",
                                f"docker://{shared_registry.host}/{name}"))
        assert sorted(listed["Tags"]) == tags


def test_pull_unknown_fails_cleanly(skopeo: str, shared_registry: RegistryProcess,
                                    tmp_path: Path) -> None:
    result = subprocess.run([skopeo, "copy", "--src-tls-verify=false",
                             f"docker://{shared_registry.host}/app:9.9",
                             f"oci:{tmp_path / 'out'}:x"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "manifest unknown" in result.stderr.lower()


def test_image_built_with_umoci_and_skopeo(skopeo: str, tmp_path: Path,
                                           start_registry: Callable[..., RegistryProcess]
                                           ) -> None:
    umoci = require("umoci")
    layout, bundle = tmp_path / "layout", tmp_path / "bundle"
    run(umoci, "init", "--layout", str(layout))
    run(umoci, "new", "--image", f"{layout}:1.0")
    run(umoci, "unpack", "--image", f"{layout}:1.0", str(bundle))
    (bundle / "rootfs" / "hello.txt").write_text("built with umoci\n")
    run(umoci, "config", "--image", f"{layout}:1.0", "--config.cmd", "/bin/true")
    run(umoci, "repack", "--image", f"{layout}:1.0", str(bundle))
    images = tmp_path / "images"
    (images / "tools").mkdir(parents=True)
    archive = images / "tools" / "built.oci"
    run(skopeo, "copy", f"oci:{layout}:1.0", f"oci-archive:{archive}:1.0")
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        built = entry(json.load(member), "1.0")

    registry = start_registry(images)
    out = tmp_path / "out"
    index = pull(skopeo, registry, "tools/built:1.0", out, "1.0")
    assert entry(index, "1.0")["digest"] == built["digest"]
    manifest = json.loads(blob(out, built["digest"]))
    assert len(manifest["layers"]) == 1
    with tarfile.open(fileobj=io.BytesIO(blob(out, manifest["layers"][0]["digest"]))) as layer:
        names = [m.lstrip("./") for m in layer.getnames()]
    assert "hello.txt" in names
    tags = json.loads(run(skopeo, "list-tags", "--tls-verify=false",
                          f"docker://{registry.host}/tools/built"))
    assert tags["Tags"] == ["1.0"]
