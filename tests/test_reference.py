"""The name, tag and digest grammar (reference.py): the only gate before filesystem access."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simple_oci_registry.errors import ErrorCode, RegistryError
from simple_oci_registry.reference import (
    MAX_NAME_LENGTH,
    Digest,
    InvalidReference,
    is_digest,
    parse_digest,
    parse_image_reference,
    parse_reference,
    tag_of_ref_name,
    valid_name,
    valid_tag,
    validate_name,
)

# No per-example deadline: a slow machine must not fail a test on timing.
_no_deadline = settings(deadline=None)

SHA256 = "sha256:" + "0123456789abcdef" * 4
SHA512 = "sha512:" + "0123456789abcdef" * 8

# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", [
    "a", "app", "team/app", "a/b/c/d", "my-app", "my--app", "my_app", "my__app", "my.app",
    "v1.2.3", "0", "9lives", "example.com/team/app", "a" * MAX_NAME_LENGTH,
    "/".join(["ab"] * 85),  # 254 characters with slashes
])
def test_valid_names(name: str) -> None:
    assert valid_name(name)
    assert validate_name(name) == name


@pytest.mark.parametrize("name", [
    "", "..", "a/..", "../a", "a/../b", "a..b", ".", "./a", "a/.", ".a", "a.", "%2e%2e",
    "a/%2e%2e/b", "a%2fb", "a\\b", "..\\a", "a//b", "/a", "a/", "//", "App", "aPP", "A",
    "a" * (MAX_NAME_LENGTH + 1), "/".join(["ab"] * 86), "*", "a*", "a?", "a[b]", "[", "]",
    "a\x00b", "\x00", "ä", "app\u0131", "ａｐｐ", "a b", " a", "a\n", "a\t", "a:b", "a@b",
    "a_-b", "a___b", "a-.b", "-a", "_a", "a-", "a_", "a~b", "a+b",
], ids=lambda v: repr(v) if len(v) < 80 else f"{v[:20]}...({len(v)})")
def test_invalid_names(name: str) -> None:
    assert not valid_name(name)
    with pytest.raises(RegistryError) as info:
        validate_name(name)
    assert info.value.code is ErrorCode.NAME_INVALID
    assert info.value.status == 400


def test_invalid_name_detail_is_bounded() -> None:
    with pytest.raises(RegistryError) as info:
        validate_name("A" * 10_000)
    assert info.value.detail == {"name": "A" * 300}


# --------------------------------------------------------------------------- tags


@pytest.mark.parametrize("tag", [
    "latest", "1.0", "v1.2.3-rc.1", "_private", "A", "UPPER_lower.9-x", "0",
    "a" * 128, "a.", "a-", "a..b",
])
def test_valid_tags(tag: str) -> None:
    assert valid_tag(tag)
    assert parse_reference(tag) == tag


@pytest.mark.parametrize("tag", [
    "", ".a", "-a", ".", "..", "a" * 129, "a/b", "a@b", "a b", "a\n", "a*", "a?",
    "a[0]", "a\\b", "a\x00", "ä", "%2e",
])
def test_invalid_tags(tag: str) -> None:
    assert not valid_tag(tag)
    with pytest.raises(RegistryError) as info:
        parse_reference(tag)
    assert info.value.code is ErrorCode.MANIFEST_UNKNOWN


# --------------------------------------------------------------------------- digests


def test_parse_digest_sha256_and_sha512() -> None:
    assert parse_digest(SHA256) == Digest("sha256", "0123456789abcdef" * 4)
    assert str(parse_digest(SHA256)) == SHA256
    assert parse_digest(SHA512) == Digest("sha512", "0123456789abcdef" * 8)
    assert str(parse_digest(SHA512)) == SHA512


@pytest.mark.parametrize("value", [
    "sha256:" + "a" * 63, "sha256:" + "a" * 65, "sha512:" + "a" * 127, "sha512:" + "a" * 129,
    "sha512:" + "a" * 64, "sha256:" + "A" * 64, "sha256:" + "g" * 64, "sha384:" + "a" * 96,
    "md5:" + "a" * 32, "blake3:" + "a" * 64, "sha256:", ":" + "a" * 64, "sha256" + "a" * 64,
    "SHA256:" + "a" * 64, "sha256:" + "a" * 63 + "\n", "sha256: " + "a" * 64,
    "sha256:" + "a" * 64 + ":", "sha256::" + "a" * 64, "sha256:../../etc/passwd",
    "sha256:" + "a" * 10_000, "", ":", "latest",
], ids=lambda v: v if len(v) < 80 else f"{v[:20]}...({len(v)})")
def test_parse_digest_rejects(value: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_digest(value)
    assert info.value.code is ErrorCode.DIGEST_INVALID
    assert info.value.status == 400
    assert len(str(info.value.detail["digest"])) <= 200


def test_reference_with_colon_is_a_digest() -> None:
    # Anything with a colon is read as a digest: "a:b" is a malformed digest, not a bad tag.
    assert not valid_tag("a:b")
    with pytest.raises(RegistryError) as info:
        parse_reference("a:b")
    assert info.value.code is ErrorCode.DIGEST_INVALID


def test_parse_reference_digest_or_tag() -> None:
    assert parse_reference(SHA256) == Digest("sha256", "0123456789abcdef" * 4)
    assert parse_reference("1.0") == "1.0"
    assert is_digest(SHA256) and not is_digest("1.0")
    with pytest.raises(RegistryError) as info:
        parse_reference("sha256:short")
    assert info.value.code is ErrorCode.DIGEST_INVALID


# --------------------------------------------------------------------------- ref.name annotation


@pytest.mark.parametrize(("ref_name", "tag"), [
    ("1.0", "1.0"),
    ("latest", "latest"),
    ("example.com:5000/team/app:1.0", "1.0"),
    ("example.com/team/app:3.1", "3.1"),
    ("docker.io/library/busybox:latest", "latest"),
    ("app:v2", "v2"),
    ("localhost:5000/app:v2", "v2"),
    ("app@" + SHA256, None),
    ("example.com/app:1.0@" + SHA256, None),
    ("example.com/app", None),
    ("example.com:5000/team/app", None),
    ("", None),
    ("app:", None),
    ("app:.bad", None),
    ("not a tag", None),
])
def test_tag_of_ref_name(ref_name: str, tag: str | None) -> None:
    assert tag_of_ref_name(ref_name) == tag


# --------------------------------------------------------------------------- properties

_ALNUM = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
_SEPARATOR = st.sampled_from([".", "_", "__"]) | st.integers(1, 3).map(lambda n: "-" * n)


@st.composite
def _component(draw: st.DrawFn) -> str:
    """One path component: [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)* (distribution-spec)."""
    parts = [draw(_ALNUM)]
    for _ in range(draw(st.integers(0, 3))):
        parts += [draw(_SEPARATOR), draw(_ALNUM)]
    return "".join(parts)


grammar_names = st.lists(_component(), min_size=1, max_size=6).map("/".join).filter(
    lambda n: len(n) <= MAX_NAME_LENGTH)


@_no_deadline
@given(st.text(max_size=300) | grammar_names | st.from_regex(r"[a-z0-9./_\-\\*?\[\]%]{0,40}"))
def test_accepted_names_are_safe_to_join(name: str) -> None:
    if not valid_name(name):
        return
    assert ".." not in name
    assert "\\" not in name
    assert not any(c in name for c in "*?[]\x00%:@ ")
    assert not name.startswith("/") and not name.endswith("/")
    assert "" not in name.split("/")
    assert name == name.lower()
    assert name.isascii()
    assert len(name) <= MAX_NAME_LENGTH


@_no_deadline
@given(grammar_names)
def test_grammar_names_are_accepted(name: str) -> None:
    assert valid_name(name)


@_no_deadline
@given(st.from_regex(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}", fullmatch=True))
def test_grammar_tags_are_accepted(tag: str) -> None:
    assert valid_tag(tag)
    assert tag_of_ref_name(tag) == tag
    assert tag_of_ref_name(f"example.com:5000/team/app:{tag}") == tag


@_no_deadline
@given(st.text(max_size=300))
def test_random_text_only_raises_registry_errors(text: str) -> None:
    valid_name(text)
    valid_tag(text)
    is_digest(text)
    tag_of_ref_name(text)
    for parse in (validate_name, parse_digest, parse_reference):
        try:
            parse(text)
        except RegistryError:
            pass


@_no_deadline
@given(st.sampled_from(["sha256", "sha512", "sha384", "md5", "SHA256"]),
       st.text(alphabet="0123456789abcdefABCDEF", max_size=140))
def test_parse_digest_exact_lengths(algorithm: str, encoded: str) -> None:
    expected = {"sha256": 64, "sha512": 128}.get(algorithm)
    ok = expected == len(encoded) and encoded == encoded.lower()
    try:
        digest = parse_digest(f"{algorithm}:{encoded}")
    except RegistryError as exc:
        assert exc.code is ErrorCode.DIGEST_INVALID
        assert not ok
    else:
        assert ok
        assert digest == Digest(algorithm, encoded)


@pytest.mark.parametrize("text", [
    "", "Nginx:1", "nginx:", "nginx:-x", "nginx@sha256:short", "nginx@md5:" + "a" * 32,
    "quay.io/", "quay.io//a", "a/../b", "host:99999/a", "[::1]:5000/a", "a" * 1100,
])
def test_parse_image_reference_refuses(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse_image_reference(text)
