"""The alerts of deploy/kubernetes/components/monitoring against what a real server exports.

A registry started as the DaemonSet runs it (several workers, so prometheus-client's
multiprocess mode, and a blob cache) answers a few pulls, probes and one bad archive; its
/metrics, parsed by prometheus-client's own parser, then holds every sample name the alerts may
select. An alert naming a metric, or a label value, the server does not export fails here.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Final

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.images import StandardImages
from tests.server import RegistryProcess
from tests.test_monitoring import (
    ALLOWED_FOREIGN_METRICS,
    COMPONENT,
    alerts,
    label_matchers,
    metric_names,
)

# Labels the Prometheus Operator puts on every target (and the ServiceMonitor's relabeling adds
# node): an alert may select on them although /metrics does not carry them.
TARGET_LABELS: Final = frozenset({"job", "instance", "namespace", "service", "pod", "container",
                                  "endpoint", "node"})
# Label values that only a failure produces (a 5xx status): their label must exist, any value
# may be selected.
FAILURE_LABELS: Final = frozenset({"status"})


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _exported(process: RegistryProcess, images: StandardImages) -> dict[str, set[frozenset[
        tuple[str, str]]]]:
    """Sample name -> label sets, after requests of every kind the alerts look at."""
    (name_tag, digest), *_ = images.manifests.items()
    name = name_tag.partition(":")[0]
    layer = images.layers[name_tag][0]
    statuses = [_get(process.url + path)[0] for path in (
        "/v2/", "/healthz", "/readyz", f"/v2/{name}/manifests/{digest}",
        f"/v2/{name}/blobs/{layer}", "/v2/broken/manifests/latest", "/v2/_catalog")]
    assert statuses[:5] == [200] * 5, statuses
    status, body = _get(process.url + "/metrics")
    assert status == 200
    samples: dict[str, set[frozenset[tuple[str, str]]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).add(frozenset(sample.labels.items()))
    return samples


def test_alerts_select_only_what_the_server_exports(
        standard_images: StandardImages, tmp_path: Path) -> None:
    (standard_images.root / "broken.oci").write_bytes(b"not a tar archive")
    with RegistryProcess(standard_images.root, "--workers", "2",
                         log_path=tmp_path / "registry.log") as process:
        exported = _exported(process, standard_images)
    assert "registry_http_requests_total" in exported  # the scrape is what the test thinks
    allowed = ALLOWED_FOREIGN_METRICS
    for alert in alerts():
        unknown = metric_names(alert["expr"]) - exported.keys() - allowed
        assert not unknown, f"{alert['alert']} names metrics the server does not export: {unknown}"
        for metric, label, operator, value in label_matchers(alert["expr"]):
            if metric in allowed or label in TARGET_LABELS - {"endpoint"}:
                continue
            seen = {dict(labels).get(label) for labels in exported[metric]}
            assert seen - {None}, f"{alert['alert']}: {metric} has no label {label}"
            if operator == "=" and label not in FAILURE_LABELS:
                assert value in seen, f"{alert['alert']}: {metric}{{{label}}} is never {value!r}"


def test_registry_labels_survive_the_scrape(standard_images: StandardImages,
                                            tmp_path: Path) -> None:
    """A label the registry exports that the operator also sets on targets needs honorLabels."""
    with RegistryProcess(standard_images.root, log_path=tmp_path / "registry.log") as process:
        exported = _exported(process, standard_images)
    clashes = {label for label_sets in exported.values() for labels in label_sets
               for label, _ in labels} & (TARGET_LABELS - {"node"})
    (monitor,) = yaml.safe_load_all((COMPONENT / "servicemonitor.yaml").read_text())
    (endpoint,) = monitor["spec"]["endpoints"]
    assert not clashes or endpoint.get("honorLabels") is True, clashes
