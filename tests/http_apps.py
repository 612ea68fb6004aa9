"""A small raw-ASGI app for the HTTP tests (in process and as ``npipe serve-asgi
http_apps:app`` in a subprocess).

GET  /hello              -> "hello"
POST /echo               -> the body back
POST /digest             -> JSON {"length", "sha256"} of the body
GET  /big?n=N            -> N bytes of a known pattern (pattern(N))
GET  /stream?chunks=N    -> N chunks "chunk i\\n", sent one by one
GET  /slow?s=SECONDS     -> "done" after sleeping
GET  /caller             -> JSON of scope["extensions"]["npipe.caller"] and the HTTP version
GET  /lifespan           -> JSON of the lifespan counters and the request's scope["state"]
GET  /status?code=N      -> status N, body "status N"
GET  /headers            -> JSON of the request headers
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

LIFESPAN: dict[str, Any] = {"startup": 0, "shutdown": 0}


def pattern(n: int) -> bytes:
    block = bytes(range(256)) * 4096  # 1 MiB
    return (block * (n // len(block) + 1))[:n]


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _reply(send: Send, status: int, body: bytes, ctype: bytes = b"text/plain") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _caller_json(scope: Scope) -> dict[str, Any]:
    who = scope.get("extensions", {}).get("npipe.caller")
    out: dict[str, Any] = {"http_version": scope.get("http_version"), "type": scope["type"]}
    if who is not None:
        out.update(transport=who.transport, uid=who.uid, user=who.user, account=who.account,
                   domain=who.domain, name=who.name, pid=who.pid)
    return out


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                LIFESPAN["startup"] += 1
                await asyncio.sleep(float(os.environ.get("HTTP_APPS_STARTUP_DELAY", "0")))
                if "state" in scope:  # handed to every request's scope
                    scope["state"]["started_by"] = "lifespan"
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                LIFESPAN["shutdown"] += 1
                marker = os.environ.get("HTTP_APPS_SHUTDOWN_MARKER")
                if marker:  # a subprocess server tells the test its shutdown ran
                    with open(marker, "w") as f:
                        f.write("shutdown\n")
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path = scope["path"]
    query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
    if path == "/hello":
        await _reply(send, 200, b"hello")
    elif path == "/echo":
        await _reply(send, 200, await _body(receive), b"application/octet-stream")
    elif path == "/digest":
        body = await _body(receive)
        out = {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        await _reply(send, 200, json.dumps(out).encode(), b"application/json")
    elif path == "/big":
        await _reply(send, 200, pattern(int(query.get("n", "0"))), b"application/octet-stream")
    elif path == "/stream":
        n = int(query.get("chunks", "3"))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        for i in range(n):
            await send({"type": "http.response.body", "body": f"chunk {i}\n".encode(),
                        "more_body": True})
            await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b""})
    elif path == "/slow":
        await asyncio.sleep(float(query.get("s", "1")))
        await _reply(send, 200, b"done")
    elif path == "/caller":
        await _reply(send, 200, json.dumps(_caller_json(scope)).encode(), b"application/json")
    elif path == "/lifespan":
        seen = {**LIFESPAN, "state": dict(scope.get("state") or {})}
        await _reply(send, 200, json.dumps(seen).encode(), b"application/json")
    elif path == "/status":
        code = int(query.get("code", "200"))
        await _reply(send, code, f"status {code}".encode())
    elif path == "/headers":
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        await _reply(send, 200, json.dumps(headers).encode(), b"application/json")
    else:
        await _reply(send, 404, b"not found")


# --- an in-process server for the tests --------------------------------------------------


class ServerThread:
    """serve_asgi(app, name, **options) on its own event loop in a thread, so that sync
    clients (and asyncio.run clients with their own loop) can call it from the test."""

    def __init__(self, name: str, application: Any = None, **options: Any) -> None:
        self.name = name
        self.app = application if application is not None else app
        self.options = options
        self.loop = asyncio.new_event_loop()
        self.server: Any = None
        self._thread: Any = None

    def __enter__(self) -> ServerThread:
        import threading

        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server = self.call(self._start())
        return self

    async def _start(self) -> Any:
        from npipe.http import serve_asgi

        return await serve_asgi(self.app, self.name, **self.options)

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_for_connections(self, n: int, timeout: float = 10.0) -> None:
        """Until the server is serving ``n`` HTTP connections at once."""
        deadline = time.monotonic() + timeout
        while self.server.connections < n:
            assert time.monotonic() < deadline, f"not {n} connections in {timeout} s"
            time.sleep(0.01)

    def close(self, timeout: float = 30.0) -> None:
        if self.server is not None:
            self.call(self.server.aclose(), timeout)

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
