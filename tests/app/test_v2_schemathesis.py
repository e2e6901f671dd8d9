"""Property-based conformance of the ``/v2`` routes (issue 11) to the Open Inference Protocol's
own OpenAPI description, ``tests/fixtures/oip/open_inference_rest.yaml`` (vendored, see SOURCE.md
there), with schemathesis driving a real ``bnserve-serve`` process.

Every operation of the yaml gets a fixed, derandomized number of generated requests (the same
ones on every run). The path parameters ``MODEL_NAME``/``MODEL_VERSION`` are drawn as the served
model's real name and version 80% of the time (so the requests reach the real handlers, not only
404s), the real name and any version 10%, anything 10%. (A GET whose only inputs are those
parameters has one request with the real ones, and hypothesis does not repeat it: most of its
examples are 404s by construction.) Inference requests are, in equal parts, schemathesis' bodies
from the yaml (valid per the schema, almost never a tensor this model takes) and bodies made for
the served model, valid or with one part broken (so that 200 answers, JSON and binary, are checked
too); then schemathesis' negative bodies, which break the yaml's request schema.

What is checked, and why only that (the yaml is short of the prose, inference_rest.md):

- ``not_a_server_error``: no 5xx, ever. (The yaml documents a 500 for ``/v2/health/live`` and a
  503 for the readiness routes: the server here is live and ready, so neither may appear.)
- ``response_schema_conformance`` and ``content_type_conformance``: every answer whose status the
  yaml documents with a body (200 and 400 of ``/v2``, model metadata and infer) is
  ``application/json`` and validates against its schema; except binary tensor data answers
  (``Inference-Header-Content-Length``: an extension the yaml does not describe), which
  ``binary_answer`` checks instead.
- ``status_code_conformance`` only on the health and readiness routes, whose yaml lists the
  statuses exhaustively and gives each a meaning (200 ready, 404 unknown model, 503 not ready).
  Not on metadata and infer: the yaml lists 200 and 400 there, but the prose says a failure is
  "indicated by an HTTP error status (typically 400)", so 404 for an unknown model or 413 for a
  body too large are allowed. For those, ``error_answer`` demands what the prose does: a 4xx whose
  body is the ``{"error": <string>}`` object.
- ``infer_answer`` (prose, not yaml): a 200's ``id`` is the request's, ``model_name`` is the
  model asked for, the outputs are the ones the request named, and each JSON output has as many
  values as its ``shape`` says.
- ``negative_data_rejection`` is advisory: reported, not asserted. The protocol asks no server to
  refuse every body outside the yaml's schema (it may coerce tensor data, for one).

The run prints a summary (visible with ``pytest -s``) and writes it to
``reports/v2_schemathesis.json``; it fails with a curl command for each distinct failure.
The tests below the run are negative controls: the same checks, fed made-up answers that break
the yaml, must fail, so a passing run is not vacuous.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.app.conftest import Server, Trained, start_process, stop

SPEC = Path(__file__).resolve().parents[1] / "fixtures" / "oip" / "open_inference_rest.yaml"
REPORT = Path(__file__).resolve().parents[2] / "reports" / "v2_schemathesis.json"
EXAMPLES = {"GET": 50, "POST": 100}  # generated requests per operation
NEGATIVE_EXAMPLES = 40  # and negative bodies per infer operation
TIME_BUDGET_S = 60.0
MAX_SHOWN = 3  # distinct failures kept per (operation, check)

Operation = APIOperation[Any, Any, Any, Any]
GenCase = Case[Any]
Json = Any
# the datatypes of the extension's binary tensor data, and their sizes in bytes
ITEM_SIZE = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2,
             "INT32": 4, "INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8}


@dataclass(frozen=True)
class Served:
    """The served model as the /v2 routes must name it."""

    name: str
    version: str
    input_shape: tuple[int, ...]  # one example's
    outputs: tuple[str, ...]

    def path_parameters(self, op: Operation) -> dict[str, str]:
        real = {"MODEL_NAME": self.name, "MODEL_VERSION": self.version}
        return {p.name: real[p.name] for p in op.path_parameters}


@dataclass(frozen=True)
class Finding:
    check: str
    message: str
    curl: str
    status: int
    answer: str


@dataclass
class OperationStats:
    label: str
    examples: int = 0
    negative_examples: int = 0
    real_path: int = 0
    binary: int = 0  # answers with binary tensor data
    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)  # by check
    advisories: Counter[str] = field(default_factory=Counter)
    shown: list[Finding] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def record(self, check: str, case: GenCase, response: schemathesis.Response, message: str,
               base_url: str, advisory: bool = False) -> None:
        (self.advisories if advisory else self.failures)[check] += 1
        label = f"{check} (advisory)" if advisory else check
        seen = [f.message for f in self.shown if f.check == label]
        if len(seen) < MAX_SHOWN and message.strip() not in seen:
            self.shown.append(Finding(label, message.strip(), case.as_curl_command(
                base_url=base_url), response.status_code, response.content[:600].decode(
                    "utf-8", "replace")))


# ---------------------------------------------------------------- the yaml's schemas

@cache
def component_validator(name: str, *, binary_outputs: bool = False) -> jsonschema_rs.Validator:
    """A validator of one of the yaml's component schemas (OpenAPI 3.1: JSON Schema 2020-12).
    ``binary_outputs``: an output may carry its data as binary data after the JSON instead (the
    binary extension's answer has no ``data`` for such an output, which the yaml requires)."""
    raw = schemathesis.openapi.from_path(SPEC).raw_schema
    components = json.loads(json.dumps(raw["components"]))
    if binary_outputs:
        out = components["schemas"]["response_output"]
        out["required"] = [r for r in out["required"] if r != "data"]
    root = {"components": components, "$ref": f"#/components/schemas/{name}"}
    return jsonschema_rs.Draft202012Validator(root)


# ---------------------------------------------------------------- checks the yaml cannot express

def _json(response: schemathesis.Response) -> Json:
    return json.loads(response.content)


def _is_binary(response: schemathesis.Response) -> bool:
    return "inference-header-content-length" in response.headers


def _declares_error_body(op: Operation) -> bool:
    return "400" in op.responses.status_codes


def error_answer(op: Operation, response: schemathesis.Response) -> str | None:
    """A failed request: a 4xx with the JSON error object (inference_rest.md: "A failed ...
    request must be indicated by an HTTP error status (typically 400). The HTTP body must contain
    the $..._error_response object", ``{"error": $string}``)."""
    status = response.status_code
    if status < 300 or not _declares_error_body(op):
        return None
    if not 400 <= status < 500:
        return f"an error answered with {status}, not a 4xx"
    content_type = (response.headers.get("content-type") or [""])[0]
    if content_type.split(";")[0].strip() != "application/json":
        return f"a {status} answered with Content-Type {content_type!r}, not application/json"
    try:
        body = _json(response)
    except ValueError as e:
        return f"a {status} whose body is not JSON: {e}"
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return f'a {status} whose body is not {{"error": <string>}}: {body!r:.200}'
    return None


def _request_body(case: GenCase) -> dict[str, Any] | None:
    return case.body if isinstance(case.body, dict) else None


def _n_values(data: Json) -> int:
    return sum(_n_values(d) for d in data) if isinstance(data, list) else 1


def _infer_json(response: schemathesis.Response) -> dict[str, Any] | None:
    """A 200 infer answer's JSON object (the header, for binary tensor data), if it is one."""
    try:
        raw = response.content
        if _is_binary(response):
            raw = raw[:int(response.headers["inference-header-content-length"][0])]
        answer = json.loads(raw)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def infer_answer(case: GenCase, served: Served, answer: dict[str, Any]) -> str | None:
    """What the prose asks of a 200 to an infer request beyond the yaml's types."""
    body = _request_body(case)
    if body is None or not isinstance(answer.get("outputs"), list):
        return None  # the schema check reports a missing or malformed outputs
    problems = []
    if "id" in body and answer.get("id") != body["id"]:
        problems.append(f"id {answer.get('id')!r} is not the request's {body['id']!r}")
    if answer.get("model_name") != case.path_parameters.get("MODEL_NAME"):
        problems.append(f"model_name {answer.get('model_name')!r} is not the model asked for")
    if "model_version" in answer and answer["model_version"] != served.version:
        problems.append(f"model_version {answer['model_version']!r} is not {served.version!r}")
    outputs = [o for o in answer["outputs"] if isinstance(o, dict)]
    names = [o.get("name") for o in outputs]
    asked = body.get("outputs")
    want = [o.get("name") if isinstance(o, dict) else o for o in asked] if isinstance(
        asked, list) and asked else list(served.outputs)
    if sorted(map(str, names)) != sorted(map(str, want)):
        problems.append(f"outputs {names} are not the ones asked for, {want}")
    for out in outputs:
        if ("data" in out and isinstance(out.get("shape"), list)
                and _n_values(out["data"]) != math.prod(out["shape"])):
            problems.append(f"output {out.get('name')!r} has {_n_values(out['data'])} "
                            f"values for shape {out['shape']}")
    return "; ".join(problems) or None


def _binary_header(response: schemathesis.Response) -> tuple[int, Json] | str:
    """The JSON header's length and value, or what is wrong with them."""
    try:
        n = int(response.headers["inference-header-content-length"][0])
    except ValueError:
        return "Inference-Header-Content-Length is not an integer"
    if not 0 < n <= len(response.content):
        return f"Inference-Header-Content-Length {n} for a body of {len(response.content)} bytes"
    try:
        return n, json.loads(response.content[:n])
    except ValueError as e:
        return f"the first {n} bytes are not JSON: {e}"


def _binary_size(out: dict[str, Any]) -> int | str:
    """How many bytes of binary data an output of a valid header announces (0: its data is
    JSON), or what is wrong with it."""
    size = (out.get("parameters") or {}).get("binary_data_size")
    name = out["name"]
    if size is None:
        return 0 if "data" in out else f"output {name!r} has neither data nor binary_data_size"
    if "data" in out:
        return f"output {name!r} has both data and binary_data_size"
    item = ITEM_SIZE.get(out["datatype"])
    if item is not None and size != math.prod(out["shape"]) * item:
        return f"output {name!r}: binary_data_size {size} is not shape {out['shape']} x {item}"
    return int(size)


def binary_answer(response: schemathesis.Response) -> str | None:
    """An answer with binary tensor data (Triton's binary extension, which bnserve reports in
    GET /v2 ``extensions``): the JSON header is Inference-Header-Content-Length bytes long and is
    the yaml's inference_response (an output's data may be binary instead), and the binary data
    after it is, output by output, ``binary_data_size`` bytes, shape x the datatype's size."""
    found = _binary_header(response)
    if isinstance(found, str):
        return found
    n, header = found
    errors = list(component_validator("inference_response", binary_outputs=True)
                  .iter_errors(header))
    if errors:
        return "the JSON header breaks inference_response: " + "; ".join(
            f"/{'/'.join(map(str, e.instance_path))}: {e.message}" for e in errors[:3])
    sizes = [_binary_size(out) for out in header["outputs"]]
    problems = [size for size in sizes if isinstance(size, str)]
    if problems:
        return problems[0]
    total = sum(size for size in sizes if isinstance(size, int))
    if total != len(response.content) - n:
        return f"{len(response.content) - n} bytes of binary data, binary_data_size sum {total}"
    return None


# ---------------------------------------------------------------- requests

def _weighted(
    choices: Sequence[tuple[int, st.SearchStrategy[GenCase]]],
) -> st.SearchStrategy[GenCase]:
    """A strategy drawn from ``choices`` in proportion to the weights (``one_of`` would not do:
    it draws a branch uniformly, and drops repeated branches)."""
    pool = [s for weight, s in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda s: s)


V2_DATATYPES = [*ITEM_SIZE, "BYTES", "BF16"]
ODD_VALUES = st.one_of(st.text(max_size=4), st.booleans(), st.none(), st.just(2**70),
                       st.sampled_from([1e39, -3.5e38, 1e-46, -0.0, 2**24 + 1]),
                       st.integers(-300, 300), st.lists(st.integers(0, 3), max_size=2))


def model_bodies(served: Served) -> st.SearchStrategy[dict[str, Any]]:
    """Infer bodies for the served model: valid ones, with every optional part (half of them),
    and valid ones with one part broken: what a client of this model gets wrong."""
    n_features = math.prod(served.input_shape)

    @st.composite
    def valid(draw: st.DrawFn) -> dict[str, Any]:
        rows = draw(st.integers(1, 3))
        values = draw(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32),
                               min_size=rows * n_features, max_size=rows * n_features))
        nested = draw(st.booleans())
        data: list[Any] = [values[r * n_features:(r + 1) * n_features] for r in range(rows)] \
            if nested else values
        tensor: dict[str, Any] = {"name": "features", "shape": [rows, *served.input_shape],
                                  "datatype": draw(st.sampled_from(["FP32", "FP64"])),
                                  "data": data}
        body: dict[str, Any] = {"inputs": [tensor]}
        if draw(st.booleans()):
            body["id"] = draw(st.text(max_size=12))
        if draw(st.booleans()):
            body["parameters"] = draw(st.fixed_dictionaries(
                {}, optional={"binary_data_output": st.booleans()}))
        if draw(st.booleans()):
            names = draw(st.lists(st.sampled_from(served.outputs), min_size=1, unique=True))
            body["outputs"] = [
                {"name": name, **({"parameters": {"binary_data": draw(st.booleans())}}
                                  if draw(st.booleans()) else {})}
                for name in names]
        return body

    @st.composite
    def broken(draw: st.DrawFn) -> dict[str, Any]:
        body = draw(valid())
        tensor = body["inputs"][0]
        flat = tensor["data"] if not isinstance(tensor["data"][0], list) else [
            v for row in tensor["data"] for v in row]
        how = draw(st.sampled_from([
            "datatype", "shape", "value", "ragged", "short", "binary_size", "output", "id",
            "inputs", "name", "parameters"]))
        if how == "datatype":
            tensor["datatype"] = draw(st.sampled_from([*V2_DATATYPES, "fp32", "FLOAT", ""]))
            if draw(st.booleans()):  # with values of that type, often
                tensor["data"] = draw(st.lists(st.integers(-2**63, 2**64), min_size=len(flat),
                                               max_size=len(flat)))
        elif how == "shape":
            tensor["shape"] = draw(st.lists(st.integers(-2, 2**40), max_size=4))
        elif how == "value":
            flat[draw(st.integers(0, len(flat) - 1))] = draw(ODD_VALUES)
            tensor["data"] = flat
        elif how == "ragged":
            tensor["data"] = [flat[:n_features], flat[:draw(st.integers(0, n_features - 1))]]
        elif how == "short":
            tensor["data"] = flat[:draw(st.integers(0, len(flat) - 1))]
        elif how == "binary_size":  # claims binary data the JSON body does not have
            tensor["parameters"] = {"binary_data_size": draw(st.integers(-1, 4 * len(flat)))}
            if draw(st.booleans()):
                del tensor["data"]
        elif how == "output":
            body["outputs"] = draw(st.lists(st.fixed_dictionaries(
                {"name": st.sampled_from([*served.outputs, "nope", ""])},
                optional={"parameters": st.fixed_dictionaries(
                    {}, optional={"binary_data": ODD_VALUES})}), max_size=3))
        elif how == "id":
            body["id"] = draw(ODD_VALUES)
        elif how == "inputs":
            body["inputs"] = draw(st.sampled_from([[], [tensor, tensor], {}, None]))
        elif how == "name":
            tensor["name"] = draw(st.sampled_from(["", "input0", "Features", 1]))
        else:
            body["parameters"] = draw(st.one_of(
                ODD_VALUES, st.fixed_dictionaries({"binary_data_output": ODD_VALUES})))
        return body

    return st.one_of(valid(), broken())


