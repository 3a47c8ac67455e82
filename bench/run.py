"""Run the benchmark: build fixtures, measure the servers, print and save the report.

``python -m bench [--quick | --tiny]``. The three servers are started side by side but measured
one at a time, repetitions interleaved (nginx, distribution, ours, nginx, ...), so that noise
from a shared machine falls on all of them alike and the ratios stay meaningful. Then ours alone
for cold directories and gzip pulls, on a fresh server per repetition. Every server is stopped
by an ``ExitStack`` / ``with`` block, also on Ctrl-C or SIGTERM. A server whose binary is
missing is skipped with the reason in the report; a failing step is reported, not fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any, Final

if __package__ in (None, ""):  # run as ``python bench/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "src"))

from bench import dirscenarios, measure, report  # noqa: E402
from bench.fixtures import (  # noqa: E402
    Image,
    build_cold_dir,
    build_image,
    build_real_archive,
)
from bench.plan import PLANS, Plan  # noqa: E402
from bench.servers import (  # noqa: E402
    RunningServer,
    ours_help,
    ours_unavailable,
    seed_distribution,
    start_distribution,
    start_nginx,
    start_ours,
    tool,
)

__all__ = ["main"]

_DEFAULT_JSON: Final[str] = "bench-results/latest.json"


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark Simple OCI Registry against nginx and CNCF distribution "
        "(loopback, one machine).",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI-sized smoke run (about a minute)")
    size.add_argument("--tiny", action="store_true", help="seconds-long run on tiny inputs")
    parser.add_argument(
        "--servers",
        default="ours,nginx,distribution",
        help="comma-separated subset of ours,nginx,distribution (default: all)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="--workers for our server (default: number of usable CPUs)",
    )
    parser.add_argument("--json-out", default=_DEFAULT_JSON, help=f"default {_DEFAULT_JSON}")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="keep fixtures here and reuse them on the next run (default: a temp dir, removed)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a measured target is not met"
    )
    parser.add_argument(
        "--scenario",
        default=",".join(dirscenarios.SCENARIOS),
        help="comma-separated subset of compare (the servers side by side), flatdir (a flat "
        "directory of 10,000 archives), fuse (the directory on slow FUSE storage); default: all",
    )
    parser.add_argument(
        "--fs-latency-ms",
        type=float,
        default=1.0,
        help="latency added to every metadata operation in the fuse scenario (default 1 ms)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.servers.split(",")) - set(report.SERVERS)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    unknown = set(args.scenario.split(",")) - set(dirscenarios.SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def _version(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else None


def _environment() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name, args in (
        ("nginx", ["-v"]),
        ("docker-registry", ["--version"]),
        ("wrk", ["-v"]),
        ("skopeo", ["--version"]),
        ("ab", ["-V"]),
    ):
        binary = tool(name)
        versions[name] = _version([binary, *args]) if binary else None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)),
        "tools": versions,
    }


class _Run:
    """Collects figures, notes, skips and failures while the phases run."""

    def __init__(self, plan: Plan, work: Path, workers: int) -> None:
        self.plan = plan
        self.work = work
        self.workers = workers
        self.results: dict[str, dict[str, list[float]]] = {s: {} for s in report.SERVERS}
        self.skipped: dict[str, str] = {}
        self.failed: dict[str, list[str]] = {}
        self.notes: list[str] = []
        self.ours_cache_dir = False
        """Whether our server takes --cache-dir (else it would use its system-wide default)."""

    def ours_cache(self, label: str) -> Path | None:
        """A scratch --cache-dir for one of our servers, so none writes to its default one."""
        return self.scratch("ours") / f"{label}-cache" if self.ours_cache_dir else None

    def add(self, server: str, measured: measure.Measured) -> None:
        for key, values in measured.items():
            self.results[server].setdefault(key, []).extend(values)

    @contextlib.contextmanager
    def attempt(self, server: str, what: str) -> Iterator[None]:
        """Run one step for ``server``; a failure is recorded for the report, the run goes on."""
        try:
            yield
        except Exception as exc:  # any failure is reported and the run goes on
            message = f"{what}: {type(exc).__name__}: {exc}"
            _log(f"{server}: FAILED {message}")
            self.failed.setdefault(server, []).append(message)

    def alive(self, targets: list[measure.Target]) -> list[measure.Target]:
        """Targets that have not failed yet: one failure drops a server from later steps."""
        return [t for t in targets if t.name not in self.failed]

    def scratch(self, name: str) -> Path:
        path = self.work / "scratch" / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def _target(server: RunningServer, image: Image) -> measure.Target:
    name, _, tag = image.ref.partition(":")
    return measure.Target(
        server,
        f"/v2/{name}/manifests/{tag}",
        f"/v2/{name}/blobs/{image.layer_digest}",
        f"/v2/{name}/tags/list",
        image.layer_bytes,
    )


_QUIET: Final[str] = "-nolog"
"""Suffix of a server's second instance, started with its logging off (see report)."""


