"""The buy.MyService example, sync and asyncio, on real grpcio servers over a Unix socket."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from npipe.cli.reflection_call import call_json, list_services
from npipe.examples.buy import buy_pb2, buy_pb2_grpc
from npipe.examples.buy.service import (
    SERVICE_NAME,
    AsyncMyService,
    MyService,
    add_to_aio_server,
    add_to_server,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# (request fields, text the INVALID_ARGUMENT details must contain)
INVALID_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"id": "", "quantity": 1, "price": 1}, "id must not be empty"),
    ({"id": "apple", "quantity": 0, "price": 1}, "quantity must be positive, got 0"),
    ({"id": "apple", "quantity": -2, "price": 1}, "quantity must be positive, got -2"),
    ({"id": "apple", "quantity": 1, "price": -5}, "price must not be negative, got -5"),
]


@pytest.fixture
def address() -> Iterator[str]:
    # pytest's tmp_path can exceed the ~108-byte sun_path limit; /tmp/npXXXX cannot.
    directory = tempfile.mkdtemp(prefix="np", dir="/tmp")
    try:
        yield "unix:" + str(Path(directory) / "buy")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _start(address: str, servicer: MyService | None = None) -> tuple[grpc.Server, Any]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_servicer = add_to_server(server, servicer)
    assert server.add_insecure_port(address) == 1
    server.start()
    return server, health_servicer


@pytest.fixture
def channel(address: str) -> Iterator[grpc.Channel]:
    """A default-configured server: the caller is described by context.peer()."""
    server, _ = _start(address)
    with grpc.insecure_channel(address) as chan:
        yield chan
    server.stop(None)


def test_service_name() -> None:
    assert SERVICE_NAME == "buy.MyService"


def test_buy_happy_path_uses_peer_by_default(channel: grpc.Channel) -> None:
    stub = buy_pb2_grpc.MyServiceStub(channel)
    reply = stub.Buy(buy_pb2.BuyRequest(id="apple", quantity=3, price=10), timeout=5)
    assert reply.result.startswith("bought 3 x 'apple' for 30 (caller: unix")
    assert reply.result.endswith(")")


def test_buy_uses_describe_caller(address: str) -> None:
    seen: list[Any] = []

    def describe(context: grpc.ServicerContext) -> str:
        seen.append(context)
        return "alice uid=1000 pid=4242"

    server, _ = _start(address, MyService(describe))
    try:
        with grpc.insecure_channel(address) as chan:
            reply = buy_pb2_grpc.MyServiceStub(chan).Buy(
                buy_pb2.BuyRequest(id="apple", quantity=3, price=10), timeout=5
            )
    finally:
        server.stop(None)
    assert reply.result == "bought 3 x 'apple' for 30 (caller: alice uid=1000 pid=4242)"
    assert len(seen) == 1


def test_buy_total_does_not_overflow(channel: grpc.Channel) -> None:
    big = 2**31 - 1  # int32 max for both: the product needs 62 bits
    reply = buy_pb2_grpc.MyServiceStub(channel).Buy(
        buy_pb2.BuyRequest(id="gold", quantity=big, price=big), timeout=5
    )
    assert f"for {big * big} " in reply.result


def test_buy_free_item_is_fine(channel: grpc.Channel) -> None:
    reply = buy_pb2_grpc.MyServiceStub(channel).Buy(
        buy_pb2.BuyRequest(id="sample", quantity=1, price=0), timeout=5
    )
    assert reply.result.startswith("bought 1 x 'sample' for 0 ")


@pytest.mark.parametrize(("fields", "details"), INVALID_REQUESTS)
def test_buy_invalid_argument(channel: grpc.Channel, fields: dict[str, Any], details: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        buy_pb2_grpc.MyServiceStub(channel).Buy(buy_pb2.BuyRequest(**fields), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details in info.value.details()


def test_invalid_request_does_not_describe_caller(address: str) -> None:
    calls: list[object] = []

    def describe(context: grpc.ServicerContext) -> str:
        calls.append(context)
        return "nobody"

    server, _ = _start(address, MyService(describe))
    try:
        with grpc.insecure_channel(address) as chan, pytest.raises(grpc.RpcError):
            buy_pb2_grpc.MyServiceStub(chan).Buy(buy_pb2.BuyRequest(id=""), timeout=5)
    finally:
        server.stop(None)
    assert calls == []


def test_health_serving_and_flip(address: str) -> None:
    server, health_servicer = _start(address)
    try:
        with grpc.insecure_channel(address) as chan:
            health = health_pb2_grpc.HealthStub(chan)
            for name in ("buy.MyService", ""):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == SERVING, name
            health_servicer.set("buy.MyService", NOT_SERVING)
            reply = health.Check(health_pb2.HealthCheckRequest(service="buy.MyService"), timeout=5)
            assert reply.status == NOT_SERVING
    finally:
        server.stop(None)


def test_reflection_lists_all_three(channel: grpc.Channel) -> None:
    assert list_services(channel, 5) == [
        "buy.MyService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ]


# --- asyncio --------------------------------------------------------------------------


async def _aio_scenario(address: str) -> None:
    server = grpc.aio.server()
    health_servicer = await add_to_aio_server(
        server, AsyncMyService(lambda ctx: "bob uid=1001 pid=7")
    )
    assert server.add_insecure_port(address) == 1
    await server.start()
    try:
        async with grpc.aio.insecure_channel(address) as chan:
            stub = buy_pb2_grpc.MyServiceStub(chan)
            reply = await stub.Buy(buy_pb2.BuyRequest(id="apple", quantity=3, price=10), timeout=5)
            assert reply.result == "bought 3 x 'apple' for 30 (caller: bob uid=1001 pid=7)"

            for fields, details in INVALID_REQUESTS:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Buy(buy_pb2.BuyRequest(**fields), timeout=5)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert details in (info.value.details() or "")

            health = health_pb2_grpc.HealthStub(chan)
            for name in ("buy.MyService", ""):
                check = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert check.status == SERVING, name
            await health_servicer.set("buy.MyService", NOT_SERVING)
            check = await health.Check(
                health_pb2.HealthCheckRequest(service="buy.MyService"), timeout=5
            )
            assert check.status == NOT_SERVING

        # The reflection caller is synchronous: run it off the loop the server needs.
        def reflect() -> tuple[list[str], list[dict[str, Any]]]:
            with grpc.insecure_channel(address) as sync_chan:
                names = list_services(sync_chan, 5)
                result = call_json(
                    sync_chan, "buy.MyService/Buy", {"id": "kiwi", "quantity": 2}, timeout=5
                )
            return names, result

        names, result = await asyncio.to_thread(reflect)
        assert names == [
            "buy.MyService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
        assert result == [{"result": "bought 2 x 'kiwi' for 0 (caller: bob uid=1001 pid=7)"}]
    finally:
        await server.stop(None)


def test_aio_server(address: str) -> None:
    asyncio.run(_aio_scenario(address))


async def _aio_default_caller(address: str) -> str:
    server = grpc.aio.server()
    await add_to_aio_server(server)
    assert server.add_insecure_port(address) == 1
    await server.start()
    try:
        async with grpc.aio.insecure_channel(address) as chan:
            reply = await buy_pb2_grpc.MyServiceStub(chan).Buy(
                buy_pb2.BuyRequest(id="apple", quantity=1, price=1), timeout=5
            )
            return str(reply.result)
    finally:
        await server.stop(None)


def test_aio_default_caller_is_peer(address: str) -> None:
    result = asyncio.run(_aio_default_caller(address))
    assert result.startswith("bought 1 x 'apple' for 1 (caller: unix")
