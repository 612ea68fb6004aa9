"""npipe: gRPC, HTTP and byte streams over named pipes, on one host and between hosts."""

from npipe.acl import Acl
from npipe.address import PipeAddress, parse_address
from npipe.blocking import PipeSocket, PipeSocketServer, connect, create_server
from npipe.errors import (
    AccessDenied,
    AddressError,
    AuthenticationError,
    ConfigError,
    ConnectionLost,
    HostUnreachable,
    NegotiationTampered,
    NpipeError,
    PipeBusy,
    PipeInUse,
    PipeNotFound,
    UnsupportedPlatform,
)
from npipe.identity import Caller
from npipe.streams import PipeServer, caller, open_connection, start_server

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "Acl",
    "AddressError",
    "AuthenticationError",
    "Caller",
    "ConfigError",
    "ConnectionLost",
    "HostUnreachable",
    "NegotiationTampered",
    "NpipeError",
    "PipeAddress",
    "PipeBusy",
    "PipeInUse",
    "PipeNotFound",
    "PipeServer",
    "PipeSocket",
    "PipeSocketServer",
    "UnsupportedPlatform",
    "caller",
    "connect",
    "create_server",
    "open_connection",
    "parse_address",
    "start_server",
]
