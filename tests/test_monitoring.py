"""The monitoring component: deploy/kubernetes/components/monitoring.

The PrometheusRule's alerts are checked by ``promtool check rules`` and run through the alert
scenarios of tests/prometheusrule_test.yaml with ``promtool test rules``; the component is
rendered with the base by ``kubectl kustomize`` and the Service, ServiceMonitor and rules are
checked against the DaemonSet they watch. That every metric an alert names is one the server
exports is checked against a real server in tests/test_monitoring_functional.py, with the
helpers here that read metric names and label matchers out of PromQL.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
COMPONENT = K8S / "components" / "monitoring"
SCENARIOS = Path(__file__).with_name("prometheusrule_test.yaml")

Doc = dict[str, Any]

# Names an alert may use although the server does not export them (yet).
ALLOWED_FOREIGN_METRICS: Final = frozenset({
    "up",  # written by Prometheus for every scrape target
})

# PromQL words that look like identifiers but name no metric.
_KEYWORDS: Final = frozenset({"and", "or", "unless", "by", "without", "on", "ignoring",
                              "group_left", "group_right", "offset", "bool", "atan2", "inf",
                              "nan"})
_STRING: Final = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_LABEL_LIST: Final = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER: Final = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")
_SELECTOR: Final = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER: Final = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"')


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a selector's bare name, not __name__=)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = _LABEL_LIST.sub(" ", text)  # grouping and matching label lists
    return {m[1] for m in _IDENTIFIER.finditer(text)
            if m[2] is None and m[1].lower() not in _KEYWORDS}


def label_matchers(expr: str) -> set[tuple[str, str, str, str]]:
    """(metric, label, operator, value) for every matcher written in a selector's braces."""
    return {(selector[1], matcher[1], matcher[2], matcher[3])
            for selector in _SELECTOR.finditer(expr)
            for matcher in _MATCHER.finditer(selector[2])}


