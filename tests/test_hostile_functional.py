"""Hostile and broken archives next to good images, served by a real registry process.

Every case of :data:`tests.hostile.CASES` is written under the image directory beside the
standard images. For each one the pull of that image gets the spec's JSON error with a 4xx
status (GET and HEAD alike), the server log names the file and says why, every good image
still pulls with every manifest and blob digest-checked, and the process is still alive.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.hostile import (
    ACCEPT,
    CASES,
    Hostile,
    base_image,
    error_codes,
    fetch,
    log_lines_naming,
    pull,
    pull_all,
    sha256,
    write_hostile,
    write_tar,
)
from tests.images import StandardImages, build_standard_images
from tests.server import RegistryProcess

TRIED: set[str] = set()


@pytest.fixture(scope="module")
def hostile_registry(tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[tuple[RegistryProcess, StandardImages]]:
    base = tmp_path_factory.mktemp("hostile")
    images = build_standard_images(base / "images")
    write_hostile(images.root)
    with RegistryProcess(images.root, "--cache-dir", str(base / "cache"),
                         log_path=base / "registry.log") as process:
        yield process, images


def assert_good_images_pull(process: RegistryProcess, images: StandardImages) -> None:
    assert pull_all(process.url, images.manifests) > 0
    assert process.process is not None and process.process.poll() is None, process.log()


def assert_logged(process: RegistryProcess, case: Hostile) -> None:
    lines = log_lines_naming(process.log(), case.relpath)
    assert any(re.search(r"WARNING|ERROR", line) and re.search(case.reason, line, re.I)
               for line in lines), (case.relpath, case.reason, lines)


@pytest.mark.parametrize("case", CASES, ids=[case.key for case in CASES])
def test_hostile_archive(hostile_registry: tuple[RegistryProcess, StandardImages],
                         case: Hostile) -> None:
    process, images = hostile_registry
    TRIED.add(case.key)
    path = f"/v2/{case.name}/manifests/1.0"
    get = fetch(process.url, path, headers={"Accept": ACCEPT})
    head = fetch(process.url, path, method="HEAD", headers={"Accept": ACCEPT})
    assert head.status == get.status, (get, head)
    if case.servable:
        pulled = pull(process.url, case.name, "1.0")
        assert pulled.blobs
        assert not [line for line in log_lines_naming(process.log(), case.relpath)
                    if "cannot serve" in line]
    elif case.probe == "manifest":
        assert get.status == case.status, get
        assert error_codes(get)[0] in case.codes, get
        assert head.body == b"" and head.headers["content-type"].startswith("application/json")
        assert_logged(process, case)
        # Nor does the tag show up anywhere: the archive serves nothing.
        tags = fetch(process.url, f"/v2/{case.name}/tags/list")
        if tags.status == 200:
            assert "1.0" not in tags.json()["tags"], tags
        else:
            assert 400 <= tags.status < 500 and error_codes(tags), tags
    else:
        assert case.probe == "layer" and case.layer_digest is not None
        assert get.status == 200 and get.headers["docker-content-digest"] == sha256(get.body)
        blob_path = f"/v2/{case.name}/blobs/{case.layer_digest}"
        for method, headers in (("GET", {}), ("HEAD", {}), ("GET", {"Range": "bytes=0-99"}),
                                ("GET", {"Range": "bytes=100-"}), ("HEAD", {"Range": "bytes=-5"})):
            reply = fetch(process.url, blob_path, method=method, headers=headers)
            assert reply.status == case.status, (method, headers, reply)
            if method == "GET":
                assert error_codes(reply) == ["BLOB_UNKNOWN"], reply
            else:
                assert reply.body == b""
        with pytest.raises(AssertionError):
            pull(process.url, case.name, "1.0")
        assert_logged(process, case)
    assert_good_images_pull(process, images)


def test_broken_archives_are_logged_once(
        hostile_registry: tuple[RegistryProcess, StandardImages]) -> None:
    """A broken file is reported once per version of it, not once per request."""
    process, _ = hostile_registry
    case = next(c for c in CASES if c.key == "index-not-json")
    for _ in range(20):
        reply = fetch(process.url, f"/v2/{case.name}/manifests/1.0")
        assert reply.status == 404
    lines = [line for line in log_lines_naming(process.log(), case.relpath)
             if "WARNING" in line or "ERROR" in line]
    assert len(lines) == 1, lines


def test_broken_copies_beside_a_good_one(image_dir: Path,
                                         start_registry: Callable[..., RegistryProcess]) -> None:
    """Broken archives in a name's directory cost only themselves: its good tag still pulls."""
    good = base_image("mixed-good", tag="1.0")
    write_tar(image_dir / "mixed" / "1.0.oci", good.entries())
    broken = [c for c in CASES if not c.servable and c.kind == "file"][:12]
    for case in broken:
        case.build(image_dir / "mixed" / f"{case.key}.oci")
    process = start_registry(image_dir, "--cache-dir", str(image_dir.parent / "cache"))
    pulled = pull(process.url, "mixed", "1.0")
    assert pulled.manifests == [good.manifest_digest]
    assert pulled.blobs == [good.config_digest, good.layer_digest]
    tags = fetch(process.url, "/v2/mixed/tags/list")
    assert tags.status == 200 and tags.json()["tags"] == ["1.0"]
    # A tag only a broken file could hold is an error, naming no file contents.
    missing = fetch(process.url, "/v2/mixed/manifests/2.0")
    assert missing.status == 404 and error_codes(missing) == ["MANIFEST_UNKNOWN"]
    log = process.log()
    for case in broken:
        if case.probe == "manifest":
            assert log_lines_naming(log, f"mixed/{case.key}.oci"), case.key


