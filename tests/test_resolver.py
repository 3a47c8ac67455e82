"""Where a name's archives may live (resolver.py): candidate order, hiding, symlinks, catalog."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simple_oci_registry.archive import open_archive
from simple_oci_registry.fingerprint import Fingerprint
from simple_oci_registry.reference import valid_name
from simple_oci_registry.resolver import (
    Candidate,
    Pattern,
    fingerprint_of,
    list_candidates,
    ordered,
    walk_names,
)
from tests.images import build_standard_images


def touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())


def relative(root: Path, candidates: list[Candidate] | tuple[Candidate, ...]) -> list[str]:
    return [os.path.relpath(c.path, root) for c in candidates]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "images"
    directory.mkdir()
    return Path(os.path.realpath(directory))


def test_candidate_order_for_each_pattern(root: Path) -> None:
    touch(root, "app/2.0.oci", "app/1.0.oci", "app/0.9.oci", "app:beta.oci", "app:1.0.oci",
          "app.oci")
    candidates = list_candidates(str(root), "app")
    assert relative(root, candidates) == ["app/0.9.oci", "app/1.0.oci", "app/2.0.oci",
                                          "app:1.0.oci", "app:beta.oci", "app.oci"]
    assert [(c.pattern, c.stem) for c in candidates] == [
        (Pattern.IN_DIRECTORY, "0.9"), (Pattern.IN_DIRECTORY, "1.0"),
        (Pattern.IN_DIRECTORY, "2.0"), (Pattern.BESIDE, "1.0"), (Pattern.BESIDE, "beta"),
        (Pattern.WHOLE, "")]
    for c in candidates:
        assert c.inode == os.stat(c.path).st_ino  # from the listing, no stat per file
    # <name>/<ref>.oci, <name>/*.oci, <name>:<ref>.oci, <name>:*.oci, <name>.oci
    assert relative(root, ordered(candidates, "1.0")) == [
        "app/1.0.oci", "app/0.9.oci", "app/2.0.oci", "app:1.0.oci", "app:beta.oci", "app.oci"]
    assert relative(root, ordered(candidates, "beta")) == [
        "app/0.9.oci", "app/1.0.oci", "app/2.0.oci", "app:beta.oci", "app:1.0.oci", "app.oci"]
    assert relative(root, ordered(candidates, "nope")) == relative(root, candidates)
    assert ordered(candidates, None) == list(candidates)


def test_whole_archive_is_never_a_tag_match(root: Path) -> None:
    touch(root, "app.oci", "app:zzz.oci")
    candidates = list_candidates(str(root), "app")
    # "app.oci" has stem "": asking for tag "" must not promote it.
    assert relative(root, ordered(candidates, "")) == ["app:zzz.oci", "app.oci"]


def test_nested_names(root: Path) -> None:
    touch(root, "team/app/1.0.oci", "team/app:2.0.oci", "team/app.oci", "team/other.oci")
    assert relative(root, list_candidates(str(root), "team/app")) == [
        "team/app/1.0.oci", "team/app:2.0.oci", "team/app.oci"]
    # "team" is a name too: its directory holds archives (pattern 2).
    team = list_candidates(str(root), "team")
    assert relative(root, team) == ["team/app.oci", "team/app:2.0.oci", "team/other.oci"]
    assert {c.pattern for c in team} == {Pattern.IN_DIRECTORY}
    assert [c.stem for c in team] == ["app", "app:2.0", "other"]
    assert list_candidates(str(root), "team/app/1.0") == (
        list_candidates(str(root), "team/app/1.0"))
    assert relative(root, list_candidates(str(root), "team/app/1.0")) == ["team/app/1.0.oci"]


def test_similar_names_are_not_confused(root: Path) -> None:
    touch(root, "apple.oci", "apple:1.oci", "app-x.oci", "app_:1.oci", "ap.oci", "app.oci.bak",
          "app:1.tar", "app/readme.txt", "app/x.oci.tmp", "appx/1.oci")
    assert list_candidates(str(root), "app") == ()
    touch(root, "app.oci")
    assert relative(root, list_candidates(str(root), "app")) == ["app.oci"]


def test_hidden_entries_are_skipped(root: Path) -> None:
    touch(root, "app/.1.0.oci", "app/.hidden.oci", "app/ok.oci", ".app.oci", ".hidden/x.oci",
          "app/.tmp/y.oci")
    assert relative(root, list_candidates(str(root), "app")) == ["app/ok.oci"]
    assert walk_names(str(root)) == ["app", "app/ok"]


def test_missing_name_has_no_candidates(root: Path) -> None:
    assert list_candidates(str(root), "nothing/here") == ()
    touch(root, "file")
    assert list_candidates(str(root), "file/x") == ()  # a file where a directory would be


def test_unreadable_directory_is_skipped(root: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    touch(root, "app/1.0.oci", "app:2.0.oci")
    real_scandir = os.scandir

    def scandir(path: str) -> object:
        if os.path.basename(path) == "app":
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # tests may run as root, who reads anything
    assert relative(root, list_candidates(str(root), "app")) == ["app:2.0.oci"]
    assert "cannot list" in caplog.text and "Permission denied" in caplog.text


def test_layout_directories_are_candidates(root: Path) -> None:
    (root / "app" / "dir.oci").mkdir(parents=True)
    (root / "app" / "dir.oci" / "index.json").write_bytes(b"{}")
    (root / "whole.oci").mkdir()
    [candidate] = list_candidates(str(root), "app")
    assert relative(root, [candidate]) == ["app/dir.oci"]
    # Identified by index.json, as the archive layer does, so the store's check matches.
    index = root / "app" / "dir.oci" / "index.json"
    assert candidate.is_dir
    assert fingerprint_of(candidate.path) == Fingerprint.of_path(str(index))
    assert fingerprint_of(candidate.path) == open_archive(candidate.path).fingerprint
    # Without index.json (not a layout yet) the directory's own stat stands in.
    [whole] = list_candidates(str(root), "whole")
    assert relative(root, [whole]) == ["whole.oci"]
    assert fingerprint_of(whole.path) == Fingerprint.of_path(str(root / "whole.oci"))
    assert walk_names(str(root)) == ["app", "app/dir", "whole"]


def test_symlink_outside_the_root_is_refused(root: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    outside = tmp_path / "outside"
    touch(outside, "x.oci", "dir/1.0.oci")
    (root / "app.oci").symlink_to(outside / "x.oci")
    (root / "linked").symlink_to(outside / "dir")
    assert list_candidates(str(root), "app") == ()
    assert "outside the image directory" in caplog.text
    assert list_candidates(str(root), "linked") == ()
    allowed = list_candidates(str(root), "app", allow_outside=True)
    assert relative(root, allowed) == ["app.oci"]
    assert allowed[0].inode == os.stat(outside / "x.oci").st_ino
    assert relative(root, list_candidates(str(root), "linked", allow_outside=True)) == [
        "linked/1.0.oci"]


def test_symlink_inside_the_root_is_followed(root: Path) -> None:
    touch(root, "real/1.0.oci")
    (root / "alias.oci").symlink_to(root / "real" / "1.0.oci")
    (root / "dangling.oci").symlink_to(root / "missing.oci")
    [candidate] = list_candidates(str(root), "alias")
    # The target's inode: what opening the path reaches.
    assert candidate.inode == os.stat(root / "real" / "1.0.oci").st_ino
    assert list_candidates(str(root), "dangling") == ()


def test_prefix_of_root_is_not_inside(tmp_path: Path) -> None:
    # /x/images2 starts with the text "/x/images" but is not inside it.
    root = Path(os.path.realpath(tmp_path)) / "images"
    sibling = Path(os.path.realpath(tmp_path)) / "images2"
    touch(sibling, "x.oci")
    root.mkdir()
    (root / "app.oci").symlink_to(sibling / "x.oci")
    assert list_candidates(str(root), "app") == ()


# --------------------------------------------------------------------------- catalog


def test_walk_names_of_the_standard_images(tmp_path: Path) -> None:
    images = build_standard_images(tmp_path / "images")
    root = os.path.realpath(images.root)
    assert walk_names(root) == ["app", "app/1.0", "app/2.0", "bare", "bare/v1", "multi", "pair",
                                "team", "team/full", "zipped"]
    for name in walk_names(root):
        assert list_candidates(root, name), name


def test_walk_names_skips_invalid_names(root: Path) -> None:
    touch(root, "App.oci", "ok.oci", "bad name.oci", "x:.oci", "y:BAD TAG.oci", "z:1.0.oci",
          "Upper/inner.oci", ".git/objects/a.oci")
    # "y:BAD TAG.oci" still serves "y" (list_candidates finds it); only its implicit tag is bad.
    assert walk_names(str(root)) == ["ok", "x", "y", "z"]
    assert list_candidates(str(root), "y")


def test_walk_names_lists_the_directory_of_beside_archives(root: Path) -> None:
    touch(root, "team/app:1.0.oci")
    # list_candidates("team") finds team/app:1.0.oci (pattern 2), so the catalog lists it.
    assert relative(root, list_candidates(str(root), "team")) == ["team/app:1.0.oci"]
    assert walk_names(str(root)) == ["team", "team/app"]


def test_walk_names_leaves_out_symlinks_outside_the_root(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    touch(outside, "x.oci", "dir/1.0.oci")
    touch(root, "ok.oci")
    (root / "evil.oci").symlink_to(outside / "x.oci")
    (root / "linked").symlink_to(outside / "dir")
    assert walk_names(str(root)) == ["ok"]
    assert walk_names(str(root), allow_outside=True) == ["evil", "linked", "linked/1.0", "ok"]


# --------------------------------------------------------------------------- properties

_segment = st.sampled_from(["a", "b", "a.b", "x-y", "A", ".h", "1.0"])
_leaf = st.builds(lambda stem, tag, hidden: ("." if hidden else "") + stem
                  + (f":{tag}" if tag is not None else "") + ".oci",
                  _segment, st.none() | st.sampled_from(["1.0", "latest", "", "B AD"]),
                  st.booleans())
_trees = st.lists(st.tuples(st.lists(_segment, max_size=2), _leaf), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_trees)
def test_catalog_and_candidates_agree(tree: list[tuple[list[str], str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.realpath(tmp)
        names: set[str] = set()
        for directories, leaf in tree:
            folder = os.path.join(root, *directories)
            if os.path.isfile(folder):
                continue
            os.makedirs(folder, exist_ok=True)
            target = os.path.join(folder, leaf)
            if not os.path.isdir(target):
                Path(target).write_bytes(b"x")
            parts = [*directories, leaf.removesuffix(".oci").partition(":")[0]]
            names.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        catalog = walk_names(root)
        for name in catalog:
            assert list_candidates(root, name), f"{name} is listed but has no archive"
        for name in names:
            if valid_name(name) and list_candidates(root, name):
                assert name in catalog, f"{name} has archives but is not listed"


def test_walk_names_survives_a_symlink_loop_when_following_links(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "team").mkdir(parents=True)
    (root / "team" / "app.oci").write_bytes(b"")
    (root / "team" / "loop").symlink_to(root)  # a link back to an ancestor
    names = walk_names(str(root), allow_outside=True)
    assert "team" in names and "team/app" in names
