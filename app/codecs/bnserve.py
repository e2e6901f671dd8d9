"""bnserve's own JSON: ``POST /predict`` (one example) and ``POST /predict/batch``.

The checks themselves live with the model's decoders and encoder (app/state.py: app/inputs.py for
1-D examples, app/tensors.py for nested lists, app/answers.py for the answers), built once per
model for its input shape and output kind.
"""

from __future__ import annotations

from app import inputs
from app.codecs import Decoded, Headers
from app.errors import UnsupportedMediaTypeError
from app.predictor import Outputs
from app.state import Model

JSON_HEADERS: Headers = [(b"content-type", b"application/json")]


def check_json(content_type: bytes | None) -> None:
    if content_type is None or content_type.split(b";", 1)[0].strip().lower() != (
        b"application/json"
    ):
        got = "none" if content_type is None else repr(content_type.decode(errors="replace"))
        raise UnsupportedMediaTypeError(f"unsupported Content-Type {got}",
                                        expected="Content-Type: application/json")


class BnserveCodec:
    def __init__(self, batch: bool) -> None:
        self.batch = batch

    def check_content_type(self, content_type: bytes | None) -> None:
        check_json(content_type)

    def decode(self, model: Model, body: bytes, header_length: bytes | None) -> Decoded:
        if self.batch:
            return Decoded(inputs.parse(body, model.batch), False)
        return Decoded(inputs.parse(body, model.single), True)

    def encode(self, model: Model, outputs: Outputs, decoded: Decoded) -> tuple[bytes, Headers]:
        # 422 if an output is not finite (app/answers.py)
        return model.answer(outputs, self.batch), JSON_HEADERS


SINGLE = BnserveCodec(batch=False)
BATCH = BnserveCodec(batch=True)
