"""Mirror requests: upstream image names (``docker.io/library/nginx``) mapped onto host folders.

The image directory keeps an upstream registry's images under a folder named after its host
(``DIR/docker.io/library/nginx/1.25.oci``), and runtimes configured to use this registry as a
mirror ask for them in two ways:

* containerd (``hosts.toml``) keeps the path and names the upstream in a query parameter:
  ``/v2/library/nginx/manifests/1.25?ns=docker.io``;
* containers/image (CRI-O, podman, skopeo, buildah), through a ``[[registry.mirror]]`` whose
  location carries a path, puts the host in the path: ``/v2/docker.io/library/nginx/…``.

Both become the repository name ``docker.io/library/nginx``, which the store resolves like any
other name. The rules, in :func:`repository_name`:

* ``ns`` is parsed as ``host[:port]`` by the reference grammar before anything else; a value
  that is not one (empty, ``/`` or ``..`` inside, over-long, IPv6, repeated) is answered 400
  ``NAME_INVALID`` and never reaches the filesystem (containerd then tries its next host);
* a host folder is the lower-cased host, ``host_port`` when there is a port (``:`` cannot be
  part of a repository name), and ``docker.io`` for Docker Hub's aliases;
* Docker Hub's single-component names get ``library/`` (``nginx`` → ``library/nginx``), as every
  runtime normalises them;
* a request with ``ns`` is answered from the host folder only: there is no fall-back to the
  name without it, because ``quay.io/prometheus/x`` and ``docker.io/prometheus/x`` are different
  images and serving one for the other would be a silent substitution;
* a path that already starts with the ``ns`` host folder (containerd with ``override_path``
  pointing at ``/v2/<host>``) is not prefixed twice;
* without ``ns`` the path is the name, as it always was, except that a leading Docker Hub alias
  becomes ``docker.io`` and ``docker.io/<one component>`` gains ``library/``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from simple_oci_registry.errors import ErrorCode, RegistryError
from simple_oci_registry.reference import (
    DOCKER_HUB,
    DOCKER_HUB_ALIASES,
    Host,
    ImageReference,
    InvalidReference,
    parse_host,
    validate_name,
)

__all__ = ["display_name", "host_folder", "host_folder_names", "is_host_folder",
           "repository_name", "repository_of"]

# A port folder as host_folder writes it: "localhost_5000", "registry.example.com_8443".
_PORT_FOLDER: Final = re.compile(r"(?P<host>[a-z0-9.-]+)_(?P<port>[0-9]{1,5})")


def host_folder(host: Host) -> str:
    """The folder of the image directory that holds ``host``'s images."""
    return host.name if host.port is None else f"{host.name}_{host.port}"


def _canonical(name: str) -> str:
    first, slash, rest = name.partition("/")
    if not slash or first not in DOCKER_HUB_ALIASES:
        return name
    if "/" not in rest:
        rest = f"library/{rest}"
    return f"{DOCKER_HUB}/{rest}"


def repository_name(path_name: str, ns: str | None) -> str:
    """The repository name a request for ``path_name`` (already validated) means, given its
    ``ns`` query parameter (None when absent). Raises NAME_INVALID for a bad ``ns``."""
    if ns is None:
        return _canonical(path_name)
    try:
        folder = host_folder(parse_host(ns))
    except InvalidReference as exc:
        raise RegistryError(ErrorCode.NAME_INVALID, {"ns": ns[:300]},
                            message=f"invalid ns parameter: {exc}") from None
    canonical = _canonical(path_name)
    if canonical.startswith(folder + "/"):
        return canonical  # the path names the host already (override_path)
    return validate_name(_canonical(f"{folder}/{path_name}"))


def repository_of(reference: ImageReference) -> str:
    """The repository name under which the directory serves ``reference``'s image."""
    return f"{host_folder(reference.host)}/{reference.path}"


def is_host_folder(component: str) -> bool:
    """True when a top-level folder name reads as a registry host (reference grammar: a dot,
    ``localhost``, or a port, here written ``host_port``)."""
    match = _PORT_FOLDER.fullmatch(component)
    host = match["host"] if match is not None else component
    return "." in host or host == "localhost"


def host_folder_names(names: Iterable[str]) -> set[str]:
    """Top-level names that are an upstream registry's folder (``registry.k8s.io`` beside
    ``registry.k8s.io/pause``): the archives in them serve ``registry.k8s.io/pause:3.9``, and
    nobody means the repository ``registry.k8s.io`` they also make pullable, so listings, the
    catalog and the duplicate-tag check leave such names out (the server still answers)."""
    names = list(names)
    parents = {name.partition("/")[0] for name in names if "/" in name}
    return {name for name in names if name in parents and is_host_folder(name)}


def display_name(name: str) -> str:
    """``name`` as users write it in image references: a port folder's ``_`` becomes ``:``
    (``localhost_5000/app`` → ``localhost:5000/app``); everything else is shown as it is."""
    first, slash, rest = name.partition("/")
    match = _PORT_FOLDER.fullmatch(first) if slash else None
    if match is None or not is_host_folder(first):
        return name
    return f"{match['host']}:{match['port']}/{rest}"
