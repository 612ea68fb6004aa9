"""Message-mode pipes with ``multiprocessing.connection``'s API: ``Listener`` and ``Client``.

CPython's ``multiprocessing.connection`` on Windows (``family="AF_PIPE"``) talks over
message-mode named pipes, one message per ``send_bytes``. This module gives the same API
on npipe's pipes, with npipe's names, ACLs and caller identity::

    from npipe.connection import Client, Listener

    with Listener("jobs", authkey=b"secret", acl=npipe.Acl.allow(users=["bob"])) as lst:
        with lst.accept() as conn:           # conn.caller: who connected (npipe.Caller)
            conn.send_bytes(conn.recv_bytes() + b"!")

    with Client("jobs", authkey=b"secret") as conn:
        conn.send_bytes(b"hi"); conn.recv_bytes()   # b"hi!"

Every ``send_bytes`` arrives as one ``recv_bytes``, whatever its size (0 bytes
included). On Linux a message pipe is a SOCK_SEQPACKET Unix socket (its records framed
as :mod:`npipe.local.messages` says, so that messages larger than a socket buffer keep
their boundaries too); on Windows this module hands over to the stdlib's own AF_PIPE
Listener/Client (:mod:`npipe.windows.connection`), which interoperates with any other
program using them.

Across hosts (``Listener(..., smb=True)`` through Samba, ``Client(r"\\\\HOST\\pipe\\NAME")``
over SMB, npipe.smb.messages) a message is 1 to 65,535 bytes, Samba's limits: larger or
empty ones raise MessageNotCarried before anything is sent. ``pipe_mode="byte"`` instead
carries the stdlib's own framing on a byte pipe: any size, everywhere.

``authkey`` runs the stdlib's own challenge (``multiprocessing.connection``'s
``deliver_challenge`` / ``answer_challenge``) on the connection, so a wrong key raises
``multiprocessing.AuthenticationError`` on both sides, as with the stdlib.

``send()`` / ``recv()`` pickle, like the stdlib's: **unpickling runs code of the sender's
choosing, so use them only with peers you trust** (an authkey, or an ACL that admits
only trusted users); ``send_bytes`` / ``recv_bytes`` are safe with anyone.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import pickle
import select
import socket
import sys
from collections.abc import Callable
from multiprocessing.connection import answer_challenge, deliver_challenge
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from npipe.acl import OWNER_ONLY, Acl
from npipe.address import PipeAddress, parse_address
from npipe.errors import ConfigError, MessageTooLarge, UnsupportedPlatform
from npipe.framing import (
    STDLIB,
    FrameReader,
    MessageNotCarried,
    read_message,
    stdlib_header,
)
from npipe.identity import Caller

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from npipe.blocking import PipeSocket

log = logging.getLogger("npipe.connection")

__all__ = ["DEFAULT_MAX_MESSAGE", "Client", "Connection", "Listener", "MessageNotCarried",
           "MessageTooLarge", "PipeMode"]

# What a Listener's connections take in one message unless told otherwise: a bound on
# the memory one caller can make the server spend (the stdlib has none: its 4-byte
# length lets a peer announce 2 GiB).
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
"""The largest message a :class:`Listener`'s connections take unless told otherwise
(``max_message``): 64 MiB."""
# How long the authkey challenge may take before the connection is dropped: a caller
# that connects and says nothing must not hold accept() for ever.
HANDSHAKE_TIMEOUT = 20.0
# How long a server waits for a caller that failed the challenge to go (see _handshake).
FAILURE_LINGER = 2.0


class Transport(Protocol):
    """How a Connection moves whole messages (one per platform/path)."""

    def fileno(self) -> int: ...
    def send_message(self, data: memoryview) -> None: ...
    def recv_message(self, limit: int | None) -> bytes: ...
    def poll(self, timeout: float | None) -> bool: ...
    def close(self) -> None: ...


class Connection:
    """One end of a message pipe, with ``multiprocessing.connection.Connection``'s
    methods. ``caller`` is who is at the other end, on the server's side (npipe.Caller;
    None on the client's)."""

    def __init__(self, transport: Transport, *, caller: Caller | None = None,
                 max_message: int | None = None) -> None:
        self._transport: Transport | None = transport
        self.caller = caller
        self.max_message = max_message

    # -- the stdlib's API --------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._transport is None

    @property
    def readable(self) -> bool:
        """True until closed (the stdlib's API: both ends read and write)."""
        return self._transport is not None

    @property
    def writable(self) -> bool:
        """True until closed (the stdlib's API: both ends read and write)."""
        return self._transport is not None

    def fileno(self) -> int:
        """The descriptor to wait on (``multiprocessing.connection.wait``, select)."""
        return self._open().fileno()

    def send_bytes(self, buf: Buffer, offset: int = 0, size: int | None = None) -> None:
        """Send ``buf[offset:offset+size]`` as one message."""
        transport = self._open()
        m = memoryview(buf)
        if m.itemsize > 1:
            m = m.cast("B")
        n = m.nbytes
        if offset < 0:
            raise ValueError("offset is negative")
        if n < offset:
            raise ValueError("buffer length < offset")
        if size is None:
            size = n - offset
        elif size < 0:
            raise ValueError("size is negative")
        elif offset + size > n:
            raise ValueError("buffer length < offset + size")
        transport.send_message(m[offset:offset + size])

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """The next message. Longer than ``maxlength`` (or this connection's
        ``max_message``): MessageTooLarge ("bad message length", an OSError as the
        stdlib's), the message dropped and the connection still usable. The peer gone:
        EOFError."""
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        return self._recv(maxlength)

    def recv_bytes_into(self, buf: Any, offset: int = 0) -> int:
        """Read the next message into ``buf`` at ``offset``; its size. A message that
        does not fit raises ``multiprocessing.BufferTooShort`` holding it (as the stdlib)."""
        with memoryview(buf) as m:
            itemsize = m.itemsize
            total = itemsize * len(m)
            if offset < 0:
                raise ValueError("negative offset")
            if offset > total:
                raise ValueError("offset too large")
            data = self._recv(None)
            if len(data) > total - offset:
                raise multiprocessing.BufferTooShort(data)
            m.cast("B")[offset:offset + len(data)] = data
            return len(data)

    def send(self, obj: Any) -> None:
        """Send a picklable object (see the module's note: trusted peers only)."""
        from multiprocessing.reduction import ForkingPickler

        self.send_bytes(ForkingPickler.dumps(obj))

    def recv(self) -> Any:
        """Receive an object that :meth:`send` sent. **Unpickling runs the sender's
        code**: only with peers you trust (as the stdlib warns)."""
        return pickle.load(io.BytesIO(self._recv(None)))

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether a message is ready; waits up to ``timeout`` seconds (None: for ever)."""
        return self._open().poll(timeout)

    def close(self) -> None:
        """Close this end (again: nothing happens)."""
        if self._transport is not None:
            transport, self._transport = self._transport, None
            transport.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.fileno()}"
        who = f" caller={self.caller}" if self.caller is not None else ""
        return f"<npipe.connection.Connection {state}{who}>"

    # -- ---------------------------------------------------------------------------------

    def _open(self) -> Transport:
        if self._transport is None:
            raise OSError("handle is closed")
        return self._transport

    def _recv(self, maxlength: int | None) -> bytes:
        limits = [x for x in (maxlength, self.max_message) if x is not None]
        return self._open().recv_message(min(limits) if limits else None)


PipeMode = Literal["message", "byte"]
"""A message pipe's kind: ``"message"`` (Windows' message-mode pipe, the stdlib's AF_PIPE;
through Samba 1 to 65,535 bytes a message) or ``"byte"`` (a byte pipe carrying the
stdlib's length-prefixed framing: any size, 0 bytes included)."""


def _check_pipe_mode(mode: str) -> None:
    if mode not in ("message", "byte"):
        raise ConfigError(f"pipe_mode must be 'message' or 'byte', not {mode!r}")


def _windows_native(addr: PipeAddress, dial: dict[str, Any]) -> bool:
    from npipe.streams import windows_native

    return windows_native(addr, dial.get("credentials"), dial.get("smb_backend"),
                          dial.get("encrypt"))


class ByteModeTransport:
    """Messages in the stdlib's framing (npipe.framing.STDLIB) on a byte pipe: a
    connection of npipe.connect() or npipe.create_server()."""

    def __init__(self, conn: PipeSocket) -> None:
        self.conn = conn
        self.sock = conn.socket  # (the handshake's timeout is set on it)
        self._reader = FrameReader(STDLIB)

    def fileno(self) -> int:
        return self.conn.fileno()

    def send_message(self, data: memoryview) -> None:
        header = stdlib_header(len(data))
        if len(data) > 16384:  # (as the stdlib: no copy of a large message)
            self.conn.sendall(header)
            self.conn.sendall(data)
        else:
            self.conn.sendall(header + bytes(data))

    def recv_message(self, limit: int | None) -> bytes:
        return read_message(self.conn.recv, self._reader, limit,
                            closed="the peer closed the pipe",
                            cut="the peer closed the pipe in the middle of a message")

    def poll(self, timeout: float | None) -> bool:
        if self.conn.pending():
            return True
        readable, _, _ = select.select([self.conn.socket], [], [], timeout)
        return bool(readable)

    def close(self) -> None:
        self.conn.close()


class ByteModeListener:
    """A byte pipe's server (npipe.create_server: its ACL, ``smb=True`` through Samba)
    whose connections carry messages in the stdlib's framing."""

    def __init__(self, addr: PipeAddress, *, acl: Acl, smb: bool,
                 pipe_dir: str | os.PathLike[str] | None) -> None:
        from npipe.blocking import create_server

        self._server = create_server(addr, acl=acl, smb=smb, pipe_dir=pipe_dir)

    def accept(self) -> tuple[Transport, Caller | None]:
        conn, caller = self._server.accept()
        return ByteModeTransport(conn), caller

    def close(self) -> None:
        self._server.close()


def _check_authkey(authkey: bytes | None) -> None:
    if authkey is not None and not isinstance(authkey, bytes):
        raise TypeError("authkey should be a byte string")


class Listener:
    """A message pipe's server: ``accept()`` returns a :class:`Connection` per caller.

    ``address`` is a pipe name (``"jobs"``, ``r"\\\\.\\pipe\\jobs"``); ``acl`` decides who
    may connect (default: this user and root), checked on every connection by the
    kernel's word (SO_PEERCRED), or smbd's for an SMB caller: callers it refuses are
    logged and closed, and ``accept()`` goes on waiting. ``max_message`` bounds every
    message the accepted connections receive (larger ones raise MessageTooLarge and are
    dropped). ``smb=True`` also serves SMB clients through Samba.

    ``pipe_mode``: ``"message"`` (the default) is a message-mode pipe, as Windows' and
    the stdlib's AF_PIPE ones; through Samba its messages are 1 to 65,535 bytes.
    ``"byte"`` is a byte-mode pipe carrying the stdlib's own framing (a 4-byte length
    before each message): any size, 0 bytes included, across hosts too, and a stdlib
    ``multiprocessing.connection.Connection`` on a socket of ``npipe.connect()`` is a
    peer. Both ends must use the same mode.
    """

    def __init__(
        self,
        address: str | PipeAddress,
        authkey: bytes | None = None,
        *,
        acl: Acl = OWNER_ONLY,
        smb: bool = False,
        max_message: int | None = DEFAULT_MAX_MESSAGE,
        pipe_dir: str | os.PathLike[str] | None = None,
        pipe_mode: PipeMode = "message",
    ) -> None:
        _check_authkey(authkey)
        _check_pipe_mode(pipe_mode)
        self._addr = parse_address(address)
        if not self._addr.is_local:
            raise ConfigError(f"{self._addr}: a Listener serves a local pipe name")
        self._authkey = authkey
        self.max_message = max_message
        self._last: Caller | None = None
        if pipe_mode == "byte":
            self._impl: _ListenerImpl = ByteModeListener(self._addr, acl=acl, smb=smb,
                                                         pipe_dir=pipe_dir)
        elif sys.platform == "win32":
            from npipe.windows.connection import WindowsListener

            self._impl = WindowsListener(self._addr, acl=acl, smb=smb)
        else:
            from npipe.local.messages import SocketListener

            self._impl = SocketListener(self._addr, acl=acl, smb=smb, pipe_dir=pipe_dir)

    @property
    def address(self) -> PipeAddress:
        """The pipe it listens on."""
        return self._addr

    @property
    def last_accepted(self) -> Caller | None:
        """Who the last accepted connection's caller is (npipe.Caller)."""
        return self._last

    def accept(self) -> Connection:
        """Wait for the next admitted caller; with an authkey, run the challenge both ways
        (a wrong key: the connection closed, ``multiprocessing.AuthenticationError``)."""
        if self._impl is None:
            raise OSError("listener is closed")
        transport, caller = self._impl.accept()
        conn = Connection(transport, caller=caller, max_message=self.max_message)
        if self._authkey is not None:
            key = self._authkey
            _handshake(conn, transport, lambda: _challenge(conn, key, server=True),
                       server=True)
        self._last = caller
        return conn

    def close(self) -> None:
        """Stop listening and give up the pipe's name (accepted connections stay open)."""
        impl, self._impl = self._impl, None  # type: ignore[assignment]
        if impl is not None:
            impl.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _ListenerImpl(Protocol):
    def accept(self) -> tuple[Transport, Caller | None]: ...
    def close(self) -> None: ...


def _challenge(conn: Connection, authkey: bytes, *, server: bool) -> None:
    """The stdlib's authkey challenge, both ways (the server asks first): its functions
    only call send_bytes / recv_bytes, which Connection has."""
    peer: Any = conn
    if server:
        deliver_challenge(peer, authkey)
        answer_challenge(peer, authkey)
    else:
        answer_challenge(peer, authkey)
        deliver_challenge(peer, authkey)


def _handshake(conn: Connection, transport: Transport, run: Callable[[], None], *,
               server: bool = False) -> None:
    sock = getattr(transport, "sock", None)
    try:
        if isinstance(sock, socket.socket):
            sock.settimeout(HANDSHAKE_TIMEOUT)
        run()
        if isinstance(sock, socket.socket):
            sock.settimeout(None)
    except BaseException as e:
        if server and isinstance(e, multiprocessing.AuthenticationError):
            # The caller's answer was wrong and it was told so (#FAILURE#): wait a
            # moment for it to read that and close, since Samba drops what its client
            # has not READ yet once the server closes (the caller would see the pipe
            # end instead of AuthenticationError).
            with contextlib.suppress(Exception):
                transport.poll(FAILURE_LINGER)
        conn.close()
        raise


def Client(
    address: str | PipeAddress,
    authkey: bytes | None = None,
    *,
    server_user: str | int | None = None,
    pipe_dir: str | os.PathLike[str] | None = None,
    max_message: int | None = None,
    pipe_mode: PipeMode = "message",
    **dial: Any,
) -> Connection:
    """Connect to a message pipe's :class:`Listener` (local, or ``\\\\HOST\\pipe\\NAME``
    over SMB; ``dial``: open_connection's SMB options: credentials, timeout, encrypt,
    smb_backend, allow_smb2). The local server must run as this user, root or
    ``server_user`` (AccessDenied otherwise, before a byte is sent). ``pipe_mode``: the
    Listener's (see :class:`Listener`).

    Across hosts in message mode each message is one SMB WRITE, and each received one is
    gathered from its READs; a message of 0 bytes or over 65,535 bytes (Samba's limits)
    raises MessageNotCarried before anything is sent, and the connection goes on."""
    _check_authkey(authkey)
    _check_pipe_mode(pipe_mode)
    addr = parse_address(address)
    transport: Transport
    if pipe_mode == "byte":
        from npipe.blocking import connect

        pipe = connect(addr, server_user=server_user, pipe_dir=pipe_dir, **dial)
        pipe.settimeout(None)  # (``timeout`` bounds the open, as in message mode)
        transport = ByteModeTransport(pipe)
    elif sys.platform == "win32" and addr.is_remote and _windows_native(addr, dial):
        from npipe.windows.connection import windows_client

        transport = windows_client(addr)  # (Windows' own SMB client, this logon's)
    elif addr.is_remote:
        from npipe.smb.messages import open_message_pipe

        transport = open_message_pipe(addr, **dial)
    elif dial:
        raise TypeError(f"unexpected options for a local pipe: {', '.join(dial)}")
    elif sys.platform == "win32":
        from npipe.windows.connection import windows_client

        transport = windows_client(addr)
    elif addr.kind != "local":
        raise UnsupportedPlatform(f"{addr}: message pipes have pipe names, not paths")
    else:
        from npipe.local.messages import dial_local

        transport = dial_local(addr, server_user=server_user, pipe_dir=pipe_dir)
    conn = Connection(transport, max_message=max_message)
    if authkey is not None:
        key = authkey
        _handshake(conn, transport, lambda: _challenge(conn, key, server=False))
    return conn
