"""One codec per protocol: a request body -> a float32 tensor, the model's outputs -> an answer.

Between the two sits one data plane (app/plane.py), the same for every protocol: an example's
answer cannot depend on how it was asked for. A codec raises ``ServiceError``s only; how an error
looks on the wire is decided per protocol in one place (app/errors.py ``render``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from app.predictor import F32, Outputs
from app.state import Model

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Decoded:
    x: F32  # float32 [N, *input_shape]
    single: bool  # exactly one example, asked for alone: it may share a run (app/batching.py)
    context: Any = None  # what the codec's encoder needs besides the outputs (V2: id, outputs)


class Codec(Protocol):
    def check_content_type(self, content_type: bytes | None) -> None: ...

    def decode(self, model: Model, body: bytes, header_length: bytes | None) -> Decoded: ...

    def encode(self, model: Model, outputs: Outputs, decoded: Decoded) -> tuple[bytes, Headers]:
        ...