def _start_nginx(
    run: _Run, image: Image, stack: contextlib.ExitStack, access_log: bool = True
) -> RunningServer | None:
    if tool("nginx") is None:
        run.skipped["nginx"] = "nginx is not installed (apt-get install -y nginx-light)"
        return None
    name = image.ref.partition(":")[0]
    server = start_nginx(
        Path(image.nginx_root),
        run.scratch("nginx"),
        name=name,
        manifest_type=image.manifest_media_type,
        manifest_digest=image.manifest_digest,
        label="nginx" if access_log else "nginx" + _QUIET,
        access_log=access_log,
    )
    return stack.enter_context(server)


def _start_distribution(
    run: _Run, image: Image, stack: contextlib.ExitStack, access_log: bool = True
) -> RunningServer | None:
    missing = [b for b in ("docker-registry", "skopeo") if tool(b) is None]
    if missing:
        run.skipped["distribution"] = (
            f"{' and '.join(missing)} not installed (apt-get install -y docker-registry skopeo)"
        )
        return None
    storage = run.work / f"distribution-{image.layer_bytes}"
    seeded = storage / ".seeded"
    if not (seeded.is_file() and seeded.read_text() == image.manifest_digest):
        shutil.rmtree(storage, ignore_errors=True)
    if not access_log:  # the second instance reads what the first one was seeded with
        return stack.enter_context(
            start_distribution(
                storage / "data",
                run.scratch("distribution"),
                label="distribution" + _QUIET,
                access_log=False,
            )
        )
    server = stack.enter_context(start_distribution(storage / "data", run.scratch("distribution")))
    if not seeded.is_file():
        _log(f"distribution: pushing {image.ref} with skopeo")
        seed_distribution(server, Path(image.plain_archive), image.ref, run.scratch("distribution"))
        seeded.write_text(image.manifest_digest)
    got = measure.served_manifest_digest(server.port, _target(server, image).manifest_path)
    if got != image.manifest_digest:
        run.notes.append(f"distribution serves manifest {got}, not {image.manifest_digest}")
    return server


def _start_ours(
    run: _Run, image: Image, stack: contextlib.ExitStack, access_log: bool = True
) -> RunningServer | None:
    reason = ours_unavailable()
    if reason is not None:
        run.skipped["ours"] = reason
        return None
    run.ours_cache_dir = "--cache-dir" in ours_help()
    if not run.ours_cache_dir:
        run.notes.append(
            "ours has no --cache-dir: each 1st gzip pull runs on a fresh server with its "
            "default cache, which may not be empty"
        )
    label = "ours" if access_log else "ours" + _QUIET
    server = start_ours(
        Path(image.registry_dir),
        run.scratch("ours"),
        workers=run.workers,
        label=label,
        cache_dir=run.ours_cache(label),
        access_log=access_log,
    )
    return stack.enter_context(server)


