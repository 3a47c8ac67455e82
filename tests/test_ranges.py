"""Range header parsing for blobs (ranges.py), RFC 9110 §14 and the conformance cases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simple_oci_registry.errors import ErrorCode, RegistryError
from simple_oci_registry.ranges import ByteRange, parse_range

# No per-example deadline: a slow machine must not fail a test on timing.
_no_deadline = settings(deadline=None)


def unsatisfiable(header: str, size: int) -> RegistryError:
    with pytest.raises(RegistryError) as info:
        parse_range(header, size)
    assert info.value.code is ErrorCode.RANGE_INVALID
    assert info.value.status == 416
    assert info.value.headers == {"Content-Range": f"bytes */{size}"}
    return info.value


def test_no_header_serves_everything() -> None:
    assert parse_range(None, 1000) is None


def test_first_bytes() -> None:
    r = parse_range("bytes=0-9", 1000)
    assert r == ByteRange(0, 9, 1000)
    assert r is not None and r.length == 10
    assert r.content_range() == "bytes 0-9/1000"


def test_open_ended_range_resumes() -> None:
    assert parse_range("bytes=500-", 1000) == ByteRange(500, 999, 1000)


def test_suffix_range() -> None:
    assert parse_range("bytes=-500", 1000) == ByteRange(500, 999, 1000)


def test_suffix_longer_than_blob_is_the_whole_blob() -> None:
    assert parse_range("bytes=-5000", 1000) == ByteRange(0, 999, 1000)


def test_end_before_start_is_416() -> None:
    unsatisfiable("bytes=500-0", 1000)


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=1000-1000", "bytes=5000-6000"])
def test_start_at_or_past_end_is_416(header: str) -> None:
    unsatisfiable(header, 1000)


def test_end_past_size_is_clamped() -> None:
    r = parse_range("bytes=990-5000", 1000)
    assert r == ByteRange(990, 999, 1000)
    assert r is not None and r.content_range() == "bytes 990-999/1000"


def test_last_byte() -> None:
    assert parse_range("bytes=999-999", 1000) == ByteRange(999, 999, 1000)
    assert parse_range("bytes=-1", 1000) == ByteRange(999, 999, 1000)


def test_zero_suffix_is_416() -> None:
    unsatisfiable("bytes=-0", 1000)


def test_whitespace_is_tolerated() -> None:
    assert parse_range(" bytes = 1 - 2 ", 10) == ByteRange(1, 2, 10)


@pytest.mark.parametrize("header", [
    "", "bytes", "bytes=", "bytes=-", "bytes=a-b", "bytes=1-2-3", "items=0-9", "bytes 0-9",
    "bytes=0-9,20-29", "bytes=0-1, 5-6", "bytes=0x10-20", "bytes=+1-2", "bytes=1.5-2",
    "bytes=\u0661-\u0662",  # Arabic-Indic digits: not ASCII DIGIT (RFC 5234)
])
def test_malformed_or_multi_range_serves_everything(header: str) -> None:
    assert parse_range(header, 1000) is None


@pytest.mark.parametrize("header", ["bytes=0-", "bytes=0-0", "bytes=-1", "bytes=-0"])
def test_empty_blob_has_no_satisfiable_range(header: str) -> None:
    unsatisfiable(header, 0)


def test_huge_numbers_do_not_crash() -> None:
    # Python refuses int() on more than 4300 digits; a header may carry any number of them.
    huge = "9" * 5000
    unsatisfiable(f"bytes={huge}-", 1000)
    assert parse_range(f"bytes=0-{huge}", 1000) == ByteRange(0, 999, 1000)
    assert parse_range(f"bytes=-{huge}", 1000) == ByteRange(0, 999, 1000)
    assert parse_range(f"bytes={'0' * 5000}1-2", 1000) == ByteRange(1, 2, 1000)


_numbers = st.integers(0, 2**70).map(str) | st.text(alphabet="0123456789", max_size=30)
_headers = (
    st.text(max_size=40)
    | st.builds(lambda a, b: f"bytes={a}-{b}", _numbers | st.just(""), _numbers | st.just(""))
    | st.builds(lambda a, b, c: f"bytes={a}-{b},{c}-", _numbers, _numbers, _numbers)
    | st.from_regex(r"\s*bytes\s*=\s*\d*\s*-\s*\d*\s*", fullmatch=True)
)


@_no_deadline
@given(size=st.integers(0, 2**50) | st.integers(0, 2000), header=_headers)
def test_result_is_none_a_range_inside_the_blob_or_416(size: int, header: str) -> None:
    try:
        r = parse_range(header, size)
    except RegistryError as exc:
        assert exc.code is ErrorCode.RANGE_INVALID
        assert exc.headers == {"Content-Range": f"bytes */{size}"}
        return
    if r is None:
        return
    assert r.size == size
    assert 0 <= r.start <= r.end < size
    assert r.length >= 1
    assert r.content_range() == f"bytes {r.start}-{r.end}/{size}"


@_no_deadline
@given(size=st.integers(1, 10_000), start=st.integers(0, 20_000), end=st.integers(0, 20_000))
def test_int_range_semantics(size: int, start: int, end: int) -> None:
    header = f"bytes={start}-{end}"
    if start >= size or end < start:
        unsatisfiable(header, size)
    else:
        assert parse_range(header, size) == ByteRange(start, min(end, size - 1), size)
