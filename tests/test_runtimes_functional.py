"""End-to-end pulls by the runtimes kubelet drives (containerd via ctr) and by podman/buildah.

Every test talks to one real registry process serving the standard images plus the demo images
of ``tools/make_demo.py`` (a runnable busybox). Each client gets private state under the test's
tmp dir (its own containerd daemon, its own podman/buildah storage), so the tests are
independent of each other and of any runtime installed on the machine. Pulled images are checked
against the digests the archives were written with, not against what the registry says.
Running a container needs runc to work in this sandbox: that is probed separately (with runc
alone, no registry), and only the run step is skipped when it cannot.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simple_oci_registry.layoutwriter import LayoutWriter
from tests.conftest import require
from tests.images import StandardImages, build_standard_images, small_image
from tests.runtimes import Containerd, ContainersConfig, containers_config, run, runc_problem
from tests.server import RegistryProcess


def _load_make_demo() -> Any:
    """tools/make_demo.py as a module, without putting tools/ on sys.path."""
    path = Path(__file__).resolve().parent.parent / "tools" / "make_demo.py"
    spec = importlib.util.spec_from_file_location("_sor_make_demo", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


make_demo = _load_make_demo()

pytestmark = pytest.mark.clients

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "node-setup.sh"
UPSTREAM_BUSYBOX = "docker.io/library/busybox:1.36"
UPSTREAM_BUSYBOX_FILE = "docker.io/library/busybox/1.36.oci"
UPSTREAM_PAUSE = "registry.k8s.io/pause:3.9"
UPSTREAM_PAUSE_FILE = "registry.k8s.io/pause:3.9.oci"
UPSTREAM_MISSING = "docker.io/library/nginx:1.25"


# ---------------------------------------------------------------------------------------------
# The registry and what it serves


class Served:
    """The registry process and the digests of everything it serves, read from the archives."""

    def __init__(self, registry: RegistryProcess, images: StandardImages,
                 demo: list[Any]) -> None:
        self.registry = registry
        self.images = images
        self.demo = {f"{d.name}:{d.tag}": d for d in demo}

    @property
    def host(self) -> str:
        return self.registry.host

    def busybox(self) -> tuple[str, list[str], str]:
        """The demo busybox:1.36 image: manifest digest, layer digests, and any caveat."""
        demo = self.demo["busybox:1.36"]
        digest, layers = archive_image(demo.path)
        return digest, layers, demo.note


def archive_image(path: Path) -> tuple[str, list[str]]:
    """Manifest digest and layer digests of a one-image archive, read from its own bytes."""
    with tarfile.open(path, "r:*") as archive:
        def member(name: str) -> bytes:
            for candidate in (name, f"./{name}"):
                try:
                    extracted = archive.extractfile(candidate)
                except KeyError:
                    continue
                assert extracted is not None
                return extracted.read()
            raise KeyError(name)

        index = json.loads(member("index.json"))
        (descriptor,) = index["manifests"]
        digest = descriptor["digest"]
        manifest = json.loads(member("blobs/" + digest.replace(":", "/")))
    return digest, [layer["digest"] for layer in manifest["layers"]]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("runtimes") / "images"
    images = build_standard_images(root)
    demo = make_demo.build_demo(root)  # busybox/1.36.oci and the rest, beside the standard ones
    # Mirror mode: upstream names under their host folders (README, "Mirror mode").
    busybox = next(d for d in demo if (d.name, d.tag) == ("busybox", "1.36"))
    (root / UPSTREAM_BUSYBOX_FILE).parent.mkdir(parents=True)
    shutil.copyfile(busybox.path, root / UPSTREAM_BUSYBOX_FILE)
    writer = LayoutWriter()
    pause, _ = small_image(writer, "pause")
    writer.tag(pause, "3.9")
    writer.write_archive(root / UPSTREAM_PAUSE_FILE)
    with RegistryProcess(root) as registry:
        yield Served(registry, images, demo)


@pytest.fixture(scope="module")
def runc_blocker(tmp_path_factory: pytest.TempPathFactory) -> str | None:
    """Why containers cannot run here (None when they can), found without the registry."""
    return runc_problem(tmp_path_factory.mktemp("runc"))


def skip_run_unless_possible(runc_blocker: str | None, note: str) -> None:
    if note:
        pytest.skip(f"demo busybox image is not runnable: {note}")
    if runc_blocker is not None:
        pytest.skip(f"pull checked; not running it: {runc_blocker}")


# ---------------------------------------------------------------------------------------------
# containerd / ctr


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    require("containerd")
    require("ctr")
    daemon = Containerd(tmp_path / "containerd").start()
    try:
        yield daemon
    finally:
        daemon.stop()


def ctr_images(containerd: Containerd) -> dict[str, tuple[str, str]]:
    """``ctr images ls``: reference -> (media type, digest)."""
    lines = containerd.ctr("images", "ls").stdout.splitlines()[1:]
    images = {}
    for line in lines:
        ref, media_type, digest = line.split()[:3]
        images[ref] = (media_type, digest)
    return images


def ctr_content(containerd: Containerd) -> set[str]:
    return set(containerd.ctr("content", "ls", "-q").stdout.split())


def ctr_json(containerd: Containerd, digest: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(containerd.ctr("content", "get", digest).stdout)
    return document


def assert_ctr_image(containerd: Containerd, ref: str, digest: str, layers: list[str]) -> None:
    """containerd recorded ``ref`` at ``digest`` as an OCI manifest and holds all its blobs."""
    assert ctr_images(containerd)[ref] == (OCI_MANIFEST, digest)
    manifest = ctr_json(containerd, digest)
    assert [layer["digest"] for layer in manifest["layers"]] == layers
    content = ctr_content(containerd)
    missing = {digest, manifest["config"]["digest"], *layers} - content
    assert not missing, f"not in containerd's content store: {missing}"


@pytest.mark.parametrize("key, by_digest", [
    ("app:1.0", False),   # tag
    ("app:2.0", True),    # @sha256:...
    ("zipped:1.0", False),  # from a gzip-compressed archive
    ("bare:v1", False),   # umoci-style: no mediaType in the manifest, type from Content-Type
], ids=["tag", "digest", "gzip-archive", "umoci-manifest"])
def test_ctr_pulls_image(served: Served, containerd: Containerd, key: str,
                         by_digest: bool) -> None:
    name, tag = key.split(":")
    digest = served.images.manifests[key]
    ref = f"{served.host}/{name}@{digest}" if by_digest else f"{served.host}/{name}:{tag}"
    containerd.ctr("images", "pull", "--plain-http", ref)
    assert_ctr_image(containerd, ref, digest, served.images.layers[key])


def test_ctr_pulls_index_all_platforms(served: Served, containerd: Containerd) -> None:
    ref = f"{served.host}/multi:latest"
    containerd.ctr("images", "pull", "--plain-http", "--all-platforms", ref)
    index_digest = served.images.manifests["multi:latest"]
    assert ctr_images(containerd)[ref] == (OCI_INDEX, index_digest)
    children = served.images.children["multi:latest"]
    index = ctr_json(containerd, index_digest)
    assert {m["digest"] for m in index["manifests"]} == set(children.values())
    content = ctr_content(containerd)
    configs = {ctr_json(containerd, child)["config"]["digest"] for child in children.values()}
    missing = {index_digest, *children.values(), *configs,
               *served.images.layers["multi:latest"]} - content
    assert not missing, f"not in containerd's content store: {missing}"


def test_ctr_pulls_one_platform_of_index(served: Served, containerd: Containerd) -> None:
    ref = f"{served.host}/multi:latest"
    containerd.ctr("images", "pull", "--plain-http", "--platform", "linux/arm64", ref)
    index_digest = served.images.manifests["multi:latest"]
    assert ctr_images(containerd)[ref] == (OCI_INDEX, index_digest)
    children = served.images.children["multi:latest"]
    content = ctr_content(containerd)
    assert children["arm64"] in content
    assert children["amd64"] not in content  # only the asked-for platform was fetched
    arm64 = ctr_json(containerd, children["arm64"])
    arm64_layers = [layer["digest"] for layer in arm64["layers"]]
    assert set(arm64_layers) <= set(served.images.layers["multi:latest"])
    missing = {index_digest, arm64["config"]["digest"], *arm64_layers} - content
    assert not missing, f"not in containerd's content store: {missing}"
    assert not (set(served.images.layers["multi:latest"]) - set(arm64_layers)) & content


# ---------------------------------------------------------------------------------------------
# Mirror mode: upstream names, with the runtime configuration node-setup.sh writes


def node_setup(served: Served, node_root: Path, **settings: str) -> str:
    """Run deploy/node-setup.sh on a scratch node for the test registry, air-gapped mirrors
    of docker.io and registry.k8s.io; return what it printed."""
    (node_root / "etc").mkdir(parents=True, exist_ok=True)
    host, port = served.host.rsplit(":", 1)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NODE_ROOT": str(node_root),
           "REGISTRY_HOST": host, "REGISTRY_PORT": port, "SETUP_ETC_HOSTS": "false",
           "MIRROR_REGISTRIES": "docker.io registry.k8s.io", "MIRROR_FALLBACK": "false",
           **settings}
    done = subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stderr


def upstream_image(served: Served, file: str) -> tuple[str, list[str]]:
    return archive_image(served.images.root / file)


def test_ctr_pulls_upstream_names_through_node_setup_hosts_toml(
        served: Served, containerd: Containerd, tmp_path: Path) -> None:
    """containerd as a node mirror of docker.io and registry.k8s.io: every request reaches us
    as /v2/<upstream path>?ns=<upstream> and is answered from the host folder."""
    node_root = tmp_path / "node"
    node_setup(served, node_root)
    certs_d = node_root / "etc/containerd/certs.d"
    for upstream in ("docker.io", "registry.k8s.io"):
        assert served.host in (certs_d / upstream / "hosts.toml").read_text()
    log_start = len(served.registry.log())
    for ref, file in ((UPSTREAM_BUSYBOX, UPSTREAM_BUSYBOX_FILE),
                      (UPSTREAM_PAUSE, UPSTREAM_PAUSE_FILE)):
        containerd.ctr("images", "pull", "--hosts-dir", str(certs_d), ref)
        digest, layers = upstream_image(served, file)
        assert_ctr_image(containerd, ref, digest, layers)

    digest, layers = upstream_image(served, UPSTREAM_BUSYBOX_FILE)
    expected = ['"HEAD /v2/library/busybox/manifests/1.36?ns=docker.io" 200',
                f'"GET /v2/library/busybox/manifests/{digest}?ns=docker.io" 200',
                *(f'"GET /v2/library/busybox/blobs/{layer}?ns=docker.io" 200'
                  for layer in layers)]
    requests = access_log_until(served.registry, log_start, "/v2/library/busybox/", expected)
    assert all("?ns=docker.io" in line for line in requests), requests
    access_log_until(served.registry, log_start, "/v2/pause/",
                     ['"HEAD /v2/pause/manifests/3.9?ns=registry.k8s.io" 200'])

    # Not in the directory: a clean failure, answered here (there is no upstream to try).
    missing = containerd.ctr("images", "pull", "--hosts-dir", str(certs_d), UPSTREAM_MISSING,
                             check=False)
    assert missing.returncode != 0
    assert f"{UPSTREAM_MISSING}: not found" in missing.stderr, missing.stderr
    access_log_until(served.registry, log_start, "/v2/library/nginx/",
                     ['"HEAD /v2/library/nginx/manifests/1.25?ns=docker.io" 404'])
    assert UPSTREAM_MISSING not in ctr_images(containerd)


def test_containerd_1_6_reads_the_config_path_node_setup_set(served: Served,
                                                              tmp_path: Path) -> None:
    """issue 13: the node's own containerd 1.6 config (its 'config default'), given
    config_path by node-setup.sh, makes the CRI plugin -- what kubelet pulls through -- use
    the hosts.toml files node-setup.sh wrote."""
    require("containerd")
    node_root = tmp_path / "node"
    config = node_root / "etc/containerd/config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(run("containerd", "config", "default").stdout)
    printed = node_setup(served, node_root, SETUP_CONTAINERD_CONFIG_PATH="true")
    assert "restart" in printed
    assert 'config_path = "/etc/containerd/certs.d"' in config.read_text()

    daemon = Containerd(tmp_path / "containerd", node_root=node_root).start()
    try:
        for ref, file in ((UPSTREAM_BUSYBOX, UPSTREAM_BUSYBOX_FILE),
                          (UPSTREAM_PAUSE, UPSTREAM_PAUSE_FILE)):
            digest, layers = upstream_image(served, file)
            image_id = daemon.cri_pull(ref)
            manifest = json.loads(daemon.ctr("content", "get", digest,
                                             namespace="k8s.io").stdout)
            assert image_id == manifest["config"]["digest"]  # CRI's image id is the config
            images = daemon.ctr("images", "ls", namespace="k8s.io").stdout
            assert any(line.split()[:1] == [ref] and digest in line
                       for line in images.splitlines()), images
        with pytest.raises(Exception, match="not found") as caught:
            daemon.cri_pull(UPSTREAM_MISSING)
        assert "registry-1.docker.io" not in str(caught.value)
    finally:
        daemon.stop()
    assert "failed to decode hosts.toml" not in daemon.log()


def access_log_until(registry: RegistryProcess, start: int, path: str,
                     expected: list[str]) -> list[str]:
    """Access-log lines for ``path`` written after offset ``start``, once every ``expected``
    fragment is among them (a line is written as its response ends, so allow it a moment)."""
    for _ in range(100):
        lines = [line for line in registry.log()[start:].splitlines() if path in line]
        if all(any(fragment in line for line in lines) for fragment in expected):
            return lines
        time.sleep(0.1)
    missing = [f for f in expected if not any(f in line for line in lines)]
    raise AssertionError(f"not in the registry's access log: {missing}\n" + "\n".join(lines))


def test_ctr_pulls_and_runs_demo_busybox(served: Served, containerd: Containerd,
                                         runc_blocker: str | None) -> None:
    digest, layers, note = served.busybox()
    ref = f"{served.host}/busybox:1.36"
    containerd.ctr("images", "pull", "--plain-http", ref)
    assert_ctr_image(containerd, ref, digest, layers)

    skip_run_unless_possible(runc_blocker, note)
    container = f"sor-{uuid.uuid4().hex[:12]}"
    result = containerd.ctr("run", "--rm", "--runc-root", str(containerd.runc_root),
                            ref, container, "/bin/busybox", "echo", "hello from ctr",
                            timeout=60)
    assert result.stdout.strip() == "hello from ctr"


# ---------------------------------------------------------------------------------------------
# podman


@pytest.fixture
def podman(served: Served, tmp_path: Path) -> Iterator[ContainersConfig]:
    require("podman")
    config = containers_config(tmp_path / "podman", served.host)
    yield config
    run("podman", "rm", "--all", "--force", env=config.env, check=False, timeout=60)
    config.cleanup()


def podman_run(config: ContainersConfig, *args: str, timeout: float = 120) -> str:
    return run("podman", *args, env=config.env, timeout=timeout).stdout


def podman_pull(config: ContainersConfig, ref: str, *extra: str) -> None:
    podman_run(config, "pull", "--quiet", "--tls-verify=false",
               "--signature-policy", str(config.policy), *extra, ref)


def podman_digest(config: ContainersConfig, ref: str) -> str:
    return podman_run(config, "image", "inspect", "--format", "{{.Digest}}", ref).strip()


@pytest.mark.parametrize("key, by_digest", [
    ("app:1.0", False),
    ("app:2.0", True),
    ("zipped:1.0", False),
    ("bare:v1", False),
], ids=["tag", "digest", "gzip-archive", "umoci-manifest"])
def test_podman_pulls_image(served: Served, podman: ContainersConfig, key: str,
                            by_digest: bool) -> None:
    name, tag = key.split(":")
    digest = served.images.manifests[key]
    ref = f"{served.host}/{name}@{digest}" if by_digest else f"{served.host}/{name}:{tag}"
    podman_pull(podman, ref)
    assert podman_digest(podman, ref) == digest
    repo_digests = json.loads(podman_run(podman, "image", "inspect", "--format",
                                         "{{json .RepoDigests}}", ref))
    assert f"{served.host}/{name}@{digest}" in repo_digests


def test_podman_pulls_arm64_of_index(served: Served, podman: ContainersConfig) -> None:
    ref = f"{served.host}/multi:latest"
    podman_pull(podman, ref, "--arch", "arm64")
    assert podman_digest(podman, ref) == served.images.manifests["multi:latest"]
    architecture, repo_digests = podman_run(
        podman, "image", "inspect", "--format", "{{.Architecture}} {{json .RepoDigests}}", ref
    ).split(" ", 1)
    assert architecture == "arm64"
    arm64 = served.images.children["multi:latest"]["arm64"]
    assert f"{served.host}/multi@{arm64}" in json.loads(repo_digests)


def test_podman_pulls_and_runs_demo_busybox(served: Served, podman: ContainersConfig,
                                            runc_blocker: str | None) -> None:
    digest, _layers, note = served.busybox()
    ref = f"{served.host}/busybox:1.36"
    podman_pull(podman, ref)
    assert podman_digest(podman, ref) == digest

    skip_run_unless_possible(runc_blocker, note)
    output = podman_run(podman, "run", "--rm", ref, "echo", "hello from podman", timeout=60)
    assert output.strip() == "hello from podman"


def test_podman_pulls_and_runs_upstream_busybox_through_node_setup_dropin(
        served: Served, podman: ContainersConfig, tmp_path: Path,
        runc_blocker: str | None) -> None:
    """containers/image with the registries.conf.d drop-in node-setup.sh wrote: the docker.io
    prefix is rewritten to <registry>/docker.io, so the request path carries the host."""
    node_root = tmp_path / "node"
    node_setup(served, node_root)
    # The user-level drop-in directory is read beside CONTAINERS_REGISTRIES_CONF: point it
    # at the node's, so podman reads exactly the files node-setup.sh wrote.
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    (home / ".config" / "containers").symlink_to(node_root / "etc" / "containers")
    env = {**podman.env, "HOME": str(home)}
    log_start = len(served.registry.log())
    run("podman", "pull", "--quiet", "--signature-policy", str(podman.policy),
        UPSTREAM_BUSYBOX, env=env)
    digest, _layers = upstream_image(served, UPSTREAM_BUSYBOX_FILE)
    inspected = run("podman", "image", "inspect", "--format", "{{.Digest}}", UPSTREAM_BUSYBOX,
                    env=env).stdout.strip()
    assert inspected == digest
    access_log_until(served.registry, log_start, "/v2/docker.io/library/busybox/",
                     ['"GET /v2/docker.io/library/busybox/manifests/1.36" 200'])

    missing = run("podman", "pull", "--quiet", "--signature-policy", str(podman.policy),
                  UPSTREAM_MISSING, env=env, check=False)
    # Air-gapped: the error names the node-local registry, not docker.io.
    assert missing.returncode != 0, missing.stderr
    assert f"in {served.host}/docker.io/library/nginx: name unknown" in missing.stderr

    skip_run_unless_possible(runc_blocker, served.busybox()[2])
    output = run("podman", "run", "--rm", UPSTREAM_BUSYBOX, "echo", "hello from docker.io",
                 env=env, timeout=60).stdout
    assert output.strip() == "hello from docker.io"


# ---------------------------------------------------------------------------------------------
# buildah


@pytest.fixture
def buildah(served: Served, tmp_path: Path) -> Iterator[ContainersConfig]:
    require("buildah")
    config = containers_config(tmp_path / "buildah", served.host)
    yield config
    run("buildah", "rm", "--all", env=config.env, check=False, timeout=60)
    config.cleanup()


def test_buildah_from_and_run_demo_busybox(served: Served, buildah: ContainersConfig,
                                           runc_blocker: str | None) -> None:
    digest, _layers, note = served.busybox()
    ref = f"{served.host}/busybox:1.36"
    name = f"sor-{uuid.uuid4().hex[:12]}"
    run("buildah", "from", "--quiet", "--name", name, "--tls-verify=false",
        "--signature-policy", str(buildah.policy), ref, env=buildah.env)
    inspected = json.loads(run("buildah", "inspect", "--type", "container", name,
                               env=buildah.env).stdout)
    assert inspected["FromImage"] == ref
    assert inspected["FromImageDigest"] == digest
    assert inspected["Container"] == name

    skip_run_unless_possible(runc_blocker, note)
    output = run("buildah", "run", name, "--", "echo", "hello from buildah", env=buildah.env,
                 timeout=60).stdout
    assert output.strip() == "hello from buildah"
