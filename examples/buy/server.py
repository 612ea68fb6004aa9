"""Serve buy.MyService on a named pipe.

    python examples/buy/server.py            # serves \\.\\pipe\\shop until Ctrl-C
    python examples/buy/server.py --allow alice

Then, from another shell: python examples/buy/client.py  (or: npipe call shop buy.MyService/Buy
-d '{"id": "apple", "quantity": 3, "price": 10}').
"""

from __future__ import annotations

import argparse
from concurrent import futures

import grpc

import npipe.grpc
from npipe import Acl
from npipe.examples.buy import buy_pb2, buy_pb2_grpc


class Shop(buy_pb2_grpc.MyServiceServicer):
    def Buy(
        self, request: buy_pb2.BuyRequest, context: grpc.ServicerContext
    ) -> buy_pb2.BuyResponse:
        if request.quantity <= 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "quantity must be positive")
        caller = npipe.grpc.caller(context)  # who connected, as the kernel saw it
        total = request.quantity * request.price
        return buy_pb2.BuyResponse(
            result=f"bought {request.quantity} x {request.id!r} for {total} (caller: {caller})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipe", default=r"\\.\pipe\shop")
    parser.add_argument("--allow", action="append", default=[], help="another user to allow")
    args = parser.parse_args()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    buy_pb2_grpc.add_MyServiceServicer_to_server(Shop(), server)
    port = npipe.grpc.add_pipe_port(server, args.pipe, acl=Acl.allow(users=args.allow))
    server.start()
    print(f"serving buy.MyService on {args.pipe} ({port.path}); Ctrl-C stops")
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=2).wait()


if __name__ == "__main__":
    main()
