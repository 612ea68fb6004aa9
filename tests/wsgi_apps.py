"""WSGI apps for the HTTP tests (in process, and as ``npipe serve-wsgi wsgi_apps:app`` in a
subprocess): a real Flask app, and a bare WSGI function that raises.

GET  /hello              -> "hello"
GET  /caller             -> JSON of environ["npipe.caller"] and the HTTP version
POST /digest             -> JSON {"length", "sha256", "reads"} of the body, read in pieces
POST /echo               -> the body back
GET  /big?n=N            -> N bytes of http_apps.pattern(N), streamed in 64 KiB chunks
GET  /slow?s=SECONDS     -> "done" after sleeping (the most running at once: /busiest)
GET  /busiest            -> JSON {"busiest": the most /slow requests running at once}
GET  /boom               -> raises (the server answers 500)
GET  /empty              -> 204, no body
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Flask, Response, jsonify, request
from http_apps import pattern

app = Flask("wsgi_apps")
_running = {"now": 0, "busiest": 0}
_lock = threading.Lock()


def caller_json(environ: dict[str, Any]) -> dict[str, Any]:
    who = environ.get("npipe.caller")
    out: dict[str, Any] = {"protocol": environ.get("SERVER_PROTOCOL"),
                           "thread": threading.current_thread().name}
    if who is not None:
        out.update(transport=who.transport, uid=who.uid, user=who.user, account=who.account,
                   domain=who.domain, name=who.name, pid=who.pid)
    return out


@app.get("/hello")
def hello() -> str:
    return "hello"


@app.get("/caller")
def caller() -> Response:
    return jsonify(caller_json(request.environ))


@app.post("/digest")
def digest() -> Response:
    sha, length, reads = hashlib.sha256(), 0, 0
    while chunk := request.stream.read(65536):
        sha.update(chunk)
        length += len(chunk)
        reads += 1
    return jsonify(length=length, sha256=sha.hexdigest(), reads=reads)


@app.post("/echo")
def echo() -> Response:
    return Response(request.get_data(), mimetype="application/octet-stream")


@app.get("/big")
def big() -> Response:
    n = int(request.args.get("n", "0"))

    def chunks() -> Iterator[bytes]:
        data = pattern(n)
        for i in range(0, n, 65536):
            yield data[i:i + 65536]

    return Response(chunks(), mimetype="application/octet-stream")


@app.get("/slow")
def slow() -> str:
    with _lock:
        _running["now"] += 1
        _running["busiest"] = max(_running["busiest"], _running["now"])
    try:
        time.sleep(float(request.args.get("s", "1")))
    finally:
        with _lock:
            _running["now"] -= 1
    return "done"


@app.get("/busiest")
def busiest() -> Response:
    return jsonify(busiest=_running["busiest"])


@app.get("/boom")
def boom() -> str:
    raise RuntimeError("boom")


@app.get("/empty")
def empty() -> tuple[str, int]:
    return "", 204


def bare(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """A WSGI function without a framework: /boom raises before start_response."""
    if environ["PATH_INFO"] == "/boom":
        raise ValueError("bare boom")
    who = environ.get("npipe.caller")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"bare ", (who.name if who is not None else "nobody").encode()]
