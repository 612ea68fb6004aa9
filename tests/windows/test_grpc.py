"""gRPC over native Windows pipes: the Buy example, the caller's identity, stop."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

import npipe.grpc
from npipe.errors import PipeNotFound
from npipe.examples.buy import buy_pb2, buy_pb2_grpc
from npipe.examples.buy.service import MyService, add_to_server
from npipe.windows import win32


def _caller_sid(context: grpc.ServicerContext) -> str:
    who = npipe.grpc.caller(context)
    return who.sids[0] if who is not None else "unknown"


def test_buy_over_a_pipe_with_the_callers_sid(name: str) -> None:
    server = grpc.server(ThreadPoolExecutor(4))
    add_to_server(server, MyService(describe_caller=_caller_sid))
    npipe.grpc.add_pipe_port(server, name)
    server.start()
    try:
        with npipe.grpc.channel(name) as ch:
            stub = buy_pb2_grpc.MyServiceStub(ch)
            reply = stub.Buy(buy_pb2.BuyRequest(id="apple", quantity=3, price=7), timeout=30)
            with pytest.raises(grpc.RpcError) as bad:
                stub.Buy(buy_pb2.BuyRequest(id="", quantity=1, price=1), timeout=30)
    finally:
        server.stop(None).wait(10)
    assert reply.result == (
        f"bought 3 x 'apple' for 21 (caller: {win32.current_user_sid()})"
    )
    assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_stopping_the_server_gives_up_the_pipe(name: str) -> None:
    import asyncio

    server = grpc.server(ThreadPoolExecutor(2))
    add_to_server(server)
    npipe.grpc.add_pipe_port(server, name)
    server.start()
    server.stop(None).wait(10)
    with pytest.raises(PipeNotFound):
        asyncio.run(npipe.open_connection(name, timeout=0.5))
