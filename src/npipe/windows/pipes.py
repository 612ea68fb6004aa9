"""Windows named pipes on asyncio's ProactorEventLoop: npipe's server, client and the
gRPC relays (Windows only; npipe.streams and npipe.grpc import it on win32 alone).

The server keeps one pending instance, as go-winio and Kestrel do: the first is
created with FILE_FLAG_FIRST_PIPE_INSTANCE (a live name is never joined: PipeInUse),
and the next is created before a connected one is handed off, so the name never
lapses and no one else can claim it in between. Each caller is identified from its
token (at identification level) and checked against the ACL before the handler runs;
the pipe's DACL has already refused everyone the ACL does not name.

The I/O is asyncio's own overlapped machinery (``IocpProactor.accept_pipe`` and the
duplex pipe transport that ``create_pipe_connection`` uses); only the handles are
npipe's, made by npipe.windows.win32 with a security descriptor and SQOS.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import sys
import tempfile
import threading
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from npipe.acl import OWNER_ONLY, Acl
from npipe.address import PipeAddress
from npipe.errors import ConfigError, NpipeError
from npipe.identity import Caller
from npipe.pipe_server import DEFAULT_LIMIT, PipeServer
from npipe.windows import win32
from npipe.windows.errors import pipe_error
from npipe.windows.identity import acl_admits, check_server_owner, windows_caller
from npipe.windows.names import is_local, pipe_path
from npipe.windows.sddl import admitted_sids, pipe_security_descriptor
from npipe.windows.waiting import open_with_wait

assert sys.platform == "win32"  # mypy: checked as Windows code only

from asyncio.windows_utils import PipeHandle  # noqa: E402  (Windows-only module)

log = logging.getLogger("npipe.windows")

T = TypeVar("T")
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

CALLER_KEY = "npipe_caller"  # the transport's extra info: the identified Caller
NETWORK_SID = "S-1-5-2"  # in the token of every caller that came over the network
RELAY_CHUNK = 256 * 1024
RETRY_DELAY = 1.0  # after an instance could not be made (out of resources?)


def _proactor_loop() -> asyncio.ProactorEventLoop:
    loop = asyncio.get_running_loop()
    if not isinstance(loop, asyncio.ProactorEventLoop):
        raise NpipeError(
            "Windows pipes need asyncio's ProactorEventLoop (the default on Windows), "
            f"not a {type(loop).__name__}: do not set the selector event loop policy"
        )
    return loop


def _private(loop: asyncio.ProactorEventLoop) -> Any:
    """The loop, for its private members (typeshed does not declare them)."""
    return loop


def _winerror(e: OSError) -> int:
    return e.winerror if isinstance(e.winerror, int) else 0


def _in_thread(fn: Callable[[], T], cleanup: Callable[[T], None] | None = None) -> Awaitable[T]:
    """Run a blocking call (WaitNamedPipe, a token lookup) on a thread of its own, so
    that many waiting callers cannot starve the default executor. If the awaiting task
    is cancelled, ``cleanup`` disposes of the result that arrives later (a handle)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.cancelled():
            if ok and cleanup is not None:
                cleanup(value)
        elif ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def run() -> None:
        value: Any
        try:
            ok, value = True, fn()
        except BaseException as e:  # handed to the awaiting task
            ok, value = False, e
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # the loop is gone: nobody will take the result
            if ok and cleanup is not None:
                cleanup(value)

    threading.Thread(target=run, name="npipe-win32-call", daemon=True).start()
    return fut


async def _streams(
    loop: asyncio.ProactorEventLoop, pipe: PipeHandle, limit: int, extra: dict[str, Any]
) -> Streams:
    """asyncio streams over a connected pipe handle (the transport owns it from now)."""
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    waiter = loop.create_future()
    # asyncio's own duplex pipe transport, as create_pipe_connection makes it.
    transport = _private(loop)._make_duplex_pipe_transport(pipe, protocol, waiter, extra)
    try:
        await waiter
    except BaseException:
        transport.close()
        raise
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


