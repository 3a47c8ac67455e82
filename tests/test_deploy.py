"""Deployment artefacts: the Kubernetes manifests, deploy/node-setup.sh and the Containerfile.

Nothing here needs a cluster or a container engine. The manifests are read as YAML and checked
for the properties the registry depends on (ports, probes, read-only images, non-root, shutdown
timing); node-setup.sh runs against a scratch NODE_ROOT; the Containerfile is parsed, and its
HEALTHCHECK command is run against a stand-in HTTP server. When kubectl is installed, every
kustomization is also built with ``kubectl kustomize``.
"""

from __future__ import annotations

import difflib
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
BASE = K8S / "base"
SCRIPT = DEPLOY / "node-setup.sh"
CONTAINERFILE = ROOT / "Containerfile"

MARKER = "managed by simple-oci-registry node-setup"
DEFAULT_PORT = 5000

Doc = dict[str, Any]


# --------------------------------------------------------------------------- manifests: helpers

def _yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def _kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def _buildable_dirs() -> list[Path]:
    """Kustomizations that build on their own (a Component only adds to another one)."""
    return [d for d in _kustomization_dirs() if _kustomization(d)["kind"] == "Kustomization"]


def _load(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _kustomization(directory: Path) -> Doc:
    (doc,) = _load(directory / "kustomization.yaml")
    return doc


def _referenced_paths(kustomization: Doc) -> list[str]:
    """Every local path a kustomization names: resources, patches and generator files."""
    paths = list(kustomization.get("resources", []))
    paths += list(kustomization.get("components", []))
    paths += [p["path"] for p in kustomization.get("patches", []) if "path" in p]
    paths += list(kustomization.get("patchesStrategicMerge", []))
    for generator in (kustomization.get("configMapGenerator", [])
                      + kustomization.get("secretGenerator", [])):
        # "key=path" names the key explicitly.
        paths += [f.split("=", 1)[-1] for f in generator.get("files", [])]
        paths += list(generator.get("envs", []))
    return paths


def _base_resources() -> list[Doc]:
    docs: list[Doc] = []
    for name in _kustomization(BASE)["resources"]:
        docs += _load(BASE / name)
    return docs


def _generated_config() -> dict[str, str]:
    """The simple-oci-registry-config ConfigMap, as the base's configMapGenerator makes it."""
    for generator in _kustomization(BASE)["configMapGenerator"]:
        if generator["name"] == "simple-oci-registry-config":
            return dict(literal.split("=", 1) for literal in generator["literals"])
    raise AssertionError("base kustomization generates no simple-oci-registry-config")


def _daemonset(docs: list[Doc]) -> Doc:
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    return ds


def _pod(ds: Doc) -> Doc:
    pod: Doc = ds["spec"]["template"]["spec"]
    return pod


def _container(pod: Doc, name: str, *, init: bool = False) -> Doc:
    key = "initContainers" if init else "containers"
    (container,) = [c for c in pod[key] if c["name"] == name]
    return container


def _env(container: Doc) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _volume(pod: Doc, name: str) -> Doc:
    (volume,) = [v for v in pod["volumes"] if v["name"] == name]
    return volume


def _mount_at(container: Doc, path: str) -> Doc:
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == path]
    return mount


