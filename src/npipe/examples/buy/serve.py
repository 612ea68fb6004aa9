"""The Buy example for ``npipe serve-grpc``: the servicer alone, the command adds the rest.

    npipe serve-grpc npipe.examples.buy.serve:add_services --pipe shop
    npipe call shop buy.MyService/Buy -d '{"id": "pear", "quantity": 2, "price": 7}'
"""

from __future__ import annotations

import grpc
import grpc.aio

import npipe.grpc
from npipe.examples.buy import service


def _caller(context: grpc.ServicerContext | grpc.aio.ServicerContext) -> str:
    return str(npipe.grpc.caller(context))


def add_services(server: grpc.Server) -> None:
    """``buy.MyService`` that names its caller (health and reflection come from the command)."""
    service._add_buy_servicer(service.MyService(_caller), server)


async def add_async_services(server: grpc.aio.Server) -> None:
    """The same on a ``grpc.aio.Server`` (serve-grpc runs an async FUNCTION on one)."""
    service._add_buy_servicer(service.AsyncMyService(_caller), server)
