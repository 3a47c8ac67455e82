"""The multi-worker supervisor gives up on workers that cannot start (real processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_workers_failing_at_start_make_the_supervisor_exit(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    bogus = tmp_path / "not-a-certificate.pem"
    bogus.write_text("this is not PEM\n")
    result = subprocess.run(
        [sys.executable, "-m", "simple_oci_registry", "serve", "--dir", str(images),
         "--listen", "127.0.0.1:0", "--workers", "2", "--tls-cert", str(bogus),
         "--tls-key", str(bogus)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "giving up" in result.stderr
    assert "serving" in result.stdout  # it did start, and then stopped on its own