def positive_cases(op: Operation, served: Served) -> st.SearchStrategy[GenCase]:
    real = served.path_parameters(op)
    if not real:
        return op.as_strategy()
    choices: list[tuple[int, st.SearchStrategy[GenCase]]] = [(1, op.as_strategy())]  # any path
    if "MODEL_VERSION" in real:  # the real name, any version
        choices.append((1, op.as_strategy(path_parameters={"MODEL_NAME": served.name})))
    else:
        choices.append((1, op.as_strategy(path_parameters=real)))
    if op.method.upper() == "POST":
        choices += [(4, op.as_strategy(path_parameters=real)),
                    (4, model_bodies(served).map(lambda body: op.Case(
                        path_parameters=real, body=body, media_type="application/json")))]
    else:
        choices.append((8, op.as_strategy(path_parameters=real)))
    return _weighted(choices)


def checks_for(op: Operation) -> list[tuple[str, CheckFunction]]:
    checks: list[tuple[str, CheckFunction]] = [
        ("not_a_server_error", not_a_server_error),
        ("response_schema_conformance", response_schema_conformance),
        ("content_type_conformance", content_type_conformance),
    ]
    if not _declares_error_body(op):  # health and readiness: the yaml's statuses are all there is
        checks.append(("status_code_conformance", status_code_conformance))
    return checks


