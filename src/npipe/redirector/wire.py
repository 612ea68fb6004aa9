"""Reading and writing the redirector's frames on non-blocking Unix sockets, from asyncio
(both sides: the process that asks and the redirector)."""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from collections.abc import Callable

from npipe.redirector import protocol

# At most one descriptor comes with a request; room for a few more, closed unread.
_MAX_FDS = 4


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    await _wait(loop, sock, writable=False)


async def wait_writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    await _wait(loop, sock, writable=True)


async def _wait(loop: asyncio.AbstractEventLoop, sock: socket.socket, *,
                writable: bool) -> None:
    fd = sock.fileno()
    ready = loop.create_future()
    (loop.add_writer if writable else loop.add_reader)(fd, _wake, ready)
    try:
        await ready
    finally:
        (loop.remove_writer if writable else loop.remove_reader)(fd)


async def read_frame(loop: asyncio.AbstractEventLoop, sock: socket.socket, *,
                     with_fd: bool = False) -> tuple[bytes | None, int | None]:
    """One frame from ``sock`` (None: it ended first) and, with ``with_fd``, the
    descriptor that came with it (None if none did; any more are closed)."""
    frames = protocol.reader()
    fd: int | None = None
    try:
        while True:
            try:
                if with_fd:
                    data, fds, _flags, _addr = socket.recv_fds(sock, frames.bytes_needed,
                                                               _MAX_FDS)
                    for extra in fds:
                        if fd is None:
                            fd = extra
                        else:
                            os.close(extra)
                else:
                    data = sock.recv(frames.bytes_needed)
            except (BlockingIOError, InterruptedError):
                await wait_readable(loop, sock)
                continue
            if not data:
                if frames.in_message:
                    raise protocol.RedirectorProtocolError("the frame was cut short")
                return None, fd
            message = protocol.whole(frames.feed(data))
            if message is not None:
                return message, fd
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


async def send_frame(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes,
                     fd: int | None = None) -> None:
    """Send ``data``, with descriptor ``fd`` attached to its first byte."""
    if fd is not None:
        while True:
            try:
                sent = sock.sendmsg([data[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                  array.array("i", [fd]))])
                break
            except (BlockingIOError, InterruptedError):
                await wait_writable(loop, sock)
        data = data[sent:]
    if data:
        await loop.sock_sendall(sock, data)


def close_when_ended(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                     then: Callable[[], None] | None = None) -> Callable[[], None]:
    """Close ``sock`` (on ``loop``) once its peer ends it, calling ``then()`` first.
    Nothing is expected on it: anything that comes is dropped. Returns the function
    that closes it sooner (on ``loop``; never ``sock.close()`` alone: the loop would
    keep watching a descriptor number that the next socket may get)."""
    fd = sock.fileno()

    def close() -> None:
        if sock.fileno() < 0:
            return
        loop.remove_reader(fd)
        if then is not None:
            with contextlib.suppress(Exception):
                then()
        sock.close()

    def readable() -> None:
        try:
            if sock.recv(4096):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        close()

    sock.setblocking(False)
    loop.add_reader(fd, readable)
    return close
