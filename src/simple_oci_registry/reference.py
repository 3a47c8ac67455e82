"""The OCI distribution grammar for repository names, tags and digests.

Everything a request names is checked here, before any filesystem access: a value that passes
cannot contain ``..``, a backslash, a NUL, or a glob metacharacter (``*?[]``), so later layers may
safely join it under the image directory. Grammar from distribution-spec, "Pulling manifests"
(name and tag regular expressions) and image-spec, "Descriptors" (digest).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from simple_oci_registry.errors import ErrorCode, RegistryError

__all__ = [
    "DOCKER_HUB",
    "DOCKER_HUB_ALIASES",
    "Digest",
    "Host",
    "ImageReference",
    "InvalidReference",
    "MAX_NAME_LENGTH",
    "is_digest",
    "parse_digest",
    "parse_host",
    "parse_image_reference",
    "parse_reference",
    "tag_of_ref_name",
    "valid_name",
    "valid_tag",
    "validate_name",
]

# distribution-spec: <name> components; the whole name is bounded by 255 characters including
# the registry host in distribution's implementation, which we mirror for the path part.
_COMPONENT: Final = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE: Final = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE: Final = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
# image-spec descriptor.md: digest ::= algorithm ":" encoded.
_DIGEST_RE: Final = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_ENCODED_RE: Final = {
    "sha256": re.compile(r"[a-f0-9]{64}"),
    "sha512": re.compile(r"[a-f0-9]{128}"),
}
MAX_NAME_LENGTH: Final = 255
# distribution/reference (regexp.go): a registry host in an image reference is a domain name,
# an IPv4 address or a bracketed IPv6 address, with an optional port.
_HOST_COMPONENT: Final = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE: Final = re.compile(
    rf"(?P<host>{_HOST_COMPONENT}(?:\.{_HOST_COMPONENT})*|\[[a-fA-F0-9:]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?")
MAX_HOST_LENGTH: Final = 255
DOCKER_HUB: Final = "docker.io"
# Names under which Docker Hub is reached; all mean docker.io (distribution's normalize.go maps
# index.docker.io, containerd treats registry-1.docker.io as docker.io for its ns hint).
DOCKER_HUB_ALIASES: Final = frozenset({DOCKER_HUB, "index.docker.io", "registry-1.docker.io"})


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated content digest such as ``sha256:<64 hex>``."""

    algorithm: str
    encoded: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"


def valid_name(name: str) -> bool:
    """True when ``name`` is a repository name the spec allows."""
    return len(name) <= MAX_NAME_LENGTH and _NAME_RE.fullmatch(name) is not None


def valid_tag(tag: str) -> bool:
    """True when ``tag`` matches the spec's tag grammar."""
    return _TAG_RE.fullmatch(tag) is not None


def validate_name(name: str) -> str:
    """Return ``name`` or raise NAME_INVALID."""
    if not valid_name(name):
        raise RegistryError(ErrorCode.NAME_INVALID, {"name": name[:300]})
    return name


def is_digest(value: str) -> bool:
    """True for anything shaped like ``algorithm:encoded`` (it may still be unsupported)."""
    return ":" in value


def parse_digest(value: str) -> Digest:
    """Parse a digest, raising DIGEST_INVALID for malformed or unsupported ones.

    Only sha256 and sha512 are accepted (image-spec registers both); anything else could never
    match content we hold, and the spec asks for DIGEST_INVALID rather than a lookup.
    """
    if len(value) > 200 or _DIGEST_RE.fullmatch(value) is None:
        raise RegistryError(ErrorCode.DIGEST_INVALID, {"digest": value[:200]},
                            message="invalid digest")
    algorithm, encoded = value.split(":", 1)
    pattern = _ENCODED_RE.get(algorithm)
    if pattern is None or pattern.fullmatch(encoded) is None:
        raise RegistryError(ErrorCode.DIGEST_INVALID, {"digest": value[:200]},
                            message="unsupported or malformed digest")
    return Digest(algorithm, encoded)


def parse_reference(reference: str) -> str | Digest:
    """A manifest reference is a tag or a digest; return the tag or the parsed digest."""
    if is_digest(reference):
        return parse_digest(reference)
    if not valid_tag(reference):
        raise RegistryError(ErrorCode.MANIFEST_UNKNOWN, {"reference": reference[:200]},
                            message="invalid tag")
    return reference


