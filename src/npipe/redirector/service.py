"""The redirector process: opens remote pipes and relays sockets to them for every npipe
process of its user (``python -m npipe.redirector``, started by
:func:`npipe.redirector.client.connect`).

Why a process of its own: relaying in the application's process makes the relay wait
for the GIL that the application's threads hold (32 threads calling through one gRPC
channel did half of what TCP does); here nothing else wants this process's GIL. And, as
Windows' redirector does for the whole machine, it keeps one SMB connection per host,
identity and options for all of its user's processes.

It accepts connections from its own uid only (SO_PEERCRED), serves each request (see
:mod:`npipe.redirector.protocol`) with npipe's SMB client on its loop, and exits once
nothing has been relayed or asked for during the idle timeout
(:func:`npipe.ioloop.idle_timeout`: $NPIPE_SMB_IDLE_TIMEOUT, 60 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from npipe import ioloop, smb
from npipe.local.peercred import peer_credentials
from npipe.redirector import client, protocol, wire

log = logging.getLogger("npipe.redirector")

REQUEST_TIMEOUT = 10.0  # for a connected process to send its request
# The idle check runs at most this often, and no sooner than this after the start.
SWEEP = 1.0


class Redirector:
    def __init__(self, path: Path, listener: socket.socket) -> None:
        self.path = path
        self.listener = listener
        self.inode = os.stat(path).st_ino
        # relayed socket -> what closes its tie to the asking process (if tied)
        self.relays: dict[socket.socket, Callable[[], None] | None] = {}
        self.pending = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.last_used = time.monotonic()
        self.stopping: asyncio.Future[None] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.stopping = loop.create_future()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop)
        self.listener.setblocking(False)
        loop.add_reader(self.listener.fileno(), self._accept)
        sweeper = loop.create_task(self._sweep())
        try:
            await self.stopping
        finally:
            sweeper.cancel()
            loop.remove_reader(self.listener.fileno())
            self._unlisten()
            for relayed in list(self.relays):
                with contextlib.suppress(OSError):
                    relayed.shutdown(socket.SHUT_RDWR)
            for client in list(smb._clients.values()):
                with contextlib.suppress(Exception):
                    client.close_connections()

    def _stop(self) -> None:
        if self.stopping is not None and not self.stopping.done():
            self.stopping.set_result(None)

    def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed: %s", e)
                return
            self.pending += 1
            self.last_used = time.monotonic()
            task = loop.create_task(self._serve(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self._serve_one(conn)
        except Exception:
            log.exception("a request failed")
            conn.close()
        finally:
            self.pending -= 1
            self.last_used = time.monotonic()

    async def _serve_one(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        pid, uid, _gid = peer_credentials(conn)
        if uid != os.getuid():
            log.warning("refused a connection from uid %d (pid %d): only uid %d may use it",
                        uid, pid, os.getuid())
            conn.close()
            return
        conn.setblocking(False)
        try:
            payload, fd = await asyncio.wait_for(wire.read_frame(loop, conn, with_fd=True),
                                                 REQUEST_TIMEOUT)
        except (OSError, asyncio.TimeoutError, protocol.RedirectorProtocolError) as e:
            log.info("pid %d: no request read: %s", pid, e or type(e).__name__)
            conn.close()
            return
        if payload is None:  # a probe (npipe ls, a prune): connected and went
            conn.close()
            return
        try:
            op = protocol.operation(payload)
        except protocol.RedirectorProtocolError as exc:
            log.warning("pid %d: %s", pid, exc)
            await _answer_failure(conn, exc, fd)
            return
        if op in ("connections", "close_connections"):
            if fd is not None:
                os.close(fd)
            client = smb.get_client(protocol.decode_connections_request(payload))
            if op == "close_connections":
                client.close_connections()
            infos = client.connections()
            await wire.send_frame(loop, conn, protocol.encode_connections(infos))
            conn.close()
            return
        relayed: socket.socket | None = None
        try:
            if fd is None:
                raise protocol.RedirectorProtocolError("a request without a socket to relay")
            relayed = socket.socket(fileno=fd)
            fd = None
            request = protocol.AttachRequest.decode(payload)
            client = smb.get_client(request.backend)
            await client.attach(
                request.address, relayed, credentials=request.credentials,
                timeout=request.timeout, encrypt=request.encrypt,
                allow_smb2=request.allow_smb2, close_on_failure=False,
                initial=request.initial, missing_grace=request.missing_grace)
        except Exception as exc:
            if relayed is not None:
                relayed.close()  # this descriptor only: the asking process answers on it
            log.debug("pid %d: %s: %s", pid, type(exc).__name__, exc)
            await _answer_failure(conn, exc, fd)
            return
        try:
            await wire.send_frame(loop, conn, protocol.encode_reply(None))
        except OSError:  # it went away: as if it had closed the tie
            conn.close()
            _shut(relayed)
            return
        if request.tied:
            self.relays[relayed] = wire.close_when_ended(loop, conn,
                                                         then=lambda: _shut(relayed))
        else:
            self.relays[relayed] = None
            conn.close()

    async def _sweep(self) -> None:
        interval = min(SWEEP, max(ioloop.sweep_interval(), 0.05))
        while True:
            await asyncio.sleep(interval)
            for relayed, close_tie in list(self.relays.items()):
                if relayed.fileno() < 0:  # the relay closed it: ended
                    del self.relays[relayed]
                    self.last_used = time.monotonic()
                    if close_tie is not None:
                        close_tie()
            if self.relays or self.pending:
                self.last_used = time.monotonic()
            elif time.monotonic() - self.last_used >= ioloop.idle_timeout() and self._retire():
                return

    def _retire(self) -> bool:
        """Stop listening, unless a process is starting a redirector right now (then
        it may be about to use this one: look again later)."""
        files = client.beside(self.path)
        lock = files.lock
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            fd = -1
        try:
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
            log.info("idle for %g s: exiting", ioloop.idle_timeout())
            self._unlisten()
            # Under the lock: a process that starts the next one checks, once it holds
            # the lock, that the file it locked is still there (client._locked).
            for leftover in (files.lock, files.log):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
            self._stop()
            return True
        finally:
            if fd >= 0:
                os.close(fd)

    def _unlisten(self) -> None:
        """Remove the socket (if it is still this one's) and close the listener: a
        connection not yet accepted is reset, and its process asks a new redirector."""
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        self.listener.close()


async def _answer_failure(conn: socket.socket, failure: BaseException, fd: int | None) -> None:
    """Tell the asking process what failed (if it still listens), close the descriptor
    it sent (if not yet a socket here) and the connection."""
    if fd is not None:
        os.close(fd)
    with contextlib.suppress(OSError):
        await wire.send_frame(asyncio.get_running_loop(), conn, protocol.encode_reply(failure))
    conn.close()


def _shut(relayed: socket.socket) -> None:
    if relayed.fileno() >= 0:
        with contextlib.suppress(OSError):
            relayed.shutdown(socket.SHUT_RDWR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m npipe.redirector",
                                     description="npipe's per-user SMB redirector")
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--ready-fd", type=int, default=-1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s npipe-redirector[%(process)d] %(levelname)s "
                               "%(name)s: %(message)s")
    logging.getLogger("npipe").setLevel(logging.DEBUG if os.environ.get(
        "NPIPE_REDIRECTOR_DEBUG") else logging.INFO)
    # Fork first: the process that started this one reaps the parent at once, and the
    # redirector is nobody's child (no zombie in an application that never waits). And
    # before listening: SO_PEERCRED names the process that called listen().
    if os.fork() != 0:
        os._exit(0)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(os.fspath(args.socket))
    except OSError as e:
        log.error("cannot listen on %s: %s", args.socket, e)
        return 1
    finally:
        os.umask(old_umask)
    listener.listen(128)
    if args.ready_fd >= 0:
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, b"ready")
        os.close(args.ready_fd)
    log.info("listening on %s", args.socket)
    asyncio.run(Redirector(args.socket, listener).run())
    return 0
