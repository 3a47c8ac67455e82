"""The documentation is tested: every shell command README.md and docs/*.md tell a user to run.

Why: a guide whose commands fail is worse than none, and docs drift silently while the code they
describe is refactored. So every fenced shell block (``sh``, ``bash``, ``shell``, ``console``,
and an unlabelled block whose lines start with ``$ ``) must carry a marker on the line right
before its opening fence, an HTML comment that GitHub does not render:

``<!-- doc-test: run NAME -->``
    the block runs here, exactly as written, through the runner ``NAME`` of :data:`RUNNERS`,
    from a fresh scratch directory (a copy of the checkout's tracked files where the command
    names repository paths). The runner only prepares what the surrounding prose says exists
    and swaps placeholders through :data:`SUBSTITUTIONS`, an explicit, reviewed table.
``<!-- doc-test: KIND: why -->`` with KIND one of :data:`EXAMPLE_KINDS`
    an example this machine cannot run (a cluster, the internet, an NFS server, root on a real
    node, CI itself). What can be checked of those still is: every kustomization the docs name
    is built with ``kubectl kustomize`` and its objects are validated against the Kubernetes
    OpenAPI schemas bundled in the ``kubernetes-validate`` package (offline, strict: unknown
    fields fail), and node-setup.sh runs on a scratch root.

A block without a marker, a marker naming no runner, or a runner no block uses fails the suite,
naming the file and line, so a doc change cannot add an untested command silently.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from simple_oci_registry.layoutwriter import LayoutWriter
from tests.images import small_image
from tests.runtimes import Containerd, containers_config
from tests.server import RegistryProcess

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = frozenset({"sh", "bash", "shell", "console"})
K8S = ROOT / "deploy" / "kubernetes"

# What each example marker means; the reason after the colon says which part of it applies.
EXAMPLE_KINDS = {
    "needs-cluster": "kubectl or a registry of the cluster's own",
    "needs-node": "root on a real cluster node: writes its /etc, restarts or uses its runtime",
    "needs-internet": "pulls from a registry this machine cannot reach",
    "needs-nfs": "an NFS server",
    "ci": "what CI itself runs (running it from a test would recurse)",
}

# Placeholders of the docs and what a runner puts in their place. Only these are ever replaced,
# and only by the runners that name them; everything else runs exactly as written.
SUBSTITUTIONS = {
    "registry.local:5000": "127.0.0.1:PORT of the test's registry: the docs' node alias needs "
                           "the /etc/hosts line node-setup.sh writes on a node",
    "/tmp/bb": "SCRATCH/bb: the test writes nothing outside its scratch directory",
    "/tmp/x": "SCRATCH/x: the same scratch node root, inside the test's scratch directory",
    "/export/oci-images": "SCRATCH/oci-images: the NFS export, as a local directory",
    "/etc/": "NODE_ROOT/etc/: the uninstall commands run on the scratch node root that "
             "node-setup.sh configured, never on this machine's /etc",
    "127.0.0.1:5000": "127.0.0.1:PORT, only when port 5000 is taken on this machine; the "
                      "server is then started with LISTEN=127.0.0.1:PORT, as README says",
}

MARKER = re.compile(r"^<!-- doc-test: (?P<kind>[a-z-]+)"
                    r"(?: (?P<name>[a-z0-9-]+))?(?:: (?P<reason>.+?))? -->$")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>.*)$")


@dataclass(frozen=True, slots=True)
class Marker:
    kind: str
    name: str | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class Block:
    """One fenced code block of a document: where it is, its language and its text."""

    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    marker: Marker | None
    marker_line: str | None  # the raw line before the fence when it looks like a marker

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def is_shell(self) -> bool:
        if self.language in SHELL_LANGUAGES:
            return True
        return self.language == "" and any(
            line.startswith("$ ") for line in self.text.splitlines())

    def commands(self) -> list[str]:
        """The command lines of a console block (``$ `` stripped), or of any shell block."""
        lines = self.text.splitlines()
        if any(line.startswith("$ ") for line in lines):
            return [line[2:] for line in lines if line.startswith("$ ")]
        return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def parse_blocks(path: Path, text: str | None = None) -> list[Block]:
    """Every fenced block of ``path`` (or of ``text``, said to be at ``path``), with the marker
    line before its fence, if any."""
    blocks: list[Block] = []
    lines = (path.read_text() if text is None else text).splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        previous = lines[i - 1].strip() if i else ""
        match = MARKER.match(previous)
        marker = Marker(match["kind"], match["name"], match["reason"]) if match else None
        raw = previous if previous.startswith("<!-- doc-test") else None
        language = opening["info"].strip().split(" ", 1)[0] if opening["info"].strip() else ""
        blocks.append(Block(path, i + 1, language, "\n".join(body) + "\n", marker, raw))
        i = j + 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for path in DOCS for block in parse_blocks(path)]


def shell_blocks() -> list[Block]:
    return [block for block in all_blocks() if block.is_shell]


def runner_blocks(name: str) -> list[Block]:
    return [b for b in shell_blocks()
            if b.marker is not None and b.marker.kind == "run" and b.marker.name == name]


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace the placeholders ``values`` names, each of which must be in the table."""
    for placeholder, value in values.items():
        assert placeholder in SUBSTITUTIONS, f"{placeholder!r} is not in SUBSTITUTIONS"
        assert placeholder in text, f"{placeholder!r} no longer appears in the block"
        text = text.replace(placeholder, value)
    return text


