"""Where ``<name>:<reference>`` may live on disk, in the order the candidates are tried.

Relative to the image directory, for ``<name>:<reference>``::

    <dir>/
    ├── <name>/<reference>.oci      1. the reference's own file in the name's directory
    ├── <name>/*.oci                2. any other archive in that directory
    ├── <name>:<reference>.oci      3. the reference's own file beside the name
    ├── <name>:*.oci                4. any other "<name>:…" archive beside it
    └── <name>.oci                  5. one archive for the whole name

A name's candidates (patterns 2, 4 and 5 cover 1 and 3) are listed with two directory reads,
never with glob: names come from requests, and although :mod:`reference` already rejects every
glob metacharacter, listing and filtering by plain string comparison leaves nothing to escape.
Hidden entries are skipped, and a candidate that resolves outside the image directory (a symlink
pointing elsewhere) is refused unless the operator allows it.

Everything here blocks: callers run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from simple_oci_registry.fingerprint import Fingerprint
from simple_oci_registry.reference import valid_name

__all__ = ["Candidate", "Pattern", "list_candidates", "ordered", "walk_names"]

log = logging.getLogger(__name__)

SUFFIX: Final = ".oci"


class Pattern(enum.IntEnum):
    """How a candidate file relates to the name (the numbering follows the module docstring)."""

    IN_DIRECTORY = 2  # <name>/<stem>.oci
    BESIDE = 4  # <name>:<stem>.oci
    WHOLE = 5  # <name>.oci


@dataclass(frozen=True, slots=True)
class Candidate:
    """One archive a name may resolve to, with the fingerprint it had when listed."""

    path: str
    pattern: Pattern
    stem: str  # the "<reference>" part of the file name ("" for <name>.oci)
    fingerprint: Fingerprint


def _inside(root: str, path: str) -> bool:
    real = os.path.realpath(path)
    return real == root or real.startswith(root + os.sep)


def _fingerprint(path: str) -> Fingerprint:
    """The fingerprint the store compares with the indexed archive's.

    A layout directory is identified by its ``index.json``, exactly as
    :class:`~simple_oci_registry.archive.DirectoryArchive` identifies it (tools rewrite
    index.json on every change); the directory's own stat would never match it, and the layout
    would be indexed again on every request.
    """
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(OSError):  # no index.json yet: indexing will say why
            return Fingerprint.of_path(os.path.join(path, "index.json"))
    return Fingerprint.of(st)


def _entries(directory: str) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            yield from it
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        # EACCES (lost+found, another team's directory), ELOOP (a symlink loop), EIO/ESTALE
        # from NFS: nothing there can be served, but the name's other candidates still can.
        log.warning("cannot list %s: %s", directory, exc.strerror or exc)


def list_candidates(root: str, name: str, *, allow_outside: bool = False) -> tuple[Candidate, ...]:
    """Every archive ``name`` may resolve to, in patterns 2, 4, 5 order, each group sorted.

    ``root`` must be absolute and symlink-resolved; ``name`` must already be validated.
    """
    found: list[Candidate] = []
    name_dir = os.path.join(root, name)
    parent, base = os.path.split(name_dir)

    def consider(entry: os.DirEntry[str], pattern: Pattern, stem: str) -> None:
        if not allow_outside and not _inside(root, entry.path):
            log.warning("refusing %s: it resolves outside the image directory", entry.path)
            return
        try:
            fingerprint = _fingerprint(entry.path)
        except OSError:
            return  # vanished between listing and stat, or a dangling link
        found.append(Candidate(entry.path, pattern, stem, fingerprint))

    for entry in sorted(_entries(name_dir), key=lambda e: e.name):
        if entry.name.endswith(SUFFIX) and not entry.name.startswith("."):
            consider(entry, Pattern.IN_DIRECTORY, entry.name[: -len(SUFFIX)])
    beside: list[os.DirEntry[str]] = []
    whole: os.DirEntry[str] | None = None
    prefix = base + ":"
    for entry in _entries(parent):
        if not entry.name.endswith(SUFFIX):
            continue
        if entry.name.startswith(prefix):
            beside.append(entry)
        elif entry.name == base + SUFFIX:
            whole = entry
    for entry in sorted(beside, key=lambda e: e.name):
        consider(entry, Pattern.BESIDE, entry.name[len(prefix): -len(SUFFIX)])
    if whole is not None:
        consider(whole, Pattern.WHOLE, "")
    return tuple(found)


def ordered(candidates: Sequence[Candidate], reference: str | None) -> list[Candidate]:
    """The candidates in the order they are tried for ``reference`` (a tag, or None)."""
    if reference is None:
        return list(candidates)

    def rank(c: Candidate) -> tuple[int, int]:
        own = c.pattern is not Pattern.WHOLE and c.stem == reference
        return (int(c.pattern) - (1 if own else 0), 0)

    # sorted() is stable: within a group the listing's name order is kept.
    return sorted(candidates, key=rank)


def walk_names(root: str, *, allow_outside: bool = False) -> list[str]:
    """Every repository name some archive in ``root`` can be pulled as (for ``/v2/_catalog``).

    A file ``a/b/c.oci`` serves two names: ``a/b`` (pattern 2) and ``a/b/c`` (pattern 5);
    ``a/x:1.oci`` serves ``a`` (pattern 2) and ``a/x`` (pattern 4). Hidden entries, invalid
    names and (unless allowed) archives resolving outside ``root`` are skipped, exactly as
    :func:`list_candidates` skips them.
    """
    names: set[str] = set()
    seen: set[tuple[int, int]] = set()  # directories visited, by (device, inode)
    for directory, dirnames, filenames in os.walk(root, followlinks=allow_outside):
        try:
            st = os.stat(directory)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            # Following symlinks (--allow-outside-symlinks), a link to an ancestor would make
            # the walk endless; each directory is listed once.
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not d.endswith(SUFFIX)]
        rel_dir = os.path.relpath(directory, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        archives = [f for f in filenames if f.endswith(SUFFIX) and not f.startswith(".")]
        # Layout directories named like archives count as archives.
        archives += [d for d in os.listdir(directory)
                     if d.endswith(SUFFIX) and not d.startswith(".")
                     and os.path.isdir(os.path.join(directory, d))]
        for file_name in archives:
            # The same refusal as list_candidates, so the catalog lists only servable names.
            if not allow_outside and not _inside(root, os.path.join(directory, file_name)):
                continue
            # Any archive serves its directory's name (pattern 2), whatever its stem.
            if rel_dir:
                names.add(rel_dir)
            # "<base>:<ref>.oci" (pattern 4) or "<base>.oci" (pattern 5) serves <base>; the
            # ref part only names an implicit tag, so an invalid one hides nothing.
            base = file_name[: -len(SUFFIX)].partition(":")[0]
            names.add(f"{rel_dir}/{base}" if rel_dir else base)
    return sorted(n for n in names if valid_name(n))
