"""Run a rendered Kubernetes pod template with podman, field by field, the way kubelet would.

Why: the DaemonSet is how the registry is deployed, and its mistakes (a volume mounted at the
wrong path, a user that cannot write the cache, a probe on the wrong port) only show when its
pod runs. There is no kubelet here, so ``translate`` turns the pod template into ``podman run``
argument lists mechanically. Every field of the template is either translated, or named in
``NOT_HONOURED`` with the reason; a field in neither raises ``UnknownField``, so a new field in
the manifest cannot be dropped silently. The test compares the fields it met that could not be
honoured against its own explicit list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ContainerRun", "PodPlan", "Probe", "UnknownField", "NOT_HONOURED", "translate"]

# Fields the translation meets but cannot honour on one machine without a kubelet, with why.
NOT_HONOURED: dict[str, str] = {
    "spec.hostNetwork": "the pod gets a private network namespace (podman --network none, "
                        "loopback only) instead of the node's, because tests never bind fixed "
                        "ports on the machine; the registry still listens on the manifest's "
                        "port, and probes and clients join that namespace with nsenter",
    "spec.priorityClassName": "scheduling: there is no scheduler",
    "spec.tolerations": "scheduling: there is no scheduler",
    "spec.serviceAccountName": "no API server (automountServiceAccountToken: false means "
                               "nothing would be mounted anyway)",
    "containers[].ports[].hostPort": "no node network to publish on (see spec.hostNetwork)",
    "containers[].resources.requests": "scheduling only: there is no scheduler",
    "volumes[].nfs": "no NFS server: a local directory of .oci archives stands in",
    "volumes[].emptyDir.sizeLimit": "emptyDirs are plain directories; nothing evicts the pod",
}

_POD_TRANSLATED = {"containers", "initContainers", "volumes", "securityContext",
                   "terminationGracePeriodSeconds", "automountServiceAccountToken",
                   "enableServiceLinks"}
_CONTAINER_TRANSLATED = {"name", "image", "imagePullPolicy", "command", "args", "env", "envFrom",
                         "volumeMounts", "securityContext", "resources", "ports", "startupProbe",
                         "livenessProbe", "readinessProbe"}
_SECURITY_TRANSLATED = {"runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile",
                        "privileged", "allowPrivilegeEscalation", "readOnlyRootFilesystem",
                        "capabilities"}


class UnknownField(Exception):
    """A pod template field the translation neither honours nor lists as not honoured."""


@dataclass(frozen=True, slots=True)
class Probe:
    """An httpGet probe with its named port resolved to a number."""

    path: str
    port: int
    period_seconds: int
    timeout_seconds: int
    failure_threshold: int


@dataclass(frozen=True, slots=True)
class ContainerRun:
    """One container: the ``podman run`` arguments (everything after ``run``) and its probes."""

    name: str
    args: list[str]
    uid: int
    probes: dict[str, Probe]


@dataclass(frozen=True, slots=True)
class PodPlan:
    init_containers: list[ContainerRun]
    containers: list[ContainerRun]
    grace_seconds: int
    unhonoured: dict[str, str] = field(default_factory=dict)


def _quantity_bytes(text: str) -> int:
    """A Kubernetes memory quantity (binary or decimal suffix) in bytes."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", text)
    if match is None:
        raise UnknownField(f"memory quantity {text!r}")
    factors = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
               "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    return int(match[1]) * factors[match[2]]


def _cpus(text: str) -> str:
    return str(int(text[:-1]) / 1000) if text.endswith("m") else str(float(text))


def _check(keys: Any, known: set[str], where: str, notes: dict[str, str]) -> None:
    for key in keys:
        path = f"{where}.{key}"
        if key in known:
            continue
        if path in NOT_HONOURED:
            notes[path] = NOT_HONOURED[path]
            continue
        raise UnknownField(f"{path} is neither translated nor listed in NOT_HONOURED")


