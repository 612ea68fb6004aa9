"""Raw byte streams over pipes, mirroring ``asyncio.open_connection`` / ``start_server``."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from npipe.acl import OWNER_ONLY, Acl
from npipe.address import SMB_PORT, PipeAddress, parse_address
from npipe.errors import UnsupportedPlatform
from npipe.frontdoor import (
    ConnectionSlots,
    StreamDoor,
    check_max_connections,
    left_silently,
    local_identify,
)
from npipe.identity import Caller
from npipe.local.claim import claim_pipe
from npipe.local.dial import check_admitted, check_server, connect_error, find_socket
from npipe.local.listener import ClaimedSocket
from npipe.pipe_server import DEFAULT_LIMIT, PipeServer

if TYPE_CHECKING:  # the SMB client is loaded when a remote pipe is first used
    from npipe.smb.credentials import Credentials

log = logging.getLogger("npipe.streams")


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

_callers: weakref.WeakKeyDictionary[asyncio.StreamWriter, Caller] = weakref.WeakKeyDictionary()


def caller(writer: asyncio.StreamWriter) -> Caller | None:
    """The identity of the peer of a server-side stream (inside a start_server handler);
    None for a stream that no npipe server accepted (as ``npipe.grpc.caller``)."""
    return _callers.get(writer)


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
    is refused with AccessDenied before a byte is sent. So is a live local pipe whose
    ACL does not admit this user (as its server noted beside its socket: see
    npipe.local.aclnote), instead of a connection its server closes at once; a pipe
    whose server is gone is PipeNotFound, never AccessDenied.

    A remote pipe (``\\\\HOST\\pipe\\NAME``) is opened over SMB with ``credentials``
    (default: NPIPE_USER / NPIPE_PASSWORD / NPIPE_DOMAIN, else the Kerberos cache),
    signed, and encrypted where the server can (``encrypt=True`` insists, False never);
    a busy or missing pipe is retried for up to ``timeout`` seconds. SMB 3.x only
    unless ``allow_smb2=True``; a downgraded negotiation raises NegotiationTampered.
    """
    addr = parse_address(address)
    if sys.platform == "win32" and windows_native(addr, credentials, smb_backend, encrypt):
        from npipe.windows import pipes

        return await pipes.open_pipe_client(
            addr, server_user=server_user, timeout=timeout, limit=limit
        )
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
        check_admitted(writer.get_extra_info("socket"), path, addr)
    except BaseException:
        writer.close()
        raise
    return reader, writer


