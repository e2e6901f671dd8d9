"""deploy/kserve validates offline against KServe's own CRD schemas and agrees with bnserve.

The schemas are KServe's generated CRDs, vendored in tests/fixtures/kserve-crds (source, commits,
licence and what was trimmed: SOURCE.md there). A CRD's openAPIV3Schema is OpenAPI 3.0, which
jsonschema's Draft 4 reads, plus Kubernetes' extensions, handled here as the API server does:

- ``x-kubernetes-int-or-string``: the CRDs spell it out as ``anyOf: [integer, string]`` as well;
- ``x-kubernetes-list-type: map`` / ``set``: entries must be unique (by their map keys, after
  defaulting), or the API server rejects the list;
- ``x-kubernetes-preserve-unknown-fields``: the one way an object keeps fields its schema does
  not name. Everywhere else the API server prunes unknown fields silently, and
  ``kubectl apply --validate=strict`` (field validation Strict) rejects them. KServe's schemas do
  not say ``additionalProperties: false``, so plain JSON Schema validation lets a misspelled field
  through; the strict mode here closes every object that does not preserve unknown fields, which
  is what Strict field validation does;
- ``format: int32`` / ``int64``: the range is checked.

Then the manifests are checked against bnserve itself: the runtime's arguments parse as
``bnserve-serve``'s, probes and metrics point at bnserve's routes on the port it listens on, the
threads fit the CPU limit, the shutdown fits the grace period, the user is the image's.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from jsonschema import validators
from jsonschema.protocols import Validator

from app.cli import _parser
from app.routes import ROUTES, match
from app.settings import Settings

REPO = Path(__file__).resolve().parents[2]
KSERVE = REPO / "deploy" / "kserve"
CRDS = REPO / "tests" / "fixtures" / "kserve-crds"
GROUP = "serving.kserve.io"
# ClusterServingRuntime has ServingRuntime's schema (one Go spec type): SOURCE.md.
CRD_FILE = {
    "ServingRuntime": "serving.kserve.io_servingruntimes.yaml",
    "ClusterServingRuntime": "serving.kserve.io_servingruntimes.yaml",
    "InferenceService": "serving.kserve.io_inferenceservices.trimmed.yaml",
}
MANIFESTS = sorted(p.name for p in KSERVE.glob("*.yaml") if p.name != "kustomization.yaml")
TRIMMED = "x-bnserve-trimmed"
KUBERNETES_DEFAULT_GRACE_SECONDS = 30  # a pod's terminationGracePeriodSeconds when unset
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts the storageUri's content
V2_GET_ROUTES = {r.template for r in ROUTES if r.protocol == "v2" and r.method == "GET"}
# The part of ObjectMeta a manifest sets (the API server validates metadata itself).
OBJECT_META: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}


# ---- the schemas and the validator


def _load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def _manifest(name: str) -> dict[str, Any]:
    return _load(KSERVE / name)


def _crd_schema(kind: str, version: str) -> dict[str, Any]:
    crd = _load(CRDS / CRD_FILE[kind])
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["group"] == GROUP
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            assert v["served"], f"{kind} {version} is not served"
            schema: dict[str, Any] = v["schema"]["openAPIV3Schema"]
            return schema
    raise AssertionError(f"the vendored {kind} CRD has no version {version}")


def _convert(node: Any, strict: bool) -> Any:
    """The schema as JSON Schema: int-or-string spelled out; strict: objects closed unless they
    preserve unknown fields (or were trimmed: _trimmed checks those)."""
    if isinstance(node, list):
        return [_convert(n, strict) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _convert(v, strict) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    is_object = out.get("type") == "object" or "properties" in out
    if (strict and is_object and "additionalProperties" not in out and TRIMMED not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _to_json_schema(schema: dict[str, Any], strict: bool) -> dict[str, Any]:
    out: dict[str, Any] = _convert(schema, strict)
    if strict:
        out["properties"]["metadata"] = OBJECT_META
    return out


def _list_type(validator: Validator, list_type: str, instance: Any,
               schema: Mapping[str, Any]) -> Iterator[jsonschema.ValidationError]:
    """x-kubernetes-list-type: ``set`` items, and ``map`` items by their keys, are unique."""
    if not isinstance(instance, list) or list_type not in {"set", "map"}:
        return
    keys: list[str] = schema.get("x-kubernetes-list-map-keys", [])
    item_props = schema.get("items", {}).get("properties", {})
    seen: set[str] = set()
    for item in instance:
        if list_type == "set":
            key = json.dumps(item, sort_keys=True)
        elif isinstance(item, dict):
            key = json.dumps([item.get(k, item_props.get(k, {}).get("default")) for k in keys])
        else:
            continue
        if key in seen:
            what = f"{dict(zip(keys, json.loads(key), strict=True))}" if keys else key
            yield jsonschema.ValidationError(
                f"duplicate entry {what} in a list of type {list_type}")
        seen.add(key)


def _trimmed(validator: Validator, note: str, instance: Any,
             schema: Mapping[str, Any]) -> Iterator[jsonschema.ValidationError]:
    """Strict mode at a node whose upstream subtree was cut: only the kept properties pass."""
    if not isinstance(instance, dict):
        return
    kept = schema.get("properties", {})
    for key in instance:
        if key not in kept:
            yield jsonschema.ValidationError(
                f"{key!r} is not in the vendored schema, which was trimmed here ({note}); "
                "vendor its subtree from upstream (tests/fixtures/kserve-crds/SOURCE.md)")


def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


FORMATS = jsonschema.FormatChecker()
FORMATS.checks("int32")(_int32)
FORMATS.checks("int64")(_int64)


_extend: Callable[..., type[Validator]] = validators.extend  # untyped in types-jsonschema
_BASE = _extend(jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type})
_STRICT = _extend(_BASE, {TRIMMED: _trimmed})


@functools.cache
def _validator(api_version: str, kind: str, strict: bool) -> Validator:
    group, _, version = api_version.partition("/")
    assert group == GROUP, f"{api_version}: not a KServe resource"
    schema = _to_json_schema(_crd_schema(kind, version), strict)
    cls = _STRICT if strict else _BASE
    cls.check_schema(schema)
    validator: Validator = cls(schema, format_checker=FORMATS)
    return validator


def schema_errors(doc: dict[str, Any], strict: bool = True) -> list[str]:
    """What the API server would refuse in ``doc`` (strict: also unknown fields)."""
    v = _validator(doc["apiVersion"], doc["kind"], strict)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in v.iter_errors(doc))


# ---- the manifests against the schemas


@pytest.mark.parametrize("strict", [False, True], ids=["crd-schema", "strict"])
@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_validates_against_kserves_crd_schema(name: str, strict: bool) -> None:
    doc = _manifest(name)
    assert doc["kind"] in CRD_FILE
    assert schema_errors(doc, strict) == []


def test_the_vendored_schemas_are_the_ones_source_md_records() -> None:
    source = (CRDS / "SOURCE.md").read_text()
    recorded = dict(re.findall(r"^\| `([\w.]+\.yaml)` \|.*`([0-9a-f]{64})` \|$", source, re.M))
    assert set(recorded) == set(CRD_FILE.values()) == {p.name for p in CRDS.glob("*.yaml")}
    for name, sha in recorded.items():
        assert hashlib.sha256((CRDS / name).read_bytes()).hexdigest() == sha, name
    assert "Apache License" in (CRDS / "LICENSE").read_text()


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``doc`` with ``value`` at the dotted ``path`` (list indices as numbers)."""
    out = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = out
    for p in parents:
        node = node[p]
    node[last] = value
    return out


