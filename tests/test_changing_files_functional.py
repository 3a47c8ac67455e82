"""Archives that change while their big blob is being downloaded, against a real server process.

A 64 MiB single-layer plain archive (uncompressed layer, so it goes out with ``sendfile`` in
pieces, with a fingerprint check of the open file between them) is downloaded by 32 concurrent
clients. Each client reads in small pieces with small sleeps until it reaches a pause point,
then waits; once all 32 are paused mid-transfer the archive is

* replaced atomically by a rename (different content),
* rewritten in place (``open(r+b)``, overwrite bytes), also once with its mtime put back,
* truncated,
* deleted,

and the clients read on at full speed. Two phases: *early* (full GETs paused 2 MiB in) and
*late* (``Range`` GETs of the last 48 MiB paused 33 MiB in, with the changed bytes in the last
MiB: when the server sent 32 MiB chunks this was its final chunk, after its last check). Every
download that completes with 200/206 and its full length must hash to the right bytes; the
others must end as connection errors or short reads (or a 404): never wrong bytes with success.
A rename or a deletion leaves the old file's bytes intact, so those transfers must all finish.
Client sockets get a small receive buffer so the bytes in flight stay far below the distance
between the pause point and the changed bytes.

Found here and fixed in 1b92f95 / 511d57f: a rewrite during the final 32 MiB chunk went out
complete with wrong bytes; ctime in the fingerprint aborted every transfer from a renamed-over
or deleted archive; a blob of an archive replaced after its manifest was fetched was a 500.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from simple_oci_registry.layoutwriter import LayerFile, LayoutWriter, random_chunks
from tests.hostile import error_codes, fetch, pull, sha256
from tests.server import RegistryProcess

MiB = 1 << 20
LAYER_FILE_SIZE = 64 * MiB
CLIENTS = 32
RANGE_LENGTH = 48 * MiB  # late phase: the last 48 MiB of the blob
EARLY_PAUSE = 2 * MiB
LATE_PAUSE = 33 * MiB  # into the range
CLIENT_RCVBUF = 256 * 1024
SLOW_READ = 64 * 1024
FAST_READ = 1 * MiB
BARRIER_TIMEOUT = 60.0
DOWNLOAD_TIMEOUT = 120.0

RESULTS: dict[str, str] = {}


@dataclass(frozen=True, slots=True)
class Big:
    """The big archive and what is known about it before anything changes."""

    original: Path
    replacement: Path
    manifest: str
    layer: str
    layer_size: int
    layer_offset: int  # where the layer's bytes start in the archive file
    replacement_manifest: str
    replacement_layer: str
    range_start: int
    range_digest: str


def _write_big(path: Path, seed: int) -> tuple[str, str, int]:
    writer = LayoutWriter()
    layer = writer.add_layer(
        {"big.bin": LayerFile.streamed(random_chunks(LAYER_FILE_SIZE, seed=seed),
                                       LAYER_FILE_SIZE)},
        compression="none")
    image = writer.add_image([layer])
    writer.tag(image, "1.0")
    writer.write_archive(path)
    return image.digest, layer.digest, layer.size


def _window_digest(path: Path, offset: int, length: int) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        while length:
            chunk = f.read(min(length, 4 * MiB))
            assert chunk
            hasher.update(chunk)
            length -= len(chunk)
    return "sha256:" + hasher.hexdigest()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Big:
    base = tmp_path_factory.mktemp("big")
    manifest, layer, size = _write_big(base / "original.oci", seed=1)
    new_manifest, new_layer, _ = _write_big(base / "replacement.oci", seed=2)
    assert 64 * MiB <= size <= 128 * MiB
    with tarfile.open(base / "original.oci") as tf:
        member = tf.getmember("blobs/sha256/" + layer.partition(":")[2])
        offset = member.offset_data
    assert _window_digest(base / "original.oci", offset, size) == layer
    start = size - RANGE_LENGTH
    return Big(base / "original.oci", base / "replacement.oci", manifest, layer, size, offset,
               new_manifest, new_layer, start,
               _window_digest(base / "original.oci", offset + start, RANGE_LENGTH))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    base = tmp_path_factory.mktemp("changing")
    (base / "images").mkdir()
    with RegistryProcess(base / "images", "--grace-period", "0",
                         "--cache-dir", str(base / "cache"),
                         log_path=base / "registry.log") as process:
        yield process


@dataclass(slots=True)
class Outcome:
    status: int = 0
    received: int = 0
    expected: int = -1
    digest: str = ""
    error: str = ""
    paused: bool = False

    def complete(self) -> bool:
        return self.status in (200, 206) and not self.error and self.received == self.expected


@dataclass(slots=True)
class Barrier:
    """Counts clients that reached their pause point (or ended before it)."""

    total: int
    arrived: int = 0
    all_there: asyncio.Event = field(default_factory=asyncio.Event)
    resume: asyncio.Event = field(default_factory=asyncio.Event)

    def arrive(self) -> None:
        self.arrived += 1
        if self.arrived >= self.total:
            self.all_there.set()


def _bytes_in_flight_bound() -> int:
    """How far the server can be ahead of a paused client: the largest send buffer TCP
    autotuning may grow to, the client's (doubled) receive buffer, aiohttp's buffer."""
    wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return wmem_max + 2 * CLIENT_RCVBUF + MiB


def _small_buffer_socket(addr_info: tuple[object, ...]) -> socket.socket:
    family, kind, proto = addr_info[0], addr_info[1], addr_info[2]
    sock = socket.socket(family, kind, proto)  # type: ignore[arg-type]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
    return sock


async def _download(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                    pause_at: int, barrier: Barrier) -> Outcome:
    outcome = Outcome()
    hasher = hashlib.sha256()
    arrived = False
    try:
        async with session.get(url, headers=headers) as response:
            outcome.status = response.status
            if response.status not in (200, 206):
                await response.read()
                return outcome
            outcome.expected = response.content_length or 0
            while True:
                if outcome.received < pause_at:
                    chunk = await response.content.read(SLOW_READ)
                    await asyncio.sleep(0.001)
                else:
                    if not arrived:
                        arrived = outcome.paused = True
                        barrier.arrive()
                    await asyncio.wait_for(barrier.resume.wait(), BARRIER_TIMEOUT * 2)
                    chunk = await response.content.read(FAST_READ)
                if not chunk:
                    break
                hasher.update(chunk)
                outcome.received += len(chunk)
    except (aiohttp.ClientError, ConnectionError) as exc:
        outcome.error = type(exc).__name__
    finally:
        if not arrived:
            barrier.arrive()
    outcome.digest = "sha256:" + hasher.hexdigest()
    return outcome


def _replace(big: Big, target: Path) -> None:
    temporary = target.with_name(".replacement.tmp")
    shutil.copyfile(big.replacement, temporary)
    os.replace(temporary, target)


def _rewrite(target: Path, offsets: list[int], *, keep_mtime: bool = False) -> None:
    before = os.stat(target)
    with target.open("r+b") as f:
        for number, offset in enumerate(offsets):
            f.seek(offset)
            f.write(bytes([0xA5 ^ number]) * MiB)
    if keep_mtime:  # as rsync --inplace -t or cp -p over an open file leave it
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))


CHANGES = ["rename", "rewrite", "rewrite-keep-mtime", "truncate", "delete"]


def _change(change: str, phase: str, big: Big, target: Path) -> None:
    layer_start = big.layer_offset
    layer_end = big.layer_offset + big.layer_size
    if change == "rename":
        _replace(big, target)
    elif change.startswith("rewrite"):
        # Early: bytes the clients reach before the server's next check, and the blob's end.
        # Late: the range's last MiB, far ahead of everything already sent.
        offsets = ([layer_start + 8 * MiB, layer_end - MiB] if phase == "early"
                   else [layer_end - MiB])
        _rewrite(target, offsets, keep_mtime=change == "rewrite-keep-mtime")
    elif change == "truncate":
        os.truncate(target, layer_start + (16 * MiB if phase == "early"
                                           else big.range_start + 46 * MiB))
    else:
        assert change == "delete"
        target.unlink()


SCENARIOS = [pytest.param(change, phase, id=f"{change}-{phase}")
             for phase in ("early", "late") for change in CHANGES
             if not (phase == "late" and change == "rewrite-keep-mtime")]
OUTCOMES: dict[str, list[Outcome]] = {}


@pytest.mark.parametrize(("change", "phase"), SCENARIOS)
async def test_downloads_while_the_archive_changes(big: Big, registry: RegistryProcess,
                                                   change: str, phase: str) -> None:
    name = f"{change}-{phase}"
    if phase == "late" and LATE_PAUSE + _bytes_in_flight_bound() >= 46 * MiB:
        pytest.skip("tcp_wmem allows so much in flight that the server may be past the changed "
                    "bytes before the change")
    target = registry.directory / name / "1.0.oci"
    target.parent.mkdir()
    shutil.copyfile(big.original, target)
    # Index and verify the archive first: the downloads then start sending at once.
    assert fetch(registry.url, f"/v2/{name}/manifests/1.0").status == 200
    warm = fetch(registry.url, f"/v2/{name}/blobs/{big.layer}", method="HEAD")
    assert warm.status == 200 and int(warm.headers["content-length"]) == big.layer_size
    blob_url = f"{registry.url}/v2/{name}/blobs/{big.layer}"
    if phase == "early":
        headers: dict[str, str] = {}
        pause_at, want_status = EARLY_PAUSE, 200
        want = {200: big.layer}
    else:
        headers = {"Range": f"bytes={big.range_start}-"}
        pause_at, want_status = LATE_PAUSE, 206
        want = {206: big.range_digest}
    barrier = Barrier(CLIENTS)
    connector = aiohttp.TCPConnector(limit=0, socket_factory=_small_buffer_socket,
                                     force_close=True)
    timeout = aiohttp.ClientTimeout(total=DOWNLOAD_TIMEOUT, sock_read=BARRIER_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(_download(session, blob_url, headers, pause_at, barrier))
                 for _ in range(CLIENTS)]
        try:
            await asyncio.wait_for(barrier.all_there.wait(), BARRIER_TIMEOUT)
            paused = sum(1 for t in tasks if not t.done())
            await asyncio.to_thread(_change, change, phase, big, target)
        finally:
            barrier.resume.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), DOWNLOAD_TIMEOUT)

    assert paused == CLIENTS, "every download was in flight when the archive changed"
    assert all(o.paused for o in outcomes)
    complete = [o for o in outcomes if o.complete()]
    wrong = [o for o in complete if o.digest != want.get(o.status)]
    failed = [o for o in outcomes if not o.complete()]
    for outcome in failed:
        assert outcome.status in (want_status, 404), outcome
        if outcome.status == want_status:
            assert outcome.error or outcome.received < outcome.expected, outcome
    OUTCOMES[name] = outcomes
    RESULTS[name] = (f"{len(outcomes)} downloads checked: {len(complete) - len(wrong)} "
                     f"complete and correct, {len(wrong)} complete with WRONG bytes, "
                     f"{len(failed)} cut off")
    print(f"\n{name}: {RESULTS[name]}")
    assert not wrong, f"{len(wrong)} downloads completed with wrong bytes: {wrong[:3]}"
    assert_after(change, name, big, registry)


@pytest.mark.parametrize("name", ["rename-early", "delete-early", "rename-late", "delete-late"])
def test_replacing_or_deleting_keeps_transfers_in_flight(name: str) -> None:
    """A rename over the archive or its deletion leaves the old file's bytes intact and open:
    the transfers in flight from it have no reason to fail, and all of them finish."""
    if name not in OUTCOMES:
        pytest.skip(f"scenario {name} did not run")
    outcomes = OUTCOMES[name]
    assert [o for o in outcomes if o.complete()] == outcomes, [o for o in outcomes
                                                             if not o.complete()][:3]


def assert_after(change: str, name: str, big: Big, registry: RegistryProcess) -> None:
    """What the registry says about the archive once the change is done."""
    old_blob = fetch(registry.url, f"/v2/{name}/blobs/{big.layer}")
    head = fetch(registry.url, f"/v2/{name}/blobs/{big.layer}", method="HEAD")
    assert old_blob.status == head.status == 404, (old_blob.status, head.status)
    assert error_codes(old_blob)[0] in ("BLOB_UNKNOWN", "NAME_UNKNOWN"), old_blob
    if change == "rename":
        pulled = pull(registry.url, name, "1.0")
        assert pulled.manifests == [big.replacement_manifest]
        assert pulled.blobs[-1] == big.replacement_layer
    elif change == "delete":
        manifest = fetch(registry.url, f"/v2/{name}/manifests/1.0")
        assert manifest.status == 404 and error_codes(manifest) == ["NAME_UNKNOWN"]
    else:
        manifest = fetch(registry.url, f"/v2/{name}/manifests/1.0")
        if change == "truncate":
            assert manifest.status == 404, manifest  # the archive is now cut short
        else:
            assert manifest.status == 200  # the manifest is intact, the layer is not
    assert registry.process is not None and registry.process.poll() is None


def test_change_report() -> None:
    """The figures for the report (run with -s to see them)."""
    print("\ndownloads per change scenario:")
    for name, line in RESULTS.items():
        print(f"  {name}: {line}")


def test_blob_of_an_archive_replaced_after_its_manifest(tmp_path: Path) -> None:
    """The manifest is fetched (the archive indexed), the archive is replaced by a rename, and
    its layer is asked for: the grace period serves it from the pinned old file."""
    images = tmp_path / "images"
    old, new = tmp_path / "old.oci", tmp_path / "new.oci"
    old_digests: list[str] = []
    new_digests: list[str] = []
    for path, seed, digests in ((old, 1, old_digests), (new, 2, new_digests)):
        writer = LayoutWriter()
        layer = writer.add_layer({"f.bin": b"".join(random_chunks(MiB, seed=seed)())},
                                compression="none")
        image = writer.add_image([layer])
        writer.tag(image, "1.0")
        writer.write_archive(path)
        digests += [image.digest, layer.digest]
    (images / "swap").mkdir(parents=True)
    shutil.copyfile(old, images / "swap" / "1.0.oci")
    with RegistryProcess(images, "--cache-dir",
                         str(tmp_path / "cache"), log_path=tmp_path / "registry.log") as process:
        assert fetch(process.url, "/v2/swap/manifests/1.0").status == 200
        shutil.copyfile(new, images / "swap" / ".1.0.oci.tmp")
        os.replace(images / "swap" / ".1.0.oci.tmp", images / "swap" / "1.0.oci")
        for method in ("HEAD", "GET"):
            reply = fetch(process.url, f"/v2/swap/blobs/{old_digests[1]}", method=method)
            assert reply.status == 200, (method, reply.status, reply.body[:200])
            if method == "GET":
                assert sha256(reply.body) == old_digests[1]
        assert "unexpected error" not in process.log()
