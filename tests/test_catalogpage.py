"""``GET /``: the catalog page, in process and in a real headless browser.

In process, the page's content, escaping, caching and non-blocking build are checked against
the standard images. The browser test starts the real server and lets Chromium load the page,
which proves what string checks cannot: the document parses, the Content-Security-Policy lets
its own style and script run (the script marks ``<html class="js">``), and it renders.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import html
import os
import shutil
import struct
import subprocess
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp.test_utils import RawTestServer, TestClient

from simple_oci_registry.app import make_app
from simple_oci_registry.catalogpage import CatalogPage, pull_host, render_page
from simple_oci_registry.config import Config
from simple_oci_registry.inventory import ImageEntry, Listing, list_images
from simple_oci_registry.layoutwriter import LayoutWriter
from tests.images import StandardImages, build_mirror_images, small_image
from tests.server import RegistryProcess

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
HOST = "registry.example:5000"
STANDARD_TAGS = ["app:1.0", "app:2.0", "multi:latest", "zipped:1.0", "pair:one", "pair:two",
                 "team:3.1", "team/full:3.1", "bare:v1"]


def in_process(config: Config) -> RawTestServer:
    return RawTestServer(make_app(config).handle)


async def get_page(client: Client, host: str = HOST) -> str:
    response = await client.get("/", headers={"Host": host})
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    return await response.text()


def test_render_escapes_everything() -> None:
    entry = ImageEntry("app", '<b>"x"</b>', "sha256:" + "a" * 64, "m", ("<os>/arch",), 1,
                       "f.oci", 0)
    page = render_page(Listing((entry,), (), 1), "h<ost>", secure=False)
    assert "<b>" not in page and "<os>" not in page and "h<ost>" not in page
    assert html.escape('<b>"x"</b>') in page


@pytest.mark.parametrize(("header", "expected"), [
    ("registry.example:5000", "registry.example:5000"), ("10.0.0.7", "10.0.0.7"),
    ("[fd00::1]:5000", "[fd00::1]:5000"), ('evil"><script>', "REGISTRY-HOST"),
    ("a b", "REGISTRY-HOST"), ("", "REGISTRY-HOST")])
def test_pull_host(header: str, expected: str) -> None:
    assert pull_host(header) == expected


async def test_page_lists_repositories_tags_and_pull_commands(
        aiohttp_client: MakeClient, shared_images: StandardImages) -> None:
    client = await aiohttp_client(in_process(Config(directory=shared_images.root)))
    page = await get_page(client)
    for key in STANDARD_TAGS:
        name, tag = key.rsplit(":", 1)
        assert f"<h2>{name}</h2>" in page
        assert f'<td class="tag">{tag}</td>' in page
        assert f"<code>podman pull {HOST}/{key}</code>" in page
        assert f'data-copy="podman pull {HOST}/{key}"' in page
    assert "linux/amd64, linux/arm64" in page
    listing = list_images(os.path.realpath(shared_images.root))
    multi = next(e for e in listing.entries if e.reference == "multi:latest")
    assert f">{multi.size / 1024:.1f} KiB</td>" in page
    stamp = dt.datetime.fromtimestamp((shared_images.root / "multi.oci").stat().st_mtime, dt.UTC)
    assert stamp.strftime("%Y-%m-%d %H:%M UTC") in page
    assert "http://" not in page and "https://" not in page and "src=" not in page  # no assets


async def test_page_shows_upstream_names(aiohttp_client: MakeClient, tmp_path: Path) -> None:
    images = build_mirror_images(tmp_path / "images")
    client = await aiohttp_client(in_process(Config(directory=images.root)))
    page = await get_page(client)
    assert "<h2>localhost:5000/team/app</h2>" in page
    assert "<h2>docker.io/library/busybox</h2>" in page
    assert "<h2>registry.k8s.io</h2>" not in page
    # The pull command names the folder, which every client can pull from directly.
    assert f"<code>podman pull {HOST}/localhost_5000/team/app:1.0</code>" in page


async def test_page_headers_and_head(aiohttp_client: MakeClient,
                                     shared_images: StandardImages) -> None:
    client = await aiohttp_client(in_process(Config(directory=shared_images.root)))
    response = await client.get("/")
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    head = await client.head("/")
    assert head.status == 200 and await head.read() == b""


async def test_hostile_host_header_is_not_echoed(aiohttp_client: MakeClient,
                                                 shared_images: StandardImages) -> None:
    client = await aiohttp_client(in_process(Config(directory=shared_images.root)))
    page = await get_page(client, host='x"><img src=y>')
    assert "<img" not in page
    assert "podman pull REGISTRY-HOST/app:1.0" in page


async def test_empty_directory_and_problems(aiohttp_client: MakeClient, image_dir: Path) -> None:
    client = await aiohttp_client(in_process(Config(directory=image_dir)))
    assert "No images yet" in await get_page(client)
    (image_dir / "broken.oci").write_bytes(b"not an archive")
    client = await aiohttp_client(in_process(Config(directory=image_dir)))
    page = await get_page(client)
    assert "1 problem in the image directory" in page and "simple-oci-registry check" in page


def counting_listings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Listing:
        calls.append(threading.get_ident())
        return list_images(*args, **kwargs)

    monkeypatch.setattr("simple_oci_registry.catalogpage.list_images", counted)
    return calls


async def test_refresh_storm_builds_once_per_window(
        aiohttp_client: MakeClient, standard_images: StandardImages,
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_listings(monkeypatch)
    now = [1000.0]
    page = CatalogPage(Config(directory=standard_images.root),
                       clock=lambda: now[0])
    client = await aiohttp_client(RawTestServer(page.handle))
    pages = await asyncio.gather(*(get_page(client) for _ in range(50)))
    assert len(calls) == 1 and len(set(pages)) == 1
    assert calls[0] != threading.get_ident()  # built in a worker thread
    w = LayoutWriter()
    image, _ = small_image(w, "new")
    w.tag(image, "9.9")
    w.write_archive(standard_images.root / "app" / "9.9.oci")
    now[0] += 0.9  # within the (minimum, one-second) window: the cached page
    assert "app:9.9" not in await get_page(client)
    assert len(calls) == 1
    now[0] += 0.2
    assert "app:9.9" in await get_page(client)
    assert len(calls) == 2


async def test_building_never_blocks_the_event_loop(
        aiohttp_client: MakeClient, shared_images: StandardImages,
        monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Listing:
        release.wait(10)
        return list_images(*args, **kwargs)

    monkeypatch.setattr("simple_oci_registry.catalogpage.list_images", slow)
    client = await aiohttp_client(in_process(Config(directory=shared_images.root)))
    pending = asyncio.ensure_future(client.get("/"))
    await asyncio.sleep(0.1)
    health = await asyncio.wait_for(client.get("/healthz"), 2)
    assert health.status == 200 and not pending.done()
    release.set()
    response = await asyncio.wait_for(pending, 10)
    assert response.status == 200


async def test_page_needs_credentials_when_the_api_does(
        aiohttp_client: MakeClient, shared_images: StandardImages, tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"alice:{hashed}\n")
    client = await aiohttp_client(in_process(Config(directory=shared_images.root,
                                                  htpasswd=htpasswd)))
    anonymous = await client.get("/")
    assert anonymous.status == 401 and "Basic" in anonymous.headers["WWW-Authenticate"]
    assert "multi" not in await anonymous.text()
    credentials = base64.b64encode(b"alice:secret").decode()
    allowed = await client.get("/", headers={"Authorization": f"Basic {credentials}"})
    assert allowed.status == 200 and "<h2>multi</h2>" in await allowed.text()


# ---------------------------------------------------------------------------- real browser


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("chromium is not installed (Debian package chromium)")
    return subprocess.run(
        [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, check=True)


def test_browser_renders_the_page(shared_registry: RegistryProcess, tmp_path: Path) -> None:
    url = shared_registry.url + "/"
    dom = chromium("--dump-dom", url, profile=tmp_path / "profile").stdout
    assert '<html lang="en" class="js">' in dom  # the CSP let the page's own script run
    for key in STANDARD_TAGS:
        name, tag = key.rsplit(":", 1)
        assert f"<h2>{name}</h2>" in dom
        assert f'<td class="tag">{tag}</td>' in dom
        assert f"<code>podman pull {shared_registry.host}/{key}</code>" in dom
    assert "linux/amd64, linux/arm64" in dom

    screenshot = tmp_path / "catalog.png"
    chromium(f"--screenshot={screenshot}", "--window-size=1280,900", "--hide-scrollbars", url,
             profile=tmp_path / "profile")
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 900)
    assert len(data) > 10_000  # a rendered page, not a blank canvas
