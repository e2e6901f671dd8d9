"""docker-compose.yml and deploy/k8s validate offline against their schemas, and agree with the app:
probe paths are real routes, ports are the service's port, threads fit the CPU limit, the drain fits
the termination grace period, and the pod runs as the image's non-root user."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import check_jsonschema
import jsonschema
import kubernetes_validate
import pytest
import yaml

from app.main import create_app
from app.settings import Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.30.0"  # oldest Kubernetes these manifests target; newer ones accept them too
COMPOSE_SCHEMA = Path(check_jsonschema.__file__).parent / "builtin_schemas/vendor/compose-spec.json"


def _manifests() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            doc = yaml.safe_load(path.read_text())
            docs[doc["kind"]] = doc
    return docs


def _container() -> dict[str, Any]:
    pod = _manifests()["Deployment"]["spec"]["template"]["spec"]
    container: dict[str, Any] = pod["containers"][0]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def _app_routes() -> set[str]:
    service = create_app(Settings(model_path=Path("unused.onnx")))
    return {r.path for r in service.api.routes}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "path", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
)
def test_every_manifest_validates_against_the_kubernetes_schema(path: str) -> None:
    doc = yaml.safe_load((K8S / path).read_text())
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_rejects_a_broken_manifest() -> None:
    doc = copy.deepcopy(_manifests()["Deployment"])
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    doc = copy.deepcopy(_manifests()["Deployment"])
    doc["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    assert kust["images"][0]["name"] == _container()["image"].split(":")[0]


def test_probes_use_the_apps_health_routes_and_port() -> None:
    c = _container()
    routes = _app_routes()
    port_by_name = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] in routes
        assert port_by_name[get["port"]] == int(_env(c)["BNSERVE_PORT"]) == Settings().port
    prom = _manifests()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert prom["prometheus.io/path"] in routes
    assert int(prom["prometheus.io/port"]) == Settings().port


def test_service_hpa_and_pdb_point_at_the_deployment() -> None:
    m = _manifests()
    pod_labels = m["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert m["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert m["Service"]["spec"]["ports"][0]["targetPort"] in {
        p["name"] for p in _container()["ports"]
    }
    ref = m["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", m["Deployment"]["metadata"]["name"])
    assert (
        m["PodDisruptionBudget"]["spec"]["minAvailable"]
        < m["HorizontalPodAutoscaler"]["spec"]["minReplicas"]
    )


def test_threads_match_the_cpu_limit() -> None:
    c = _container()
    env = _env(c)
    cpu_limit = float(c["resources"]["limits"]["cpu"])
    settings = Settings(
        workers=int(env["BNSERVE_WORKERS"]), intra_op_threads=int(env["BNSERVE_INTRA_OP_THREADS"])
    )
    intra, _ = settings.threads()
    assert settings.workers * intra <= cpu_limit
    assert c["resources"]["requests"]["cpu"] == c["resources"]["limits"]["cpu"]


def test_termination_grace_outlasts_prestop_pause_and_drain() -> None:
    pod = _manifests()["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    drain = float(_env(c)["BNSERVE_SHUTDOWN_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > pause + drain


def test_pod_runs_as_the_images_non_root_user_with_a_read_only_root() -> None:
    pod = _manifests()["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    user = re.search(r"^USER (\d+)", (REPO / "Dockerfile").read_text(), re.M)
    assert user is not None
    assert pod["securityContext"]["runAsUser"] == int(user.group(1)) != 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp"}


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return doc


def _compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_compose_file_validates_against_the_compose_specification() -> None:
    _compose_validator().validate(_compose())


def test_the_compose_validator_rejects_a_broken_file() -> None:
    doc = _compose()
    doc["services"]["bnserve"]["healthcheck"]["intervall"] = "10s"
    with pytest.raises(jsonschema.ValidationError):
        _compose_validator().validate(doc)


def test_compose_service_checks_readiness_on_the_apps_port_and_has_a_loadtest_profile() -> None:
    services = _compose()["services"]
    svc = services["bnserve"]
    test = " ".join(svc["healthcheck"]["test"])
    assert f"127.0.0.1:{Settings().port}/readyz" in test
    assert svc["ports"][0].endswith(f":{Settings().port}")
    assert svc["environment"]["BNSERVE_HOST"] == "0.0.0.0"
    assert any(v["target"] == "/models" and v["read_only"] for v in svc["volumes"])
    assert svc["user"].split(":")[0] == "10001"
    load = services["loadtest"]
    assert load["profiles"] == ["loadtest"]
    assert load["depends_on"]["bnserve"]["condition"] == "service_healthy"
    assert "http://bnserve:8000" in load["command"]
    dockerfile = (REPO / "Dockerfile").read_text()
    for target in (svc["build"]["target"], load["build"]["target"]):
        assert re.search(rf"^FROM .* AS {target}$", dockerfile, re.M)
