"""``inventory``: what ls and the catalog page list, and what check finds, on real archives.

Listings are compared with the running store's own answers (``ImageStore.tags``/``manifest``),
so a drift between what ls shows and what the server serves fails here. Check is fed each kind
of damage it must find (a blob whose bytes do not match its digest, a truncated archive, one
name:tag in two files, unreadable files) and must stay silent on a clean directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from simple_oci_registry import inventory
from simple_oci_registry.archive import open_archive
from simple_oci_registry.config import Config
from simple_oci_registry.inventory import (
    CheckProgress,
    ImageEntry,
    ProblemKind,
    SummaryCache,
    check_directory,
    human_size,
    list_images,
)
from simple_oci_registry.layout import blob_member
from simple_oci_registry.layoutwriter import LayoutWriter
from simple_oci_registry.reference import parse_digest
from simple_oci_registry.store import ImageStore
from tests.dockersave import LegacyImage, layer_tar, legacy_archive
from tests.images import (
    StandardImages,
    build_mirror_images,
    build_standard_images,
    small_image,
)


def root_of(directory: Path) -> str:
    return os.path.realpath(directory)


def by_reference(entries: tuple[ImageEntry, ...]) -> dict[str, ImageEntry]:
    return {entry.reference: entry for entry in entries}


def manifest_size(archive_path: Path, digest: str, seen: set[str] | None = None) -> int:
    """Size of a manifest and what it reaches, from the descriptors' own ``size`` fields."""
    seen = set() if seen is None else seen
    archive = open_archive(str(archive_path))
    body = archive.read_member(blob_member(digest), 1 << 22)
    seen.add(digest)
    total = len(body)
    document: dict[str, Any] = json.loads(body)
    for child in document.get("manifests", []):
        if child["digest"] not in seen:
            total += manifest_size(archive_path, child["digest"], seen)
    for blob in [document["config"], *document["layers"]] if "config" in document else []:
        if blob["digest"] not in seen:
            seen.add(blob["digest"])
            total += blob["size"]
    return total


# ---------------------------------------------------------------------------- ls


def test_ls_lists_the_standard_images(shared_images: StandardImages) -> None:
    listing = list_images(root_of(shared_images.root))
    entries = by_reference(listing.entries)
    assert listing.problems == ()
    assert listing.archives == 7
    for key, digest in shared_images.manifests.items():
        assert entries[key].digest == digest, key
    app = entries["app:1.0"]
    assert app.file == "app/1.0.oci"
    assert app.platforms == ("linux/amd64",)
    assert app.size == manifest_size(shared_images.root / "app" / "1.0.oci", app.digest)
    assert entries["zipped:1.0"].file == "zipped:1.0.oci"
    assert entries["pair:one"].file == entries["pair:two"].file == "pair.oci"
    # team/full.oci serves "team" (a file in the name's directory) and "team/full" (the name's
    # own file), both with the tag of its full-reference annotation.
    assert entries["team:3.1"].file == entries["team/full:3.1"].file == "team/full.oci"
    assert entries["bare:v1"].platforms == ("linux/amd64",)
    assert entries["app:1.0"].modified_ns == (shared_images.root / "app/1.0.oci").stat().st_mtime_ns


def test_ls_multi_arch_platforms_and_size(shared_images: StandardImages) -> None:
    entry = by_reference(list_images(root_of(shared_images.root)).entries)["multi:latest"]
    assert entry.platforms == ("linux/amd64", "linux/arm64")
    assert entry.media_type == "application/vnd.oci.image.index.v1+json"
    assert entry.size == manifest_size(shared_images.root / "multi.oci", entry.digest)


def test_index_size_counts_shared_blobs_once(image_dir: Path) -> None:
    w = LayoutWriter()
    shared = w.add_layer({"shared.txt": b"the same bytes for both\n" * 100})
    amd = w.add_image([shared], architecture="amd64")
    arm = w.add_image([shared], architecture="arm64", variant="v8")
    index = w.add_index([amd, arm])
    w.tag(index, "1")
    w.write_archive(image_dir / "both.oci")
    entry = by_reference(list_images(root_of(image_dir)).entries)["both:1"]
    assert entry.platforms == ("linux/amd64", "linux/arm64/v8")
    expected = (len(w.blob_bytes(index.digest)) + amd.size + arm.size + shared.size
                + w.blob_json(amd.digest)["config"]["size"]
                + w.blob_json(arm.digest)["config"]["size"])
    assert entry.size == expected
    assert entry.size < sum(manifest_size(image_dir / "both.oci", d) for d in
                            (amd.digest, arm.digest)) + len(w.blob_bytes(index.digest))


