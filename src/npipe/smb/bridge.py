"""A private Unix socket in front of a remote pipe, for clients that dial only ``unix:``.

grpcio cannot speak SMB, but it can dial a Unix socket. A :class:`PipeBridge` listens
on ``<pipe dir>/.np-XXXX/b`` (a fresh 0700 directory that records its maker, so that
whatever a killed process leaves is reclaimed: npipe.local.reclaim) and, for every
connection from
this user (checked with SO_PEERCRED), opens the remote pipe and relays bytes both
ways. Each connection gets its own pipe instance, as each CreateFile does on Windows.

The bridge runs its own asyncio loop in a daemon thread, so it works under sync
grpcio and under any other event loop alike. The remote open is done by an ``attach``
coroutine function that takes the accepted socket and relays it to the pipe itself
(see :meth:`SmbprotocolClient.attach`): the bytes do not cross this loop at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import threading
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable

from npipe.errors import NpipeError
from npipe.local.listener import private_dir
from npipe.local.paths import ensure_pipe_dir, pipe_dir
from npipe.local.peercred import peer_credentials

log = logging.getLogger("npipe.smb.bridge")

Attach = Callable[[socket.socket], Awaitable[None]]

SOCKET_NAME = "b"
BACKLOG = 128


def close_gently(sock: socket.socket) -> None:
    """Close a connection so that its peer reads end of stream, not ECONNRESET.

    Linux resets a Unix (or TCP) connection closed with unread data in its receive
    queue; what the peer sent first (grpcio's preface) is read and dropped here.
    """
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        sock.setblocking(False)
        for _ in range(64):
            if not sock.recv(65536):
                break
    sock.close()


class PipeBridge:
    """Listens on a private Unix socket; each connection is relayed to the remote pipe.

    ``attach(sock)`` opens the remote pipe for one accepted connection and relays it,
    taking ownership of ``sock`` (closing it if the open fails). ``description`` names
    the pipe in logs. Close the bridge to stop listening, end the relayed connections
    and remove the directory.
    """

    def __init__(self, attach: Attach, *, description: str = "remote pipe") -> None:
        self._attach = attach
        self.description = description
        self._closed = False
        self._lock = threading.Lock()
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._tasks: set[asyncio.Task[None]] = set()
        self.directory = os.fspath(private_dir(ensure_pipe_dir(pipe_dir())))  # mode 0700
        self.path = os.path.join(self.directory, SOCKET_NAME)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self.path)
            os.chmod(self.path, 0o600)
            self._listener.listen(BACKLOG)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        self._loop = asyncio.new_event_loop()
        self._serving: asyncio.Task[None] | None = None
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name=f"npipe-bridge {description}", daemon=True
        )
        self._thread.start()
        started.wait()

    @property
    def target(self) -> str:
        """The grpcio target: ``unix:<pipe dir>/.np-XXXX/b``."""
        return "unix:" + urllib.parse.quote(self.path, safe="/")

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.target
        return f"<PipeBridge {self.description} at {state}>"

    # --- the loop thread ------------------------------------------------------------

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._serving = self._loop.create_task(self._serve())
        self._loop.call_soon(started.set)
        try:
            self._loop.run_until_complete(self._serving)
        except asyncio.CancelledError:
            pass
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()

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
            await self._attach(conn)
        except NpipeError as exc:
            # The local connection is closed already: grpcio reports UNAVAILABLE.
            log.warning("bridge %s: could not open the remote pipe: %s", self.description, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("bridge %s: opening the remote pipe failed", self.description)
        finally:
            if conn.fileno() >= 0 and self._closed:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    # --- closing --------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening, end every relayed connection and remove the directory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sockets = list(self._sockets)
        if self._loop.is_running() or not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._listener.close()
        for sock in sockets:
            # The relay threads own these; shutting them down makes the threads close
            # their pipes and the sockets.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _stop(self) -> None:
        if self._serving is not None:
            self._serving.cancel()

    def __enter__(self) -> PipeBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Attach", "PipeBridge", "close_gently"]
