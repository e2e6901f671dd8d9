"""The uvicorn settings bnserve-serve uses (app/cli.py), shared by the comparison servers.

The ceiling and the naive wrapper must run on the same stack as bnserve, or the ratios would
measure uvicorn options instead of handlers: uvloop, httptools with bnserve's write coalescing
(app/protocol.py), no uvicorn access log, no Server header, no X-Forwarded-* parsing, one
worker. ``--stock-http`` runs uvicorn's own httptools protocol instead, to show what the
coalescing is worth on its own.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import uvicorn

from app.protocol import PROTOCOL


def serve(make_app: Callable[[str], Any]) -> None:
    """``--port N [--model path.onnx] [--stock-http]``: build the app for that model, serve it."""
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="")
    p.add_argument("--stock-http", action="store_true")
    args = p.parse_args()
    uvicorn.run(
        make_app(args.model), host="127.0.0.1", port=args.port, loop="uvloop",
        http="httptools" if args.stock_http else PROTOCOL, lifespan="on", access_log=False,
        server_header=False, proxy_headers=False, log_level="warning", timeout_keep_alive=5,
    )
