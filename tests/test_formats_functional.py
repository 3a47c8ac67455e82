"""Every archive users actually have, pulled end to end by real clients from a real server.

One image directory holds one archive of each kind — OCI layout directories (written by skopeo
and by the layout writer), legacy ``docker save`` archives (written by skopeo and by hand, plain
and gzip-wrapped), a Docker ≥ 25 save, Docker schema2 images and manifest lists, a nested
index, OCI artifacts with referrers, zstd and foreign layers — and the archives that cannot be
served: random bytes, an empty file, an entry with a missing blob, a layer whose bytes are not
what its media type says. Clients: skopeo for every image kind, podman for a legacy docker-save
archive and a layout directory, oras for the artifacts. Every pull is checked against digests
computed independently of the registry (the writer's, or by hashing what was written).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zstandard

from simple_oci_registry.layoutwriter import Descriptor, LayoutWriter
from tests.conftest import require
from tests.dockersave import (
    LegacyImage,
    docker25_archive,
    expected_image,
    layer_tar,
    legacy_archive,
    sha256,
)
from tests.images import small_image
from tests.runtimes import Containerd, containers_config
from tests.server import RegistryProcess

pytestmark = pytest.mark.clients

TITLE = "org.opencontainers.image.title"
HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
HELM_CHART = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
SPDX = "application/spdx+json"
SIGNATURE = "application/vnd.dev.sigstore.bundle.v0.3+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


@dataclass(slots=True)
class Formats:
    """What was written: manifest digests by ``name:tag``, and the blobs each must deliver."""

    root: Path
    digests: dict[str, str] = field(default_factory=dict)
    blobs: dict[str, list[str]] = field(default_factory=dict)  # name:tag -> config + layers
    other: dict[str, Any] = field(default_factory=dict)


def run(*command: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, (f"{' '.join(command)} exited {result.returncode}\n"
                                    f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return result.stdout


def writer_blobs(w: LayoutWriter, manifest: Descriptor) -> list[str]:
    document = w.blob_json(manifest.digest)
    return [document["config"]["digest"], *(layer["digest"] for layer in document["layers"])]


def build(root: Path, scratch: Path, skopeo: str) -> Formats:
    formats = Formats(root)
    digests, blobs = formats.digests, formats.blobs

    # -- OCI layout directories: one written by the layout writer, one by skopeo.
    w = LayoutWriter()
    image, _ = small_image(w, "writer-dir", layers=2)
    w.tag(image, "1.0")
    w.write_directory(root / "wdir" / "1.0.oci")
    digests["wdir:1.0"], blobs["wdir:1.0"] = image.digest, writer_blobs(w, image)
    w = LayoutWriter()
    image, _ = small_image(w, "skopeo-dir", layers=2)
    w.tag(image, "1.0")
    source = w.write_archive(scratch / "source.oci")
    (root / "sdir").mkdir()
    run(skopeo, "copy", "--preserve-digests", f"oci-archive:{source}:1.0",
        f"oci:{root / 'sdir' / '1.0.oci'}:1.0")
    digests["sdir:1.0"], blobs["sdir:1.0"] = image.digest, writer_blobs(w, image)

    # -- Legacy docker save: skopeo's (<hex>.tar and links), and Docker's (<id>/layer.tar,
    # a repeated layer linked, an empty layer), the latter also gzip-wrapped.
    (root / "legacy").mkdir()
    run(skopeo, "copy", f"oci-archive:{source}:1.0",
        f"docker-archive:{root / 'legacy' / '1.0.oci'}:example.com/legacy:1.0")
    # What skopeo wrote is the reference: hash its members ourselves.
    with tarfile.open(root / "legacy" / "1.0.oci") as tar:
        def member(name: str) -> bytes:
            extracted = tar.extractfile(name)
            assert extracted is not None
            return extracted.read()

        [entry] = json.loads(member("manifest.json"))
        written = expected_image(member(entry["Config"]),
                                 [member(name) for name in entry["Layers"]])
    digests["legacy:1.0"], blobs["legacy:1.0"] = written.digest, [written.config,
                                                                  *written.layers]
    base = layer_tar({"etc/base.txt": b"base\n"})
    app = layer_tar({"app/hello.txt": b"hello from a docker save\n"})
    hand = LegacyImage([base, b"\0" * 1024, app, base], ("docker.io/library/hand:1.0",))
    [written] = legacy_archive(root / "hand" / "1.0.oci", [hand])
    digests["hand:1.0"], blobs["hand:1.0"] = written.digest, [written.config, *written.layers]
    zipped = LegacyImage([base, gzip.compress(app, mtime=0)], ("zipped:2.0",))
    [written] = legacy_archive(root / "zipped" / "2.0.oci", [zipped], style="skopeo",
                               compression="gzip")
    digests["zipped:2.0"], blobs["zipped:2.0"] = written.digest, [written.config,
                                                                  *written.layers]
    formats.other["zipped"] = written.manifest
    written = docker25_archive(root / "docker25" / "1.0.oci", LegacyImage([base, app]),
                               "docker.io/library/docker25:1.0")
    digests["docker25:1.0"], blobs["docker25:1.0"] = written.digest, [written.config,
                                                                      *written.layers]

    # -- Docker schema2: a single image, and a manifest list.
    w = LayoutWriter()
    layer = w.add_layer({"docker.txt": b"docker schema2\n"})
    image = w.add_image([layer], docker=True)
    w.tag(image, "1.0")
    amd = w.add_image([w.add_layer({"amd": b"amd64\n"})], docker=True, architecture="amd64")
    arm = w.add_image([w.add_layer({"arm": b"arm64\n"})], docker=True, architecture="arm64")
    listed = w.add_index([amd, arm], docker=True)
    w.tag(listed, "list")
    w.write_archive(root / "dockerv2.oci")
    digests["dockerv2:1.0"], blobs["dockerv2:1.0"] = image.digest, writer_blobs(w, image)
    digests["dockerv2:list"] = listed.digest
    formats.other["list"] = {amd.digest: writer_blobs(w, amd), arm.digest: writer_blobs(w, arm)}

    # -- A nested index: index -> index -> per-platform manifests.
    w = LayoutWriter()
    amd, _ = small_image(w, "nested-amd", architecture="amd64")
    arm, _ = small_image(w, "nested-arm", architecture="arm64")
    inner = w.add_index([amd, arm])
    outer = w.add_index([inner])
    w.tag(outer, "1.0")
    w.write_archive(root / "nested.oci")
    digests["nested:1.0"] = outer.digest
    formats.other["nested"] = {"inner": inner.digest, "amd": amd.digest,
                               "amd-blobs": writer_blobs(w, amd)}

    # -- OCI artifacts: a Helm-like chart, and an image with an SBOM and a signature
    # attached through subject.
    w = LayoutWriter()
    chart_bytes = gzip.compress(layer_tar({"mychart/Chart.yaml": b"name: mychart\n"}), mtime=0)
    chart_layer = w.add_blob(chart_bytes, HELM_CHART,
                             annotations={TITLE: "mychart-0.1.0.tgz"})
    chart = w.add_image([chart_layer], config={"name": "mychart", "version": "0.1.0"},
                        config_media_type=HELM_CONFIG)
    w.tag(chart, "0.1.0")
    w.write_archive(root / "charts" / "mychart" / "0.1.0.oci")
    digests["charts/mychart:0.1.0"] = chart.digest
    formats.other["chart"] = chart_bytes
    w = LayoutWriter()
    app_image, _ = small_image(w, "signed")
    w.tag(app_image, "1.0")
    sbom_bytes = json.dumps({"spdxVersion": "SPDX-2.3", "name": "signed"}).encode()
    sbom = w.add_image([w.add_blob(sbom_bytes, SPDX, annotations={TITLE: "sbom.spdx.json"})],
                       artifact_type=SPDX, subject=app_image)
    signature = w.add_image([w.add_blob(b'{"signature":"x"}', SIGNATURE,
                                        annotations={TITLE: "bundle.json"})],
                            artifact_type=SIGNATURE, subject=app_image)
    w.tag(sbom, None)
    w.tag(signature, None)
    w.write_archive(root / "signed" / "1.0.oci")
    digests["signed:1.0"] = app_image.digest
    formats.other.update(sbom=sbom.digest, sbom_bytes=sbom_bytes, signature=signature.digest)

    # -- zstd layers, and a foreign (non-distributable) layer absent from the archive.
    w = LayoutWriter()
    image, _ = small_image(w, "zstd", layers=2, compression="zstd")
    w.tag(image, "1.0")
    w.write_archive(root / "zstd" / "1.0.oci")
    digests["zstd:1.0"], blobs["zstd:1.0"] = image.digest, writer_blobs(w, image)
    w = LayoutWriter()
    local = w.add_layer({"local.txt": b"shipped\n"})
    foreign = Descriptor("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                         sha256(b"foreign base"), 1234,
                         annotations={"note": "fetched from its URL"})
    config = {"rootfs": {"type": "layers", "diff_ids": [sha256(b"foreign diff"),
                                                         w.diff_id(local)]}}
    image = w.add_image([foreign, local], config=config)
    manifest = w.blob_json(image.digest)
    assert not w.has_blob(foreign.digest)
    manifest["layers"][0]["urls"] = ["https://foreign.invalid/base.tar.gz"]
    image = w.add_json(manifest, image.media_type)
    w.tag(image, "1.0")
    w.write_archive(root / "foreign" / "1.0.oci")
    digests["foreign:1.0"] = image.digest
    formats.other["foreign"] = (foreign.digest, local.digest)

    # -- What cannot be served, each beside an image that can.
    (root / "junk").mkdir()
    (root / "junk" / "1.0.oci").write_bytes(os.urandom(4096))
    (root / "junk" / "2.0.oci").write_bytes(b"")
    w = LayoutWriter()
    whole, _ = small_image(w, "whole")
    holed, holed_layers = small_image(w, "holed", layers=2)
    w.tag(whole, "whole")
    w.tag(holed, "holed")
    w.remove_blob(holed_layers[1].digest)
    w.write_archive(root / "broken.oci")
    digests["broken:whole"] = whole.digest
    formats.other["holed"] = holed_layers[1].digest
    w = LayoutWriter()
    honest, _ = small_image(w, "honest")
    liar_layer = w.add_blob(zstandard_bytes(), "application/vnd.oci.image.layer.v1.tar+gzip")
    liar = w.add_image([liar_layer], config={"rootfs": {"type": "layers",
                                                         "diff_ids": [liar_layer.digest]}})
    w.tag(honest, "honest")
    w.tag(liar, "liar")
    w.write_archive(root / "liar.oci")
    digests["liar:honest"] = honest.digest
    formats.other["liar"] = liar_layer.digest
    return formats


def zstandard_bytes() -> bytes:
    return zstandard.ZstdCompressor().compress(layer_tar({"f.txt": b"zstd inside\n"}))


@pytest.fixture(scope="module")
def skopeo() -> str:
    return require("skopeo")


@pytest.fixture(scope="module")
def formats(tmp_path_factory: pytest.TempPathFactory, skopeo: str) -> Formats:
    base = tmp_path_factory.mktemp("formats")
    (base / "images").mkdir()
    (base / "scratch").mkdir()
    return build(base / "images", base / "scratch", skopeo)


@pytest.fixture(scope="module")
def registry(formats: Formats) -> Iterator[RegistryProcess]:
    with RegistryProcess(formats.root) as process:
        yield process


# ------------------------------------------------------------------------------ helpers


def pull_dir(skopeo: str, registry: RegistryProcess, reference: str, out: Path,
             *extra: str) -> bytes:
    """``skopeo copy`` into a ``dir:`` (manifest kept as received); every blob file must hash
    to its name. Returns the top manifest's bytes."""
    run(skopeo, "copy", "--src-tls-verify=false", *extra,
        f"docker://{registry.host}/{reference}", f"dir:{out}")
    for path in out.iterdir():
        if len(path.name) == 64:
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, path
    return (out / "manifest.json").read_bytes()


