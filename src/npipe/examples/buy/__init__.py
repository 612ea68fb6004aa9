"""The ``buy.MyService`` example: one unary RPC, plus health and reflection helpers.

The generated modules (``buy_pb2``, ``buy_pb2_grpc``) come from ``buy.proto``; regenerate with::

    python -m grpc_tools.protoc -I src --python_out=src --pyi_out=src \
        --grpc_python_out=src src/npipe/examples/buy/buy.proto
"""

from npipe.extras import require

# Its modules (generated ones too) import grpcio and protobuf: say which extra they need.
require("grpc", "the Buy example")
