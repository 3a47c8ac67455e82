"""Basic auth with an htpasswd file of bcrypt hashes (--htpasswd), in process and for skopeo.

Hashes are made with ``bcrypt.hashpw`` at the lowest cost (4) to keep the suite fast; one line
is written the way ``htpasswd -B`` writes it (``$2y$``), and when the ``htpasswd`` tool is
installed its own output is used too.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import RawTestServer, TestClient

from simple_oci_registry.app import make_app
from simple_oci_registry.auth import parse_htpasswd
from simple_oci_registry.config import Config
from tests.conftest import require
from tests.images import StandardImages
from tests.server import RegistryProcess

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
POLL_LIMIT = 30.0  # seconds; the file is re-checked every 2 s


def bcrypt_line(user: str, password: str, prefix: str = "$2b$") -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"{user}:{prefix}{hashed[4:]}"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


ALICE = basic("alice", "wonderland")
BOB = basic("bob", "builder:with:colons")  # the $2y$ line, as htpasswd -B writes it


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    path.write_text("# registry users\n"
                    f"{bcrypt_line('alice', 'wonderland')}\n"
                    f"{bcrypt_line('bob', 'builder:with:colons', prefix='$2y$')}\n"
                    "carol:{SHA}not-bcrypt-so-ignored\n")
    return path


@pytest.fixture
async def client(aiohttp_client: MakeClient, shared_images: StandardImages,
                 htpasswd: Path) -> Client:
    registry = make_app(Config(directory=shared_images.root, htpasswd=htpasswd))
    return await aiohttp_client(RawTestServer(registry.handle))


async def assert_unauthorized(response: ClientResponse) -> None:
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="simple-oci-registry"'
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    if response.method != "HEAD":
        assert response.headers["Content-Type"].startswith("application/json")
        errors = json.loads(await response.read())["errors"]
        assert errors[0]["code"] == "UNAUTHORIZED"


def api_paths(images: StandardImages) -> list[str]:
    return ["/v2/", "/v2", "/v2/_catalog", "/v2/app/tags/list", "/v2/app/manifests/1.0",
            f"/v2/app/manifests/{images.manifests['app:1.0']}",
            f"/v2/app/blobs/{images.layers['app:1.0'][0]}", "/v2/nope/manifests/1.0",
            "/v2/app/blobs/uploads/"]


async def test_anonymous_requests_get_a_challenge(client: Client,
                                                  shared_images: StandardImages) -> None:
    for path in [*api_paths(shared_images), "/"]:
        for method in ("GET", "HEAD"):
            await assert_unauthorized(await client.request(method, path))


@pytest.mark.parametrize("headers", [
    basic("alice", "wrong"), basic("alice", ""), basic("alice", "wonderland "),
    basic("nobody", "wonderland"), basic("carol", "anything"), basic("", ""),
    basic("alice", "x" * 100),  # longer than bcrypt's 72 bytes
    {"Authorization": "Basic not-base64!"}, {"Authorization": "Basic " + "\u00e9"},
    {"Authorization": "Bearer abc"}, {"Authorization": "Basic"},
    {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:x").decode()},
], ids=lambda h: h["Authorization"][:30])
async def test_wrong_credentials_get_a_challenge(client: Client, headers: dict[str, str],
                                                 shared_images: StandardImages) -> None:
    for path in ("/v2/", "/v2/app/manifests/1.0",
                 f"/v2/app/blobs/{shared_images.layers['app:1.0'][0]}"):
        await assert_unauthorized(await client.get(path, headers=headers))


@pytest.mark.parametrize("headers", [ALICE, BOB], ids=["2b", "2y"])
async def test_right_credentials_pull(client: Client, shared_images: StandardImages,
                                      headers: dict[str, str]) -> None:
    assert (await client.get("/v2/", headers=headers)).status == 200
    digest = shared_images.manifests["app:1.0"]
    for method in ("GET", "HEAD"):
        response = await client.request(method, "/v2/app/manifests/1.0", headers=headers)
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == digest
    for layer in shared_images.layers["app:1.0"]:
        response = await client.get(f"/v2/app/blobs/{layer}", headers=headers)
        assert response.status == 200
        assert "sha256:" + hashlib.sha256(await response.read()).hexdigest() == layer
    response = await client.get("/v2/app/tags/list", headers=headers)
    assert json.loads(await response.read())["tags"] == ["1.0", "2.0"]
    # Authenticated is not authorised to write: still read-only.
    response = await client.delete("/v2/app/manifests/1.0", headers=headers)
    assert response.status == 405


async def test_probes_and_metrics_stay_open(client: Client) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        response = await client.get(path)
        assert response.status == 200, path
        assert "WWW-Authenticate" not in response.headers
    # Refused attempts are counted like any other answer.
    await client.get("/v2/app/manifests/1.0")
    text = await (await client.get("/metrics")).text()
    assert 'endpoint="manifest",method="GET",status="401"' in text


async def test_users_are_added_and_revoked_without_restart(client: Client,
                                                           htpasswd: Path) -> None:
    dave = basic("dave", "new-user")
    await assert_unauthorized(await client.get("/v2/", headers=dave))
    assert (await client.get("/v2/", headers=ALICE)).status == 200  # now remembered
    with htpasswd.open("a") as file:
        file.write(bcrypt_line("dave", "new-user") + "\n")

    async def status(headers: dict[str, str]) -> int:
        return (await client.get("/v2/", headers=headers)).status

    await poll_status(status, dave, 200, "the added user accepted")
    # Revoked: alice's line goes (written beside and renamed, as editors and tools do).
    replacement = htpasswd.with_name("htpasswd.new")
    replacement.write_text("\n".join(line for line in htpasswd.read_text().splitlines()
                                     if not line.startswith("alice:")) + "\n")
    replacement.replace(htpasswd)
    await poll_status(status, ALICE, 401, "the removed user refused, remembered or not")
    assert await status(dave) == 200


async def poll_status(status: Callable[[dict[str, str]], Awaitable[int]],
                      headers: dict[str, str], expected: int, what: str) -> None:
    deadline = time.monotonic() + POLL_LIMIT
    while await status(headers) != expected:
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.1)


async def test_unusable_hash_is_a_wrong_password(aiohttp_client: MakeClient,
                                                 shared_images: StandardImages,
                                                 tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "htpasswd"
    path.write_text("erin:$2y$05$this-is-not-a-bcrypt-hash\n")
    registry = make_app(Config(directory=shared_images.root, htpasswd=path))
    client = await aiohttp_client(RawTestServer(registry.handle))
    await assert_unauthorized(await client.get("/v2/", headers=basic("erin", "x")))
    assert "erin" in caplog.text


async def test_long_password_made_by_htpasswd(aiohttp_client: MakeClient,
                                              shared_images: StandardImages,
                                              tmp_path: Path) -> None:
    # htpasswd -B hashes the first 72 bytes of a longer password; bcrypt >= 5 refuses to
    # check one longer than that (ValueError, which was a 500).
    password = "correct horse battery staple " * 4
    hashed = bcrypt.hashpw(password.encode()[:72], bcrypt.gensalt(rounds=4)).decode()
    path = tmp_path / "htpasswd"
    path.write_text(f"frank:$2y${hashed[4:]}\n")
    registry = make_app(Config(directory=shared_images.root, htpasswd=path))
    client = await aiohttp_client(RawTestServer(registry.handle))
    assert (await client.get("/v2/", headers=basic("frank", password))).status == 200
    await assert_unauthorized(await client.get("/v2/", headers=basic("frank", "x" + password)))


def test_htpasswd_tool_output_is_accepted(tmp_path: Path) -> None:
    tool = shutil.which("htpasswd")
    if tool is None:
        pytest.skip("htpasswd (apache2-utils) is not installed")
    line = subprocess.run([tool, "-nbB", "-C", "4", "grace", "hopper"], capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip()
    assert line.startswith("grace:$2y$")
    users = parse_htpasswd(line + "\n")
    assert bcrypt.checkpw(b"hopper", users["grace"])


def test_parse_htpasswd_keeps_only_bcrypt_lines(caplog: pytest.LogCaptureFixture) -> None:
    text = ("# comment\n\n"
            "a:$2a$04$abcdefghijklmnopqrstuu0123456789012345678901234567890\n"
            "b:$apr1$salt$md5hash\n"
            "c:{SHA}base64\n"
            "d:plaintext\n"
            "no-colon-line\n"
            "  e:$2y$04$abcdefghijklmnopqrstuu0123456789012345678901234567890  \n")
    users = parse_htpasswd(text)
    assert sorted(users) == ["a", "e"]
    assert users["e"].startswith(b"$2b$04$")  # $2y$ read as $2b$ (and $2a$ alike)
    assert caplog.text.count("ignored") == 4
    assert "plaintext" not in caplog.text  # the file's secrets stay out of the log


# ------------------------------------------------------------------------------ skopeo


class _SendCredentials(urllib.request.BaseHandler):
    """Adds an Authorization header to every urllib request."""

    def __init__(self, authorization: str) -> None:
        self.authorization = authorization

    def http_request(self, request: urllib.request.Request) -> urllib.request.Request:
        request.add_unredirected_header("Authorization", self.authorization)
        return request


def start_with_credentials(registry: RegistryProcess, authorization: str) -> RegistryProcess:
    """RegistryProcess.start() waits for GET /v2/ (with urllib): let that wait authenticate."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(urllib.request, "_opener",
                      urllib.request.build_opener(_SendCredentials(authorization)))
        return registry.start()


