"""Summaries, ratios, targets, the printed table and the JSON document."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "SERVERS",
    "Metric",
    "Target",
    "metrics_for",
    "ratios",
    "render",
    "summarise",
    "targets",
]

SERVERS: Final[tuple[str, ...]] = ("ours", "nginx", "distribution")
Results = Mapping[str, Mapping[str, Sequence[float]]]


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    unit: str
    digits: int


_SERVING: Final[tuple[Metric, ...]] = (
    Metric("blob_single_gbps", "blob GET, 1 stream", "GB/s", 2),
    Metric("blob_concurrent_gbps", "blob GET, 32 streams, aggregate", "GB/s", 2),
    Metric("cpu_s_per_gb", "server CPU per GB (32 streams)", "CPU-s/GB", 3),
    Metric("rss_before_mb", "server RSS before 32 streams", "MB", 1),
    Metric("rss_after_mb", "server RSS after 32 streams", "MB", 1),
    Metric("rss_peak_mb", "server RSS peak during 32 streams", "MB", 1),
    Metric("rss_growth_mb", "server RSS growth (peak - before)", "MB", 1),
    # RSS sums count pages that forked workers share once per worker; PSS shares them out.
    Metric("pss_before_mb", "server PSS before 32 streams", "MB", 1),
    Metric("pss_after_mb", "server PSS after 32 streams", "MB", 1),
    # Every server logs as its users run it (see bench.servers); the second row, logging
    # off, shows what the log costs.
    Metric("manifest_get_rps", "manifest GET by tag, default logging (wrk)", "req/s", 0),
    Metric("manifest_get_rps_nolog", "manifest GET by tag, logging off (wrk)", "req/s", 0),
    Metric("manifest_get_cpu_us", "server CPU per manifest GET, default logging", "µs", 1),
    Metric("manifest_get_cpu_us_nolog", "server CPU per manifest GET, logging off", "µs", 1),
    Metric("manifest_head_rps", "manifest HEAD by tag (ab -k)", "req/s", 0),
    Metric("tags_list_rps", "tags/list GET (wrk)", "req/s", 0),
)
_GZIP: Final[tuple[Metric, ...]] = (
    Metric("gzip_first_manifest_ms", "gzip archive, 1st pull: manifest", "ms", 1),
    Metric("gzip_first_ttfb_ms", "gzip archive, 1st pull: layer first byte", "ms", 1),
    Metric("gzip_first_gbps", "gzip archive, 1st pull: layer", "GB/s", 2),
    Metric("gzip_second_manifest_ms", "gzip archive, 2nd pull: manifest", "ms", 1),
    Metric("gzip_second_ttfb_ms", "gzip archive, 2nd pull: layer first byte", "ms", 1),
    Metric("gzip_second_gbps", "gzip archive, 2nd pull: layer", "GB/s", 2),
    Metric("gzip_inflate_isal_mbps", "gzip inflate, real files: ISA-L (isal)", "MB/CPU-s", 0),
    Metric("gzip_inflate_zlib_mbps", "gzip inflate, real files: zlib", "MB/CPU-s", 0),
    Metric("gzip_prepared_manifest_ms", "gzip archive, 1st manifest after background "
           "preparation", "ms", 1),
    Metric("gzip_prepared_ttfb_ms", "gzip archive, 1st pull after background preparation: "
           "layer first byte", "ms", 1),
    Metric("gzip_preparation_s", "background preparation time (gzip archive)", "s", 2),
)


def metrics_for(dir_sizes: Sequence[int], concurrency: int = 32) -> tuple[Metric, ...]:
    """The table's rows, in order; cold-directory rows depend on the directory sizes."""
    rows = [
        Metric(m.key, m.label.replace("32 streams", f"{concurrency} streams"), m.unit, m.digits)
        for m in _SERVING
    ]
    for count in dir_sizes:
        rows.append(
            Metric(f"cold_manifest_ms_{count}", f"1st manifest, cold dir of {count:,}", "ms", 2)
        )
        rows.append(Metric(f"warm_manifest_ms_{count}", f"2nd manifest, dir of {count:,}", "ms", 2))
    rows.extend(_GZIP)
    return tuple(rows)


def summarise(runs: Sequence[float]) -> dict[str, Any]:
    """``{"runs", "min", "median"}`` of one metric on one server."""
    return {
        "runs": [round(r, 6) for r in runs],
        "min": min(runs) if runs else None,
        "median": statistics.median(runs) if runs else None,
    }


def _median(results: Results, server: str, key: str) -> float | None:
    runs = results.get(server, {}).get(key)
    return statistics.median(runs) if runs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def ratios(results: Results, metrics: Sequence[Metric]) -> dict[str, dict[str, float | None]]:
    """Median ours / median other, per metric, for nginx and distribution."""
    out: dict[str, dict[str, float | None]] = {}
    for other in SERVERS[1:]:
        out[f"ours/{other}"] = {
            m.key: _ratio(_median(results, "ours", m.key), _median(results, other, m.key))
            for m in metrics
        }
    return out


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    goal: str
    value: str
    met: bool | None
    """None when a figure it needs is missing (server skipped or failed)."""

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "goal": self.goal, "value": self.value, "met": self.met}


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _ratio_target(name: str, goal: str, value: float | None, ok: bool) -> Target:
    shown = "n/a" if value is None else _fmt(value) + "x"
    return Target(name, goal, shown, ok if value is not None else None)


