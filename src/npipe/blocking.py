"""Blocking byte streams over pipes, mirroring ``socket.create_connection`` /
``socket.create_server``: :func:`connect` and :func:`create_server`.

The same addresses, dial options and checks as ``open_connection`` / ``start_server``,
for code that has no event loop:

- a local pipe is the Unix socket itself, found and checked as ``open_connection``
  checks it (its owner, its listener's credentials, the ACL note);
- a remote pipe is one end of a ``socketpair`` whose other end the SMB client relays to
  the pipe on npipe's I/O thread (the backend's ``attach``, as the gRPC bridge does);
- a server is ``start_server`` on the I/O thread: its front doors identify each caller
  and apply the ACL, and each admitted connection's socket is handed, detached from
  asyncio, to :meth:`PipeSocketServer.accept` (which refused callers never reach). The
  connection holds its slot (``max_connections``) until it is closed.
- On Windows (written, not run here) a pipe has no descriptor a socket can wrap: its
  asyncio streams are relayed to a ``socketpair`` on the I/O thread (the proactor loop).

An SMB pipe cannot half-close (see the README's "Half-close"): ``shutdown(SHUT_WR)`` on a
connection that goes through one raises ``OSError(EOPNOTSUPP)`` instead of silently
closing the whole pipe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import io
import os
import queue
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from npipe.acl import OWNER_ONLY, Acl
from npipe.address import PipeAddress, parse_address
from npipe.errors import PipeBusy, UnsupportedPlatform
from npipe.identity import Caller
from npipe.pipe_server import DEFAULT_LIMIT, PipeServer

if TYPE_CHECKING:
    from npipe.smb.credentials import Credentials

# A pipe open that fails on its own (PipeNotFound after retrying for ``timeout``) should
# report that, not lose the race to our own deadline by a hair.
_DEADLINE_GRACE = 0.5
# How long the default open may take (open_connection's default ``timeout``).
DEFAULT_OPEN_TIMEOUT = 10.0
# A full backlog is tried again after these (doubling) delays until the deadline.
_BUSY_FIRST_DELAY = 0.01
_BUSY_MAX_DELAY = 0.25
# Starting or stopping a server on the I/O thread.
_SERVER_OP_TIMEOUT = 30.0

_NO_HALF_CLOSE = (
    "an SMB pipe cannot half-close: shutdown(SHUT_WR) would close the whole connection"
    " (close() it, or end the message in the protocol)"
)


class PipeSocket:
    """A connected pipe, used like a blocking socket: ``sendall``, ``send``, ``recv``,
    ``recv_into``, ``makefile``, ``settimeout`` / ``gettimeout`` (a timeout raises
    ``TimeoutError``, i.e. ``socket.timeout``, and leaves the connection usable),
    ``shutdown`` (half-close where the transport has it), ``close``, ``fileno`` and
    ``with``.

    ``caller`` is the peer's identity on a connection :meth:`PipeSocketServer.accept`
    returned (None on a client's); ``socket`` the underlying socket (the pipe's own Unix
    socket, or our end of the relayed socketpair).
    """

    def __init__(
        self,
        sock: socket.socket,
        address: PipeAddress,
        *,
        caller: Caller | None = None,
        half_close: bool = True,
        pending: bytes = b"",
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.socket = sock
        self.address = address
        self.caller = caller
        self.half_close = half_close
        # Bytes the server's front door had read already when the connection was handed
        # over (a Samba caller's first message can follow its handshake): read first.
        self._pending = memoryview(pending) if pending else None
        self._lock = threading.Lock()
        self._closed = False
        self._finalizer = weakref.finalize(self, on_close) if on_close is not None else None

    # -- reading ---------------------------------------------------------------------

    def _take_pending(self, n: int) -> bytes | None:
        with self._lock:
            pending = self._pending
            if pending is None:
                return None
            data, rest = pending[:n], pending[n:]
            self._pending = rest if len(rest) else None
            return bytes(data)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """At most ``bufsize`` bytes, as ``socket.recv`` (``b""``: the other end closed);
        first what the front door had read already (:meth:`pending`)."""
        if bufsize > 0 and not flags and (data := self._take_pending(bufsize)) is not None:
            return data
        return self.socket.recv(bufsize, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """As ``socket.recv_into``: fill ``buffer`` (up to ``nbytes``), return how many bytes."""
        view = memoryview(buffer).cast("B")
        n = nbytes or len(view)
        if n > 0 and not flags and (data := self._take_pending(n)) is not None:
            view[: len(data)] = data
            return len(data)
        return self.socket.recv_into(buffer, nbytes, flags)

    # -- writing ---------------------------------------------------------------------

    def send(self, data: Any, flags: int = 0) -> int:
        """As ``socket.send``: send some of ``data``, return how many bytes went."""
        return self.socket.send(data, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        """As ``socket.sendall``: send all of ``data``."""
        self.socket.sendall(data, flags)

    # -- the rest of a socket --------------------------------------------------------

    def makefile(
        self, mode: str = "r", buffering: int | None = None, *, encoding: str | None = None,
        errors: str | None = None, newline: str | None = None,
    ) -> Any:
        """A file over this connection, as ``socket.makefile`` (closing it leaves the
        connection open)."""
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only 'r', 'w', 'b')")
        reading, writing = "r" in mode, "w" in mode
        if not (reading or writing):
            reading = True
        raw = _PipeIO(self, reading, writing)
        if buffering is None:
            buffering = -1
        if buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if "b" not in mode:
                raise ValueError("unbuffered streams must be binary")
            return raw
        buffered: io.BufferedIOBase
        if reading and writing:
            buffered = io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buffered = io.BufferedReader(raw, buffering)
        else:
            buffered = io.BufferedWriter(raw, buffering)
        if "b" in mode:
            return buffered
        text = io.TextIOWrapper(buffered, encoding, errors, newline)  # type: ignore[type-var]
        text.mode = mode  # type: ignore[misc]
        return text

    def settimeout(self, timeout: float | None) -> None:
        """As ``socket.settimeout``: seconds each call may block (None: for ever, 0: never)."""
        self.socket.settimeout(timeout)

    def gettimeout(self) -> float | None:
        """The timeout :meth:`settimeout` set."""
        return self.socket.gettimeout()

    def setblocking(self, flag: bool) -> None:
        """As ``socket.setblocking``."""
        self.socket.setblocking(flag)

    def fileno(self) -> int:
        """The socket's descriptor (select/poll on it; bytes the server's front door had
        already read when it handed the connection over are not in it: see
        :meth:`pending`)."""
        return self.socket.fileno()

    def pending(self) -> int:
        """How many bytes ``recv`` returns before reading the socket again."""
        pending = self._pending
        return 0 if pending is None else len(pending)

    def shutdown(self, how: int) -> None:
        """As ``socket.shutdown``; ``SHUT_WR`` only where the transport can half-close
        (:attr:`half_close`), else ``OSError(EOPNOTSUPP)`` rather than a silent close."""
        if how == socket.SHUT_WR and not self.half_close:
            raise OSError(errno.EOPNOTSUPP, f"{self.address}: {_NO_HALF_CLOSE}")
        self.socket.shutdown(how)

    def close(self) -> None:
        """Close the connection (again: nothing happens)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pending = None
        try:
            self.socket.close()
        finally:
            if self._finalizer is not None:
                self._finalizer()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> PipeSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self.socket.fileno()}"
        who = f" caller={self.caller}" if self.caller is not None else ""
        return f"<npipe.PipeSocket {self.address} {state}{who}>"


