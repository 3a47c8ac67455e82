"""The container image, built by ``make image`` and run as the DaemonSet's pod, end to end.

The image is built the way ``make image`` builds it (scripts/build-image.sh, offline route: an
mmdebstrap Debian base, wheels installed with --no-index, no network in the build) into a
private podman storage. The kustomize base is rendered with kubectl/kustomize, and its pod
template is run by tests/podrun.py, which turns each field into podman flags mechanically and
names every field it cannot honour (``EXPECTED_NOT_HONOURED`` below must equal what it met):

* the init container runs node-setup.sh against a scratch node root, and what it writes parses;
* the registry container runs as UID 65532 on a read-only root filesystem, with the image
  directory read-only and the cache on its own volume, and its probes (played by the test, as
  kubelet plays them) and the image's HEALTHCHECK answer;
* the directory it serves holds the image's own .oci archive, which skopeo and containerd (ctr,
  configured only by the files node-setup.sh wrote) pull by the name registry.local:5000;
* SIGTERM with the pod's grace period lets a download in flight finish, and the process exits 0.

The pod gets a private network namespace instead of the node's (no fixed port is bound on this
machine): probes and clients enter it with nsenter, and registry.local resolves through the
/etc/hosts node-setup.sh wrote, bind-mounted in a private mount namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.podrun import ContainerRun, PodPlan, translate
from tests.runtimes import Containerd, ContainersConfig, containers_config, run, runc_problem

pytestmark = pytest.mark.clients

ROOT = Path(__file__).resolve().parent.parent
KUSTOMIZATION = ROOT / "deploy" / "kubernetes"

# Every field of the DaemonSet's pod template that the podman translation cannot honour. The
# translation raises on a field it does not know at all, and the test checks this list against
# what it met, so a field added to the manifest has to be handled or listed here.
EXPECTED_NOT_HONOURED = {
    "spec.hostNetwork",
    "spec.priorityClassName",
    "spec.tolerations",
    "spec.serviceAccountName",
    "containers[].ports[].hostPort",
    "containers[].resources.requests",
    "volumes[].nfs",
    "volumes[].emptyDir.sizeLimit",
}


def _cannot_run_containers(scratch: Path) -> str | None:
    """Why this machine cannot build and run the image, or None."""
    if os.geteuid() != 0:
        return "needs root: the pod's network namespace is entered with nsenter"
    for tool in ("podman", "skopeo", "mmdebstrap", "containerd", "ctr", "curl", "nsenter",
                 "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install-system-deps.sh installs it)"
    if shutil.which("kubectl") is None and shutil.which("kustomize") is None:
        return "neither kubectl nor kustomize is installed to render deploy/kubernetes"
    return runc_problem(scratch)


def _render() -> list[dict[str, Any]]:
    if shutil.which("kustomize"):
        command = ["kustomize", "build", str(KUSTOMIZATION)]
    else:
        command = ["kubectl", "kustomize", str(KUSTOMIZATION)]
    return [d for d in yaml.safe_load_all(run(*command, timeout=60).stdout) if d]


@dataclass(frozen=True, slots=True)
class Built:
    image: str  # the reference the rendered DaemonSet names, tagged in the private storage
    archive: Path
    manifest_digest: str
    build_log: str


@dataclass
class Pod:
    plan: PodPlan
    config: ContainersConfig
    node_root: Path
    volumes: Path
    built: Built
    pid: int
    init_log: str

    def podman(self, *args: str, check: bool = True,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run("podman", *args, env=self.config.env, check=check, timeout=timeout)

    def in_pod_network(self, *command: str, env: dict[str, str] | None = None,
                       timeout: float = 120, check: bool = True
                       ) -> subprocess.CompletedProcess[str]:
        """Run a host command inside the pod's network namespace, with the node's /etc/hosts
        (as node-setup.sh left it) in place of the machine's."""
        script = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
        return run("nsenter", f"--net=/proc/{self.pid}/ns/net", "unshare", "--mount",
                   "sh", "-c", script, "sh", str(self.node_root / "etc" / "hosts"), *command,
                   env=env, timeout=timeout, check=check)

    def http_status(self, path: str, port: int, timeout: int) -> int:
        result = self.in_pod_network(
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", str(timeout),
            f"http://127.0.0.1:{port}{path}", check=False, timeout=timeout + 30)
        return int(result.stdout or 0)