@dataclass
class Runner:
    base_url: str
    served: Served
    session: requests.Session

    def exercise(self, case: GenCase, stats: OperationStats, negative: bool) -> None:
        op = case.operation
        try:
            response = case.call(base_url=self.base_url, session=self.session, timeout=30)
        except (requests.ConnectionError, requests.Timeout) as e:  # the server hung up, or hangs
            curl = case.as_curl_command(base_url=self.base_url)
            stats.transport_errors.append(f"{e!r:.300}\n  {curl}")
            return
        stats.statuses[response.status_code] += 1
        if negative:
            stats.negative_examples += 1
        else:
            stats.examples += 1
        if case.path_parameters == self.served.path_parameters(op):
            stats.real_path += 1
        binary = _is_binary(response)
        stats.binary += binary
        for name, check in checks_for(op):
            if binary and name in {"content_type_conformance", "response_schema_conformance"}:
                continue  # the extension's answers: binary_answer below
            try:
                case.validate_response(response, checks=[check])
            except FailureGroup as group:
                for failure in group.exceptions:
                    stats.record(name, case, response, f"{failure.title}\n{failure.message}",
                                 self.base_url)
        if negative:
            try:
                case.validate_response(response, checks=[negative_data_rejection])
            except FailureGroup as group:
                stats.record("negative_data_rejection", case, response, str(group),
                             self.base_url, advisory=True)
        extra: list[tuple[str, str | None]] = [("error_answer", error_answer(op, response))]
        if binary:
            extra.append(("binary_answer", binary_answer(response)))
        if response.status_code == 200 and op.path.endswith("/infer"):
            answer = _infer_json(response)  # None: not JSON, which the checks above report
            if answer is not None:
                extra.append(("infer_answer", infer_answer(case, self.served, answer)))
        for name, problem in extra:
            if problem is not None:
                stats.record(name, case, response, problem, self.base_url)

    def run(self, op: Operation, strategy: st.SearchStrategy[GenCase], n: int,
            stats: OperationStats, negative: bool = False) -> None:
        @settings(max_examples=n, derandomize=True, database=None, deadline=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                         HealthCheck.data_too_large])
        @given(case=strategy)
        def each(case: GenCase) -> None:
            self.exercise(case, stats, negative)

        each()


