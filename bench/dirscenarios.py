"""Directory scenarios of issue 9: a large flat directory, and the directory on slow storage.

Both run our server alone, started as users start it (default workers, default logging with
the access log on, written to a file), on pattern-3 directories (``n00042:1.0.oci`` side by
side in one folder, see the README's "Where images live").

``flatdir``: manifest GETs spread over many names of a directory of 10,000 archives, beside
the rate of GETs of one name in a directory of 100, and GETs of names never seen before (404)
in the big one; wrk rotates the request paths with a generated Lua script.

``fuse``: the directory served through ``bench.latencyfs`` (every metadata operation delayed,
1 ms by default), once without attribute caching (NFS ``noac``) and once with 1 s timeouts
(``actimeo=1``). For each: the first manifest of a server just started, immediate repeats, a
warm manifest once a second has passed, a 404 of a never-seen name, and the manifest of an
archive just replaced by rename, each with its latency and the filesystem operations it caused.
The servers of one mode are restarts on one node: they keep its cache directory. Before the
warm step the node is brought to its steady state: background preparation has finished its
first walk of the directory (a new node's survey, which the first server of each mode makes
and the run's notes time), the name has been served by every worker, and the directory's
last change (the previous server's replace) is older than the server's racy window.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from bench import latencyfs
from bench.httpclient import Fetch, fetch
from bench.load import LoadResult, parse_wrk, wrk_available
from bench.measure import MANIFEST_ACCEPT, Measured
from bench.report import Metric, Target
from bench.servers import HOST, RunningServer, start_ours
from simple_oci_registry.directory import RACY_SECONDS
from simple_oci_registry.layoutwriter import LayoutWriter

__all__ = [
    "DIR_PLANS",
    "SCENARIOS",
    "WrkShape",
    "CacheMode",
    "DirPlan",
    "FlatDir",
    "build_flat_dir",
    "fs_modes",
    "metrics",
    "missing_script",
    "replace_archive",
    "rotation_script",
    "run_scenarios",
    "run_wrk_script",
    "spread_names",
    "targets",
]

SCENARIOS: Final[tuple[str, ...]] = ("compare", "flatdir", "fuse")
"""``compare``: the servers side by side (bench.run); the others are this module's."""
TAG: Final[str] = "1.0"
_FORMAT: Final[int] = 1
_ACCEPT: Final[tuple[tuple[str, str], ...]] = (("Accept", MANIFEST_ACCEPT),)
_PAST_WINDOW: Final[float] = 1.2
"""Seconds to wait for a "warm" request: past a 1 s attribute cache and past the server's
once-a-second recheck of a missed directory, the steady state of a name asked for less than
once a second (the server itself trusts nothing for a time: it stats on every request)."""
_REPEATS: Final[int] = 3
_SPREAD: Final[int] = 12
"""Requests (each on a new connection) that make a name warm on the node: the workers share
one accept queue and take turns with connections as they wake, so a dozen leave a worker that
has not served the name only by a long run of bad luck."""
_SURVEY_TIMEOUT: Final[float] = 300.0
FS_STEPS: Final[tuple[tuple[str, str], ...]] = (
    ("first", "1st manifest, server just started"),
    ("repeat", "manifest repeated at once"),
    ("warm", f"warm manifest, {_PAST_WINDOW:g} s later"),
    ("unknown", "404, never-seen name"),
    ("changed", "manifest after a replace by rename"),
)


@dataclass(frozen=True, slots=True)
class DirPlan:
    """Sizes and repetitions of the directory scenarios for one benchmark mode."""

    one_name_dir: int
    """Archives in the directory of the one-name rate (the reference)."""
    spread_dir: int
    """Archives in the big flat directory."""
    spread_names: int
    """Names the spread GETs rotate over."""
    fs_dir: int
    """Archives in the directory served through FUSE."""
    fs_reps: int


DIR_PLANS: Final[dict[str, DirPlan]] = {
    "full": DirPlan(100, 10_000, 1_000, 1_000, 5),
    "quick": DirPlan(100, 10_000, 1_000, 1_000, 2),
    "tiny": DirPlan(3, 30, 10, 5, 1),
}


@dataclass(frozen=True, slots=True)
class FlatDir:
    """``count`` archives ``n00000:1.0.oci`` … in one folder, all copies of ``original``, and
    ``alternate``, a different archive written over one of them to make a change."""

    count: int
    path: Path
    original: Path
    digest: str
    alternate: Path
    alternate_digest: str

    def name(self, index: int) -> str:
        return f"n{index:05d}"

    def archive(self, index: int) -> Path:
        return self.path / f"{self.name(index)}:{TAG}.oci"