def _load(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _one(path: Path) -> Doc:
    (doc,) = _load(path)
    return doc


def rules_spec() -> Doc:
    """The PrometheusRule's spec: what Prometheus reads as a rule file."""
    rule = _one(COMPONENT / "prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule"
    spec: Doc = rule["spec"]
    return spec


def alerts() -> list[Doc]:
    return [rule for group in rules_spec()["groups"] for rule in group["rules"] if "alert" in rule]


# --------------------------------------------------------------------------- PromQL helpers

@pytest.mark.parametrize(("expr", "names"), [
    ('up{job="x"} == 0', {"up"}),
    ('sum by (job, instance) (rate(a_total{status=~"5..", x="by (y)"}[5m])) / '
     'sum without (le) (b_total offset 5m) > 0.05', {"a_total", "b_total"}),
    ("max by (i) (g{s=\"p\"}) > 0 and on (i) changes(t[15m:1m]) == 0 or vector(1e3)",
     {"g", "t"}),
    ("absent(up) unless ignoring(node) group_left(pod) c:recorded:rate5m", {"up",
                                                                             "c:recorded:rate5m"}),
    ("histogram_quantile(0.99, sum by (le) (rate(d_bucket[5m]))) > bool 1", {"d_bucket"}),
])
def test_metric_names_of_an_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_label_matchers_of_an_expression() -> None:
    assert label_matchers('rate(a_total{job="x", status=~"5..", e!="readyz"}[5m]) / b') == {
        ("a_total", "job", "=", "x"), ("a_total", "status", "=~", "5.."),
        ("a_total", "e", "!=", "readyz")}


def test_every_alert_names_a_metric() -> None:
    for alert in alerts():
        assert metric_names(alert["expr"]), alert["alert"]


def test_every_alert_selects_the_registry_job(rendered: list[Doc]) -> None:
    """Other software exports registry_http_* too (CNCF distribution): select our job."""
    (service,) = _kind(rendered, "Service")
    job = service["metadata"]["name"]  # the operator's default job label
    for alert in alerts():
        selected = {m for m in label_matchers(alert["expr"]) if m[1:] == ("job", "=", job)}
        assert {m[0] for m in selected} == metric_names(alert["expr"]), alert["alert"]


def test_every_alert_says_what_and_how_bad() -> None:
    names = [alert["alert"] for alert in alerts()]
    assert len(names) == len(set(names))
    for alert in alerts():
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}
        assert {"summary", "description"} <= alert["annotations"].keys()


def _doc_section() -> str:
    doc = (ROOT / "docs" / "operations.md").read_text()
    start = doc.index("## Monitoring")
    return doc[start:doc.index("\n## ", start)]


def test_alerts_are_documented() -> None:
    section = _doc_section()
    for alert in alerts():
        assert f"`{alert['alert']}`" in section, alert["alert"]


# --------------------------------------------------------------------------- promtool

def _rule_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"  # the name tests/prometheusrule_test.yaml refers to
    path.write_text(yaml.safe_dump(rules_spec(), sort_keys=False))
    return path


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian package prometheus)")
def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    out = subprocess.run(["promtool", "check", "rules", str(_rule_file(tmp_path))],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in out.stdout


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian package prometheus)")
def test_alert_scenarios(tmp_path: Path) -> None:
    """Each alert fires where it should, with its text, and not where it should not."""
    _rule_file(tmp_path)
    shutil.copy(SCENARIOS, tmp_path / SCENARIOS.name)
    out = subprocess.run(["promtool", "test", "rules", str(tmp_path / SCENARIOS.name)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    tested = {t["alertname"] for test in _one(SCENARIOS)["tests"]
              for t in test["alert_rule_test"] if t["exp_alerts"]}
    assert tested == {alert["alert"] for alert in alerts()}, "an alert has no firing scenario"


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian package prometheus)")
def test_alert_scenarios_catch_a_rule_that_never_fires(tmp_path: Path) -> None:
    """The scenarios expect alerts: rules that never fire fail them."""
    spec = rules_spec()
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule["expr"] = f"({rule['expr']}) and on () vector(0) > 1"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(SCENARIOS, tmp_path / SCENARIOS.name)
    out = subprocess.run(["promtool", "test", "rules", str(tmp_path / SCENARIOS.name)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "FAILED" in out.stdout + out.stderr


# --------------------------------------------------------------------------- kustomize

def _kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def test_component_lists_its_files() -> None:
    kustomization = _one(COMPONENT / "kustomization.yaml")
    assert kustomization["kind"] == "Component"
    local = {p.name for p in COMPONENT.iterdir() if p.name != "kustomization.yaml"}
    assert set(kustomization["resources"]) == local


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    """The base with the component, as an operator's overlay would add it."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed")
    tree = tmp_path_factory.mktemp("monitoring") / "kubernetes"
    shutil.copytree(K8S, tree)
    site = tree / "overlays" / "site"
    site.mkdir()
    site.joinpath("kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../../base"], "components": ["../../components/monitoring"]}))
    out = subprocess.run(["kubectl", "kustomize", str(site)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_service_finds_every_registry_pod(rendered: list[Doc]) -> None:
    (ds,) = _kind(rendered, "DaemonSet")
    (service,) = _kind(rendered, "Service")
    assert service["metadata"]["namespace"] == ds["metadata"]["namespace"]
    spec = service["spec"]
    assert spec["clusterIP"] == "None"  # headless: each endpoint is one node
    assert spec["publishNotReadyAddresses"] is True  # a pod that is not ready is still scraped
    assert _selects(spec["selector"], ds["spec"]["template"]["metadata"]["labels"])
    (port,) = spec["ports"]
    (registry,) = [c for c in ds["spec"]["template"]["spec"]["containers"]
                   if c["name"] == "registry"]
    (container_port,) = [p for p in registry["ports"] if p["name"] == port["targetPort"]]
    assert port["port"] == container_port["containerPort"] == 5000


def test_service_monitor_scrapes_the_service(rendered: list[Doc]) -> None:
    (service,) = _kind(rendered, "Service")
    (monitor,) = _kind(rendered, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert _selects(spec["selector"]["matchLabels"], service["metadata"]["labels"])
    assert service["metadata"]["namespace"] in spec["namespaceSelector"]["matchNames"]
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_everything_lands_in_the_registry_namespace(rendered: list[Doc]) -> None:
    for doc in rendered:
        if doc["kind"] not in {"Namespace", "PriorityClass"}:  # cluster-scoped
            assert doc["metadata"]["namespace"] == "simple-oci-registry", doc["kind"]


def test_rule_is_the_component_file(rendered: list[Doc]) -> None:
    (rule,) = _kind(rendered, "PrometheusRule")
    assert rule["spec"] == rules_spec()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("tls", [False, True], ids=["http", "tls"])
def test_documented_overlay(tmp_path: Path, tls: bool) -> None:
    """The overlay docs/operations.md, Monitoring, tells operators to write (and its TLS patch)."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", _doc_section(), re.MULTILINE | re.DOTALL)
    where = re.search(r"`deploy/kubernetes/(overlays/[\w-]+)/kustomization\.yaml`", _doc_section())
    assert where and len(blocks) == 2, "the Monitoring section no longer shows its overlay"
    overlay = yaml.safe_load(blocks[0])
    if tls and not (K8S / "components" / "tls").is_dir():
        pytest.skip("components/tls not in this tree yet (it comes with branch h13fix)")
    if tls:
        overlay["components"].append("../../components/tls")
        overlay["patches"] += yaml.safe_load(textwrap.dedent(blocks[1]))
    tree = tmp_path / "kubernetes"
    shutil.copytree(K8S, tree)
    (tree / where[1]).mkdir()
    (tree / where[1] / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    out = subprocess.run(["kubectl", "kustomize", str(tree / where[1])], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for kind in ("ServiceMonitor", "PrometheusRule"):
        (doc,) = _kind(docs, kind)
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (monitor,) = _kind(docs, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    (ds,) = _kind(docs, "DaemonSet")
    probe = ds["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    assert endpoint["scheme"] == probe.get("scheme", "HTTP").lower()
    if tls:
        secret = ds["spec"]["template"]["spec"]["volumes"]
        assert {"secretName": "simple-oci-registry-tls", "defaultMode": 0o440} in [
            v.get("secret") for v in secret]
        assert endpoint["tlsConfig"]["ca"]["secret"] == {"name": "simple-oci-registry-tls",
                                                         "key": "ca.crt"}
