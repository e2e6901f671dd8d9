"""The ceiling: a bare ASGI app that reads the request body and answers a fixed JSON body.

Whatever a request costs here is uvicorn, uvloop and httptools; no handler can be cheaper.
``/readyz`` answers too, so the benchmark can treat every server alike.
"""

from __future__ import annotations

from typing import Any

from stack import serve

BODY = (b'{"class":"benign","class_index":0,"probabilities":{"benign":0.9790862202644348,'
        b'"malignant":0.02091382071375847},"model_version":"sha-7e14ccec8f81"}')
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":  # lifespan: accept start-up and shutdown
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    more = True
    while more:  # consume the whole body, as any real handler must
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


if __name__ == "__main__":
    serve(lambda _model: app)
