"""Both ends of tests/test_kerberos.py; each client scenario prints one JSON line.

    python kerberos_app.py serve NAME USER[,USER...]   # in the DC's namespace
    python kerberos_app.py raw|grpc|error BACKEND ADDRESS   # in the client's

The server sends the caller it saw (a JSON line), then echoes bytes; it prints "ready"
when serving and stops when stdin closes (server_app.serve_stream). Clients log on with
the Kerberos cache ($KRB5CCNAME) alone: no user, no password, and auth_protocol="kerberos"
(no NTLM).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from server_app import serve_stream

import npipe
import npipe.grpc
import npipe.smb

KERBEROS = npipe.smb.Credentials(auth_protocol="kerberos")


def serve(name: str, users: list[str]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        c = npipe.caller(writer)
        who = {"transport": c.transport, "account": c.account, "domain": c.domain,
               "sids": list(c.sids), "address": c.address, "name": c.name,
               "upn": c.extra.get("upn")}
        writer.write(json.dumps(who).encode() + b"\n")
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    serve_stream(handler, name, users)


def raw(backend: str, address: str) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        reader, writer = await npipe.smb.open_pipe(address, credentials=KERBEROS,
                                                   backend=backend)
        who = json.loads(await asyncio.wait_for(reader.readline(), 30))
        writer.write(b"kerberos bytes")
        await writer.drain()
        echoed = await asyncio.wait_for(reader.readexactly(14), 30)
        writer.close()
        return {"who": who, "echo": echoed.decode()}

    return asyncio.run(main())


def grpc(backend: str, address: str) -> dict[str, Any]:
    """Against server_app.py's gRPC service (x.Svc)."""
    with npipe.grpc.channel(address, credentials=KERBEROS, smb_backend=backend) as ch:
        who = json.loads(ch.unary_unary("/x.Svc/Whoami")(b"", timeout=30))
        echoed = ch.unary_unary("/x.Svc/Echo")(b"over grpc", timeout=30)
    return {"who": who, "echo": echoed.decode()}


def error(backend: str, address: str) -> dict[str, Any]:
    """What opening the pipe gives: the npipe error type and message, and how long."""
    async def main() -> dict[str, Any]:
        start = time.monotonic()
        try:
            _reader, writer = await npipe.smb.open_pipe(address, credentials=KERBEROS,
                                                        backend=backend, timeout=10)
        except npipe.NpipeError as e:
            return {"error": type(e).__name__, "message": str(e),
                    "seconds": time.monotonic() - start}
        writer.close()
        return {"error": None}

    return asyncio.run(main())


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3].split(","))
    else:
        scenario, backend, address = sys.argv[1:4]
        result = {"raw": raw, "grpc": grpc, "error": error}[scenario](backend, address)
        print(json.dumps(result), flush=True)
