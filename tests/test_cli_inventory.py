"""``simple-oci-registry ls`` and ``check`` run as operators run them: a real process.

Exit codes and output formats are the interface scripts rely on (``check`` gating a deploy,
``ls --json`` feeding jq), so they are checked through ``python -m simple_oci_registry``.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from simple_oci_registry.inventory import list_images
from simple_oci_registry.layoutwriter import LayoutWriter
from tests.images import StandardImages, build_mirror_images, small_image

PROGRESS_LINE = re.compile(r"\[(\d+)/(\d+)\] (\S+) (ok|\d+ problems?)")


def run(*args: str, env: dict[str, str] | None = None,
        stderr: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SOR_")}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "simple_oci_registry", *args],
                          stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=120,
                          env=environment)


def test_ls_prints_an_aligned_table(shared_images: StandardImages) -> None:
    done = run("ls", "--dir", str(shared_images.root))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["NAME", "TAG", "DIGEST", "PLATFORMS", "SIZE", "FILE"]
    file_column = lines[0].index("FILE")
    assert all(line[file_column - 2: file_column] == "  " for line in lines)
    rows = {tuple(line.split()[:2]): line.split() for line in lines[1:]}
    multi = rows[("multi", "latest")]
    assert multi[2] == shared_images.manifests["multi:latest"][:19]
    assert multi[3] == "linux/amd64,linux/arm64"
    assert multi[-1] == "multi.oci"
    assert rows[("app", "1.0")][-1] == "app/1.0.oci"
    assert rows[("zipped", "1.0")][-1] == "zipped:1.0.oci"
    full = run("ls", "--dir", str(shared_images.root), "--full-digests")
    assert shared_images.manifests["multi:latest"] in full.stdout


def test_ls_json(shared_images: StandardImages) -> None:
    done = run("ls", "--dir", str(shared_images.root), "--json")
    assert done.returncode == 0, done.stderr
    document: list[dict[str, Any]] = json.loads(done.stdout)
    expected = list_images(os.path.realpath(shared_images.root)).entries
    assert document == [entry.to_json() for entry in expected]
    multi = next(e for e in document if (e["name"], e["tag"]) == ("multi", "latest"))
    assert multi["platforms"] == ["linux/amd64", "linux/arm64"]
    assert multi["digest"] == shared_images.manifests["multi:latest"]
    assert multi["size"] > 0 and multi["file"] == "multi.oci"


def test_ls_reads_its_flags_from_the_environment(shared_images: StandardImages) -> None:
    done = run("ls", env={"SOR_DIR": str(shared_images.root), "SOR_JSON": "true"})
    assert done.returncode == 0, done.stderr
    assert {(e["name"], e["tag"]) for e in json.loads(done.stdout)} >= {("app", "1.0")}


def test_ls_empty_and_missing_directories(tmp_path: Path) -> None:
    done = run("ls", "--dir", str(tmp_path))
    assert (done.returncode, done.stdout) == (0, "")
    assert "no images" in done.stderr
    assert json.loads(run("ls", "--dir", str(tmp_path), "--json").stdout) == []
    missing = run("ls", "--dir", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_ls_warns_about_archives_it_cannot_list(standard_images: StandardImages) -> None:
    path = standard_images.root / "pair.oci"
    os.truncate(path, 1000)
    done = run("ls", "--dir", str(standard_images.root))
    assert done.returncode == 0
    assert "warning: pair.oci:" in done.stderr
    assert "pair.oci" not in done.stdout


def test_check_clean_directory(shared_images: StandardImages) -> None:
    done = run("check", "--dir", str(shared_images.root))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("checked 7 archives, hashed ")
    assert done.stdout.rstrip().endswith("no problems")
    assert done.stderr == ""  # no progress: stderr is not a terminal here
    report = json.loads(run("check", "--dir", str(shared_images.root), "--json").stdout)
    assert report["ok"] is True and report["problems"] == []
    assert report["archives_checked"] == 7
    assert report["blobs_hashed"] > 0 and report["bytes_hashed"] > 0


def test_check_problems_exit_1(standard_images: StandardImages) -> None:
    w = LayoutWriter()
    image, _ = small_image(w, "impostor")
    w.tag(image, "two")
    w.write_archive(standard_images.root / "pair:two.oci")
    os.truncate(standard_images.root / "app" / "2.0.oci", 2048)
    done = run("check", "--dir", str(standard_images.root))
    assert done.returncode == 1
    assert "app/2.0.oci: structure:" in done.stdout
    # pair:two.oci is named for the tag, so the server prefers it over pair.oci.
    assert "pair:two.oci: duplicate-tag: pair:two is in 2 files" in done.stdout
    assert done.stdout.rstrip().endswith("2 problems")
    as_json = run("check", "--dir", str(standard_images.root), "--json")
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    assert {(p["kind"], p["file"]) for p in report["problems"]} == {
        ("structure", "app/2.0.oci"), ("duplicate-tag", "pair:two.oci")}
    duplicate = next(p for p in report["problems"] if p["kind"] == "duplicate-tag")
    assert duplicate["files"] == ["pair:two.oci", "pair.oci"]


def test_check_progress_on_request(standard_images: StandardImages) -> None:
    os.truncate(standard_images.root / "multi.oci", 4096)
    done = run("check", "--dir", str(standard_images.root), "--progress", "--json")
    assert done.returncode == 1
    steps = [PROGRESS_LINE.fullmatch(line) for line in done.stderr.splitlines()]
    assert all(steps), done.stderr
    assert [(m[1], m[2]) for m in steps if m] == [(str(i), "7") for i in range(1, 8)]
    outcomes = {m[3]: m[4] for m in steps if m}
    assert outcomes["multi.oci"] == "1 problem"
    assert outcomes["app/1.0.oci"] == "ok"
    json.loads(done.stdout)  # progress never mixes into the report


def run_with_terminal_stderr(*args: str) -> tuple[int, list[str]]:
    """Run with stderr on a pseudo-terminal, as an operator's shell would; its lines."""
    controller, terminal = pty.openpty()
    try:
        done = run(*args, stderr=terminal)
    finally:
        os.close(terminal)
    output = b""
    try:
        while chunk := os.read(controller, 4096):
            output += chunk
    except OSError:  # EIO: the terminal side is closed and everything was read
        pass
    finally:
        os.close(controller)
    return done.returncode, output.decode().replace("\r\n", "\n").splitlines()