# ---------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def server(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_process(trained.path, tmp_path_factory.mktemp("v2-schemathesis"))
    s.wait_ready()
    yield s
    stop(s)


def served_model(server: Server, trained: Trained) -> Served:
    model = httpx.get(server.url + "/model", timeout=10).json()
    assert model["model_version"] == trained.model_version
    return Served(name=trained.path.stem, version=model["model_version"],
                  input_shape=tuple(model["input_shape"]),
                  outputs=tuple(o["name"] for o in model["outputs"]))


def summary_lines(all_stats: list[OperationStats], seconds: float) -> list[str]:
    lines = [f"schemathesis {schemathesis.__version__} against {SPEC.name}: "
             f"{len(all_stats)} operations in {seconds:.1f} s"]
    for s in all_stats:
        statuses = ", ".join(f"{k}x{v}" for k, v in sorted(s.statuses.items()))
        failures = ", ".join(f"{k} {v}" for k, v in sorted(s.failures.items())) or "none"
        advisories = ", ".join(f"{k} {v}" for k, v in sorted(s.advisories.items()))
        lines.append(f"  {s.label}: {s.examples} examples (+{s.negative_examples} negative), "
                     f"{s.real_path} with the served name/version; statuses {statuses}"
                     + (f" ({s.binary} binary)" if s.binary else "") + "; "
                     f"failures: {failures}" + (f"; advisory: {advisories}" if advisories else "")
                     + (f"; no answer: {len(s.transport_errors)}" if s.transport_errors else "")
                     + f" [{s.seconds:.1f} s]")
    total = sum(sum(s.failures.values()) + len(s.transport_errors) for s in all_stats)
    lines.append(f"  total: {sum(s.examples + s.negative_examples for s in all_stats)} requests, "
                 f"{total} failing")
    return lines


