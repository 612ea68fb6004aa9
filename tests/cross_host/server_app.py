"""A gRPC (or raw stream) server on pipe NAME, served locally and through Samba.

    python server_app.py grpc NAME ALLOWED_USER[,USER...]
    python server_app.py raw NAME ALLOWED_USER

Prints "ready" when serving; stops on SIGTERM or when stdin closes. Run inside the
server's network namespace with NPIPE_SAMBA_NP_DIR pointing at the private smbd's np/.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import npipe
import npipe.grpc
import npipe.samba.smbd

SERVICE = "x.Svc"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def caller_json(context: grpc.ServicerContext) -> bytes:
    c = npipe.grpc.caller(context)
    if c is None:
        return b"{}"
    return json.dumps({
        "transport": c.transport, "account": c.account, "domain": c.domain, "uid": c.uid,
        "sids": list(c.sids), "address": c.address, "name": c.name,
    }).encode()


def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    return caller_json(context)


def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield str(i).encode()


def concat(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return b"".join(requests)


def bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for r in requests:
        yield r[::-1]


def serve_grpc(name: str, users: list[str]) -> None:
    mb = 16 * 1024 * 1024
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=32),
        options=[("grpc.max_receive_message_length", mb), ("grpc.max_send_message_length", mb)],
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Whoami": grpc.unary_unary_rpc_method_handler(whoami),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Concat": grpc.stream_unary_rpc_method_handler(concat),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    }),))
    # health and reflection, for `npipe health` and `npipe call` from the other host
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if run_as := os.environ.get("NPIPE_TEST_RUN_AS"):
        become(run_as)  # the pipe is claimed, and served, as that user
    npipe.grpc.add_pipe_port(server, name, smb=True, acl=npipe.Acl.allow(users=users))
    server.start()
    print("ready", flush=True)
    # Not a threading.Event: a signal handler that takes its lock can deadlock with
    # the Event.wait it interrupted (see npipe.cli.samba.run). A list takes no lock.
    stop: list[str] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
    threading.Thread(target=lambda: (sys.stdin.read(), stop.append("stdin")),
                     daemon=True).start()
    while not stop:
        time.sleep(0.1)
    server.stop(None).wait()


def serve_raw(name: str, users: list[str]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"hello {npipe.caller(writer).name}\n".encode())
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    serve_stream(handler, name, users)


def serve_stream(handler: Handler, name: str, users: list[str]) -> None:
    """Serve a stream ``handler`` on pipe NAME, locally and through Samba, for ``users``;
    print "ready" when serving and stop on SIGTERM or when stdin closes."""
    async def main() -> None:
        async with await npipe.start_server(
            handler, name, smb=True, acl=npipe.Acl.allow(users=users)
        ):
            print("ready", flush=True)
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            loop.add_signal_handler(signal.SIGTERM, lambda: done.done() or done.set_result(None))
            loop.add_reader(sys.stdin.fileno(), lambda: done.done() or done.set_result(None))
            await done

    asyncio.run(main())


def become(user: str) -> None:
    """Drop root for USER, after every import (the interpreter may live under /root)."""
    import fcntl  # noqa: F401  (npipe imports it lazily)
    import pwd

    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


if __name__ == "__main__":
    kind, name, users = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    (serve_grpc if kind == "grpc" else serve_raw)(name, users)
