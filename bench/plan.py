"""How big and how long each benchmark mode is: one frozen ``Plan`` per mode."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Final

__all__ = ["MIB", "PLANS", "Plan"]

MIB: Final[int] = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Plan:
    """Sizes, durations and repetition counts for one run of the benchmark."""

    mode: str
    layer_bytes: int
    """Size of the big layer's single file; the layer tar adds a few KiB of headers."""
    dir_sizes: tuple[int, ...]
    """How many archives each cold directory holds."""
    wrk_seconds: int
    single_reps: int
    concurrent_reps: int
    wrk_reps: int
    cold_reps: int
    gzip_reps: int
    warmup_seconds: int
    """Unrecorded load-generator run per endpoint and server before the measured ones."""
    real_archive_bytes: int
    """Real files (from /usr) in the gzip archive that times ISA-L against zlib."""
    concurrency: int = 32
    wrk_threads: int = 2
    wrk_connections: int = 64

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


PLANS: Final[dict[str, Plan]] = {
    "full": Plan(
        mode="full",
        layer_bytes=200 * MIB,
        dir_sizes=(100, 1_000, 10_000),
        wrk_seconds=5,
        single_reps=5,
        concurrent_reps=3,
        # Request rates swing by a third between 5 s runs on two shared cores (wrk and the
        # servers take turns): five runs give the median some footing.
        wrk_reps=5,
        cold_reps=3,
        gzip_reps=2,
        warmup_seconds=1,
        real_archive_bytes=300 * MIB,
    ),
    "quick": Plan(
        mode="quick",
        layer_bytes=32 * MIB,
        dir_sizes=(100, 1_000),
        wrk_seconds=2,
        single_reps=3,
        concurrent_reps=2,
        wrk_reps=2,
        cold_reps=2,
        gzip_reps=1,
        warmup_seconds=1,
        real_archive_bytes=24 * MIB,
    ),
    "tiny": Plan(
        mode="tiny",
        layer_bytes=1 * MIB,
        dir_sizes=(1, 3),
        wrk_seconds=1,
        single_reps=2,
        concurrent_reps=1,
        wrk_reps=1,
        cold_reps=1,
        gzip_reps=1,
        warmup_seconds=0,
        real_archive_bytes=2 * MIB,
    ),
}
