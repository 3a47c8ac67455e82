"""``GET /``: a human-readable catalog of the registry, with a pull command for every tag.

People open the registry's address in a browser to find out what they can pull and how; the
/v2/ API answers only JSON, one name at a time. This page is rendered on the server as one
self-contained document (inline CSS and script, no external assets, every value escaped with
:func:`html.escape`), so it works on an air-gapped node and under a strict
Content-Security-Policy that allows exactly the page's own style and script by hash.

Its data comes from :func:`inventory.list_images`, built in a worker thread so the event loop
never blocks on directory walks or archive reads; unchanged archives are not re-read (a
:class:`inventory.SummaryCache` lives as long as the page). The listing, and the page rendered
for each Host header, are reused for ``PAGE_SECONDS``, so a storm of refreshes costs one
directory walk per second and no rendering.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import re
import time
from collections.abc import Callable
from itertools import groupby
from typing import Final

from aiohttp import hdrs, web

from simple_oci_registry import __version__
from simple_oci_registry.auth import BasicAuth
from simple_oci_registry.config import Config
from simple_oci_registry.inventory import ImageEntry, Listing, SummaryCache, human_size, list_images
from simple_oci_registry.mirror import display_name
from simple_oci_registry.preparation import PreparationStatus

__all__ = ["CatalogPage", "render_page"]

# Pages kept per (Host, scheme): a client picks the Host header, so the cache must be bounded.
# The page is for people: rebuilt at most once a second (indexing compressed archives for it
# is costly), unlike /v2/ answers, which check the directory on every request.
PAGE_SECONDS: Final = 1.0
_MAX_CACHED_PAGES: Final = 16
# Hosts as they may appear in an image reference: name or IPv4, or [IPv6], with a port.
_HOST_RE: Final = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?"
                             r"|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")
_UNKNOWN_HOST: Final = "REGISTRY-HOST"

_STYLE: Final = """
:root { color-scheme: light dark; --fg: #1f2328; --muted: #59636e; --bg: #ffffff;
  --panel: #f6f8fa; --line: #d1d9e0; --accent: #0969da; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6edf3; --muted: #9198a1;
  --bg: #0d1117; --panel: #151b23; --line: #3d444d; --accent: #4493f8; } }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--fg); background: var(--bg); }
header { padding: 1.25rem 2rem 1rem; background: var(--panel);
  border-bottom: 1px solid var(--line); }
h1 { margin: 0; font-size: 1.35rem; }
header p { margin: .2rem 0 0; color: var(--muted); }
main { padding: .5rem 2rem 2rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .45rem 1.25rem .45rem 0; vertical-align: middle;
  border-bottom: 1px solid var(--line); overflow-wrap: break-word; }
thead th { position: sticky; top: 0; background: var(--bg); font-size: .75rem;
  font-weight: 600; letter-spacing: .05em; text-transform: uppercase; color: var(--muted); }
tr.repo th { padding-top: 1.6rem; }
h2 { margin: 0; font-size: 1.05rem; }
.size { text-align: right; white-space: nowrap; }
td.tag { font-weight: 600; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: .85rem; }
.muted, td.digest, td.modified { color: var(--muted); }
.modified, .digest { white-space: nowrap; }
.pull { display: flex; gap: .5rem; align-items: center; }
.pull code { padding: .15rem .5rem; border: 1px solid var(--line); border-radius: 6px;
  background: var(--panel); white-space: nowrap; user-select: all; }
html:not(.js) button[data-copy] { display: none; }
button { font: inherit; font-size: .8rem; padding: .1rem .65rem; border-radius: 6px;
  border: 1px solid var(--line); background: var(--bg); color: var(--fg); cursor: pointer;
  white-space: nowrap; flex-shrink: 0; }
button:hover, button:focus-visible { border-color: var(--accent); color: var(--accent); }
th:last-child, td:last-child { padding-right: 0; }
@media (max-width: 78rem) { .digest { display: none; } }
@media (max-width: 60rem) { .modified { display: none; }
  header, main, footer { padding-left: 1rem; padding-right: 1rem; } }
.empty { margin-top: 2rem; color: var(--muted); }
footer { padding: 0 2rem 2rem; color: var(--muted); font-size: .85rem; }
"""

# Copies a pull command. navigator.clipboard exists only in secure contexts (HTTPS or
# localhost); on a plain-HTTP node address the command is selected and copied the old way.
# The "js" class shows the Copy buttons only where they can work.
_SCRIPT: Final = """
document.documentElement.classList.add("js");
document.addEventListener("click", function (event) {
  var button = event.target.closest("button[data-copy]");
  if (!button) { return; }
  var text = button.getAttribute("data-copy");
  function show(label) {
    button.textContent = label;
    setTimeout(function () { button.textContent = "Copy"; }, 1500);
  }
  function fallback() {
    var range = document.createRange();
    range.selectNodeContents(button.previousElementSibling);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    var copied = false;
    try { copied = document.execCommand("copy"); } catch (error) { copied = false; }
    show(copied ? "Copied" : "Press Ctrl+C");
  }
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(function () { show("Copied"); }, fallback);
  } else {
    fallback();
  }
});
"""


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


_CSP: Final = (f"default-src 'none'; style-src {_csp_hash(_STYLE)}; "
               f"script-src {_csp_hash(_SCRIPT)}; base-uri 'none'; form-action 'none'; "
               "frame-ancestors 'none'")


def _e(value: str) -> str:
    return html.escape(value, quote=True)


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def pull_host(host: str | None) -> str:
    """The registry host for pull commands: the browser's Host header when it is one."""
    if host and _HOST_RE.fullmatch(host):
        return host
    return _UNKNOWN_HOST


