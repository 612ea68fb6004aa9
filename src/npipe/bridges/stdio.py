"""``relay``: this process's stdin/stdout <-> a pipe, for ssh's ProxyCommand, socat's
EXEC and the like. Nothing but the pipe's bytes ever goes to stdout.

stdin and stdout may be pipes, sockets (socat's EXEC hands over one socketpair end for
both), a terminal or a file: pipes and sockets are watched by the event loop, the rest is
read by a thread and written directly (a file or a terminal does not block for long).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import stat
import threading
from typing import Any

import npipe
from npipe.address import PipeAddress, parse_address
from npipe.bridges.relay import CHUNK, RELAY_LIMIT, ByteReader, ByteWriter, RelayStats, Side, relay

STDIN, STDOUT = 0, 1
_THREAD_QUEUE = 4  # chunks a reading thread may be ahead of the relay


class _ThreadReader:
    """Reads a descriptor the event loop cannot watch (a file, a terminal) in a daemon
    thread, at most a few chunks ahead."""

    def __init__(self, fd: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes | BaseException] = asyncio.Queue(_THREAD_QUEUE)
        self._rest = b""
        self._eof = False
        threading.Thread(target=self._run, args=(fd,), daemon=True,
                         name="npipe-stdin").start()

    def _run(self, fd: int) -> None:
        while True:
            try:
                item: bytes | BaseException = os.read(fd, CHUNK)
            except OSError as e:
                item = e
            if not self._hand_over(item):
                return
            if not isinstance(item, bytes) or not item:
                return

    def _hand_over(self, item: bytes | BaseException) -> bool:
        """Put ``item`` in the queue from this thread, waiting while it is full; False
        once the loop is gone. The queue's put() coroutine is made on the loop itself: one
        made here and never run (the loop closing first) would be reported at exit as
        "coroutine 'Queue.put' was never awaited"."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def put() -> None:
            task = self._loop.create_task(self._queue.put(item))
            task.add_done_callback(lambda t: done.cancel() if t.cancelled()
                                   else done.set_result(None))

        try:
            self._loop.call_soon_threadsafe(put)
        except RuntimeError:  # the loop is closed
            return False
        while True:
            try:
                done.result(timeout=0.5)
                return True
            except concurrent.futures.TimeoutError:
                if self._loop.is_closed():
                    return False
            except concurrent.futures.CancelledError:
                return False

    async def read(self, n: int = -1) -> bytes:
        if not self._rest and not self._eof:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            self._rest, self._eof = item, not item
        if n < 0:
            n = len(self._rest)
        data, self._rest = self._rest[:n], self._rest[n:]
        return data


class _FdWriter:
    """Writes to a descriptor the event loop cannot watch (a file, a terminal)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    async def drain(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True  # nothing to send: whoever reads the file sees its end

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass


def _watchable(st: os.stat_result) -> bool:
    return stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode)


async def open_stdio(
    limit: int = RELAY_LIMIT,
) -> tuple[ByteReader, ByteWriter, list[asyncio.BaseTransport]]:
    """stdin and stdout as a reader and a writer (and transports to close at the end)."""
    loop = asyncio.get_running_loop()
    st_in, st_out = os.fstat(STDIN), os.fstat(STDOUT)
    if (stat.S_ISSOCK(st_in.st_mode) and stat.S_ISSOCK(st_out.st_mode)
            and (st_in.st_dev, st_in.st_ino) == (st_out.st_dev, st_out.st_ino)):
        # One socket for both (socat EXEC): shutdown(SHUT_WR) is its half-close.
        sock = socket.socket(fileno=os.dup(STDIN))
        r, w = await asyncio.open_connection(sock=sock, limit=limit)
        return r, w, []
    transports: list[asyncio.BaseTransport] = []
    reader: ByteReader
    writer: ByteWriter
    if _watchable(st_in):
        stream = asyncio.StreamReader(limit=limit)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stream), os.fdopen(os.dup(STDIN), "rb", 0)
        )
        transports.append(transport)
        reader = stream
    else:
        reader = _ThreadReader(STDIN)
    if _watchable(st_out):
        out_protocol = asyncio.StreamReaderProtocol(asyncio.StreamReader())
        out_transport, _ = await loop.connect_write_pipe(
            lambda: out_protocol, os.fdopen(os.dup(STDOUT), "wb", 0)
        )
        writer = asyncio.StreamWriter(out_transport, out_protocol, None, loop)
    else:
        writer = _FdWriter(STDOUT)
    return reader, writer, transports


async def relay_stdio(
    address: str | PipeAddress, *, limit: int = RELAY_LIMIT, **dial: Any
) -> RelayStats:
    """Open the pipe, then relay stdin -> pipe and pipe -> stdout until the pipe's side
    ends. End of stdin half-closes a local pipe; an SMB pipe cannot be half-closed, so
    then the pipe is read on until its server ends it."""
    addr = parse_address(address)
    pipe_reader, pipe_writer = await npipe.open_connection(addr, limit=limit, **dial)
    try:
        reader, writer, transports = await open_stdio(limit)
    except BaseException:
        pipe_writer.close()
        raise
    try:
        return await relay(Side("stdin/stdout", reader, writer),
                           # An SMB pipe has no half-close, whatever the backend says.
                           Side("pipe", pipe_reader, pipe_writer, final=True,
                                half_close=not addr.is_remote),
                           keep_reading=True)
    finally:
        for transport in transports:
            with contextlib.suppress(Exception):
                transport.close()


__all__ = ["open_stdio", "relay_stdio"]
