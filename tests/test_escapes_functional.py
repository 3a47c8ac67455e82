"""Escapes: nothing outside ``--dir``, nothing hidden, and nothing a path trick reaches is served.

A valid archive sits OUTSIDE the image directory as bait (``../bait.oci``, ``../bait/``), and
hidden archives sit inside it. Requests go over raw sockets so that ``..``, ``%2e%2e``,
``%2f``, backslashes and double slashes reach the real server process exactly as written. Every
answer is checked for the bait's and the hidden images' bytes and digests, which must never
appear; refusals are the spec's JSON errors with the fitting status and code.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from simple_oci_registry.layoutwriter import LayoutWriter
from tests.hostile import Reply, error_codes, log_lines_naming, pull, raw_get
from tests.images import StandardImages, build_standard_images
from tests.server import RegistryProcess

BAIT_MARK = b"BAIT-OUTSIDE-THE-IMAGE-DIRECTORY"
HIDDEN_MARK = b"HIDDEN-ARCHIVE-CONTENT"


@dataclass(frozen=True, slots=True)
class Secret:
    """An image that must never be served: its digests and a marker inside its layer."""

    manifest: str
    config: str
    layer: str
    mark: bytes

    @property
    def digests(self) -> tuple[str, ...]:
        return (self.manifest, self.config, self.layer)


def write_secret(path: Path, mark: bytes, *tags: str) -> Secret:
    writer = LayoutWriter()
    layer = writer.add_layer({"secret.txt": mark * 64 + path.name.encode()}, compression="none")
    image = writer.add_image([layer], config={"config": {"Env": [mark.decode()]}})
    for tag in tags:
        writer.tag(image, tag)
    writer.write_archive(path)
    return Secret(image.digest, writer.blob_json(image.digest)["config"]["digest"],
                  layer.digest, mark)


@dataclass(frozen=True, slots=True)
class Escapes:
    root: Path
    images: StandardImages
    bait: Secret
    hidden: dict[str, Secret]
    default: RegistryProcess
    allowing: RegistryProcess

    def secrets(self) -> list[Secret]:
        return [self.bait, *self.hidden.values()]


@pytest.fixture(scope="module")
def escapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Escapes]:
    base = tmp_path_factory.mktemp("escapes")
    images = build_standard_images(base / "images")
    root = images.root
    # The bait, outside the image directory, under every name a traversal could reach.
    bait = write_secret(base / "bait.oci", BAIT_MARK, "latest", "1.0")
    (base / "bait").mkdir()
    os.link(base / "bait.oci", base / "bait" / "latest.oci")
    (base / "images-bait").mkdir()  # a sibling whose name extends the image directory's
    os.link(base / "bait.oci", base / "images-bait" / "app.oci")
    os.link(base / "bait.oci", base / "etc.oci")
    # Hidden archives inside it, each holding tags that would otherwise be served.
    hidden = {
        ".hidden.oci": write_secret(root / ".hidden.oci", HIDDEN_MARK, "secret"),
        "app/.x.oci": write_secret(root / "app" / ".x.oci", HIDDEN_MARK + b"2", "secret"),
        "app/.9.9.oci": write_secret(root / "app" / ".9.9.oci", HIDDEN_MARK + b"3"),
        ".secretdir/1.0.oci": write_secret(root / ".secretdir" / "1.0.oci", HIDDEN_MARK + b"4",
                                           "1.0"),
        "team/.hidden/1.0.oci": write_secret(root / "team" / ".hidden" / "1.0.oci",
                                             HIDDEN_MARK + b"5", "1.0"),
    }
    # Symlinks leaving the directory, one staying inside it, a loop and a dangling one.
    (root / "linked").mkdir()
    (root / "linked" / "1.0.oci").symlink_to(base / "bait.oci")
    (root / "linkdir").symlink_to(base / "bait")
    (root / "linkwhole.oci").symlink_to(base / "bait.oci")
    (root / "sibling.oci").symlink_to(base / "images-bait" / "app.oci")
    (root / "relative.oci").symlink_to(Path("..") / "bait.oci")
    (root / "inner.oci").symlink_to(Path("app") / "1.0.oci")
    (root / "dangling.oci").symlink_to(base / "nothing-here.oci")
    (root / "loop").symlink_to("loop")
    (root / "loopfile.oci").symlink_to("loopfile.oci")
    default = RegistryProcess(root, "--cache-dir", str(base / "cache-default"),
                              log_path=base / "default.log").start()
    try:
        allowing = RegistryProcess(root, "--allow-outside-symlinks",
                                   "--cache-dir", str(base / "cache-allowing"),
                                   log_path=base / "allowing.log").start()
    except BaseException:
        default.stop()
        raise
    try:
        yield Escapes(root, images, bait, hidden, default, allowing)
    finally:
        default.stop()
        allowing.stop()


def assert_clean(escapes: Escapes, reply: Reply, target: str) -> None:
    """No byte or digest of the bait or of a hidden archive in ``reply`` (an error detail may
    echo a digest the request itself named)."""
    everything = reply.body + repr(reply.headers).encode()
    for secret in escapes.secrets():
        assert secret.mark not in everything, (target, reply)
        for digest in secret.digests:
            if digest not in target:
                assert digest.encode() not in everything, (target, digest, reply)


def ask(escapes: Escapes, target: str, *, process: RegistryProcess | None = None
        ) -> tuple[Reply, Reply]:
    """GET and HEAD of ``target`` as written; both clean, both with the same status."""
    server = process or escapes.default
    get = raw_get(server.url, target)
    head = raw_get(server.url, target, method="HEAD")
    assert_clean(escapes, get, target)
    assert_clean(escapes, head, target)
    assert head.status == get.status, (target, get, head)
    assert head.body == b""
    return get, head


def expect(escapes: Escapes, target: str, status: int, *codes: str) -> None:
    get, head = ask(escapes, target)
    assert get.status == status, (target, get)
    assert error_codes(get)[0] in codes, (target, get)
    assert head.headers.get("content-type", "").startswith("application/json"), (target, head)


# A path that is no endpoint: 404 with the spec's nearest code (older builds said NOT_FOUND).
NO_ENDPOINT = ("UNSUPPORTED", "NOT_FOUND")

TRAVERSALS: list[tuple[str, int, tuple[str, ...]]] = [
    ("/v2/../../etc/passwd", 404, NO_ENDPOINT),
    ("/v2/../../../../../../etc/passwd", 404, NO_ENDPOINT),
    ("/v2/%2e%2e/%2e%2e/x/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/../bait/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/../etc/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/%2e%2e/bait/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/%2E%2E/bait/manifests/1.0", 400, ("NAME_INVALID",)),
    ("/v2/..%2fbait/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/%2e%2e%2fbait/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/%2e%2e%2f%2e%2e%2fetc%2fpasswd/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/app/../../bait/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/app/%2e%2e/%2e%2e/bait/tags/list", 400, ("NAME_INVALID",)),
    ("/v2/..%2fimages-bait/app/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/.%2e/bait/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/./bait/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/..\\bait/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/..%5cbait/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/app\\..\\..\\bait/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2//bait/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/%2fbait/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/%2F..%2Fbait/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/app//manifests/1.0", 400, ("NAME_INVALID",)),
    ("/v2/app///manifests/1.0", 400, ("NAME_INVALID",)),
    ("//v2/app/manifests/1.0", 404, NO_ENDPOINT),
    ("/v2/app%00/manifests/1.0", 400, ("NAME_INVALID",)),
    ("/v2/app%00/../../bait/manifests/1.0", 400, ("NAME_INVALID",)),
    ("/v2/bait/manifests/latest", 404, ("NAME_UNKNOWN", "MANIFEST_UNKNOWN")),
    ("/v2/etc/manifests/latest", 404, ("NAME_UNKNOWN", "MANIFEST_UNKNOWN")),
    # ".." in tags
    ("/v2/app/manifests/..", 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/app/manifests/%2e%2e", 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/app/manifests/..%2f..%2fbait", 404, NO_ENDPOINT),
    ("/v2/app/manifests/..%5c..%5cbait.oci", 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/app/manifests/1.0%2f..%2f..%2f..%2fbait", 404, NO_ENDPOINT),
    ("/v2/app/manifests/...", 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/app/manifests/1.0%00.oci", 404, ("MANIFEST_UNKNOWN",)),
    # ".." in digests
    ("/v2/app/blobs/..", 400, ("DIGEST_INVALID",)),
    ("/v2/app/blobs/sha256:..", 400, ("DIGEST_INVALID",)),
    ("/v2/app/blobs/sha256:%2e%2e", 400, ("DIGEST_INVALID",)),
    ("/v2/app/blobs/sha256:..%2f..%2f..%2fbait.oci", 404, NO_ENDPOINT),
    ("/v2/app/blobs/sha256:..%5c..%5cbait.oci", 400, ("DIGEST_INVALID",)),
    ("/v2/app/manifests/sha256:..", 400, ("DIGEST_INVALID",)),
    ("/v2/app/referrers/sha256:..", 400, ("DIGEST_INVALID",)),
    ("/v2/app/blobs/sha256%3a..%2f..", 404, NO_ENDPOINT),
    ("/v2/app/blobs/../../bait.oci", 404, NO_ENDPOINT),
    # Overlong names, tags and digests
    ("/v2/" + "a" * 300 + "/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/" + "a" * 256 + "/tags/list", 400, ("NAME_INVALID",)),
    ("/v2/" + "a/" * 150 + "b/blobs/sha256:" + "0" * 64, 400, ("NAME_INVALID",)),
    ("/v2/" + "a" * 4000 + "/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/app/manifests/" + "t" * 129, 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/app/manifests/" + "t" * 3000, 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/app/blobs/sha256:" + "0" * 300, 400, ("DIGEST_INVALID",)),
    ("/v2/app/manifests/sha256:" + "0" * 3000, 400, ("DIGEST_INVALID",)),
    # Glob metacharacters
    ("/v2/*/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/a*/manifests/1.0", 400, ("NAME_INVALID",)),
    ("/v2/ap%3f/manifests/1.0", 400, ("NAME_INVALID",)),
    ("/v2/ap%3F/tags/list", 400, ("NAME_INVALID",)),
    ("/v2/ap?/manifests/1.0", 404, NO_ENDPOINT),  # "?" starts the query: path is /v2/ap
    ("/v2/[a]pp/manifests/1.0", 400, ("NAME_INVALID",)),
    ("/v2/ap[p]/manifests/1.0", 400, ("NAME_INVALID",)),
    ("/v2/%5ba%5dpp/tags/list", 400, ("NAME_INVALID",)),
    ("/v2/*/*/manifests/*", 400, ("NAME_INVALID",)),
    ("/v2/app/manifests/*", 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/app/manifests/1.%3f", 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/app/manifests/[12].0", 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/app/manifests/%5b12%5d.0", 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/app/manifests/1*", 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/app/blobs/sha256:*", 400, ("DIGEST_INVALID",)),
    ("/v2/app/blobs/sha256:[0-9]*", 400, ("DIGEST_INVALID",)),
    ("/v2/app/blobs/*", 400, ("DIGEST_INVALID",)),
    ("/v2/app/referrers/sha256:?", 400, ("DIGEST_INVALID",)),
    ("/v2/{app,bait}/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/~/manifests/latest", 400, ("NAME_INVALID",)),
    ("/v2/%7e/manifests/latest", 400, ("NAME_INVALID",)),
]


@pytest.mark.parametrize(("target", "status", "codes"), TRAVERSALS,
                         ids=[t[0][:60] for t in TRAVERSALS])
def test_traversal_and_metacharacters(escapes: Escapes, target: str, status: int,
                                      codes: tuple[str, ...]) -> None:
    expect(escapes, target, status, *codes)


def test_the_bait_is_valid_and_unreachable(escapes: Escapes) -> None:
    """The bait itself would pull (through the allowed symlink), but no name reaches it."""
    bait = escapes.bait
    pulled = pull(escapes.allowing.url, "linkwhole", "latest")
    assert pulled.manifests == [bait.manifest] and pulled.blobs == [bait.config, bait.layer]
    for digest in bait.digests:
        for endpoint in ("manifests", "blobs"):
            for name in ("app", "multi", "team/full", "linked", "linkdir", "linkwhole",
                         "sibling", "relative"):
                get, _ = ask(escapes, f"/v2/{name}/{endpoint}/{digest}")
                assert get.status == 404, (name, endpoint, get)
                assert error_codes(get)[0] in ("NAME_UNKNOWN", "MANIFEST_UNKNOWN",
                                               "BLOB_UNKNOWN"), get


@pytest.mark.parametrize("name", ["linked", "linkdir", "linkwhole", "sibling", "relative"])
def test_symlinks_out_of_the_directory_are_refused(escapes: Escapes, name: str) -> None:
    for target in (f"/v2/{name}/manifests/latest", f"/v2/{name}/manifests/1.0",
                   f"/v2/{name}/tags/list", f"/v2/{name}/blobs/{escapes.bait.layer}",
                   f"/v2/{name}/manifests/{escapes.bait.manifest}",
                   f"/v2/{name}/referrers/{escapes.bait.manifest}"):
        get, _ = ask(escapes, target)
        if "/referrers/" in target and get.status == 200:
            assert get.json()["manifests"] == []  # referrers are an empty index, never a 404
            continue
        assert get.status == 404, (target, get)
        assert error_codes(get)[0] in ("NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN")
    assert any("outside the image directory" in line
               for line in log_lines_naming(escapes.default.log(), name)), name


@pytest.mark.parametrize("name", ["linked", "linkdir", "linkwhole", "sibling", "relative"])
def test_symlinks_out_of_the_directory_with_the_flag(escapes: Escapes, name: str) -> None:
    tag = "1.0" if name == "linked" else "latest"
    pulled = pull(escapes.allowing.url, name, tag)
    assert pulled.manifests == [escapes.bait.manifest]
    assert pulled.blobs == [escapes.bait.config, escapes.bait.layer]


def test_symlink_inside_the_directory_is_served(escapes: Escapes) -> None:
    pulled = pull(escapes.default.url, "inner", "1.0")
    assert pulled.manifests == [escapes.images.manifests["app:1.0"]]
    assert pulled.blobs[1:] == escapes.images.layers["app:1.0"]




@pytest.mark.parametrize("name", ["dangling", "loopfile", "loop"])
@pytest.mark.parametrize("server", ["default", "allowing"])
def test_broken_symlinks_are_unknown_names(escapes: Escapes, name: str, server: str) -> None:
    """A dangling link, a link to itself, and a directory link to itself: 404, never 500
    (the directory loop was a 500 until 1b92f95)."""
    process = escapes.default if server == "default" else escapes.allowing
    for target in (f"/v2/{name}/manifests/1.0", f"/v2/{name}/tags/list",
                   f"/v2/{name}/blobs/sha256:{'0' * 64}"):
        get, _ = ask(escapes, target, process=process)
        assert get.status == 404, (target, get)
        assert error_codes(get)[0] in ("NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN")


HIDDEN_TARGETS: list[tuple[str, int, tuple[str, ...]]] = [
    ("/v2/.hidden/manifests/secret", 400, ("NAME_INVALID",)),
    ("/v2/.hidden/tags/list", 400, ("NAME_INVALID",)),
    ("/v2/%2ehidden/manifests/secret", 400, ("NAME_INVALID",)),
    ("/v2/app/.x/manifests/secret", 400, ("NAME_INVALID",)),
    ("/v2/app/manifests/secret", 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/app/manifests/.x", 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/app/manifests/9.9", 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/app/manifests/.9.9", 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/.secretdir/manifests/1.0", 400, ("NAME_INVALID",)),
    ("/v2/team/.hidden/manifests/1.0", 400, ("NAME_INVALID",)),
    ("/v2/team/manifests/1.0", 404, ("NAME_UNKNOWN", "MANIFEST_UNKNOWN")),
]


@pytest.mark.parametrize(("target", "status", "codes"), HIDDEN_TARGETS,
                         ids=[t[0] for t in HIDDEN_TARGETS])
def test_hidden_archives_are_never_served(escapes: Escapes, target: str, status: int,
                                          codes: tuple[str, ...]) -> None:
    expect(escapes, target, status, *codes)


def test_hidden_archives_digests_are_unknown(escapes: Escapes) -> None:
    for key, secret in escapes.hidden.items():
        for name in ("app", "team", "team/full", "secretdir"):
            for endpoint in ("manifests", "blobs"):
                for digest in secret.digests:
                    get, _ = ask(escapes, f"/v2/{name}/{endpoint}/{digest}")
                    assert get.status == 404, (key, name, endpoint, get)
    tags, _ = ask(escapes, "/v2/app/tags/list")
    assert tags.status == 200 and tags.json()["tags"] == ["1.0", "2.0"]
    catalog, _ = ask(escapes, "/v2/_catalog")
    names = catalog.json()["repositories"]
    assert not [n for n in names if "hidden" in n or "secret" in n or "bait" in n], names
    page = raw_get(escapes.default.url, "/")
    assert_clean(escapes, page, "/")
    # With --allow-outside-symlinks the bait is served by design; hidden archives still not.
    page = raw_get(escapes.allowing.url, "/")
    for secret in escapes.hidden.values():
        assert secret.mark not in page.body
        assert not [d for d in secret.digests if d.encode() in page.body]


def test_everything_else_still_pulls(escapes: Escapes) -> None:
    for process in (escapes.default, escapes.allowing):
        for reference in escapes.images.manifests:
            name, _, tag = reference.rpartition(":")
            pull(process.url, name, tag)
        assert process.process is not None and process.process.poll() is None