class _Translator:
    def __init__(self, template: dict[str, Any], config_maps: dict[str, dict[str, str]],
                 image_user: str, node_root: Path, scratch: Path,
                 nfs_stand_in: Path) -> None:
        self.spec: dict[str, Any] = template["spec"]
        self.config_maps = config_maps
        self.image_user = image_user
        self.node_root = node_root
        self.scratch = scratch
        self.nfs_stand_in = nfs_stand_in
        self.notes: dict[str, str] = {}
        self.volumes: dict[str, Path] = {}

    def plan(self) -> PodPlan:
        _check(self.spec, _POD_TRANSLATED, "spec", self.notes)
        # Both mean "inject nothing", which is what a podman run does anyway.
        assert self.spec.get("automountServiceAccountToken") is False
        assert self.spec.get("enableServiceLinks") is False
        for volume in self.spec.get("volumes", []):
            self.volumes[volume["name"]] = self._volume(volume)
        return PodPlan(
            init_containers=[self._container(c) for c in self.spec.get("initContainers", [])],
            containers=[self._container(c) for c in self.spec["containers"]],
            grace_seconds=int(self.spec.get("terminationGracePeriodSeconds", 30)),
            unhonoured=self.notes,
        )

    def _volume(self, volume: dict[str, Any]) -> Path:
        kinds = set(volume) - {"name"}
        _check(kinds, {"emptyDir", "configMap", "hostPath"}, "volumes[]", self.notes)
        path = self.scratch / "volumes" / str(volume["name"])
        if "nfs" in volume:
            assert volume["nfs"].get("readOnly", False), "the image directory is served read-only"
            return self.nfs_stand_in
        if "emptyDir" in volume:
            _check(volume["emptyDir"], set(), "volumes[].emptyDir", self.notes)
            path.mkdir(parents=True)
            path.chmod(0o777)  # kubelet makes emptyDirs world-writable
            return path
        if "configMap" in volume:
            source = volume["configMap"]
            _check(source, {"name", "defaultMode"}, "volumes[].configMap", self.notes)
            path.mkdir(parents=True)
            for key, value in self.config_maps[source["name"]].items():
                (path / key).write_text(value)
                (path / key).chmod(source.get("defaultMode", 0o644))
            return path
        source = volume["hostPath"]
        _check(source, {"path", "type"}, "volumes[].hostPath", self.notes)
        target = self.node_root / str(source["path"]).lstrip("/")
        kind = source.get("type", "")
        if kind == "DirectoryOrCreate":
            target.mkdir(parents=True, exist_ok=True)
        elif kind == "File":
            assert target.is_file(), f"hostPath {source['path']} (type File) must exist"
        elif kind == "Directory":
            assert target.is_dir(), f"hostPath {source['path']} (type Directory) must exist"
        else:
            raise UnknownField(f"hostPath type {kind!r}")
        return target

    def _security(self, container: dict[str, Any]) -> tuple[list[str], int]:
        pod = self.spec.get("securityContext", {})
        own = container.get("securityContext", {})
        _check(pod, _SECURITY_TRANSLATED, "spec.securityContext", self.notes)
        _check(own, _SECURITY_TRANSLATED, "containers[].securityContext", self.notes)
        merged = {**pod, **own}  # the container's settings win, as in Kubernetes
        image_uid, _, image_gid = self.image_user.partition(":")
        uid_text = str(merged.get("runAsUser", image_uid or "0"))
        gid = str(merged.get("runAsGroup", image_gid or uid_text))
        # kubelet refuses to start a container that would run as root under runAsNonRoot, and
        # one whose image user is a name it cannot check.
        if merged.get("runAsNonRoot"):
            assert uid_text.isdigit() and int(uid_text) != 0, f"{container['name']}: root"
        args = ["--user", f"{uid_text}:{gid}"]
        seccomp = merged.get("seccompProfile", {}).get("type", "RuntimeDefault")
        if seccomp == "Unconfined":
            args += ["--security-opt", "seccomp=unconfined"]
        elif seccomp != "RuntimeDefault":
            raise UnknownField(f"seccompProfile {seccomp}")  # podman's default is the runtime's
        if merged.get("privileged"):
            args.append("--privileged")
        if merged.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        if merged.get("readOnlyRootFilesystem"):
            # Kubernetes mounts nothing writable by itself; podman would add tmpfs on /tmp, /run.
            args += ["--read-only", "--read-only-tmpfs=false"]
        capabilities = merged.get("capabilities", {})
        _check(capabilities, {"add", "drop"}, "capabilities", self.notes)
        args += [a for cap in capabilities.get("drop", []) for a in ("--cap-drop", cap)]
        args += [a for cap in capabilities.get("add", []) for a in ("--cap-add", cap)]
        return args, int(uid_text)

    def _container(self, container: dict[str, Any]) -> ContainerRun:
        _check(container, _CONTAINER_TRANSLATED, "containers[]", self.notes)
        name = container["name"]
        args = ["--name", name, "--network", "none"]
        # IfNotPresent with the image already in local storage: no pull, as on a loaded node.
        policy = container.get("imagePullPolicy", "IfNotPresent")
        assert policy in ("IfNotPresent", "Never"), policy
        args += ["--pull", "never"]
        security, uid = self._security(container)
        args += security
        for source in container.get("envFrom", []):
            _check(source, {"configMapRef"}, "containers[].envFrom[]", self.notes)
            for key, value in self.config_maps[source["configMapRef"]["name"]].items():
                args += ["--env", f"{key}={value}"]
        for variable in container.get("env", []):
            _check(variable, {"name", "value"}, "containers[].env[]", self.notes)
            args += ["--env", f"{variable['name']}={variable['value']}"]
        for mount in container.get("volumeMounts", []):
            _check(mount, {"name", "mountPath", "readOnly"}, "containers[].volumeMounts[]",
                   self.notes)
            options = "ro" if mount.get("readOnly") else "rw"
            args += ["--volume", f"{self.volumes[mount['name']]}:{mount['mountPath']}:{options}"]
        resources = container.get("resources", {})
        _check(resources, {"limits"}, "containers[].resources", self.notes)
        limits = resources.get("limits", {})
        _check(limits, {"cpu", "memory"}, "containers[].resources.limits", self.notes)
        if "memory" in limits:
            args += ["--memory", str(_quantity_bytes(limits["memory"]))]
        if "cpu" in limits:
            args += ["--cpus", _cpus(str(limits["cpu"]))]
        ports: dict[str, int] = {}
        for port in container.get("ports", []):
            _check(port, {"name", "containerPort", "protocol"}, "containers[].ports[]",
                   self.notes)
            assert port.get("protocol", "TCP") == "TCP"
            ports[port.get("name", str(port["containerPort"]))] = int(port["containerPort"])
        probes: dict[str, Probe] = {}
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            if kind in container:
                probes[kind] = self._probe(container[kind], ports)
        # command replaces the image's ENTRYPOINT and drops its CMD; args replace CMD.
        command: list[str] = container.get("command", [])
        if command:
            args += ["--entrypoint", command[0]]
        args.append(container["image"])
        args += command[1:] + list(container.get("args", []))
        return ContainerRun(name, args, uid, probes)

    def _probe(self, probe: dict[str, Any], ports: dict[str, int]) -> Probe:
        _check(probe, {"httpGet", "periodSeconds", "timeoutSeconds", "failureThreshold"},
               "containers[].probe", self.notes)
        get = probe["httpGet"]
        _check(get, {"path", "port"}, "containers[].probe.httpGet", self.notes)
        port = get["port"]
        return Probe(path=get["path"], port=ports[port] if isinstance(port, str) else int(port),
                     period_seconds=int(probe.get("periodSeconds", 10)),
                     timeout_seconds=int(probe.get("timeoutSeconds", 1)),
                     failure_threshold=int(probe.get("failureThreshold", 3)))


def translate(template: dict[str, Any], *, config_maps: dict[str, dict[str, str]],
              image_user: str, node_root: Path, scratch: Path, nfs_stand_in: Path) -> PodPlan:
    """The podman runs of a pod template. Volumes become directories under ``scratch`` (and
    hostPath volumes paths under ``node_root``), created as kubelet would create them."""
    return _Translator(template, config_maps, image_user, node_root, scratch,
                       nfs_stand_in).plan()