# --- client ---------------------------------------------------------------------------


def _expected_server(server_user: str | int | None) -> str | None:
    """``server_user`` as a SID (a name is looked up), or None."""
    if server_user is None:
        return None
    if isinstance(server_user, int):
        raise ConfigError(f"server_user={server_user}: a uid means nothing on Windows; "
                          "give an account (DOMAIN\\name) or a SID")
    if server_user.upper().startswith("S-1-"):
        return server_user.upper()
    try:
        return win32.account_sid(server_user)
    except OSError as e:
        raise ConfigError(f"server_user {server_user!r}: no such account ({e.strerror})") from e


async def open_pipe_client(
    address: PipeAddress,
    *,
    server_user: str | int | None = None,
    timeout: float = 10.0,
    limit: int = DEFAULT_LIMIT,
) -> Streams:
    """Open ``\\\\.\\pipe\\NAME`` (or ``\\\\HOST\\pipe\\NAME`` through Windows' own SMB
    client, with this user's logon) and return asyncio streams.

    A busy pipe is waited for (WaitNamedPipe) and a missing one retried, up to
    ``timeout`` seconds. A local pipe must be owned by this user, SYSTEM,
    Administrators or ``server_user`` (account or SID): anything else is refused with
    AccessDenied before a byte is sent.
    """
    loop = _proactor_loop()
    path = pipe_path(address)
    local = is_local(address)
    expected = _expected_server(server_user) if local else None
    handle = await _in_thread(
        lambda: open_with_wait(
            lambda: win32.open_pipe(path),
            lambda ms: win32.wait_named_pipe(path, ms),
            timeout,
        ),
        win32.close_handle,
    )
    pipe = PipeHandle(handle)
    try:
        extra: dict[str, Any] = {"peername": path}
        if local:
            try:
                owner = win32.pipe_owner_sid(handle)
                extra["server_pid"] = win32.server_process_id(handle)
            except OSError as e:
                raise pipe_error(_winerror(e), path, opening=True) from e
            check_server_owner(expected, owner, win32.current_user_sid())
            extra["server_sid"] = owner
        return await _streams(loop, pipe, limit, extra)
    except BaseException:
        pipe.close()
        raise


_client_relays: set[asyncio.Task[None]] = set()


async def attach_client(
    address: PipeAddress,
    sock: socket.socket,
    *,
    server_user: str | int | None = None,
    timeout: float = 10.0,
) -> None:
    """Open the pipe as :func:`open_pipe_client` does and relay it to ``sock`` (one end
    of a socketpair whose other end blocking code holds: npipe.http's sync transport)
    in a task on this loop, which then owns ``sock``; if the open fails, ``sock`` is
    closed and the error raised. The relay ends when either side does."""
    loop = _proactor_loop()
    try:
        reader, writer = await open_pipe_client(address, server_user=server_user,
                                                timeout=timeout)
    except BaseException:
        sock.close()
        raise
    task = loop.create_task(_relay_client(loop, reader, writer, sock))
    _client_relays.add(task)
    task.add_done_callback(_client_relays.discard)