def _rename(doc: dict[str, Any], path: str, new: str) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = out
    for p in parents:
        node = node[p]
    node[new] = node.pop(last)
    return out


UNEXPECTED = "was unexpected"
NOT_VENDORED = "is not in the vendored schema"  # where the vendored schema was trimmed
MISSPELLED = [
    ("inferenceservice.yaml", "spec.predictor.model.protocolVersion", "protocolVerison",
     UNEXPECTED),
    ("inferenceservice.yaml", "spec.predictor.model.modelFormat.name", "nmae", UNEXPECTED),
    ("inferenceservice.yaml", "spec.predictor.minReplicas", "minReplica", NOT_VENDORED),
    ("servingruntime.yaml", "spec.supportedModelFormats", "supportedModelFormat", UNEXPECTED),
    ("servingruntime.yaml", "spec.containers.0.readinessProbe.httpGet.path", "paht", UNEXPECTED),
    ("servingruntime.yaml", "spec.containers.0.securityContext.runAsNonRoot", "runAsNonroot",
     UNEXPECTED),
    ("clusterservingruntime.yaml", "spec.protocolVersions", "protocolVersion", UNEXPECTED),
]


@pytest.mark.parametrize(("name", "path", "typo", "message"), MISSPELLED)
def test_a_misspelled_field_passes_the_crd_schema_but_not_the_strict_check(
        name: str, path: str, typo: str, message: str) -> None:
    doc = _rename(_manifest(name), path, typo)
    errors = schema_errors(doc, strict=False)
    if typo != "nmae":  # KServe's schema alone lets a misspelled optional field through
        assert errors == []
    errors = schema_errors(doc, strict=True)
    assert any(f"'{typo}'" in e and message in e for e in errors), errors


