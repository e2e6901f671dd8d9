"""The request and response shapes, for the OpenAPI schema (/docs) and for tests.

The hot path never builds these models (it parses with orjson and checks with numpy); the tests
validate real responses against them with ``extra="forbid"``, which keeps the docs truthful.
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
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"features": [14.1, 19.3, 91.9, 654.9, 0.096, 0.104, 0.089, 0.049, 0.181, 0.063,
                          0.405, 1.217, 2.866, 40.3, 0.007, 0.025, 0.032, 0.012, 0.021, 0.004,
                          16.3, 25.7, 107.3, 880.6, 0.132, 0.254, 0.272, 0.115, 0.29, 0.084]},
        ]},
    )
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
    last_reload: ReloadInfo | None = Field(
        None, description="The last attempt to load a changed model file (BNSERVE_RELOAD_SECONDS "
        "or SIGHUP) in the worker that answered; null if none.",
    )