def tag_of_ref_name(ref_name: str) -> str | None:
    """The tag carried by an ``org.opencontainers.image.ref.name`` annotation.

    Tools write either a bare tag (skopeo, buildah, umoci) or a full reference such as
    ``example.com:5000/team/app:1.0`` (BuildKit, podman's oci-dir). The tag is the text after a
    colon that follows the last slash; a digest-pinned reference (``…@sha256:…``) carries none.
    """
    if "@" in ref_name:
        return None
    last_segment = ref_name.rsplit("/", 1)[-1]
    if ":" in last_segment:
        candidate = last_segment.rsplit(":", 1)[1]
    elif "/" in ref_name:
        return None  # a full name without a tag, e.g. "example.com/app"
    else:
        candidate = ref_name
    return candidate if valid_tag(candidate) else None


class InvalidReference(ValueError):
    """An image reference or registry host that breaks the grammar; the message says how."""


@dataclass(frozen=True, slots=True)
class Host:
    """A registry host as written in image references: lower-cased, Docker Hub's aliases
    folded into ``docker.io``."""

    name: str
    port: int | None = None

    def __str__(self) -> str:
        return self.name if self.port is None else f"{self.name}:{self.port}"


def parse_host(text: str) -> Host:
    """Parse ``host[:port]`` by the reference grammar, or raise :class:`InvalidReference`.

    Host names are case-insensitive (RFC 4343), so they are lower-cased; IPv6 literals are
    refused because they cannot be a folder name in the image directory.
    """
    if not text:
        raise InvalidReference("empty registry host")
    if len(text) > MAX_HOST_LENGTH:
        raise InvalidReference(f"registry host longer than {MAX_HOST_LENGTH} characters")
    match = _HOST_RE.fullmatch(text)
    if match is None:
        raise InvalidReference(f"not a registry host[:port]: {text[:100]!r}")
    host = match["host"].lower()
    if host.startswith("["):
        raise InvalidReference("IPv6 registry hosts have no folder in the image directory")
    port = int(match["port"]) if match["port"] is not None else None
    if port is not None and not 0 < port < 65536:
        raise InvalidReference(f"port out of range: {port}")
    if host in DOCKER_HUB_ALIASES and port is None:
        host = DOCKER_HUB
    return Host(host, port)


@dataclass(frozen=True, slots=True)
class ImageReference:
    """An image reference normalised the way container runtimes do it (distribution's
    ``ParseDockerRef``): ``nginx`` is ``docker.io/library/nginx:latest``, and a reference with
    a digest is pulled by the digest alone (a tag beside it is dropped, as CRI does)."""

    host: Host
    path: str  # "library/nginx"
    tag: str | None
    digest: Digest | None

    @property
    def name(self) -> str:
        """The fully qualified repository name, ``docker.io/library/nginx``."""
        return f"{self.host}/{self.path}"

    def __str__(self) -> str:
        if self.digest is not None:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag}"


def _looks_like_host(component: str) -> bool:
    # distribution/reference normalize.go splitDockerDomain: the first component names a
    # registry only when it has a dot or a port, is "localhost", or has upper-case letters.
    return ("." in component or ":" in component or component == "localhost"
            or component != component.lower())


def parse_image_reference(text: str) -> ImageReference:
    """Normalise ``text`` (``nginx``, ``quay.io/a/b:v1``, ``x@sha256:…``) or raise
    :class:`InvalidReference` saying what is wrong with it."""
    if not text or len(text) > 1024:
        raise InvalidReference("empty or over-long reference")
    remainder, at, digest_text = text.partition("@")
    digest: Digest | None = None
    if at:
        try:
            digest = parse_digest(digest_text)
        except RegistryError:
            raise InvalidReference(f"invalid digest: {digest_text[:100]!r}") from None
    first, slash, rest = remainder.partition("/")
    if slash and _looks_like_host(first):
        host = parse_host(first)
    else:
        host, rest = Host(DOCKER_HUB), remainder
    path, tag = rest, None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        path, tag = rest[:colon], rest[colon + 1:]
        if not valid_tag(tag):
            raise InvalidReference(f"invalid tag: {tag[:100]!r}")
    if host.name == DOCKER_HUB and host.port is None and "/" not in path:
        path = f"library/{path}"  # Docker Hub's official images live under library/
    if not path or _NAME_RE.fullmatch(path) is None:
        raise InvalidReference(f"invalid repository path: {path[:100]!r} (lower-case letters, "
                             "digits and separators only)")
    if len(str(host)) + 1 + len(path) > MAX_NAME_LENGTH:
        raise InvalidReference(f"name longer than {MAX_NAME_LENGTH} characters")
    if digest is not None:
        tag = None  # CRI pulls name:tag@digest by the digest alone
    elif tag is None:
        tag = "latest"
    return ImageReference(host, path, tag, digest)