def test_check_progress_when_stderr_is_a_terminal(shared_images: StandardImages) -> None:
    code, lines = run_with_terminal_stderr("check", "--dir", str(shared_images.root))
    assert code == 0
    assert lines[0] == "[1/7] app/1.0.oci ok"
    assert len(lines) == 7 and all(PROGRESS_LINE.fullmatch(line) for line in lines)
    code, lines = run_with_terminal_stderr("check", "--dir", str(shared_images.root),
                                           "--no-progress")
    assert (code, lines) == (0, [])


def test_help_lists_the_commands() -> None:
    done = run("--help")
    assert done.returncode == 0
    assert "ls" in done.stdout and "check" in done.stdout and "serve" in done.stdout


# ------------------------------------------------------------------------- check --images

# What "kubectl get pods -A -o jsonpath='{..image}'" prints (space-separated), then one per
# line as a range template prints them, with a comment, a repeat (the same image written in
# full, as a pod's status shows it) and malformed references.
CLUSTER_IMAGES = """busybox:1.36 registry.k8s.io/pause:3.9 docker.io/library/busybox:1.36
nginx:1.25
# the monitoring stack
quay.io/prometheus/node-exporter:v1.8.0
localhost:5000/team/app:1.0
index.docker.io/library/busybox@{busybox}
registry.k8s.io/pause:3.9@{missing}
Nginx:1.25
busybox:1.36@sha256:short
"""


def test_check_images_reports_served_missing_and_malformed(tmp_path: Path) -> None:
    images = build_mirror_images(tmp_path / "images")
    busybox = images.manifests["docker.io/library/busybox:1.36"]
    listing = tmp_path / "images.txt"
    listing.write_text(CLUSTER_IMAGES.format(busybox=busybox, missing="sha256:" + "0" * 64))
    done = run("check", "--dir", str(images.root), "--images", str(listing))
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["STATUS", "IMAGE", "WRITTEN", "DETAIL"]
    rows = [line.split(maxsplit=2) for line in lines[1:-1]]
    assert [row[:2] for row in rows] == [
        ["served", "docker.io/library/busybox:1.36"],
        ["served", "registry.k8s.io/pause:3.9"],
        ["missing", "docker.io/library/nginx:1.25"],
        ["served", "quay.io/prometheus/node-exporter:v1.8.0"],
        ["served", "localhost:5000/team/app:1.0"],
        ["served", f"docker.io/library/busybox@{busybox}"],
        ["missing", "registry.k8s.io/pause@sha256:" + "0" * 64],  # CRI pulls by digest alone
        ["malformed", "Nginx:1.25"],
        ["malformed", "busybox:1.36@sha256:short"],
    ]
    assert busybox[:19] in lines[1] and "busybox:1.36" in lines[1]
    assert "looked under docker.io/library/nginx/" in lines[3]
    assert lines[-1] == "9 image references: 5 served, 2 missing, 2 malformed"


def test_check_images_json_and_stdin(tmp_path: Path) -> None:
    images = build_mirror_images(tmp_path / "images")
    done = subprocess.run(
        [sys.executable, "-m", "simple_oci_registry", "check", "--dir", str(images.root),
         "--images", "-", "--json"],
        input="registry.k8s.io/pause:3.9\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document == {"ok": True, "images": [{
        "written": "registry.k8s.io/pause:3.9", "status": "served",
        "reference": "registry.k8s.io/pause:3.9", "repository": "registry.k8s.io/pause",
        "digest": images.manifests["registry.k8s.io/pause:3.9"], "reason": None}]}


def test_check_images_unreadable_file_is_one_line(tmp_path: Path) -> None:
    done = run("check", "--dir", str(tmp_path), "--images", str(tmp_path / "nope.txt"))
    assert done.returncode != 0
    assert "cannot read" in done.stderr and "Traceback" not in done.stderr
