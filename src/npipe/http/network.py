"""httpcore network backends that dial a pipe instead of a TCP host.

httpcore asks its network backend for a stream (``connect_tcp`` / ``connect_unix_socket``)
and does all of HTTP/1.1 and HTTP/2 itself; these backends ignore the host and port and
open the one pipe they were made for. Errors opening it are httpcore's ConnectError /
ConnectTimeout carrying npipe's message, npipe's exception chained (httpx maps them to
httpx.ConnectError / ConnectTimeout, chaining the httpcore one).

- sync, local pipe: a plain Unix socket, found and checked exactly as open_connection
  does (find_socket, check_server, check_admitted).
- sync, remote pipe: a socketpair whose other end the SMB client relays to the pipe on
  npipe's I/O thread (the backend's ``attach``, as unix_bridge does); no second loop.
- sync, Windows (a local pipe, or a remote one through Windows' own SMB client, as
  open_connection would open it there): the same socketpair, its other end relayed to
  the pipe that npipe.windows.pipes opened on the I/O thread's proactor loop.
- async: asyncio streams from npipe.open_connection (local or remote).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import select
import socket
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from npipe.extras import imports_of

with imports_of("http", "npipe.http"):
    import httpcore

from npipe.address import PipeAddress, parse_address
from npipe.errors import NpipeError

if TYPE_CHECKING:
    from npipe.smb.credentials import Credentials

# A pipe open that fails on its own (PipeNotFound after retrying for ``timeout``) should
# report that, not lose the race to our own deadline by a hair.
_DEADLINE_GRACE = 0.5
# Closing an SMB pipe is a round trip; never let a close hang a pool.
_CLOSE_TIMEOUT = 2.0


@dataclass(frozen=True)
class DialOptions:
    """How to open the pipe (open_connection's options)."""

    address: PipeAddress
    server_user: str | int | None = None
    pipe_dir: str | os.PathLike[str] | None = None
    credentials: Credentials | None = None
    timeout: float = 10.0
    encrypt: bool | None = None
    allow_smb2: bool = False
    smb_backend: str | None = None

    def open_timeout(self, connect_timeout: float | None) -> float:
        """httpx's connect timeout bounds the open; ``timeout`` when httpx has none."""
        if connect_timeout is None:
            return self.timeout
        return min(connect_timeout, self.timeout)


def dial_options(address: str | PipeAddress, **options: Any) -> DialOptions:
    return DialOptions(parse_address(address), **options)


@contextlib.contextmanager
def _connect_errors() -> Iterator[None]:
    try:
        yield
    except httpcore.ConnectError:
        raise
    # (asyncio's and concurrent.futures' TimeoutError are other types before Python 3.11)
    except (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError) as e:
        raise httpcore.ConnectTimeout(str(e) or "timed out opening the pipe") from e
    except (NpipeError, OSError) as e:
        raise httpcore.ConnectError(str(e)) from e


def _no_tls() -> httpcore.ConnectError:
    return httpcore.ConnectError(
        "TLS over a pipe is not supported: use an http:// URL (the pipe is the transport)"
    )


# --- sync ---------------------------------------------------------------------------------


def _socket_readable(sock: socket.socket) -> bool:
    """Readable while idle means the server closed it (or sent what nobody asked for)."""
    if sock.fileno() < 0:
        return True
    if sys.platform == "win32":  # (no poll(); a socketpair's end is a small fd there)
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class SocketStream(httpcore.NetworkStream):
    """A blocking socket (the pipe's own, or our end of a relayed socketpair)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            self._sock.settimeout(timeout)
            return self._sock.recv(max_bytes)
        except TimeoutError as e:
            raise httpcore.ReadTimeout(str(e) or "read timed out") from e
        except OSError as e:
            raise httpcore.ReadError(str(e)) from e

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            self._sock.settimeout(timeout)
            self._sock.sendall(buffer)
        except TimeoutError as e:
            raise httpcore.WriteTimeout(str(e) or "write timed out") from e
        except OSError as e:
            raise httpcore.WriteError(str(e)) from e

    def close(self) -> None:
        self._sock.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        raise _no_tls()

    def get_extra_info(self, info: str) -> Any:
        if info == "socket":
            return self._sock
        if info == "is_readable":
            return _socket_readable(self._sock)
        return None


def _socketpair() -> tuple[socket.socket, socket.socket]:
    """Two connected stream sockets: AF_UNIX where there is one, else (Windows) what
    socket.socketpair makes there (TCP on loopback)."""
    if sys.platform == "win32":
        return socket.socketpair()
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


class PipeBackend(httpcore.NetworkBackend):
    """Every connection httpcore makes opens the pipe in ``options``."""

    def __init__(self, options: DialOptions) -> None:
        self.options = options

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        return self._connect(timeout)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        return self._connect(timeout)

    def _connect(self, timeout: float | None) -> httpcore.NetworkStream:
        deadline = self.options.open_timeout(timeout)
        with _connect_errors():
            if sys.platform == "win32" and self._windows_native():
                return SocketStream(self._open_windows(deadline))
            if self.options.address.is_remote:
                return SocketStream(self._open_remote(deadline))
            return SocketStream(self._open_local(deadline))

    def _windows_native(self) -> bool:
        from npipe.streams import windows_native

        opts = self.options
        return windows_native(opts.address, opts.credentials, opts.smb_backend, opts.encrypt)

    def _open_windows(self, timeout: float) -> socket.socket:
        if sys.platform != "win32":  # (and mypy checks the rest as Windows code only)
            raise NotImplementedError("Windows only")
        from npipe import ioloop
        from npipe.windows import pipes

        opts = self.options
        ours, theirs = _socketpair()
        try:
            # attach_client() owns ``theirs`` from here: it closes it if the open fails.
            ioloop.run(
                pipes.attach_client(opts.address, theirs, server_user=opts.server_user,
                                    timeout=timeout),
                timeout + _DEADLINE_GRACE,
            )
        except BaseException:
            ours.close()
            raise
        return ours

    def _open_local(self, timeout: float) -> socket.socket:
        if sys.platform == "win32":  # (_open_windows serves local pipes there)
            raise NotImplementedError("POSIX only")
        from npipe.local.dial import (
            check_admitted,
            check_server,
            connect_error,
            find_socket,
        )

        opts = self.options
        path = find_socket(opts.address, server_user=opts.server_user, directory=opts.pipe_dir)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # (non-inheritable: PEP 446)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(os.fspath(path))
            except TimeoutError:
                raise
            except OSError as e:
                raise connect_error(e, path) from e
            check_server(sock, path, opts.server_user)
            check_admitted(sock, path, opts.address)
        except BaseException:
            sock.close()
            raise
        return sock

    def _open_remote(self, timeout: float) -> socket.socket:
        from npipe import ioloop, redirector
        from npipe.smb.credentials import Credentials

        opts = self.options
        creds = opts.credentials if opts.credentials is not None else Credentials.resolve()
        ours, theirs = _socketpair()
        try:
            # attach() owns ``theirs`` from here: it closes it if the open fails.
            ioloop.run(
                redirector.attach(opts.smb_backend, opts.address, theirs, credentials=creds,
                                  timeout=timeout, encrypt=opts.encrypt,
                                  allow_smb2=opts.allow_smb2),
                timeout + _DEADLINE_GRACE,
            )
        except BaseException:
            ours.close()
            raise
        return ours

    def sleep(self, seconds: float) -> None:
        import time

        time.sleep(seconds)


# --- async --------------------------------------------------------------------------------


class StreamPair(httpcore.AsyncNetworkStream):
    """asyncio streams from npipe.open_connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return await asyncio.wait_for(self._reader.read(max_bytes), timeout)
        except (TimeoutError, asyncio.TimeoutError) as e:
            raise httpcore.ReadTimeout("read timed out") from e
        except (NpipeError, OSError) as e:
            raise httpcore.ReadError(str(e)) from e

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            self._writer.write(buffer)
            await asyncio.wait_for(self._writer.drain(), timeout)
        except (TimeoutError, asyncio.TimeoutError) as e:
            raise httpcore.WriteTimeout("write timed out") from e
        except (NpipeError, OSError, RuntimeError) as e:  # RuntimeError: closed transport
            raise httpcore.WriteError(str(e)) from e

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), _CLOSE_TIMEOUT)

    async def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise _no_tls()

    def get_extra_info(self, info: str) -> Any:
        if info == "socket":
            return self._writer.get_extra_info("socket")
        if info == "is_readable":
            # asyncio reads eagerly into the reader: a closed idle connection is at EOF.
            return self._reader.at_eof() or self._reader.exception() is not None
        return None


class AsyncPipeBackend(httpcore.AsyncNetworkBackend):
    """Every connection httpcore makes opens the pipe in ``options`` (asyncio only)."""

    def __init__(self, options: DialOptions) -> None:
        self.options = options

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._connect(timeout)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._connect(timeout)

    async def _connect(self, timeout: float | None) -> httpcore.AsyncNetworkStream:
        from npipe.streams import open_connection

        opts = self.options
        deadline = opts.open_timeout(timeout)
        with _connect_errors():
            reader, writer = await asyncio.wait_for(
                open_connection(
                    opts.address, server_user=opts.server_user, pipe_dir=opts.pipe_dir,
                    credentials=opts.credentials, timeout=deadline, encrypt=opts.encrypt,
                    smb_backend=opts.smb_backend, allow_smb2=opts.allow_smb2,
                ),
                deadline + _DEADLINE_GRACE,
            )
        return StreamPair(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


__all__ = ["AsyncPipeBackend", "DialOptions", "PipeBackend", "SocketStream", "StreamPair"]