@pytest.mark.clients
def test_skopeo_pull_needs_the_credentials(shared_images: StandardImages, htpasswd: Path,
                                           tmp_path: Path) -> None:
    skopeo = require("skopeo")
    registry = start_with_credentials(
        RegistryProcess(shared_images.root, "--htpasswd", str(htpasswd),
                        log_path=tmp_path / "registry.log"), ALICE["Authorization"])
    try:
        source = f"docker://{registry.host}/app:1.0"
        out = tmp_path / "out"
        pulled = subprocess.run(
            [skopeo, "copy", "--src-tls-verify=false", "--src-creds", "alice:wonderland",
             source, f"oci:{out}:1.0"], capture_output=True, text=True, timeout=120)
        assert pulled.returncode == 0, pulled.stderr
        index = json.loads((out / "index.json").read_text())
        assert index["manifests"][0]["digest"] == shared_images.manifests["app:1.0"]
        for blob in (out / "blobs" / "sha256").iterdir():
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name

        for creds in (["--src-no-creds"], ["--src-creds", "alice:wrong"]):
            refused = subprocess.run(
                [skopeo, "copy", "--src-tls-verify=false", *creds, source,
                 f"oci:{tmp_path / 'refused'}:1.0"], capture_output=True, text=True,
                timeout=120)
            assert refused.returncode != 0, creds
            assert "unauthorized" in refused.stderr.lower(), refused.stderr
    finally:
        assert registry.stop() == 0


async def test_unknown_users_cost_a_bcrypt_check_like_known_ones(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Answering unknown names without hashing would let response times list the users."""
    from simple_oci_registry import auth

    checked: list[bytes] = []
    real = auth._checkpw

    def counting(user: str, password: bytes, hashed: bytes) -> bool:
        checked.append(hashed)
        return real(user, password, hashed)

    monkeypatch.setattr(auth, "_checkpw", counting)
    await assert_unauthorized(await client.get("/v2/", headers=basic("mallory", "guess")))
    await assert_unauthorized(await client.get("/v2/", headers=basic("alice", "guess")))
    assert len(checked) == 2
    # The decoy has the cost factor of the file's hashes ("$2b$04$" here), not a cheaper one.
    assert checked[0][:7] == checked[1][:7] == b"$2b$04$"