def _quantity(value: str | int) -> int:
    """A Kubernetes binary or plain quantity ("10Gi", "512Mi", "1000") in bytes."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(value))
    assert match, f"unsupported quantity {value!r}"
    factor = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    return int(match[1]) * factor[match[2]]


def _listen_port(env: dict[str, str]) -> int:
    return int(env.get("SOR_LISTEN", f"0.0.0.0:{DEFAULT_PORT}").rpartition(":")[2])


def _probe_port(container: Doc, port: str | int) -> int:
    if isinstance(port, int):
        return port
    (named,) = [p for p in container["ports"] if p.get("name") == port]
    return int(named["containerPort"])


@pytest.fixture(scope="module")
def base() -> list[Doc]:
    return _base_resources()


@pytest.fixture(scope="module")
def pod(base: list[Doc]) -> Doc:
    return _pod(_daemonset(base))


@pytest.fixture(scope="module")
def registry(pod: Doc) -> Doc:
    return _container(pod, "registry")


@pytest.fixture(scope="module")
def node_setup(pod: Doc) -> Doc:
    return _container(pod, "node-setup", init=True)


# --------------------------------------------------------------------------- manifests: files

@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_parses(path: Path) -> None:
    docs = _load(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict)
        assert {"apiVersion", "kind"} <= doc.keys(), f"{path}: a document lacks apiVersion/kind"


@pytest.mark.parametrize("directory", _kustomization_dirs(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_lists_every_file(directory: Path) -> None:
    referenced = _referenced_paths(_kustomization(directory))
    for name in referenced:
        assert (directory / name).exists(), f"{directory}/kustomization.yaml names missing {name}"
    local = {str(p.relative_to(directory)) for p in directory.iterdir()
             if p.is_file() and p.name != "kustomization.yaml"}
    missing = local - set(referenced)
    assert not missing, f"not listed in {directory}/kustomization.yaml: {sorted(missing)}"


def test_every_overlay_builds_on_the_base() -> None:
    overlays = [d for d in _kustomization_dirs() if d.parent.name == "overlays"]
    assert overlays
    for overlay in overlays:
        assert "../../base" in _kustomization(overlay)["resources"]
    assert _kustomization(K8S)["resources"] == ["base"]


def test_configmap_generator_ships_node_setup_sh() -> None:
    (generator,) = [g for g in _kustomization(BASE)["configMapGenerator"]
                    if g["name"] == "simple-oci-registry-node-setup"]
    assert generator["files"] == ["node-setup.sh"]
    # deploy/node-setup.sh is the same file (kustomize only reads files below its root).
    assert (BASE / "node-setup.sh").resolve() == SCRIPT.resolve()
    assert os.access(SCRIPT, os.X_OK)


# --------------------------------------------------------------------------- manifests: DaemonSet

def test_probes_hit_health_endpoints_on_the_container_port(registry: Doc) -> None:
    port = _listen_port(_env(registry))
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz",
                "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        get = registry[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _probe_port(registry, get["port"]) == port, probe


def test_ports_agree_everywhere(pod: Doc, registry: Doc, base: list[Doc]) -> None:
    port = _listen_port(_env(registry))
    assert port == DEFAULT_PORT
    (declared,) = registry["ports"]
    assert declared["containerPort"] == port
    assert declared.get("hostPort", port) == port
    assert pod.get("hostNetwork") is True or declared.get("hostPort") == port
    assert int(_generated_config()["REGISTRY_PORT"]) == port
    annotations = _daemonset(base)["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port


def test_images_are_mounted_read_only(pod: Doc, registry: Doc) -> None:
    env = _env(registry)
    mount = _mount_at(registry, env["SOR_DIR"])
    assert mount["readOnly"] is True
    volume = _volume(pod, mount["name"])
    assert "nfs" in volume or "hostPath" in volume
    if "nfs" in volume:
        assert volume["nfs"]["readOnly"] is True
    # Nothing else in the pod mounts the images writable.
    for container in pod["containers"] + pod.get("initContainers", []):
        for m in container.get("volumeMounts", []):
            if m["name"] == mount["name"]:
                assert m.get("readOnly") is True, container["name"]


def test_overlays_keep_the_images_read_only() -> None:
    for path in (K8S / "overlays").rglob("*.yaml"):
        for doc in _load(path):
            if doc["kind"] == "PersistentVolume":
                assert doc["spec"]["accessModes"] == ["ReadOnlyMany"]
                assert doc["spec"]["nfs"]["readOnly"] is True
                assert "ro" in doc["spec"]["mountOptions"]
            if doc["kind"] == "PersistentVolumeClaim":
                assert doc["spec"]["accessModes"] == ["ReadOnlyMany"]
            if doc["kind"] == "DaemonSet":
                for volume in _pod(doc).get("volumes", []):
                    if volume["name"] == "images" and "persistentVolumeClaim" in volume:
                        assert volume["persistentVolumeClaim"]["readOnly"] is True


def test_registry_security_context(pod: Doc, registry: Doc) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    ctx = registry["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx.get("runAsUser", pod["securityContext"]["runAsUser"]) != 0
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert not ctx["capabilities"].get("add")
    assert ctx.get("privileged", False) is False
    seccomp = ctx.get("seccompProfile") or pod["securityContext"].get("seccompProfile")
    assert seccomp == {"type": "RuntimeDefault"}
    assert pod.get("automountServiceAccountToken") is False


def test_init_container_is_root_but_unprivileged(pod: Doc, node_setup: Doc) -> None:
    ctx = node_setup["securityContext"]
    assert ctx.get("privileged", False) is False
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert not ctx["capabilities"].get("add")
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_writable_paths_are_volumes(pod: Doc, registry: Doc) -> None:
    """A read-only root filesystem leaves the cache and /tmp to emptyDirs."""
    env = _env(registry)
    for path in (env["SOR_CACHE_DIR"], "/tmp"):
        mount = _mount_at(registry, path)
        assert not mount.get("readOnly")
        assert "emptyDir" in _volume(pod, mount["name"])


def test_cache_limit_fits_its_volume(pod: Doc, registry: Doc) -> None:
    """An emptyDir that outgrows its sizeLimit gets the pod evicted."""
    env = _env(registry)
    volume = _volume(pod, _mount_at(registry, env["SOR_CACHE_DIR"])["name"])
    assert int(env["SOR_CACHE_MAX_BYTES"]) < _quantity(volume["emptyDir"]["sizeLimit"])


def test_shutdown_drains_within_the_grace_period(pod: Doc, registry: Doc) -> None:
    timeout = float(_env(registry)["SOR_SHUTDOWN_TIMEOUT"])
    assert timeout == 25
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["terminationGracePeriodSeconds"] > timeout


def test_runs_on_every_node_first(pod: Doc, base: list[Doc]) -> None:
    assert {"operator": "Exists"} in pod["tolerations"]
    classes = {d["metadata"]["name"]: d for d in base if d["kind"] == "PriorityClass"}
    name = pod["priorityClassName"]
    assert name in classes or name in ("system-node-critical", "system-cluster-critical")
    if name in classes:
        assert classes[name]["value"] >= 1_000_000
        assert classes[name].get("globalDefault", False) is False


def test_rolls_one_node_at_a_time(base: list[Doc]) -> None:
    strategy = _daemonset(base)["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 1
    # The old and the new pod cannot share the node's port.
    assert strategy["rollingUpdate"].get("maxSurge", 0) == 0


def test_resources_are_bounded(pod: Doc) -> None:
    for container in pod["containers"] + pod["initContainers"]:
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys(), container["name"]
        assert "memory" in resources["limits"], container["name"]
        assert (_quantity(resources["requests"]["memory"])
                <= _quantity(resources["limits"]["memory"])), container["name"]


def test_init_container_writes_the_mounted_host_paths(pod: Doc, node_setup: Doc) -> None:
    env = _env(node_setup)
    node_root = env["NODE_ROOT"]
    mounts = {m["mountPath"]: m for m in node_setup["volumeMounts"]}
    for host_path in ("/etc/hosts", "/etc/containerd/certs.d",
                      "/etc/containers/registries.conf.d"):
        mount = mounts[node_root + host_path]
        assert not mount.get("readOnly"), host_path
        assert _volume(pod, mount["name"])["hostPath"]["path"] == host_path
    assert _volume(pod, mounts[node_root + "/etc/hosts"]["name"])["hostPath"]["type"] == "File"
    # The registry container itself touches no host path.
    host_volumes = {v["name"] for v in pod["volumes"] if "hostPath" in v}
    assert not host_volumes & {m["name"] for m in _container(pod, "registry")["volumeMounts"]}


def test_init_container_runs_the_generated_script(pod: Doc, node_setup: Doc) -> None:
    script = node_setup["command"][-1]
    mount = _mount_at(node_setup, str(Path(script).parent))
    volume = _volume(pod, mount["name"])
    assert volume["configMap"]["name"] == "simple-oci-registry-node-setup"
    assert Path(script).name == "node-setup.sh"
    refs = [e["configMapRef"]["name"] for e in node_setup["envFrom"]]
    assert refs == ["simple-oci-registry-config"]
    assert node_setup["image"] == _container(pod, "registry")["image"]


def test_generated_config_holds_node_setup_settings() -> None:
    config = _generated_config()
    assert config["REGISTRY_HOST"] == "registry.local"
    assert config["REGISTRY_ALIAS_IP"] == "127.0.0.1"
    assert config["REGISTRY_TLS"] == "false"
    assert config["MIRROR_REGISTRIES"] == ""  # mirror mode is opt-in
    assert config["MIRROR_FALLBACK"] == "true"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("directory", _buildable_dirs(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomize_builds(directory: Path) -> None:
    """The build resolves generators, patches and name references the way kubectl apply -k will."""
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    ds = _daemonset(docs)
    pod = _pod(ds)
    assert ds["metadata"]["namespace"] == "simple-oci-registry"
    registry = _container(pod, "registry")
    images = _mount_at(registry, _env(registry)["SOR_DIR"])
    assert images["readOnly"] is True
    images_volume = _volume(pod, images["name"])
    assert sum(k in images_volume for k in ("nfs", "hostPath", "persistentVolumeClaim")) == 1
    # Generated names carry a hash suffix; references to them must follow.
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    node_setup = _container(pod, "node-setup", init=True)
    assert node_setup["envFrom"][0]["configMapRef"]["name"] in config_maps
    assert _volume(pod, "node-setup")["configMap"]["name"] in config_maps
    assert ":" in registry["image"]


# --------------------------------------------------------------------------- node-setup.sh

def _shells() -> list[list[str]]:
    shells = [[path] for name in ("dash", "sh") if (path := shutil.which(name))][:1]
    if busybox := shutil.which("busybox"):
        shells.append([busybox, "sh"])
    return shells


@pytest.fixture(params=_shells(), ids=lambda s: Path(s[0]).name)
def shell(request: pytest.FixtureRequest) -> list[str]:
    shell: list[str] = request.param
    return shell


@pytest.fixture
def node_root(tmp_path: Path) -> Path:
    root = tmp_path / "node"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost\n"
                                        "10.0.0.5 node-a.example node-a\n")
    return root


def _run(shell: list[str], node_root: Path | None, check: bool = True,
         **settings: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **settings}
    if node_root is not None:
        env["NODE_ROOT"] = str(node_root)
    return subprocess.run([*shell, str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=30, check=check)


def _alias_lines(node_root: Path) -> list[str]:
    return [line for line in (node_root / "etc/hosts").read_text().splitlines()
            if MARKER in line]


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def test_node_setup_twice_gives_one_configuration(shell: list[str], node_root: Path) -> None:
    _run(shell, node_root)
    first = _snapshot(node_root)
    _run(shell, node_root)
    assert _snapshot(node_root) == first, "a second run must change nothing"

    hosts_toml = node_root / "etc/containerd/certs.d/registry.local:5000/hosts.toml"
    config = tomllib.loads(hosts_toml.read_text())
    assert config["server"] == "http://registry.local:5000"
    assert config["host"] == {"http://registry.local:5000": {"capabilities": ["pull", "resolve"]}}

    dropin = node_root / "etc/containers/registries.conf.d/50-simple-oci-registry.conf"
    assert tomllib.loads(dropin.read_text()) == {
        "registry": [{"location": "registry.local:5000", "insecure": True}]}

    lines = (node_root / "etc/hosts").read_text().splitlines()
    assert _alias_lines(node_root) == [f"127.0.0.1 registry.local # {MARKER}"]
    assert lines[:3] == ["127.0.0.1 localhost", "::1 localhost ip6-localhost",
                         "10.0.0.5 node-a.example node-a"]
    assert len(lines) == 4


def test_node_setup_replaces_an_old_alias(shell: list[str], node_root: Path) -> None:
    _run(shell, node_root)
    _run(shell, node_root, REGISTRY_HOST="images.cluster.internal", REGISTRY_PORT="5443",
         REGISTRY_ALIAS_IP="10.0.0.5")
    assert _alias_lines(node_root) == [f"10.0.0.5 images.cluster.internal # {MARKER}"]
    certs_d = node_root / "etc/containerd/certs.d"
    assert [p.name for p in certs_d.iterdir()] == ["images.cluster.internal:5443"]
    dropin = node_root / "etc/containers/registries.conf.d/50-simple-oci-registry.conf"
    (registry,) = tomllib.loads(dropin.read_text())["registry"]
    assert registry["location"] == "images.cluster.internal:5443"


def test_node_setup_leaves_other_registries_alone(shell: list[str], node_root: Path) -> None:
    other = node_root / "etc/containerd/certs.d/docker.io/hosts.toml"
    other.parent.mkdir(parents=True)
    other.write_text('server = "https://registry-1.docker.io"\n')
    _run(shell, node_root)
    _run(shell, node_root, REGISTRY_HOST="other.local")
    assert other.read_text() == 'server = "https://registry-1.docker.io"\n'


def test_node_setup_edits_etc_hosts_in_place(shell: list[str], node_root: Path) -> None:
    """In the pod /etc/hosts is a single-file bind mount, which rename(2) cannot replace."""
    hosts = node_root / "etc/hosts"
    hosts.write_text("127.0.0.1 localhost")  # no final newline
    inode = hosts.stat().st_ino
    _run(shell, node_root)
    assert hosts.stat().st_ino == inode
    assert hosts.read_text() == f"127.0.0.1 localhost\n127.0.0.1 registry.local # {MARKER}\n"


def test_node_setup_creates_etc_hosts_when_missing(shell: list[str], node_root: Path) -> None:
    (node_root / "etc/hosts").unlink()
    _run(shell, node_root)
    assert (node_root / "etc/hosts").read_text() == f"127.0.0.1 registry.local # {MARKER}\n"


def test_node_setup_tls_variant(shell: list[str], node_root: Path, tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    _run(shell, node_root, REGISTRY_TLS="true", REGISTRY_CA_FILE=str(ca))
    _run(shell, node_root, REGISTRY_TLS="true", REGISTRY_CA_FILE=str(ca))
    host_dir = node_root / "etc/containerd/certs.d/registry.local:5000"
    config = tomllib.loads((host_dir / "hosts.toml").read_text())
    assert config["server"] == "https://registry.local:5000"
    host = config["host"]["https://registry.local:5000"]
    # containerd reads the path on the node, so it must not contain NODE_ROOT.
    assert host["ca"] == "/etc/containerd/certs.d/registry.local:5000/simple-oci-registry-ca.crt"
    assert (host_dir / "simple-oci-registry-ca.crt").read_text() == ca.read_text()
    dropin = node_root / "etc/containers/registries.conf.d/50-simple-oci-registry.conf"
    assert tomllib.loads(dropin.read_text())["registry"][0]["insecure"] is False
    containers_ca = node_root / "etc/containers/certs.d/registry.local:5000"
    assert (containers_ca / "simple-oci-registry-ca.crt").read_text() == ca.read_text()

    # Back to plain HTTP: the CA reference goes away with TLS.
    _run(shell, node_root)
    assert "ca" not in tomllib.loads((host_dir / "hosts.toml").read_text())["host"][
        "http://registry.local:5000"]
    assert not (host_dir / "simple-oci-registry-ca.crt").exists()


def test_node_setup_parts_can_be_skipped(shell: list[str], node_root: Path) -> None:
    before = (node_root / "etc/hosts").read_text()
    _run(shell, node_root, SETUP_ETC_HOSTS="false", SETUP_CONTAINERS="false")
    assert (node_root / "etc/hosts").read_text() == before
    assert not (node_root / "etc/containers").exists()
    assert (node_root / "etc/containerd/certs.d/registry.local:5000/hosts.toml").is_file()


def test_node_setup_warns_about_missing_config_path(shell: list[str], node_root: Path) -> None:
    config = node_root / "etc/containerd/config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n')
    assert "config_path" in _run(shell, node_root).stderr
    config.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
                      '  config_path = "/etc/containerd/certs.d"\n')
    assert "config_path" not in _run(shell, node_root).stderr


def test_node_setup_warns_about_a_hand_written_alias(shell: list[str], node_root: Path) -> None:
    hosts = node_root / "etc/hosts"
    hosts.write_text(hosts.read_text() + "10.9.9.9 registry.local\n")
    assert "another entry" in _run(shell, node_root).stderr


@pytest.mark.parametrize("settings", [
    {"REGISTRY_HOST": 'bad"name'},
    {"REGISTRY_HOST": "-leading-dash"},
    {"REGISTRY_PORT": "0"},
    {"REGISTRY_PORT": "65536"},
    {"REGISTRY_PORT": "05000"},
    {"REGISTRY_PORT": "http"},
    {"REGISTRY_ALIAS_IP": "127.0.0.1 evil"},
    {"REGISTRY_TLS": "maybe"},
    {"REGISTRY_TLS": "true", "REGISTRY_CA_FILE": "/nonexistent/ca.crt"},
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_node_setup_rejects_bad_settings(shell: list[str], node_root: Path,
                                         settings: dict[str, str]) -> None:
    before = _snapshot(node_root)
    result = _run(shell, node_root, check=False, **settings)
    assert result.returncode != 0
    assert "error" in result.stderr
    assert _snapshot(node_root) == before


# ------------------------------------------------------------- node-setup.sh: mirror mode

MIRRORS_DROPIN = "etc/containers/registries.conf.d/50-simple-oci-registry-mirrors.conf"


def _hosts_toml(node_root: Path, host: str) -> dict[str, Any]:
    return tomllib.loads((node_root / "etc/containerd/certs.d" / host / "hosts.toml").read_text())


def test_mirror_with_fallback(shell: list[str], node_root: Path) -> None:
    """Online site: containerd asks the node-local registry first, then the upstream;
    containers/image gets a mirror whose path is the upstream's host folder."""
    settings = {"MIRROR_REGISTRIES": "docker.io  Registry.K8s.io\tquay.io index.docker.io "
                                     "myreg.example:8443"}
    _run(shell, node_root, **settings)
    first = _snapshot(node_root)
    _run(shell, node_root, **settings)
    assert _snapshot(node_root) == first, "a second run must change nothing"

    local = {"http://registry.local:5000": {"capabilities": ["pull", "resolve"]}}
    assert _hosts_toml(node_root, "docker.io") == {
        "server": "https://registry-1.docker.io", "host": local}
    assert _hosts_toml(node_root, "registry.k8s.io") == {
        "server": "https://registry.k8s.io", "host": local}
    assert _hosts_toml(node_root, "myreg.example:8443")["server"] == "https://myreg.example:8443"
    certs_d = sorted(p.name for p in (node_root / "etc/containerd/certs.d").iterdir())
    assert certs_d == ["docker.io", "myreg.example:8443", "quay.io", "registry.k8s.io",
                       "registry.local:5000"]  # index.docker.io is docker.io

    registries = tomllib.loads((node_root / MIRRORS_DROPIN).read_text())["registry"]
    assert [(r["prefix"], r["location"], r["mirror"]) for r in registries] == [
        (host, host, [{"location": f"registry.local:5000/{folder}", "insecure": True}])
        for host, folder in [("docker.io", "docker.io"), ("registry.k8s.io", "registry.k8s.io"),
                             ("quay.io", "quay.io"),
                             ("myreg.example:8443", "myreg.example_8443")]]