async def _relay_client(
    loop: asyncio.AbstractEventLoop, reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter, sock: socket.socket,
) -> None:
    """Bytes both ways between a client's pipe and its socketpair end. The socket's
    owner closing it closes the pipe at once (a pipe cannot half-close); the pipe's end
    is passed on as the socket's (SHUT_WR), and the relay ends when the owner closes."""
    sock.setblocking(False)

    async def pipe_to_socket() -> None:
        while data := await reader.read(RELAY_CHUNK):
            await loop.sock_sendall(sock, data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    async def socket_to_pipe() -> None:
        while data := await loop.sock_recv(sock, RELAY_CHUNK):
            writer.write(data)
            await writer.drain()

    from_pipe = asyncio.ensure_future(pipe_to_socket())
    from_socket = asyncio.ensure_future(socket_to_pipe())
    try:
        await asyncio.wait([from_pipe, from_socket], return_when=asyncio.FIRST_COMPLETED)
        if from_pipe.done() and from_pipe.exception() is None:
            await from_socket  # the pipe ended: until the socket's owner closes it
    except (OSError, ConnectionError):
        pass
    finally:
        for t in (from_pipe, from_socket):
            t.cancel()
        await asyncio.gather(from_pipe, from_socket, return_exceptions=True)
        sock.close()
        writer.close()


# --- server ---------------------------------------------------------------------------


def pipe_client_caller(handle: int) -> Caller:
    """Who is on the client end of the connected server pipe ``handle``, from its token
    (blocking: looking an account up may ask a domain controller)."""
    try:
        sid, groups = win32.client_token_sids(handle)
    except OSError as e:
        if (e.winerror != win32.ERROR_CANNOT_IMPERSONATE
                or win32.client_computer_name(handle) is not None):
            raise  # (a remote caller's pid is not a process of this machine)
        # No client context yet: a local caller's process token says the same.
        sid, groups = win32.process_token_sids(win32.client_process_id(handle))
    remote = NETWORK_SID in groups
    account, domain = win32.lookup_account(sid)
    return windows_caller(
        pid=None if remote else win32.client_process_id(handle),
        sid=sid, account=account, domain=domain, group_sids=groups, remote=remote,
        address=win32.client_computer_name(handle) if remote else None,
    )


class WindowsPipeServer(PipeServer):
    """A running server on a Windows pipe (npipe.PipeServer's API); close it to give
    up the name. Made by :func:`start_pipe_server`."""

    def __init__(
        self,
        address: PipeAddress,
        handler: Handler,
        *,
        acl: Acl,
        remote: bool,
        max_connections: int,
        limit: int,
    ) -> None:
        self.address = address
        self.pipe_path = pipe_path(address)
        self._handler = handler
        self._acl = acl
        self._remote = remote
        self._limit = limit
        self._loop = _proactor_loop()
        self._owner_sid = win32.current_user_sid()
        self._sddl = pipe_security_descriptor(
            acl, owner_sid=self._owner_sid, remote=remote, resolve_account=win32.account_sid
        )
        # The ACL's accounts and UPNs as SIDs, resolved once (as the DACL has them), so the
        # check of each caller matches what the kernel let in.
        self._admitted = admitted_sids(acl, win32.account_sid)
        self._slots = asyncio.Semaphore(max_connections)
        self._connections: set[asyncio.Task[None]] = set()
        self._closed = False
        self._stopped: asyncio.Future[None] = self._loop.create_future()
        # The first instance now, so that a taken name fails start_server itself.
        self._pending: PipeHandle | None = self._new_instance(first=True)
        self._accepting = self._loop.create_task(self._accept_loop())

    def _new_instance(self, *, first: bool) -> PipeHandle:
        try:
            with win32.security_attributes(self._sddl) as sa:
                handle = win32.create_pipe_instance(
                    self.pipe_path, sa, first=first, remote=self._remote
                )
        except OSError as e:
            raise pipe_error(_winerror(e), self.pipe_path, opening=False) from e
        return PipeHandle(handle)

    @property
    def path(self) -> Path:
        return Path(self.pipe_path)

    @property
    def paths(self) -> list[Path]:
        return [self.path]

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return ()  # a Windows pipe has no socket

    def is_serving(self) -> bool:
        return not self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._accepting.cancel()  # cancels the pending ConnectNamedPipe (CancelIoEx)
        if self._pending is not None:
            self._pending.close()
            self._pending = None
        if not self._stopped.done():
            self._stopped.set_result(None)

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self._accepting
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)

    async def serve_forever(self) -> None:
        try:
            await asyncio.shield(self._stopped)
        finally:  # cancelled, or closed: give up the name at once, then let calls end
            self.close()
            await self.wait_closed()

    async def _accept_loop(self) -> None:
        proactor = _private(self._loop)._proactor  # IocpProactor, as start_serving_pipe
        while not self._closed:
            await self._slots.acquire()  # at the cap: the pending instance holds a caller
            try:
                pipe = self._pending or await self._retry_instance()
                self._pending = pipe
                try:
                    await proactor.accept_pipe(pipe)
                except OSError as e:
                    # The caller left before we saw it (ERROR_NO_DATA) or the instance
                    # broke: replace it (the new one first: the name never lapses).
                    log.debug("pipe %s: accept failed (%s); new instance", self.address, e)
                    self._pending = None
                    with contextlib.suppress(NpipeError):  # (retried at the top)
                        self._pending = self._new_instance(first=False)
                    pipe.close()
                    self._slots.release()
                    continue
                if self._closed:  # closed while the caller came: no new instance
                    pipe.close()
                    self._slots.release()
                    return
                # The next instance before the hand-off: the name never lapses.
                self._pending = None
                try:
                    self._pending = self._new_instance(first=False)
                except NpipeError as e:
                    log.error("pipe %s: no new instance (%s); retrying", self.address, e)
            except BaseException:
                self._slots.release()
                raise
            task = self._loop.create_task(self._serve(pipe))
            self._connections.add(task)
            task.add_done_callback(self._connection_done)

    async def _retry_instance(self) -> PipeHandle:
        while True:
            try:
                return self._new_instance(first=False)
            except NpipeError as e:
                log.error("pipe %s: no new instance (%s); retrying", self.address, e)
                await asyncio.sleep(RETRY_DELAY)

    def _connection_done(self, task: asyncio.Task[None]) -> None:
        self._connections.discard(task)
        self._slots.release()

    def _identify(self, handle: int) -> Caller | None:
        """Who the caller is (from its token), if the ACL admits them (runs in a thread:
        looking an account up may ask a domain controller)."""
        who = pipe_client_caller(handle)
        if acl_admits(self._acl, who, self._owner_sid, resolved=self._admitted):
            return who
        log.warning("refused %s on pipe %s: not allowed by its ACL", who, self.address)
        return None

    async def _serve(self, pipe: PipeHandle) -> None:
        try:
            who = await _in_thread(lambda: self._identify(pipe.handle))
        except Exception:
            log.exception("could not identify a caller on pipe %s", self.address)
            who = None
        if who is None or self._closed:
            pipe.close()
            return
        try:
            reader, writer = await _streams(
                self._loop, pipe, self._limit, {CALLER_KEY: who, "peername": str(who)}
            )
        except Exception:
            pipe.close()
            log.exception("pipe %s: no stream for %s", self.address, who)
            return
        try:
            await self._handler(reader, writer)
        except Exception:
            log.exception("handler failed for %s on pipe %s", who, self.address)
        finally:
            writer.close()