class _PipeIO(io.RawIOBase):
    """The raw file under :meth:`PipeSocket.makefile` (socket.SocketIO, over recv/send)."""

    def __init__(self, conn: PipeSocket, reading: bool, writing: bool) -> None:
        super().__init__()
        self._conn = conn
        self._reading = reading
        self._writing = writing

    def readable(self) -> bool:
        return self._reading

    def writable(self) -> bool:
        return self._writing

    def readinto(self, b: Any) -> int:
        return self._conn.recv_into(b)

    def write(self, b: Any) -> int:
        return self._conn.send(b)

    def fileno(self) -> int:
        return self._conn.fileno()


# --- connecting ---------------------------------------------------------------------------


def connect(
    address: str | PipeAddress,
    *,
    timeout: float | None = None,
    server_user: str | int | None = None,
    pipe_dir: str | os.PathLike[str] | None = None,
    credentials: Credentials | None = None,
    encrypt: bool | None = None,
    smb_backend: str | None = None,
    allow_smb2: bool = False,
) -> PipeSocket:
    """Open a pipe and return a blocking, socket-like :class:`PipeSocket`.

    As ``socket.create_connection``: ``timeout`` bounds the opening (a busy or missing
    pipe is retried that long, as by ``open_connection``) and stays the connection's
    timeout; None opens within 10 s and leaves the connection blocking. A busy pipe (a
    local one whose listen backlog is full) is waited for until then, and is PipeBusy
    after. The options and errors are ``open_connection``'s (AccessDenied, PipeNotFound,
    AuthenticationError, ...); an open the SMB client has not finished in time raises
    ``TimeoutError``.
    """
    addr = parse_address(address)
    open_timeout = DEFAULT_OPEN_TIMEOUT if timeout is None else timeout
    if sys.platform == "win32":
        from npipe.streams import windows_native

        if windows_native(addr, credentials, smb_backend, encrypt):
            sock = _open_relayed(addr, open_timeout, server_user=server_user)
            sock.settimeout(timeout)
            return PipeSocket(sock, addr, half_close=False)
    if addr.is_remote:
        sock = _open_remote(addr, open_timeout, credentials=credentials, encrypt=encrypt,
                            smb_backend=smb_backend, allow_smb2=allow_smb2)
        sock.settimeout(timeout)
        return PipeSocket(sock, addr, half_close=False)
    sock = _open_local(addr, open_timeout, server_user=server_user, pipe_dir=pipe_dir)
    sock.settimeout(timeout)
    return PipeSocket(sock, addr)


