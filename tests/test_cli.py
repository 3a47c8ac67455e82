"""Command-line flags and their SOR_* environment twins (cli.py), without starting a server."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from simple_oci_registry import cli
from simple_oci_registry.cli import build_parser, config_from_args, listen_arg
from simple_oci_registry.config import DEFAULTS, Config


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SOR_"):
            monkeypatch.delenv(key)


def config_of(*argv: str) -> Config:
    return config_from_args(build_parser().parse_args(["serve", *argv]))


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Parse ``argv``; it must fail the argparse way (exit status 2) and say why on stderr."""
    with pytest.raises(SystemExit) as info:
        config_of(*argv)
    assert info.value.code == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------- --listen


@pytest.mark.parametrize(("value", "expected"), [
    ("0.0.0.0:5000", ("0.0.0.0", 5000)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    (":8080", ("0.0.0.0", 8080)),
    ("localhost:65535", ("localhost", 65535)),
    ("[::1]:5000", ("::1", 5000)),
    ("[::]:443", ("::", 443)),
    ("registry.local:5000", ("registry.local", 5000)),
])
def test_listen(value: str, expected: tuple[str, int]) -> None:
    assert listen_arg(value) == expected


@pytest.mark.parametrize("value", ["5000", "host:", "host:65536", "host:-1", "host:abc", "",
                                   "host:5000x", "[::1]", "host: 80"])
def test_bad_listen(value: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="HOST:PORT"):
        listen_arg(value)
    err = usage_error(capsys, "--dir", str(tmp_path), "--listen", value)
    assert "--listen" in err and "HOST:PORT" in err


def test_listen_reaches_the_config(tmp_path: Path) -> None:
    config = config_of("--dir", str(tmp_path), "--listen", "[::1]:0")
    assert (config.host, config.port) == ("::1", 0)
    default = config_of("--dir", str(tmp_path))
    assert f"{default.host}:{default.port}" == DEFAULTS.listen


# --------------------------------------------------------------------------- --dir


def test_dir_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "images").mkdir()
    monkeypatch.chdir(tmp_path)
    assert config_of("--dir", "images").directory == (tmp_path / "images").resolve()
    # The default, ./images, is checked like a given value.
    assert config_of().directory == (tmp_path / "images").resolve()


def test_missing_dir_is_a_clear_usage_error(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(capsys, "--dir", str(tmp_path / "nope"))
    assert "argument --dir" in err and "does not exist" in err and "nope" in err
    (tmp_path / "file").write_text("")
    err = usage_error(capsys, "--dir", str(tmp_path / "file"))
    assert "not a directory" in err


def test_missing_default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # no ./images here
    err = usage_error(capsys)
    assert "images" in err and "does not exist" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any directory")
def test_unreadable_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o000)
    try:
        assert "not readable" in usage_error(capsys, "--dir", str(locked))
    finally:
        locked.chmod(0o700)


# --------------------------------------------------------------------------- env twins


def test_every_flag_has_an_env_twin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key, htpasswd = (tmp_path / n for n in ("cert.pem", "key.pem", "htpasswd"))
    for f in (cert, key, htpasswd):
        f.write_text("x")
    env = {
        "SOR_DIR": str(tmp_path), "SOR_LISTEN": "127.0.0.1:5001", "SOR_WORKERS": "3",
        "SOR_RESCAN_INTERVAL": "30", "SOR_FRESHNESS_WINDOW": "0",
        "SOR_TLS_CERT": str(cert), "SOR_TLS_KEY": str(key), "SOR_LOG_LEVEL": "DEBUG",
        "SOR_SHUTDOWN_TIMEOUT": "5", "SOR_LOG_FORMAT": "json", "SOR_ACCESS_LOG": "off",
        "SOR_CACHE_DIR": str(tmp_path / "cache"), "SOR_CACHE_MAX_BYTES": "1024",
        "SOR_HTPASSWD": str(htpasswd), "SOR_MAX_CONNECTIONS": "7",
        "SOR_ALLOW_OUTSIDE_SYMLINKS": "yes",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = config_of()
    assert config == Config(
        directory=tmp_path.resolve(), host="127.0.0.1", port=5001, workers=3,
        rescan_interval=30.0, tls_cert=cert.resolve(),
        tls_key=key.resolve(), log_level="debug", log_format="json", access_log=False,
        shutdown_timeout=5.0, cache_dir=tmp_path / "cache", cache_max_bytes=1024,
        htpasswd=htpasswd.resolve(), max_connections=7, allow_outside_symlinks=True)


def test_help_names_every_env_twin(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "--help"])
    assert info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # undo line wrapping
    for name in ("SOR_DIR", "SOR_LISTEN", "SOR_WORKERS", "SOR_RESCAN_INTERVAL",
                 "SOR_FRESHNESS_WINDOW", "SOR_GRACE_PERIOD", "SOR_TLS_CERT", "SOR_TLS_KEY",
                 "SOR_LOG_LEVEL",
                 "SOR_SHUTDOWN_TIMEOUT", "SOR_LOG_FORMAT", "SOR_ACCESS_LOG", "SOR_CACHE_DIR",
                 "SOR_CACHE_MAX_BYTES", "SOR_HTPASSWD", "SOR_MAX_CONNECTIONS",
                 "SOR_ALLOW_OUTSIDE_SYMLINKS"):
        assert f"[env {name};" in help_text