def test_ls_implicit_tag_and_untagged_entries(image_dir: Path) -> None:
    w = LayoutWriter()
    image, _ = small_image(w, "solo")
    w.tag(image, None)  # an index.json entry without a ref.name annotation
    (image_dir / "solo").mkdir()
    w.write_archive(image_dir / "solo" / "7.oci")
    entries = by_reference(list_images(root_of(image_dir)).entries)
    # skopeo's oci-archive:solo/7.oci writes no tag: the file name supplies it.
    assert entries["solo:7"].digest == image.digest
    # The same file is also the whole of name "solo/7" (pattern 5): the server serves that
    # alias, but listings leave it out, since the file is solo's tag file.
    assert not any(entry.name == "solo/7" for entry in entries.values())


async def test_ls_agrees_with_the_store(standard_images: StandardImages) -> None:
    # A second archive claiming app:1.0 makes resolution order matter.
    w = LayoutWriter()
    image, _ = small_image(w, "impostor")
    w.tag(image, "1.0")
    w.write_archive(standard_images.root / "app:1.0.oci")
    store = ImageStore(Config(directory=standard_images.root))
    listing = list_images(root_of(standard_images.root))
    names = sorted({entry.name for entry in listing.entries})
    # /v2/_catalog lists what ls lists: a tag file app/1.0.oci is app:1.0, not a repository
    # "app/1.0" besides, though pattern 5 keeps that alias pullable.
    assert await store.catalog() == names
    aliases = [e.file[: -len(".oci")] for e in listing.entries
               if e.tag is not None and e.file == f"{e.name}/{e.tag}.oci"]
    assert "app/1.0" in aliases
    for alias in aliases:
        assert await store.tags(alias)
    for name in names:
        tagged = [e for e in listing.entries if e.name == name and e.tag is not None]
        assert [e.tag for e in tagged] == await store.tags(name)
        for entry in tagged:
            assert entry.tag is not None
            assert (await store.manifest(name, entry.tag)).digest == entry.digest
        for entry in listing.entries:
            if entry.name == name and entry.tag is None:
                record = await store.manifest(name, parse_digest(entry.digest))
                assert record.digest == entry.digest
    assert by_reference(listing.entries)["app:1.0"].file == "app/1.0.oci"


def test_entry_json(shared_images: StandardImages) -> None:
    entry = by_reference(list_images(root_of(shared_images.root)).entries)["multi:latest"]
    document = entry.to_json()
    assert set(document) == {"name", "upstream", "tag", "digest", "mediaType", "platforms",
                             "size", "file", "modified"}
    assert document["platforms"] == ["linux/amd64", "linux/arm64"]
    assert document["modified"].endswith("Z")
    json.dumps(document)