def _open_local(
    addr: PipeAddress, timeout: float, *, server_user: str | int | None,
    pipe_dir: str | os.PathLike[str] | None,
) -> socket.socket:
    if sys.platform == "win32":  # (local pipes are the kernel's there: _open_relayed)
        raise UnsupportedPlatform(f"{addr}: CPython cannot dial AF_UNIX paths on Windows")
    from npipe.local.dial import check_admitted, check_server, connect_error, find_socket

    path = find_socket(addr, server_user=server_user, directory=pipe_dir)
    deadline = time.monotonic() + timeout
    delay = _BUSY_FIRST_DELAY
    while True:  # a full backlog (busy) is waited out until the deadline, as on Windows
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # (non-inheritable: PEP 446)
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except OSError as e:
            sock.close()
            error = connect_error(e, path)
            left = deadline - time.monotonic()
            if isinstance(error, PipeBusy) and left > 0:
                time.sleep(min(delay, left))
                delay = min(delay * 2, _BUSY_MAX_DELAY)
                continue
            raise error from e
        break
    try:
        check_server(sock, path, server_user)
        check_admitted(sock, path, addr)
    except BaseException:
        sock.close()
        raise
    return sock


def _open_remote(
    addr: PipeAddress, timeout: float, *, credentials: Credentials | None,
    encrypt: bool | None, smb_backend: str | None, allow_smb2: bool,
) -> socket.socket:
    from npipe import redirector
    from npipe.smb.credentials import Credentials

    creds = credentials if credentials is not None else Credentials.resolve()
    ours, theirs = socket.socketpair()  # (AF_UNIX; on Windows, loopback TCP)
    try:
        # attach() owns ``theirs`` from here: it closes it if the open fails.
        _run_bounded(
            redirector.attach(smb_backend, addr, theirs, credentials=creds, timeout=timeout,
                              encrypt=encrypt, allow_smb2=allow_smb2),
            timeout, addr,
        )
    except BaseException:
        ours.close()
        raise
    return ours