@pytest.mark.slow
def test_v2_routes_conform_to_the_open_inference_rest_yaml(
    server: Server, trained: Trained
) -> None:
    served = served_model(server, trained)
    schema = schemathesis.openapi.from_path(SPEC)
    results = list(schema.get_all_operations())
    operations: list[Operation] = [r.ok() for r in results if isinstance(r, Ok)]
    assert len(operations) == len(results) == 9, results
    runner = Runner(server.url, served, requests.Session())
    all_stats: list[OperationStats] = []
    start = time.monotonic()
    for op in operations:
        stats = OperationStats(op.label)
        t0 = time.monotonic()
        runner.run(op, positive_cases(op, served), EXAMPLES[op.method.upper()], stats)
        if op.method.upper() == "POST":
            negative = op.as_strategy(GenerationMode.NEGATIVE,
                                      path_parameters=served.path_parameters(op))
            runner.run(op, negative, NEGATIVE_EXAMPLES, stats, negative=True)
        stats.seconds = time.monotonic() - t0
        all_stats.append(stats)
    seconds = time.monotonic() - start
    runner.session.close()

    lines = summary_lines(all_stats, seconds)
    print("\n" + "\n".join(lines))
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({
        "schemathesis": schemathesis.__version__, "spec": str(SPEC.relative_to(
            REPORT.parents[1])), "seconds": round(seconds, 2), "summary": lines,
        "operations": [{
            "operation": s.label, "examples": s.examples,
            "negative_examples": s.negative_examples, "served_name_version": s.real_path,
            "statuses": dict(sorted(s.statuses.items())), "binary_answers": s.binary,
            "failures": dict(s.failures),
            "advisory": dict(s.advisories), "seconds": round(s.seconds, 2),
            "shown": [f.__dict__ for f in s.shown],
            "no_answer": s.transport_errors} for s in all_stats],
    }, indent=2) + "\n")

    report = [f"{s.label} [{f.check}] -> {f.status}\n  {f.curl}\n  answer: {f.answer}\n"
              f"  {f.message}".replace("\n", "\n  ")
              for s in all_stats for f in s.shown]
    report += [f"{s.label} [no answer] {e}" for s in all_stats for e in s.transport_errors[:3]]
    assert not any(s.failures or s.transport_errors for s in all_stats), (
        "\n".join(lines) + "\n\n" + "\n\n".join(report))

    # not vacuous: every operation ran its examples (one without parameters has one request, and
    # hypothesis stops there), POSTs mostly with the served name and version, and many infer
    # requests were answered 200 (so the answers' schema was checked, not only the errors')
    for s in all_stats:
        method, path = s.label.split(" ", 1)
        want = EXAMPLES[method] if "{" in path else 1
        assert s.examples >= want, f"{s.label}: {s.examples} of {want} examples"
        assert s.real_path >= (s.examples // 2 if method == "POST" else 1), s.label
    infer = [s for s in all_stats if s.label.endswith("/infer")]
    assert all(s.statuses[200] >= 10 and s.binary >= 3 for s in infer), (
        "too few infer requests were answered, in JSON or with binary data")
    assert seconds < TIME_BUDGET_S, f"took {seconds:.1f} s, budget {TIME_BUDGET_S} s"


# ---------------------------------------------------------------- negative controls (no server)

BASE = "http://127.0.0.1:9"  # never called


@pytest.fixture(scope="module")
def schema() -> Any:
    return schemathesis.openapi.from_path(SPEC)


def _operation(schema: Any, method: str, path: str) -> Operation:
    op: Operation = schema[path][method]
    return op


def _answer(case: GenCase, status: int, body: Json = None, content: bytes | None = None,
            headers: dict[str, str] | None = None) -> schemathesis.Response:
    request = httpx.Request(case.method, BASE + case.formatted_path)
    if content is None:
        response = httpx.Response(status, json=body, headers=headers, request=request)
    else:
        response = httpx.Response(status, content=content, headers=headers, request=request)
    response.elapsed = timedelta(milliseconds=1)  # as if it had been received
    return schemathesis.Response.from_any(response)


def _fails(case: GenCase, response: schemathesis.Response, check: CheckFunction) -> bool:
    try:
        case.validate_response(response, checks=[check])
    except FailureGroup:
        return True
    return False


GOOD_INFER: dict[str, Any] = {
    "model_name": "default", "model_version": "v1", "id": "7", "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]},
        {"name": "label", "datatype": "INT64", "shape": [1], "data": [1]}]}