def run_shell(text: str, cwd: Path, env: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a doc block as a user pastes it into a POSIX shell, stopping at the first failure."""
    return subprocess.run(["sh", "-e", "-c", text], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess[str], block: Block, expect: int = 0) -> str:
    assert result.returncode == expect, (
        f"{block.where}: exited {result.returncode}, expected {expect}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return result.stdout


def venv_bin() -> Path:
    return Path(sys.executable).parent


def tool_env(**extra: str) -> dict[str, str]:
    """The user's environment with this checkout's venv first on PATH (``make setup`` done)."""
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def require(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/install-system-deps.sh installs it)")


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def scratch_checkout(target: Path) -> Path:
    """A fresh copy of the checkout's tracked files (with their working-tree content)."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True,
                            check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot tell which files a fresh clone has")
    for name in listed.stdout.decode().split("\0"):
        if not name:
            continue
        source, dest = ROOT / name, target / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree
        dest.parent.mkdir(parents=True, exist_ok=True)
        # copy2 keeps modification times, so make sees the venv as up to date as in ROOT.
        shutil.copy2(source, dest, follow_symlinks=False)
    return target


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo directory ``make serve`` builds, made with the same tool."""
    target = tmp_path_factory.mktemp("demo") / "demo-images"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo.py"), str(target)],
                   check=True, capture_output=True, timeout=300)
    return target


# --------------------------------------------------------------------------- the rule itself

def test_docs_have_shell_blocks() -> None:
    """The parser finds the blocks (a parser that finds none would make every rule pass)."""
    blocks = shell_blocks()
    assert len(blocks) >= 15
    assert {b.path.name for b in blocks} >= {"README.md", "operations.md"}


def test_every_shell_block_is_run_or_marked() -> None:
    problems = []
    for block in shell_blocks():
        marker = block.marker
        if marker is None:
            detail = (f"malformed marker {block.marker_line!r}" if block.marker_line
                      else "no <!-- doc-test: ... --> marker on the line before its fence")
            problems.append(f"{block.where}: {detail}")
        elif marker.kind == "run":
            if marker.name not in RUNNERS:
                problems.append(f"{block.where}: no runner {marker.name!r} in tests/test_docs.py")
        elif marker.kind not in EXAMPLE_KINDS:
            problems.append(f"{block.where}: unknown marker kind {marker.kind!r} "
                            f"(run NAME, or one of {sorted(EXAMPLE_KINDS)})")
        elif not marker.reason:
            problems.append(f"{block.where}: an example marker needs a reason after a colon")
    assert not problems, "shell blocks neither run by a test nor marked:\n" + "\n".join(problems)


def test_markers_sit_on_shell_blocks() -> None:
    """A marker before a non-shell block, or far from any block, is a mistake."""
    fenced = {(b.path, b.line - 1) for b in shell_blocks() if b.marker_line}
    stray = []
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip().startswith("<!-- doc-test") and (path, number) not in fenced:
                stray.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not stray, "markers not right before a shell block:\n" + "\n".join(stray)


def test_every_runner_runs_a_block() -> None:
    used = {b.marker.name for b in shell_blocks() if b.marker and b.marker.kind == "run"}
    assert sorted(set(RUNNERS) - used) == [], "runners whose doc block is gone"


def test_marker_parser_rejects_what_it_must() -> None:
    block = parse_blocks_from_text("<!-- doc-test: run -->\n```sh\nls\n```\n")
    assert block.marker is not None and block.marker.name is None
    block = parse_blocks_from_text("<!-- doc-test needs-cluster -->\n```sh\nls\n```\n")
    assert block.marker is None and block.marker_line is not None
    block = parse_blocks_from_text("text\n```\n$ simple-oci-registry ls\nout\n```\n")
    assert block.is_shell and block.commands() == ["simple-oci-registry ls"]
    block = parse_blocks_from_text("text\n   ```yaml\n   a: 1\n   ```\n")
    assert not block.is_shell and block.text == "a: 1\n"


def parse_blocks_from_text(text: str) -> Block:
    (block,) = parse_blocks(ROOT / "sample.md", text)
    return block


@pytest.mark.parametrize("name", sorted({b.marker.name for b in shell_blocks() if b.marker
                                         and b.marker.kind == "run" and b.marker.name}))
def test_doc_block_runs(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    blocks = runner_blocks(name)
    runner = RUNNERS.get(name)
    assert runner is not None, f"{blocks[0].where}: no runner {name!r}"
    runner(blocks, request, tmp_path)


# --------------------------------------------------------------------------- runners

Runner = Callable[[list[Block], pytest.FixtureRequest, Path], None]


def _wait_for(url: str, process: subprocess.Popen[str], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{url} never answered 200:\n{log.read_text()}")
        time.sleep(0.2)


def _stop_group(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def run_quickstart(blocks: list[Block], request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """README's first steps: ``make serve`` in a fresh checkout, then skopeo from another shell.

    ``make test`` on the same line block is what CI runs; the marker says so and it is not run
    from inside itself. make uses the venv this suite runs in (``VENV``, which the Makefile
    takes from the environment): building another one would take minutes.
    """
    serve_block, inspect_block = blocks
    commands = serve_block.commands()
    assert [c.split()[:2] for c in commands] == [["make", "serve"], ["make", "test"]], (
        f"{serve_block.where}: the runner knows `make serve` and `make test`; review it")
    require("skopeo", "make")
    if not (venv_bin() / ".installed").exists():
        pytest.skip("the suite does not run from a `make setup` venv; make serve would build one")
    checkout = scratch_checkout(tmp_path / "checkout")
    env = tool_env(VENV=str(venv_bin().parent))
    env.pop("MAKEFLAGS", None)
    # make would reinstall the venv (pointing its editable install at the scratch checkout)
    # when pyproject.toml or constraints.txt changed since `make setup`: never from a test.
    stamp = venv_bin() / ".installed"
    if subprocess.run(["make", "-q", str(stamp)], cwd=checkout, env=env,
                      capture_output=True).returncode != 0:
        pytest.skip("pyproject.toml or constraints.txt changed since `make setup`: make serve "
                    "would reinstall the venv this suite runs from; run `make setup` first")
    replace: dict[str, str] = {}
    if not port_is_free(5000):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env["LISTEN"] = f"127.0.0.1:{port}"
        replace["127.0.0.1:5000"] = f"127.0.0.1:{port}"
    address = env.get("LISTEN", "127.0.0.1:5000")
    log = tmp_path / "make-serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(["sh", "-c", commands[0]], cwd=checkout, env=env, text=True,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(f"http://{address}/v2/", server, 240, log)
        result = run_shell(substitute(inspect_block.text, replace), tmp_path, env)
        inspected = json.loads(check(result, inspect_block))
        assert inspected["Name"] == f"{address}/busybox"
        assert inspected["Digest"].startswith("sha256:")
    finally:
        _stop_group(server)
    assert (checkout / "demo-images" / "busybox" / "1.36.oci").is_file()


def _serve(directory: Path, tmp_path: Path) -> RegistryProcess:
    """A registry on a free loopback port; ``with`` starts it and stops it."""
    return RegistryProcess(directory, log_path=tmp_path / "registry.log")


def run_mirror_curl(blocks: list[Block], request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """README, mirror mode: both ways of asking for ``docker.io/library/busybox`` answer the
    same manifest. The directory is the demo's, made a mirror with the ``ln -s`` README gives.
    """
    (block,) = blocks
    require("curl")
    demo: Path = request.getfixturevalue("demo_dir")
    images = tmp_path / "images"
    shutil.copytree(demo, images, symlinks=True)
    (images / "docker.io" / "library").mkdir(parents=True)
    (images / "docker.io" / "library" / "busybox").symlink_to("../../busybox")
    with _serve(images, tmp_path) as registry:
        result = run_shell(substitute(block.text, {"registry.local:5000": registry.host}),
                           tmp_path)
    heads = check(result, block).split("HTTP/1.1 ")[1:]
    assert len(heads) == 2 and all(h.startswith("200") for h in heads), result.stdout
    digests = {line.split(":", 1)[1].strip() for h in heads for line in h.splitlines()
               if line.lower().startswith("docker-content-digest:")}
    assert len(digests) == 1, result.stdout


def run_pulling(blocks: list[Block], request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """README, pulling: skopeo, podman and ctr against a real server. podman gets a private
    storage (CONTAINERS_* variables, as docs/operations.md says to use where the defaults do not
    work) and ctr a private containerd (CONTAINERD_ADDRESS), so nothing system-wide changes.
    """
    (block,) = blocks
    require("skopeo", "podman", "ctr", "containerd")
    require_root("podman and containerd keep their storage as root here")
    demo: Path = request.getfixturevalue("demo_dir")
    with _serve(demo, tmp_path) as registry:
        config = containers_config(tmp_path / "containers", registry.host)
        containerd = Containerd(tmp_path / "containerd").start()
        try:
            env = dict(config.env, CONTAINERD_ADDRESS=containerd.address)
            text = substitute(block.text, {"registry.local:5000": registry.host,
                                           "/tmp/bb": str(tmp_path / "bb")})
            output = check(run_shell(text, tmp_path, env, timeout=240), block)
        finally:
            containerd.stop()
            config.cleanup()
    assert '"1.36"' in output or "1.36" in output
    assert (tmp_path / "bb" / "index.json").is_file()


def run_node_setup_scratch(blocks: list[Block], request: pytest.FixtureRequest,
                           tmp_path: Path) -> None:
    """operations.md §4: node-setup.sh against a scratch root that does not exist yet."""
    (block,) = blocks
    checkout = scratch_checkout(tmp_path / "checkout")
    node = tmp_path / "x"
    text = substitute(block.text, {"/tmp/x": str(node)})
    listed = check(run_shell(text, checkout, dict(os.environ)), block)
    written = {Path(line).relative_to(node).as_posix() for line in listed.split()}
    assert {"etc/hosts",
            "etc/containerd/certs.d/registry.local:5000/hosts.toml",
            "etc/containers/registries.conf.d/50-simple-oci-registry.conf"} <= written, listed


def run_node_uninstall(blocks: list[Block], request: pytest.FixtureRequest,
                       tmp_path: Path) -> None:
    """operations.md §9: the uninstall commands remove everything node-setup.sh wrote, in
    every mode (TLS, mirrors), and nothing else. They run on a scratch node root that
    node-setup.sh has configured: the block's ``/etc/`` becomes ``NODE_ROOT/etc/``.
    """
    (block,) = blocks
    node = tmp_path / "node"
    etc = node / "etc"
    (etc / "containerd" / "certs.d" / "other.example").mkdir(parents=True)
    others = {
        etc / "hosts": "127.0.0.1 localhost\n10.0.0.5 node-a.example node-a\n",
        etc / "containerd" / "certs.d" / "other.example" / "hosts.toml":
            'server = "https://other.example"\n',
    }
    for path, text in others.items():
        path.write_text(text)
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    subprocess.run(["sh", str(ROOT / "deploy" / "node-setup.sh")], check=True,
                   capture_output=True, text=True, timeout=60,
                   env=dict(os.environ, NODE_ROOT=str(node), REGISTRY_TLS="true",
                            REGISTRY_CA_FILE=str(ca), MIRROR_REGISTRIES="docker.io quay.io"))
    written = {p for p in node.rglob("*") if p.is_file()} - set(others)
    assert len(written) >= 6, written  # the run above did write its files
    text = substitute(block.text, {"/etc/": f"{etc}/"})
    assert not re.search(r"(^|[\s'\"])/etc", text), f"{block.where}: a path escaped the table"
    check(run_shell(text, tmp_path), block)
    left = {p.relative_to(node).as_posix() for p in node.rglob("*") if p.is_file()}
    assert left == {p.relative_to(node).as_posix() for p in others}, left
    for path, original in others.items():
        assert path.read_text() == original


def run_publish_by_rename(blocks: list[Block], request: pytest.FixtureRequest,
                          tmp_path: Path) -> None:
    """operations.md §6: copy beside, rename into place, remove; ``ls`` sees each state."""
    (block,) = blocks
    export = tmp_path / "oci-images"
    (export / "team" / "app").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    # What the doc's `skopeo copy ... oci-archive:app-1.4.oci:1.4` makes: an image tagged 1.4.
    writer = LayoutWriter()
    image, _ = small_image(writer, "team-app")
    writer.tag(image, "1.4")
    writer.write_archive(work / "app-1.4.oci")
    text = substitute(block.text, {"/export/oci-images": str(export)})
    add, _, remove = text.partition("# remove it")
    assert remove.strip(), f"{block.where}: the runner expects a '# remove it' part"

    def listing() -> list[dict[str, Any]]:
        out = subprocess.run([str(venv_bin() / "simple-oci-registry"), "ls", "--dir",
                              str(export), "--json"], capture_output=True, text=True, check=True)
        return list(json.loads(out.stdout))

    check(run_shell(add, work), block)
    assert (export / "team" / "app" / "1.4.oci").is_file()
    assert not (export / "team" / "app" / ".1.4.oci.tmp").exists()
    assert any(entry.get("name") == "team/app" and entry.get("tag") == "1.4"
               for entry in listing()), listing()
    check(run_shell(remove, work), block)
    assert listing() == []


def run_check_images(blocks: list[Block], request: pytest.FixtureRequest,
                     tmp_path: Path) -> None:
    """operations.md §11: ``check --images`` prints what the doc shows, and exits 1.

    The directory holds what the output says is served; ``images.txt`` holds the references
    of the WRITTEN column (the IMAGE itself where the column is blank), as a cluster's pods
    would name them. ``$DIR`` is set in the environment to that scratch directory, as the
    section's first block sets it to the export. Digests differ from the doc's; every other
    column and the summary match.
    """
    (block,) = blocks
    (command,) = block.commands()
    expected = [line for line in block.text.splitlines() if not line.startswith("$ ")]
    header, rows, summary = expected[0], expected[1:-1], expected[-1]
    columns = [header.index(name) for name in ("STATUS", "IMAGE", "WRITTEN", "DETAIL")]

    def cells(row: str) -> list[str]:
        bounds = [*columns, len(row)]
        return [row[a:b].strip() for a, b in zip(bounds, bounds[1:], strict=False)]

    table = [cells(row) for row in rows]
    images = tmp_path / "dir"
    for status, image, _written, _detail in table:
        if status != "served":
            continue
        repository, tag = image.rsplit(":", 1)
        writer = LayoutWriter()
        descriptor, _ = small_image(writer, repository.replace("/", "-"))
        writer.tag(descriptor, tag)
        writer.write_archive(images / repository / f"{tag}.oci")
    (tmp_path / "images.txt").write_text(
        " ".join(written or image for _status, image, written, _detail in table) + "\n")
    result = run_shell(command, tmp_path, tool_env(DIR=str(images)))
    lines = check(result, block, expect=1).splitlines()
    assert cells(lines[0]) == cells(header)
    got = [cells(line) for line in lines[1:-1]]
    assert [row[:3] for row in got] == [row[:3] for row in table], result.stdout
    for got_row, doc_row in zip(got, table, strict=True):
        if doc_row[0] == "served":
            assert got_row[3].startswith("sha256:")
        else:
            assert got_row[3] == doc_row[3]
    assert lines[-1] == summary


RUNNERS: dict[str, Runner] = {
    "quickstart": run_quickstart,
    "mirror-curl": run_mirror_curl,
    "pulling": run_pulling,
    "node-setup-scratch": run_node_setup_scratch,
    "node-uninstall": run_node_uninstall,
    "publish-by-rename": run_publish_by_rename,
    "check-images": run_check_images,
}


# --------------------------------------------------------------------------- cluster examples

def _mentioned_kustomizations() -> list[Path]:
    """Every deploy/kubernetes directory with a kustomization that the docs name."""
    text = "\n".join(path.read_text() for path in DOCS)
    found = set()
    for match in re.finditer(r"deploy/kubernetes(?:/[\w.-]+)*", text):
        directory = ROOT / match.group(0)
        if (directory / "kustomization.yaml").is_file():
            found.add(directory)
    for match in re.finditer(r"overlays/([\w.-]+)", text):
        directory = K8S / "overlays" / match.group(1)
        if (directory / "kustomization.yaml").is_file():
            found.add(directory)
    return sorted(found)


def _doc_kustomizations() -> list[Block]:
    """YAML blocks that are whole Kustomizations (an overlay the reader is told to write)."""
    blocks = []
    for block in all_blocks():
        if block.language not in ("yaml", "yml"):
            continue
        try:
            doc = yaml.safe_load(block.text)
        except yaml.YAMLError:
            continue
        if isinstance(doc, dict) and doc.get("kind") == "Kustomization":
            blocks.append(block)
    return blocks


# Kinds whose schema is a CRD of another project, not bundled with kubernetes-validate; the
# monitoring component's objects are checked by tests/test_monitoring.py instead.
CUSTOM_KINDS = frozenset({("monitoring.coreos.com/v1", "ServiceMonitor"),
                          ("monitoring.coreos.com/v1", "PrometheusRule")})


def validate_objects(rendered: str, where: str) -> list[str]:
    """Validate every object against the bundled Kubernetes schemas; return the kinds seen."""
    kv = kubernetes_validate
    version = kv.utils.latest_version()
    kinds = []
    for obj in yaml.safe_load_all(rendered):
        if obj is None:
            continue
        kinds.append(obj["kind"])
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as error:
            raise AssertionError(f"{where}: {obj['kind']}/{obj['metadata'].get('name')} is not "
                                 f"a valid object of Kubernetes {version}: {error}") from None
    return kinds


def kustomize(directory: Path) -> str:
    require("kubectl")
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr}"
    return result.stdout


def test_docs_name_the_deploy_variants() -> None:
    names = {p.relative_to(K8S).as_posix() for p in _mentioned_kustomizations()}
    assert {".", "overlays/nfs-pv", "overlays/hostpath"} <= names, names


@pytest.mark.parametrize("directory", _mentioned_kustomizations(),
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_mentioned_kustomization_builds_and_validates(directory: Path, tmp_path: Path) -> None:
    if "kind: Component" in (directory / "kustomization.yaml").read_text():
        # A component builds only inside a kustomization: add it to the base, in a scratch
        # checkout, as the docs' overlays do.
        checkout = scratch_checkout(tmp_path / "checkout")
        overlay = checkout / "deploy" / "kubernetes" / "overlays" / "doc-test"
        overlay.mkdir()
        component = os.path.relpath(checkout / directory.relative_to(ROOT), overlay)
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": ["../../base"], "components": [component]}))
        rendered = kustomize(overlay)
    else:
        rendered = kustomize(directory)
    kinds = validate_objects(rendered, str(directory.relative_to(ROOT)))
    assert "DaemonSet" in kinds


@pytest.mark.parametrize("block", _doc_kustomizations(), ids=lambda b: b.where)
def test_doc_overlay_builds_and_validates(block: Block, tmp_path: Path) -> None:
    """A kustomization a doc tells the reader to write, written where the doc says (the site
    overlay, beside the shipped ones) in a scratch checkout, builds and gives valid objects."""
    checkout = scratch_checkout(tmp_path / "checkout")
    site = checkout / "deploy" / "kubernetes" / "overlays" / "site"
    site.mkdir()
    (site / "kustomization.yaml").write_text(block.text)
    kinds = validate_objects(kustomize(site), block.where)
    assert "DaemonSet" in kinds


def test_validator_rejects_a_broken_object() -> None:
    """The schema check can fail: an unknown field and a wrong type are both refused."""
    rendered = kustomize(K8S)
    objects = [o for o in yaml.safe_load_all(rendered) if o and o["kind"] == "DaemonSet"]
    container = objects[0]["spec"]["template"]["spec"]["containers"][0]
    container["imagePullPolicy"] = "IfNotPresent"
    container["port"] = 5000
    with pytest.raises(AssertionError, match="port"):
        validate_objects(yaml.safe_dump(objects[0]), "broken")
    del container["port"]
    container["ports"][0]["containerPort"] = "five thousand"
    with pytest.raises(AssertionError, match="integer"):
        validate_objects(yaml.safe_dump(objects[0]), "broken")
