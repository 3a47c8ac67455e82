"""Run the benchmark: build fixtures, measure each server in turn, print and save the report.

``python -m bench [--quick | --tiny]``. Servers run one at a time (the machine has few cores and
the client shares them), each started fresh and stopped in a ``finally``, also on Ctrl-C or
SIGTERM. A server whose binary is missing is skipped with the reason in the report.
"""

from __future__ import annotations

import argparse
import contextlib
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

from bench import measure, report  # noqa: E402
from bench.fixtures import build_cold_dir, build_image  # noqa: E402
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
    args = parser.parse_args(argv)
    unknown = set(args.servers.split(",")) - set(report.SERVERS)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
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

    def add(self, server: str, measured: measure.Measured) -> None:
        for key, values in measured.items():
            self.results[server].setdefault(key, []).extend(values)

    @contextlib.contextmanager
    def phase(self, server: str, what: str) -> Iterator[None]:
        """Log a phase; a failure is recorded for the report and the run goes on."""
        _log(f"{server}: {what}")
        try:
            yield
        except Exception as exc:  # any failure is reported and the run goes on
            message = f"{what}: {type(exc).__name__}: {exc}"
            _log(f"{server}: FAILED {message}")
            self.failed.setdefault(server, []).append(message)

    def scratch(self, name: str) -> Path:
        path = self.work / "scratch" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def measure_server(self, server: RunningServer, target: measure.Target) -> None:
        """Blob throughput, CPU/RSS under 32 streams, then request rates."""
        plan = self.plan
        name = server.name
        self.add(name, measure.blob_single(target, plan.single_reps))
        self.add(name, measure.blob_concurrent(target, plan.concurrent_reps, plan.concurrency))
        self.add(
            name,
            measure.request_rates(
                target,
                scratch=self.scratch(name),
                reps=plan.wrk_reps,
                seconds=plan.wrk_seconds,
                threads=plan.wrk_threads,
                connections=plan.wrk_connections,
                notes=self.notes,
            ),
        )


def _paths(name: str, tag: str, digest: str) -> tuple[str, str, str]:
    return (f"/v2/{name}/manifests/{tag}", f"/v2/{name}/blobs/{digest}", f"/v2/{name}/tags/list")


def _run_nginx(run: _Run, image: Any) -> None:
    if tool("nginx") is None:
        run.skipped["nginx"] = "nginx is not installed (apt-get install -y nginx-light)"
        return
    name, _, tag = image.ref.partition(":")
    with run.phase("nginx", "start"):
        server = start_nginx(
            Path(image.nginx_root),
            run.scratch("nginx"),
            name=name,
            manifest_type=image.manifest_media_type,
            manifest_digest=image.manifest_digest,
        )
        with server:
            manifest, blob, tags = _paths(name, tag, image.layer_digest)
            target = measure.Target(server, manifest, blob, tags, image.layer_bytes)
            run.measure_server(server, target)


def _run_distribution(run: _Run, image: Any) -> None:
    missing = [b for b in ("docker-registry", "skopeo") if tool(b) is None]
    if missing:
        run.skipped["distribution"] = (
            f"{' and '.join(missing)} not installed (apt-get install -y docker-registry skopeo)"
        )
        return
    storage = run.work / f"distribution-{image.layer_bytes}"
    seeded = storage / ".seeded"
    with run.phase("distribution", "start and seed"):
        if not (seeded.is_file() and seeded.read_text() == image.manifest_digest):
            shutil.rmtree(storage, ignore_errors=True)
        server = start_distribution(storage / "data", run.scratch("distribution"))
        with server:
            if not seeded.is_file():
                _log(f"distribution: pushing {image.ref} with skopeo")
                seed_distribution(
                    server, Path(image.plain_archive), image.ref, run.scratch("distribution")
                )
                seeded.write_text(image.manifest_digest)
            name, _, tag = image.ref.partition(":")
            manifest, blob, tags = _paths(name, tag, image.layer_digest)
            got = measure.served_manifest_digest(server.port, manifest)
            if got != image.manifest_digest:
                run.notes.append(f"distribution serves manifest {got}, not {image.manifest_digest}")
            target = measure.Target(server, manifest, blob, tags, image.layer_bytes)
            run.measure_server(server, target)


def _run_ours(run: _Run, image: Any) -> None:
    reason = ours_unavailable()
    if reason is not None:
        run.skipped["ours"] = reason
        return
    scratch = run.scratch("ours")

    def starter(label: str, cache: Path | None = None) -> Callable[[Path], RunningServer]:
        def start(directory: Path) -> RunningServer:
            return start_ours(directory, scratch, workers=run.workers, label=label, cache_dir=cache)

        return start

    with run.phase("ours", "blobs and request rates"):
        with starter("ours")(Path(image.registry_dir)) as server:
            name, _, tag = image.ref.partition(":")
            manifest, blob, tags = _paths(name, tag, image.layer_digest)
            target = measure.Target(server, manifest, blob, tags, image.layer_bytes)
            run.measure_server(server, target)
    with run.phase("ours", f"cold directories {', '.join(map(str, run.plan.dir_sizes))}"):
        dirs = [build_cold_dir(run.work, n) for n in run.plan.dir_sizes]
        run.add(
            "ours",
            measure.cold_first_manifest(
                starter("ours-cold"), [(d.count, d.path, d.ref) for d in dirs], run.plan.cold_reps
            ),
        )
    with run.phase("ours", "gzip archive pulls"):
        has_cache_dir = "--cache-dir" in ours_help()
        if not has_cache_dir:
            run.notes.append(
                "ours has no --cache-dir: each 1st gzip pull runs on a fresh server with its "
                "default cache, which may not be empty"
            )

        def start_gzip(cache: Path) -> RunningServer:
            used = cache if has_cache_dir else None
            return starter("ours-gzip", used)(Path(image.registry_dir))

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


def _execute(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], str]:
    plan = PLANS["tiny" if args.tiny else "quick" if args.quick else "full"]
    wanted = args.servers.split(",")
    run = _Run(plan, work, args.workers)
    started = time.time()
    _log(f"mode {plan.mode}: building fixtures in {work}")
    image = build_image(work, plan.layer_bytes)
    _log(f"fixtures ready in {time.time() - started:.1f} s")
    for server, runner in (
        ("nginx", _run_nginx),
        ("distribution", _run_distribution),
        ("ours", _run_ours),
    ):
        if server in wanted:
            runner(run, image)
        else:
            run.skipped[server] = "not selected (--servers)"
    metrics = report.metrics_for(plan.dir_sizes, plan.concurrency)
    ratio_table = report.ratios(run.results, metrics)
    target_list = report.targets(run.results, plan.dir_sizes)
    skipped = dict(run.skipped)
    for server, messages in run.failed.items():
        skipped[server] = "failed: " + "\n  ".join(messages)
    text = report.render(run.results, metrics, ratio_table, target_list, skipped)
    document = {
        "schema": 1,
        "mode": plan.mode,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "plan": plan.as_json(),
        "workers": args.workers,
        "environment": _environment(),
        "fixtures": asdict(image),
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
