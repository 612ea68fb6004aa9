"""What each ``npipe`` subcommand does; the parser lives in ``npipe.cli``."""

from __future__ import annotations

import argparse
import json
import os
import stat
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import npipe.grpc
from npipe.acl import OWNER_ONLY, Acl
from npipe.address import parse_address
from npipe.local.listener import is_live
from npipe.local.paths import DOTNET_PREFIX, pipe_dir


def demo(args: argparse.Namespace) -> int:
    from npipe.examples.buy import buy_pb2, buy_pb2_grpc, service

    address = parse_address(args.pipe)
    acl = Acl.parse(args.acl) if args.acl else OWNER_ONLY
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    service.add_to_server(server, service.MyService(lambda ctx: str(npipe.grpc.caller(ctx))))
    port = npipe.grpc.add_pipe_port(server, address, acl=acl, pipe_dir=args.pipe_dir)
    server.start()
    try:
        print(f"serving buy.MyService on {address} (socket {port.path})")
        if args.serve:
            print("press Ctrl-C to stop")
            threading.Event().wait()
            return 0
        request = buy_pb2.BuyRequest(id=args.id, quantity=args.quantity, price=args.price)
        with npipe.grpc.channel(address, pipe_dir=args.pipe_dir) as channel:
            stub = buy_pb2_grpc.MyServiceStub(channel)  # type: ignore[no-untyped-call]
            print(f"request:  BuyRequest(id={request.id!r}, quantity={request.quantity}, "
                  f"price={request.price})")
            response = stub.Buy(request, timeout=10)
            print(f"response: BuyResponse(result={response.result!r})")
        return 0
    finally:
        server.stop(None)


def health(args: argparse.Namespace) -> int:
    with _channel(args) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:  # the health protocol's "unknown"
                raise
            print(f"SERVICE_UNKNOWN: the server knows no service {args.service!r}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def call(args: argparse.Namespace) -> int:
    from npipe.reflection_call import call_json

    metadata = []
    for header in args.header:
        key, sep, value = header.partition(":")
        if not sep or not key.strip():
            raise ValueError(f"bad header {header!r}: use KEY:VALUE")
        metadata.append((key.strip().lower(), value.strip()))
    with _channel(args) as channel:
        responses = call_json(
            channel, args.method, args.data, timeout=args.timeout, metadata=metadata
        )
    for response in responses:
        print(json.dumps(response, indent=2))
    return 0


def ls(args: argparse.Namespace) -> int:
    directory = pipe_dir(args.pipe_dir)
    rows = [(p.name, p) for p in _sockets(directory) if not p.name.startswith(".")]
    rows += [(p.name[len("CoreFxPipe_"):], p) for p in _sockets(Path("/tmp"))
             if os.fspath(p).startswith(DOTNET_PREFIX)]
    if not rows:
        print(f"no pipes in {directory}")
        return 0
    for name, path in sorted(rows):
        state = "live" if is_live(path) else "stale"
        print(f"{name:32} {state:5} {path}")
    return 0


def _sockets(directory: Path) -> list[Path]:
    try:
        entries = list(directory.iterdir())
    except OSError:
        return []
    return [p for p in entries if _is_socket(p)]


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _channel(args: argparse.Namespace) -> grpc.Channel:
    return npipe.grpc.channel(
        args.address,
        server_user=args.server_user,
        pipe_dir=args.pipe_dir,
        # grpcurl's limit: responses up to 4 MiB are grpcio's default, allow more here.
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