def _small_archive(target: Path, motd: bytes) -> str:
    writer = LayoutWriter()
    layer = writer.add_layer({"etc/motd": motd}, "gzip")
    manifest = writer.add_image([layer], config={"config": {"Cmd": ["cat", "/etc/motd"]}})
    writer.tag(manifest, TAG)
    writer.write_archive(target)
    return manifest.digest


def build_flat_dir(work_dir: Path, count: int, label: str = "flat") -> FlatDir:
    """``count`` copies of one small archive, side by side (reused when complete).

    Copies, not hard links, as ``bench.fixtures.build_cold_dir`` makes them: a server that keys
    its cache on (device, inode) must not recognise them as one.
    """
    root = work_dir / f"{label}-{count}"
    original = work_dir / f".{label}-{count}-original.oci"
    alternate = work_dir / f".{label}-{count}-alternate.oci"
    done = work_dir / f".{label}-{count}.complete"
    if done.is_file() and original.is_file() and alternate.is_file():
        digest, _, alternate_digest = done.read_text().partition(" ")
        return FlatDir(count, root, original, digest, alternate, alternate_digest)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    digest = _small_archive(original, b"hello from a small benchmark image\n")
    alternate_digest = _small_archive(alternate, b"hello from its replacement\n")
    flat = FlatDir(count, root, original, digest, alternate, alternate_digest)
    for i in range(count):
        shutil.copyfile(original, flat.archive(i))
    done.write_text(f"{digest} {alternate_digest}")
    return flat


def spread_names(count: int, spread: int) -> list[str]:
    """``spread`` names evenly spaced over a directory of ``count`` (all of them if fewer)."""
    spread = max(1, min(spread, count))
    return [f"n{(i * count) // spread:05d}" for i in range(spread)]


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_LUA_THREADS: Final[str] = """\
local threads = 0
function setup(thread)
  thread:set("first", threads * 7919)
  threads = threads + 1
end
local n = 0
"""
"""wrk runs ``setup`` once per thread in the main state; each thread then starts at its own
offset (a prime stride), so that threads do not ask for the same names in lockstep."""


def _lua_headers(headers: Sequence[tuple[str, str]]) -> str:
    return "".join(f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}\n" for k, v in headers)


def rotation_script(paths: Sequence[str], headers: Sequence[tuple[str, str]] = _ACCEPT) -> str:
    """wrk Lua script: each request takes the next of ``paths``, round robin."""
    if not paths:
        raise ValueError("no paths to rotate over")
    table = ",\n".join(f"  {_lua_string(p)}" for p in paths)
    return (
        _lua_headers(headers)
        + f"local paths = {{\n{table}\n}}\n"
        + _LUA_THREADS
        + "function request()\n"
        + "  n = n + 1\n"
        + "  return wrk.format(nil, paths[(first + n) % #paths + 1])\n"
        + "end\n"
    )


def missing_script(prefix: str, headers: Sequence[tuple[str, str]] = _ACCEPT) -> str:
    """wrk Lua script: every request asks for a name nobody asked for before.

    ``prefix`` is unique per run; the thread's offset and a counter make each name unique.
    """
    if not prefix.replace("-", "").isalnum() or prefix != prefix.lower():
        raise ValueError(f"not a repository name component: {prefix!r}")
    return (
        _lua_headers(headers)
        + _LUA_THREADS
        + "function request()\n"
        + "  n = n + 1\n"
        + f'  return wrk.format(nil, string.format("/v2/{prefix}-%d-%d/manifests/{TAG}", '
        + "first, n))\n"
        + "end\n"
    )


