"""Servicers for ``buy.MyService``, sync and asyncio, plus health/reflection wiring.

Both servicers share :func:`_handle_buy`; they differ only in how they abort, because
``grpc.aio`` contexts abort with a coroutine while sync contexts abort by raising.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from npipe.examples.buy import buy_pb2, buy_pb2_grpc

__all__ = [
    "SERVICE_NAME",
    "AsyncMyService",
    "MyService",
    "add_to_aio_server",
    "add_to_server",
]

#: Fully qualified name, as used by health checks, reflection and method paths.
SERVICE_NAME: str = buy_pb2.DESCRIPTOR.services_by_name["MyService"].full_name

# Sync and aio contexts share no base class but both have ``peer()``, which is all the
# default needs; a caller-supplied describer may expect either kind.
CallerDescriber = Callable[[Any], str]


def _peer(context: Any) -> str:
    return str(context.peer())


@dataclass(frozen=True)
class _Rejection:
    """Why a request is invalid; the servicer turns it into INVALID_ARGUMENT."""

    message: str


def _handle_buy(
    request: buy_pb2.BuyRequest, context: Any, describe_caller: CallerDescriber
) -> buy_pb2.BuyResponse | _Rejection:
    """The whole business logic of ``Buy``, free of sync/async differences."""
    if not request.id:
        return _Rejection("id must not be empty")
    if request.quantity <= 0:
        return _Rejection(f"quantity must be positive, got {request.quantity}")
    if request.price < 0:
        return _Rejection(f"price must not be negative, got {request.price}")
    # Python ints: int32 * int32 cannot overflow here, unlike in C or Go.
    total = int(request.quantity) * int(request.price)
    caller = describe_caller(context)
    return buy_pb2.BuyResponse(
        result=f"bought {request.quantity} x {request.id!r} for {total} (caller: {caller})"
    )


class MyService(buy_pb2_grpc.MyServiceServicer):
    """``buy.MyService`` for a sync :class:`grpc.Server`.

    ``describe_caller`` turns the call context into the text shown as the caller; it
    defaults to ``context.peer()``.
    """

    def __init__(self, describe_caller: Callable[[grpc.ServicerContext], str] | None = None):
        self._describe_caller: CallerDescriber = describe_caller or _peer

    def Buy(  # name fixed by the proto
        self, request: buy_pb2.BuyRequest, context: grpc.ServicerContext
    ) -> buy_pb2.BuyResponse:
        outcome = _handle_buy(request, context, self._describe_caller)
        if isinstance(outcome, _Rejection):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, outcome.message)  # raises
            raise AssertionError("unreachable: context.abort raises")
        return outcome


class AsyncMyService(buy_pb2_grpc.MyServiceServicer):
    """``buy.MyService`` for a :class:`grpc.aio.Server`; same behaviour as :class:`MyService`."""

    def __init__(
        self, describe_caller: Callable[[grpc.aio.ServicerContext[Any, Any]], str] | None = None
    ):
        self._describe_caller: CallerDescriber = describe_caller or _peer

    async def Buy(  # name fixed by the proto
        self, request: buy_pb2.BuyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> buy_pb2.BuyResponse:
        outcome = _handle_buy(request, context, self._describe_caller)
        if isinstance(outcome, _Rejection):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, outcome.message)  # raises
            raise AssertionError("unreachable: context.abort raises")
        return outcome


# The generated registration helper is untyped; binding it to a typed name keeps strict
# mypy quiet without a ``type: ignore`` that would be unused under other settings.
_add_buy_servicer: Callable[[Any, Any], None] = buy_pb2_grpc.add_MyServiceServicer_to_server


def _reflected_names() -> tuple[str, ...]:
    return (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)


def add_to_server(server: grpc.Server, servicer: MyService | None = None) -> health.HealthServicer:
    """Register ``buy.MyService``, health checking and reflection on a sync server.

    Both ``buy.MyService`` and the overall status ``""`` start as SERVING. The returned
    health servicer lets the caller flip them (e.g. to NOT_SERVING while draining).
    """
    _add_buy_servicer(servicer or MyService(), server)
    health_servicer = health.HealthServicer()
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(health.OVERALL_HEALTH, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(_reflected_names(), server)
    return health_servicer


async def add_to_aio_server(
    server: grpc.aio.Server, servicer: AsyncMyService | None = None
) -> health.aio.HealthServicer:
    """Like :func:`add_to_server`, for a :class:`grpc.aio.Server`.

    It is a coroutine because the asyncio health servicer's ``set`` is one; call it
    (``await add_to_aio_server(server)``) before ``await server.start()``.
    """
    _add_buy_servicer(servicer or AsyncMyService(), server)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(health.OVERALL_HEALTH, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # enable_server_reflection picks the asyncio reflection servicer for aio servers.
    reflection.enable_server_reflection(_reflected_names(), server)
    return health_servicer
