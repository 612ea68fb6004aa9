"""Listen on and connect to an :class:`~npipe.bridges.endpoint.Endpoint`, and keep
track of the connections being served so that a stop can give them a bounded grace."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol

from npipe.bridges.endpoint import Endpoint
from npipe.errors import NpipeError
from npipe.frontdoor import ConnectionSlots, StreamDoor
from npipe.local.peercred import peer_credentials

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
log = logging.getLogger("npipe.bridges")

# Owner only: whoever reaches a forwarder's socket gets the pipe with its credentials.
DEFAULT_UNIX_MODE = 0o600
BACKLOG = 100  # as asyncio.start_server's


class Door(Protocol):
    """What accepts on one listening socket: a StreamDoor, or asyncio's server."""

    def close(self) -> None: ...


class Listener:
    """A listening TCP or Unix socket (``endpoint`` is what was bound, the kernel's port
    included); closing it removes the Unix socket it made."""

    def __init__(self, doors: list[Door], socks: list[socket.socket], endpoint: Endpoint,
                 made: tuple[int, int] | None = None) -> None:
        self._doors = doors
        self._socks = socks
        self.endpoint = endpoint
        self._made = made  # (st_dev, st_ino) of the Unix socket file we bound

    def close(self) -> None:
        for door in self._doors:
            door.close()
        for sock in self._socks:
            sock.close()
        self._socks = []
        if self._made is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self.endpoint.path)
                if (st.st_dev, st.st_ino) == self._made:  # still ours, not a successor's
                    os.unlink(self.endpoint.path)
            self._made = None


async def listen(
    endpoint: Endpoint, handler: Handler, *, slots: ConnectionSlots,
    mode: int = DEFAULT_UNIX_MODE, limit: int = 64 * 1024,
) -> Listener:
    """Listen on ``endpoint`` and serve each connection with ``handler``, at most
    ``slots.limit`` at once: past that, callers wait in the listen backlog (see
    :class:`npipe.frontdoor.StreamDoor`) until a connection ends."""
    made = None
    if endpoint.kind == "unix":
        socks = [_bind_unix(endpoint.path, mode)]
        st = os.stat(endpoint.path)
        made = (st.st_dev, st.st_ino)
    else:
        socks = await _bind_tcp(endpoint)
        bound = socks[0].getsockname()
        endpoint = Endpoint("tcp", host=str(bound[0]), port=int(bound[1]))
    doors: list[Door] = []
    listener = Listener(doors, socks, endpoint, made)
    try:
        for sock in socks:
            sock.listen(BACKLOG)
            sock.setblocking(False)
            doors.append(await _door(sock, handler, slots, limit, endpoint))
    except BaseException:
        listener.close()
        raise
    return listener


async def _door(sock: socket.socket, handler: Handler, slots: ConnectionSlots, limit: int,
                endpoint: Endpoint) -> Door:
    if sys.platform == "win32":
        # The proactor loop has no add_reader, which StreamDoor waits with: asyncio's
        # server accepts, and a caller past the cap waits accepted, before its pipe opens.
        async def in_slot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await slots.take_async()
            try:
                await handler(reader, writer)
            finally:
                slots.give_back()

        return await asyncio.start_server(in_slot, sock=sock, limit=limit)
    return StreamDoor(sock, handler, slots, limit=limit, pipe=endpoint, logger=log)


async def _bind_tcp(endpoint: Endpoint) -> list[socket.socket]:
    """Every address of the host (as asyncio.start_server binds them); with port 0 the
    first only, since each address would get a different free port."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    if not infos:
        raise NpipeError(f"{endpoint}: {endpoint.host} has no address")
    if endpoint.port == 0:
        infos = infos[:1]
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # the IPv4 address has its own socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                raise NpipeError(f"{endpoint}: cannot listen on {address[0]}: "
                                 f"{e.strerror or e}") from e
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _bind_unix(path: str, mode: int) -> socket.socket:
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Bound with no access for others at all, then opened up to ``mode``: there is no
        # moment at which the socket is wider open than asked.
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale_socket(path: str) -> None:
    """A socket file nobody listens on any more is taken over; anything else is not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise NpipeError(f"unix:{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise NpipeError(f"unix:{path}: {e.strerror or e}") from e
        return
    finally:
        probe.close()
    raise NpipeError(f"unix:{path}: something is already listening there")


async def connect(
    endpoint: Endpoint, *, timeout: float, limit: int = 64 * 1024
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        if endpoint.kind == "unix":
            coro = asyncio.open_unix_connection(endpoint.path, limit=limit)
        else:
            coro = asyncio.open_connection(endpoint.host, endpoint.port, limit=limit)
        return await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError:
        raise NpipeError(f"{endpoint}: no answer within {timeout:g} s") from None
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)  # not asyncio's "Connect call failed"
        raise NpipeError(f"{endpoint}: {why}") from e


def peer_name(writer: asyncio.StreamWriter) -> str:
    """The other end of an accepted connection, for the log."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            pid, uid, _gid = peer_credentials(sock)
        except OSError:
            return "unix peer"
        return f"unix peer pid={pid} uid={uid}"
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return "peer"


class Connections:
    """The tasks serving connections now, to end them within a grace period."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()

    def track(self) -> None:
        """Count the running task (a connection handler) until it ends."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def __len__(self) -> int:
        return len(self._tasks)

    async def finish(self, grace: float) -> None:
        """Let the connections end by themselves for ``grace`` seconds, then cancel the
        rest (and wait a little for their cleanup)."""
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=grace + 5.0)


__all__ = ["BACKLOG", "DEFAULT_UNIX_MODE", "Connections", "Listener", "connect", "listen",
           "peer_name"]