def has_blobs(out: Path, digests: list[str]) -> None:
    for digest in digests:
        assert (out / digest.split(":", 1)[1]).is_file(), digest


def get(registry: RegistryProcess, path: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(registry.url + path)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


# ------------------------------------------------------------------------------ skopeo


@pytest.mark.parametrize("key", ["wdir:1.0", "sdir:1.0", "hand:1.0", "zipped:2.0",
                                 "docker25:1.0", "dockerv2:1.0", "zstd:1.0"])
def test_skopeo_pulls_each_kind(skopeo: str, registry: RegistryProcess, formats: Formats,
                                tmp_path: Path, key: str) -> None:
    # wdir/sdir: layout directories; hand: Docker-style legacy save (linked repeat, empty
    # layer); zipped: skopeo-style legacy save wrapped in gzip, one layer gzip by content;
    # docker25: OCI layout + manifest.json; dockerv2: Docker schema2; zstd: zstd layers.
    manifest = pull_dir(skopeo, registry, key, tmp_path / "out", "--preserve-digests")
    assert sha256(manifest) == formats.digests[key]
    has_blobs(tmp_path / "out", formats.blobs[key])


def test_skopeo_pulls_its_own_docker_archive(skopeo: str, registry: RegistryProcess,
                                             formats: Formats, tmp_path: Path) -> None:
    # skopeo wrote <hex>.tar layers (uncompressed) and <id>/layer.tar links to them.
    manifest = pull_dir(skopeo, registry, "legacy:1.0", tmp_path / "out", "--preserve-digests")
    assert sha256(manifest) == formats.digests["legacy:1.0"]
    document = json.loads(manifest)
    assert document["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert {layer["mediaType"] for layer in document["layers"]} == {
        "application/vnd.docker.image.rootfs.diff.tar"}
    has_blobs(tmp_path / "out", formats.blobs["legacy:1.0"])
    # By digest, too: the synthesised manifest is addressable like any other.
    again = pull_dir(skopeo, registry, f"legacy@{sha256(manifest)}", tmp_path / "again")
    assert again == manifest


def test_skopeo_pulls_a_docker_manifest_list(skopeo: str, registry: RegistryProcess,
                                             formats: Formats, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = pull_dir(skopeo, registry, "dockerv2:list", out, "--all", "--preserve-digests",
                        "--format", "v2s2")
    assert sha256(manifest) == formats.digests["dockerv2:list"]
    for child, child_blobs in formats.other["list"].items():
        child_manifest = (out / f"{child.split(':')[1]}.manifest.json").read_bytes()
        assert sha256(child_manifest) == child
        has_blobs(out, child_blobs)


def test_skopeo_pulls_through_a_nested_index(skopeo: str, registry: RegistryProcess,
                                             formats: Formats, tmp_path: Path) -> None:
    nested = formats.other["nested"]
    raw = run(skopeo, "inspect", "--raw", "--tls-verify=false",
              f"docker://{registry.host}/nested:1.0")
    assert sha256(raw.encode()) == formats.digests["nested:1.0"]
    assert [m["digest"] for m in json.loads(raw)["manifests"]] == [nested["inner"]]
    # The inner index and its images are reachable by digest through the same name.
    out = tmp_path / "out"
    manifest = pull_dir(skopeo, registry, f"nested@{nested['inner']}", out, "--all",
                        "--preserve-digests")
    assert sha256(manifest) == nested["inner"]
    has_blobs(out, nested["amd-blobs"])
    single = pull_dir(skopeo, registry, f"nested@{nested['amd']}", tmp_path / "amd")
    assert sha256(single) == nested["amd"]


def test_containerd_pulls_a_nested_index_whole(registry: RegistryProcess, formats: Formats,
                                               tmp_path: Path) -> None:
    """skopeo 1.9 refuses an index inside an index ("Unexpectedly received a manifest list");
    containerd walks it: every level, every platform."""
    require("containerd")
    require("ctr")
    daemon = Containerd(tmp_path / "containerd").start()
    try:
        reference = f"{registry.host}/nested:1.0"
        daemon.ctr("images", "pull", "--plain-http", "--all-platforms", reference)
        listed = daemon.ctr("images", "ls").stdout.splitlines()[1:]
        [line] = [entry for entry in listed if entry.startswith(reference)]
        assert line.split()[2] == formats.digests["nested:1.0"]
        nested = formats.other["nested"]
        # containerd verified each digest as it stored the content.
        content = daemon.ctr("content", "ls", "-q").stdout.split()
        assert {nested["inner"], nested["amd"], *nested["amd-blobs"]} <= set(content)
    finally:
        daemon.stop()


def test_foreign_layer_is_listed_and_not_served(skopeo: str, registry: RegistryProcess,
                                                formats: Formats, tmp_path: Path) -> None:
    foreign, local = formats.other["foreign"]
    raw = run(skopeo, "inspect", "--raw", "--tls-verify=false",
              f"docker://{registry.host}/foreign:1.0")
    assert sha256(raw.encode()) == formats.digests["foreign:1.0"]
    assert get(registry, f"/v2/foreign/blobs/{foreign}")[0] == 404
    assert get(registry, f"/v2/foreign/blobs/{local}")[0] == 200
    # An OCI layout keeps foreign layers as URLs: skopeo copies the rest and skips it.
    out = tmp_path / "out"
    run(skopeo, "copy", "--src-tls-verify=false", "--preserve-digests",
        f"docker://{registry.host}/foreign:1.0", f"oci:{out}:1.0")
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == formats.digests["foreign:1.0"]
    assert (out / "blobs" / "sha256" / local.split(":")[1]).is_file()
    assert not (out / "blobs" / "sha256" / foreign.split(":")[1]).exists()


def test_digests_of_synthesised_manifests_survive_restarts(formats: Formats,
                                                           tmp_path: Path) -> None:
    """Remembered in the blob cache, recomputed without it, in each of two workers: the
    same bytes every time (a client may pin the digest)."""
    seen = set()
    runs = [("--cache-dir", str(tmp_path / "one")), ("--cache-dir", str(tmp_path / "one")),
            ("--cache-dir", str(tmp_path / "two"), "--workers", "2"),
            ("--cache-dir", str(tmp_path / "three"), "--cache-max-bytes", "0")]
    for flags in runs:
        with RegistryProcess(formats.root, *flags,
                             log_path=tmp_path / "restart.log") as process:
            for _ in range(4):  # new connections: with two workers, both answer some
                status, headers, body = get(process, "/v2/zipped/manifests/2.0")
                assert status == 200
                assert body == formats.other["zipped"]
                seen.add(headers["Docker-Content-Digest"])
    assert seen == {formats.digests["zipped:2.0"]}
    assert list((tmp_path / "one" / "facts").iterdir())  # where the digests are remembered


# ------------------------------------------------------------------------------ podman


@pytest.fixture(scope="module")
def podman(registry: RegistryProcess,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    binary = require("podman")
    config = containers_config(tmp_path_factory.mktemp("podman"), registry.host)
    yield binary, config
    subprocess.run([binary, "rmi", "--all", "--force"], env=config.env, capture_output=True,
                   timeout=120)
    config.cleanup()


@pytest.mark.parametrize("key", ["legacy:1.0", "hand:1.0", "wdir:1.0"])
def test_podman_pulls(podman: tuple[str, Any], registry: RegistryProcess, formats: Formats,
                      key: str) -> None:
    binary, config = podman
    reference = f"{registry.host}/{key}"
    run(binary, "pull", "--tls-verify=false", "--signature-policy", str(config.policy),
        reference, env=config.env)
    inspected = json.loads(run(binary, "image", "inspect", reference, env=config.env))
    assert inspected[0]["Digest"] == formats.digests[key]
    # podman checked each layer against the config's diff_ids as it stored it.
    assert len(inspected[0]["RootFS"]["Layers"]) == len(formats.blobs[key]) - 1


# ------------------------------------------------------------------------------ oras


def test_oras_pulls_a_chart_artifact(registry: RegistryProcess, formats: Formats,
                                     tmp_path: Path) -> None:
    oras_client = pytest.importorskip("oras.client")
    client = oras_client.OrasClient(hostname=registry.host, insecure=True)
    files = client.pull(target=f"{registry.host}/charts/mychart:0.1.0", outdir=str(tmp_path))
    assert [Path(f).name for f in files] == ["mychart-0.1.0.tgz"]
    assert Path(files[0]).read_bytes() == formats.other["chart"]
    manifest = client.get_manifest(f"{registry.host}/charts/mychart:0.1.0")
    assert manifest["config"]["mediaType"] == HELM_CONFIG


def test_referrers_are_listed_and_pulled_with_oras(registry: RegistryProcess, formats: Formats,
                                                   tmp_path: Path) -> None:
    oras_client = pytest.importorskip("oras.client")
    subject = formats.digests["signed:1.0"]
    status, headers, body = get(registry, f"/v2/signed/referrers/{subject}")
    assert status == 200 and headers["Content-Type"] == OCI_INDEX
    listed = {m["digest"]: m["artifactType"] for m in json.loads(body)["manifests"]}
    assert listed == {formats.other["sbom"]: SPDX, formats.other["signature"]: SIGNATURE}
    # Encoded, as clients encode it: in a query string "+" is a space.
    status, headers, body = get(registry, f"/v2/signed/referrers/{subject}?artifactType="
                                          f"{urllib.parse.quote(SPDX, safe='')}")
    assert headers["OCI-Filters-Applied"] == "artifactType"
    assert [m["digest"] for m in json.loads(body)["manifests"]] == [formats.other["sbom"]]
    client = oras_client.OrasClient(hostname=registry.host, insecure=True)
    files = client.pull(target=f"{registry.host}/signed@{formats.other['sbom']}",
                        outdir=str(tmp_path))
    assert [Path(f).name for f in files] == ["sbom.spdx.json"]
    assert Path(files[0]).read_bytes() == formats.other["sbom_bytes"]


# ------------------------------------------------------------------------------ refusals


def error_of(registry: RegistryProcess, path: str) -> tuple[int, dict[str, Any]]:
    status, headers, body = get(registry, path)
    assert headers["Content-Type"].startswith("application/json")
    [error] = json.loads(body)["errors"]
    return status, error


@pytest.mark.parametrize(("tag", "reason"), [
    ("1.0", "not a tar, gzip or zstd archive"),
    ("2.0", "not a tar, gzip or zstd archive"),  # an empty file
])
def test_unknown_kinds_of_file_are_named_in_the_error(registry: RegistryProcess, tag: str,
                                                      reason: str) -> None:
    for _ in range(2):
        status, error = error_of(registry, f"/v2/junk/manifests/{tag}")
        assert status == 404 and error["code"] == "MANIFEST_UNKNOWN"
        assert any(reason in line and f"junk/{tag}.oci" in line
                   for line in error["detail"]["unservable"]), error
    log = registry.log()
    assert sum(f"cannot serve junk/{tag}.oci" in line for line in log.splitlines()) == 1


def test_entry_with_a_missing_blob(registry: RegistryProcess, formats: Formats) -> None:
    status, error = error_of(registry, "/v2/broken/manifests/holed")
    assert status == 404 and error["code"] == "MANIFEST_UNKNOWN"
    [rejected] = error["detail"]["rejected"]
    assert rejected.startswith("broken.oci: ")
    assert f"layer {formats.other['holed']} is missing from the archive" in rejected
    status, _, body = get(registry, "/v2/broken/manifests/whole")
    assert status == 200 and sha256(body) == formats.digests["broken:whole"]
    assert sum("skipped an entry" in line and "broken.oci" in line
               for line in registry.log().splitlines()) == 1


def test_layer_lying_about_its_media_type(registry: RegistryProcess, formats: Formats,
                                          skopeo: str, tmp_path: Path) -> None:
    for _ in range(2):
        status, error = error_of(registry, "/v2/liar/manifests/liar")
        assert status == 404 and error["code"] == "MANIFEST_UNKNOWN"
        [rejected] = error["detail"]["rejected"]
        assert (f"layer {formats.other['liar']} is declared "
                "application/vnd.oci.image.layer.v1.tar+gzip but its bytes are "
                "zstd-compressed") in rejected
    lines = [line for line in registry.log().splitlines()
             if "liar.oci" in line and "zstd-compressed" in line]
    assert len(lines) == 1
    # The honest image beside it is served, and a client sees a clear refusal for the liar.
    manifest = pull_dir(skopeo, registry, "liar:honest", tmp_path / "out")
    assert sha256(manifest) == formats.digests["liar:honest"]
    result = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false",
                             f"docker://{registry.host}/liar:liar"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "manifest unknown" in result.stderr.lower()


def traced_reads(registry: RegistryProcess, paths: list[str], scratch: Path) -> list[str]:
    """GET each path under strace; return the files that ``sendfile`` read from.

    Skips when strace cannot attach (no ptrace in the sandbox): the point is to see the
    bytes leave by sendfile from the file that holds them, which nothing else shows.
    """
    strace = require("strace")
    assert registry.process is not None
    output, errors = scratch / "strace.out", scratch / "strace.err"
    with open(errors, "w") as stderr:
        # -y: strace prints the file behind each descriptor; archives are read through a pinned
        # descriptor reopened by /proc/self/fd/N (pins.py), so the openat path alone is not it.
        tracer = subprocess.Popen([strace, "-f", "-qq", "-y", "-e", "trace=sendfile", "-o",
                                   str(output), "-p", str(registry.process.pid)],
                                  stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 10
        while not output.exists() or tracer.poll() is not None:
            if tracer.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"strace cannot attach here: {errors.read_text()[-300:]}")
            time.sleep(0.05)
        time.sleep(0.3)  # attaching to every thread takes a moment after the file appears
        for path in paths:
            assert get(registry, path)[0] == 200, path
        deadline = time.monotonic() + 10
        while output.read_text().count("sendfile(") < len(paths):
            assert time.monotonic() < deadline, output.read_text()[-2000:]
            time.sleep(0.05)
    finally:
        tracer.terminate()
        tracer.wait(30)
    sources: list[str] = []
    for line in output.read_text().splitlines():
        if (match := re.search(r"sendfile\(\d+<[^>]*>, \d+<([^>]+)>,", line)):
            sources.append(match.group(1))
    return sources


def test_blobs_go_out_by_sendfile_from_the_files_that_hold_them(
        registry: RegistryProcess, formats: Formats, tmp_path: Path) -> None:
    # A layout directory's blob from its own file; a legacy docker-save layer from its tar
    # member's window in the archive (a Range too: the window moves, the file stays).
    layer = formats.blobs["wdir:1.0"][1]
    legacy_layer = formats.blobs["hand:1.0"][3]
    sources = traced_reads(registry, [f"/v2/wdir/blobs/{layer}",
                                      f"/v2/hand/blobs/{legacy_layer}"], tmp_path)
    blob_file = formats.root / "wdir" / "1.0.oci" / "blobs" / "sha256" / layer.split(":")[1]
    assert str(blob_file) in sources
    assert str(formats.root / "hand" / "1.0.oci") in sources