class SocketPipeServer(PipeServer):
    """A pipe server on Unix sockets: the pipe's own and, with ``smb=True``, one in
    Samba's np/."""

    def __init__(
        self, address: PipeAddress, listeners: list[tuple[StreamDoor, ClaimedSocket]]
    ) -> None:
        self.address = address
        self._listeners = listeners

    @property
    def path(self) -> Path:
        return self._listeners[0][1].path

    @property
    def paths(self) -> list[Path]:
        return [claimed.path for _server, claimed in self._listeners]

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (as ``asyncio.Server.sockets``): the pipe's own, and
        the one in Samba's np/ with ``smb=True``."""
        return tuple(door.listening_socket for door, _claimed in self._listeners)

    def is_serving(self) -> bool:
        return any(door.is_serving() for door, _claimed in self._listeners)

    def close(self) -> None:
        for server, claimed in self._listeners:
            server.close()
            claimed.release()

    async def wait_closed(self) -> None:
        for server, _claimed in self._listeners:
            await server.wait_closed()

    async def serve_forever(self) -> None:
        try:
            await asyncio.gather(*(server.serve_forever() for server, _ in self._listeners))
        finally:  # cancelled, or closed: give up the name at once, then let calls end
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
    max_connections: int | None = None,
) -> PipeServer:
    """Serve ``handler(reader, writer)`` on a pipe; ``npipe.caller(writer)`` says who called.

    Callers the ACL does not allow are closed before the handler runs, and logged.
    ``smb=True`` also serves SMB clients through Samba (see npipe.samba.np_listener).

    At most ``max_connections`` callers are served at once (default: a quarter of the
    process's descriptor limit, between 16 and 1024; see
    :func:`npipe.frontdoor.default_max_connections`), SMB callers and those still in
    their handshake included. Callers past it *wait*: they are not accepted (the
    kernel's listen backlog holds them, their connect() having succeeded) until a
    connection ends; reaching the cap logs one warning, not one per caller.
    """
    addr = parse_address(address)
    if addr.is_remote:
        raise _remote_unsupported(addr)
    if sys.platform == "win32":
        return await _start_windows_server(handler, addr, acl, smb, limit, max_connections)
    slots = ConnectionSlots(check_max_connections(max_connections), addr, log)

    identify_local = local_identify(acl, addr)  # the threaded front door's step as well

    async def local(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Caller | None:
        return identify_local(writer.get_extra_info("socket"))

    async def samba(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Caller | None:
        from npipe.samba.np_listener import handshake

        return await handshake(reader, writer, acl, addr)

    claims: list[tuple[Identify, ClaimedSocket]] = []
    listeners: list[tuple[StreamDoor, ClaimedSocket]] = []
    try:
        claims.append((local, claim_pipe(
            addr, acl=acl, directory=pipe_dir, dotnet=dotnet
        )))
        if smb:
            from npipe.samba.np_listener import claim_samba_pipe

            claims.append((samba, claim_samba_pipe(addr, directory=pipe_dir, acl=acl)))
        for identify, claimed in claims:
            claimed.sock.setblocking(False)
            server = StreamDoor(
                claimed.sock, _connection_handler(handler, identify, addr), slots,
                limit=limit, pipe=addr, logger=log,
            )
            listeners.append((server, claimed))
    except BaseException:
        for server, _ in listeners:
            server.close()
        for _, claimed in claims:
            claimed.release()
        raise
    return SocketPipeServer(addr, listeners)


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
        except Exception as e:
            if left_silently(reader, e):  # (a probe: connected and closed at once)
                log.debug("%s left pipe %s before sending anything (%s)", who, addr, e)
            else:
                log.exception("handler failed for %s on pipe %s", who, addr)
        finally:
            writer.close()

    return on_connect


def windows_native(
    addr: PipeAddress, credentials: Credentials | None, smb_backend: str | None,
    encrypt: bool | None,
) -> bool:
    """On Windows: open ``addr`` with the OS's own pipes (a remote one through its SMB
    client and this user's logon) unless npipe's SMB client is asked for (credentials,
    a backend, an encryption demand, or a port other than 445)."""
    if addr.kind == "unix":
        raise UnsupportedPlatform(f"{addr}: CPython cannot dial AF_UNIX paths on Windows")
    if addr.is_local:
        return True
    return (credentials is None and smb_backend is None and encrypt is None
            and addr.port == SMB_PORT)


async def _start_windows_server(
    handler: Handler, addr: PipeAddress, acl: Acl, smb: bool, limit: int,
    max_connections: int | None,
) -> PipeServer:
    """Windows: a native pipe (pipe_dir and dotnet mean nothing there: .NET's pipes are
    these); ``smb=True`` lets Windows' SMB server bring the callers the ACL names."""
    if sys.platform != "win32":  # (and mypy checks the rest as Windows code only)
        raise UnsupportedPlatform("Windows only")
    from npipe.windows import pipes

    if addr.kind == "unix":
        raise UnsupportedPlatform(f"{addr}: CPython cannot serve AF_UNIX paths on Windows")

    async def identify(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Caller | None:
        return pipes.caller_of(writer)  # identified and admitted before the streams were made

    return await pipes.start_pipe_server(
        _connection_handler(handler, identify, addr), addr, acl=acl, remote=smb,
        max_connections=check_max_connections(max_connections), limit=limit,
    )


def _remote_unsupported(addr: PipeAddress) -> UnsupportedPlatform:
    return UnsupportedPlatform(
        f"{addr} is a remote pipe: a server serves a local NAME (smb=True for SMB clients)"
    )


__all__ = [
    "DEFAULT_LIMIT", "PipeServer", "SocketPipeServer", "caller", "claim_pipe",
    "open_connection", "start_server",
]