async def start_pipe_server(
    handler: Handler,
    address: PipeAddress,
    *,
    acl: Acl = OWNER_ONLY,
    remote: bool = False,
    max_connections: int,
    limit: int = DEFAULT_LIMIT,
) -> WindowsPipeServer:
    """Serve ``handler(reader, writer)`` on ``\\\\.\\pipe\\NAME``; the Caller is the
    writer's extra info ``npipe_caller``. ``remote=True`` admits SMB clients (those
    the ACL names); otherwise the kernel refuses them. PipeInUse if the name is live."""
    return WindowsPipeServer(
        address, handler, acl=acl, remote=remote, max_connections=max_connections,
        limit=limit,
    )


def caller_of(writer: asyncio.StreamWriter) -> Caller | None:
    who = writer.get_extra_info(CALLER_KEY)
    return who if isinstance(who, Caller) else None


# --- gRPC: grpcio listens on a private AF_UNIX socket; pipes relay to it --------------


def private_directory(prefix: str) -> Path:
    """A fresh directory only this user (and SYSTEM, Administrators) may enter."""
    path = Path(tempfile.gettempdir()) / f"{prefix}{uuid.uuid4().hex[:12]}"
    win32.create_private_directory(os.fspath(path), win32.current_user_sid())
    return path


def unix_target(path: Path) -> str:
    """grpcio's target for an AF_UNIX path on Windows (``unix:C:/...``)."""
    return "unix:" + urllib.parse.quote(path.as_posix(), safe="/:")


