"""The repository as a newcomer receives it: it stands alone and says what it is.

These check the files around the code (licence, README, helper docstrings) for the promises a
fresh clone makes: what the licence metadata names exists, nothing points at documents outside
the repository, and the README answers the first question of someone whose port 5000 is taken.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Files a clone carries that a reader is sent to; a path outside the repository in any of them
# is a dead end for everyone but the machine it was written on.
_TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".yaml", ".yml", ".cfg", ""}
_OUTSIDE = re.compile(r"/wor[k]/|/hom[e]/[a-z]")  # brackets: this line must not match itself


def _tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                            check=True, timeout=60).stdout.decode().split("\0")
    return [ROOT / name for name in listed if name]


def test_the_license_file_matches_the_declared_license() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert declared == "MIT"
    assert 'org.opencontainers.image.licenses="MIT"' in (ROOT / "Containerfile").read_text()
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 Simple OCI Registry contributors" in text
    assert "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND" in text


def test_no_file_refers_to_a_document_outside_the_repository() -> None:
    offenders = []
    for path in _tracked_files():
        if path.suffix not in _TEXT_SUFFIXES or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_readme_tells_how_to_serve_the_demo_on_another_port() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"make serve LISTEN=([^\s`]+)", readme)
    assert match, "README does not say how to pick another address for make serve"
    # What the README says is what the Makefile does with it (a dry run: nothing starts).
    dry_run = subprocess.run(["make", "-n", "serve", f"LISTEN={match[1]}"], cwd=ROOT,
                             capture_output=True, text=True, check=True, timeout=60).stdout
    assert f"--listen {match[1]}" in dry_run


# Every command a test skips without, and the Debian package that provides it. CI runs
# scripts/install-system-deps.sh before the tests, so a test that skips for want of one of
# these in CI is a test nobody runs.
_TOOL_PACKAGES = {
    "busybox": "busybox-static",
    "chromium": "chromium",
    "containerd": "containerd",
    "htpasswd": "apache2-utils",
    "promtool": "prometheus",
    "runc": "runc",
    "setpriv": "util-linux",
    "shellcheck": "shellcheck",
    "skopeo": "skopeo",
    "umoci": "umoci",
    "unshare": "util-linux",
    "wrk": "wrk",
}
# Commands no package of this distribution provides: tests needing them skip with the reason.
_NOT_PACKAGED = {"kubectl", "kustomize"}
_ESSENTIAL = {"util-linux"}  # always installed on Debian, never listed


def _installed_packages() -> list[str]:
    script = (ROOT / "scripts/install-system-deps.sh").read_text()
    lists = re.findall(r"^packages\+?=\(([^)]*)\)", script, re.MULTILINE)
    assert lists, "install-system-deps.sh has no packages=(...) list"
    return [name for names in lists for name in names.split()]


def test_every_tool_a_test_skips_without_is_installed_for_ci() -> None:
    used = set()
    for path in (ROOT / "tests").glob("*.py"):
        used |= set(re.findall(r'shutil\.which\("([\w.+-]+)"\)', path.read_text()))
    # The shell running a script, and another distribution's name tried after "chromium".
    used -= {"dash", "sh", "chromium-browser"}
    assert used - _NOT_PACKAGED <= set(_TOOL_PACKAGES), "map the new tool to its package"
    packages = set(_installed_packages()) | _ESSENTIAL
    missing = {tool: _TOOL_PACKAGES[tool] for tool in used - _NOT_PACKAGED
               if _TOOL_PACKAGES[tool] not in packages}
    assert missing == {}, "scripts/install-system-deps.sh does not install these"
    for tool in used - _NOT_PACKAGED:
        # Where the package is installed, check it really ships the command.
        listing = subprocess.run(["dpkg", "-L", _TOOL_PACKAGES[tool]], capture_output=True,
                                 text=True, timeout=60)
        if listing.returncode == 0:
            assert re.search(rf"/s?bin/{re.escape(tool)}$", listing.stdout, re.MULTILINE), tool
