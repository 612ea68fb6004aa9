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
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from npipe.acl import OWNER_ONLY, Acl
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


# Who is at the door: a Caller to let in, or None to close (the identifier logs why).
Identify = Callable[[socket.socket], "Caller | None"]


def local_identify(acl: Acl = OWNER_ONLY, pipe: object = "") -> Identify:
    """Identify local callers by SO_PEERCRED and admit those the ACL allows."""

    def identify(conn: socket.socket) -> Caller | None:
        caller = peer_caller(conn)
        if acl.allows(caller):
            return caller
        log.warning("refused %s on pipe %s: not allowed by its ACL", caller, pipe)
        return None

    return identify


class FrontDoor:
    """Accepts on a claimed public socket and relays each admitted caller to ``backend``.

    ``identify`` runs on a thread of the connection's own (a handshake may wait on the
    peer), before any byte is relayed.
    """

    def __init__(
        self, claimed: ClaimedSocket, backend: Path, workdir: Path, identify: Identify
    ) -> None:
        self._claimed = claimed
        self._backend = os.fspath(backend)
        self._workdir = workdir
        self._identify = identify
        self._closed = threading.Event()
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
        with contextlib.suppress(OSError):
            self._claimed.sock.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        self._claimed.release()
        if drop_connections:
            with self._lock:
                for s in list(self._conns):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        shutil.rmtree(self._workdir, ignore_errors=True)

    def _accept_loop(self) -> None:
        sock = self._claimed.sock
        while not self._closed.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                log.exception("accept failed on %s", self.path)
                continue
            threading.Thread(
                target=self._admit, args=(conn,), name="npipe-relay-in", daemon=True
            ).start()

    def _admit(self, conn: socket.socket) -> None:
        try:
            caller = self._identify(conn)
        except Exception:
            log.exception("could not identify a caller on %s", self.path)
            caller = None
        if caller is None:
            conn.close()
            return
        backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = os.fspath(self._workdir / f"c{next(_counter)}")
        try:
            backend.bind(bound)
            backend.connect(self._backend)
            _check_backend_owner(backend, self._backend)
        except OSError as e:
            backend.close()
            conn.close()
            log.warning("server behind %s is not answering (%s); dropped %s", self.path, e, caller)
            return
        finally:
            with contextlib.suppress(OSError):
                os.unlink(bound)  # the kernel keeps the address; the file is not needed
        peer = f"unix:{bound}"
        _callers[peer] = caller
        with self._lock:
            self._conns.update((conn, backend))
        done = _Countdown(2, lambda: self._finish(peer, conn, backend))
        threading.Thread(
            target=_pump, args=(backend, conn, done), name="npipe-relay-out", daemon=True
        ).start()
        _pump(conn, backend, done)  # this thread relays the way in

    def _finish(self, peer: str, conn: socket.socket, backend: socket.socket) -> None:
        _callers.pop(peer, None)
        with self._lock:
            self._conns.difference_update((conn, backend))
        conn.close()
        backend.close()


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
