"""Publishing into the image directory (publish.py and ``simple-oci-registry publish``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from simple_oci_registry.archive import open_archive
from simple_oci_registry.layoutwriter import LayoutWriter
from tests.images import small_image


def archive(path: Path, text: str) -> str:
    writer = LayoutWriter()
    image, _ = small_image(writer, text)
    writer.tag(image, "1.0")
    writer.write_archive(path)
    return image.digest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "simple_oci_registry", "publish", *args],
                          capture_output=True, text=True, check=False)


def test_publish_validates_then_renames_into_place(tmp_path: Path) -> None:
    source = tmp_path / "build" / "app.oci"
    source.parent.mkdir()
    archive(source, "published")
    target = tmp_path / "images" / "team" / "app" / "1.0.oci"
    done = run(str(source), str(target))
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == source.read_bytes()
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert os.listdir(target.parent) == ["1.0.oci"]  # no temporary left behind
    assert open_archive(str(target)).members


def test_publish_refuses_a_broken_archive_and_keeps_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "images" / "app" / "1.0.oci"
    target.parent.mkdir(parents=True)
    archive(target, "old")
    before = target.read_bytes()
    broken = tmp_path / "broken.oci"
    data = bytearray(before)
    blob = open_archive(str(target)).members
    member = next(m for n, m in blob.items() if n.startswith("blobs/") and m.size > 100)
    data[member.offset + 10] ^= 0xFF  # a blob whose bytes no longer match its digest
    broken.write_bytes(bytes(data))
    done = run(str(broken), str(target))
    assert done.returncode == 1
    assert "not servable, nothing published" in done.stderr
    assert target.read_bytes() == before
    assert sorted(os.listdir(target.parent)) == ["1.0.oci"]


def test_publish_refuses_bad_targets(tmp_path: Path) -> None:
    source = tmp_path / "app.oci"
    archive(source, "x")
    assert "ending in .oci" in run(str(source), str(tmp_path / "app.tar")).stderr
    assert "ending in .oci" in run(str(source), str(tmp_path / ".hidden.oci")).stderr
    assert "not a regular file" in run(str(tmp_path), str(tmp_path / "x.oci")).stderr
