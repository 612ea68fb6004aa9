"""The native backend: remote pipes on :class:`~.link.Link` connections.

One connection per (event loop, host, port, identity, encryption choice, allow_smb2,
security options) is shared by every pipe opened through it; a dead or retired one is
replaced on the next open, and one without pipes for the idle timeout
(:func:`npipe.ioloop.idle_timeout`) is closed. Bridges and synchronous users all
run on the one process-wide I/O loop (:mod:`npipe.ioloop`), so they share one
connection per host and user. A
pipe opened with :meth:`NativeClient.open_pipe` is an asyncio transport feeding a
StreamReader directly (no socket pair, no thread); :meth:`NativeClient.attach` relays
an accepted socket (the grpcio bridge's) to the pipe within the same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
import weakref
from typing import Any

from npipe import ioloop
from npipe.address import PipeAddress
from npipe.errors import AddressError, ConnectionLost, HostUnreachable
from npipe.local.sockets import close_gently
from npipe.smb import status as st
from npipe.smb.credentials import Credentials
from npipe.smb.info import SmbConnectionInfo
from npipe.smb.native import wire
from npipe.smb.native.core import Options, Outgoing, Response
from npipe.smb.native.link import Link, _resolver
from npipe.smb.native.pipe import IDLE_READ_SIZE, EarlyRead, RemotePipe
from npipe.smb.retry import OpenRetry

log = logging.getLogger("npipe.smb")

DEFAULT_LIMIT = 64 * 1024

LinkKey = tuple[
    str, int, tuple[str | None, str | None, str, str | None], bool | None, bool,
    tuple[Any, ...],
]


class _LoopLinks(dict[LinkKey, "asyncio.Task[Link]"]):
    """One event loop's shared connections (tasks that set them up), by key, and when
    each was last handed out: a connection with no pipes for the idle timeout is closed
    (checked every :func:`ioloop.sweep_interval`, while there are connections)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.used: dict[LinkKey, float] = {}
        self.opening: dict[LinkKey, int] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.closing: set[asyncio.Task[None]] = set()

    def touch(self, key: LinkKey) -> None:
        self.used[key] = time.monotonic()
        if self.timer is None:
            self.timer = self.loop.call_later(ioloop.sweep_interval(), self.sweep)

    def sweep(self) -> None:
        self.timer = None
        now, limit = time.monotonic(), ioloop.idle_timeout()
        for key, task in list(self.items()):
            if not task.done():
                continue
            if task.cancelled() or task.exception() is not None:
                continue
            link = task.result()
            if link.pipes or self.opening.get(key):
                self.used[key] = now
            elif not link.alive:
                continue  # dead: kept (for connections()) until replaced
            elif now - self.used.get(key, now) >= limit:
                del self[key]
                self.used.pop(key, None)
                log.debug("closing the SMB connection to %s: unused for %g s",
                          link.where, limit)
                closing = self.loop.create_task(link.close())
                self.closing.add(closing)
                closing.add_done_callback(self.closing.discard)
        if any(not t.done() or (not t.cancelled() and t.exception() is None
                                and t.result().alive) for t in self.values()):
            self.timer = self.loop.call_later(ioloop.sweep_interval(), self.sweep)


_links: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopLinks] = (
    weakref.WeakKeyDictionary()
)