def test_mirror_air_gapped(shell: list[str], node_root: Path) -> None:
    """MIRROR_FALLBACK=false: nothing names the upstream as a place to connect to."""
    _run(shell, node_root, MIRROR_REGISTRIES="docker.io registry.k8s.io", MIRROR_FALLBACK="false")
    assert _hosts_toml(node_root, "docker.io") == {
        "server": "http://registry.local:5000",
        "host": {"http://registry.local:5000": {"capabilities": ["pull", "resolve"]}}}
    registries = tomllib.loads((node_root / MIRRORS_DROPIN).read_text())["registry"]
    assert registries == [
        {"prefix": "docker.io", "location": "registry.local:5000/docker.io", "insecure": True},
        {"prefix": "registry.k8s.io", "location": "registry.local:5000/registry.k8s.io",
         "insecure": True}]


def test_mirror_with_tls(shell: list[str], node_root: Path, tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    tls = {"REGISTRY_TLS": "true", "REGISTRY_CA_FILE": str(ca), "MIRROR_REGISTRIES": "quay.io"}
    _run(shell, node_root, **tls)
    ca_path = "/etc/containerd/certs.d/registry.local:5000/simple-oci-registry-ca.crt"
    assert _hosts_toml(node_root, "quay.io")["host"] == {"https://registry.local:5000": {
        "capabilities": ["pull", "resolve"], "ca": ca_path}}
    _run(shell, node_root, **tls, MIRROR_FALLBACK="false")
    assert _hosts_toml(node_root, "quay.io") == {
        "server": "https://registry.local:5000", "host": {"https://registry.local:5000": {
            "capabilities": ["pull", "resolve"], "ca": ca_path}}}
    (registry,) = tomllib.loads((node_root / MIRRORS_DROPIN).read_text())["registry"]
    assert registry["insecure"] is False


def test_mirror_configuration_follows_the_setting(shell: list[str], node_root: Path) -> None:
    """Upstreams dropped from MIRROR_REGISTRIES lose their files; hand-written ones stay."""
    theirs = node_root / "etc/containerd/certs.d/ghcr.io/hosts.toml"
    theirs.parent.mkdir(parents=True)
    theirs.write_text('server = "https://ghcr.io"\n')
    _run(shell, node_root, MIRROR_REGISTRIES="docker.io quay.io")
    _run(shell, node_root, MIRROR_REGISTRIES="quay.io")
    certs_d = node_root / "etc/containerd/certs.d"
    assert sorted(p.name for p in certs_d.iterdir()) == ["ghcr.io", "quay.io",
                                                          "registry.local:5000"]
    assert "docker.io" not in (node_root / MIRRORS_DROPIN).read_text()
    _run(shell, node_root)
    assert sorted(p.name for p in certs_d.iterdir()) == ["ghcr.io", "registry.local:5000"]
    assert not (node_root / MIRRORS_DROPIN).exists()
    assert theirs.read_text() == 'server = "https://ghcr.io"\n'


def test_mirror_refuses_to_replace_a_hand_written_hosts_toml(shell: list[str],
                                                            node_root: Path) -> None:
    theirs = node_root / "etc/containerd/certs.d/docker.io/hosts.toml"
    theirs.parent.mkdir(parents=True)
    theirs.write_text('server = "https://mirror.example"\n')
    result = _run(shell, node_root, check=False, MIRROR_REGISTRIES="quay.io docker.io")
    assert result.returncode != 0 and "not written by node-setup" in result.stderr
    assert theirs.read_text() == 'server = "https://mirror.example"\n'
    assert not (node_root / "etc/containerd/certs.d/quay.io").exists()


@pytest.mark.parametrize("entry", [
    "docker.io/library", "../etc", "host:", "host:0", "host:123456", ":5000", "-a.io",
    'a"b.io', "a.io:1:2", "host:port", "registry.local:5000",
])
def test_mirror_rejects_bad_entries(shell: list[str], node_root: Path, entry: str) -> None:
    before = _snapshot(node_root)
    result = _run(shell, node_root, check=False, MIRROR_REGISTRIES=f"docker.io {entry}")
    assert result.returncode != 0 and "MIRROR_REGISTRIES" in result.stderr
    assert _snapshot(node_root) == before


def test_mirror_fallback_must_be_a_boolean(shell: list[str], node_root: Path) -> None:
    result = _run(shell, node_root, check=False, MIRROR_REGISTRIES="quay.io",
                  MIRROR_FALLBACK="perhaps")
    assert result.returncode != 0 and "perhaps" in result.stderr


# ------------------------------------------------- node-setup.sh: containerd's config_path

# containerd 2.x's "containerd config default", abridged: version 3, single quotes, the CRI
# image plugin's empty config_path and the transfer plugin's own config_path (not ours).
CONTAINERD_2_CONFIG = """version = 3
root = '/var/lib/containerd'
state = '/run/containerd'

[grpc]
  address = '/run/containerd/containerd.sock'

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    max_concurrent_downloads = 3

    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = 'registry.k8s.io/pause:3.10'

    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = ''

    [plugins.'io.containerd.cri.v1.images'.image_decryption]
      key_model = 'node'

  [plugins.'io.containerd.transfer.v1.local']
    max_concurrent_downloads = 3
    config_path = '/etc/docker/certs.d'
"""
CERTS_D = "/etc/containerd/certs.d"


def _containerd_1_config() -> str:
    """containerd 1.6's own "config default" (Debian's containerd package)."""
    if shutil.which("containerd") is None:
        pytest.skip("containerd is not installed")
    return subprocess.run(["containerd", "config", "default"], capture_output=True, text=True,
                          check=True, timeout=30).stdout


def _config_path_run(shell: list[str], node_root: Path, text: str,
                     check: bool = True) -> subprocess.CompletedProcess[str]:
    config = node_root / "etc/containerd/config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    if text:
        config.write_text(text)
    return _run(shell, node_root, check=check, SETUP_ETC_HOSTS="false",
                SETUP_CONTAINERS="false", SETUP_CONTAINERD_CONFIG_PATH="true")


def _changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    diff = [line for line in difflib.ndiff(before.splitlines(), after.splitlines())
            if line[:2] in ("- ", "+ ")]
    return [(line[0], line[2:]) for line in diff]


@pytest.mark.parametrize("version", ["1.x", "2.x"])
def test_config_path_is_set_in_both_layouts(shell: list[str], node_root: Path,
                                           version: str) -> None:
    original = _containerd_1_config() if version == "1.x" else CONTAINERD_2_CONFIG
    result = _config_path_run(shell, node_root, original)
    assert "restart" in result.stderr and "containerd" in result.stderr
    config = node_root / "etc/containerd/config.toml"
    patched = config.read_text()
    parsed = tomllib.loads(patched)
    if version == "1.x":
        registry = parsed["plugins"]["io.containerd.grpc.v1.cri"]["registry"]
        assert _changed_lines(original, patched) == [
            ("-", '      config_path = ""'), ("+", f'      config_path = "{CERTS_D}"')]
    else:
        registry = parsed["plugins"]["io.containerd.cri.v1.images"]["registry"]
        assert _changed_lines(original, patched) == [
            ("-", "      config_path = ''"), ("+", f'      config_path = "{CERTS_D}"')]
        # Another plugin's config_path is not ours to change.
        assert parsed["plugins"]["io.containerd.transfer.v1.local"]["config_path"] == \
            "/etc/docker/certs.d"
    assert registry["config_path"] == CERTS_D
    backup = node_root / "etc/containerd/config.toml.before-simple-oci-registry"
    assert backup.read_text() == original

    # Idempotent: a second run changes nothing and asks for no restart.
    before = _snapshot(node_root)
    again = _config_path_run(shell, node_root, "")
    assert "restart" not in again.stderr
    assert _snapshot(node_root) == before


@pytest.mark.parametrize("original, table", [
    # no registry table at all: appended
    ("version = 2\n[plugins]\n  [plugins.\"io.containerd.grpc.v1.cri\"]\n"
     "    sandbox_image = \"registry.k8s.io/pause:3.9\"\n",
     ("io.containerd.grpc.v1.cri", "registry")),
    # the table without the key: the key goes right under its header
    ("version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\n"
     "[plugins.'io.containerd.cri.v1.images'.registry.headers]\n  X = ['y']\n",
     ("io.containerd.cri.v1.images", "registry")),
    # the table last in the file, with a comment and an unrelated key
    ("# node config\nversion = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n"
     "  # mirrors live in certs.d\n",
     ("io.containerd.grpc.v1.cri", "registry")),
])
def test_config_path_is_added_where_missing(shell: list[str], node_root: Path, original: str,
                                            table: tuple[str, str]) -> None:
    _config_path_run(shell, node_root, original)
    patched = (node_root / "etc/containerd/config.toml").read_text()
    parsed = tomllib.loads(patched)
    assert parsed["plugins"][table[0]][table[1]]["config_path"] == CERTS_D
    assert [kind for kind, _ in _changed_lines(original, patched)] in (["+"], ["+", "+", "+"])
    assert "headers" not in original or parsed["plugins"][table[0]]["registry"]["headers"] == {
        "X": ["y"]}


@pytest.mark.parametrize("original, message", [
    ("", "not found"),
    ("[grpc]\n  address = '/run/containerd/containerd.sock'\n", "version = 2"),
    ("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n"
     "  config_path = \"/etc/elsewhere\"\n", "another directory"),
    ("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n"
     "  endpoint = [\"https://mirror.example\"]\n", "mirrors"),
])
def test_config_path_refuses_what_it_must_not_decide(shell: list[str], node_root: Path,
                                                      original: str, message: str) -> None:
    config = node_root / "etc/containerd/config.toml"
    if not original:
        config.parent.mkdir(parents=True, exist_ok=True)
    result = _config_path_run(shell, node_root, original, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert (config.read_text() if original else not config.exists()) in (original, True)
    assert not (node_root / "etc/containerd/config.toml.before-simple-oci-registry").exists()


def test_config_path_already_listed_is_left_alone(shell: list[str], node_root: Path) -> None:
    original = ("version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\n"
                "  config_path = '/etc/containerd/certs.d:/etc/docker/certs.d'\n")
    result = _config_path_run(shell, node_root, original)
    assert "restart" not in result.stderr
    assert (node_root / "etc/containerd/config.toml").read_text() == original


def test_node_setup_requires_node_root(shell: list[str], tmp_path: Path) -> None:
    """Without NODE_ROOT it stops before touching anything (it would edit this machine)."""
    result = subprocess.run([*shell, str(SCRIPT)], env={"PATH": os.environ.get("PATH", "")},
                            cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "NODE_ROOT" in result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_node_setup_passes_shellcheck() -> None:
    subprocess.run(["shellcheck", "--shell=sh", str(SCRIPT)], check=True, timeout=60)


# --------------------------------------------------------------------------- Containerfile

def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, args = pending.partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _instructions(path):
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def _env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in stage:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def _healthcheck_command() -> list[str]:
    (args,) = [a for k, a in _stages(CONTAINERFILE)[-1] if k == "HEALTHCHECK"]
    command: list[str] = json.loads(args[args.index("CMD") + len("CMD"):])
    return command


def test_containerfile_is_multi_stage_on_one_base() -> None:
    stages = _stages(CONTAINERFILE)
    assert len(stages) >= 2
    bases = [args.split()[0] for stage in stages for k, args in stage if k == "FROM"]
    assert set(bases) == {"${BASE_IMAGE}"}, "the venv needs the same interpreter in every stage"
    runtime = stages[-1]
    assert any(k == "COPY" and args.startswith("--from=") for k, args in runtime)
    builder = " ".join(args for _, args in stages[0])
    # Wheels only, from the build context: nothing in the build may reach an index.
    assert "--no-index" in builder and "--constraint /constraints.txt" in builder


def test_containerfile_runtime_stage() -> None:
    runtime = _stages(CONTAINERFILE)[-1]
    users = [args for k, args in runtime if k == "USER"]
    assert users, "the runtime stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric, non-root UID"
    assert ("EXPOSE", "5000") in runtime
    env = _env_of(runtime)
    assert env["SOR_DIR"] == "/images"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert _listen_port(env) == 5000
    assert json.loads(dict(runtime)["ENTRYPOINT"]) == ["simple-oci-registry"]
    assert json.loads(dict(runtime)["CMD"]) == ["serve"]
    assert "/healthz" in " ".join(_healthcheck_command())


def test_containerfile_matches_the_daemonset(registry: Doc) -> None:
    image_env = _env_of(_stages(CONTAINERFILE)[-1])
    pod_env = _env(registry)
    for key in ("SOR_DIR", "SOR_CACHE_DIR", "SOR_LISTEN"):
        assert image_env[key] == pod_env[key], key
    users = [args for k, args in _stages(CONTAINERFILE)[-1] if k == "USER"]
    assert int(users[-1].split(":")[0]) == registry["securityContext"]["runAsUser"]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def _run_healthcheck(listen: str) -> int:
    command = _healthcheck_command()
    assert command[0] == "python"
    env = {"PATH": os.environ.get("PATH", ""), "SOR_LISTEN": listen}
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True,
                          timeout=30).returncode


def test_healthcheck_command(health_server: http.server.ThreadingHTTPServer,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    port = health_server.server_address[1]
    # A wildcard listen address is checked on loopback.
    assert _run_healthcheck(f"0.0.0.0:{port}") == 0
    assert _run_healthcheck(f"127.0.0.1:{port}") == 0
    monkeypatch.setattr(_Health, "status", 503)
    assert _run_healthcheck(f"0.0.0.0:{port}") != 0


def test_healthcheck_fails_without_a_server(health_server: http.server.ThreadingHTTPServer
                                            ) -> None:
    port = health_server.server_address[1]
    health_server.shutdown()
    health_server.server_close()
    assert _run_healthcheck(f"127.0.0.1:{port}") != 0
