"""Peers for tests/test_bridges.py, each run as its own process: it prints ``ready`` once
it serves and stops when its stdin closes (npipe.testing.netns.serve_app's convention).

    bridge_apps.py pipe echo|digest|flood:BYTES NAME [--smb] [--acl ACL]
    bridge_apps.py unix echo|digest PATH

echo: every byte back; at end of stream, a half-close back (where there is one).
digest: read to end of stream, then answer "LENGTH SHA256HEX\\n" and close.
flood:BYTES: send BYTES bytes (a repeating pattern), then close.

``app`` is an ASGI app for hypercorn (``python -m hypercorn bridge_apps:app``): it
answers "HTTP/VERSION METHOD PATH LENGTH SHA256HEX" of the request body.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

CHUNK = 64 * 1024


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
    await writer.drain()


async def digest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    h, n = hashlib.sha256(), 0
    while data := await reader.read(CHUNK):
        h.update(data)
        n += len(data)
    writer.write(f"{n} {h.hexdigest()}\n".encode())
    await writer.drain()


def flood(total: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                  Awaitable[None]]:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        block = bytes(range(256)) * (CHUNK // 256)
        sent = 0
        while sent < total:
            piece = block[: total - sent]
            writer.write(piece)
            await writer.drain()
            sent += len(piece)

    return handler


async def main(argv: list[str]) -> None:
    where, kind, target, *rest = argv
    serve = flood(int(kind.split(":")[1])) if kind.startswith("flood:") else \
        {"echo": echo, "digest": digest}[kind]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await serve(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()  # asyncio's servers leave that to the handler
    if where == "pipe":
        import npipe

        smb = "--smb" in rest
        acl = npipe.Acl.parse(rest[rest.index("--acl") + 1]) if "--acl" in rest else \
            npipe.acl.OWNER_ONLY
        server: Any = await npipe.start_server(handler, target, smb=smb, acl=acl)
    else:
        server = await asyncio.start_unix_server(handler, target)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until stdin closes
    server.close()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    h, n = hashlib.sha256(), 0
    while True:
        message = await receive()
        body = message.get("body", b"")
        h.update(body)
        n += len(body)
        if not message.get("more_body"):
            break
    text = f"HTTP/{scope['http_version']} {scope['method']} {scope['path']} {n} {h.hexdigest()}"
    caller = scope.get("extensions", {}).get("npipe.caller")  # under npipe serve-asgi
    if caller is not None:
        text += f" caller={caller.account or caller.user}"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": text.encode()})


if __name__ == "__main__":
    if os.environ.get("NPIPE_TEST_DEBUG"):
        import logging

        logging.basicConfig(level=logging.DEBUG)
    asyncio.run(main(sys.argv[1:]))