async def connect(
    host: str,
    port: int = 445,
    *,
    credentials: Credentials | None = None,
    encrypt: bool | None = None,
    timeout: float = 10.0,
    options: Options | None = None,
    allow_smb2: bool = False,
) -> Link:
    """A new, unshared connection (for benchmarks and diagnostics: ``await link.echo()``)."""
    link = Link(host, port, options)
    await link.establish(credentials or Credentials.resolve(), encrypt, timeout,
                         allow_smb2=allow_smb2)
    return link


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
    ) -> None:
        """Open the remote pipe and relay it to ``sock``, which it then owns."""
        try:
            pipe = await self.open(address, credentials=credentials, timeout=timeout,
                                   encrypt=encrypt, allow_smb2=allow_smb2)
        except BaseException:
            close_gently(sock)
            raise
        relay = _SocketSide(pipe)
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
    ) -> RemotePipe:
        """Open the pipe, retrying a missing or busy one until ``timeout``."""
        if not address.is_remote:
            raise AddressError(f"{address} is not a remote pipe (\\\\HOST\\pipe\\NAME)")
        key: LinkKey = (address.host.lower(), address.port, credentials.identity(), encrypt,
                        allow_smb2, _options_key(self.options))
        links = _loop_links()
        links.opening[key] = links.opening.get(key, 0) + 1  # not idle while this opens
        try:
            return await self._open(address, key, credentials, timeout, encrypt, allow_smb2)
        finally:
            links.opening[key] -= 1
            if not links.opening[key]:
                del links.opening[key]
            links.touch(key)

    async def _open(
        self, address: PipeAddress, key: LinkKey, credentials: Credentials, timeout: float,
        encrypt: bool | None, allow_smb2: bool,
    ) -> RemotePipe:
        retry = OpenRetry(address, credentials, timeout)
        while True:
            link = await self._link(address, key, credentials, encrypt, allow_smb2,
                                    retry.deadline)
            create_timeout = retry.create_timeout()
            response, first_read = await _create(link, address.name, create_timeout)
            if response is None:
                link.retire("a CREATE was not answered (the pipe's server may be stuck)")
                raise retry.stuck(create_timeout)
            status = response.status if isinstance(response, Response) else None
            if status == st.STATUS_SUCCESS:
                assert isinstance(response, Response)
                file_id = wire.parse_create(response.message)
                return RemotePipe(link, file_id, address.posix(), first_read=first_read)
            if retry.link_gone(status, link.alive):
                link.retire(f"the session is gone ({response})")
                retry.relink(link.where, f"{response}")
                continue
            pipe_wait = functools.partial(_pipe_wait, link, address.name)
            await retry.wait(status, f"{response}", pipe_wait if link.pipe_wait else None)

    async def _link(
        self, address: PipeAddress, key: LinkKey, credentials: Credentials,
        encrypt: bool | None, allow_smb2: bool, deadline: float,
    ) -> Link:
        loop = asyncio.get_running_loop()
        links = _loop_links()
        links.touch(key)
        task = links.get(key)
        if task is not None and task.done() and (
            task.cancelled() or task.exception() is not None or not task.result().usable
        ):
            task = None
        if task is None:
            remaining = max(deadline - loop.time(), 0.05)
            task = loop.create_task(
                self._establish(address, credentials, encrypt, allow_smb2, remaining)
            )
            links[key] = task
        remaining = max(deadline - loop.time(), 0.05)
        try:
            return await asyncio.wait_for(asyncio.shield(task), remaining)
        except asyncio.TimeoutError:
            raise HostUnreachable(
                f"no SMB session with {address.host}:{address.port} within {remaining:g} s"
            ) from None

    async def _establish(
        self, address: PipeAddress, credentials: Credentials, encrypt: bool | None,
        allow_smb2: bool, timeout: float,
    ) -> Link:
        link = Link(address.host, address.port, self.options)
        await link.establish(credentials, encrypt, timeout, allow_smb2=allow_smb2)
        return link

    @staticmethod
    def connections() -> list[SmbConnectionInfo]:
        """The shared connections of every loop (live or dead, not yet replaced)."""
        infos = []
        for links in list(_links.values()):
            for task in list(links.values()):
                if task.done() and not task.cancelled() and task.exception() is None:
                    infos.append(_info(task.result()))
        return infos

    @staticmethod
    def close_connections() -> None:
        """Disconnect every shared connection now (their pipes fail with ConnectionLost)."""
        _sweep()
        for links in list(_links.values()):
            tasks = list(links.values())
            links.clear()
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is None:
                    link = task.result()
                    closed = ConnectionLost(f"the SMB connection to {link.where} was closed")
                    try:
                        task.get_loop().call_soon_threadsafe(link.abort, closed)
                    except RuntimeError:  # its loop closed meanwhile
                        link.drop()


