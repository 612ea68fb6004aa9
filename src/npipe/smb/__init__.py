"""Remote pipes: the client side of ``\\\\HOST\\pipe\\NAME`` over SMB.

Two calls make the whole interface; a backend does the SMB work behind them (grpcio
reaches a remote pipe through npipe.unix_bridge, which attaches each connection)::

    reader, writer = await npipe.smb.open_pipe("//server/pipe/shop")
    npipe.smb.get_client().attach(address, sock, ...)      # relay a socket (a bridge's)

Backends: ``"native"`` (the default: npipe's own asyncio SMB2/3 client,
:mod:`npipe.smb.native`) and ``"smbprotocol"`` (the smbprotocol library, slower; kept
as a reference and a fallback). A backend is any object with the two coroutine methods
of :class:`PipeClient`. Credentials default to :meth:`Credentials.resolve` (NPIPE_USER,
NPIPE_PASSWORD, NPIPE_DOMAIN, else the Kerberos cache). Only SMB 3.x (3.0, 3.0.2,
3.1.1) is accepted unless ``allow_smb2=True``; the negotiation is protected against a
downgrade on the path (VALIDATE_NEGOTIATE_INFO on 3.0 and 3.0.2, preauth integrity on
3.1.1: NegotiationTampered). ``encrypt=None`` encrypts when the server can (every
SMB 3 server offering a cipher) and signs otherwise; ``True`` requires encryption;
``False`` asks for signing only. Signing is always required.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from typing import TYPE_CHECKING, Protocol

from npipe.address import PipeAddress, parse_address
from npipe.errors import AddressError, ConfigError
from npipe.smb.credentials import Credentials
from npipe.smb.info import SmbConnectionInfo

# asyncio's default StreamReader limit; a full buffer pauses the pipe (backpressure).
DEFAULT_LIMIT = 64 * 1024

BACKENDS = ("native", "smbprotocol")
DEFAULT_BACKEND = "native"
# Selects the backend wherever none is passed (e.g. to run a program on smbprotocol).
ENV_BACKEND = "NPIPE_SMB_BACKEND"


def backend_name(backend: str | None = None) -> str:
    """The backend to use: ``backend``, else $NPIPE_SMB_BACKEND, else the default."""
    return backend or os.environ.get(ENV_BACKEND) or DEFAULT_BACKEND


class PipeClient(Protocol):
    """What a remote-pipe backend provides."""

    async def open_pipe(
        self,
        address: PipeAddress,
        *,
        credentials: Credentials,
        timeout: float = ...,
        encrypt: bool | None = ...,
        limit: int = ...,
        allow_smb2: bool = ...,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open the pipe; asyncio streams on it (the reader's buffer limit: ``limit``).
        Closing the writer closes the pipe."""
        ...

    async def attach(
        self,
        address: PipeAddress,
        sock: socket.socket,
        *,
        credentials: Credentials,
        timeout: float = ...,
        encrypt: bool | None = ...,
        allow_smb2: bool = ...,
        close_on_failure: bool = ...,
        initial: bytes = ...,
        missing_grace: float | None = ...,
    ) -> None:
        """Open the pipe and relay it to ``sock``, which it then owns (closed on failure,
        unless ``close_on_failure=False``: then it is the caller's to answer or close).
        The pipe is sent ``initial`` first (what was read from ``sock`` already); a
        missing pipe is looked for again only for ``missing_grace`` seconds if given
        (0: once), a busy one until ``timeout``."""
        ...

    def connections(self) -> list[SmbConnectionInfo]:
        """The shared connections set up so far."""
        ...

    def close_connections(self) -> None:
        """Disconnect every shared connection now."""
        ...


_clients: dict[str, PipeClient] = {}
_clients_lock = threading.Lock()


def get_client(backend: str | None = None) -> PipeClient:
    """The (shared) client object of a backend; ConfigError for an unknown name."""
    backend = backend_name(backend)
    with _clients_lock:
        client = _clients.get(backend)
        if client is not None:
            return client
        if backend == "native":
            from npipe.smb.native import NativeClient

            client = NativeClient(_native_options())
        elif backend == "smbprotocol":
            try:
                from npipe.smb.smbprotocol_backend import SmbprotocolClient
            except ModuleNotFoundError as e:
                if e.name != "smbprotocol" and not (e.name or "").startswith("smbprotocol."):
                    raise
                raise ConfigError(
                    "the smbprotocol backend needs the smbprotocol package: "
                    "pip install 'npipe[smbprotocol]'"
                ) from None
            client = SmbprotocolClient()
        else:
            raise ConfigError(
                f"unknown remote pipe backend {backend!r}: known backends are "
                + ", ".join(BACKENDS)
            )
        _clients[backend] = client
        return client


if TYPE_CHECKING:
    from npipe.smb.native import Options

# How long a connection with work pending may hear nothing before its pipes fail with
# ConnectionLost (TCP keepalive and an SMB ECHO find a peer that vanished without a FIN).
ENV_DEAD_PEER_TIMEOUT = "NPIPE_SMB_DEAD_PEER_TIMEOUT"


def _native_options() -> Options:
    from npipe.smb.native import Options

    text = os.environ.get(ENV_DEAD_PEER_TIMEOUT)
    if not text:
        return Options()
    bad = ConfigError(f"${ENV_DEAD_PEER_TIMEOUT} is {text!r}: give seconds, or 0 for never")
    try:
        seconds = float(text)
    except ValueError:
        raise bad from None
    if not 0 <= seconds < float("inf"):
        raise bad
    return Options(dead_peer_timeout=seconds or None)


def _remote(address: str | PipeAddress) -> PipeAddress:
    addr = parse_address(address)
    if not addr.is_remote:
        raise AddressError(
            f"{addr} is not a remote pipe: use \\\\HOST\\pipe\\NAME or //HOST/pipe/NAME"
        )
    return addr


async def open_pipe(
    address: str | PipeAddress,
    *,
    credentials: Credentials | None = None,
    timeout: float = 10.0,
    encrypt: bool | None = None,
    backend: str | None = None,
    allow_smb2: bool = False,
    limit: int = DEFAULT_LIMIT,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a remote pipe and return asyncio streams on it (``limit``: the
    StreamReader's buffer limit, as in asyncio.open_connection).

    A missing or busy pipe is retried until ``timeout`` (which bounds the whole open),
    then PipeNotFound / PipeBusy. Other failures: HostUnreachable, AuthenticationError,
    AccessDenied (a server that refuses you), ConfigError (``encrypt=True`` against a
    server that cannot encrypt; an SMB 2.x server without ``allow_smb2=True``),
    NegotiationTampered (the negotiation was changed on the path: a downgrade attack?).
    A connection lost later ends the stream (EOF).
    """
    client = get_client(backend)
    addr = _remote(address)
    creds = credentials if credentials is not None else Credentials.resolve()
    return await client.open_pipe(addr, credentials=creds, timeout=timeout, encrypt=encrypt,
                                  limit=limit, allow_smb2=allow_smb2)



__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "ENV_BACKEND",
    "Credentials",
    "PipeClient",
    "backend_name",
    "get_client",
    "open_pipe",
]