def _row(entry: ImageEntry, host: str) -> str:
    command = f"podman pull {host}/{entry.reference}"
    tag = (f'<td class="tag">{_e(entry.tag)}</td>' if entry.tag is not None
           else '<td class="tag muted">untagged</td>')
    algorithm, _, encoded = entry.digest.partition(":")
    modified = entry.modified
    platforms = ", ".join(entry.platforms) or "—"
    return (
        f"<tr>{tag}"
        f'<td class="digest mono" title="{_e(entry.digest)}">{_e(algorithm)}:{_e(encoded[:12])}'
        f"</td><td>{_e(platforms)}</td>"
        f'<td class="size" title="{entry.size} bytes">{_e(human_size(entry.size))}</td>'
        f'<td class="modified"><time datetime="{modified.strftime("%Y-%m-%dT%H:%M:%SZ")}">'
        f'{modified.strftime("%Y-%m-%d %H:%M")} UTC</time></td>'
        f'<td><div class="pull"><code>{_e(command)}</code>'
        f'<button type="button" data-copy="{_e(command)}" '
        f'aria-label="Copy the pull command for {_e(entry.reference)}">Copy</button></div></td>'
        "</tr>")


def _preparation_line(status: PreparationStatus) -> str:
    """How many compressed archives are ready before their first pull (preparation.py)."""
    total = status.prepared + status.pending + status.failed + status.deferred
    parts = [f"{status.pending} pending"]
    if status.failed:
        parts.append(f"{status.failed} failed")
    if status.deferred:
        parts.append(f"{status.deferred} left for their first pull (over the cache share)")
    return (f'<p class="preparation">Compressed archives ready ahead: {status.prepared} of '
            f"{_plural(total, 'archive')} prepared, {', '.join(parts)}.</p>")