@pytest.mark.parametrize("bad", [
    {"model_version": "v1", "outputs": GOOD_INFER["outputs"]},  # no model_name
    {"model_name": "default", "outputs": [{"name": "label", "shape": [1], "data": [1]}]},
    {"model_name": "default", "outputs": [{"name": "label", "datatype": "INT64",
                                           "shape": ["1"], "data": [1]}]},
    {"model_name": "default", "outputs": [{"name": "label", "datatype": "INT64", "shape": [1],
                                           "data": {"0": 1}}]},
    {"model_name": "default", "outputs": [], "parameters": [1]},
    {"model_name": 3, "outputs": []},
], ids=["no-model_name", "no-datatype", "string-dim", "data-object", "parameters-list",
        "name-number"])
def test_the_schema_check_fails_malformed_infer_answers(schema: Any, bad: Json) -> None:
    op = _operation(schema, "POST", "/v2/models/{MODEL_NAME}/infer")
    case = op.Case(path_parameters={"MODEL_NAME": "default"}, body={"inputs": []},
                   media_type="application/json")
    assert not _fails(case, _answer(case, 200, GOOD_INFER), response_schema_conformance)
    assert _fails(case, _answer(case, 200, bad), response_schema_conformance)
    assert _fails(case, _answer(case, 200, content=b"[]", headers={
        "content-type": "text/plain"}), content_type_conformance)


