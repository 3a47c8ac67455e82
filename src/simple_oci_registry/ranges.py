"""HTTP Range requests for blobs (RFC 9110 §14)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from simple_oci_registry.errors import ErrorCode, RegistryError

__all__ = ["ByteRange", "parse_range"]

# RFC 9110 §14.1.1: ranges-specifier = range-unit "=" range-set; one int-range or suffix-range.
_SINGLE: Final = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.ASCII)
# RFC 9110 §14.1.1 puts no bound on 1*DIGIT, but int() refuses over 4300 digits: any position
# longer than this is past every blob, so it is read as this stand-in.
_HUGE: Final = 10**30


@dataclass(frozen=True, slots=True)
class ByteRange:
    """An inclusive byte range ``[start, end]`` already clamped to the representation."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"


def _position(digits: str) -> int:
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= 30 else _HUGE


def _unsatisfiable(size: int) -> RegistryError:
    # RFC 9110 §15.5.17: a 416 carries "Content-Range: bytes */<complete-length>".
    return RegistryError(ErrorCode.RANGE_INVALID, {"size": size},
                         headers={"Content-Range": f"bytes */{size}"})


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single range to serve, or None to serve the whole blob.

    Unparseable headers and multi-range requests are ignored (RFC 9110 §14.2: a server MAY
    ignore Range), so the client gets the full 200 rather than multipart/byteranges. A range
    that cannot be satisfied raises RANGE_INVALID (416).
    """
    if header is None:
        return None
    match = _SINGLE.fullmatch(header)
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if first == "" and last == "":
        return None
    if first == "":
        # suffix-range "-n": the last n bytes (RFC 9110 §14.1.1); "-0" selects nothing.
        suffix = _position(last)
        if suffix == 0 or size == 0:
            raise _unsatisfiable(size)
        return ByteRange(max(0, size - suffix), size - 1, size)
    start = _position(first)
    end = size - 1 if last == "" else _position(last)
    # A start past the end, or last < first ("bytes=500-0"), cannot be satisfied; distribution's
    # conformance tests expect 416 for both.
    if start >= size or end < start:
        raise _unsatisfiable(size)
    return ByteRange(start, min(end, size - 1), size)
