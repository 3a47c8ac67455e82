"""Shared fixtures: the standard images, a running registry process, and client helpers."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import RawTestServer, TestClient

from simple_oci_registry.app import Registry, make_app
from simple_oci_registry.config import Config
from tests.images import StandardImages, build_standard_images
from tests.server import RegistryProcess


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long soak tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="long soak: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "images"
    directory.mkdir()
    return directory


@pytest.fixture
def standard_images(image_dir: Path) -> StandardImages:
    return build_standard_images(image_dir)


@pytest.fixture(scope="session")
def shared_images(tmp_path_factory: pytest.TempPathFactory) -> StandardImages:
    """Standard images for read-only tests, built once per session."""
    return build_standard_images(tmp_path_factory.mktemp("shared") / "images")


@pytest.fixture
def start_registry(tmp_path: Path) -> Iterator[Callable[..., RegistryProcess]]:
    """Start real registry processes (``start_registry(directory, *flags)``), each with its
    own log file so log assertions see only its lines; all are stopped afterwards."""
    started: list[RegistryProcess] = []

    def start(directory: Path, *args: str) -> RegistryProcess:
        log_path = tmp_path / f"registry-{len(started)}.log"
        started.append(RegistryProcess(directory, *args, log_path=log_path).start())
        return started[-1]

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def shared_registry(shared_images: StandardImages) -> Iterator[RegistryProcess]:
    """One registry process over the shared images, for tests that only read."""
    with RegistryProcess(shared_images.root) as process:
        yield process


def require(tool: str) -> str:
    """The path of an external client, or skip with the reason (CI installs them all)."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it)")
    return path


RegistryClient = Callable[[Config], Awaitable[TestClient]]  # type: ignore[type-arg]


@pytest.fixture
async def registry_client(
    aiohttp_client: Callable[..., Awaitable[TestClient]],  # type: ignore[type-arg]
) -> AsyncIterator[RegistryClient]:
    """In-process clients of ``make_app(config)``, served by aiohttp's low-level server as
    the CLI serves it; the registry's background tasks run for the test's duration."""
    registries: list[Registry] = []

    async def make(config: Config) -> TestClient:  # type: ignore[type-arg]
        registry = make_app(config)
        await registry.startup()
        registries.append(registry)
        return await aiohttp_client(RawTestServer(registry.handle))

    yield make
    for registry in registries:
        await registry.cleanup()