WRONG = [
    ("inferenceservice.yaml", "spec.predictor.minReplicas", "two", "is not of type 'integer'"),
    ("inferenceservice.yaml", "spec.predictor.maxReplicas", 2.5, "is not of type 'integer'"),
    ("inferenceservice.yaml", "spec.predictor.model.modelFormat", "bnserve-onnx",
     "is not of type 'object'"),
    ("servingruntime.yaml", "spec.containers.0.ports.0.containerPort", "8000",
     "is not of type 'integer'"),
    ("servingruntime.yaml", "spec.containers.0.ports.0.containerPort", 2**31,
     "is not a 'int32'"),
    ("servingruntime.yaml", "spec.supportedModelFormats.0.autoSelect", "yes",
     "is not of type 'boolean'"),
    ("servingruntime.yaml", "spec.supportedModelFormats.0.priority", 0,
     "less than the minimum of 1"),
    ("servingruntime.yaml", "spec.containers.0.readinessProbe.httpGet.port", 80.5,
     "is not valid under any of the given schemas"),
    ("servingruntime.yaml", "spec.containers.0.resources.limits.cpu", "one",
     "does not match"),
    ("servingruntime.yaml", "spec.protocolVersions", "v2", "is not of type 'array'"),
]


@pytest.mark.parametrize(("name", "path", "value", "message"), WRONG)
def test_a_wrong_type_or_value_fails_even_the_crd_schema(
        name: str, path: str, value: Any, message: str) -> None:
    doc = _set(_manifest(name), path, value)
    for strict in (False, True):
        errors = schema_errors(doc, strict)
        assert len(errors) == 1, errors
        assert message in errors[0]
        assert errors[0].startswith(path + ":")


def test_a_missing_required_field_fails() -> None:
    sr = _manifest("servingruntime.yaml")
    del sr["spec"]["containers"][0]["name"]
    assert schema_errors(sr, strict=False) == [
        "spec.containers.0: 'name' is a required property"]
    isvc = _manifest("inferenceservice.yaml")
    del isvc["spec"]["predictor"]["model"]["modelFormat"]["name"]
    assert schema_errors(isvc, strict=False) == [
        "spec.predictor.model.modelFormat: 'name' is a required property"]
    isvc = _manifest("inferenceservice.yaml")
    isvc["spec"] = {"transformer": isvc["spec"].pop("predictor")}
    assert "spec: 'predictor' is a required property" in schema_errors(isvc, strict=False)


