"""Message-mode pipes on Linux: SOCK_SEQPACKET Unix sockets, one message per record chain.

A Windows message-mode pipe keeps each WriteFile's bytes together: the reader gets one
message per read (ERROR_MORE_DATA while it has more). A SOCK_SEQPACKET Unix socket keeps
record boundaries the same way, but one record must fit in the sender's socket buffer
(``len <= SO_SNDBUF - 32``; SO_SNDBUF is capped by ``net.core.wmem_max``, 208 KiB by
default, for anyone but root), and a 0-byte record reads exactly like the peer's close.
So each record starts with one header byte:

    0x00  the last (or only) record of a message
    0x01  more records of this message follow

and carries at most :data:`FRAGMENT` bytes of the message after it. A message of any size
(0 bytes included) keeps its boundary; its receiver bounds what it gathers (``limit``)
and drops the rest of an oversized message, so the connection goes on with the next one.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from npipe.acl import Acl
from npipe.address import PipeAddress
from npipe.errors import ConnectionLost, MessageTooLarge, UnsupportedPlatform
from npipe.framing import MessageLost
from npipe.frontdoor import DoorIdentify, local_identify
from npipe.identity import Caller
from npipe.local.claim import claim_pipe
from npipe.local.dial import check_admitted, check_server, connect_error, find_socket
from npipe.local.listener import ClaimedSocket

if TYPE_CHECKING:  # (npipe.connection imports this module when it runs)
    from npipe.connection import Transport

# The payload of one record (its header byte aside): well under the default socket
# buffer (net.core.wmem_default, 208 KiB), so a record always fits, and large enough
# that a 1 MiB message is 16 sends.
FRAGMENT = 64 * 1024
LAST, MORE = b"\x00", b"\x01"


class MessageSocket:
    """Messages over a connected SOCK_SEQPACKET socket (blocking)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray(FRAGMENT + 1)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_message(self, data: memoryview) -> None:
        n = len(data)
        start = 0
        while True:
            end = min(start + FRAGMENT, n)
            header = LAST if end == n else MORE
            sent = self.sock.sendmsg([header, data[start:end]])
            if sent != end - start + 1:  # (SEQPACKET sends whole records or fails)
                raise ConnectionLost(f"a short send on a message pipe ({sent} bytes)")
            if end == n:
                return
            start = end

    def recv_message(self, limit: int | None) -> bytes:
        """The next whole message; ConnectionLost (an EOFError too) at the peer's close;
        MessageTooLarge, with the message dropped, past ``limit`` bytes."""
        parts: list[bytes] = []
        size = 0
        too_large = False
        while True:
            n = self.sock.recv_into(self._buf, len(self._buf), socket.MSG_TRUNC)
            if n == 0:
                if parts or too_large:
                    raise MessageLost("the peer closed the pipe in the middle of a message")
                raise MessageLost("the peer closed the pipe")
            if n > len(self._buf):
                raise ConnectionLost(f"a record of {n} bytes on a message pipe: not npipe's "
                                     f"framing (at most {FRAGMENT + 1})")
            more = self._buf[0] == MORE[0]
            size += n - 1
            if limit is not None and size > limit:
                too_large = True
                parts.clear()
            if not too_large:
                parts.append(bytes(self._buf[1:n]))
            if not more:
                break
        if too_large:
            raise MessageTooLarge(f"bad message length: a message of {size} bytes is over "
                                  f"this connection's limit of {limit} (dropped)")
        return b"".join(parts)

    def poll(self, timeout: float | None) -> bool:
        readable, _, _ = select.select([self.sock], [], [], timeout)
        return bool(readable)

    def close(self) -> None:
        self.sock.close()