def test_a_repaired_archive_is_served(image_dir: Path,
                                      start_registry: Callable[..., RegistryProcess]) -> None:
    """Broken, then replaced by a good copy (rename): served; broken again: refused again."""
    target = image_dir / "fixme" / "1.0.oci"
    case = next(c for c in CASES if c.key == "truncated-mid-blob")
    case.build(target)
    process = start_registry(image_dir, "--grace-period", "0",
                             "--cache-dir", str(image_dir.parent / "cache"))
    first = fetch(process.url, "/v2/fixme/manifests/1.0")
    assert first.status == 404 and error_codes(first) == ["MANIFEST_UNKNOWN"]
    good = base_image("fixme-good")
    write_tar(image_dir / "fixme" / ".1.0.oci.tmp", good.entries())
    os.replace(image_dir / "fixme" / ".1.0.oci.tmp", target)
    assert pull(process.url, "fixme", "1.0").manifests == [good.manifest_digest]
    case.build(image_dir / "fixme" / ".broken.tmp")
    os.replace(image_dir / "fixme" / ".broken.tmp", target)
    again = fetch(process.url, "/v2/fixme/manifests/1.0")
    assert again.status == 404 and error_codes(again) == ["MANIFEST_UNKNOWN"]
    gone = fetch(process.url, f"/v2/fixme/blobs/{good.layer_digest}")
    assert gone.status == 404 and error_codes(gone) == ["BLOB_UNKNOWN"]


def test_fifo_named_like_an_archive(image_dir: Path, tmp_path: Path,
                                    start_registry: Callable[..., RegistryProcess]) -> None:
    build_standard_images(image_dir)
    fifo = image_dir / "pipe" / "1.0.oci"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    process = start_registry(image_dir, "--cache-dir", str(image_dir.parent / "cache"))
    try:
        reply = fetch(process.url, "/v2/pipe/manifests/1.0", timeout=5)
        assert reply.status == 404 and error_codes(reply) == ["MANIFEST_UNKNOWN"]
        assert log_lines_naming(process.log(), "pipe/1.0.oci")
    finally:
        _release_fifo(fifo)
    assert pull(process.url, "app", "1.0").blobs


def _release_fifo(fifo: Path) -> None:
    """Open the FIFO's write end and close it: a reader blocked in open() then reads EOF."""
    def release() -> None:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no reader is waiting: nothing to release
            return
        os.close(fd)
    thread = threading.Thread(target=release)
    thread.start()
    thread.join(5)
    shutil.rmtree(fifo.parent, ignore_errors=True)


def test_hostile_archive_count() -> None:
    """The figure for the report: how many hostile archives the suite tries."""
    refused = [c for c in CASES if not c.servable]
    print(f"\nhostile archives: {len(CASES)} defined ({len(refused)} refused, "
          f"{len(CASES) - len(refused)} tolerated), {len(TRIED)} tried in this run, "
          "plus a FIFO named .oci and 12 broken copies beside a good archive")
    assert len(refused) >= 15
    assert len({c.key for c in CASES}) == len(CASES)
