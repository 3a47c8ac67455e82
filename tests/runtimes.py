"""Private container runtimes for end-to-end pull tests: containerd, podman and buildah.

Why a helper: kubelet's runtimes keep state in system paths (/var/lib/containerd, /run/containerd,
/var/lib/containers) and answer to a system service manager this sandbox does not have. These
helpers give each test its own containerd (own root, state and sockets) and its own podman/buildah
configuration and storage, all under a scratch directory, so tests never touch or depend on a
system-wide runtime and can run side by side. See /work/shared/docs/clients.md for the recipe.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Containerd", "ContainersConfig", "containers_config", "rerooted_config", "run",
           "runc_problem"]


def run(*command: str, env: dict[str, str] | None = None, timeout: float = 120,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a client; on failure (when ``check``) raise with its whole output."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n"
                             f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return result


def _stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


class Containerd:
    """A containerd daemon of our own, without CRI, and ``ctr`` bound to its socket.

    Root and state live under ``scratch``; the sockets live in a short directory under the
    system temp dir, because a unix socket path must fit in 108 bytes and pytest's tmp paths
    can be long. ``stop`` removes leftover tasks, then stops the daemon (bounded, then killed).

    With ``node_root``, the daemon runs from that scratch node's own
    ``etc/containerd/config.toml`` instead (CRI included, as kubelet's containerd runs), its
    node paths re-rooted: see :func:`rerooted_config`.
    """

    def __init__(self, scratch: Path, node_root: Path | None = None) -> None:
        self.scratch = scratch
        self.node_root = node_root
        self.sockets = Path(tempfile.mkdtemp(prefix="ctd-"))
        self.address = str(self.sockets / "containerd.sock")
        self.config = scratch / "containerd.toml"
        self.log_path = scratch / "containerd.log"
        self.runc_root = scratch / "runc"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Containerd:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> Containerd:
        self.scratch.mkdir(parents=True, exist_ok=True)
        root, state, opt = (self.scratch / name for name in ("root", "state", "opt"))
        if self.node_root is not None:
            node_config = self.node_root / "etc/containerd/config.toml"
            self.config.write_text(rerooted_config(node_config.read_text(), {
                "/var/lib/containerd": root, "/run/containerd": state,
                "/run/containerd/containerd.sock": Path(self.address), "/opt/containerd": opt,
                "/etc/containerd": self.node_root / "etc/containerd"}))
            return self._launch(timeout)
        self.config.write_text(
            "version = 2\n"
            f'root = "{root}"\n'
            f'state = "{state}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.address}"\n'
            "[ttrpc]\n"
            f'  address = "{self.sockets / "ttrpc.sock"}"\n'
            "[debug]\n"
            '  address = ""\n'
            '  level = "info"\n'
            "[metrics]\n"
            '  address = ""\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'  # else it creates /opt/containerd
            f'  path = "{opt}"\n'
        )
        return self._launch(timeout)

    def _launch(self, timeout: float) -> Containerd:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["containerd", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                probe = self.ctr("version", check=False, timeout=10)
            except subprocess.TimeoutExpired:
                probe = subprocess.CompletedProcess([], -1, "", "ctr version timed out")
            if probe.returncode == 0:
                return self
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not come up:\n{probe.stderr}\n{self.log()}")
            time.sleep(0.1)

    def ctr(self, *args: str, namespace: str = "default", check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run("ctr", "--address", self.address, "--namespace", namespace, *args,
                   check=check, timeout=timeout)

    def cri_pull(self, image: str, timeout: float = 120) -> str:
        """Pull ``image`` through the CRI image service, as kubelet does; return the image id.

        The CRI plugin is the part of containerd that reads ``config_path`` (ctr does not), so
        this is how a test sees the node's registry configuration take effect. The request is
        CRI's ``runtime.v1.ImageService/PullImage`` (k8s.io/cri-api api.proto): a
        PullImageRequest whose field 1 is an ImageSpec whose field 1 is the image string,
        encoded by hand because only those two strings are needed; no crictl exists for this
        machine's package sources. Raises ``grpc.RpcError`` with containerd's message.
        """
        import grpc  # a test dependency only this helper needs

        def length_delimited(field: int, payload: bytes) -> bytes:
            return _varint(field << 3 | 2) + _varint(len(payload)) + payload

        request = length_delimited(1, length_delimited(1, image.encode()))
        with grpc.insecure_channel(f"unix://{self.address}") as channel:
            pull = channel.unary_unary("/runtime.v1.ImageService/PullImage",
                                       request_serializer=bytes,
                                       response_deserializer=bytes)
            response: bytes = pull(request, timeout=timeout)
        # PullImageResponse: field 1, image_ref (length-delimited, a short string).
        assert response[0] == 0x0A and response[1] < 0x80, response
        return response[2:2 + response[1]].decode()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _remove_tasks(self) -> None:
        """Kill and delete any container a failed test left behind (their shims outlive us)."""
        names = self.ctr("namespaces", "ls", "-q", check=False, timeout=10).stdout.split()
        for namespace in names:
            for task in self.ctr("tasks", "ls", "-q", namespace=namespace, check=False,
                                 timeout=10).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=namespace,
                         check=False, timeout=10)
                self.ctr("tasks", "delete", "-f", task, namespace=namespace, check=False,
                         timeout=10)
            containers = self.ctr("containers", "ls", "-q", namespace=namespace, check=False,
                                  timeout=10).stdout.split()
            if containers:
                self.ctr("containers", "rm", *containers, namespace=namespace, check=False,
                         timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                try:
                    self._remove_tasks()
                except subprocess.TimeoutExpired:
                    pass
            _stop(self.process, timeout)
            self.process = None
        shutil.rmtree(self.sockets, ignore_errors=True)


def _varint(value: int) -> bytes:
    """A protobuf base-128 varint."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def rerooted_config(text: str, roots: dict[str, Path]) -> str:
    """A node's containerd config.toml with its node paths moved under scratch directories.

    Every quoted absolute path equal to a key of ``roots``, or under a key that ends a path
    component, is rewritten; nothing else changes, so what node-setup.sh wrote (its
    ``config_path`` included, re-rooted like every other node path) is what the daemon reads.
    """
    def moved(match: re.Match[str]) -> str:
        quote, path = match.group(1), match.group(2)
        for old in sorted(roots, key=len, reverse=True):
            if path == old or path.startswith(old + "/"):
                return f"{quote}{roots[old]}{path[len(old):]}{quote}"
        return match.group(0)

    return re.sub(r"""(["'])(/[^"']*)\1""", moved, text)


@dataclass(frozen=True, slots=True)
class ContainersConfig:
    """Environment and policy for podman/buildah with everything under scratch dirs."""

    env: dict[str, str]
    policy: Path  # pass as --signature-policy
    root: Path
    runroot: Path  # a short directory of its own: remove with cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.runroot, ignore_errors=True)


def containers_config(scratch: Path, registry_host: str) -> ContainersConfig:
    """Write containers.conf, storage.conf (vfs), registries.conf (``registry_host`` insecure)
    and an accept-anything policy under ``scratch``; return the environment that selects them.

    Two settings make podman 4.3 wait out its 20 s conmon timeout after every ``podman run``
    here (the container has run and printed; podman just does not see it exit): a runroot path
    longer than about 40 characters, as pytest's tmp paths are, and a ``static_dir`` set away
    from its default under graphroot. So runroot is a short directory of its own under the
    system temp dir (``cleanup()`` removes it) and static_dir is left alone.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    runroot = Path(tempfile.mkdtemp(prefix="ctrs-"))
    (scratch / "tmp").mkdir(exist_ok=True)
    conf = scratch / "containers.conf"
    conf.write_text(
        "[containers]\n"
        'netns = "none"\n'
        # the sandbox cannot raise RLIMIT_NOFILE to podman's default
        'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
        "[engine]\n"
        'runtime = "runc"\n'  # crun 1.8 refuses this host's cgroup hybrid mode
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f'events_logfile_path = "{scratch / "events.log"}"\n'
        f'tmp_dir = "{scratch / "libpod-tmp"}"\n'
        f'image_copy_tmp_dir = "{scratch / "tmp"}"\n'
    )
    storage = scratch / "storage.conf"
    storage.write_text(
        "[storage]\n"
        'driver = "vfs"\n'
        f'runroot = "{runroot}"\n'
        f'graphroot = "{scratch / "storage"}"\n'
    )
    registries = scratch / "registries.conf"
    registries.write_text(
        "unqualified-search-registries = []\n"
        "[[registry]]\n"
        f'location = "{registry_host}"\n'
        "insecure = true\n"
    )
    policy = scratch / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    env = dict(os.environ)
    env.update(
        CONTAINERS_CONF=str(conf),
        CONTAINERS_STORAGE_CONF=str(storage),
        CONTAINERS_REGISTRIES_CONF=str(registries),
        TMPDIR=str(scratch / "tmp"),
    )
    return ContainersConfig(env, policy, scratch, runroot)


def runc_problem(scratch: Path, busybox: Path = Path("/bin/busybox")) -> str | None:
    """Why runc cannot run a container in this sandbox, or None when it can.

    Independent of the registry: a bundle made from the host's static busybox is run with
    runc directly, so a failure here is the sandbox's, and a later failure to run a pulled
    image is the image's (or the registry's).
    """
    if shutil.which("runc") is None:
        return "runc is not installed"
    if not busybox.is_file():
        return f"{busybox} is missing (Debian busybox-static), so runc cannot be probed"
    bundle = scratch / "runc-probe"
    (bundle / "rootfs" / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, bundle / "rootfs" / "bin" / "busybox")
    spec = run("runc", "spec", "--bundle", str(bundle), check=False, timeout=30)
    if spec.returncode != 0:
        return f"runc spec failed: {spec.stderr.strip()}"
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = ["/bin/busybox", "echo", "runc-probe-ok"]
    config["root"] = {"path": "rootfs", "readonly": True}
    (bundle / "config.json").write_text(json.dumps(config))
    name = f"probe-{uuid.uuid4().hex[:12]}"
    root = scratch / "runc-root"
    try:
        result = run("runc", "--root", str(root), "run", "--bundle", str(bundle), name,
                     check=False, timeout=60)
    except subprocess.TimeoutExpired:
        run("runc", "--root", str(root), "delete", "--force", name, check=False, timeout=30)
        return "runc run of a busybox bundle did not finish within 60 s"
    if result.returncode != 0 or "runc-probe-ok" not in result.stdout:
        return (f"runc cannot run a container in this sandbox (exit {result.returncode}): "
                f"{result.stderr.strip()[-500:]}")
    return None