def test_flags_override_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("SOR_DIR", str(tmp_path))
    monkeypatch.setenv("SOR_WORKERS", "3")
    monkeypatch.setenv("SOR_ACCESS_LOG", "false")
    monkeypatch.setenv("SOR_GRACE_PERIOD", "9")
    config = config_of("--dir", str(other), "--workers", "2", "--access-log",
                       "--grace-period", "0.5")
    assert config.directory == other.resolve()
    assert config.workers == 2
    assert config.access_log is True
    assert config.grace_period == 0.5


def test_retired_freshness_window_is_accepted_and_ignored(tmp_path: Path) -> None:
    config = config_of("--dir", str(tmp_path), "--freshness-window", "5")
    assert config == config_of("--dir", str(tmp_path))


def test_env_dir_is_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SOR_DIR", str(tmp_path / "missing"))
    assert "does not exist" in usage_error(capsys)


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--workers", "-1", "must not be negative"),
    ("--workers", "two", "expected a number"),
    ("--workers", "1.5", "expected a number"),
    ("--rescan-interval", "-5", "must not be negative"),
    ("--freshness-window", "soon", "expected a number"),
    ("--cache-max-bytes", "-1", "must not be negative"),
    ("--log-level", "verbose", "invalid choice"),
    ("--log-format", "xml", "invalid choice"),
    ("--tls-cert", "/nonexistent/cert.pem", "not a readable file"),
])
def test_bad_values_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     flag: str, value: str, message: str) -> None:
    err = usage_error(capsys, "--dir", str(tmp_path), flag, value)
    assert flag in err and message in err


def test_bad_env_values_are_usage_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SOR_WORKERS", "-3")
    assert "must not be negative" in usage_error(capsys, "--dir", str(tmp_path))


def test_workers_zero_means_one(tmp_path: Path) -> None:
    assert config_of("--dir", str(tmp_path), "--workers", "0").workers == 1


def test_tls_cert_and_key_go_together(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(SystemExit) as info:
        config_of("--dir", str(tmp_path), "--tls-cert", str(cert))
    assert "--tls-cert and --tls-key go together" in str(info.value.code)


@pytest.mark.parametrize(("value", "expected"), [
    ("1", True), ("true", True), ("YES", True), (" on ", True),
    ("0", False), ("false", False), ("No", False), ("off", False), ("", False),
])
def test_boolean_env_spellings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str,
                               expected: bool) -> None:
    monkeypatch.setenv("SOR_ALLOW_OUTSIDE_SYMLINKS", value)
    assert config_of("--dir", str(tmp_path)).allow_outside_symlinks is expected


def test_no_subcommand_means_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[Config] = []

    def fake_serve(config: Config) -> int:
        served.append(config)
        return 0

    monkeypatch.setattr(cli, "serve", fake_serve)
    assert cli.main(["--dir", str(tmp_path), "--listen", "127.0.0.1:0"]) == 0
    assert cli.main(["serve", "--dir", str(tmp_path)]) == 0
    assert [c.port for c in served] == [0, 5000]
    assert served[0].directory == tmp_path.resolve()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("simple-oci-registry ")


# --------------------------------------------------------------------------- env validation


@pytest.mark.parametrize(("name", "value"), [("SOR_LOG_LEVEL", "verbose"),
                                             ("SOR_LOG_FORMAT", "xml")])
def test_env_values_are_checked_against_choices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str], name: str,
                                                value: str) -> None:
    monkeypatch.setenv(name, value)
    assert "invalid choice" in usage_error(capsys, "--dir", str(tmp_path))


def test_bad_boolean_env_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SOR_ACCESS_LOG", "maybe")
    assert "maybe" in usage_error(capsys, "--dir", str(tmp_path))


@pytest.mark.parametrize("flag", ["--rescan-interval", "--freshness-window",
                                  "--shutdown-timeout"])
def test_nan_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              flag: str) -> None:
    usage_error(capsys, "--dir", str(tmp_path), flag, "nan")


@pytest.mark.parametrize(("cpu_max", "expected_cap"), [
    ("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1), ("garbage", None),
])
def test_default_workers_follow_affinity_and_cgroup_quota(
        tmp_path: Path, cpu_max: str, expected_cap: int | None) -> None:
    quota_file = tmp_path / "cpu.max"
    quota_file.write_text(cpu_max)
    available = len(os.sched_getaffinity(0))
    expected = available if expected_cap is None else min(available, expected_cap)
    assert cli.default_workers(str(quota_file)) == expected
    assert cli.default_workers(str(tmp_path / "missing")) == available
