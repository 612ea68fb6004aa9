"""HTTP over native Windows pipes: serve_wsgi and serve_asgi, called through the sync
Transport (a socketpair relayed to the pipe on npipe's I/O thread) and AsyncTransport,
with the caller's SID in environ["npipe.caller"] / the scope."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from typing import Any

import httpx

import npipe.http
from npipe.windows import win32


def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    who = environ["npipe.caller"]
    if environ["PATH_INFO"] == "/big":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return (b"x" * 65536 for _ in range(64))
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"{who.sids[0]} {len(body)}".encode()]


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    who = scope["extensions"]["npipe.caller"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": who.sids[0].encode()})


class Served:
    """A server on its own proactor loop in a thread."""

    def __init__(self, start: Callable[[], Any]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.aclose(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_wsgi_over_a_windows_pipe_sync_and_async(name: str) -> None:
    served = Served(lambda: npipe.http.serve_wsgi(wsgi_app, name, max_workers=2))
    me = win32.current_user_sid()
    try:
        with httpx.Client(transport=npipe.http.Transport(name), base_url="http://api",
                          timeout=30) as c:
            assert c.post("/", content=b"y" * 1_000_000).text == f"{me} 1000000"
            assert len(c.get("/big").content) == 64 * 65536

        async def run() -> str:
            async with httpx.AsyncClient(transport=npipe.http.AsyncTransport(name),
                                         base_url="http://api", timeout=30) as c:
                return (await c.get("/")).text

        assert asyncio.run(run()) == f"{me} 0"
    finally:
        served.close()


def test_asgi_over_a_windows_pipe_sync_transport(name: str) -> None:
    served = Served(lambda: npipe.http.serve_asgi(asgi_app, name))
    try:
        with httpx.Client(transport=npipe.http.Transport(name, http1=False, http2=True),
                          base_url="http://api", timeout=30) as c:
            assert c.get("/").text == win32.current_user_sid()
    finally:
        served.close()