def _archive_manifest_digest(path: Path) -> str:
    with tarfile.open(path) as archive:
        member = archive.extractfile("index.json")
        assert member is not None
        (descriptor,) = json.load(member)["manifests"]
    return str(descriptor["digest"])


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    scratch = tmp_path_factory.mktemp("image")
    problem = _cannot_run_containers(scratch)
    if problem:
        pytest.skip(problem)
    documents = _render()
    (daemonset,) = [d for d in documents if d["kind"] == "DaemonSet"]
    config_maps = {d["metadata"]["name"]: d["data"] for d in documents if d["kind"] == "ConfigMap"}
    containers = daemonset["spec"]["template"]["spec"]["containers"]
    image = containers[0]["image"]
    name, _, tag = image.rpartition(":")

    config = containers_config(scratch / "containers", "registry.local:5000")
    images = scratch / "images"
    archive = images / "simple-oci-registry" / f"{tag}.oci"
    env = dict(config.env, IMAGE_NAME=name, IMAGE_TAG=tag, IMAGE_OCI=str(archive),
               # The root filesystem and wheel cache outlive the test run (keyed by inputs).
               IMAGE_CACHE_DIR=str(ROOT / "build" / "image-cache"))
    started = time.monotonic()
    build = run(str(ROOT / "scripts" / "build-image.sh"), env=env, timeout=900)
    build_log = f"{build.stdout}{build.stderr}(took {time.monotonic() - started:.0f} s)"
    print(build_log)
    built = Built(image, archive, _archive_manifest_digest(archive), build_log)

    node_root = scratch / "node"
    (node_root / "etc").mkdir(parents=True)
    (node_root / "etc" / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
    image_user = run("podman", "image", "inspect", "--format", "{{.Config.User}}", image,
                     env=config.env).stdout.strip()
    plan = translate(daemonset["spec"]["template"], config_maps=config_maps,
                     image_user=image_user, node_root=node_root, scratch=scratch,
                     nfs_stand_in=images)
    assert set(plan.unhonoured) == EXPECTED_NOT_HONOURED, plan.unhonoured

    names: list[str] = []
    try:
        init_log = ""
        for init in plan.init_containers:  # in order, each to completion, as kubelet does
            names.append(init.name)
            result = run("podman", "run", *init.args, env=config.env, timeout=120)
            init_log += result.stderr
            run("podman", "rm", init.name, env=config.env)
            names.pop()
        (registry,) = plan.containers
        names.append(registry.name)
        run("podman", "run", "--detach", *registry.args, env=config.env, timeout=120)
        pid = int(run("podman", "inspect", "--format", "{{.State.Pid}}", registry.name,
                      env=config.env).stdout)
        yield Pod(plan, config, node_root, scratch / "volumes", built, pid, init_log)
    finally:
        for leftover in names:
            logs = run("podman", "logs", leftover, env=config.env, check=False)
            print(f"--- {leftover} log\n{logs.stdout}{logs.stderr}")
            run("podman", "rm", "--force", "--time", "0", leftover, env=config.env,
                check=False)
        config.cleanup()


def _registry(pod: Pod) -> ContainerRun:
    (registry,) = pod.plan.containers
    return registry


def _wait_for_startup(pod: Pod) -> float:
    """Play the startup probe as kubelet does; the seconds until it first succeeds."""
    probe = _registry(pod).probes["startupProbe"]
    started = time.monotonic()
    for _ in range(probe.failure_threshold):
        status = pod.http_status(probe.path, probe.port, probe.timeout_seconds)
        if 200 <= status < 400:
            return time.monotonic() - started
        time.sleep(probe.period_seconds)
    logs = pod.podman("logs", _registry(pod).name, check=False)
    raise AssertionError(f"startup probe failed {probe.failure_threshold} times\n{logs.stderr}")


def test_the_build_is_offline_and_labelled(pod: Pod) -> None:
    labels = json.loads(pod.podman("image", "inspect", "--format", "{{json .Labels}}",
                                   pod.built.image).stdout)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.base.name"].startswith("debian:bookworm")
    config = json.loads(pod.podman("image", "inspect", pod.built.image).stdout)[0]
    assert config["Config"]["User"] == "65532:65532"
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])
    installed = pod.podman("run", "--rm", "--network", "none", "--entrypoint",
                           "/opt/venv/bin/python", pod.built.image, "-c",
                           "import importlib.metadata as m; "
                           "print('\\n'.join(f'{d.name}=={d.version}' for d in m.distributions()))"
                           ).stdout.split()
    pins = {line.lower().replace("_", "-") for line in (ROOT / "constraints.txt").read_text()
            .splitlines() if "==" in line}
    unpinned = [p for p in installed if p.lower().replace("_", "-") not in pins
                and not p.startswith("simple-oci-registry==")]
    assert not unpinned, f"installed but not pinned by constraints.txt: {unpinned}"


