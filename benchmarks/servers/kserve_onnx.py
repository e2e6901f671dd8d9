"""KServe's own Python model server on the same ONNX file, over the Open Inference Protocol (V2).

Written the way KServe's documentation shows a custom model served over V2 REST: a
``kserve.Model`` whose ``load()`` opens the ONNX Runtime session and whose ``predict()`` takes
the ``InferRequest`` and returns an ``InferResponse`` (the outputs built as
``kserve.utils.utils.get_predict_response`` builds them, so binary outputs work when asked for),
served by ``kserve.ModelServer`` with one worker and KServe's defaults otherwise: its uvicorn
(uvloop, httptools), its access log and per-request latency log (to this process's output, a
file in the benchmark), its timing middleware and Prometheus histograms. Two changes, neither
on the request path: it listens on 127.0.0.1 (KServe binds 0.0.0.0, with no option to change
it), and its gRPC server is off (``--enable_grpc false``), since nothing here speaks gRPC.

Runs in its own virtual environment (benchmarks/kserve_env.py), never bnserve's: KServe pins its
own FastAPI, uvicorn, pydantic and gRPC. So this file imports nothing from bnserve.

    python kserve_onnx.py --http_port 8080 --model_name default --model_path models/default.onnx
"""

from __future__ import annotations

import argparse
from typing import Any

import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
from kserve.protocol.rest.server import RESTServer
from kserve.utils.utils import generate_uuid

HOST = "127.0.0.1"


class OnnxModel(Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.session: ort.InferenceSession | None = None
        self.load()

    def load(self) -> bool:
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None
                ) -> InferResponse:
        assert self.session is not None
        x = payload.inputs[0].as_numpy()
        # by name: bnserve files also carry drift.* monitoring outputs, not served over V2
        probabilities, label = self.session.run(["probabilities", "label"], {self.input_name: x})
        binary = payload.use_binary_outputs
        outputs = []
        for name, value, datatype in (("probabilities", probabilities, "FP32"),
                                      ("label", label, "INT64")):
            output = InferOutput(name=name, shape=list(value.shape), datatype=datatype)
            output.set_data_from_numpy(value, binary_data=binary)
            outputs.append(output)
        return InferResponse(model_name=self.name, infer_outputs=outputs,
                             response_id=payload.id or generate_uuid(),
                             use_binary_outputs=binary, requested_outputs=payload.request_outputs)


class LoopbackRESTServer(RESTServer):
    """KServe's REST server, bound to 127.0.0.1 instead of its hard-coded 0.0.0.0."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = HOST


def main() -> None:
    # KServe's own flags (--http_port, --enable_grpc, --model_name, ...) plus the model file.
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_path", required=True)
    args, _ = parser.parse_known_args()
    model_server.RESTServer = LoopbackRESTServer  # type: ignore[misc]
    model = OnnxModel(args.model_name, args.model_path)
    ModelServer(http_port=args.http_port, workers=1, enable_grpc=args.enable_grpc).start([model])


if __name__ == "__main__":
    main()