def _shared_phases(
    run: _Run, targets: list[measure.Target], quiet: dict[str, measure.Target]
) -> None:
    """Blob and request-rate figures for every server, repetitions interleaved across servers
    so that a noisy neighbour on the machine hits all of them alike. The manifest GET rate is
    measured on each server's logging-off instance (``quiet``, by server name) too, right
    after its default one, and recorded as ``manifest_get_rps_nolog``."""
    plan = run.plan
    for target in run.alive(targets):
        with run.attempt(target.name, "warm-up"):
            measure.warm_up(target)
    _log(f"blob GET, 1 stream: {plan.single_reps} runs per server")
    for _ in range(plan.single_reps):
        for target in run.alive(targets):
            with run.attempt(target.name, "blob GET, 1 stream"):
                run.add(target.name, measure.blob_single(target))
    _log(f"blob GET, {plan.concurrency} streams: {plan.concurrent_reps} runs per server")
    for _ in range(plan.concurrent_reps):
        for target in run.alive(targets):
            with run.attempt(target.name, f"blob GET, {plan.concurrency} streams"):
                run.add(target.name, measure.blob_concurrent(target, plan.concurrency))
    for case in measure.RATE_CASES:
        missing = measure.missing_tool(case)
        if missing is not None:
            run.notes.append(missing)
            continue
        _log(f"{case.key} ({case.tool}): {plan.wrk_reps} x {plan.wrk_seconds} s per server")
        for rep in range(-1 if plan.warmup_seconds else 0, plan.wrk_reps):
            for target in run.alive(targets):
                pair = [(target, "")]
                if case.key == "manifest_get_rps" and target.name in quiet:
                    pair += [(t, "_nolog") for t in run.alive([quiet[target.name]])]
                for measured_target, suffix in pair:
                    with run.attempt(measured_target.name, case.key):
                        measured = measure.request_rate(
                            measured_target,
                            case,
                            scratch=run.scratch(measured_target.name),
                            seconds=plan.warmup_seconds if rep < 0 else plan.wrk_seconds,
                            threads=plan.wrk_threads,
                            connections=plan.wrk_connections,
                            notes=run.notes,
                        )
                        if rep >= 0:
                            run.add(target.name, {k + suffix: v for k, v in measured.items()})


def _ours_phases(run: _Run, image: Image) -> None:
    """Cold directories and gzip pulls: ours only, a fresh server for every repetition."""
    scratch = run.scratch("ours")

    def starter(label: str, cache: Path | None = None) -> Callable[[Path], RunningServer]:
        def start(directory: Path) -> RunningServer:
            used = (cache or run.ours_cache(label)) if run.ours_cache_dir else None
            return start_ours(directory, scratch, workers=run.workers, label=label, cache_dir=used)

        return start

    fresh = itertools.count()

    def start_cold(directory: Path) -> RunningServer:
        # An empty cache dir each time: the server may keep archive indexes there.
        cache = scratch / "cold-caches" / str(next(fresh))
        cache.mkdir(parents=True, exist_ok=True)
        return starter("ours-cold", cache)(directory)

    sizes = ", ".join(f"{n:,}" for n in run.plan.dir_sizes)
    _log(f"ours: 1st manifest on cold directories of {sizes} archives")
    with run.attempt("ours", "cold directories"):
        dirs = [build_cold_dir(run.work, n) for n in run.plan.dir_sizes]
        run.add(
            "ours",
            measure.cold_first_manifest(
                start_cold, [(d.count, d.path, d.ref) for d in dirs], run.plan.cold_reps
            ),
        )
    _log("ours: 1st and 2nd pull of the gzip archive")
    with run.attempt("ours", "gzip archive pulls"):

        def start_gzip(cache: Path) -> RunningServer:
            return starter("ours-gzip", cache)(Path(image.registry_dir))

        run.add(
            "ours",
            measure.gzip_pulls(
                start_gzip,
                image.gzip_ref,
                image.layer_digest,
                scratch / "gzip-caches",
                run.plan.gzip_reps,
            ),
        )
    if "--prepare-ahead" not in ours_help() or not run.ours_cache_dir:
        run.notes.append("ours does not prepare compressed archives in the background: "
                         "no row for the 1st pull after preparation")
        return
    _log("ours: 1st pull of the gzip archive once background preparation has finished")
    with run.attempt("ours", "gzip archive after background preparation"):
        run.add(
            "ours",
            measure.gzip_prepared_pulls(
                start_gzip,
                image.gzip_ref,
                image.layer_digest,
                scratch / "gzip-prepared-caches",
                run.plan.gzip_reps,
            ),
        )


def _inflate_phase(run: _Run) -> None:
    """ISA-L against zlib on a gzip tar of real files (ours: it is the registry's inflater)."""
    size = run.plan.real_archive_bytes
    _log(f"gzip inflate, ISA-L vs zlib: a gzip -6 tar of {size / 2**20:.0f} MiB of /usr files")
    with run.attempt("ours", "gzip inflate"):
        archive = build_real_archive(run.work, size)
        run.add("ours", measure.gzip_inflate(archive, max(2, run.plan.gzip_reps), run.notes))