def test_init_container_configures_the_node(pod: Pod) -> None:
    hosts = (pod.node_root / "etc" / "hosts").read_text().splitlines()
    assert hosts[:2] == ["127.0.0.1 localhost", "::1 localhost"]
    assert hosts[2].startswith("127.0.0.1 registry.local #")
    certs = pod.node_root / "etc" / "containerd" / "certs.d" / "registry.local:5000"
    hosts_toml = tomllib.loads((certs / "hosts.toml").read_text())
    assert hosts_toml["server"] == "http://registry.local:5000"
    assert hosts_toml["host"]["http://registry.local:5000"]["capabilities"] == ["pull",
                                                                               "resolve"]
    dropin = (pod.node_root / "etc" / "containers" / "registries.conf.d"
              / "50-simple-oci-registry.conf")
    assert tomllib.loads(dropin.read_text())["registry"] == [
        {"location": "registry.local:5000", "insecure": True}]
    assert "node configured for http://registry.local:5000" in pod.init_log


def test_registry_runs_confined_and_its_probes_answer(pod: Pod) -> None:
    took = _wait_for_startup(pod)
    print(f"startup probe succeeded after {took:.1f} s")
    registry = _registry(pod)
    for kind in ("livenessProbe", "readinessProbe"):
        probe = registry.probes[kind]
        assert pod.http_status(probe.path, probe.port, probe.timeout_seconds) == 200, kind
    status = Path(f"/proc/{pod.pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert uids == ["65532"] * 4 == [str(registry.uid)] * 4
    write = 'for d in / /images /var/cache/simple-oci-registry /tmp; do ' \
            'if touch "$d/.w" 2>/dev/null; then echo "$d writable"; rm "$d/.w"; ' \
            'else echo "$d read-only"; fi; done'
    result = pod.podman("exec", registry.name, "sh", "-c", write).stdout.splitlines()
    assert result == ["/ read-only", "/images read-only",
                      "/var/cache/simple-oci-registry writable", "/tmp writable"]
    mounts = pod.podman("inspect", "--format", "{{json .Mounts}}", registry.name).stdout
    by_destination = {m["Destination"]: m for m in json.loads(mounts)}
    assert by_destination["/var/cache/simple-oci-registry"]["Source"] == str(
        pod.volumes / "cache")
    assert not by_destination["/images"]["RW"]
    # The image's own HEALTHCHECK, run by podman inside the container.
    health = pod.podman("healthcheck", "run", registry.name, check=False)
    assert health.returncode == 0, health.stderr


def test_skopeo_pulls_the_registrys_own_image(pod: Pod, tmp_path: Path) -> None:
    _wait_for_startup(pod)
    # registries.conf as node-setup.sh wrote it: plain HTTP for registry.local:5000 (skopeo
    # reads CONTAINERS_REGISTRIES_CONF not, but its --registries-conf).
    conf = ("--registries-conf", str(pod.node_root / "etc" / "containers" / "registries.conf.d"
                                     / "50-simple-oci-registry.conf"))
    env = pod.config.env
    tag = pod.built.archive.stem
    reference = f"docker://registry.local:5000/simple-oci-registry:{tag}"
    raw = pod.in_pod_network("skopeo", *conf, "inspect", "--raw", reference, env=env).stdout
    assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == pod.built.manifest_digest
    # The manifest is Docker schema 2 (for HEALTHCHECK): kept byte for byte in the OCI layout.
    pod.in_pod_network("skopeo", *conf, "copy", "--quiet", "--preserve-digests", "--format",
                       "v2s2", reference, f"oci:{tmp_path / 'copy'}:x",
                       env=env, timeout=300)
    index = json.loads((tmp_path / "copy" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == pod.built.manifest_digest


def test_containerd_pulls_it_through_node_setups_hosts_toml(pod: Pod, tmp_path: Path) -> None:
    _wait_for_startup(pod)
    containerd = Containerd(tmp_path / "containerd").start()
    try:
        tag = pod.built.archive.stem
        reference = f"registry.local:5000/simple-oci-registry:{tag}"
        hosts_dir = str(pod.node_root / "etc" / "containerd" / "certs.d")
        pod.in_pod_network("ctr", "--address", containerd.address, "images", "pull",
                           "--hosts-dir", hosts_dir, reference, timeout=300)
        listed = containerd.ctr("images", "ls").stdout
        assert pod.built.manifest_digest in listed, listed
        # Unpacked and runnable by containerd: the registry's own CLI answers.
        result = containerd.ctr("run", "--rm", "--net-host", reference, "sor-version",
                                "simple-oci-registry", "--help", timeout=120, check=False)
        assert result.returncode == 0 and "serve" in result.stdout, result.stderr
    finally:
        containerd.stop()


def test_sigterm_drains_a_download_within_the_grace_period(pod: Pod, tmp_path: Path) -> None:
    """Run last: it stops the pod. A throttled download of the largest layer is in flight when
    the pod is stopped as kubelet stops it (SIGTERM, SIGKILL after the grace period)."""
    _wait_for_startup(pod)
    with tarfile.open(pod.built.archive) as archive:
        blobs = [m for m in archive.getmembers() if m.name.startswith("blobs/sha256/")]
    largest = max(blobs, key=lambda m: m.size)
    digest = "sha256:" + largest.name.rsplit("/", 1)[1]
    seconds = 4
    rate = largest.size // seconds + 1
    out = tmp_path / "blob"
    url = f"http://127.0.0.1:5000/v2/simple-oci-registry/blobs/{digest}"
    download = subprocess.Popen(
        ["nsenter", f"--net=/proc/{pod.pid}/ns/net", "curl", "-sS", "--fail",
         "--limit-rate", str(rate), "-o", str(out), url],
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (out.exists() and out.stat().st_size > 0):
            assert download.poll() is None, download.stderr
            assert time.monotonic() < deadline, "the download did not start"
            time.sleep(0.05)
        stopped = time.monotonic()
        pod.podman("stop", "--time", str(pod.plan.grace_seconds), _registry(pod).name,
                   timeout=pod.plan.grace_seconds + 30)
        took = time.monotonic() - stopped
        assert download.wait(30) == 0, download.stderr
    finally:
        if download.poll() is None:
            download.kill()
            download.wait()
    assert "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest() == digest
    state = json.loads(pod.podman("inspect", "--format", "{{json .State}}",
                                  _registry(pod).name).stdout)
    print(f"stopped in {took:.1f} s of a {pod.plan.grace_seconds} s grace period, "
          f"exit code {state['ExitCode']}, {largest.size} bytes downloaded meanwhile")
    assert state["ExitCode"] == 0, "SIGKILLed (137) or failed: the drain overran"
    assert took < pod.plan.grace_seconds
