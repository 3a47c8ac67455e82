"""Where ``<name>:<reference>`` may live on disk, in the order the candidates are tried.

Relative to the image directory, for ``<name>:<reference>``::

    <dir>/
    ├── <name>/<reference>.oci      1. the reference's own file in the name's directory
    ├── <name>/*.oci                2. any other archive in that directory
    ├── <name>:<reference>.oci      3. the reference's own file beside the name
    ├── <name>:*.oci                4. any other "<name>:…" archive beside it
    └── <name>.oci                  5. one archive for the whole name

A name's candidates (patterns 2, 4 and 5 cover 1 and 3) come from two directory listings (the
name's own folder and its parent, see :mod:`directory`), never from glob: names come from
requests, and although :mod:`reference` already rejects every glob metacharacter, filtering by
plain string comparison leaves nothing to escape. The functions here are pure over listings,
except :func:`list_candidates` and :func:`walk_names`, which read the directory (blocking) for the
command-line tools.
"""

from __future__ import annotations

import contextlib
import enum
import os
import stat
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from simple_oci_registry.directory import SUFFIX, Entry, Listing, read_listing
from simple_oci_registry.fingerprint import Fingerprint
from simple_oci_registry.reference import valid_name

__all__ = ["SUFFIX", "Candidate", "Pattern", "fingerprint_of", "list_candidates", "names_in",
           "ordered", "own_candidates", "parent_candidates", "serves", "split_name",
           "walk_names"]


class Pattern(enum.IntEnum):
    """How a candidate file relates to the name (the numbering follows the module docstring)."""

    IN_DIRECTORY = 2  # <name>/<stem>.oci
    BESIDE = 4  # <name>:<stem>.oci
    WHOLE = 5  # <name>.oci


@dataclass(frozen=True, slots=True)
class Candidate:
    """One archive a name may resolve to, as its directory listing shows it."""

    path: str
    pattern: Pattern
    stem: str  # the "<reference>" part of the file name ("" for <name>.oci)
    inode: int  # from the listing: a different inode at the same path is another file
    is_dir: bool = False  # an OCI layout directory named like an archive


def fingerprint_of(path: str) -> Fingerprint:
    """The fingerprint an indexed archive at ``path`` is compared with.

    A layout directory is identified by its ``index.json``, exactly as
    :class:`~simple_oci_registry.archive.DirectoryArchive` identifies it (tools rewrite
    index.json on every change); the directory's own stat would never match it.
    """
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(OSError):  # no index.json yet: indexing will say why
            return Fingerprint.of_path(os.path.join(path, "index.json"))
    return Fingerprint.of(st)


def split_name(root: str, name: str) -> tuple[str, str, str]:
    """``(name directory, parent directory, base)``: where patterns 1-2 and 3-5 look."""
    name_dir = os.path.join(root, name)
    parent, base = os.path.split(name_dir)
    return name_dir, parent, base


def own_candidates(name_listing: Listing) -> list[Candidate]:
    """Patterns 1 and 2: every archive in the name's own directory, sorted."""
    return [_candidate(e, Pattern.IN_DIRECTORY, e.name[: -len(SUFFIX)])
            for e in name_listing.archives]


def parent_candidates(parent_listing: Listing, base: str) -> list[Candidate]:
    """Patterns 3-5: ``<base>:*.oci`` sorted, then ``<base>.oci``, beside the name."""
    found = [_candidate(e, Pattern.BESIDE, e.name[len(base) + 1: -len(SUFFIX)])
             for e in parent_listing.beside.get(base, ())]
    whole = parent_listing.whole.get(base)
    if whole is not None:
        found.append(_candidate(whole, Pattern.WHOLE, ""))
    return found


def _candidate(entry: Entry, pattern: Pattern, stem: str) -> Candidate:
    return Candidate(entry.path, pattern, stem, entry.inode, entry.is_dir)


def serves(root: str, name: str, path: str) -> bool:
    """Would an archive at ``path`` be one of ``name``'s candidates (by its name alone)?"""
    name_dir, parent, base = split_name(root, name)
    directory, file_name = os.path.split(path)
    if not file_name.endswith(SUFFIX):
        return False
    if directory == name_dir:
        return True
    return directory == parent and (file_name == base + SUFFIX
                                    or file_name.startswith(base + ":"))


def list_candidates(root: str, name: str, *, allow_outside: bool = False) -> tuple[Candidate, ...]:
    """Every archive ``name`` may resolve to, in patterns 2, 4, 5 order (blocking: two
    directory reads, for the command-line tools).

    ``root`` must be absolute and symlink-resolved; ``name`` must already be validated.
    """
    name_dir, parent, base = split_name(root, name)
    own = own_candidates(read_listing(name_dir, root, allow_outside=allow_outside))
    beside = parent_candidates(read_listing(parent, root, allow_outside=allow_outside), base)
    return tuple(own + beside)


def ordered(candidates: Sequence[Candidate], reference: str | None) -> list[Candidate]:
    """The candidates in the order they are tried for ``reference`` (a tag, or None)."""
    if reference is None:
        return list(candidates)

    def rank(c: Candidate) -> tuple[int, int]:
        own = c.pattern is not Pattern.WHOLE and c.stem == reference
        return (int(c.pattern) - (1 if own else 0), 0)

    # sorted() is stable: within a group the listing's name order is kept.
    return sorted(candidates, key=rank)


def names_in(listing: Listing, rel_dir: str, tag_files: Collection[str] = ()) -> set[str]:
    """The repository names one directory's archives can be pulled as.

    A file ``a/b/c.oci`` serves two names: ``a/b`` (pattern 2) and ``a/b/c`` (pattern 5);
    ``a/x:1.oci`` serves ``a`` (pattern 2) and ``a/x`` (pattern 4). Invalid names are left out.
    ``tag_files`` are entries known to serve ``<dir>:<stem>`` (``busybox/1.36.oci``): they
    count for their directory's name only, not for the alias ``busybox/1.36`` that pattern 5
    also makes pullable, since nobody means that alias.
    """
    names: set[str] = set()
    for entry in listing.archives:
        if rel_dir:
            names.add(rel_dir)  # any archive serves its directory's name (pattern 2)
            if entry.name in tag_files:
                continue
        # "<base>:<ref>.oci" (pattern 4) or "<base>.oci" (pattern 5) serves <base>; the ref
        # part only names an implicit tag, so an invalid one hides nothing.
        base = entry.name[: -len(SUFFIX)].partition(":")[0]
        names.add(f"{rel_dir}/{base}" if rel_dir else base)
    return {n for n in names if valid_name(n)}


def walk_names(root: str, *, allow_outside: bool = False) -> list[str]:
    """Every repository name some archive in ``root`` can be pulled as (blocking).

    Hidden entries, invalid names and (unless allowed) archives resolving outside ``root`` are
    skipped, exactly as the server's listings skip them; each directory is read once even when
    symlinks lead back to it.
    """
    names: set[str] = set()
    seen: set[int] = set()
    pending = [(root, "")]
    while pending:
        path, rel_dir = pending.pop()
        listing = read_listing(path, root, allow_outside=allow_outside)
        if listing.fingerprint is None or listing.fingerprint.inode in seen:
            continue
        seen.add(listing.fingerprint.inode)
        names |= names_in(listing, rel_dir)
        for name, sub in listing.subdirectories():
            pending.append((sub, f"{rel_dir}/{name}" if rel_dir else name))
    return sorted(names)
