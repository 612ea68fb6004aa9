"""A private Unix socket in front of a remote pipe, for clients that dial only ``unix:``.

grpcio cannot speak SMB, but it can dial a Unix socket. A :class:`PipeBridge` listens
on ``<pipe dir>/.np-XXXX/b`` (a fresh 0700 directory that records its maker, so that
whatever a killed process leaves is reclaimed: npipe.local.reclaim) and, for every
connection from
this user (checked with SO_PEERCRED), opens the remote pipe and relays bytes both
ways. Each connection gets its own pipe instance, as each CreateFile does on Windows.

All bridges run on the process-wide I/O loop (:mod:`npipe.ioloop`: one thread
however many bridges), so they work under sync grpcio and under any other event loop
alike, and the native backend's connections are shared between them. The remote open
is done by an ``attach`` coroutine function that takes the accepted socket and relays
it to the pipe itself (see :meth:`NativeClient.attach`).

A bridge is *pinned* (open until closed, or until exit) unless made with
``pinned=False``: then it stays open while an object given to :meth:`PipeBridge.hold`
lives (a grpcio channel) or a connection is relayed, and closes itself once it has been
unused for the idle timeout (:func:`npipe.ioloop.idle_timeout`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import shutil
import socket
import threading
import time
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from npipe import grpc_refusal, ioloop
from npipe.address import PipeAddress
from npipe.errors import (
    AccessDenied,
    AuthenticationError,
    NpipeError,
    PipeNotFound,
    says_exiting,
)
from npipe.local.listener import private_dir
from npipe.local.paths import ensure_pipe_dir, pipe_dir
from npipe.local.peercred import peer_credentials
from npipe.local.sockets import close_gently

if TYPE_CHECKING:
    from npipe.smb.credentials import Credentials

log = logging.getLogger("npipe.unix_bridge")

# attach(sock, initial): open the pipe and relay ``sock`` to it, sending it ``initial``
# first; PipeNotFound at once (not after waiting) if it is missing, ``sock`` left open.
# It may return the socket that stands for the relay from then on (the tie to a
# redirector that relays it: see npipe.redirector), which the bridge then tracks.
Attach = Callable[[socket.socket, bytes], Awaitable["socket.socket | None"]]

# How long a connection whose pipe is missing is held before its calls are answered
# UNAVAILABLE (unless made with wait_for_ready), and how often the pipe is looked for.
MISSING_GRACE = 1.0
FIRST_LOOK_AGAIN, MOST_LOOK_AGAIN = 0.05, 1.0

SOCKET_NAME = "b"
BACKLOG = 128


class PipeBridge:
    """Listens on a private Unix socket; each connection is relayed to the remote pipe.

    ``attach(sock)`` opens the remote pipe for one accepted connection and relays it,
    taking ownership of ``sock``. If the open fails (an :class:`NpipeError`) and
    ``sock`` is still open, the bridge speaks for the pipe: it answers each gRPC call
    on the connection with the status npipe knows (UNAUTHENTICATED, PERMISSION_DENIED,
    else UNAVAILABLE; see :func:`grpc_status`) and npipe's message, then closes it.
    A failure is logged once, not again while it repeats. ``description`` names
    the pipe in logs. Close the bridge to stop listening, end the relayed connections
    and remove the directory. ``pinned=False``: see the module's docstring.
    """

    def __init__(
        self, attach: Attach, *, description: str = "remote pipe", pinned: bool = True
    ) -> None:
        self._attach = attach
        self.description = description
        self._closed = False
        self._lock = threading.Lock()
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pinned = pinned
        self._holders = 0
        self._last_used = time.monotonic()
        self._last_failure: tuple[str, float] | None = None  # what was logged, when
        self._on_close: list[Callable[[PipeBridge], None]] = []
        self._pid = os.getpid()
        self.directory = os.fspath(private_dir(ensure_pipe_dir(pipe_dir())))  # mode 0700
        self.path = os.path.join(self.directory, SOCKET_NAME)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self.path)
            os.chmod(self.path, 0o600)
            self._listener.listen(BACKLOG)
            self._listener.setblocking(False)
            self._loop = ioloop.get_loop()
            self._serving: asyncio.Task[None] | None = None
            self._idle_check: asyncio.TimerHandle | None = None
            ioloop.call(self._start, timeout=10)
        except BaseException:
            self._listener.close()
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    @property
    def target(self) -> str:
        """The grpcio target: ``unix:<pipe dir>/.np-XXXX/b``."""
        return "unix:" + urllib.parse.quote(self.path, safe="/")

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pinned(self) -> bool:
        return self._pinned

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.target
        return f"<PipeBridge {self.description} at {state}>"

    # --- who uses it ----------------------------------------------------------------

    def pin(self) -> None:
        """Keep the bridge open until it is closed (or the process exits)."""
        self._pinned = True

    def touch(self) -> None:
        """Count the bridge as used now (its idle time starts again)."""
        self._last_used = time.monotonic()

    def hold(self, owner: object) -> None:
        """Keep the bridge open while ``owner`` (say, a grpcio channel) lives."""
        with self._lock:
            self._holders += 1
        weakref.finalize(owner, self._unhold)

    def _unhold(self) -> None:
        with self._lock:
            self._holders -= 1
        self.touch()

    @property
    def connections(self) -> int:
        """Connections being opened or relayed now."""
        with self._lock:
            relayed = sum(1 for sock in list(self._sockets) if sock.fileno() >= 0)
            return max(relayed, len(self._tasks))

    @property
    def in_use(self) -> bool:
        return self._pinned or self._holders > 0 or self.connections > 0

    def on_close(self, callback: Callable[[PipeBridge], None]) -> None:
        """Call ``callback(bridge)`` once the bridge is closed (by anyone)."""
        self._on_close.append(callback)

    # --- in the I/O thread ----------------------------------------------------------

    def _start(self) -> None:
        self._serving = self._loop.create_task(self._serve())
        self._schedule_idle_check()

    def _schedule_idle_check(self) -> None:
        if not self._closed and not self._pinned:
            self._idle_check = self._loop.call_later(ioloop.sweep_interval(), self._check_idle)

    def _check_idle(self) -> None:
        self._idle_check = None
        if self._closed or self._pinned:
            return
        if self.in_use:
            self.touch()
        elif time.monotonic() - self._last_used >= ioloop.idle_timeout():
            log.debug("bridge %s: unused for %g s, closed", self.description,
                      ioloop.idle_timeout())
            self.close()
            return
        self._schedule_idle_check()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as exc:
                if self._closed:
                    return
                log.warning("bridge %s: accept failed: %s", self.description, exc)
                await asyncio.sleep(0.1)
                continue
            self.touch()
            task = loop.create_task(self._handle(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, conn: socket.socket) -> None:
        try:
            pid, uid, _gid = peer_credentials(conn)
        except OSError as exc:
            log.warning("bridge %s: no peer credentials, closed: %s", self.description, exc)
            close_gently(conn)
            return
        if uid != os.getuid():
            log.warning(
                "bridge %s: refused a connection from uid %d (pid %d): only uid %d may use it",
                self.description,
                uid,
                pid,
                os.getuid(),
            )
            close_gently(conn)
            return
        with self._lock:
            if self._closed:
                close_gently(conn)
                return
            self._sockets.add(conn)
        conn.setblocking(True)
        try:
            self._track(conn, await self._attach(conn, b""))
        except PipeNotFound as exc:
            await self._wait_for_the_pipe(conn, exc)
        except NpipeError as exc:
            self._failed(exc)
            await self._speak_for_the_pipe(conn, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if says_exiting(exc):  # grpcio re-dialled while the interpreter shuts down
                log.debug("bridge %s: not opening the pipe while exiting", self.description)
                close_gently(conn)
                return
            log.exception("bridge %s: opening the remote pipe failed", self.description)
            await self._speak_for_the_pipe(conn, exc)
        else:
            self._last_failure = None  # the next failure is news again
        finally:
            if conn.fileno() >= 0 and self._closed:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def _track(self, conn: socket.socket, tie: socket.socket | None) -> None:
        """Count ``tie`` as the relayed connection instead of ``conn``."""
        if tie is None:
            return
        with self._lock:
            self._sockets.discard(conn)
            self._sockets.add(tie)
        if self._closed:
            with contextlib.suppress(OSError):
                tie.shutdown(socket.SHUT_RDWR)

    async def _wait_for_the_pipe(self, conn: socket.socket, missing: PipeNotFound) -> None:
        """The pipe is not there: hold grpcio's connection (a :class:`CallGate`) and
        look for the pipe again while its calls may wait.

        A call made with wait_for_ready=True (marked by npipe's channels: see
        grpc_refusal.WAIT_FOR_READY_KEY) waits for the pipe until its own deadline
        (``grpc-timeout``), without one until grpcio gives it up; other calls, or
        none, are answered UNAVAILABLE with the reason once MISSING_GRACE has passed.
        The pipe found, it gets what grpcio sent meanwhile, then the live connection.
        A failure other than a missing pipe is answered at once. grpcio multiplexes
        its calls on one connection: they all wait (as long as a marked one lives),
        or none does (CallGate.hold_until).
        """
        loop = asyncio.get_running_loop()
        gate = grpc_refusal.CallGate()
        conn.setblocking(False)
        exc: Exception = missing
        grace_until = loop.time() + MISSING_GRACE
        pause = FIRST_LOOK_AGAIN
        next_look = loop.time() + pause
        try:
            await loop.sock_sendall(conn, gate.data_to_send())
            while not self._closed:
                now = loop.time()
                deadline = gate.hold_until(grace_until)
                if deadline is not None and now >= deadline:
                    break
                until = next_look if deadline is None else min(next_look, deadline)
                if await _readable(loop, conn, max(0.0, until - now)):
                    try:
                        data = conn.recv(65536)
                    except BlockingIOError:
                        continue
                    if not data:  # grpcio gave up the connection
                        if isinstance(exc, NpipeError):
                            self._failed(exc)
                        conn.close()
                        return
                    if out := gate.receive_data(data, loop.time()):
                        await loop.sock_sendall(conn, out)
                    if gate.overflow:
                        exc = BufferFull(f"{exc} (and the calls waiting for it sent more "
                                         f"than {grpc_refusal.MAX_BUFFER} bytes)")
                        break
                    if gate.malformed:
                        break
                    continue
                if loop.time() < next_look or not gate.at_boundary:
                    continue
                try:
                    self._track(conn, await self._attach(conn, gate.held()))
                except PipeNotFound as again:
                    exc = again
                except NpipeError as failed:
                    exc = failed
                    break  # refused, unreachable...: never waited out
                else:
                    self._last_failure = None
                    return
                pause = min(pause * 2, MOST_LOOK_AGAIN)
                next_look = loop.time() + pause
        except OSError:  # grpcio's end went away
            conn.close()
            return
        if isinstance(exc, NpipeError):
            self._failed(exc)
        await self._speak_for_the_pipe(conn, exc, gate.held())

    # A failure that repeats (every re-dial of grpcio's) is logged again only after this.
    REPEAT_LOG_AFTER = 60.0

    def _failed(self, exc: NpipeError) -> None:
        said = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        last = self._last_failure
        if last is not None and last[0] == said and now - last[1] < self.REPEAT_LOG_AFTER:
            log.debug("bridge %s: could not open the pipe (again): %s", self.description, exc)
            return
        self._last_failure = (said, now)
        log.warning("bridge %s: could not open the pipe: %s", self.description, exc)

    async def _speak_for_the_pipe(
        self, conn: socket.socket, exc: Exception, received: bytes = b""
    ) -> None:
        """Answer grpcio on ``conn`` (if the attach left it open) with the status for
        ``exc``, within the responder's bounds (``received``: what grpcio sent before,
        which it answers first); then close it."""
        if conn.fileno() < 0:
            return
        try:
            if not self._closed:
                message = str(exc) if isinstance(exc, NpipeError) else (
                    f"could not open {self.description}: {type(exc).__name__}: {exc}")
                await answer_async(conn, grpc_status(exc), message, received=received)
        finally:
            conn.close()

    def _stop_serving(self, done: threading.Event | None) -> None:
        """Stop accepting; close the listener once the accept is no longer pending."""
        if self._idle_check is not None:
            self._idle_check.cancel()
            self._idle_check = None
        for task in list(self._tasks):
            task.cancel()
        serving = self._serving
        if serving is None or serving.done():
            self._finish(done)
        else:
            serving.cancel()
            serving.add_done_callback(lambda _task: self._finish(done))

    # --- closing --------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening, end every relayed connection and remove the directory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if os.getpid() != self._pid:
            self._listener.close()  # a forked child's copy: the directory is the parent's
            return
        loop = self._loop
        if ioloop.in_io_thread():
            self._stop_serving(None)
            return
        done = threading.Event()
        try:
            loop.call_soon_threadsafe(self._stop_serving, done)
        except RuntimeError:  # the I/O loop is gone (at exit): nothing is pending on it
            self._finish(None)
            return
        if not done.wait(5):
            log.warning("bridge %s: the I/O thread did not stop it in time", self.description)
            self._finish(None)

    def _finish(self, done: threading.Event | None) -> None:
        with self._lock:
            if self._listener.fileno() < 0:
                if done is not None:
                    done.set()
                return
            self._listener.close()
            sockets = list(self._sockets)
        for sock in sockets:
            # Their relays own these; shutting them down makes the relays close their
            # pipes and the sockets.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        shutil.rmtree(self.directory, ignore_errors=True)
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("bridge %s: a close callback failed", self.description)
        if done is not None:
            done.set()

    def __enter__(self) -> PipeBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()




# --- speaking for a pipe that cannot be opened -----------------------------------------

# How long, and how many bytes, a bridge gives grpcio's connection to send its calls.
ANSWER_TIMEOUT = 5.0


class BufferFull(NpipeError):
    """Calls waiting for a pipe sent more than a bridge holds for them."""


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float) -> bool:
    """Whether ``sock`` has something to read (or its end) within ``timeout``; nothing
    is read (a pending read cancelled could lose its bytes: this one has none)."""
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        done, _ = await asyncio.wait({ready}, timeout=timeout)
        return bool(done)
    finally:
        loop.remove_reader(sock.fileno())


def grpc_status(exc: BaseException) -> int:
    """The gRPC status a bridge answers with when ``exc`` kept it from opening the pipe."""
    if isinstance(exc, BufferFull):
        return grpc_refusal.RESOURCE_EXHAUSTED
    if isinstance(exc, AuthenticationError):
        return grpc_refusal.UNAUTHENTICATED
    if isinstance(exc, AccessDenied):
        return grpc_refusal.PERMISSION_DENIED
    return grpc_refusal.UNAVAILABLE  # missing, busy, unreachable, lost, anything else


async def answer_async(
    sock: socket.socket, code: int, message: str, *, timeout: float = ANSWER_TIMEOUT,
    limit: int = grpc_refusal.MAX_READ, received: bytes = b"",
) -> None:
    """Answer every gRPC call on ``sock`` with ``code`` and ``message`` (a trailers-only
    response each, then GOAWAY), within ``timeout`` seconds and ``limit`` bytes read;
    ``received``: what the client sent already (from its preface on: a gate's
    :meth:`~npipe.grpc_refusal.CallGate.held`). The caller closes ``sock``."""
    loop = asyncio.get_running_loop()
    responder = grpc_refusal.StatusResponder(code, message)
    sock.setblocking(False)

    async def converse() -> None:
        # (after a GOAWAY: read on until grpcio closes, lest it miss the answer)
        await loop.sock_sendall(sock, responder.data_to_send() + responder.receive_data(received))
        read = 0
        while read < limit:
            data = await loop.sock_recv(sock, min(65536, limit - read))
            if not data:
                return
            read += len(data)
            # (after the GOAWAY the responder returns nothing: read on until grpcio closes)
            if out := responder.receive_data(data):
                await loop.sock_sendall(sock, out)

    with contextlib.suppress(OSError, asyncio.TimeoutError):
        await asyncio.wait_for(converse(), timeout)


# --- bridges to remote pipes, one per address, identity and options -------------------

BridgeKey = tuple[
    str, PipeAddress, tuple[str | None, str | None, str, str | None], float, object, bool
]

_bridges: dict[BridgeKey, PipeBridge] = {}
_bridges_lock = threading.Lock()


def bridge_for(
    address: str | PipeAddress,
    *,
    credentials: Credentials | None = None,
    timeout: float = 10.0,
    encrypt: bool | None = None,
    backend: str | None = None,
    allow_smb2: bool = False,
    pin: bool = True,
) -> PipeBridge:
    """A running :class:`PipeBridge` to the remote pipe (``.target`` for grpcio).

    Repeated calls with the same address, credentials and options return the same
    bridge while it is open. Each connection to the bridge opens its own pipe
    instance; a failed open is logged and answered with its gRPC status and reason
    (see :class:`PipeBridge`).
    Every bridge runs on the one I/O thread (:mod:`npipe.ioloop`), and the pipes of
    all bridges to a host share one SMB connection per identity and options.

    ``pin=True`` keeps the bridge until :func:`close_bridges` (or exit); with
    ``pin=False`` it stays open while an object passed to ``bridge.hold()`` lives or a
    connection is relayed, and is closed once unused for the idle timeout
    (``npipe.ioloop.idle_timeout()``: 60 s, $NPIPE_SMB_IDLE_TIMEOUT).
    :func:`npipe.grpc.channel` holds an unpinned bridge for the channel's lifetime.
    """
    from npipe import redirector, smb
    from npipe.smb.credentials import Credentials

    name = smb.backend_name(backend)
    smb.get_client(name)  # (an unknown backend or a missing package fails here)
    addr = smb._remote(address)
    creds = credentials if credentials is not None else Credentials.resolve()
    key: BridgeKey = (name, addr, creds.identity(), timeout, encrypt,
                      allow_smb2)
    with _bridges_lock:
        bridge = _bridges.get(key)
        if bridge is not None and not bridge.closed:
            bridge.touch()
            if pin:
                bridge.pin()
            return bridge

        async def attach(sock: socket.socket, initial: bytes) -> socket.socket | None:
            # (a failed open leaves sock open: the bridge answers grpcio's calls on it,
            # or waits for a missing pipe: missing_grace=0, it looks once)
            return await redirector.attach(
                name, addr, sock, credentials=creds, timeout=timeout, encrypt=encrypt,
                allow_smb2=allow_smb2, close_on_failure=False, initial=initial,
                missing_grace=0, tied=True)

        bridge = PipeBridge(attach, description=addr.posix(), pinned=pin)
        _bridges[key] = bridge

    def forget(closed: PipeBridge) -> None:
        with _bridges_lock:
            if _bridges.get(key) is closed:
                del _bridges[key]

    bridge.on_close(forget)
    return bridge


def bridges() -> list[PipeBridge]:
    """The open bridges made by :func:`bridge_for`."""
    with _bridges_lock:
        return [bridge for bridge in _bridges.values() if not bridge.closed]


def close_bridges() -> None:
    """Close every bridge made by :func:`bridge_for` (also done at exit)."""
    with _bridges_lock:
        bridges = list(_bridges.values())
        _bridges.clear()
    for bridge in bridges:
        bridge.close()


atexit.register(close_bridges)


__all__ = ["Attach", "PipeBridge", "answer_async", "bridge_for", "bridges", "close_bridges",
           "grpc_status"]