def test_the_schema_check_fails_malformed_metadata(schema: Any) -> None:
    server_op = _operation(schema, "GET", "/v2")
    case = server_op.Case()
    server = {"name": "bnserve", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
    assert not _fails(case, _answer(case, 200, server), response_schema_conformance)
    assert _fails(case, _answer(case, 200, {"name": "bnserve", "version": "0.1.0"}),
                  response_schema_conformance)  # extensions is required
    assert _fails(case, _answer(case, 400, {"message": "no"}), response_schema_conformance)
    model_op = _operation(schema, "GET", "/v2/models/{MODEL_NAME}")
    case = model_op.Case(path_parameters={"MODEL_NAME": "default"})
    good: dict[str, Any] = {"name": "default", "versions": ["v1"], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 30]}],
            "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}]}
    assert not _fails(case, _answer(case, 200, good), response_schema_conformance)
    for bad in ({**good, "platform": None}, {k: v for k, v in good.items() if k != "platform"},
                {**good, "versions": "v1"}, {**good, "inputs": [{"name": "features"}]}):
        assert _fails(case, _answer(case, 200, bad), response_schema_conformance), bad


def test_status_and_server_error_checks_fail(schema: Any) -> None:
    op = _operation(schema, "GET", "/v2/models/{MODEL_NAME}/ready")
    case = op.Case(path_parameters={"MODEL_NAME": "default"})
    assert not _fails(case, _answer(case, 404, {"error": "x"}), status_code_conformance)
    assert _fails(case, _answer(case, 400, {"error": "x"}), status_code_conformance)
    assert _fails(case, _answer(case, 500, {"error": "x"}), not_a_server_error)
    assert not _fails(case, _answer(case, 200, {"name": "default", "ready": True}),
                      not_a_server_error)


