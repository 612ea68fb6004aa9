"""The front door: a pipe's public socket in front of a grpcio server.

grpcio listens only on sockets it binds itself and tells a handler nothing about
the peer but the peer's socket address. So grpcio listens on a private socket,
and the front door accepts on the pipe's public one, asks the kernel who
connected (SO_PEERCRED), applies the ACL, and relays the bytes to grpcio over a
connection bound to a unique path. grpcio's ``context.peer()`` then reads
``unix:<that path>``, which :func:`lookup` maps back to the caller.

The relay uses two blocking threads per connection, which release the GIL in
recv/send. Its cost is the extra hop itself (two thread wake-ups and four system
calls per small call, ~75 us of CPU, mostly in the kernel): ~10% of a small unary
call on a busy 2-core machine, measured in docs/benchmarks.md, where os.splice,
other chunk sizes and even a relay written in C did no better. Services that can do
without per-call identity skip the relay (``add_pipe_port(caller_identity=False)``).

Both front doors (this one and :class:`StreamDoor`, npipe.start_server's) hold to
the same limits: a pipe serves at most ``max_connections`` callers at once (see
:class:`ConnectionSlots`), and an accept that fails for want of descriptors or memory
is retried after a growing pause instead of at once (see :class:`AcceptBackoff`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import select
import shutil
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import SupportsIndex

from npipe import grpc_refusal
from npipe.acl import OWNER_ONLY, Acl
from npipe.errors import ConfigError
from npipe.identity import Caller
from npipe.local.listener import ClaimedSocket
from npipe.local.peercred import peer_caller, peer_credentials

log = logging.getLogger("npipe.frontdoor")

# One recv per wake-up; 256 KiB keeps large gRPC messages to a few system calls.
RELAY_CHUNK = 256 * 1024

_callers: dict[str, Caller] = {}  # grpc peer string -> caller, live connections only
_counter = itertools.count(1)


def lookup(peer: str) -> Caller | None:
    """The caller behind a grpcio peer string such as ``unix:/.../c17``."""
    return _callers.get(peer)


# The most max_connections a pipe gets by default (see default_max_connections).
MAX_DEFAULT_CONNECTIONS = 1024
MIN_DEFAULT_CONNECTIONS = 16


def default_max_connections() -> int:
    """The default cap on one pipe's concurrent connections: a quarter of RLIMIT_NOFILE,
    between 16 and 1024 (256 under the usual soft limit of 1024).

    A caller the gRPC front door relays holds three descriptors in this process (its
    own socket, the relay's socket to grpcio and grpcio's end of that); a stream server
    holds one. A quarter of the limit leaves room for everything else the process opens,
    other pipes included, so that a flood of callers meets the cap (and waits) before it
    meets EMFILE. 1024 bounds the relay to about 2048 threads; local gRPC clients share
    one connection per channel, so that is far more than a pipe normally needs.
    """
    try:
        import resource  # POSIX only

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return MAX_DEFAULT_CONNECTIONS
    if soft == resource.RLIM_INFINITY or soft < 0:
        return MAX_DEFAULT_CONNECTIONS
    return max(MIN_DEFAULT_CONNECTIONS, min(MAX_DEFAULT_CONNECTIONS, soft // 4))


def check_max_connections(value: int | None) -> int:
    """``max_connections`` as given to add_pipe_port / start_server, or the default."""
    if value is None:
        return default_max_connections()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"max_connections must be a whole number from 1, not {value!r}")
    return value


class ConnectionSlots:
    """One pipe's budget of concurrent connections, shared by all its front doors.

    A door takes a slot when a caller waits at its socket, *before* accepting it, and
    gives it back only when that connection is gone (refused, failed, or relayed to its
    end), so a caller still in a handshake (Samba's may take up to 10 s) holds one too;
    an idle door holds none. With no slot free nobody accepts:
    callers wait in the kernel's listen backlog, and connect() itself waits (or fails
    with EAGAIN, for a non-blocking caller) once that is full too. They are let in as
    slots free up, in the order they came. This wait is what a named pipe's client
    expects of a busy pipe (WaitNamedPipe), and every gRPC or stream client already
    bounds its connect with a deadline; refusing instead would cost an accept() and a
    descriptor per refusal, exactly when descriptors run short.

    Reaching the cap logs one warning per episode: a pipe that is full again within
    EPISODE_GAP seconds of last being full (callers coming and going at the cap) is
    still in the same one.
    """

    EPISODE_GAP = 60.0

    def __init__(self, limit: int, pipe: object, logger: logging.Logger | None = None) -> None:
        self.limit = limit
        self._pipe = pipe
        self._log = logger or log
        self._used = 0
        self._full_at: float | None = None  # when the pipe was last seen full
        self._cond = threading.Condition(threading.Lock())
        self._waiters: list[asyncio.Future[None]] = []

    def _take(self) -> bool:  # with self._cond held
        if self._used < self.limit:
            self._used += 1
            return True
        now = time.monotonic()
        if self._full_at is None or now - self._full_at > self.EPISODE_GAP:
            self._log.warning(
                "pipe %s has %d connections, its max_connections: further callers wait "
                "in the listen backlog until one closes", self._pipe, self._used,
            )
        self._full_at = now
        return False

    def take(self, stop: threading.Event) -> bool:
        """Take a slot, waiting for one; False (without one) once ``stop`` is set."""
        with self._cond:
            while not stop.is_set():
                if self._take():
                    return True
                self._cond.wait()
            return False

    async def take_async(self) -> None:
        """Take a slot, waiting for one (cancel to give up)."""
        loop = asyncio.get_running_loop()
        while True:
            freed: asyncio.Future[None] = loop.create_future()
            with self._cond:
                if self._take():
                    return
                self._waiters.append(freed)
            try:
                await freed
            finally:
                with self._cond, contextlib.suppress(ValueError):
                    self._waiters.remove(freed)

    def give_back(self) -> None:
        with self._cond:
            if self._used == self.limit and self._full_at is not None:
                self._full_at = time.monotonic()  # it was full until now
            self._used -= 1
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for freed in waiters:
            _wake(freed)

    def wake(self) -> None:
        """Wake threads waiting in :meth:`take` (to see their ``stop``)."""
        with self._cond:
            self._cond.notify_all()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _wake(fut: asyncio.Future[None]) -> None:
    loop = fut.get_loop()
    try:
        here = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    if here is loop:
        _resolve(fut)
    else:
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
            loop.call_soon_threadsafe(_resolve, fut)


# accept() failing for want of resources: retried after a pause, which grows.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept() failing for one caller only (it left before we took it): next, at once.
CALLER_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN})


class AcceptBackoff:
    """How long an accept loop pauses after a failure: 10 ms, doubling up to 1 s.

    Out of descriptors (EMFILE/ENFILE) or memory, accept() fails at once for as long
    as it lasts while the listening socket stays readable: retrying at once would spin
    a core and flood the log. One line is logged per episode; the first accept that
    works ends it. (asyncio's own server is no help here: it retries after 1 s but
    logs, and retries, up to its backlog's worth of times on each attempt.)
    """

    FIRST = 0.01
    MOST = 1.0

    def __init__(self, pipe: object, logger: logging.Logger | None = None) -> None:
        self._pipe = pipe
        self._log = logger or log
        self._delay = 0.0
        self._failures = 0

    def failed(self, e: BaseException) -> float:
        """Note a failed accept (or a failure to start serving what it returned);
        returns how long to wait before the next accept."""
        if isinstance(e, OSError) and e.errno in CALLER_ERRNOS:
            return 0.0
        self._delay = min(self._delay * 2, self.MOST) if self._delay else self.FIRST
        self._failures += 1
        if self._failures == 1:
            if isinstance(e, RuntimeError) or (
                isinstance(e, OSError) and e.errno in RESOURCE_ERRNOS
            ):
                self._log.warning(
                    "pipe %s cannot take callers (%s: out of file descriptors, threads or "
                    "memory); retrying every %g s at most until it can", self._pipe, e,
                    self.MOST,
                )
            else:
                self._log.error(
                    "accept failed on pipe %s; retrying every %g s at most until it works",
                    self._pipe, self.MOST, exc_info=e,
                )
        return self._delay

    def succeeded(self) -> None:
        if self._failures:
            self._log.debug(
                "pipe %s takes callers again after %d failures", self._pipe, self._failures
            )
            self._delay = 0.0
            self._failures = 0


@dataclass(frozen=True)
class Refusal:
    """A caller turned away with a gRPC status (``code``: grpc_refusal's numbers) and a
    one-line ``message``, rather than a closed socket: the gRPC front door answers
    each of its calls so (see :mod:`npipe.grpc_refusal`); it never reaches grpcio."""

    caller: Caller | None
    code: int
    message: str


# Who is at the door: a Caller to let in, or None to close (the identifier logs why).
Identify = Callable[[socket.socket], "Caller | None"]
# The gRPC front door's: a Refusal too, to answer the caller's calls with (logged too).
DoorIdentify = Callable[[socket.socket], "Caller | Refusal | None"]


def acl_refusal(caller: Caller, name: object) -> Refusal:
    """PERMISSION_DENIED for a caller that pipe ``name``'s ACL does not admit."""
    return Refusal(caller, grpc_refusal.PERMISSION_DENIED,
                   f"the ACL of pipe {name} does not admit {caller}")


def local_identify(acl: Acl = OWNER_ONLY, pipe: object = "") -> Identify:
    """Identify local callers by SO_PEERCRED and admit those the ACL allows."""

    def identify(conn: socket.socket) -> Caller | None:
        caller = peer_caller(conn)
        if acl.allows(caller):
            return caller
        log.warning("refused %s on pipe %s: not allowed by its ACL", caller, pipe)
        return None

    return identify


def local_identify_answering(acl: Acl, pipe: object, name: object) -> DoorIdentify:
    """:func:`local_identify` for the gRPC front door: a refused caller is answered
    with a :class:`Refusal` naming pipe ``name`` rather than closed."""
    identify = local_identify(acl, pipe)

    def identify_or_refuse(conn: socket.socket) -> Caller | Refusal | None:
        caller = identify(conn)
        if caller is not None:
            return caller
        return acl_refusal(peer_caller(conn), name)

    return identify_or_refuse


# A refused gRPC caller is answered (see Refusal) within these bounds, on its relay
# thread but without its connection slot (given back at once: a refused caller must
# not keep an admitted one waiting). The most bytes read from it: grpc_refusal.MAX_READ.
REFUSAL_TIMEOUT = 2.0  # a gRPC client sends its preface and first call at once
REFUSALS_AT_ONCE = 16  # refused callers answered at once per door; more are just closed


def answer_refused(
    conn: socket.socket, refusal: Refusal, *, timeout: float = REFUSAL_TIMEOUT,
    limit: int = grpc_refusal.MAX_READ,
) -> None:
    """Answer every call on a blocking connection with ``refusal``'s status, within
    ``timeout`` seconds in all and ``limit`` bytes read; the caller closes ``conn``."""
    responder = grpc_refusal.StatusResponder(refusal.code, refusal.message)
    deadline = time.monotonic() + timeout
    try:
        conn.settimeout(timeout)
        conn.sendall(responder.data_to_send())
        while not responder.finished and responder.bytes_received < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            conn.settimeout(left)
            data = conn.recv(min(RELAY_CHUNK, limit - responder.bytes_received))
            if not data:
                return
            if out := responder.receive_data(data):
                conn.sendall(out)
        # The GOAWAY is out: grpcio closes the connection once its calls are answered.
        # Wait for that (reading what it still sends, within the same bounds) rather
        # than close first: our end of stream would reach grpcio through Samba and an
        # SMB bridge as a closed pipe, which can cut it off before it reads the answer.
        read = responder.bytes_received
        while read < limit and (left := deadline - time.monotonic()) > 0:
            conn.settimeout(left)
            data = conn.recv(min(RELAY_CHUNK, limit - read))
            if not data:
                return
            read += len(data)
    except OSError:
        return


class FrontDoor:
    """Accepts on a claimed public socket and relays each admitted caller to ``backend``.

    ``identify`` runs on a thread of the connection's own (a handshake may wait on the
    peer), before any byte is relayed; that thread then relays the way in, and one more
    relays the way out. A connection is accepted only with a slot of ``slots`` (the
    pipe's max_connections, shared with its other doors), so the threads number at
    most twice the slots, plus this door's accept loop.
    """

    def __init__(
        self,
        claimed: ClaimedSocket,
        backend: Path,
        workdir: Path,
        identify: DoorIdentify,
        slots: ConnectionSlots | None = None,
    ) -> None:
        self._claimed = claimed
        self._backend = os.fspath(backend)
        self._workdir = workdir
        self._identify = identify
        self._slots = slots or ConnectionSlots(default_max_connections(), claimed.path)
        self._closed = threading.Event()
        self._refusing = threading.BoundedSemaphore(REFUSALS_AT_ONCE)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"npipe-door-{claimed.path.name}", daemon=True
        )

    @property
    def path(self) -> Path:
        return self._claimed.path

    def start(self) -> None:
        self._thread.start()

    def close(self, *, drop_connections: bool = False) -> None:
        """Stop accepting and give up the pipe name; optionally cut live connections."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._slots.wake()  # the accept loop may be waiting for a slot
        with contextlib.suppress(OSError):
            self._claimed.sock.shutdown(socket.SHUT_RDWR)  # wakes poll() on Linux
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)  # before its socket is closed under it
        self._claimed.release()
        if drop_connections:
            with self._lock:
                for s in list(self._conns):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
        shutil.rmtree(self._workdir, ignore_errors=True)

    def _accept_loop(self) -> None:
        sock = self._claimed.sock
        sock.setblocking(False)  # accept() only what poll() saw; a caller may have left
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        backoff = AcceptBackoff(self.path)
        while not self._closed.is_set():
            # A slot is taken only once a caller waits: an idle door holds none.
            # (close() wakes poll by shutting the socket down; 1 s bounds it regardless.)
            if not poller.poll(1000) or not self._slots.take(self._closed):
                continue
            conn = backend = None
            try:
                # The relay's socket first: a caller is accepted only once it can be
                # served, and otherwise waits in the backlog instead of being cut off.
                backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn, _ = sock.accept()
                conn.setblocking(True)
                with self._lock:
                    self._conns.add(conn)
                threading.Thread(
                    target=self._admit, args=(conn, backend), name="npipe-relay-in",
                    daemon=True,
                ).start()
            except (OSError, RuntimeError) as e:  # RuntimeError: can't start new thread
                if backend is not None:
                    backend.close()
                if conn is not None:
                    self._drop(conn)
                else:
                    self._slots.give_back()
                if not self._closed.is_set():
                    self._closed.wait(backoff.failed(e))
                continue
            backoff.succeeded()

    def _drop(self, conn: socket.socket) -> None:
        """Close a connection that was never relayed, and give its slot back."""
        with self._lock:
            self._conns.discard(conn)
        conn.close()
        self._slots.give_back()

    def _admit(self, conn: socket.socket, backend: socket.socket) -> None:
        try:
            caller = self._identify(conn)
        except Exception:
            log.exception("could not identify a caller on %s", self.path)
            caller = None
        if caller is None or isinstance(caller, Refusal):
            backend.close()
            if caller is None:
                self._drop(conn)
            else:
                self._refuse(conn, caller)
            return
        bound = os.fspath(self._workdir / f"c{next(_counter)}")
        try:
            backend.bind(bound)
            backend.connect(self._backend)
            _check_backend_owner(backend, self._backend)
        except OSError as e:
            backend.close()
            self._drop(conn)
            log.warning("server behind %s is not answering (%s); dropped %s", self.path, e, caller)
            return
        finally:
            with contextlib.suppress(OSError):
                os.unlink(bound)  # the kernel keeps the address; the file is not needed
        peer = f"unix:{bound}"
        _callers[peer] = caller
        with self._lock:
            self._conns.add(backend)
        done = _Countdown(2, lambda: self._finish(peer, conn, backend))
        try:
            threading.Thread(
                target=_pump, args=(backend, conn, done), name="npipe-relay-out", daemon=True
            ).start()
        except RuntimeError as e:  # can't start new thread
            log.warning("no thread to relay %s on %s (%s); dropped it", caller, self.path, e)
            self._finish(peer, conn, backend)
            return
        _pump(conn, backend, done)  # this thread relays the way in

    def _refuse(self, conn: socket.socket, refusal: Refusal) -> None:
        """Answer a refused caller's calls with its status, then close it. Its slot is
        given back first; at most REFUSALS_AT_ONCE are answered at once (the others
        are closed), each for REFUSAL_TIMEOUT seconds at most. None of its bytes goes
        anywhere but into the responder."""
        self._slots.give_back()
        try:
            if self._refusing.acquire(blocking=False):
                try:
                    answer_refused(conn, refusal)
                finally:
                    self._refusing.release()
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _finish(self, peer: str, conn: socket.socket, backend: socket.socket) -> None:
        _callers.pop(peer, None)
        with self._lock:
            self._conns.difference_update((conn, backend))
        conn.close()
        backend.close()
        self._slots.give_back()


StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class StreamDoor:
    """npipe.start_server's front door: an asyncio accept loop on a listening socket.

    It stands where ``asyncio.start_unix_server``'s server stood (close, wait_closed,
    serve_forever; the socket and its name stay the caller's to release), because that
    server accepts whenever the socket is readable, a whole backlog at a time, so it
    cannot leave callers waiting while the pipe is full; and out of descriptors it
    logs, and retries, once per backlog entry. Here a caller is accepted only once the
    socket is readable *and* a slot is free, then served as the stream pair
    start_unix_server would have made, in a task of its own that gives the slot back
    once the connection is closed.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_connect: StreamHandler,
        slots: ConnectionSlots,
        *,
        limit: int,
        pipe: object,
        logger: logging.Logger | None = None,
    ) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._on_connect = on_connect
        self._slots = slots
        self._limit = limit
        self._pipe = pipe
        self._log = logger or log
        self._loop = asyncio.get_running_loop()
        self._conns: set[asyncio.Task[None]] = set()
        self._closing = False
        self._serving: asyncio.Future[None] = self._loop.create_future()
        self._accepting = self._loop.create_task(self._accept_loop())

    @property
    def listening_socket(self) -> socket.socket:
        return self._sock

    def is_serving(self) -> bool:
        return not self._closing

    def close(self) -> None:
        """Stop accepting (connections already in go on until they end)."""
        if self._closing:
            return
        self._closing = True
        # Stop watching the socket before it is closed, as asyncio.Server.close() does
        # (its fd number may be reused at once).
        self._loop.remove_reader(self._fd)
        self._accepting.cancel()
        if not self._serving.done():
            self._serving.cancel()

    async def wait_closed(self) -> None:
        """Wait for close(), then for every connection to end (as asyncio.Server does
        since Python 3.12)."""
        await asyncio.wait([self._accepting])
        while self._conns:
            await asyncio.wait(set(self._conns))

    async def serve_forever(self) -> None:
        """Wait until closed (CancelledError, as asyncio.Server's); cancelling it closes."""
        try:
            await self._serving
        finally:
            self.close()

    async def _accept_loop(self) -> None:
        backoff = AcceptBackoff(self._pipe, self._log)
        while True:
            await self._readable()  # a slot is taken only once a caller waits
            await self._slots.take_async()
            try:
                conn, _ = self._sock.accept()
                conn.setblocking(False)
            except Exception as e:
                self._slots.give_back()
                if self._closing:
                    return
                if delay := backoff.failed(e):
                    await asyncio.sleep(delay)
                continue
            backoff.succeeded()
            task = self._loop.create_task(self._serve(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _readable(self) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_reader(self._fd, _resolve, ready)
        try:
            await ready
        finally:
            if not self._closing:  # close() removed it (the fd may be another's by now)
                self._loop.remove_reader(self._fd)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            try:
                reader = CallerReader(limit=self._limit)
                protocol = asyncio.StreamReaderProtocol(reader)
                transport, _ = await self._loop.connect_accepted_socket(lambda: protocol, conn)
            except BaseException:
                conn.close()
                raise
            writer = asyncio.StreamWriter(transport, protocol, reader, self._loop)
            try:
                await self._on_connect(reader, writer)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()  # its descriptor is closed: the slot is free
        except Exception:
            self._log.exception("a connection on pipe %s failed", self._pipe)
        finally:
            self._slots.give_back()


class CallerReader(asyncio.StreamReader):
    """A caller's stream, which knows whether the caller ever sent a byte: one that left
    before it did (a liveness probe, npipe.local.listener.is_live: a connect and a
    close) is no handler's failure, whatever the handler was writing then."""

    sent_anything = False

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        if data:
            self.sent_anything = True
        super().feed_data(data)


def left_silently(reader: asyncio.StreamReader, exc: BaseException) -> bool:
    """Whether ``exc``, raised by a handler, only says that its caller hung up without
    ever sending anything (see :class:`CallerReader`)."""
    return (isinstance(exc, (BrokenPipeError, ConnectionResetError))
            and isinstance(reader, CallerReader) and not reader.sent_anything)


def _check_backend_owner(backend: socket.socket, path: str) -> None:
    """The caller's bytes go only to a server of this process's own user: whatever sits
    at the backend's path must have been bound by us (SO_PEERCRED of the listener)."""
    uid = peer_credentials(backend)[1]
    if uid != os.geteuid():
        raise PermissionError(f"the backend socket {path} is served by uid {uid}, not by us")


class _Countdown:
    def __init__(self, n: int, then: Callable[[], None]) -> None:
        self._n, self._then, self._lock = n, then, threading.Lock()

    def tick(self) -> None:
        with self._lock:
            self._n -= 1
            last = self._n == 0
        if last:
            self._then()


def _copy(src: socket.socket, dst: socket.socket) -> None:
    """Copy src to dst until EOF; blocking send is the backpressure."""
    buf = bytearray(RELAY_CHUNK)
    view = memoryview(buf)
    while n := src.recv_into(buf):
        dst.sendall(view[:n])


def _pump(src: socket.socket, dst: socket.socket, done: _Countdown) -> None:
    """Relay one direction (with :func:`_copy`), then pass the half-close on."""
    try:
        _copy(src, dst)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
    except OSError:
        # One side broke: break the other so that its reader sees the end too.
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
    finally:
        done.tick()
