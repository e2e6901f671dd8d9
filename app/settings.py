"""Every setting of the service, in one place, read from ``BNSERVE_*`` environment variables.

Example: ``BNSERVE_MODEL_PATH=models/default.onnx BNSERVE_WORKERS=2 bnserve-serve``.
An empty variable counts as unset (so ``BNSERVE_INTRA_OP_THREADS=`` means "auto").
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.cpus import CpuBudget, cpu_budget

LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Settings(BaseSettings):
    """Configuration of ``bnserve-serve``; each field is the env var ``BNSERVE_<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix="BNSERVE_", env_ignore_empty=True, extra="ignore", frozen=True,
        protected_namespaces=(),
    )

    model_path: Path = Field(
        default=Path("models/default.onnx"),
        description="ONNX file written by bnserve-export (relative paths are from the cwd).",
    )
    model_name: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="The model's name in the Open Inference Protocol's routes "
        "(/v2/models/<name>); default: the model file's name without .onnx.",
    )
    host: str = Field(
        default="127.0.0.1",
        description="Interface to listen on; a container sets 0.0.0.0.",
    )
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on.")
    workers: int = Field(
        default=1, ge=1,
        description="Worker processes sharing the port (uvicorn's supervisor restarts dead ones).",
    )
    intra_op_threads: int | None = Field(
        default=None, ge=1,
        description="ONNX Runtime intra-op threads per worker. Unset: the CPU budget (affinity "
        "and cgroup quota) divided by workers, at least 1.",
    )
    inter_op_threads: int | None = Field(
        default=None, ge=1,
        description="ONNX Runtime inter-op threads per worker. Unset: 1, because the graph is a "
        "chain run in sequential mode, where inter-op threads are never used.",
    )
    max_body_bytes: int = Field(
        default=1024 * 1024, ge=64,
        description="Largest request body accepted; larger ones get 413 before they are parsed. "
        "256 instances of the default model by name are about 200 KB of JSON.",
    )
    max_batch: int = Field(
        default=256, ge=1,
        description="Most instances accepted by POST /predict/batch (more get 413).",
    )
    batching: bool = Field(
        default=False,
        description="Adaptive batching: concurrent POST /predict requests share one ONNX Runtime "
        "run (answers are bit-identical; a request with no company runs at once).",
    )
    batch_max_size: int = Field(
        default=64, ge=1,
        description="With batching: most examples in one run (capped at BNSERVE_MAX_BATCH, the "
        "largest run warm-up proves row-wise identical).",
    )
    batch_max_wait_ms: float = Field(
        default=0.0, ge=0, le=1000,
        description="With batching: how long a request that found company may wait for more. "
        "0: only requests ready in the same event-loop iteration join; a lone request never waits.",
    )
    log_level: LogLevel = Field(
        default="info", description="critical, error, warning, info or debug."
    )
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto",
        description="auto: text when stdout is a terminal, else json; json: one JSON object per "
        "line; text: human-readable lines.",
    )
    docs_enabled: bool = Field(default=True, description="Serve /docs and /openapi.json.")
    fail_fast: bool = Field(
        default=False,
        description="A missing, corrupt or wrong-interface model makes the command exit non-zero "
        "at start. False: the service runs, stays unready (/readyz 503) and logs why.",
    )
    keep_alive_seconds: int = Field(
        default=5, ge=1,
        description="Idle keep-alive connections are closed after this long. Behind a load "
        "balancer or proxy, set it above the proxy's idle timeout, or the proxy may reuse a "
        "connection just as it closes.",
    )
    shutdown_delay_seconds: float = Field(
        default=0.0, ge=0,
        description="After SIGTERM, keep accepting requests this long with /readyz already 503, so "
        "load balancers stop routing here before the listener closes (Kubernetes: a few seconds).",
    )
    shutdown_grace_seconds: int = Field(
        default=20, ge=1,
        description="After the listener closes, how long in-flight requests may take to finish "
        "before they are cancelled and the process exits.",
    )
    # ---- issue 10: limits and timeouts per connection, model size, reload, access
    max_pipelined_requests: int = Field(
        default=16, ge=1,
        description="Requests one connection may have queued (pipelined, not yet answered); "
        "past this the server stops reading from it until answers are written.",
    )
    max_header_bytes: int = Field(
        default=16 * 1024, ge=1024,
        description="Largest request line plus headers; larger heads get 431 and the connection "
        "is closed.",
    )
    max_headers: int = Field(
        default=100, ge=8, description="Most header fields in a request (more get 431)."
    )
    header_timeout_seconds: float = Field(
        default=10.0, gt=0,
        description="A connection must send a complete request head within this long of opening "
        "(or of its previous answer); otherwise it is closed.",
    )
    body_timeout_seconds: float = Field(
        default=30.0, gt=0,
        description="A request body must arrive in full within this long of its head; otherwise "
        "the request is answered 408 and the connection closed.",
    )
    max_model_bytes: int = Field(
        default=1024**3, ge=1,
        description="Largest model file loaded (bytes); a larger one is refused with a clear "
        "message before it is read.",
    )
    reload_seconds: float = Field(
        default=0.0, ge=0,
        description="Hot reload: check the model file this often (0: never) and, when it "
        "changed, load, check and warm the new one beside the old, then switch atomically; a "
        "bad file leaves the old model serving. SIGHUP triggers a check at once.",
    )
    api_keys: str | None = Field(
        default=None, repr=False,
        description="Comma-separated bearer tokens; when set (or api_keys_file), the prediction "
        "routes need 'Authorization: Bearer <token>'. Probes and metrics never do.",
    )
    api_keys_file: Path | None = Field(
        default=None, description="A file with one bearer token per line (see api_keys)."
    )
    expose_details: bool = Field(
        default=False,
        description="GET /model also shows file-system paths and library versions.",
    )
    metrics_dir: Path | None = Field(
        default=None,
        description="Directory for Prometheus multiprocess files, wiped at start. Unset: a "
        "temporary directory when workers > 1, plain in-process metrics otherwise.",
    )
    # ---- issue 13: drift monitoring with the model's own batch-norm statistics (app/drift.py)
    drift: bool = Field(
        default=True,
        description="Drift monitoring: compare what is served with the statistics the model "
        "carries (metadata drift_reference), per feature and batch-norm channel; GET /drift and "
        "the bnserve_drift_* metrics. Models without a reference are not monitored.",
    )
    drift_time_constant: float = Field(
        default=1000.0, ge=1.0,
        description="Served examples the drift estimate averages over: an exponentially "
        "weighted average in which each watched example weighs sample_every / this.",
    )
    drift_sample_every: int = Field(
        default=8, ge=1,
        description="Watch every k-th ONNX Runtime run (1: all) with all its examples, to bound "
        "the cost: in a serving process a watched single-example run costs about 15 us more, "
        "against 130-140 us of server CPU per request (make bench-drift, 2 vCPUs).",
    )
    drift_min_examples: int = Field(
        default=100, ge=0,
        description="A worker exports drift scores to /metrics only once its estimate rests on "
        "this many watched examples (0 until then), so a fresh worker cannot raise an alert.",
    )

    @property
    def drift_watched_time_constant(self) -> float:
        """The monitor's time constant, in watched examples (at least 1)."""
        return max(1.0, self.drift_time_constant / self.drift_sample_every)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    def cpu_budget(self) -> CpuBudget:
        return cpu_budget()

    def threads(self, budget: CpuBudget | None = None) -> tuple[int, int]:
        """(intra-op, inter-op) threads per worker, explicit settings winning over the budget."""
        if self.intra_op_threads is not None:
            intra = self.intra_op_threads
        else:
            intra = max(1, (budget or self.cpu_budget()).cpus // self.workers)
        return intra, self.inter_op_threads or 1