def test_duplicate_keys_in_a_list_map_fail() -> None:
    sr = _manifest("servingruntime.yaml")
    env = sr["spec"]["containers"][0]["env"]
    env.append(dict(env[0]))
    [error] = schema_errors(sr, strict=False)
    assert error.startswith("spec.containers.0.env: duplicate entry {'name': 'BNSERVE_WORKERS'}")
    sr = _manifest("servingruntime.yaml")
    port = sr["spec"]["containers"][0]["ports"][0]
    sr["spec"]["containers"][0]["ports"].append(
        {"containerPort": port["containerPort"], "name": "again"})  # protocol defaults to TCP
    [error] = schema_errors(sr, strict=False)
    assert "duplicate entry {'containerPort': 8000, 'protocol': 'TCP'}" in error


def test_a_field_whose_schema_was_trimmed_fails_the_strict_check_and_says_so() -> None:
    isvc = _manifest("inferenceservice.yaml")
    isvc["spec"]["predictor"]["containers"] = [{"name": "x", "image": "y"}]
    isvc["spec"]["transformer"] = {"minReplicas": 1}
    errors = schema_errors(isvc, strict=True)
    assert len(errors) == 2, errors
    assert errors[0].startswith("spec.predictor: 'containers' is not in the vendored schema")
    assert errors[1].startswith("spec.transformer: 'minReplicas' is not in the vendored schema")
    assert all("trimmed" in e for e in errors)


def test_metadata_is_checked_as_object_meta_in_strict_mode() -> None:
    isvc = _set(_manifest("inferenceservice.yaml"), "metadata.labels.replicas", 2)
    assert schema_errors(isvc, strict=True) == [
        "metadata.labels.replicas: 2 is not of type 'string'"]
    isvc = _rename(_manifest("inferenceservice.yaml"), "metadata.labels", "label")
    assert schema_errors(isvc, strict=True) == [
        "metadata: Additional properties are not allowed ('label' was unexpected)"]


# ---- the manifests against each other and against bnserve


def _runtime() -> dict[str, Any]:
    return _manifest("servingruntime.yaml")


def _container() -> dict[str, Any]:
    [container] = _runtime()["spec"]["containers"]
    c: dict[str, Any] = container
    return c


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def _port(container: dict[str, Any]) -> int:
    [port] = container["ports"]
    number: int = port["containerPort"]
    return number


def test_kustomization_applies_the_runtime_and_the_service_with_deploy_k8s_image() -> None:
    kust = _load(KSERVE / "kustomization.yaml")
    assert kust["resources"] == ["servingruntime.yaml", "inferenceservice.yaml"]
    assert set(MANIFESTS) == {*kust["resources"], "clusterservingruntime.yaml"}
    image, tag = _container()["image"].split(":")
    assert [(i["name"], i["newTag"]) for i in kust["images"]] == [(image, tag)]
    deployment = _load(REPO / "deploy" / "k8s" / "deployment.yaml")
    assert _container()["image"] == deployment["spec"]["template"]["spec"]["containers"][0]["image"]


def test_the_cluster_runtime_is_the_same_runtime() -> None:
    cluster = _manifest("clusterservingruntime.yaml")
    assert cluster["kind"] == "ClusterServingRuntime"
    assert "namespace" not in cluster["metadata"]
    assert cluster["metadata"] == _runtime()["metadata"]
    assert cluster["spec"] == _runtime()["spec"]


def test_the_inference_service_selects_the_runtime_with_protocol_v2() -> None:
    runtime = _runtime()["spec"]
    model = _manifest("inferenceservice.yaml")["spec"]["predictor"]["model"]
    assert model["runtime"] == _runtime()["metadata"]["name"]
    assert model["protocolVersion"] == "v2"
    assert runtime["protocolVersions"] == ["v2"]  # bnserve speaks no V1 and no gRPC
    assert not runtime.get("disabled", False)
    assert runtime["multiModel"] is False
    formats = {f["name"]: f for f in runtime["supportedModelFormats"]}
    assert len(formats) == len(runtime["supportedModelFormats"])
    chosen = formats[model["modelFormat"]["name"]]
    assert chosen.get("autoSelect") is True  # found even without `runtime:`
    assert formats["onnx"].get("autoSelect") is False  # plain ONNX models stay on KServe's own
    for f in formats.values():  # KServe ignores a priority without autoSelect: do not pretend
        assert ("priority" in f) == bool(f.get("autoSelect"))
    assert "version" not in model["modelFormat"] or "version" in chosen


