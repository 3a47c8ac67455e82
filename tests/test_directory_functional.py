"""One coherent view of the directory per node (directory.py, pins.py), raced for real.

Several worker processes serve one directory while a publisher replaces archives by rename
(with newer and older mtimes), rewrites them with the same content, deletes and re-adds one,
and adds files with new tags to a pattern-2 folder. Clients run pull sequences as containerd
does (the manifest by tag, then by digest, then every blob it names, each on a new connection,
so the kernel spreads them over the workers) and poll the tag list. Required:

* no 404 for a manifest by digest or a blob of a manifest the server has just returned (the
  grace period keeps a replaced or removed archive's content downloadable);
* no regression: once any request has seen a version of ``app:latest`` (or a tag in the list),
  no request that starts after it sees an older one, whichever worker answers.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from simple_oci_registry.layoutwriter import LayoutWriter
from tests.images import small_image
from tests.server import RegistryProcess

WORKERS = 4
CLIENTS = 32


@dataclass(frozen=True, slots=True)
class Version:
    number: int
    digest: str
    blobs: tuple[str, ...]
    archive: Path


@dataclass(frozen=True, slots=True)
class Seen:
    started: float
    ended: float
    value: int


@dataclass
class Tally:
    sequences: int = 0
    blob_checks: int = 0
    failures: list[str] = field(default_factory=list)
    latest: list[Seen] = field(default_factory=list)  # version of app:latest seen
    extra_tags: list[Seen] = field(default_factory=list)  # how many extra-N tags were listed


def build_versions(staging: Path, count: int) -> list[Version]:
    versions = []
    for number in range(count):
        writer = LayoutWriter()
        image, layers = small_image(writer, f"version-{number}", layers=2)
        writer.tag(image, "latest")
        archive = staging / f"v{number}.oci"
        writer.write_archive(archive)
        versions.append(Version(number, image.digest, tuple(d.digest for d in layers), archive))
    return versions


def publish(source: Path, target: Path, *, mtime_back: bool = False) -> None:
    """Write beside, then rename into place: the documented way to publish."""
    temporary = target.parent / f".{target.name}.tmp"
    shutil.copyfile(source, temporary)
    if mtime_back:  # cp -p / rsync -t: the new file is dated in the past
        os.utime(temporary, ns=(10**18, 10**18))
    os.replace(temporary, target)


def publisher(root: Path, versions: list[Version], solo: list[Version], stop: threading.Event,
              log: list[str]) -> None:
    """Replace app/latest.oci with ever newer versions (and sometimes the same one again),
    delete and re-add solo.oci, and add app/extra-N.oci files with new tags."""
    rng = random.Random(7)
    step, current, extra = 0, 0, 0
    while not stop.is_set():
        step += 1
        action = step % 4
        if action in (0, 1) and current + 1 < len(versions):
            current += 1
            publish(versions[current].archive, root / "app" / "latest.oci",
                    mtime_back=bool(step % 3 == 0))
            log.append(f"latest -> v{current}")
        elif action == 2:
            publish(versions[current].archive, root / "app" / "latest.oci")  # rewritten
            log.append(f"latest rewritten (v{current})")
        else:
            target = root / "solo.oci"
            if target.exists():
                target.unlink()
                log.append("solo deleted")
            else:
                publish(solo[step % len(solo)].archive, target)
                log.append("solo added")
            writer = LayoutWriter()
            image, _ = small_image(writer, f"extra-{extra}")
            writer.tag(image, f"extra-{extra}")
            writer.write_archive(root / "app" / f".extra-{extra}.tmp")
            os.replace(root / "app" / f".extra-{extra}.tmp", root / "app" / f"extra-{extra}.oci")
            extra += 1
        stop.wait(rng.uniform(0.02, 0.12))


async def pull(session: aiohttp.ClientSession, base: str, name: str, tag: str,
               tally: Tally, known: dict[str, Version]) -> None:
    started = time.monotonic()
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    async with session.get(f"{base}/v2/{name}/manifests/{tag}", headers=accept) as reply:
        if reply.status == 404:
            return  # solo deleted at this moment: a clean answer
        if reply.status != 200:
            tally.failures.append(f"{name}:{tag} -> {reply.status} {await reply.text()}")
            return
        digest = reply.headers["Docker-Content-Digest"]
        manifest = await reply.json(content_type=None)
    ended = time.monotonic()
    version = known.get(digest)
    if version is None:
        tally.failures.append(f"{name}:{tag} served unknown digest {digest}")
        return
    if name == "app":
        tally.latest.append(Seen(started, ended, version.number))
    async with session.get(f"{base}/v2/{name}/manifests/{digest}", headers=accept) as reply:
        if reply.status != 200:
            tally.failures.append(f"{name}@{digest} by digest -> {reply.status}")
    blobs = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
    for blob in blobs:
        async with session.head(f"{base}/v2/{name}/blobs/{blob}") as reply:
            tally.blob_checks += 1
            if reply.status != 200:
                tally.failures.append(f"{name} blob {blob} of {digest} -> {reply.status}")
    tally.sequences += 1


async def list_tags(session: aiohttp.ClientSession, base: str, tally: Tally) -> None:
    started = time.monotonic()
    async with session.get(f"{base}/v2/app/tags/list") as reply:
        if reply.status != 200:
            tally.failures.append(f"tags/list -> {reply.status}")
            return
        tags = (await reply.json())["tags"]
    tally.extra_tags.append(Seen(started, time.monotonic(),
                                 sum(1 for t in tags if t.startswith("extra-"))))


async def clients(base: str, seconds: float, tally: Tally, known: dict[str, Version]) -> None:
    deadline = time.monotonic() + seconds
    # force_close: every request on a new connection, spread over the workers by the kernel.
    connector = aiohttp.TCPConnector(force_close=True, limit=CLIENTS)
    timeout = aiohttp.ClientTimeout(total=30)

    async def client(number: int) -> None:
        while time.monotonic() < deadline:
            if number % 8 == 7:
                await list_tags(session, base, tally)
            else:
                await pull(session, base, "solo" if number % 8 == 6 else "app", "latest",
                           tally, known)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(n) for n in range(CLIENTS)))


def regressions(seen: list[Seen]) -> list[str]:
    """Pairs where a request that started after another ended saw an older value."""
    by_end = sorted(seen, key=lambda s: s.ended)
    ends = [s.ended for s in by_end]
    best_before: list[int] = []  # running max of values, in end order
    for s in by_end:
        best_before.append(max(s.value, best_before[-1] if best_before else s.value))
    found = []
    for s in seen:
        i = bisect.bisect_left(ends, s.started)  # observations that ended before s started
        if i and best_before[i - 1] > s.value:
            found.append(f"saw {s.value} at {s.started:.3f} after {best_before[i - 1]} was seen")
    return found


def run_race(tmp_path: Path, seconds: float) -> Tally:
    root, staging = tmp_path / "images", tmp_path / "staging"
    (root / "app").mkdir(parents=True)
    staging.mkdir()
    versions = build_versions(staging, int(seconds * 4) + 10)
    (staging / "solo").mkdir()
    solo = build_versions(staging / "solo", 4)
    known = {v.digest: v for v in versions + solo}
    publish(versions[0].archive, root / "app" / "latest.oci")
    publish(solo[0].archive, root / "solo.oci")
    tally = Tally()
    stop = threading.Event()
    log: list[str] = []
    with RegistryProcess(root, "--workers", str(WORKERS), "--log-level", "info",
                         log_path=tmp_path / "registry.log") as registry:
        thread = threading.Thread(target=publisher, args=(root, versions, solo, stop, log))
        thread.start()
        try:
            asyncio.run(clients(registry.url, seconds, tally, known))
        finally:
            stop.set()
            thread.join()
        assert "Traceback" not in registry.log()
    tally.failures += [f"app:latest {r}" for r in regressions(tally.latest)]
    tally.failures += [f"tags/list {r}" for r in regressions(tally.extra_tags)]
    print(f"race: {tally.sequences} pull sequences, {tally.blob_checks} blob checks, "
          f"{len(tally.extra_tags)} tag lists, {len(log)} publisher steps, "
          f"{len(tally.failures)} failures")
    return tally


@pytest.mark.clients
def test_pulls_straddling_publishes_never_fail_or_regress(tmp_path: Path) -> None:
    tally = run_race(tmp_path, seconds=8)
    assert tally.sequences > 100 and len(tally.extra_tags) > 20, tally
    assert max(s.value for s in tally.latest) > 5  # the publisher really moved the tag
    assert tally.failures == [], tally.failures[:20]


@pytest.mark.soak
def test_pulls_straddling_publishes_soak(tmp_path: Path) -> None:
    tally = run_race(tmp_path, seconds=120)
    assert tally.failures == [], tally.failures[:20]