async def _relay(
    loop: asyncio.AbstractEventLoop, reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter, sock: socket.socket,
) -> None:
    """Bytes both ways between pipe streams and a socket until either side ends."""
    sock.setblocking(False)

    async def pipe_to_socket() -> None:
        while data := await reader.read(RELAY_CHUNK):
            await loop.sock_sendall(sock, data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    async def socket_to_pipe() -> None:
        while data := await loop.sock_recv(sock, RELAY_CHUNK):
            writer.write(data)
            await writer.drain()

    tasks = [asyncio.ensure_future(pipe_to_socket()), asyncio.ensure_future(socket_to_pipe())]
    try:
        # A pipe cannot half-close: once grpcio's side ends, so does the pipe.
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        if tasks[1] not in done:
            await tasks[1]
    except (OSError, ConnectionError):
        pass
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sock.close()
        writer.close()


_relay_ids = itertools.count(1)


class GrpcPipePort:
    """A pipe in front of a grpcio server listening on a private AF_UNIX socket.

    Each admitted caller's relay connects from a socket bound to a name of its own in
    the private directory, so grpcio's ``context.peer()`` (``unix:<that name>``) finds
    the caller in ``callers``.
    """

    BACKEND = "grpc.sock"

    def __init__(self, workdir: Path, callers: dict[str, Caller]) -> None:
        self.workdir = workdir
        self.backend = workdir / self.BACKEND
        self._callers = callers
        self.server: WindowsPipeServer | None = None

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        who = caller_of(writer)
        loop = asyncio.get_running_loop()
        bound = self.workdir / f"c{next(_relay_ids)}"
        sock = await _in_thread(
            lambda: win32.unix_connect(os.fspath(self.backend), bind=os.fspath(bound)),
            lambda s: s.close(),
        )
        with contextlib.suppress(OSError):
            os.unlink(bound)  # the socket keeps its name; the file is not needed
        peers = {f"unix:{os.fspath(bound)}", f"unix:{bound.as_posix()}"}
        if who is not None:
            for p in peers:
                self._callers[p] = who
        try:
            await _relay(loop, reader, writer, sock)
        finally:
            for p in peers:
                self._callers.pop(p, None)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        import shutil

        shutil.rmtree(self.workdir, ignore_errors=True)


class PipeDialer:
    """A private AF_UNIX listener in front of a pipe, for grpcio's channels: each
    connection opens the pipe (through ``opener``, which checks who serves it) and
    relays to it. Only this user can reach the listener (its directory's DACL)."""

    def __init__(
        self, opener: Callable[[], Awaitable[Streams]], loop: asyncio.AbstractEventLoop,
        description: str,
    ) -> None:
        self._opener = opener
        self._loop = loop
        self._description = description
        self.workdir = private_directory("npipe-dial-")
        self.path = self.workdir / "b"
        self.target = unix_target(self.path)
        self._listener = win32.unix_listen(os.fspath(self.path))
        self.closed = False
        threading.Thread(target=self._accept_loop, name="npipe-dial", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                conn = win32.unix_accept(self._listener)
            except OSError:
                if self.closed:
                    return
                continue
            try:
                asyncio.run_coroutine_threadsafe(self._serve(conn), self._loop)
            except RuntimeError:  # the I/O loop is gone
                conn.close()
                return

    async def _serve(self, conn: socket.socket) -> None:
        try:
            reader, writer = await self._opener()
        except Exception as e:
            log.warning("could not open %s for a grpcio connection: %s", self._description, e)
            conn.close()
            return
        await _relay(asyncio.get_running_loop(), reader, writer, conn)

    def close(self) -> None:
        self.closed = True
        self._listener.close()
        import shutil

        shutil.rmtree(self.workdir, ignore_errors=True)


__all__ = [
    "CALLER_KEY",
    "GrpcPipePort",
    "PipeDialer",
    "WindowsPipeServer",
    "caller_of",
    "open_pipe_client",
    "start_pipe_server",
]
