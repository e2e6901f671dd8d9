"""``/docs`` with no internet access, and OpenAPI examples from the model served (issue 12).

Swagger UI's files come from bnserve itself (app/static/swagger-ui/, unchanged from the npm
package ``swagger-ui-dist``); the request examples of ``/predict``, ``/predict/batch`` and the V2
infer routes are the served model's: the inputs bnserve-export stored in the file, or zeros of
its input shape for a file without them; each is a valid request (200). The slow tests drive a
real ``bnserve-serve``: every example posted to it, and Debian's ``chromium``, headless, with
every address but 127.0.0.1 unreachable, rendering the page (the DOM lists the routes and shows
the model's example; the network log shows that the page asked nothing of any other host; the
screenshot is a page, not a blank).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import socket
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app import docs, routes, schemas
from app.predictor import Predictor
from app.reload import publish
from tests.app.conftest import ContractModel, MakeClient, StartServer, Trained

INFER = "/v2/models/{model_name}/infer"
INFER_VERSION = "/v2/models/{model_name}/versions/{model_version}/infer"
REQUEST_MODELS: dict[str, type[Any]] = {
    "/predict": schemas.PredictRequest, "/predict/batch": schemas.BatchRequest,
    INFER: schemas.V2InferRequest, INFER_VERSION: schemas.V2InferRequest,
}
Example = tuple[str, str, Any]  # (path template, example name, request body)


def examples_of(doc: dict[str, Any]) -> list[Example]:
    found = []
    for path, ops in doc["paths"].items():
        for op in ops.values():
            content = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            found += [(path, name, ex["value"]) for name, ex in content.get("examples", {}).items()]
    return found


def concrete(doc: dict[str, Any], template: str) -> str:
    """The path with its parameters filled in from their documented examples."""
    op = doc["paths"][template]["post"]
    path = template
    for p in op.get("parameters", ()):
        path = path.replace("{" + p["name"] + "}", p["example"])
    return path


def check_valid(doc: dict[str, Any], examples: list[Example]) -> None:
    """Each example against its route's request model and the document's own JSON schema."""
    for template, name, value in examples:
        REQUEST_MODELS[template].model_validate(value)
        ref = doc["paths"][template]["post"]["requestBody"]["content"]["application/json"][
            "schema"]["$ref"]
        validator = jsonschema.Draft202012Validator(
            {"$ref": ref, "components": doc["components"]})
        errors = [e.message for e in validator.iter_errors(value)]
        assert not errors, (template, name, errors[:3])


def post_all(doc: dict[str, Any], post: Callable[[str, Any], httpx.Response]) -> dict[str, Any]:
    """Every example posted to its route: all 200; the answers by (template, name)."""
    answers = {}
    examples = examples_of(doc)
    for template, name, value in examples:
        r = post(concrete(doc, template), value)
        assert r.status_code == 200, (template, name, r.text)
        answers[f"{template} {name}"] = r.json()
    return answers


# ---------------------------------------------------------------- Swagger UI from bnserve itself


def source_sums() -> dict[str, str]:
    """file -> sha256 from the table in app/static/swagger-ui/SOURCE.md."""
    text = (docs.STATIC / "SOURCE.md").read_text()
    return dict(re.findall(r"^\| `([^`]+)` \| \d+ \| `([0-9a-f]{64})` \|$", text, re.M))


def test_vendored_swagger_ui_is_the_released_files_with_their_licence() -> None:
    sums = source_sums()
    assert set(sums) >= {*routes.DOCS_FILES, "LICENSE", "NOTICE"}
    for name, digest in sums.items():
        assert hashlib.sha256((docs.STATIC / name).read_bytes()).hexdigest() == digest, name
    assert f"Swagger UI {docs.SWAGGER_UI_VERSION}" in (docs.STATIC / "SOURCE.md").read_text()
    assert "Apache License" in (docs.STATIC / "LICENSE").read_text()


def test_swagger_ui_files_are_package_data() -> None:
    """A wheel (the container image installs one) carries them: pyproject.toml says so."""
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    globs = project["tool"]["setuptools"]["package-data"].get("app", [])
    shipped = {f for g in globs for f in Path(docs.STATIC.parent.parent).glob(g)}
    assert {docs.STATIC / f for f in (*routes.DOCS_FILES, "LICENSE", "NOTICE")} <= shipped, globs


def test_docs_page_loads_everything_from_this_server(client: TestClient) -> None:
    r = client.get("/docs")
    assert r.status_code == 200
    page = r.text
    urls = re.findall(r"""(?:src|href)="([^"]+)\"""", page) + re.findall(r"url: '([^']+)'", page)
    assert sorted(urls) == sorted([f"/docs/assets/{f}?v={docs.SWAGGER_UI_VERSION}"
                                   for f in routes.DOCS_FILES] + ["/openapi.json"])
    assert "cdn" not in page
    assert '"validatorUrl": null' in page  # no badge from validator.swagger.io
    types = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    for name in routes.DOCS_FILES:
        r = client.get(f"/docs/assets/{name}?v={docs.SWAGGER_UI_VERSION}")
        assert r.status_code == 200
        assert r.content == (docs.STATIC / name).read_bytes()
        assert r.headers["content-type"].startswith(types[Path(name).suffix])
        assert "max-age" in r.headers["cache-control"]
        head = client.head(f"/docs/assets/{name}")
        assert head.status_code == 200
        assert head.content == b""


def test_unknown_assets_are_404_and_metrics_labels_stay_bounded(client: TestClient) -> None:
    for name in ("swagger-ui.js", "../settings.py", "LICENSE", "swagger-ui-bundle.js.map", ""):
        r = client.get(f"/docs/assets/{name}")
        assert r.status_code == 404, name
        assert "no route" in r.json()["error"]["message"]
    client.get("/docs/assets/swagger-ui.css")
    requests = [line for line in client.get("/metrics").text.splitlines()
                if line.startswith("bnserve_requests_total{")]
    labels = {re.search(r'route="([^"]*)"', line).group(1) for line in requests}  # type: ignore[union-attr]
    assert "/docs/assets/swagger-ui.css" in labels
    assert not any("LICENSE" in label or "settings" in label for label in labels)
    assert "unmatched" in labels


def test_docs_off_turns_off_the_page_its_files_and_the_document(make_client: MakeClient) -> None:
    client = make_client(docs_enabled=False)
    for path in ("/docs", "/openapi.json", *(f"/docs/assets/{f}" for f in routes.DOCS_FILES)):
        assert client.get(path).status_code == 404, path


def test_missing_swagger_ui_files_refuse_to_start(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"Swagger UI's swagger-ui-bundle.js is missing .*"
                       r"BNSERVE_DOCS_ENABLED=false"):
        docs.Assets.load(tmp_path)


# ---------------------------------------------------------------- examples from the model served


def test_examples_are_the_default_models_validation_rows(client: TestClient,
                                                         trained: Trained) -> None:
    doc = client.get("/openapi.json").json()
    examples = examples_of(doc)
    check_valid(doc, examples)
    by = {(t, n): v for t, n, v in examples}
    rows = trained.x_val[:3].tolist()
    assert by["/predict", "one"] == {"features": rows[0]}
    assert by["/predict", "by_name"] == {"features": dict(zip(trained.feature_names, rows[0],
                                                              strict=True))}
    assert by["/predict/batch", "batch"] == {"instances": rows}
    for template in (INFER, INFER_VERSION):
        assert by[template, "one"]["inputs"] == [
            {"name": "features", "shape": [1, 30], "datatype": "FP32", "data": rows[0]}]
        assert by[template, "batch"]["inputs"][0]["shape"] == [3, 30]
    version = trained.model_version
    assert concrete(doc, INFER_VERSION) == f"/v2/models/default/versions/{version}/infer"
    assert "the first 3 rows of the validation set" in doc["info"]["description"]
    assert trained.model_version in doc["info"]["description"]
    # the hard-coded 30-feature example is gone from the schemas
    assert "examples" not in doc["components"]["schemas"]["PredictRequest"]

    answers = post_all(doc, lambda path, body: client.post(path, json=body))
    expected = trained.reference(trained.x_val[:3]).argmax(axis=1)
    assert answers["/predict one"]["class_index"] == expected[0]
    assert answers["/predict by_name"] == answers["/predict one"]
    assert [p["class_index"] for p in answers["/predict/batch batch"]["predictions"]] == list(
        expected)


@pytest.mark.parametrize("name", ["image", "sequence", "regression"])
def test_a_model_file_without_examples_gets_zeros_of_its_shape(
    make_client: MakeClient, contract_models: dict[str, ContractModel], name: str
) -> None:
    model = contract_models[name]
    client = make_client(model_path=model.path)
    doc = client.get("/openapi.json").json()
    examples = examples_of(doc)
    check_valid(doc, examples)
    by = {(t, n): v for t, n, v in examples}
    zeros = np.zeros(model.input_shape).tolist()
    assert by["/predict", "one"] == {"features": zeros}
    assert by["/predict/batch", "batch"] == {"instances": [zeros, zeros]}
    assert by[INFER, "one"]["inputs"][0]["shape"] == [1, *model.input_shape]
    assert (("/predict", "by_name") in by) == (model.feature_names is not None)
    assert "zeros of the model's input shape: the model file stores no example inputs" in doc[
        "info"]["description"]
    post_all(doc, lambda path, body: client.post(path, json=body))


@pytest.mark.parametrize("stored", ["[[1, 2]]", "[]", "[[NaN]]", "not json", '["a"]'])
def test_stored_examples_of_the_wrong_shape_are_replaced_by_zeros(trained: Trained,
                                                                  stored: str) -> None:
    info = Predictor.load(trained.path).info
    wrong = dataclasses.replace(info, metadata={**info.metadata, docs.EXAMPLES_KEY: stored})
    rows = docs.example_rows(wrong)
    assert rows is not None
    assert rows.rows == [[0.0] * 30] * 2
    assert not rows.stored
    assert "example_inputs are not finite numbers of shape [n, 30]" in rows.note
    right = docs.example_rows(info)
    assert right is not None
    assert right.stored
    assert right.rows == trained.x_val[:3].tolist()


def test_examples_respect_the_batch_and_body_limits(make_client: MakeClient,
                                                   trained: Trained) -> None:
    doc = make_client(max_batch=2).get("/openapi.json").json()
    by = {(t, n): v for t, n, v in examples_of(doc)}
    assert len(by["/predict/batch", "batch"]["instances"]) == 2
    assert by[INFER, "batch"]["inputs"][0]["shape"] == [2, 30]

    rows = trained.x_val[:3].tolist()
    limit = len(orjson.dumps({"instances": rows[:2]}))  # 2 rows fit, 3 do not
    named = {"features": dict(zip(trained.feature_names, rows[0], strict=True))}
    assert len(orjson.dumps(named)) > limit
    client = make_client(max_body_bytes=limit)
    doc = client.get("/openapi.json").json()
    by = {(t, n): v for t, n, v in examples_of(doc)}
    assert ("/predict", "by_name") not in by
    assert by["/predict/batch", "batch"]["instances"] == rows[:2]
    assert all(len(orjson.dumps(v)) <= limit for v in by.values())
    post_all(doc, lambda path, body: client.post(path, json=body))


def test_a_hot_reload_to_another_shape_changes_the_examples(
    client: TestClient, image_model: ContractModel
) -> None:
    before = client.get("/openapi.json").json()
    assert before["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"][
        "examples"]["one"]["value"]["features"].__len__() == 30
    new = Predictor.load(image_model.path)
    new.warm_up(8)
    publish(client.app.rt, new)  # type: ignore[attr-defined]  # what a reload does
    after = client.get("/openapi.json").json()
    one = after["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"][
        "examples"]["one"]["value"]
    assert np.asarray(one["features"]).shape == image_model.input_shape
    assert "image-v1" in after["info"]["description"]
    assert concrete(after, INFER_VERSION) == "/v2/models/default/versions/image-v1/infer"
    post_all(after, lambda path, body: client.post(path, json=body))
    assert client.get("/openapi.json").json() == after  # built once per model


# ---------------------------------------------------------------- a real server, a real browser


@pytest.fixture
def served(start_server: StartServer) -> Callable[..., str]:
    """``served(**settings)``: the URL of a ready bnserve-serve (stopped by start_server)."""
    def start(**settings: Any) -> str:
        server = start_server(**settings)
        server.wait_ready()
        return server.url

    return start


@pytest.mark.slow
@pytest.mark.parametrize("which", ["default", "image"])
def test_every_example_is_answered_200_by_a_real_server(
    served: Callable[..., str], image_model: ContractModel, which: str
) -> None:
    url = served(**({"model_path": image_model.path} if which == "image" else {}))
    doc = httpx.get(url + "/openapi.json").json()
    examples = examples_of(doc)
    assert len(examples) == (7 if which == "default" else 6)  # by name: 1-D models only
    check_valid(doc, examples)
    post_all(doc, lambda path, body: httpx.post(url + path, json=body))


CHROMIUM_INSTALL = "apt-get install -y chromium (make test installs it when it is missing)"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, f"Debian's chromium is not installed: {CHROMIUM_INSTALL}"
    return found


def browse(url: str, work: Path, name: str, screenshot: Path | None = None) -> tuple[str, list[
        tuple[str, str]]]:
    """Chromium, headless, on ``url`` with every host but 127.0.0.1 unreachable (a proxy that
    refuses connections, and a resolver that resolves nothing), run until the page is idle:
    the DOM, and every request it made with its initiator (from Chromium's network log)."""
    with socket.socket() as dead:  # bound, never listening: connections to it are refused
        dead.bind(("127.0.0.1", 0))
        netlog = work / f"{name}.netlog.json"
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--no-default-browser-check", "--disable-extensions", "--disable-sync",
               "--disable-background-networking", "--disable-component-update",
               f"--user-data-dir={work / (name + '.profile')}",
               f"--proxy-server=127.0.0.1:{dead.getsockname()[1]}",
               "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
               f"--log-net-log={netlog}", "--window-size=1280,1600",
               "--virtual-time-budget=15000", "--dump-dom"]
        if screenshot is not None:
            cmd.append(f"--screenshot={screenshot}")
        done = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=120,
                              check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    requests = [(e["params"]["url"], str(e["params"].get("initiator")))
                for e in log["events"] if e["type"] == start and "url" in e.get("params", {})]
    return done.stdout, requests