def _run_bounded(coro: Any, timeout: float, addr: PipeAddress) -> Any:
    from npipe import ioloop

    try:
        return ioloop.run(coro, timeout + _DEADLINE_GRACE)
    except concurrent.futures.TimeoutError as e:  # (TimeoutError itself from 3.11)
        raise TimeoutError(f"timed out opening pipe {addr} ({timeout:g} s)") from e


def _open_relayed(
    addr: PipeAddress, timeout: float, *, server_user: str | int | None
) -> socket.socket:
    """Windows: open the pipe on the I/O thread and relay its streams to a socketpair."""
    from npipe.streams import open_connection

    async def opened() -> socket.socket:
        reader, writer = await open_connection(addr, server_user=server_user, timeout=timeout)
        return await relay_to_socket(reader, writer, half_close=False)

    return _run_bounded(opened(), timeout, addr)  # type: ignore[no-any-return]


async def relay_to_socket(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, half_close: bool,
    done: asyncio.Future[None] | None = None,
) -> socket.socket:
    """Relay a pair of asyncio streams to a new socketpair, in the running loop (until
    either side ends); return the other, blocking end. ``done`` is set when the relay
    has ended."""
    from npipe.bridges.relay import RELAY_LIMIT, Side, relay

    ours, theirs = socket.socketpair()
    try:
        theirs.setblocking(False)
        t_reader, t_writer = await asyncio.open_connection(sock=theirs, limit=RELAY_LIMIT)
    except BaseException:
        ours.close()
        theirs.close()
        raise

    async def run() -> None:
        try:
            await relay(Side("pipe", reader, writer, half_close=half_close),
                        Side("socket", t_reader, t_writer))
        finally:
            if done is not None and not done.done():
                done.set_result(None)

    task = asyncio.get_running_loop().create_task(run())
    _relays.add(task)
    task.add_done_callback(_relays.discard)
    ours.setblocking(True)
    return ours


_relays: set[asyncio.Task[None]] = set()


# --- serving ------------------------------------------------------------------------------


_CLOSED = object()


