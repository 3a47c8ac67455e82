"""Run-time configuration: one frozen value built once from flags and environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

__all__ = ["DEFAULTS", "Config", "Defaults"]


@dataclass(frozen=True, slots=True)
class Defaults:
    """Every default in one place (the CLI's help text and the tests read them from here)."""

    directory: str = "./images"
    listen: str = "0.0.0.0:5000"
    rescan_interval: float = 600.0
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"
    cache_dir: str = "/var/cache/simple-oci-registry"
    cache_max_bytes: int = 10 << 30
    shutdown_timeout: float = 25.0
    max_connections: int = 4096
    grace_period: float = 300.0
    prepare_read_rate: int = 0


DEFAULTS: Final = Defaults()


@dataclass(frozen=True, slots=True)
class Config:
    """What one registry process needs to know; shared by the CLI and the tests via make_app."""

    directory: Path
    host: str = "0.0.0.0"
    port: int = 5000
    rescan_interval: float = DEFAULTS.rescan_interval
    tls_cert: Path | None = None
    tls_key: Path | None = None
    log_level: str = DEFAULTS.log_level
    log_format: Literal["text", "json"] = DEFAULTS.log_format
    access_log: bool = True
    workers: int = 1
    cache_dir: Path | None = None
    cache_max_bytes: int = DEFAULTS.cache_max_bytes
    allow_outside_symlinks: bool = False
    htpasswd: Path | None = None
    shutdown_timeout: float = DEFAULTS.shutdown_timeout
    max_connections: int = DEFAULTS.max_connections
    # How long a replaced or removed archive's digests stay downloadable (pins.py).
    grace_period: float = DEFAULTS.grace_period
    # Compressed archives indexed into the blob cache in the background (preparation.py), and
    # the compressed bytes per second that work may read (0: unbounded).
    prepare_ahead: bool = True
    prepare_read_rate: int = DEFAULTS.prepare_read_rate
    # The worker's end of its socket pair to the supervisor's pin table (None: one process).
    pin_socket_fd: int | None = None

    @property
    def root(self) -> str:
        """The image directory as an absolute, symlink-resolved path string."""
        return os.path.realpath(self.directory)