@pytest.mark.slow
def test_docs_render_in_a_headless_browser_with_no_internet(
    served: Callable[..., str], trained: Trained, tmp_path: Path
) -> None:
    url = served()
    shot = tmp_path / "docs.png"
    dom, requests = browse(url + "/docs", tmp_path, "top", screenshot=shot)

    # Swagger UI rendered the document: the title, the served model, every operation
    assert re.search(r"<h1 class=\"title\">bnserve<", dom), dom[-3000:]
    paths = re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom)
    assert {"/predict", "/predict/batch", INFER, INFER_VERSION, "/model"} <= set(paths), paths
    assert f"<code>{trained.model_version}</code>" in dom
    assert "Failed to load API definition" not in dom

    # the page asked nothing of any other host (Chromium's own background requests, which
    # have no page as initiator, went nowhere either: the proxy refuses them)
    page = [u for u, initiator in requests if initiator == url]
    assert page, requests
    assert all(u.startswith(url + "/") for u in page), page
    assert {u.removeprefix(url).split("?")[0] for u in page} >= {
        "/openapi.json", *(f"/docs/assets/{f}" for f in routes.DOCS_FILES)}

    # a page, not a blank: many colours, Swagger UI's POST green and GET blue (its CSS applied)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1600)
    colours = image.getcolors(1 << 24)
    assert colours is not None
    counts = {colour: n for n, colour in colours}
    top = max(counts.values()) / (image.size[0] * image.size[1])
    assert len(counts) > 200, len(counts)
    assert top < 0.9, top
    assert counts.get((73, 204, 144), 0) > 1000  # .opblock-post .opblock-summary-method
    assert counts.get((97, 175, 254), 0) > 1000  # .opblock-get
    print(f"\nDOM {len(dom)} chars; operations: {', '.join(paths)}\npage requests: "
          f"{', '.join(u.removeprefix(url) for u in page)}\nscreenshot {shot.stat().st_size} "
          f"bytes, {image.size[0]}x{image.size[1]}, {len(counts)} colours, the commonest "
          f"{top:.0%}; POST green {counts.get((73, 204, 144))} px, GET blue "
          f"{counts.get((97, 175, 254))} px\nother hosts Chromium tried (refused): "
          f"{sorted({u.split('/')[2] for u, _ in requests if not u.startswith(url)})}")

    # /predict opened by its deep link: the example shown is the model's first validation row
    dom, _ = browse(url + "/docs#/predict/predict_predict_post", tmp_path, "predict")
    assert "One example (stored in the model file)" in dom
    shown = [repr(v) for v in trained.x_val[0].tolist() if "e" not in repr(v)
             and not float(v).is_integer()]
    assert shown
    for value in shown:
        assert f">{value}<" in dom, value
