"""The native backend: remote pipes on :class:`~.connection.SmbConnection` connections.

One connection per (event loop, host, port, identity, encryption choice, allow_smb2,
security options) is shared by every pipe opened through it; a dead or retired one is
replaced on the next open, and one without pipes for the idle timeout
(:func:`npipe.ioloop.idle_timeout`) is closed. Bridges and synchronous users all
run on the one process-wide I/O loop (:mod:`npipe.ioloop`), so they share one
connection per host and user. A
pipe opened with :meth:`NativeClient.open_pipe` is an asyncio transport feeding a
StreamReader directly (no socket pair, no thread); :meth:`NativeClient.attach` relays
an accepted socket (the grpcio bridge's) to the pipe within the same loop. The
registry of shared connections (:mod:`npipe.smb.registry`) and the open-with-retries
loop (:mod:`npipe.smb.retry`) are the smbprotocol backend's too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import weakref
from typing import Any

from npipe.address import PipeAddress
from npipe.errors import AddressError, ConnectionLost, says_exiting
from npipe.local.sockets import close_gently
from npipe.smb import status as st
from npipe.smb.credentials import Credentials
from npipe.smb.info import SmbConnectionInfo
from npipe.smb.native import wire
from npipe.smb.native.connection import SmbConnection, _resolver
from npipe.smb.native.core import Options, Outgoing, Response
from npipe.smb.native.pipe import IDLE_READ_SIZE, READ_SIZE, EarlyRead, RemotePipe
from npipe.smb.registry import ConnectionRegistry
from npipe.smb.retry import PipeWait, Refused

log = logging.getLogger("npipe.smb")

DEFAULT_LIMIT = 64 * 1024

ConnectionKey = tuple[
    str, int, tuple[str | None, str | None, str, str | None], bool | None, bool,
    tuple[Any, ...],
]


def _registry(loop: asyncio.AbstractEventLoop) -> ConnectionRegistry[SmbConnection]:
    """A registry for one event loop's shared connections (set up by tasks there)."""
    closing: set[asyncio.Task[None]] = set()

    def close_idle(connection: SmbConnection, limit: float) -> None:
        log.debug("closing the SMB connection to %s: unused for %g s",
                  connection.where, limit)
        task = loop.create_task(connection.close())
        closing.add(task)
        task.add_done_callback(closing.discard)

    return ConnectionRegistry(loop.call_later, close_idle)


_registries: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, ConnectionRegistry[SmbConnection]
] = weakref.WeakKeyDictionary()


async def connect(
    host: str,
    port: int = 445,
    *,
    credentials: Credentials | None = None,
    encrypt: bool | None = None,
    timeout: float = 10.0,
    options: Options | None = None,
    allow_smb2: bool = False,
) -> SmbConnection:
    """A new, unshared connection (for benchmarks and diagnostics: ``await conn.echo()``)."""
    connection = SmbConnection(host, port, options)
    await connection.establish(credentials or Credentials.resolve(), encrypt, timeout,
                               allow_smb2=allow_smb2)
    return connection


