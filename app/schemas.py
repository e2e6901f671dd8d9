"""The request and response shapes, for the OpenAPI schema (/docs) and for tests.

The hot path never builds these models (it parses with orjson and checks with numpy); the tests
validate real responses against them with ``extra="forbid"``, which keeps the docs truthful.
The request examples in the OpenAPI document are the served model's (app/docs.py), not here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypeAliasType

_STRICT = ConfigDict(extra="forbid", populate_by_name=True)

# A number, or lists of lists ... of numbers: one example of a model whose examples have several
# dimensions, or one example's values.
Nested = TypeAliasType("Nested", "float | list[Nested]")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    features: list[float] | dict[str, float] | list[Nested] = Field(
        description="One example. 1-D examples (GET /model `input_shape` [F]): every feature "
        "value in the order of `feature_names`, or an object mapping each feature name to its "
        "value (all names, no others). Examples of more dimensions (e.g. [5, 40], [3, 32, 32]): "
        "nested lists of exactly that shape. Values are JSON numbers that stay finite in float32 "
        "(|x| <= 3.4028235e38): NaN, Infinity, strings, booleans, null, a wrong shape or ragged "
        "lists are rejected with 422, the message naming the position.",
    )


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[list[float] | dict[str, float] | list[Nested]] = Field(
        min_length=1,
        description="1 to BNSERVE_MAX_BATCH (default 256) examples, each as in POST /predict "
        "`features`; more get 413. No example influences another.",
    )


class Prediction(BaseModel):
    model_config = _STRICT
    class_: str = Field(alias="class", description="Predicted class name.")
    class_index: int = Field(description="Index of the predicted class in `class_names`.")
    probabilities: dict[str, float] = Field(
        description="Probability of every class, by class name (float32 values)."
    )
    model_version: str


class ValuesPrediction(BaseModel):
    """The answer of a model with output_kind "values" (regression, embeddings, ...)."""

    model_config = _STRICT
    values: Nested = Field(
        description="The model's output for this example, float32 values: nested lists of the "
        "shape of output `values` after the batch dimension (a number for an output [N])."
    )
    model_version: str


class BatchPrediction(BaseModel):
    model_config = _STRICT
    predictions: list[Prediction] = Field(
        description="One answer per instance, in order, each identical to POST /predict's "
        "answer for that instance alone."
    )
    model_version: str


class ValuesBatchPrediction(BaseModel):
    model_config = _STRICT
    predictions: list[ValuesPrediction] = Field(
        description="One answer per instance, in order, each identical to POST /predict's "
        "answer for that instance alone."
    )
    model_version: str


class ErrorDetail(BaseModel):
    model_config = _STRICT
    message: str = Field(description="What is wrong.")
    expected: str | None = Field(None, description="What a valid request looks like.")
    request_id: str = Field(description="Also in the X-Request-ID header and the server logs.")


class ErrorResponse(BaseModel):
    model_config = _STRICT
    error: ErrorDetail


class Liveness(BaseModel):
    model_config = _STRICT
    status: Literal["alive"]


class Readiness(BaseModel):
    model_config = _STRICT
    ready: bool
    reason: str = Field(description="'ready', or why not (loading, warming up, model not "
                        "loaded: ..., shutting down).")
    model_version: str | None


class TensorInfo(BaseModel):
    model_config = _STRICT
    name: str
    dtype: str
    shape: list[str | int] = Field(description="Symbolic dimensions by name, e.g. ['N', 30].")


class TrainingInfo(BaseModel):
    model_config = _STRICT
    train_accuracy: float | None
    val_accuracy: float | None
    n_train: int | None
    n_val: int | None
    data_sha256: str | None
    data_source: str | None


class FileInfo(BaseModel):
    model_config = _STRICT
    path: str | None = Field(None, description="Where the file is on the server; only with "
                             "BNSERVE_EXPOSE_DETAILS=true.")
    sha256: str = Field(description="sha256 of the file's bytes, as loaded.")
    size_bytes: int


class RuntimeInfo(BaseModel):
    model_config = _STRICT
    onnxruntime: str | None = Field(None, description="ONNX Runtime's version; only with "
                                    "BNSERVE_EXPOSE_DETAILS=true.")
    providers: list[str] | None = Field(None, description="Execution providers; only with "
                                        "BNSERVE_EXPOSE_DETAILS=true.")
    intra_op_threads: int
    inter_op_threads: int


class ReloadInfo(BaseModel):
    model_config = _STRICT
    at: str = Field(description="ISO 8601 UTC time of the attempt.")
    result: Literal["ok", "failed"] = Field(
        description="ok: the new file's model serves now; failed: the previous model still does."
    )
    reason: str = Field(description="'<old version> -> <new version>', or why the new file was "
                        "refused.")
    model_version: str | None = Field(description="The version served after the attempt.")


class DriftGroupInfo(BaseModel):
    model_config = _STRICT
    name: str
    kind: Literal["input", "batchnorm"]
    tensor: str = Field(description="The graph input, or the monitoring output drift.<name>.")
    channels: int
    skipped_channels: int = Field(description="Channels with reference std ~0 (dead): not scored.")


class ModelDrift(BaseModel):
    model_config = _STRICT
    monitoring: bool = Field(description="Whether this service watches it (BNSERVE_DRIFT).")
    time_constant: float | None = Field(
        description="BNSERVE_DRIFT_TIME_CONSTANT, in served examples.")
    sample_every: int | None = Field(description="BNSERVE_DRIFT_SAMPLE_EVERY: every k-th run is "
                                     "watched.")
    groups: list[DriftGroupInfo]


class ModelInfo(BaseModel):
    model_config = _STRICT
    model_version: str
    format: str
    output_kind: Literal["classifier", "values"] = Field(
        description="classifier: answers name a class; values: answers are the raw output."
    )
    input_shape: list[int] = Field(
        description="One example's dimensions (the input's shape without the batch), e.g. [30] "
        "or [3, 32, 32]."
    )
    feature_names: list[str] | None = Field(description="1-D examples only; else null.")
    class_names: list[str] | None = Field(description="Classifiers only; else null.")
    n_features: int | None = Field(description="len(feature_names), or null.")
    n_classes: int | None = Field(description="len(class_names), or null.")
    input: TensorInfo
    outputs: list[TensorInfo]
    fold_report: dict[str, Any] | None = Field(
        description="What bnserve-export --from-onnx folded (its summary, counts, what is left), "
        "as written in the file; null for models it trained itself."
    )
    source: str | None = Field(description="Where an imported model came from, e.g. its sha256.")
    estimator: str | None = Field(description="Batch-norm statistics used: ewma or population.")
    eps: float | None
    beta_avg: float | None
    averaging: str | None
    folded: bool | None = Field(description="Batch norm folded into the Gemm weights.")
    hidden: list[int] | None
    opset: int | None
    training: TrainingInfo
    file: FileInfo
    loaded_at: str = Field(description="ISO 8601 UTC time the model finished loading.")
    load_seconds: float
    warm_up_seconds: float
    runtime: RuntimeInfo
    metadata: dict[str, str] = Field(description="The file's metadata_props, verbatim.")
    drift: ModelDrift | None = Field(
        None, description="What drift monitoring watches (GET /drift); null: the model carries "
        "no drift_reference.",
    )
    last_reload: ReloadInfo | None = Field(
        None, description="The last attempt to load a changed model file (BNSERVE_RELOAD_SECONDS "
        "or SIGHUP) in the worker that answered; null if none.",
    )


class DriftChannel(BaseModel):
    model_config = _STRICT
    channel: int
    name: str | None = Field(description="The feature's name (input group), else null.")
    mean_shift: float | None = Field(description="|m - expected_mean| / expected_std.")
    log_var_ratio: float | None = Field(description="log(std^2 / expected_std^2), signed.")
    mean: float | None = Field(description="The served EWMA mean (bias-corrected).")
    std: float | None = Field(description="The served EWMA standard deviation.")
    expected_mean: float
    expected_std: float


class DriftGroup(BaseModel):
    model_config = _STRICT
    name: str
    kind: Literal["input", "batchnorm"]
    tensor: str
    channels: int
    skipped_channels: int
    worst_mean_shift: float | None
    worst_abs_log_var_ratio: float | None
    worst: list[DriftChannel] = Field(description="The worst channels first (by the larger of "
                                      "mean shift and |log variance ratio|).")


class DriftWorst(DriftChannel):
    group: str


class DriftSummary(BaseModel):
    model_config = _STRICT
    worst_mean_shift: float | None
    worst_abs_log_var_ratio: float | None
    worst: DriftWorst | None


class Drift(BaseModel):
    model_config = _STRICT
    model_version: str
    monitoring: bool = Field(description="false: not watched; 'reason' says why.")
    reason: str | None = Field(None, description="Why not watched (monitoring false).")
    worker_pid: int | None = Field(
        None, description="The worker that answered: with BNSERVE_WORKERS > 1 each worker "
        "estimates from the requests it served.")
    time_constant: float | None = Field(None, description="BNSERVE_DRIFT_TIME_CONSTANT, in "
                                        "served examples.")
    sample_every: int | None = Field(None, description="BNSERVE_DRIFT_SAMPLE_EVERY: every k-th "
                                     "ONNX Runtime run is watched, with all its examples.")
    min_examples: int | None = Field(None, description="BNSERVE_DRIFT_MIN_EXAMPLES.")
    examples: int | None = Field(None, description="Watched examples the estimate rests on.")
    dropped_examples: int | None = Field(None, description="Left out: a non-finite value.")
    summary: DriftSummary | None = None
    groups: list[DriftGroup] | None = None


# ------------------------------------------------------------ the Open Inference Protocol (V2)
# Field names and types as in its OpenAPI description (open_inference_rest.yaml).

V2Data = TypeAliasType("V2Data", "float | int | list[V2Data]")


class V2Error(BaseModel):
    model_config = _STRICT
    error: str = Field(description="What is wrong, and what a valid request looks like.")


class V2ServerMetadata(BaseModel):
    model_config = _STRICT
    name: str
    version: str
    extensions: list[str] = Field(description="binary_tensor_data: binary inputs and outputs.")


class V2Live(BaseModel):
    model_config = _STRICT
    live: bool


class V2Ready(BaseModel):
    model_config = _STRICT
    ready: bool


class V2ModelReady(BaseModel):
    model_config = _STRICT
    name: str
    ready: bool


class V2Tensor(BaseModel):
    model_config = _STRICT
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for the batch dimension.")


class V2ModelMetadata(BaseModel):
    model_config = _STRICT
    name: str = Field(description="The model file's stem, or BNSERVE_MODEL_NAME.")
    versions: list[str] = Field(description="The model version served (GET /model).")
    platform: str
    inputs: list[V2Tensor]
    outputs: list[V2Tensor]


class V2Parameters(BaseModel):
    model_config = ConfigDict(extra="allow")
    binary_data_size: int | None = Field(
        None, description="Bytes of this tensor's little-endian binary data after the JSON "
        "header (the Inference-Header-Content-Length header gives the header's length).")
    binary_data: bool | None = Field(None, description="On a requested output: answer it as "
                                     "binary data.")
    binary_data_output: bool | None = Field(None, description="On the request: answer every "
                                            "output as binary data.")


class V2InputTensor(BaseModel):
    model_config = _STRICT
    name: str = Field(description="'features'")
    shape: list[int] = Field(description="[N, *input_shape], 1 <= N <= BNSERVE_MAX_BATCH.")
    datatype: str = Field(description="FP32; FP16, FP64, INT8..INT64 and UINT8..UINT64 when "
                          "the values fit float32. BOOL and BYTES are refused (400).")
    parameters: V2Parameters | None = None
    data: V2Data | None = Field(None, description="Row-major values, flat or nested to `shape`; "
                                "absent with binary data.")


class V2RequestOutput(BaseModel):
    model_config = _STRICT
    name: str
    parameters: V2Parameters | None = None


class V2InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(None, description="Echoed in the answer.")
    parameters: V2Parameters | None = None
    inputs: list[V2InputTensor] = Field(min_length=1, max_length=1)
    outputs: list[V2RequestOutput] | None = Field(
        None, description="The outputs to answer (default: all).")


class V2OutputTensor(BaseModel):
    model_config = _STRICT
    name: str
    shape: list[int]
    datatype: str
    parameters: V2Parameters | None = None
    data: list[float] | list[int] | None = Field(None, description="Flat, row-major; absent "
                                                 "for binary data.")


class V2InferResponse(BaseModel):
    model_config = _STRICT
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2OutputTensor]