class PipeSocketServer:
    """A pipe served for blocking code (see :func:`create_server`): ``accept()`` returns
    ``(connection, caller)`` for each caller the pipe's ACL admitted, from any thread;
    ``close()`` from any thread stops it (an ``accept()`` blocked meanwhile raises
    ``OSError``, as on a closed socket); ``settimeout`` bounds ``accept``."""

    def __init__(self, address: PipeAddress) -> None:
        self.address = address
        self._queue: queue.Queue[Any] = queue.Queue()
        self._timeout: float | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._server: PipeServer | None = None

    @property
    def server(self) -> PipeServer:
        """The asyncio PipeServer underneath (on npipe's I/O thread)."""
        assert self._server is not None
        return self._server

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (as ``asyncio.Server.sockets``)."""
        return tuple(getattr(self._server, "sockets", ()))

    def settimeout(self, timeout: float | None) -> None:
        """Seconds :meth:`accept` waits for a caller (None: for ever), as ``socket.settimeout``."""
        if timeout is not None and timeout < 0:
            raise ValueError("Timeout value out of range")
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        """The timeout :meth:`settimeout` set."""
        return self._timeout

    def accept(self) -> tuple[PipeSocket, Caller]:
        """The next admitted caller's connection and identity (``socket.timeout`` after
        ``settimeout``'s seconds; ``OSError(EBADF)`` once the server is closed)."""
        while True:
            if self._closed:
                raise _closed_error(self.address)
            try:
                item = self._queue.get(timeout=self._timeout)
            except queue.Empty:
                raise TimeoutError("timed out") from None
            if item is _CLOSED:
                self._queue.put(_CLOSED)  # wake every other accept() too
                raise _closed_error(self.address)
            conn: PipeSocket = item
            if conn.closed:  # (its caller's slot was given back already)
                continue
            assert conn.caller is not None
            return conn, conn.caller

    def close(self) -> None:
        """Stop serving and give up the name (connections accepted stay open; those
        not accepted yet are closed)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_CLOSED)
        server = self._server
        if server is not None:  # (not wait_closed: that waits for every connection)
            from npipe import ioloop

            ioloop.call(server.close, timeout=_SERVER_OP_TIMEOUT)
        while True:  # who connected but was never accepted
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _CLOSED:
                item.close()
        self._queue.put(_CLOSED)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> PipeSocketServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<npipe.PipeSocketServer {self.address}{' closed' if self._closed else ''}>"

    # -- on the I/O thread -----------------------------------------------------------

    async def _hand_over(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """start_server's handler: the caller is identified and admitted; give its
        connection to accept() and hold its slot until it is closed."""
        from npipe.streams import caller

        who = caller(writer)
        if who is None or self._closed:
            return
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        def on_close() -> None:  # (from any thread, also at garbage collection)
            def end() -> None:
                if not ended.done():
                    ended.set_result(None)

            if not loop.is_closed():
                loop.call_soon_threadsafe(end)

        half_close = who.transport != "smb"
        transport_sock = writer.get_extra_info("socket")
        if sys.platform == "win32" or transport_sock is None:
            sock = await relay_to_socket(reader, writer, half_close=False, done=ended)
            conn = PipeSocket(sock, self.address, caller=who, half_close=False,
                              on_close=on_close)
        else:
            transport: Any = writer.transport
            transport.pause_reading()  # from now on the socket is read by its new owner
            buffer: bytearray = getattr(reader, "_buffer", bytearray())
            pending = bytes(buffer)
            buffer.clear()
            sock = socket.socket(fileno=os.dup(transport_sock.fileno()))
            sock.setblocking(True)
            conn = PipeSocket(sock, self.address, caller=who, half_close=half_close,
                              pending=pending, on_close=on_close)
        self._queue.put(conn)
        if self._closed:  # closed meanwhile: close() may have drained the queue already
            conn.close()
        await ended  # (the asyncio side of the socket closes when this returns)


def _closed_error(addr: PipeAddress) -> OSError:
    return OSError(errno.EBADF, f"the server of pipe {addr} is closed")


def create_server(
    name: str | PipeAddress,
    *,
    acl: Acl = OWNER_ONLY,
    pipe_dir: str | os.PathLike[str] | None = None,
    dotnet: bool = False,
    smb: bool = False,
    limit: int = DEFAULT_LIMIT,
    max_connections: int | None = None,
) -> PipeSocketServer:
    """Serve pipe ``name`` for blocking code, as ``socket.create_server``; its
    ``accept()`` returns ``(connection, caller)``.

    The options are ``start_server``'s: the ACL is applied before ``accept`` sees a
    caller (refused callers are logged and closed, never returned), ``smb=True`` serves
    SMB clients through Samba too, and at most ``max_connections`` connections are
    open at once, accepted or waiting to be: a connection holds its slot until it is
    closed. The pipe is served on npipe's I/O thread.
    """
    from npipe import ioloop
    from npipe.streams import start_server

    addr = parse_address(name)
    server = PipeSocketServer(addr)
    server._server = ioloop.run(
        start_server(server._hand_over, addr, acl=acl, pipe_dir=pipe_dir, dotnet=dotnet,
                     smb=smb, limit=limit, max_connections=max_connections),
        _SERVER_OP_TIMEOUT,
    )
    return server


__all__ = ["PipeSocket", "PipeSocketServer", "connect", "create_server", "relay_to_socket"]
