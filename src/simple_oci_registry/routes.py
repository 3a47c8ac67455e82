"""The /v2/ API's routes as data, and the parser that maps a request path onto them.

Repository names contain slashes, so a path is split on its *last* endpoint keyword:
``/v2/team/app/manifests/1.0`` is (manifests, ``team/app``, ``1.0``). Matching works on the path
alone, so query strings such as containerd's ``?ns=`` mirror hint never affect routing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = ["Endpoint", "Route", "parse_v2_path"]


class Endpoint(enum.Enum):
    """Every /v2/ endpoint, with the methods it allows (distribution-spec, endpoint table)."""

    # The first item keeps values distinct: equal values would make Enum members aliases.
    BASE = ("base", "GET", "HEAD")
    CATALOG = ("catalog", "GET", "HEAD")
    MANIFEST = ("manifest", "GET", "HEAD")
    BLOB = ("blob", "GET", "HEAD")
    TAGS = ("tags", "GET", "HEAD")
    REFERRERS = ("referrers", "GET", "HEAD")
    UPLOAD = ("upload",)  # blob uploads and mounts: a read-only registry allows nothing here

    def __init__(self, label: str, *methods: str) -> None:
        self.label = label
        self.methods = frozenset(methods)


@dataclass(frozen=True, slots=True)
class Route:
    """A parsed /v2/ path: the endpoint, the repository name and the trailing argument."""

    endpoint: Endpoint
    name: str = ""
    argument: str = ""


_KEYWORDS: Final = {"manifests": Endpoint.MANIFEST, "blobs": Endpoint.BLOB,
                    "referrers": Endpoint.REFERRERS}


def parse_v2_path(rest: str) -> Route | None:
    """Parse what follows ``/v2/``; None when no endpoint matches (a 404).

    Runs on every request, hence two ``rpartition`` calls rather than split and join.
    """
    if rest == "":
        return Route(Endpoint.BASE)
    if rest in ("_catalog", "_catalog/"):
        return Route(Endpoint.CATALOG)
    head, _, argument = rest.rpartition("/")
    name, slash, keyword = head.rpartition("/")
    if not slash:
        return None  # fewer than three segments: no name before the keyword
    if keyword == "uploads":
        # end-4..7 and end-11: POST /v2/<name>/blobs/uploads/[?mount=…] and
        # PATCH|PUT|GET|DELETE /v2/<name>/blobs/uploads/<reference>
        upload_name, _, blobs = name.rpartition("/")
        if blobs == "blobs":
            return Route(Endpoint.UPLOAD, upload_name, argument)
    if keyword == "tags" and argument == "list":
        return Route(Endpoint.TAGS, name)
    endpoint = _KEYWORDS.get(keyword)
    return Route(endpoint, name, argument) if endpoint is not None else None