def test_summary_cache_reads_unchanged_archives_once(
        standard_images: StandardImages, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []

    def counting(path: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(os.path.relpath(path, standard_images.root))
        return open_archive(path, *args, **kwargs)

    monkeypatch.setattr("simple_oci_registry.inventory.open_archive", counting)
    cache = SummaryCache()
    root = root_of(standard_images.root)
    first = list_images(root, cache=cache)
    assert len(opened) == 7
    opened.clear()
    assert list_images(root, cache=cache) == first
    assert opened == []
    w = LayoutWriter()
    image, _ = small_image(w, "app-3")
    w.tag(image, "3.0")
    w.write_archive(standard_images.root / "app" / "1.0.oci")  # replaced in place
    listing = list_images(root, cache=cache)
    assert opened == ["app/1.0.oci"]
    assert "app:3.0" in by_reference(listing.entries)
    assert "app:1.0" not in by_reference(listing.entries)


@pytest.mark.parametrize(("size", "text"), [
    (0, "0 B"), (999, "999 B"), (1023, "1.0 KiB"), (1536, "1.5 KiB"),
    (1036894, "1.0 MiB"), (150 << 20, "150 MiB"),
    (5 << 30, "5.0 GiB"), (3 << 50, "3072 TiB")])
def test_human_size(size: int, text: str) -> None:
    assert human_size(size) == text


# ---------------------------------------------------------------------------- check


def kinds(problems: tuple[inventory.Problem, ...]) -> set[tuple[str, str]]:
    return {(p.kind, p.file) for p in problems}


def test_check_clean_directory(standard_images: StandardImages) -> None:
    seen: list[CheckProgress] = []
    report = check_directory(root_of(standard_images.root), progress=seen.append)
    assert report.ok and report.problems == ()
    assert report.archives_checked == 7
    blobs = total = 0
    for path in standard_images.root.rglob("*.oci"):
        archive = open_archive(str(path))
        members = [m for n, m in archive.members.items() if n.startswith("blobs/")]
        blobs += len(members)
        total += sum(m.size for m in members)
    assert (report.blobs_hashed, report.bytes_hashed) == (blobs, total)
    assert [(p.index, p.total) for p in seen] == [(i, 7) for i in range(1, 8)]
    assert seen[0].file == "app/1.0.oci" and all(p.problems == 0 for p in seen)
    assert report.to_json()["ok"] is True


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_check_finds_a_blob_that_does_not_match_its_digest(
        standard_images: StandardImages) -> None:
    path = standard_images.root / "app" / "2.0.oci"
    layer = standard_images.layers["app:2.0"][0]
    member = open_archive(str(path)).members[blob_member(layer)]
    flip_byte(path, member.offset + member.size // 2)
    report = check_directory(root_of(standard_images.root))
    assert not report.ok
    assert kinds(report.problems) == {(ProblemKind.DIGEST, "app/2.0.oci")}
    (problem,) = report.problems
    assert layer in problem.reason and "not to its name" in problem.reason


def test_check_finds_a_damaged_blob_in_a_layout_directory(image_dir: Path) -> None:
    w = LayoutWriter()
    image, layers = small_image(w, "dir")
    w.tag(image, "1")
    layout = w.write_directory(image_dir / "dir.oci")
    flip_byte(layout / blob_member(layers[0].digest), 10)
    report = check_directory(root_of(image_dir))
    assert kinds(report.problems) == {(ProblemKind.DIGEST, "dir.oci")}


def test_check_reports_a_damaged_manifest_once(image_dir: Path) -> None:
    w = LayoutWriter()
    good, _ = small_image(w, "good")
    bad, _ = small_image(w, "bad")
    w.tag(good, "good")
    w.tag(bad, "bad")
    path = w.write_archive(image_dir / "two.oci")
    member = open_archive(str(path)).members[blob_member(bad.digest)]
    flip_byte(path, member.offset + 2)
    report = check_directory(root_of(image_dir))
    # The loader skips the manifest (the server serves "good" only); hashing agrees silently.
    assert [(p.kind, p.file) for p in report.problems] == [(ProblemKind.ENTRY, "two.oci")]
    assert bad.digest in report.problems[0].reason


@pytest.mark.parametrize("victim", ["app/1.0.oci", "zipped:1.0.oci"])
def test_check_finds_a_truncated_archive(standard_images: StandardImages, victim: str) -> None:
    path = standard_images.root / victim
    os.truncate(path, path.stat().st_size // 2)
    report = check_directory(root_of(standard_images.root))
    assert kinds(report.problems) == {(ProblemKind.STRUCTURE, victim)}
    assert report.archives_checked == 7


def test_check_finds_one_tag_in_two_files(standard_images: StandardImages) -> None:
    w = LayoutWriter()
    image, _ = small_image(w, "impostor")
    w.tag(image, "1.0")
    w.write_archive(standard_images.root / "app:1.0.oci")
    report = check_directory(root_of(standard_images.root))
    (problem,) = report.problems
    assert problem.kind == ProblemKind.DUPLICATE_TAG
    assert problem.files == ("app/1.0.oci", "app:1.0.oci")
    assert "app:1.0" in problem.reason and "app:1.0.oci" in problem.reason
    assert problem.file == "app/1.0.oci"  # the one the server answers from
    listing = list_images(root_of(standard_images.root))
    assert [p.kind for p in listing.problems] == [ProblemKind.DUPLICATE_TAG]


def test_check_finds_a_directory_named_like_an_archive(standard_images: StandardImages) -> None:
    (standard_images.root / "app" / "3.0.oci").mkdir()  # no index.json: not a layout
    report = check_directory(root_of(standard_images.root))
    assert kinds(report.problems) == {(ProblemKind.STRUCTURE, "app/3.0.oci")}
    assert "index.json" in report.problems[0].reason


def test_check_reports_permission_denied(standard_images: StandardImages,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The reporting path, independent of the user the tests run as."""

    def denied(path: str, *args: Any, **kwargs: Any) -> Any:
        if path.endswith("pair.oci"):
            raise PermissionError(13, "Permission denied", path)
        return open_archive(path, *args, **kwargs)

    monkeypatch.setattr("simple_oci_registry.inventory.open_archive", denied)
    report = check_directory(root_of(standard_images.root))
    assert [(p.kind, p.file, p.reason) for p in report.problems] == [
        (ProblemKind.UNREADABLE, "pair.oci", "permission denied")]


def check_without_privileges(root: Path) -> list[tuple[str, str, str]]:
    """Run check in a process for which file modes apply, even when the tests run as root.

    Root bypasses modes through CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH; dropping both from
    the bounding set (setpriv) makes mode 000 deny root as it denies anyone else.
    """
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv (util-linux) is missing to drop the "
                        "capabilities that let root read mode-000 files")
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    script = ("import json, sys\n"
              "from simple_oci_registry.inventory import check_directory\n"
              "print(json.dumps(check_directory(sys.argv[1]).to_json()))")
    done = subprocess.run([*prefix, sys.executable, "-c", script, root_of(root)],
                          capture_output=True, text=True, timeout=120, check=True)
    return [(p["kind"], p["file"], p["reason"]) for p in json.loads(done.stdout)["problems"]]


def test_check_finds_an_unreadable_file(standard_images: StandardImages) -> None:
    path = standard_images.root / "pair.oci"
    path.chmod(0)
    try:
        problems = check_without_privileges(standard_images.root)
    finally:
        path.chmod(0o644)
    assert problems == [("unreadable", "pair.oci", "permission denied")]


def test_check_finds_an_unlistable_directory(standard_images: StandardImages) -> None:
    directory = standard_images.root / "bare"
    directory.chmod(0)
    try:
        problems = check_without_privileges(standard_images.root)
    finally:
        directory.chmod(0o755)
    assert problems == [("unreadable", "bare", "cannot list the directory: permission denied")]


def test_check_finds_archives_no_name_leads_to(standard_images: StandardImages) -> None:
    shutil.copy(standard_images.root / "pair.oci", standard_images.root / "Upper Case.oci")
    report = check_directory(root_of(standard_images.root))
    assert kinds(report.problems) == {(ProblemKind.UNSERVED, "Upper Case.oci")}


def test_check_finds_symlinks_leading_outside(standard_images: StandardImages,
                                              tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.oci"
    shutil.copy(standard_images.root / "pair.oci", outside)
    (standard_images.root / "linked.oci").symlink_to(outside)
    root = root_of(standard_images.root)
    report = check_directory(root)
    assert kinds(report.problems) == {(ProblemKind.UNSERVED, "linked.oci")}
    assert "outside the image directory" in report.problems[0].reason
    assert check_directory(root, allow_outside=True).ok
    assert "linked:one" not in by_reference(list_images(root).entries)
    assert "linked:one" in by_reference(list_images(root, allow_outside=True).entries)


def test_check_finds_entries_the_server_skips(image_dir: Path) -> None:
    w = LayoutWriter()
    good, _ = small_image(w, "good")
    broken, broken_layers = small_image(w, "broken")
    w.tag(good, "good")
    w.tag(broken, "broken")
    w.remove_blob(broken_layers[0].digest)
    w.write_archive(image_dir / "mixed.oci")
    report = check_directory(root_of(image_dir))
    assert kinds(report.problems) == {(ProblemKind.ENTRY, "mixed.oci")}
    assert broken_layers[0].digest in report.problems[0].reason
    assert "mixed:good" in by_reference(list_images(root_of(image_dir)).entries)


def test_check_on_a_fresh_copy_of_the_standard_images_is_stable(tmp_path: Path) -> None:
    images = build_standard_images(tmp_path / "again")
    first = check_directory(root_of(images.root))
    assert first == check_directory(root_of(images.root))


def test_check_hashes_the_blobs_of_a_legacy_docker_save(tmp_path: Path) -> None:
    """Legacy docker-save layers live at ``<id>/layer.tar``, not ``blobs/…``: check must
    still hash them (through the layout's digest map)."""
    root = tmp_path / "images"
    root.mkdir()
    image = LegacyImage(layers=(layer_tar({"a.txt": b"a"}), layer_tar({"b.txt": b"b"})),
                        repo_tags=("legacy:1.0",))
    legacy_archive(root / "legacy.oci", [image])
    report = check_directory(str(root))
    assert report.ok, report.problems
    assert report.blobs_hashed >= 3  # the config and both layers


def test_listing_shows_upstream_names(tmp_path: Path) -> None:
    """Mirror folders are listed as the names users write: the host folder itself is no
    repository, a port folder reads host:port, and a file-name tag no request can name
    (``coredns:v1.11.1`` as a tag of the folder ``coredns``) is not offered."""
    images = build_mirror_images(tmp_path / "images")
    listing = list_images(root_of(images.root))
    shown = {f"{e.upstream}:{e.tag}" for e in listing.entries if e.tag is not None}
    assert shown == {"docker.io/library/busybox:1.36", "registry.k8s.io/pause:3.9",
                     "registry.k8s.io/coredns/coredns:v1.11.1",
                     "quay.io/prometheus/node-exporter:v1.8.0", "localhost:5000/team/app:1.0"}
    assert "registry.k8s.io" not in {e.name for e in listing.entries}
    ported = next(e for e in listing.entries if e.upstream.startswith("localhost:5000"))
    assert ported.name == "localhost_5000/team/app"  # what a client pulls, path form
    assert ported.to_json()["upstream"] == "localhost:5000/team/app"
    assert not listing.problems
    assert check_directory(root_of(images.root)).ok
