"""Listings reused until the directory changes (directory.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from simple_oci_registry.directory import (
    RACY_SECONDS,
    SLOW_STAT_SECONDS,
    DirectoryView,
    Probe,
    read_listing,
)


def test_listing_indexes_archives_for_each_pattern(tmp_path: Path) -> None:
    for name in ("a:1.oci", "a:2.oci", "a.oci", "b.oci", ".hidden.oci", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a").mkdir()
    listing = read_listing(str(tmp_path), str(tmp_path))
    assert [e.name for e in listing.archives] == ["a.oci", "a:1.oci", "a:2.oci", "b.oci"]
    assert [e.name for e in listing.beside["a"]] == ["a:1.oci", "a:2.oci"]
    assert set(listing.whole) == {"a", "b"}
    assert listing.subdirectories() == [("a", str(tmp_path / "a"))]
    assert not listing.settled  # just written: read again at the next check
    assert not read_listing(str(tmp_path / "missing"), str(tmp_path)).exists


async def test_checks_reread_only_changed_directories(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "1.0.oci").write_bytes(b"x")
    time.sleep(RACY_SECONDS + 0.1)
    view = DirectoryView(str(tmp_path))
    path = str(tmp_path / "app")
    first = (await view.check([path])).listings[path]
    for _ in range(5):
        assert (await view.check([path])).listings[path] is first
    assert view.listings_read == 1
    (tmp_path / "app" / "2.0.oci").write_bytes(b"y")
    changed = (await view.check([path])).listings[path]
    assert [e.name for e in changed.archives] == ["1.0.oci", "2.0.oci"]
    probe = Probe(str(tmp_path / "app" / "1.0.oci"))
    result = await view.check([], [probe])
    assert result.files[probe] is not None
    assert result.files[probe].inode == os.stat(probe.path).st_ino  # type: ignore[union-attr]


async def test_a_local_disk_keeps_the_stats_of_a_check_on_one_thread(tmp_path: Path) -> None:
    """Fan-out is for storage where a stat is a round trip; on a local disk a stat takes
    microseconds and spreading a check over threads would only add hand-offs."""
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    (tmp_path / "a" / "x.oci").write_bytes(b"")
    view = DirectoryView(str(tmp_path))
    probe = Probe(str(tmp_path / "a" / "x.oci"))
    try:
        for _ in range(30):
            await view.check([str(tmp_path / n) for n in ("a", "b", "c")], [probe])
        assert view.stat_seconds < SLOW_STAT_SECONDS
        assert view.stats_calls == 30 * 4
    finally:
        view.close()
