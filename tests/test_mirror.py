"""Mirror requests map upstream names onto host folders; bad ns values never pass."""

from __future__ import annotations

import pytest

from simple_oci_registry.errors import ErrorCode, RegistryError
from simple_oci_registry.mirror import display_name, repository_name, repository_of
from simple_oci_registry.reference import parse_image_reference


@pytest.mark.parametrize("path, ns, expected", [
    # containerd: the path as upstream knows it, the upstream host in ns
    ("library/nginx", "docker.io", "docker.io/library/nginx"),
    ("pause", "registry.k8s.io", "registry.k8s.io/pause"),
    ("prometheus/node-exporter", "quay.io", "quay.io/prometheus/node-exporter"),
    # Docker Hub's aliases, and library/ for its single-component names
    ("library/nginx", "index.docker.io", "docker.io/library/nginx"),
    ("library/nginx", "registry-1.docker.io", "docker.io/library/nginx"),
    ("nginx", "docker.io", "docker.io/library/nginx"),
    # host names are case-insensitive; a port becomes _port (":" is not allowed in names)
    ("prometheus/node-exporter", "Quay.IO", "quay.io/prometheus/node-exporter"),
    ("team/app", "localhost:5000", "localhost_5000/team/app"),
    ("team/app", "registry.example.com:8443", "registry.example.com_8443/team/app"),
    # containerd with override_path: the path already names the host
    ("docker.io/library/nginx", "docker.io", "docker.io/library/nginx"),
    # containers/image: the host in the path, no ns
    ("docker.io/library/nginx", None, "docker.io/library/nginx"),
    ("docker.io/nginx", None, "docker.io/library/nginx"),
    ("index.docker.io/library/nginx", None, "docker.io/library/nginx"),
    ("registry.k8s.io/pause", None, "registry.k8s.io/pause"),
    # everything else without ns is the name as it always was
    ("app", None, "app"),
    ("team/app", None, "team/app"),
    ("docker.io", None, "docker.io"),
    ("library/nginx", None, "library/nginx"),
])
def test_repository_name(path: str, ns: str | None, expected: str) -> None:
    assert repository_name(path, ns) == expected


@pytest.mark.parametrize("ns", [
    "", "a/b", "..", "../etc", "a..b", "x" * 256, "[::1]:5000", "host:99999", "host:0",
    "-a.com", "a.com-", "a b", "a%2fb", "host:", ":5000", "a_b.com", "host\x00", "*.com",
])
def test_bad_ns_is_name_invalid(ns: str) -> None:
    with pytest.raises(RegistryError) as caught:
        repository_name("library/nginx", ns)
    assert caught.value.code is ErrorCode.NAME_INVALID
    assert caught.value.status == 400
    assert "invalid ns parameter" in caught.value.message


def test_ns_with_an_over_long_result_is_name_invalid() -> None:
    with pytest.raises(RegistryError) as caught:
        repository_name("a" * 250, "docker.io")
    assert caught.value.code is ErrorCode.NAME_INVALID


@pytest.mark.parametrize("text, name", [
    ("nginx", "docker.io/library/nginx:latest"),
    ("nginx:1.25", "docker.io/library/nginx:1.25"),
    ("docker.io/nginx:1.25", "docker.io/library/nginx:1.25"),
    ("index.docker.io/library/nginx", "docker.io/library/nginx:latest"),
    ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
    ("registry.k8s.io/pause:3.9", "registry.k8s.io/pause:3.9"),
    ("localhost:5000/team/app:1", "localhost:5000/team/app:1"),
    ("quay.io/prometheus/node-exporter:v1.8.0", "quay.io/prometheus/node-exporter:v1.8.0"),
    ("busybox@sha256:" + "a" * 64, "docker.io/library/busybox@sha256:" + "a" * 64),
    ("busybox:1.36@sha256:" + "a" * 64, "docker.io/library/busybox@sha256:" + "a" * 64),
])
def test_references_normalise_like_runtimes(text: str, name: str) -> None:
    assert str(parse_image_reference(text)) == name


def test_references_map_to_their_host_folder() -> None:
    assert repository_of(parse_image_reference("nginx")) == "docker.io/library/nginx"
    assert repository_of(parse_image_reference("localhost:5000/a")) == "localhost_5000/a"


@pytest.mark.parametrize("name, shown", [
    ("localhost_5000/team/app", "localhost:5000/team/app"),
    ("registry.example.com_8443/app", "registry.example.com:8443/app"),
    ("docker.io/library/nginx", "docker.io/library/nginx"),
    ("team_1/app", "team_1/app"),  # not a host folder: shown as it is
    ("app", "app"),
])
def test_display_name(name: str, shown: str) -> None:
    assert display_name(name) == shown
