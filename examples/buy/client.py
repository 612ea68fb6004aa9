"""Call buy.MyService through a named pipe.

    python examples/buy/client.py --id apple --quantity 3 --price 10
"""

from __future__ import annotations

import argparse

import grpc

import npipe.grpc
from npipe.examples.buy import buy_pb2, buy_pb2_grpc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipe", default=r"\\.\pipe\shop")
    parser.add_argument("--id", default="apple")
    parser.add_argument("--quantity", type=int, default=3)
    parser.add_argument("--price", type=int, default=10)
    args = parser.parse_args()

    with npipe.grpc.channel(args.pipe) as channel:  # an ordinary grpc.Channel
        stub = buy_pb2_grpc.MyServiceStub(channel)
        request = buy_pb2.BuyRequest(id=args.id, quantity=args.quantity, price=args.price)
        try:
            response = stub.Buy(request, timeout=10)
        except grpc.RpcError as e:
            print(f"Buy failed: {e.code().name}: {e.details()}")
            return 1
    print(response.result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
