"""deploy/monitoring validates offline: the alert rules have Prometheus' rule-file structure (and
the PrometheusRule manifest holds the same groups), every PromQL expression parses with Prometheus'
own promtool, the alerts fire on drift and not without it (promtool's rule unit tests), every metric
named exists in a real server's /metrics, and the dashboard has the structure Grafana requires."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"
RULES = MONITORING / "bnserve-drift-rules.yml"
OPERATOR = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "bnserve-drift-dashboard.json"


def promtool() -> str:
    """Prometheus' own PromQL parser and rule checker, from Debian's `prometheus` package (`make
    test` installs it when it is missing). Not a skip: without it the rules are unchecked."""
    found = shutil.which("promtool")
    assert found, "promtool is not installed: apt-get install --no-install-recommends prometheus"
    return found

_RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
_METRIC = re.compile(r"\b(bnserve_[a-z_]+)\b")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def rules() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return doc


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def rule_exprs() -> list[str]:
    return [r["expr"] for g in rules()["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


def metric_names(expr: str) -> set[str]:
    """The bnserve metrics an expression reads (label values in quotes left out)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def test_rule_file_has_prometheus_rule_file_structure() -> None:
    doc = rules()
    assert set(doc) == {"groups"}
    names = [g["name"] for g in doc["groups"]]
    assert len(names) == len(set(names)), "group names must be unique in a file"
    alerts = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"}
        assert group["rules"], f"group {group['name']} has no rules"
        for rule in group["rules"]:
            assert set(rule) <= _RULE_KEYS, set(rule) - _RULE_KEYS
            assert ("alert" in rule) != ("record" in rule), "a rule is an alert or a record"
            assert isinstance(rule["expr"], str)
            assert rule["expr"].strip()
            if "for" in rule:
                assert _DURATION.match(rule["for"]), rule["for"]
            for key in ("labels", "annotations"):
                assert all(isinstance(k, str) and isinstance(v, str)
                           for k, v in rule.get(key, {}).items())
            alerts.append(rule.get("alert"))
    assert "BnserveInputDrift" in alerts


def test_prometheus_rule_manifest_holds_the_same_groups() -> None:
    manifest = yaml.safe_load(OPERATOR.read_text())
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["kind"] == "PrometheusRule"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])
    assert manifest["spec"] == rules()


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60,
                          check=False)


def _as_recording_rules(exprs: list[str], path: Path) -> Path:
    """Expressions as recording rules: ``promtool check rules`` then parses each one."""
    doc = {"groups": [{"name": "exprs", "rules": [
        {"record": f"bnserve:check:{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_every_promql_expression_parses(tmp_path: Path) -> None:
    checked = _promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in checked.stdout
    panels = _promtool("check", "rules", str(_as_recording_rules(dashboard_exprs(),
                                                                tmp_path / "d.yml")))
    assert panels.returncode == 0, panels.stdout + panels.stderr
    # the check can fail: an unbalanced expression is refused
    broken = _promtool("check", "rules", str(_as_recording_rules(
        ["max by (group (bnserve_drift_mean_shift)"], tmp_path / "broken.yml")))
    assert broken.returncode != 0


def test_input_drift_alert_fires_after_ten_minutes_of_drift_only(tmp_path: Path) -> None:
    """promtool's rule unit test: one pod drifts (mean shift 0.2 then 3), one does not."""
    tests = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": 'bnserve_drift_mean_shift{group="input", instance="quiet"}',
             "values": "0.2x40"},
            {"series": 'bnserve_drift_mean_shift{group="input", instance="drifting"}',
             "values": "0.2x9 3x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "15m", "alertname": "BnserveInputDrift", "exp_alerts": []},
            {"eval_time": "25m", "alertname": "BnserveInputDrift", "exp_alerts": [{
                "exp_labels": {"severity": "warning", "group": "input",
                               "instance": "drifting"},
                "exp_annotations": {
                    "summary": "Inputs served by drifting have drifted from the training data",
                    "description": next(r for g in rules()["groups"] for r in g["rules"]
                                        if r.get("alert") == "BnserveInputDrift")[
                        "annotations"]["description"].replace(
                        '{{ $value | printf "%.2f" }}', "3.00")}}]},
        ],
    }]}
    path = tmp_path / "tests.yml"
    path.write_text(yaml.safe_dump(tests))
    result = _promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_has_the_structure_grafana_requires() -> None:
    d = dashboard()
    assert isinstance(d["title"], str)
    assert d["title"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"])
    assert isinstance(d["schemaVersion"], int)
    assert d["schemaVersion"] >= 36  # panels with their own datasource objects
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        assert p["type"] in {"timeseries", "stat", "gauge", "table", "bargauge"}
        assert p["title"]
        assert set(p["gridPos"]) == {"x", "y", "w", "h"}
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24  # Grafana's grid is 24 wide
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert refs
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["expr"].strip()
            assert t.get("datasource", p["datasource"]) == p["datasource"]
        for var in re.findall(r"\$(\w+)", " ".join(t["expr"] for t in p["targets"])):
            assert var in variables, f"panel {p['title']!r} uses undefined ${var}"


@pytest.mark.slow
def test_every_metric_named_exists_in_a_real_servers_metrics(server: str) -> None:
    """The names the rules and the dashboard read, against a real bnserve-serve's /metrics
    (a model exported with its drift reference: every drift gauge is there from the start)."""
    text = httpx.get(server + "/metrics", timeout=10).text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    exposed = {s.name for s in samples}
    used = set().union(*map(metric_names, rule_exprs() + dashboard_exprs()))
    assert {"bnserve_drift_mean_shift", "bnserve_drift_feature_mean_shift"} <= used
    assert used <= exposed, sorted(used - exposed)
    groups = {s.labels["group"] for s in samples if s.name == "bnserve_drift_mean_shift"}
    assert "input" in groups  # the label value the input alerts select
    assert len(groups) > 1  # and batch-norm groups for BnserveActivationDrift
