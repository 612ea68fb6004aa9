"""npipe: gRPC, HTTP and byte streams over named pipes, on one host and between hosts.

Here: byte streams (asyncio :func:`open_connection` / :func:`start_server`, blocking
:func:`connect` / :func:`create_server`), who called (:func:`caller`, :class:`Caller`),
who may call (:class:`Acl`), addresses, SMB :class:`Credentials` and the errors. gRPC is in
:mod:`npipe.grpc` (``pip install 'npipe[grpc]'``), HTTP in :mod:`npipe.http`
(``npipe[http]``), message pipes in :mod:`npipe.connection`, socket bridges in
:mod:`npipe.bridges`.
"""

from importlib import metadata as _metadata
from typing import TYPE_CHECKING, Any

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
    RedirectorUnavailable,
    UnsupportedPlatform,
)
from npipe.identity import Caller
from npipe.streams import PipeServer, caller, open_connection, start_server

if TYPE_CHECKING:
    from npipe.smb.credentials import Credentials


def __getattr__(name: str) -> Any:
    # Credentials live with the SMB client, which a plain import does not load (local
    # pipes need none of it): imported when first asked for.
    if name == "Credentials":
        from npipe.smb.credentials import Credentials

        globals()[name] = Credentials
        return Credentials
    raise AttributeError(f"module 'npipe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "Credentials"])


try:
    __version__ = _metadata.version("npipe")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AccessDenied",
    "Acl",
    "AddressError",
    "AuthenticationError",
    "Caller",
    "ConfigError",
    "ConnectionLost",
    "Credentials",
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
    "RedirectorUnavailable",
    "UnsupportedPlatform",
    "caller",
    "connect",
    "create_server",
    "open_connection",
    "parse_address",
    "start_server",
]