def connect(path: str | os.PathLike[str], error: Callable[[OSError], Exception]) -> socket.socket:
    """A SOCK_SEQPACKET connection to ``path``; ``error`` turns a failed connect() into
    npipe's error."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(os.fspath(path))
    except OSError as e:
        sock.close()
        raise error(e) from e
    return sock


def _check_seqpacket() -> None:
    """macOS (XNU) has no SOCK_SEQPACKET Unix sockets (socket() fails, EPROTONOSUPPORT):
    say so plainly. Message pipes there would need a framing of their own."""
    if sys.platform == "darwin":
        raise UnsupportedPlatform("local message pipes (npipe.connection) need SOCK_SEQPACKET "
                                  "Unix sockets, which macOS lacks; byte pipes work there")


class SocketListener:
    """A message pipe's listening SOCK_SEQPACKET socket, claimed like a byte pipe's
    (npipe.local.claim: one name for the machine, first instance wins, the ACL note),
    with each caller checked against ``acl`` by SO_PEERCRED before accept() returns it.

    ``smb=True`` also listens where smbd looks for the pipe (npipe.samba.np_listener,
    as a byte pipe's server does): each SMB caller is introduced by smbd's
    named_pipe_auth request, admitted by the same ACL, and answered in message mode
    (npipe.smb.messages.SambaMessageSocket)."""

    def __init__(self, addr: PipeAddress, *, acl: Acl, smb: bool,
                 pipe_dir: str | os.PathLike[str] | None) -> None:
        _check_seqpacket()
        self.addr = addr
        self._identify = local_identify(acl, addr)
        self.claimed = claim_pipe(addr, acl=acl, directory=pipe_dir,
                                  sock_type=socket.SOCK_SEQPACKET)
        self.samba: ClaimedSocket | None = None
        self._samba_identify: DoorIdentify | None = None
        if smb:
            from npipe.samba.np_listener import claim_samba_pipe, samba_identify
            from npipe.samba.npa import FILE_TYPE_MESSAGE_MODE_PIPE

            try:
                self.samba = claim_samba_pipe(addr, directory=pipe_dir, acl=acl)
            except BaseException:
                self.claimed.release()
                raise
            self._samba_identify = samba_identify(acl, addr,
                                                  file_type=FILE_TYPE_MESSAGE_MODE_PIPE)

    def accept(self) -> tuple[Transport, Caller | None]:
        listening = [self.claimed.sock]
        if self.samba is not None:
            listening.append(self.samba.sock)
        for sock in listening:  # (another thread's accept() may take what select saw)
            sock.setblocking(False)
        while True:
            try:
                ready, _, _ = select.select(listening, [], [])
            except ValueError:  # (closed meanwhile: its descriptor is -1)
                raise OSError(errno.EBADF, f"the listener of pipe {self.addr} is closed"
                              ) from None
            for sock in ready:
                try:
                    conn, _ = sock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                conn.setblocking(True)
                if sock is self.claimed.sock:
                    taken = self._take_local(conn)
                else:
                    taken = self._take_samba(conn)
                if taken is not None:
                    return taken

    def _take_local(self, conn: socket.socket) -> tuple[Transport, Caller] | None:
        try:
            who = self._identify(conn)
        except OSError:
            who = None  # (gone before it could be asked who it is)
        if who is None:  # refused (logged by the identifier)
            conn.close()
            return None
        return MessageSocket(conn), who

    def _take_samba(self, conn: socket.socket) -> tuple[Transport, Caller] | None:
        from npipe.smb.messages import SambaMessageSocket

        assert self._samba_identify is not None
        try:
            who = self._samba_identify(conn)  # (bounded in time: HANDSHAKE_TIMEOUT)
        except OSError:
            who = None
        if not isinstance(who, Caller):  # refused, or a bad handshake (logged)
            conn.close()
            return None
        return SambaMessageSocket(conn), who

    def close(self) -> None:
        try:
            self.claimed.release()
        finally:
            if self.samba is not None:
                self.samba.release()


def dial_local(addr: PipeAddress, *, server_user: str | int | None,
               pipe_dir: str | os.PathLike[str] | None) -> MessageSocket:
    """Connect to a local message pipe, checked as a byte pipe's client checks its own
    (npipe.local.dial): the listener's user, then the ACL note beside its socket."""
    _check_seqpacket()
    path = find_socket(addr, server_user=server_user, directory=pipe_dir)
    sock = connect(path, lambda e: connect_error(e, path, message=True))
    try:
        check_server(sock, path, server_user)
        check_admitted(sock, path, addr)
    except BaseException:
        sock.close()
        raise
    return MessageSocket(sock)
