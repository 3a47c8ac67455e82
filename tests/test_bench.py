"""The benchmark harness (``python -m bench``) runs end to end on tiny inputs and reports.

Only the shape of the output is checked, never a figure: timings depend on the machine. Servers
whose binaries are missing must be skipped with a reason, not fail the run.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # ``bench`` is a top-level directory, not an installed package
    sys.path.insert(0, str(REPO))

from bench import dirscenarios, latencyfs, measure, report, run  # noqa: E402
from bench.fixtures import build_real_archive  # noqa: E402
from bench.load import parse_ab, parse_wrk  # noqa: E402
from bench.measure import gzip_inflate  # noqa: E402
from bench.procstat import process_tree, sample_tree  # noqa: E402

BLOB_KEYS = (
    "blob_single_gbps",
    "blob_concurrent_gbps",
    "cpu_s_per_gb",
    "rss_before_mb",
    "rss_after_mb",
    "rss_peak_mb",
    "rss_growth_mb",
    "pss_before_mb",
    "pss_after_mb",
)
RATE_KEYS = (
    "manifest_get_rps",
    "manifest_get_rps_nolog",
    "manifest_get_cpu_us",
    "manifest_get_cpu_us_nolog",
    "manifest_head_rps",
    "tags_list_rps",
)
OURS_ONLY_KEYS = (
    "cold_manifest_ms_1",
    "cold_manifest_ms_3",
    "gzip_first_ttfb_ms",
    "gzip_first_gbps",
    "gzip_second_ttfb_ms",
    "gzip_second_gbps",
    "gzip_inflate_isal_mbps",
    "gzip_inflate_zlib_mbps",
    "gzip_prepared_manifest_ms",
    "gzip_preparation_s",
)
TOP_KEYS = {
    "schema",
    "mode",
    "plan",
    "environment",
    "fixtures",
    "units",
    "results",
    "ratios",
    "targets",
    "skipped",
    "failed",
    "notes",
    "table",
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, dict[str, Any]]:
    """One ``--tiny`` run shared by the tests below: (stdout, stderr, JSON document)."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results" / "latest.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "src")]))
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--work-dir", str(tmp / "work")]
        + ["--json-out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, f"bench failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout, done.stderr, json.loads(out.read_text())


def test_prints_one_table_with_every_server_and_the_targets(
    tiny_run: tuple[str, str, dict[str, Any]],
) -> None:
    stdout, _, document = tiny_run
    header = stdout.splitlines()[0]
    for column in ("metric", "ours min / med", "nginx min / med", "distribution min / med"):
        assert column in header
    assert "ours/nginx" in header and "ours/dist" in header
    for target in document["targets"]:
        assert target["name"] in stdout
    assert document["table"] == stdout.rstrip("\n")


def test_json_has_the_expected_keys(tiny_run: tuple[str, str, dict[str, Any]]) -> None:
    _, _, document = tiny_run
    assert TOP_KEYS <= set(document)
    assert document["mode"] == "tiny"
    assert set(document["results"]) == set(report.SERVERS)
    assert set(document["ratios"]) == {"ours/nginx", "ours/distribution"}
    assert document["fixtures"]["manifest_digest"].startswith("sha256:")
    # The servers compared (with issue 12's gzip after preparation), then issue 9's.
    assert len(document["targets"]) == 12 + 4
    assert document["scenarios"] == ["compare", "flatdir", "fuse"]
    for target in document["targets"]:
        assert set(target) == {"name", "goal", "value", "met"}
        assert target["met"] in (True, False, None)


def _tool_missing(server: str) -> bool:
    needs = {"ours": [], "nginx": ["nginx"], "distribution": ["docker-registry", "skopeo"]}
    sbin = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return any(shutil.which(b, path=sbin) is None for b in needs[server])


@pytest.mark.parametrize("server", report.SERVERS)
def test_each_server_is_measured_or_skipped_with_a_reason(
    tiny_run: tuple[str, str, dict[str, Any]], server: str
) -> None:
    stdout, stderr, document = tiny_run
    assert server not in document["failed"], f"{server} failed: {document['failed'][server]}"
    if server in document["skipped"]:
        reason = document["skipped"][server]
        assert reason and f"skipped or failed, {server}: {reason}" in stdout
        if server != "ours":
            assert _tool_missing(server) and "not installed" in reason
        return
    figures = document["results"][server]
    expected = BLOB_KEYS + (OURS_ONLY_KEYS if server == "ours" else ())
    expected += tuple(k for k in RATE_KEYS if shutil.which("wrk" if "head" not in k else "ab"))
    if server == "ours" and shutil.which("wrk"):
        expected += ("flat_one_name_rps", "flat_spread_rps", "flat_unknown_rps")
    if server == "ours" and "ours, FUSE scenarios" not in document["skipped"]:
        expected += tuple(
            f"fs_{mode}_{step}_{unit}"
            for mode in ("noac", "actimeo1")
            for step, _ in dirscenarios.FS_STEPS
            for unit in ("ms", "ops", "ops_getattr")
        )
    for key in expected:
        assert set(figures[key]) == {"runs", "min", "median"}, key
        assert figures[key]["runs"], key
        assert figures[key]["min"] <= figures[key]["median"], key


def test_targets_are_judged_from_medians() -> None:
    results = {
        "ours": {
            "blob_single_gbps": [1.0, 2.0, 3.0],
            "blob_concurrent_gbps": [1.0],
            "cpu_s_per_gb": [0.3],
            "manifest_get_rps": [30_000.0],
            "manifest_get_rps_nolog": [36_000.0],
            "rss_growth_mb": [1.0, 25.0],
            "cold_manifest_ms_100": [4.0],
            "cold_manifest_ms_10000": [9.5],
            "gzip_second_gbps": [1.9],
            "gzip_inflate_isal_mbps": [800.0, 900.0, 700.0],
            "gzip_inflate_zlib_mbps": [400.0, 380.0],
            "gzip_prepared_manifest_ms": [12.0],
            "gzip_preparation_s": [1.5],
        },
        "nginx": {
            "blob_single_gbps": [2.0],
            "blob_concurrent_gbps": [2.0],
            "cpu_s_per_gb": [0.1],
            "manifest_get_rps": [100_000.0],
        },
        "distribution": {"manifest_get_rps": [2_000.0]},
    }
    verdicts = [t.met for t in report.targets(results, (100, 10_000))]
    # 1 stream 1.0x, 32 streams 0.5x, CPU 3x, access log 0.83x, GET 15x dist, 0.3x nginx,
    # RSS worst 25 MB, cold < 50 ms, 9.5 <= max(8, 9) fails flatness, gzip 0.95x,
    # inflate 800 / 390 = 2.05x, gzip after preparation 12 ms.
    assert verdicts == [True, False, False, False, True, True, False, True, False, True, True,
                        True]
    assert [t.met for t in report.targets({}, (1,))] == [None] * 12
    results["ours"]["manifest_get_rps_nolog"] = [35_000.0]  # 30 / 35 = 0.857x
    results["ours"]["gzip_inflate_zlib_mbps"] = [420.0]  # 800 / 420 = 1.9x
    verdicts = [t.met for t in report.targets(results, (100, 10_000))]
    assert (verdicts[3], verdicts[-2]) == (True, False)


def test_render_leaves_unmeasured_rows_out() -> None:
    results = {"ours": {"blob_single_gbps": [1.0, 3.0]}, "nginx": {"blob_single_gbps": [2.0]}}
    metrics = report.metrics_for((1,))
    text = report.render(
        results, metrics, report.ratios(results, metrics), report.targets(results, (1,)), {}
    )
    assert "1.00 / 2.00" in text and "blob GET, 1 stream" in text
    assert "tags/list" not in text


def test_parses_wrk_and_ab_summaries() -> None:
    wrk = parse_wrk(
        "Running 1s test @ http://127.0.0.1:1/v2/\n  2 threads and 64 connections\n"
        "  21000 requests in 1.00s, 30.00MB read\n"
        "  Socket errors: connect 0, read 2, write 0, timeout 1\n"
        "  Non-2xx or 3xx responses: 5\nRequests/sec:  20999.50\nTransfer/sec:     29.99MB\n"
    )
    assert (wrk.requests, wrk.errors, wrk.non_2xx) == (21000, 3, 5)
    assert wrk.requests_per_second == pytest.approx(20999.5)
    ab = parse_ab(
        "Complete requests:      414925\nFailed requests:        0\n"
        "Keep-Alive requests:    414925\nRequests per second:    138305.75 [#/sec] (mean)\n"
    )
    assert (ab.requests, ab.errors, ab.non_2xx) == (414925, 0, 0)
    assert ab.requests_per_second == pytest.approx(138305.75)


def test_process_tree_sums_children() -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as child:
        try:
            assert child.pid in process_tree(os.getpid())
            sample = sample_tree(os.getpid())
            assert sample.rss_bytes > 0 and sample.cpu_seconds > 0
            # PSS shares out what the processes map in common (the interpreter): less.
            assert 0 < sample.pss_bytes < sample.rss_bytes
        finally:
            child.kill()


def test_servers_log_as_their_users_run_them(
    tiny_run: tuple[str, str, dict[str, Any]],
) -> None:
    """Ours and distribution log into a pipe (a container's stderr), nginx to its access log
    file; each server's second instance has logging off."""
    _, _, document = tiny_run
    scratch = Path(document["fixtures"]["root"]).parent / "scratch"
    if "ours" not in document["skipped"]:
        assert "simple_oci_registry.access" in (scratch / "ours" / "ours.log").read_text()
        assert "simple_oci_registry.access" not in (
            scratch / "ours" / "ours-nolog.log").read_text()
        assert document["results"]["ours"]["manifest_get_rps_nolog"]["runs"]
    if "nginx" not in document["skipped"]:
        assert "GET /v2/" in (scratch / "nginx" / "nginx" / "access.log").read_text()
        assert not (scratch / "nginx" / "nginx-nolog" / "access.log").exists()
    if "distribution" not in document["skipped"]:
        assert '"GET /v2/' in (scratch / "distribution" / "distribution.log").read_text()
        assert '"GET /v2/' not in (
            scratch / "distribution" / "distribution-nolog.log").read_text()


def test_real_archive_is_gzip_of_real_files(tmp_path: Path) -> None:
    archive = build_real_archive(tmp_path, 256 << 10)
    with tarfile.open(archive, "r:gz") as tar:
        names = tar.getnames()
    assert names and all(name.startswith(("usr/share/", "usr/lib/")) for name in names)
    assert build_real_archive(tmp_path, 256 << 10) == archive  # built once
    notes: list[str] = []
    figures = gzip_inflate(archive, 2, notes)
    assert len(figures["gzip_inflate_zlib_mbps"]) == 2
    assert all(rate > 0 for rates in figures.values() for rate in rates)
    if "gzip_inflate_isal_mbps" not in figures:
        assert notes and "isal" in notes[0]


def test_fuse_scenarios_run_or_are_skipped_with_the_reason(
    tiny_run: tuple[str, str, dict[str, Any]],
) -> None:
    stdout, _, document = tiny_run
    reason = latencyfs.unavailable()
    if reason is not None:
        assert document["skipped"]["ours, FUSE scenarios"] == reason
        assert reason in stdout
    else:
        assert "FUSE 1 ms noac, dir of 5: 1st manifest" in stdout
        first = document["results"]["ours"]["fs_noac_first_ops"]["runs"]
        assert first and min(first) > 0, "a fresh server must read the directory"


def test_spread_names_are_evenly_spaced_and_distinct() -> None:
    names = dirscenarios.spread_names(10_000, 1_000)
    assert len(set(names)) == 1_000
    assert names[:3] == ["n00000", "n00010", "n00020"] and names[-1] == "n09990"
    assert dirscenarios.spread_names(3, 10) == ["n00000", "n00001", "n00002"]
    assert dirscenarios.spread_names(7, 3) == ["n00000", "n00002", "n00004"]


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers 200 and remembers each request's path and Accept header."""

    seen: list[tuple[str, str]]

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        self.seen.append((self.path, self.headers.get("Accept", "")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def recording_server() -> Iterator[tuple[str, list[tuple[str, str]]]]:
    seen: list[tuple[str, str]] = []
    handler = type("Handler", (_Recorder,), {"seen": seen, "protocol_version": "HTTP/1.1"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def _wrk_shape() -> dirscenarios.WrkShape:
    return dirscenarios.WrkShape(seconds=1, warmup_seconds=0, reps=1, threads=2, connections=4)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_wrk_rotates_over_every_path_with_the_manifest_accept_header(
    recording_server: tuple[str, list[tuple[str, str]]], tmp_path: Path
) -> None:
    url, seen = recording_server
    paths = [f"/v2/{name}/manifests/1.0" for name in dirscenarios.spread_names(100, 10)]
    script = dirscenarios.rotation_script(paths)
    result = dirscenarios.run_wrk_script(url, script, tmp_path, "rotation", 1, _wrk_shape())
    assert result.requests > len(paths) and result.non_2xx == 0
    assert {path for path, _ in seen} == set(paths)
    assert {accept for _, accept in seen} == {measure.MANIFEST_ACCEPT}


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_wrk_asks_for_a_new_name_on_every_request(
    recording_server: tuple[str, list[tuple[str, str]]], tmp_path: Path
) -> None:
    url, seen = recording_server
    script = dirscenarios.missing_script("never-abc")
    result = dirscenarios.run_wrk_script(url, script, tmp_path, "missing", 1, _wrk_shape())
    paths = [path for path, _ in seen]
    assert result.requests > 10
    assert len(set(paths)) == len(paths), "a name was asked for twice"
    assert all(p.startswith("/v2/never-abc-") and p.endswith("/manifests/1.0") for p in paths)


def test_scripts_refuse_what_they_cannot_rotate() -> None:
    with pytest.raises(ValueError):
        dirscenarios.rotation_script([])
    with pytest.raises(ValueError):
        dirscenarios.missing_script("Never/Seen")


def test_flat_dir_is_reused_and_a_replace_alternates_its_versions(tmp_path: Path) -> None:
    flat = dirscenarios.build_flat_dir(tmp_path, 3)
    assert sorted(p.name for p in flat.path.iterdir()) == [
        "n00000:1.0.oci",
        "n00001:1.0.oci",
        "n00002:1.0.oci",
    ]
    assert len({p.stat().st_ino for p in flat.path.iterdir()}) == 3  # copies, not links
    assert dirscenarios.build_flat_dir(tmp_path, 3) == flat
    assert flat.digest != flat.alternate_digest
    inode = flat.archive(1).stat().st_ino
    assert dirscenarios.replace_archive(flat, 1) == flat.alternate_digest
    assert flat.archive(1).read_bytes() == flat.alternate.read_bytes()
    assert flat.archive(1).stat().st_ino != inode
    assert dirscenarios.replace_archive(flat, 1) == flat.digest
    assert flat.archive(1).read_bytes() == flat.original.read_bytes()
    assert sorted(p.name for p in flat.path.iterdir())[1] == "n00001:1.0.oci"
    assert len(list(flat.path.iterdir())) == 3, "the staged copy must not stay behind"


def test_directory_targets_compare_medians() -> None:
    dplan = dirscenarios.DIR_PLANS["full"]
    results = {
        "ours": {
            "flat_one_name_rps": [10_000.0, 20_000.0, 30_000.0],
            "flat_spread_rps": [100.0, 12_000.0, 200.0],
            "flat_unknown_rps": [9_000.0, 11_000.0],
            "fs_noac_warm_ms": [19.0, 3.0, 3.5],
            "fs_noac_warm_ops": [2.0, 3.0, 4.0],
            "fs_noac_unknown_ms": [5.0],
            "fs_noac_unknown_ops": [6.0],
        }
    }
    got = dirscenarios.targets(results, dplan, 0.001)
    # 200 / 20,000 = 0.01x; 10,000 / 20,000 = 0.5x; 3.5 ms <= 4; 5 ms > 4.
    assert [t.met for t in got] == [False, True, True, False]
    assert [t.value for t in got] == ["0.010x", "0.500x", "3.50 ms, 3 fs ops", "5.00 ms, 6 fs ops"]
    assert "10,000" in got[0].name and "1,000 names" in got[0].name
    assert [t.met for t in dirscenarios.targets({}, dplan, 0.001)] == [None] * 4


def test_directory_rows_join_the_table() -> None:
    dplan = dirscenarios.DIR_PLANS["full"]
    metrics = report.metrics_for((1,)) + dirscenarios.metrics(dplan, 0.001)
    keys = [m.key for m in metrics]
    assert len(keys) == len(set(keys))
    results = {"ours": {"flat_spread_rps": [95.0, 105.0], "fs_actimeo1_changed_ops": [7.0]}}
    text = report.render(results, metrics, report.ratios(results, metrics), [], {})
    assert "manifest GET, 1,000 names, flat dir of 10,000" in text and "95 / 100" in text
    assert "FUSE 1 ms actimeo=1, dir of 1,000: manifest after a replace by rename" not in text
    ops_rows = [line.split() for line in text.splitlines() if "its fs operations" in line]
    assert ops_rows == [["...", "its", "fs", "operations", "ops", "7", "/", "7", *["-"] * 4]]


def test_unknown_scenarios_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run.main(["--scenario", "compare,bogus"])
    assert "unknown scenarios: bogus" in capsys.readouterr().err
