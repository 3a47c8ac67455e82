"""Run-time configuration (config.py): one frozen value, defaults defined once."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from simple_oci_registry.config import DEFAULTS, Config


def test_defaults_come_from_one_place(tmp_path: Path) -> None:
    config = Config(directory=tmp_path)
    assert config.host == "0.0.0.0" and config.port == 5000
    assert DEFAULTS.listen == f"{config.host}:{config.port}"
    assert config.rescan_interval == DEFAULTS.rescan_interval == 600.0
    assert config.grace_period == DEFAULTS.grace_period == 300.0
    assert config.log_level == DEFAULTS.log_level == "info"
    assert config.log_format == DEFAULTS.log_format == "text"
    assert config.cache_max_bytes == DEFAULTS.cache_max_bytes == 10 << 30
    assert config.shutdown_timeout == DEFAULTS.shutdown_timeout
    assert config.max_connections == DEFAULTS.max_connections
    assert config.workers == 1
    assert config.access_log is True
    assert config.allow_outside_symlinks is False
    assert config.cache_dir is None and config.htpasswd is None
    assert config.tls_cert is None and config.tls_key is None


def test_shutdown_fits_the_pod_grace_period() -> None:
    # Kubernetes kills a pod 30 s after SIGTERM by default; draining must end before.
    assert DEFAULTS.shutdown_timeout < 30


def test_config_is_frozen(tmp_path: Path) -> None:
    config = Config(directory=tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]
    assert dataclasses.replace(config, port=1).port == 1


def test_root_is_absolute_and_symlink_resolved(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    config = Config(directory=Path("link"))
    assert config.root == os.path.realpath(real)
    assert os.path.isabs(config.root)