def targets(results: Results, dir_sizes: Sequence[int]) -> list[Target]:
    """The issue's acceptance targets, judged on medians of this run."""

    def med(server: str, key: str) -> float | None:
        return _median(results, server, key)

    out: list[Target] = []
    r = _ratio(med("ours", "blob_single_gbps"), med("nginx", "blob_single_gbps"))
    out.append(_ratio_target("blob throughput, 1 stream", ">= 0.9x nginx", r, (r or 0) >= 0.9))
    r = _ratio(med("ours", "blob_concurrent_gbps"), med("nginx", "blob_concurrent_gbps"))
    out.append(_ratio_target("blob throughput, 32 streams", ">= 0.9x nginx", r, (r or 0) >= 0.9))
    r = _ratio(med("ours", "cpu_s_per_gb"), med("nginx", "cpu_s_per_gb"))
    out.append(_ratio_target("server CPU per GB", "<= 2x nginx", r, r is not None and r <= 2))
    r = _ratio(med("ours", "manifest_get_rps"), med("ours", "manifest_get_rps_nolog"))
    out.append(
        _ratio_target("access log cost, manifest GET", ">= 0.85x logging off", r, (r or 0) >= 0.85)
    )
    r = _ratio(med("ours", "manifest_get_rps"), med("distribution", "manifest_get_rps"))
    out.append(
        _ratio_target(
            "manifest GET by tag", ">= 10x distribution, both at defaults", r, (r or 0) >= 10
        )
    )
    r = _ratio(med("ours", "manifest_get_rps"), med("nginx", "manifest_get_rps"))
    out.append(_ratio_target("manifest GET by tag", ">= 0.25x nginx", r, (r or 0) >= 0.25))
    growth = results.get("ours", {}).get("rss_growth_mb")
    worst = max(growth) if growth else None
    out.append(
        Target(
            "RSS growth, 32 concurrent pulls",
            "< 20 MB (worst run)",
            "n/a" if worst is None else _fmt(worst, 1) + " MB",
            worst < 20 if worst is not None else None,
        )
    )
    colds = [(n, med("ours", f"cold_manifest_ms_{n}")) for n in dir_sizes]
    known = [(n, v) for n, v in colds if v is not None]
    shown = ", ".join(f"{n:,}: {_fmt(v)} ms" for n, v in colds)
    slowest = max((v for _, v in known), default=None)
    out.append(
        Target(
            "1st manifest on a cold dir",
            "< 50 ms at every size",
            shown,
            slowest < 50 if known and slowest is not None else None,
        )
    )
    fastest = [
        (n, min(runs))
        for n in dir_sizes
        if (runs := results.get("ours", {}).get(f"cold_manifest_ms_{n}"))
    ]
    if len(fastest) >= 2:
        # Best runs, not medians: a noisy neighbour inflates single latencies, never shrinks them.
        (n0, v0), (n1, v1) = fastest[0], fastest[-1]
        flat = v1 <= max(2 * v0, v0 + 5)
        out.append(
            Target(
                f"cold 1st manifest flat {n0:,} -> {n1:,}",
                "best run: largest <= max(2x, +5 ms) smallest",
                f"{_fmt(v0)} -> {_fmt(v1)} ms",
                flat,
            )
        )
    else:
        out.append(Target("cold 1st manifest flat", "needs two directory sizes", "n/a", None))
    r = _ratio(med("ours", "gzip_second_gbps"), med("ours", "blob_single_gbps"))
    out.append(
        _ratio_target(
            "2nd pull of a gzip archive", ">= 0.9x plain archive (1 stream)", r, (r or 0) >= 0.9
        )
    )
    r = _ratio(med("ours", "gzip_inflate_isal_mbps"), med("ours", "gzip_inflate_zlib_mbps"))
    out.append(_ratio_target("gzip inflate, real files", ">= 2x zlib", r, (r or 0) >= 2))
    prepared = med("ours", "gzip_prepared_manifest_ms")
    took = med("ours", "gzip_preparation_s")
    out.append(
        Target(
            "gzip 1st manifest after background preparation",
            "<= 50 ms",
            "n/a" if prepared is None else f"{_fmt(prepared, 1)} ms (preparation took "
            f"{_fmt(took)} s)",
            prepared <= 50 if prepared is not None else None,
        )
    )
    return out


def _cell(results: Results, server: str, metric: Metric) -> str:
    runs = results.get(server, {}).get(metric.key)
    if not runs:
        return "-"
    return f"{_fmt(min(runs), metric.digits)} / {_fmt(statistics.median(runs), metric.digits)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [c.ljust(widths[i]) if i < left else c.rjust(widths[i]) for i, c in enumerate(row)]
        return "  ".join(cells).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def render(
    results: Results,
    metrics: Sequence[Metric],
    ratio_table: Mapping[str, Mapping[str, float | None]],
    target_list: Sequence[Target],
    skipped: Mapping[str, str],
) -> str:
    """The human-readable report: one figures table (min / median), then the targets."""
    header = ["metric", "unit", *(f"{s} min / med" for s in SERVERS), "ours/nginx", "ours/dist"]
    rows = []
    for m in metrics:
        if not any(results.get(s, {}).get(m.key) for s in SERVERS):
            continue
        rn = ratio_table["ours/nginx"].get(m.key)
        rd = ratio_table["ours/distribution"].get(m.key)
        rows.append(
            [
                m.label,
                m.unit,
                *(_cell(results, s, m) for s in SERVERS),
                _fmt(rn) if rn is not None else "-",
                _fmt(rd) if rd is not None else "-",
            ]
        )
    lines = _table(header, rows, left=2)
    lines += ["", "ratios are of medians; '-' = not measured for that server", ""]
    verdict = {True: "met", False: "NOT MET", None: "n/a"}
    lines += _table(
        ["target", "goal", "this run", "verdict"],
        [[t.name, t.goal, t.value, verdict[t.met]] for t in target_list],
        left=3,
    )
    for server, reason in skipped.items():
        lines.append(f"skipped or failed, {server}: {reason}")
    return "\n".join(lines)
