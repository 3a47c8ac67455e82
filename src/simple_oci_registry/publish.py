"""Publishing an archive into the image directory safely, for CI jobs and operators.

The registry sees the directory as it is at each request, so a half-copied archive must never
have a name it serves: the copy is written under a hidden temporary name in the target folder
(readers skip hidden entries), flushed to stable storage, and renamed into place, which is
atomic on a local filesystem and on NFS. A replaced archive's content stays downloadable on
every node for the registry's grace period while its old bytes can still be read there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

from simple_oci_registry.directory import SUFFIX
from simple_oci_registry.inventory import Problem, check_archive

__all__ = ["PublishError", "publish"]


class PublishError(Exception):
    """The archive was not published; the message says why."""


@dataclass(frozen=True, slots=True)
class Published:
    target: str
    size: int


def publish(source: str, target: str) -> Published:
    """Validate ``source`` as ``check`` does, then put it at ``target`` atomically."""
    if not target.endswith(SUFFIX) or os.path.basename(target).startswith("."):
        raise PublishError(f"{target}: the target must be a visible file name ending in "
                           f"{SUFFIX}")
    if not os.path.isfile(source):
        raise PublishError(f"{source}: not a regular file (publish archives, not layout "
                           "directories)")
    problems: list[Problem] = check_archive(source)
    if problems:
        reasons = "; ".join(f"{p.kind}: {p.reason}" for p in problems[:5])
        raise PublishError(f"{source} is not servable, nothing published: {reasons}")
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)}.",
                                     suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fchmod(out.fileno(), 0o644)  # the registry runs as another user
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)  # the rename itself reaches stable storage
    finally:
        os.close(directory)
    return Published(target, os.path.getsize(target))