def test_error_and_binary_checks_fail(schema: Any) -> None:
    op = _operation(schema, "POST", "/v2/models/{MODEL_NAME}/infer")
    case = op.Case(path_parameters={"MODEL_NAME": "default"}, body={"inputs": []},
                   media_type="application/json")
    assert error_answer(op, _answer(case, 404, {"error": "no model"})) is None
    assert error_answer(op, _answer(case, 422, {"detail": [{"msg": "x"}]})) is not None
    assert error_answer(op, _answer(case, 503, {"error": "busy"})) is not None
    assert error_answer(op, _answer(case, 400, content=b"bad", headers={
        "content-type": "text/plain"})) is not None

    header = {"model_name": "default", "outputs": [
        {"name": "label", "datatype": "INT64", "shape": [2],
         "parameters": {"binary_data_size": 16}},
        {"name": "probabilities", "datatype": "FP32", "shape": [2, 2],
         "data": [0.5, 0.5, 0.5, 0.5]}]}

    def binary(head: Json, tail: bytes) -> schemathesis.Response:
        raw = json.dumps(head).encode()
        return _answer(case, 200, content=raw + tail, headers={
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(raw))})

    assert binary_answer(binary(header, bytes(16))) is None
    assert binary_answer(binary(header, bytes(12))) is not None  # short data
    wrong = json.loads(json.dumps(header))
    wrong["outputs"][0]["parameters"]["binary_data_size"] = 12
    assert binary_answer(binary(wrong, bytes(12))) is not None  # not shape x 8 bytes
    assert binary_answer(binary({"outputs": header["outputs"]}, bytes(16))) is not None

    served = Served("default", "v1", (30,), ("probabilities", "label"))
    right = op.Case(path_parameters={"MODEL_NAME": "default"}, media_type="application/json",
                    body={"id": "7", "inputs": []})
    assert infer_answer(right, served, GOOD_INFER) is None
    asked = op.Case(path_parameters={"MODEL_NAME": "default"}, media_type="application/json",
                    body={"id": "8", "inputs": [], "outputs": [{"name": "label"}]})
    problem = infer_answer(asked, served, GOOD_INFER)
    assert problem is not None
    assert "id '7'" in problem
    assert "outputs" in problem
    short = {**GOOD_INFER, "outputs": [{**GOOD_INFER["outputs"][0], "data": [0.25]}]}
    problem = infer_answer(right, served, short)
    assert problem is not None
    assert "1 values for shape [1, 2]" in problem

