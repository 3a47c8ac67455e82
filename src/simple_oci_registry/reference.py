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
    "Digest",
    "MAX_NAME_LENGTH",
    "is_digest",
    "parse_digest",
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
