"""Triton's own client (``tritonclient[http]``) against a real ``bnserve-serve`` process: the code
one writes for Triton works by changing only the URL, and its answers are ``POST /predict``'s,
bit for bit, in JSON and with binary tensor data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.app.conftest import ContractModel, Server, Trained, start_process, stop

pytestmark = pytest.mark.slow
Array = np.ndarray[Any, Any]


@pytest.fixture(scope="module")
def server(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_process(trained.path, tmp_path_factory.mktemp("v2"))
    s.wait_ready()
    yield s
    stop(s)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Any]:
    c = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


def _rows(trained: Trained, n: int) -> Array:
    return trained.x_val[:n].astype(np.float32)


def _predict(server: Server, rows: Array) -> list[dict[str, Any]]:
    answers = []
    for row in rows:
        r = httpx.post(server.url + "/predict", json={"features": row.tolist()})
        assert r.status_code == 200, r.text
        answers.append(r.json())
    return answers


def _infer_input(rows: Array, binary: bool) -> Any:
    inp = triton.InferInput("features", list(rows.shape), "FP32")
    inp.set_data_from_numpy(rows, binary_data=binary)
    return inp


def test_health_metadata_and_readiness_as_triton_code_reads_them(
    client: Any, trained: Trained
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("default")
    assert client.is_model_ready("default", trained.model_version)
    assert not client.is_model_ready("default", "sha-000000000000")
    assert not client.is_model_ready("other")
    server_meta = client.get_server_metadata()
    assert server_meta["name"] == "bnserve"
    assert "binary_tensor_data" in server_meta["extensions"]
    meta = client.get_model_metadata("default")
    assert meta == {
        "name": "default", "versions": [trained.model_version], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 30]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
                    {"name": "label", "datatype": "INT64", "shape": [-1]}],
    }
    assert client.get_model_metadata("default", trained.model_version) == meta
    with pytest.raises(InferenceServerException, match="not served here"):
        client.get_model_metadata("other")


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
@pytest.mark.parametrize("n", [1, 7])
def test_infer_equals_predict_bit_for_bit(
    client: Any, server: Server, trained: Trained, n: int, binary_in: bool, binary_out: bool
) -> None:
    rows = _rows(trained, n)
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary_out),
               triton.InferRequestedOutput("label", binary_data=binary_out)]
    result = client.infer("default", [_infer_input(rows, binary_in)], outputs=outputs,
                          request_id=f"req-{n}")
    probs, labels = result.as_numpy("probabilities"), result.as_numpy("label")
    assert probs.dtype == np.float32
    assert probs.shape == (n, 2)
    assert labels.dtype == np.int64
    assert labels.shape == (n,)
    answer = result.get_response()
    assert answer["id"] == f"req-{n}"
    assert answer["model_name"] == "default"
    assert answer["model_version"] == trained.model_version
    for i, expected in enumerate(_predict(server, rows)):
        want = np.array([expected["probabilities"][c] for c in trained.class_names], np.float32)
        assert probs[i].tobytes() == want.tobytes()  # bit for bit
        assert labels[i] == expected["class_index"]


def test_default_request_asks_every_output_in_binary(
    client: Any, server: Server, trained: Trained
) -> None:
    """Without outputs named, tritonclient sets binary_data_output: all outputs come binary."""
    rows = _rows(trained, 3)
    result = client.infer("default", [_infer_input(rows, True)])
    answer = result.get_response()
    assert [o["name"] for o in answer["outputs"]] == ["probabilities", "label"]
    assert all("data" not in o and o["parameters"]["binary_data_size"] > 0
               for o in answer["outputs"])
    np.testing.assert_array_equal(
        result.as_numpy("label"), [p["class_index"] for p in _predict(server, rows)])


def test_one_requested_output_and_a_version_in_the_path(
    client: Any, trained: Trained
) -> None:
    rows = _rows(trained, 2)
    result = client.infer("default", [_infer_input(rows, False)],
                          model_version=trained.model_version,
                          outputs=[triton.InferRequestedOutput("label", binary_data=False)])
    answer = result.get_response()
    assert [o["name"] for o in answer["outputs"]] == ["label"]
    assert result.as_numpy("probabilities") is None
    with pytest.raises(InferenceServerException, match="has no version"):
        client.infer("default", [_infer_input(rows, False)], model_version="sha-000000000000")


def test_errors_reach_tritonclient_with_the_message(client: Any, trained: Trained) -> None:
    bad = _rows(trained, 1).copy()
    bad[0, 4] = np.nan
    with pytest.raises(InferenceServerException, match=r"data\[4\].*is NaN"):
        client.infer("default", [_infer_input(bad, True)])
    wrong = triton.InferInput("features", [1, 29], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 29), np.float32))
    with pytest.raises(InferenceServerException, match=r"expected shape \[N, 30\]"):
        client.infer("default", [wrong])
    as_bool = triton.InferInput("features", [1, 30], "BOOL")
    as_bool.set_data_from_numpy(np.zeros((1, 30), bool))
    with pytest.raises(InferenceServerException, match="not booleans"):
        client.infer("default", [as_bool])
    assert client.is_server_ready()  # and it still answers
    assert client.infer("default", [_infer_input(_rows(trained, 1), True)]).as_numpy(
        "label").shape == (1,)


def test_integer_and_double_inputs_give_the_float32_answer(
    client: Any, trained: Trained
) -> None:
    rows = np.round(_rows(trained, 2))
    want = client.infer("default", [_infer_input(rows, True)]).as_numpy("probabilities")
    for dtype, name in ((np.float64, "FP64"), (np.int32, "INT32"), (np.int64, "INT64"),
                        (np.float16, "FP16")):
        for binary in (False, True):
            inp = triton.InferInput("features", [2, 30], name)
            inp.set_data_from_numpy(rows.astype(dtype), binary_data=binary)
            got = client.infer("default", [inp]).as_numpy("probabilities")
            np.testing.assert_array_equal(got, want, err_msg=f"{name} binary={binary}")


def test_route_labels_are_templates_and_the_access_log_has_the_path(
    client: Any, server: Server, trained: Trained
) -> None:
    client.infer("default", [_infer_input(_rows(trained, 1), True)],
                 headers={"X-Request-ID": "v2-log-check"})
    metrics = httpx.get(server.url + "/metrics").text
    assert 'route="/v2/models/{model_name}/infer",status="200"' in metrics
    assert "/v2/models/default" not in metrics  # never the raw path
    line = next(e for e in server.json_logs() if e.get("request_id") == "v2-log-check")
    assert line["path"] == "/v2/models/default/infer"
    assert line["status"] == 200


def test_values_and_image_models_over_v2(
    contract_models: dict[str, ContractModel], tmp_path: Path
) -> None:
    """Other shapes and output kinds: the model's own output, equal to /predict's values."""
    for m in (contract_models["sequence"], contract_models["image"]):
        s = start_process(m.path, tmp_path / m.name, BNSERVE_MODEL_NAME="mine")
        try:
            s.wait_ready()
            c = triton.InferenceServerClient(s.url.removeprefix("http://"))
            x = m.examples(3).astype(np.float32)
            names = [o["name"] for o in c.get_model_metadata("mine")["outputs"]]
            result = c.infer("mine", [_infer_input(x, True)])
            for i in range(3):
                r = httpx.post(s.url + "/predict", json={"features": x[i].tolist()}).json()
                key = "values" if m.output_kind == "values" else "probabilities"
                got = result.as_numpy(names[0])[i]
                want = (np.array(r["values"], np.float32) if key == "values" else
                        np.array([r["probabilities"][k] for k in m.class_names or []],
                                 np.float32))
                assert got.tobytes() == want.tobytes(), m.name
            c.close()
        finally:
            stop(s)


def test_binary_body_with_raw_http(server: Server, trained: Trained) -> None:
    """The extension by hand: the JSON header, then the tensor's little-endian bytes."""
    rows = _rows(trained, 2)
    raw = rows.astype("<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "features", "shape": [2, 30], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    r = httpx.post(server.url + "/v2/models/default/infer", content=head + raw,
                   headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"  # nothing asked as binary
    assert [o["shape"] for o in r.json()["outputs"]] == [[2, 2], [2]]
    short = httpx.post(server.url + "/v2/models/default/infer", content=head + raw[:-4],
                       headers={"Inference-Header-Content-Length": str(len(head))})
    assert short.status_code == 400
    assert "'binary_data_size' is 240 but 236 bytes follow" in short.json()["error"]