def render_page(listing: Listing, host: str, *, secure: bool,
                preparation: PreparationStatus | None = None) -> str:
    """The whole catalog document for clients that reach the registry as ``host``."""
    repositories = [(name, list(entries))
                    for name, entries in groupby(listing.entries, key=lambda e: e.name)]
    tags = sum(1 for entry in listing.entries if entry.tag is not None)
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Simple OCI Registry – {_e(host)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<header><h1>Simple OCI Registry</h1>",
        f"<p>{_plural(len(repositories), 'repository', 'repositories')}, "
        f"{_plural(tags, 'tag')} at <code>{_e(host)}</code></p>",
    ]
    if not secure:
        parts.append("<p>Plain HTTP: tell clients the registry is insecure (podman: "
                     "<code>--tls-verify=false</code>, or <code>insecure = true</code> in "
                     "registries.conf).</p>")
    if preparation is not None and (preparation.prepared or preparation.pending
                                    or preparation.failed or preparation.deferred):
        parts.append(_preparation_line(preparation))
    parts.append("</header><main>")
    if not repositories:
        parts.append('<p class="empty">No images yet: put <code>.oci</code> archives in the '
                     "image directory and reload.</p>")
    else:
        # One table for every repository, so columns line up down the whole page.
        parts.append(
            '<table><thead><tr><th>Tag</th><th class="digest">Digest</th>'
            '<th>Platforms</th><th class="size">Size</th><th class="modified">Modified</th>'
            "<th>Pull</th></tr></thead>")
        for name, entries in repositories:
            parts.append(f'<tbody id="{_e(name)}"><tr class="repo"><th colspan="6" '
                         f'scope="rowgroup"><h2>{_e(display_name(name))}</h2></th></tr>')
            parts.extend(_row(entry, host) for entry in entries)
            parts.append("</tbody>")
        parts.append("</table>")
    parts.append("</main><footer>")
    if listing.problems:
        parts.append(f"<p>{_plural(len(listing.problems), 'problem')} in the image directory "
                     "keep images from being listed or served as expected: run "
                     "<code>simple-oci-registry check</code> on it for details.</p>")
    parts.append(f"<p>simple-oci-registry {_e(__version__)} · "
                 f"{_plural(listing.archives, 'archive')}</p></footer>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>\n")
    return "".join(parts)


_Built = tuple[Listing, PreparationStatus | None]


class CatalogPage:
    """The ``GET /`` handler, holding the page's caches for the application's lifetime."""

    def __init__(self, config: Config, *, auth: BasicAuth | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 preparation: Callable[[], PreparationStatus | None] | None = None) -> None:
        self._root = config.root
        self._allow_outside = config.allow_outside_symlinks
        self._window = PAGE_SECONDS
        self._auth = auth
        self._clock = clock
        self._summaries = SummaryCache()  # touched only by the one build in flight
        self._preparation = preparation
        self._listing: tuple[float, _Built] | None = None
        self._building: asyncio.Future[_Built] | None = None
        self._pages: dict[tuple[str, bool], bytes] = {}

    async def handle(self, request: web.BaseRequest) -> web.Response:
        if self._auth is not None:
            # The page lists what /v2/_catalog would: it is protected the same way.
            await self._auth.check(request.headers.get(hdrs.AUTHORIZATION))
        listing, preparation = await self._current()
        key = (pull_host(request.host), request.secure)
        body = self._pages.get(key)
        if body is None:
            body = render_page(listing, key[0], secure=key[1],
                               preparation=preparation).encode()
            if len(self._pages) < _MAX_CACHED_PAGES:
                self._pages[key] = body
        return web.Response(body=body, headers={
            hdrs.CONTENT_TYPE: "text/html; charset=utf-8",
            hdrs.CACHE_CONTROL: "no-cache",
            "Content-Security-Policy": _CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        })

    def _build(self) -> _Built:
        """Blocking: the directory's listing and background preparation's progress."""
        listing = list_images(self._root, allow_outside=self._allow_outside,
                              cache=self._summaries)
        return listing, self._preparation() if self._preparation is not None else None

    async def _current(self) -> _Built:
        """The listing, rebuilt in a worker thread once per window by one caller at a time."""
        started = self._clock()
        if self._listing is not None and started - self._listing[0] < self._window:
            return self._listing[1]
        building = self._building
        if building is None:
            building = asyncio.ensure_future(asyncio.to_thread(self._build))
            self._building = building

            def built(done: asyncio.Future[_Built]) -> None:
                self._building = None
                if not done.cancelled() and done.exception() is None:
                    self._listing = (started, done.result())
                    self._pages = {}

            building.add_done_callback(built)
        # Shielded: a client that goes away must not cancel the build others wait for.
        return await asyncio.shield(building)