class NativeClient:
    """Opens remote pipes with npipe's own SMB2/3 client."""

    name = "native"

    def __init__(self, options: Options | None = None) -> None:
        self.options = options

    async def open_pipe(
        self,
        address: PipeAddress,
        *,
        credentials: Credentials,
        timeout: float = 10.0,
        encrypt: bool | None = None,
        limit: int = DEFAULT_LIMIT,
        allow_smb2: bool = False,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open the remote pipe; asyncio streams on it. Closing the writer closes it."""
        pipe = await self.open(address, credentials=credentials, timeout=timeout,
                               encrypt=encrypt, allow_smb2=allow_smb2)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        pipe.set_protocol(protocol)
        pipe.start()
        return reader, asyncio.StreamWriter(pipe, protocol, reader, loop)

    async def attach(
        self,
        address: PipeAddress,
        sock: socket.socket,
        *,
        credentials: Credentials,
        timeout: float = 10.0,
        encrypt: bool | None = None,
        allow_smb2: bool = False,
        close_on_failure: bool = True,
        initial: bytes = b"",
        missing_grace: float | None = None,
    ) -> None:
        """Open the remote pipe and relay it to ``sock``, which it then owns (a failed
        open closes it, or leaves it to the caller with ``close_on_failure=False``);
        ``initial`` goes to the pipe first (``missing_grace``: see :meth:`open`)."""
        try:
            pipe = await self.open(address, credentials=credentials, timeout=timeout,
                                   encrypt=encrypt, allow_smb2=allow_smb2,
                                   missing_grace=missing_grace)
        except BaseException:
            if close_on_failure:
                close_gently(sock)
            raise
        relay = _SocketSide(pipe, initial)
        pipe.set_protocol(_PipeSide(relay))
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: relay, sock)
        except BaseException:
            pipe.close()
            close_gently(sock)
            raise
        pipe.start()

    async def open(
        self,
        address: PipeAddress,
        *,
        credentials: Credentials,
        timeout: float = 10.0,
        encrypt: bool | None = None,
        allow_smb2: bool = False,
        missing_grace: float | None = None,
        message_mode: bool = False,
    ) -> RemotePipe:
        """Open the pipe, retrying a missing or busy one until ``timeout`` (a missing
        one only for ``missing_grace`` seconds if given: 0 looks once); ``message_mode``:
        read it message by message (see RemotePipe)."""
        if not address.is_remote:
            raise AddressError(f"{address} is not a remote pipe (\\\\HOST\\pipe\\NAME)")
        key: ConnectionKey = (address.host.lower(), address.port, credentials.identity(),
                              encrypt, allow_smb2, _options_key(self.options))
        registry = _loop_registry()
        loop = asyncio.get_running_loop()

        def start(remaining: float) -> asyncio.Task[SmbConnection]:
            task = loop.create_task(
                self._establish(address, credentials, encrypt, allow_smb2, remaining)
            )
            # Every open waiting for it may have given up (cancelled) before it fails:
            # its error is theirs to report, never "Task exception was never retrieved".
            task.add_done_callback(_retrieve)
            return task

        async def create(connection: SmbConnection, timeout: float) -> RemotePipe | Refused | None:
            response, first_read = await _create(
                connection, address.name, timeout,
                READ_SIZE if message_mode else IDLE_READ_SIZE)
            if response is None:
                return None
            if isinstance(response, Response) and response.status == st.STATUS_SUCCESS:
                file_id = wire.parse_create(response.message)
                return RemotePipe(connection, file_id, address.posix(), first_read=first_read,
                                  message_mode=message_mode)
            status = response.status if isinstance(response, Response) else None
            return Refused(status, f"{response}")

        def pipe_wait(connection: SmbConnection) -> PipeWait:
            return functools.partial(_pipe_wait, connection, address.name)

        return await registry.open(key, address, credentials, timeout, start=start,
                                   create=create, pipe_wait=pipe_wait,
                                   missing_grace=missing_grace)

    async def _establish(
        self, address: PipeAddress, credentials: Credentials, encrypt: bool | None,
        allow_smb2: bool, timeout: float,
    ) -> SmbConnection:
        connection = SmbConnection(address.host, address.port, self.options)
        try:
            await connection.establish(credentials, encrypt, timeout, allow_smb2=allow_smb2)
        except Exception as exc:
            # Cancelled (asyncio.run() ending, say) just as it failed, or failed only
            # because the interpreter is exiting (its loop may stop before any done
            # callback runs): end cancelled, rather than with an error nobody waits for.
            task = asyncio.current_task()
            if says_exiting(exc) or (task is not None
                                     and getattr(task, "cancelling", lambda: 0)()):
                raise asyncio.CancelledError() from None
            raise
        return connection

    async def attach_messages(
        self,
        address: PipeAddress,
        sock: socket.socket,
        *,
        credentials: Credentials,
        timeout: float = 10.0,
        encrypt: bool | None = None,
        allow_smb2: bool = False,
    ) -> None:
        """Open the remote pipe in message mode and relay its messages to ``sock`` (a
        SOCK_SEQPACKET socket in npipe.local.messages' record framing), which it then
        owns (closed if the open fails)."""
        from npipe.smb.messages import MessageRelay

        try:
            pipe = await self.open(address, credentials=credentials, timeout=timeout,
                                   encrypt=encrypt, allow_smb2=allow_smb2, message_mode=True)
        except BaseException:
            sock.close()
            raise
        relay = MessageRelay(pipe, sock)
        pipe.set_protocol(relay)
        pipe.start()
        relay.start()

    @staticmethod
    def connections() -> list[SmbConnectionInfo]:
        """The shared connections of every loop (live or dead, not yet replaced)."""
        return [_info(connection) for registry in list(_registries.values())
                for connection in registry.connections()]

    @staticmethod
    def close_connections() -> None:
        """Disconnect every shared connection now (their pipes fail with ConnectionLost)."""
        _sweep()
        for loop, registry in list(_registries.items()):
            for connection in registry.clear():
                closed = ConnectionLost(f"the SMB connection to {connection.where} was closed")
                try:
                    loop.call_soon_threadsafe(connection.abort, closed)
                except RuntimeError:  # its loop closed meanwhile
                    connection.drop()


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a background task's outcome as seen (its waiters report its error)."""
    if not task.cancelled():
        task.exception()


def _options_key(options: Options | None) -> tuple[Any, ...]:
    """What of the Options makes a connection different (not the client GUID)."""
    if options is None:
        return ()
    return (options.dialects, options.ciphers, options.signing_algorithms, options.sign,
            options.dead_peer_timeout)


def _loop_registry() -> ConnectionRegistry[SmbConnection]:
    """This event loop's shared connections (and a sweep of closed loops' ones)."""
    loop = asyncio.get_running_loop()
    _sweep()
    registry = _registries.get(loop)
    if registry is None:
        registry = _registries[loop] = _registry(loop)
    return registry


def _sweep() -> None:
    """Close the connections of event loops that are closed (asyncio.run() ended)."""
    for loop in [loop for loop in list(_registries) if loop.is_closed()]:
        registry = _registries.pop(loop, None)
        for connection in registry.clear() if registry is not None else []:
            connection.drop()


def _info(connection: SmbConnection) -> SmbConnectionInfo:
    core = connection.core
    neg = core.negotiated
    return SmbConnectionInfo(
        host=connection.host,
        port=connection.port,
        user=connection.user,
        dialect=neg.dialect_name if neg else "?",
        signing_required=bool(neg and neg.signing_required) or core.options.sign,
        signed=core.signer is not None and (core.sign or core.encrypt),
        encrypted=core.encrypt,
        pipes=len(connection.pipes),
        alive=connection.alive,
        pipe_wait=connection.pipe_wait,
    )


async def _create(
    connection: SmbConnection, name: str, timeout: float, read_size: int = IDLE_READ_SIZE,
) -> tuple[Response | BaseException | None, EarlyRead]:
    """One CREATE, compounded with the pipe's first READ (so that READ is posted a round
    trip sooner); the CREATE's response, the connection's error, or None if not answered
    in time, and the READ. A pipe that opens after its opener gave up is closed again."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Response] = loop.create_future()
    first_read = EarlyRead()
    core = connection.core
    read_body = wire.read_request(wire.FILE_ID_RELATED, read_size)
    requests = [(wire.CREATE, wire.create_request(name), 0), (wire.READ, read_body, 0)]

    def build() -> Outgoing:
        out = core.compound(requests)
        first_read.message_id = out.message_ids[1]
        return out

    connection.submit_many(build, 2, [_resolver(future), first_read.done])
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout), first_read
    except asyncio.TimeoutError:
        future.add_done_callback(lambda f: _close_late(connection, f))
        return None, first_read
    except asyncio.CancelledError:
        future.add_done_callback(lambda f: _close_late(connection, f))
        raise
    except ConnectionLost as exc:
        return exc, first_read


def _close_late(connection: SmbConnection, future: asyncio.Future[Response]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    response = future.result()
    if response.status == st.STATUS_SUCCESS and connection.alive:
        file_id = wire.parse_create(response.message)
        connection.request(wire.CLOSE, wire.close_request(file_id)).add_done_callback(
            lambda f: f.cancelled() or f.exception()
        )


async def _pipe_wait(connection: SmbConnection, name: str, timeout: float) -> int | None:
    """FSCTL_PIPE_WAIT: the NTSTATUS, or None when the server cannot do it."""
    body = wire.ioctl_request(
        wire.FSCTL_PIPE_WAIT, wire.FILE_ID_RELATED, wire.pipe_wait_input(name, timeout), 0
    )
    try:
        response = await asyncio.wait_for(connection.request(wire.IOCTL, body), timeout + 1.0)
    except asyncio.TimeoutError:
        return st.STATUS_IO_TIMEOUT
    except ConnectionLost:
        return None
    if response.status in st.NO_PIPE_WAIT_STATUSES:
        connection.pipe_wait = False
        log.debug("%s has no FSCTL_PIPE_WAIT (%#010x)", connection.where, response.status)
        return None
    return response.status


class _SocketSide(asyncio.Protocol):
    """The accepted socket's protocol: its bytes go to the pipe; backpressure both ways."""

    def __init__(self, pipe: RemotePipe, initial: bytes = b"") -> None:
        self.pipe = pipe
        self.transport: asyncio.Transport | None = None
        self._initial = initial

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self._initial:  # (before the socket is read: it goes first)
            self.pipe.write(self._initial)
            self._initial = b""

    def data_received(self, data: bytes) -> None:
        self.pipe.write(data)

    def eof_received(self) -> bool:
        self.pipe.close()  # pipes have no half-close
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe.close()

    def pause_writing(self) -> None:
        self.pipe.pause_reading()  # the local side reads slowly: stop posting READs

    def resume_writing(self) -> None:
        self.pipe.resume_reading()


class _PipeSide(asyncio.Protocol):
    """The pipe's protocol in a relay: its bytes go to the socket."""

    def __init__(self, socket_side: _SocketSide) -> None:
        self.socket_side = socket_side

    def data_received(self, data: bytes) -> None:
        transport = self.socket_side.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        transport = self.socket_side.transport
        if transport is not None:
            transport.pause_reading()

    def resume_writing(self) -> None:
        transport = self.socket_side.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.warning("%s; the pipe's stream ends here", exc)
        transport = self.socket_side.transport
        if transport is not None and not transport.is_closing():
            # The local side reads end of stream after the data already relayed.
            with contextlib.suppress(OSError, RuntimeError):
                if transport.can_write_eof():
                    transport.write_eof()
            transport.close()


__all__ = ["NativeClient", "connect"]

