"""Raw byte streams over pipes, mirroring ``asyncio.open_connection`` / ``start_server``."""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path

from npipe.acl import OWNER_ONLY, Acl
from npipe.address import PipeAddress, parse_address
from npipe.errors import UnsupportedPlatform
from npipe.identity import Caller
from npipe.local.claim import claim_pipe
from npipe.local.dial import check_server, connect_error, find_socket
from npipe.local.listener import ClaimedSocket
from npipe.local.peercred import peer_caller
from npipe.smb.credentials import Credentials

log = logging.getLogger("npipe.streams")

# asyncio's default StreamReader limit; a full buffer pauses reading (backpressure).
DEFAULT_LIMIT = 64 * 1024

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

_callers: weakref.WeakKeyDictionary[asyncio.StreamWriter, Caller] = weakref.WeakKeyDictionary()


def caller(writer: asyncio.StreamWriter) -> Caller:
    """The identity of the peer of a server-side stream (inside a start_server handler)."""
    try:
        return _callers[writer]
    except KeyError:
        raise LookupError("this stream was not accepted by an npipe server") from None


async def open_connection(
    address: str | PipeAddress,
    *,
    server_user: str | int | None = None,
    pipe_dir: str | os.PathLike[str] | None = None,
    limit: int = DEFAULT_LIMIT,
    credentials: Credentials | None = None,
    timeout: float = 10.0,
    encrypt: bool | None = None,
    smb_backend: str | None = None,
    allow_smb2: bool = False,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a pipe and return asyncio streams.

    A local pipe must be served by this user, root, or ``server_user``: anything else
    is refused with AccessDenied before a byte is sent.

    A remote pipe (``\\\\HOST\\pipe\\NAME``) is opened over SMB with ``credentials``
    (default: NPIPE_USER / NPIPE_PASSWORD / NPIPE_DOMAIN, else the Kerberos cache),
    signed, and encrypted where the server can (``encrypt=True`` insists, False never);
    a busy or missing pipe is retried for up to ``timeout`` seconds. SMB 3.x only
    unless ``allow_smb2=True``; a downgraded negotiation raises NegotiationTampered.
    """
    addr = parse_address(address)
    if addr.is_remote:
        from npipe import smb

        return await smb.open_pipe(
            addr, credentials=credentials, timeout=timeout, encrypt=encrypt,
            backend=smb_backend, allow_smb2=allow_smb2, limit=limit,
        )
    path = find_socket(addr, server_user=server_user, directory=pipe_dir)
    try:
        reader, writer = await asyncio.open_unix_connection(os.fspath(path), limit=limit)
    except OSError as e:
        raise connect_error(e, path) from e
    try:
        check_server(writer.get_extra_info("socket"), path, server_user)
    except BaseException:
        writer.close()
        raise
    return reader, writer


class PipeServer:
    """A running pipe server; close it (or use ``async with``) to give up the name.

    It listens on the pipe's local socket and, with ``smb=True``, in Samba's np/ too.
    """

    def __init__(
        self, address: PipeAddress, listeners: list[tuple[asyncio.Server, ClaimedSocket]]
    ) -> None:
        self.address = address
        self._listeners = listeners

    @property
    def path(self) -> Path:
        return self._listeners[0][1].path

    @property
    def paths(self) -> list[Path]:
        return [claimed.path for _server, claimed in self._listeners]

    def close(self) -> None:
        for server, claimed in self._listeners:
            server.close()
            claimed.release()

    async def wait_closed(self) -> None:
        for server, _claimed in self._listeners:
            await server.wait_closed()

    async def serve_forever(self) -> None:
        await asyncio.gather(*(server.serve_forever() for server, _ in self._listeners))

    async def __aenter__(self) -> PipeServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


Identify = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable["Caller | None"]]


async def start_server(
    handler: Handler,
    address: str | PipeAddress,
    *,
    acl: Acl = OWNER_ONLY,
    pipe_dir: str | os.PathLike[str] | None = None,
    dotnet: bool = False,
    smb: bool = False,
    limit: int = DEFAULT_LIMIT,
) -> PipeServer:
    """Serve ``handler(reader, writer)`` on a pipe; ``npipe.caller(writer)`` says who called.

    Callers the ACL does not allow are closed before the handler runs, and logged.
    ``smb=True`` also serves SMB clients through Samba (see npipe.samba.frontdoor).
    """
    addr = parse_address(address)
    if addr.is_remote:
        raise _remote_unsupported(addr)

    async def local(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Caller | None:
        who = peer_caller(writer.get_extra_info("socket"))
        if acl.allows(who):
            return who
        log.warning("refused %s on pipe %s: not allowed by its ACL", who, addr)
        return None

    async def samba(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Caller | None:
        from npipe.samba.frontdoor import handshake

        return await handshake(reader, writer, acl, addr)

    claims: list[tuple[Identify, ClaimedSocket]] = []
    listeners: list[tuple[asyncio.Server, ClaimedSocket]] = []
    try:
        claims.append((local, claim_pipe(
            addr, acl=acl, directory=pipe_dir, dotnet=dotnet
        )))
        if smb:
            from npipe.samba.frontdoor import claim_samba_pipe

            claims.append((samba, claim_samba_pipe(addr, directory=pipe_dir, acl=acl)))
        for identify, claimed in claims:
            claimed.sock.setblocking(False)
            server = await asyncio.start_unix_server(
                _connection_handler(handler, identify, addr), sock=claimed.sock, limit=limit
            )
            listeners.append((server, claimed))
    except BaseException:
        for server, _ in listeners:
            server.close()
        for _, claimed in claims:
            claimed.release()
        raise
    return PipeServer(addr, listeners)


def _connection_handler(
    handler: Handler, identify: Identify, addr: PipeAddress
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        who = await identify(reader, writer)
        if who is None:
            writer.close()
            return
        _callers[writer] = who
        try:
            await handler(reader, writer)
        except Exception:
            log.exception("handler failed for %s on pipe %s", who, addr)
        finally:
            writer.close()

    return on_connect


def _remote_unsupported(addr: PipeAddress) -> UnsupportedPlatform:
    return UnsupportedPlatform(
        f"{addr} is a remote pipe: a server serves a local NAME (smb=True for SMB clients)"
    )


__all__ = ["PipeServer", "caller", "claim_pipe", "open_connection", "start_server"]