def _brief(message: str) -> str:
    """First and last line of a failure (the JSON keeps it whole, with the server's log tail)."""
    lines = [line for line in message.splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1].strip()}"


_STARTERS: Final = (
    ("nginx", _start_nginx),
    ("distribution", _start_distribution),
    ("ours", _start_ours),
)


def _compare(run: _Run, wanted: list[str]) -> Image:
    """The servers side by side, then ours alone on cold directories and gzip pulls."""
    started = time.time()
    _log(f"mode {run.plan.mode}: building fixtures in {run.work}")
    image = build_image(run.work, run.plan.layer_bytes)
    _log(f"fixtures ready in {time.time() - started:.1f} s")
    with contextlib.ExitStack() as stack:
        servers: list[RunningServer] = []
        quiet: dict[str, measure.Target] = {}
        for name, start in _STARTERS:
            if name not in wanted:
                run.skipped[name] = "not selected (--servers)"
                continue
            _log(f"{name}: starting, and a second instance with logging off")
            with run.attempt(name, "start"):
                started_server = start(run, image, stack)
                if started_server is not None:
                    servers.append(started_server)
            if name in run.skipped or name in run.failed:
                continue
            with run.attempt(name + _QUIET, "start"):
                quiet_server = start(run, image, stack, False)
                if quiet_server is not None:
                    quiet[name] = _target(quiet_server, image)
        _shared_phases(run, [_target(s, image) for s in servers], quiet)
    if "ours" in wanted and "ours" not in run.skipped and "ours" not in run.failed:
        _ours_phases(run, image)
        _inflate_phase(run)
    return image


def _execute(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], str]:
    plan = PLANS["tiny" if args.tiny else "quick" if args.quick else "full"]
    wanted = args.servers.split(",")
    run = _Run(plan, work, args.workers)
    shutil.rmtree(work / "scratch", ignore_errors=True)  # logs and caches of an earlier run
    started = time.time()
    scenarios = args.scenario.split(",")
    image = _compare(run, wanted) if "compare" in scenarios else None
    _log(f"directory scenarios: {', '.join(s for s in scenarios if s != 'compare') or 'none'}")
    shape = dirscenarios.WrkShape(
        plan.wrk_seconds, plan.warmup_seconds, plan.wrk_reps, plan.wrk_threads, plan.wrk_connections
    )
    latency = args.fs_latency_ms / 1000
    dirscenarios.run_scenarios(run, scenarios, plan.mode, shape, latency)
    dir_plan = dirscenarios.DIR_PLANS[plan.mode]
    metrics = report.metrics_for(plan.dir_sizes, plan.concurrency)
    metrics += dirscenarios.metrics(dir_plan, latency)
    ratio_table = report.ratios(run.results, metrics)
    target_list = report.targets(run.results, plan.dir_sizes) if image is not None else []
    target_list += dirscenarios.targets(run.results, dir_plan, latency, scenarios)
    skipped = dict(run.skipped)
    for server, messages in run.failed.items():
        skipped[server] = "failed: " + "\n  ".join(_brief(m) for m in messages)
    text = report.render(run.results, metrics, ratio_table, target_list, skipped)
    document = {
        "schema": 1,
        "mode": plan.mode,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "plan": plan.as_json(),
        "workers": args.workers,
        "environment": _environment(),
        "fixtures": asdict(image) if image is not None else {},
        "scenarios": scenarios,
        "units": {m.key: m.unit for m in metrics},
        "results": {
            server: {key: report.summarise(runs) for key, runs in figures.items()}
            for server, figures in run.results.items()
        },
        "ratios": ratio_table,
        "targets": [t.as_json() for t in target_list],
        "skipped": run.skipped,
        "failed": run.failed,
        "notes": run.notes,
        "table": text,
    }
    return document, text


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    previous = signal.signal(signal.SIGTERM, _sigterm)
    work: Path = args.work_dir or Path(tempfile.mkdtemp(prefix="sor-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        document, text = _execute(args, work.resolve())
    except KeyboardInterrupt:
        _log("interrupted: servers stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(text)
    out = Path(args.json_out)
    if not out.is_absolute():
        out = Path.cwd() / out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    _log(f"wrote {out}")
    if args.strict and any(t["met"] is False for t in document["targets"]):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