def run_wrk_script(
    url: str, script: str, scratch: Path, label: str, seconds: int, shape: WrkShape
) -> LoadResult:
    binary = wrk_available()
    if binary is None:
        raise FileNotFoundError("wrk is not installed (apt-get install -y wrk)")
    path = scratch / f"wrk-{label}.lua"
    path.write_text(script)
    argv = [binary, f"-t{shape.threads}", f"-c{shape.connections}", f"-d{seconds}s"]
    # A slow answer is a figure here, not an error: wrk's default 2 s timeout would count
    # the requests queued behind directory listings as socket errors.
    argv += ["--timeout", "30s"]
    done = subprocess.run(
        [*argv, "-s", str(path), url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return parse_wrk(done.stdout)


@dataclass(frozen=True, slots=True)
class WrkShape:
    seconds: int
    warmup_seconds: int
    reps: int
    threads: int
    connections: int


class Recorder(Protocol):
    """What the scenarios need of ``bench.run``'s run: where to work and where figures go."""

    work: Path
    notes: list[str]
    skipped: dict[str, str]

    def add(self, server: str, measured: Measured) -> None: ...

    def attempt(self, server: str, what: str) -> contextlib.AbstractContextManager[None]: ...

    def scratch(self, name: str) -> Path: ...


Starter = Callable[[Path, str], RunningServer]


def _starter(scratch: Path, *, node_cache: bool = False) -> Starter:
    """Our server as users run it: default workers and logging (access log to a file). Each
    server gets a cache directory of its own, or with ``node_cache`` the one of its label:
    a restart on the same node."""
    counter = iter(range(1_000_000))

    def start(directory: Path, label: str) -> RunningServer:
        which = label if node_cache else f"{label}-{next(counter)}"
        cache = scratch / "caches" / which
        cache.mkdir(parents=True, exist_ok=True)
        return start_ours(
            directory, scratch, workers=None, log_level=None, cache_dir=cache, label=label
        )

    return start


def _manifest_path(name: str) -> str:
    return f"/v2/{name}/manifests/{TAG}"


def _check_load(result: LoadResult, what: str, *, expect_404: bool) -> None:
    bad = result.errors + (result.requests - result.non_2xx if expect_404 else result.non_2xx)
    if result.requests == 0 or bad > result.requests // 100:
        raise RuntimeError(
            f"{what}: {result.requests} requests, {result.non_2xx} non-2xx, "
            f"{result.errors} socket errors"
        )


def flat_rates(run: Recorder, dplan: DirPlan, shape: WrkShape) -> None:
    """One-name rate (small directory), spread rate and 404 rate (big directory), each on a
    fresh server; a case that fails is reported and the next one runs."""
    scratch = run.scratch("flatdir")
    start = _starter(scratch)
    small = build_flat_dir(run.work, dplan.one_name_dir)
    big = build_flat_dir(run.work, dplan.spread_dir)
    one = _manifest_path(small.name(dplan.one_name_dir // 2))
    spread = [_manifest_path(n) for n in spread_names(big.count, dplan.spread_names)]
    prefix = f"never-{secrets.token_hex(4)}"
    cases = (
        ("flat_one_name_rps", small, rotation_script([one]), one, 200),
        ("flat_spread_rps", big, rotation_script(spread), spread[0], 200),
        ("flat_unknown_rps", big, missing_script(prefix), _manifest_path(prefix), 404),
    )
    for key, directory, script, probe, status in cases:
        with run.attempt("ours", f"flat directory, {key}"):
            with start(directory.path, f"ours-{key}") as server:
                fetch(HOST, server.port, probe, headers=_ACCEPT, expect=status)
                for rep in range(-1 if shape.warmup_seconds else 0, shape.reps):
                    seconds = shape.warmup_seconds if rep < 0 else shape.seconds
                    result = run_wrk_script(server.url, script, scratch, key, seconds, shape)
                    _check_load(result, key, expect_404=status == 404)
                    if rep >= 0:
                        run.add("ours", {key: [result.requests_per_second]})


@dataclass(frozen=True, slots=True)
class CacheMode:
    """One way the kernel caches the slow filesystem, named as the NFS mount option it models."""

    key: str
    label: str
    options: latencyfs.Options


def fs_modes(latency: float) -> tuple[CacheMode, ...]:
    return (
        CacheMode("noac", "noac", latencyfs.Options(latency)),
        CacheMode("actimeo1", "actimeo=1", latencyfs.Options.cached(1.0, latency)),
    )


def _timed(
    fs: latencyfs.LatencyFS, port: int, path: str, expect: int
) -> tuple[Fetch, dict[str, int]]:
    fs.take()
    got = fetch(HOST, port, path, headers=_ACCEPT, expect=expect)
    return got, fs.take()


def _record(out: Measured, prefix: str, step: str, got: Fetch, ops: Mapping[str, int]) -> None:
    """Latency and metadata operations (those that paid the latency) for the table; each kind
    of operation, reads included, for the JSON document."""
    out.setdefault(f"{prefix}_{step}_ms", []).append(got.elapsed * 1000)
    out.setdefault(f"{prefix}_{step}_ops", []).append(float(latencyfs.total(ops)))
    for kind in sorted(latencyfs.METADATA_OPS | {"read", "release", "releasedir"}):
        out.setdefault(f"{prefix}_{step}_ops_{kind}", []).append(float(ops.get(kind, 0)))


def _surveys(port: int) -> float:
    """``registry_preparation_surveys_total`` of the node (0 until the first walk ends)."""
    got = fetch(HOST, port, "/metrics", keep_body=True)
    for line in got.body.decode().splitlines():
        if line.startswith("registry_preparation_surveys_total "):
            return float(line.split()[1])
    return 0.0


def _until_settled(directory: Path) -> float:
    """Seconds until ``directory``'s last change is older than the server's racy window
    (``RACY_SECONDS``): until then every check reads its listing again, by design (a change in
    the same timestamp tick as a read leaves the mtime as it was), which is the "after a
    change" row's cost, not a warm request's. The previous server's replace is that recent."""
    st = directory.stat()  # the source, not the mount: not counted
    changed = max(st.st_mtime_ns, st.st_ctime_ns) / 1e9
    return max(0.0, changed + RACY_SECONDS + 0.3 - time.time())


def settle(port: int, path: str) -> float:
    """Bring the node to its steady state before a warm request: background preparation has
    walked the directory once (a new node surveys every archive, paced to leave the storage
    idle most of the time), and every worker has served ``path``. Returns the seconds waited
    for the survey."""
    started = time.monotonic()
    while _surveys(port) < 1:
        if time.monotonic() - started > _SURVEY_TIMEOUT:
            raise RuntimeError(f"no preparation survey finished in {_SURVEY_TIMEOUT:g} s")
        time.sleep(0.25)
    waited = time.monotonic() - started
    for _ in range(_SPREAD):
        fetch(HOST, port, path, headers=_ACCEPT)
    return waited


def replace_archive(flat: FlatDir, index: int) -> str:
    """Publish the other version of archive ``index`` by rename; returns its manifest digest."""
    target = flat.archive(index)
    is_alternate = target.read_bytes() == flat.alternate.read_bytes()
    # Staged under a name no pattern serves (not *.oci), as a careful publisher does.
    staged = flat.path / f".{target.name}.tmp"
    shutil.copyfile(flat.original if is_alternate else flat.alternate, staged)
    os.rename(staged, target)
    return flat.digest if is_alternate else flat.alternate_digest


def fs_sequence(
    fs: latencyfs.LatencyFS,
    flat: FlatDir,
    start: Starter,
    mode: CacheMode,
    notes: list[str],
) -> Measured:
    """One fresh server on the mounted directory: the five steps of ``FS_STEPS``, in order."""
    out: Measured = {}
    prefix = f"fs_{mode.key}"
    index = flat.count // 2
    path = _manifest_path(flat.name(index))
    with start(fs.mountpoint, f"ours-fs-{mode.key}") as server:
        got, ops = _timed(fs, server.port, path, 200)
        _record(out, prefix, "first", got, ops)
        for _ in range(_REPEATS):
            got, ops = _timed(fs, server.port, path, 200)
            _record(out, prefix, "repeat", got, ops)
        waited = settle(server.port, path)
        if waited > 1:
            notes.append(
                f"FUSE {mode.label}: the node's first preparation survey of "
                f"{flat.count:,} archives took {waited:.1f} s (waited before the warm step)"
            )
        time.sleep(max(_PAST_WINDOW, _until_settled(flat.path)))
        got, ops = _timed(fs, server.port, path, 200)
        _record(out, prefix, "warm", got, ops)
        got, ops = _timed(fs, server.port, _manifest_path(f"never-{secrets.token_hex(6)}"), 404)
        _record(out, prefix, "unknown", got, ops)
        expected = replace_archive(flat, index)
        time.sleep(_PAST_WINDOW + mode.options.attr_timeout)
        current, ops = _timed(fs, server.port, path, 200)
        _record(out, prefix, "changed", current, ops)
        served = current.headers.get("docker-content-digest")
        if served != expected:
            notes.append(
                f"FUSE {mode.label}: {_PAST_WINDOW + mode.options.attr_timeout:g} s after "
                f"a replace by rename the server still sent {served}, not {expected}"
            )
    return out


def fs_latencies(run: Recorder, dplan: DirPlan, latency: float) -> Measured:
    """Both cache modes, ``fs_reps`` server starts each (restarts on one node: the cache
    directory is kept), on one mounted copy of the directory."""
    scratch = run.scratch("fuse")
    start = _starter(scratch, node_cache=True)
    flat = build_flat_dir(run.work, dplan.fs_dir, label="fs")
    out: Measured = {}
    for mode in fs_modes(latency):
        mountpoint = scratch / f"mnt-{mode.key}"
        mountpoint.mkdir(exist_ok=True)
        with latencyfs.mount(flat.path, mountpoint, mode.options) as fs:
            for _ in range(dplan.fs_reps):
                for key, values in fs_sequence(fs, flat, start, mode, run.notes).items():
                    out.setdefault(key, []).extend(values)
    return out


def run_scenarios(
    run: Recorder, selected: Sequence[str], mode: str, shape: WrkShape, latency: float
) -> None:
    """The directory scenarios among ``selected``; failures and skips go to ``run``."""
    dplan = DIR_PLANS[mode]
    if "flatdir" in selected:
        if wrk_available() is None:
            run.skipped["ours, flat directory"] = "wrk is not installed (apt-get install -y wrk)"
        else:
            flat_rates(run, dplan, shape)
    if "fuse" in selected:
        reason = latencyfs.unavailable()
        if reason is not None:
            run.skipped["ours, FUSE scenarios"] = reason
            return
        with run.attempt("ours", "FUSE latency scenarios"):
            try:
                run.add("ours", fs_latencies(run, dplan, latency))
            except latencyfs.FuseUnavailable as exc:  # the kernel refused the mount
                run.skipped["ours, FUSE scenarios"] = str(exc)


def metrics(dplan: DirPlan, latency: float) -> tuple[Metric, ...]:
    """The table's rows of these scenarios."""
    rows = [
        Metric(
            "flat_one_name_rps",
            f"manifest GET, 1 name, flat dir of {dplan.one_name_dir:,} (wrk)",
            "req/s",
            0,
        ),
        Metric(
            "flat_spread_rps",
            f"manifest GET, {dplan.spread_names:,} names, flat dir of {dplan.spread_dir:,}",
            "req/s",
            0,
        ),
        Metric(
            "flat_unknown_rps",
            f"404 GET, never-seen names, flat dir of {dplan.spread_dir:,}",
            "req/s",
            0,
        ),
    ]
    ms = f"{latency * 1000:g} ms"
    for mode in fs_modes(latency):
        for step, label in FS_STEPS:
            title = f"FUSE {ms} {mode.label}, dir of {dplan.fs_dir:,}: {label}"
            rows.append(Metric(f"fs_{mode.key}_{step}_ms", title, "ms", 2))
            rows.append(Metric(f"fs_{mode.key}_{step}_ops", "  ... its fs operations", "ops", 0))
    return tuple(rows)


def _median(results: Mapping[str, Mapping[str, Sequence[float]]], key: str) -> float | None:
    runs = results.get("ours", {}).get(key)
    return statistics.median(runs) if runs else None


def targets(
    results: Mapping[str, Mapping[str, Sequence[float]]],
    dplan: DirPlan,
    latency: float,
    selected: Sequence[str] = SCENARIOS,
) -> list[Target]:
    """Issue 9's targets of the ``selected`` scenarios, judged on medians of this run."""
    out: list[Target] = []
    one = _median(results, "flat_one_name_rps")
    for key, what in (
        ()
        if "flatdir" not in selected
        else (
            ("flat_spread_rps", f"manifest GET over {dplan.spread_names:,} names"),
            ("flat_unknown_rps", "404 GET of never-seen names"),
        )
    ):
        rate = _median(results, key)
        ratio = rate / one if rate is not None and one else None
        out.append(
            Target(
                f"{what}, flat dir of {dplan.spread_dir:,}",
                f">= 0.5x 1 name in {dplan.one_name_dir:,}",
                "n/a" if ratio is None else f"{ratio:.3f}x",
                None if ratio is None else ratio >= 0.5,
            )
        )
    ms = f"{latency * 1000:g} ms"
    fs_steps = (("warm", "warm manifest"), ("unknown", "404 of a never-seen name"))
    for step, what in fs_steps if "fuse" in selected else ():
        value = _median(results, f"fs_noac_{step}_ms")
        ops = _median(results, f"fs_noac_{step}_ops")
        out.append(
            Target(
                f"FUSE {ms} noac: {what}",
                "<= 4 ms (median)",
                "n/a" if value is None else f"{value:.2f} ms, {ops:.0f} fs ops",
                None if value is None else value <= 4.0,
            )
        )
    return out