def test_the_runtime_runs_bnserve_serve_with_the_kserve_model_name_and_path() -> None:
    c = _container()
    isvc = _manifest("inferenceservice.yaml")
    assert c["name"] == "kserve-container"  # KServe merges the isvc's model into this one
    name = isvc["metadata"]["name"]
    # KServe requires a DNS-1035 label; {{.Name}} is the only template the arguments use.
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    assert len(name) <= 63
    assert all(re.sub(r"\{\{\.Name\}\}", "", a).count("{{") == 0 for a in c["args"])
    args = _parser().parse_args([a.replace("{{.Name}}", name) for a in c["args"]])
    assert args.model_name == name
    assert Path(args.model_path) == Path(MODEL_DIR) / "model.onnx"
    assert args.port == _port(c)
    assert args.host == "0.0.0.0"
    settings = Settings(model_name=args.model_name, model_path=Path(args.model_path),
                        host=args.host, port=args.port)
    assert settings.model_name == name
    infer = match(f"/v2/models/{settings.model_name}/infer")
    assert infer is not None
    assert infer.route("POST") is not None
    assert infer.params == {"model_name": name}


def test_probes_and_metrics_use_bnserves_routes_on_its_port() -> None:
    c = _container()
    port = _port(c)
    assert port == Settings().port
    assert re.search(rf"^EXPOSE {port}$", (REPO / "Dockerfile").read_text(), re.M)
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] in V2_GET_ROUTES
        assert get["port"] == port  # a number: Knative checks probe ports against it
    assert "startupProbe" not in c  # Knative refuses them (older releases)
    assert "lifecycle" not in c  # and this one
    annotations = _runtime()["spec"]["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == port
    scrape = match(annotations["prometheus.kserve.io/path"])
    assert scrape is not None
    assert scrape.route("GET") is not None


def test_env_vars_are_bnserve_settings_and_the_threads_fit_the_cpu_limit() -> None:
    c = _container()
    env = _env(c)
    fields = {f"BNSERVE_{name.upper()}": name for name in Settings.model_fields}
    assert set(env) <= set(fields), set(env) - set(fields)
    settings = Settings(**{fields[k]: v for k, v in env.items()})  # type: ignore[arg-type]
    intra, _ = settings.threads()
    assert settings.workers * intra <= float(c["resources"]["limits"]["cpu"])
    assert c["resources"]["requests"]["cpu"] == c["resources"]["limits"]["cpu"]
    # more than one worker writes Prometheus files, which a read-only root needs a /tmp for
    assert settings.workers == 1 or "/tmp" in {m["mountPath"] for m in c.get("volumeMounts", [])}
    deployment = _load(REPO / "deploy" / "k8s" / "deployment.yaml")
    k8s = deployment["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"] == k8s["resources"]


def test_the_shutdown_fits_the_default_termination_grace_period() -> None:
    env = _env(_container())
    settings = Settings(shutdown_delay_seconds=float(env["BNSERVE_SHUTDOWN_DELAY_SECONDS"]),
                        shutdown_grace_seconds=int(env["BNSERVE_SHUTDOWN_GRACE_SECONDS"]))
    assert settings.shutdown_delay_seconds > 0  # instead of deploy/k8s's preStop pause
    assert (settings.shutdown_delay_seconds + settings.shutdown_grace_seconds
            < KUBERNETES_DEFAULT_GRACE_SECONDS)


def test_the_runtime_runs_as_the_images_non_root_user_with_a_read_only_root() -> None:
    sc = _container()["securityContext"]
    user = re.search(r"^USER (\d+):(\d+)", (REPO / "Dockerfile").read_text(), re.M)
    assert user is not None
    assert (sc["runAsUser"], sc["runAsGroup"]) == (int(user.group(1)), int(user.group(2)))
    assert sc["runAsUser"] != 0
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