def _options_key(options: Options | None) -> tuple[Any, ...]:
    """What of the Options makes a connection different (not the client GUID)."""
    if options is None:
        return ()
    return (options.dialects, options.ciphers, options.signing_algorithms, options.sign,
            options.dead_peer_timeout)


def _loop_links() -> _LoopLinks:
    """This event loop's shared connections (and a sweep of closed loops' ones)."""
    loop = asyncio.get_running_loop()
    _sweep()
    links = _links.get(loop)
    if links is None:
        links = _links[loop] = _LoopLinks(loop)
    return links


def _sweep() -> None:
    """Close the connections of event loops that are closed (asyncio.run() ended)."""
    for loop in [loop for loop in list(_links) if loop.is_closed()]:
        for task in _links.pop(loop, {}).values():
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().drop()


def _info(link: Link) -> SmbConnectionInfo:
    core = link.core
    neg = core.negotiated
    return SmbConnectionInfo(
        host=link.host,
        port=link.port,
        user=link.user,
        dialect=neg.dialect_name if neg else "?",
        signing_required=bool(neg and neg.signing_required) or core.options.sign,
        signed=core.signer is not None,
        encrypted=core.encrypt,
        pipes=len(link.pipes),
        alive=link.alive,
        pipe_wait=link.pipe_wait,
    )


async def _create(
    link: Link, name: str, timeout: float
) -> tuple[Response | BaseException | None, EarlyRead]:
    """One CREATE, compounded with the pipe's first READ (so that READ is posted a round
    trip sooner); the CREATE's response, the connection's error, or None if not answered
    in time, and the READ. A pipe that opens after its opener gave up is closed again."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Response] = loop.create_future()
    first_read = EarlyRead()
    core = link.core
    read_body = wire.read_request(wire.FILE_ID_RELATED, IDLE_READ_SIZE)
    requests = [(wire.CREATE, wire.create_request(name), 0), (wire.READ, read_body, 0)]

    def build() -> Outgoing:
        out = core.compound(requests)
        first_read.message_id = out.message_ids[1]
        return out

    link.submit_many(build, 2, [_resolver(future), first_read.done])
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout), first_read
    except asyncio.TimeoutError:
        future.add_done_callback(lambda f: _close_late(link, f))
        return None, first_read
    except asyncio.CancelledError:
        future.add_done_callback(lambda f: _close_late(link, f))
        raise
    except ConnectionLost as exc:
        return exc, first_read


def _close_late(link: Link, future: asyncio.Future[Response]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    response = future.result()
    if response.status == st.STATUS_SUCCESS and link.alive:
        file_id = wire.parse_create(response.message)
        link.request(wire.CLOSE, wire.close_request(file_id)).add_done_callback(
            lambda f: f.cancelled() or f.exception()
        )


async def _pipe_wait(link: Link, name: str, timeout: float) -> int | None:
    """FSCTL_PIPE_WAIT: the NTSTATUS, or None when the server cannot do it."""
    body = wire.ioctl_request(
        wire.FSCTL_PIPE_WAIT, wire.FILE_ID_RELATED, wire.pipe_wait_input(name, timeout), 0
    )
    try:
        response = await asyncio.wait_for(link.request(wire.IOCTL, body), timeout + 1.0)
    except asyncio.TimeoutError:
        return st.STATUS_IO_TIMEOUT
    except ConnectionLost:
        return None
    if response.status in st.NO_PIPE_WAIT_STATUSES:
        link.pipe_wait = False
        log.debug("%s has no FSCTL_PIPE_WAIT (%#010x)", link.where, response.status)
        return None
    return response.status


class _SocketSide(asyncio.Protocol):
    """The accepted socket's protocol: its bytes go to the pipe; backpressure both ways."""

    def __init__(self, pipe: RemotePipe) -> None:
        self.pipe = pipe
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

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

