"""Message-mode pipes over SMB: both ends of npipe.connection across hosts.

What a real smbd does with a message-mode pipe (the NPA reply's file_type 2), seen on
Samba 4.17.12 with npipe's native client (a hand-run probe: raw SMB2 WRITE/READ on the
opened pipe, a Unix listener in np/ answering the NPA request with file_type 2), and
what this module does about it:

- client -> np/ socket: a WRITE of 5 bytes arrives as ``05 00`` + the 5 bytes (the
  2-byte little-endian length, one frame per WRITE): the server's
  :class:`SambaMessageSocket` reads one message per frame (npipe.framing);
- a WRITE of 70,000 bytes fails with 0xC000002F (STATUS_PORT_MESSAGE_TOO_LONG: smbd's
  EMSGSIZE) and nothing reaches the socket: smbd refuses, it does not split. So a
  message through Samba is at most 65,535 bytes, in both directions: both ends refuse
  a longer one before sending anything (npipe.framing.MessageNotCarried);
- np/ socket -> client: each frame is handed out by READs; a READ shorter than the
  message returns STATUS_SUCCESS (not STATUS_BUFFER_OVERFLOW) with the first part, and
  the next READ the rest; a READ never spans two messages (``abc`` then ``hi`` came in
  separate READs of 100 bytes). So the client reads with READs of 64 KiB (a whole
  message always fits): each is one message;
- a 0-byte frame from the server makes that READ fail with 0xC0000185
  (STATUS_IO_DEVICE_ERROR), and the pipe goes on (the next READ had the next message):
  0-byte messages cannot cross Samba, and both ends refuse to send one.

A Windows server instead answers a READ shorter than the message with
STATUS_BUFFER_OVERFLOW and the first part, the rest coming with the next READs, the
last one SUCCESS (MS-SMB2 3.3.4.4; not seen here, no Windows): the client gathers them.

The client's end: the backend opens the pipe in message mode (``attach_messages``) and
relays it to one end of a SOCK_SEQPACKET socket pair in npipe.local.messages' record
framing (one record per READ: LAST if it ended a message, MORE if it did not; each
message the application sends, one WRITE); the application's end is a
:class:`~npipe.local.messages.MessageSocket`, so fileno(), poll() and the receive
limits work as on a local message pipe.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import select
import socket
import sys
from typing import TYPE_CHECKING, Any

from npipe.address import PipeAddress
from npipe.errors import UnsupportedPlatform
from npipe.framing import (
    SAMBA,
    FrameReader,
    check_smb_message,
    read_message,
    samba_header,
)
from npipe.local.messages import FRAGMENT, LAST, MORE, MessageSocket

if TYPE_CHECKING:
    from npipe.smb.credentials import Credentials
    from npipe.smb.native.pipe import RemotePipe

log = logging.getLogger("npipe.smb")

# Messages read from the pipe and not yet taken by the local socket: past this many,
# the pipe's READs pause (the application reads slowly).
MAX_QUEUED = 16


# --- the server's end: a caller smbd brought to the np/ socket ------------------------


class SambaMessageSocket:
    """Messages on an np/ connection whose named_pipe_auth reply said message mode:
    each framed by smbd's 2-byte length (blocking; npipe.connection's Transport)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = FrameReader(SAMBA)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_message(self, data: memoryview) -> None:
        # (checked before a byte is sent: the connection goes on)
        self.sock.sendall(samba_header(len(data)) + bytes(data))

    def recv_message(self, limit: int | None) -> bytes:
        return read_message(self.sock.recv, self._reader, limit,
                            closed="the SMB caller closed the pipe",
                            cut="the SMB caller went away in the middle of a message")

    def poll(self, timeout: float | None) -> bool:
        readable, _, _ = select.select([self.sock], [], [], timeout)
        return bool(readable)

    def close(self) -> None:
        self.sock.close()


# --- the client's end ---------------------------------------------------------------


class SmbMessageSocket(MessageSocket):
    """The application's end of a remote message pipe: a local MessageSocket whose
    messages must fit Samba's limits (checked before anything is sent)."""

    def send_message(self, data: memoryview) -> None:
        check_smb_message(len(data))
        super().send_message(data)


def open_message_pipe(
    addr: PipeAddress,
    *,
    credentials: Credentials | None = None,
    timeout: float | None = None,
    encrypt: bool | None = None,
    smb_backend: str | None = None,
    allow_smb2: bool = False,
) -> SmbMessageSocket:
    """Open ``\\\\HOST\\pipe\\NAME`` in message mode (blocking; the SMB work runs on
    npipe's I/O thread, or the smbprotocol backend's threads)."""
    from npipe import smb
    from npipe.blocking import DEFAULT_OPEN_TIMEOUT, _run_bounded
    from npipe.smb.credentials import Credentials

    if sys.platform == "win32":  # (no SOCK_SEQPACKET socket pairs)
        raise UnsupportedPlatform(
            f"{addr}: on Windows a remote message pipe is opened by Windows itself, with "
            "this logon's credentials (leave out credentials, smb_backend and encrypt), "
            "or use pipe_mode='byte'")
    client: Any = smb.get_client(smb_backend)
    attach = getattr(client, "attach_messages", None)
    if attach is None:
        raise UnsupportedPlatform(f"the {client.name} SMB backend cannot open message pipes")
    creds = credentials if credentials is not None else Credentials.resolve()
    open_timeout = DEFAULT_OPEN_TIMEOUT if timeout is None else timeout
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        # attach_messages() owns ``theirs`` from here (closed if the open fails).
        _run_bounded(attach(addr, theirs, credentials=creds, timeout=open_timeout,
                            encrypt=encrypt, allow_smb2=allow_smb2), open_timeout, addr)
    except BaseException:
        ours.close()
        raise
    return SmbMessageSocket(ours)


class MessageRelay(asyncio.Protocol):
    """A message-mode RemotePipe (the native backend) relayed to a SOCK_SEQPACKET
    socket, on the pipe's event loop: each READ's data one record on the socket, each
    message from the socket one WRITE."""

    def __init__(self, pipe: RemotePipe, sock: socket.socket) -> None:
        self.pipe = pipe
        self.sock = sock
        sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._records: collections.deque[bytes] = collections.deque()
        self._wake = asyncio.Event()  # records queued, or the pipe ended
        self._writable = asyncio.Event()
        self._writable.set()
        self._ended = False
        self._paused = False
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        for coro in (self._to_socket(), self._from_socket()):
            self._running += 1
            task = self._loop.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- the pipe's protocol ----------------------------------------------------------

    def message_part_received(self, data: bytes, last: bool) -> None:
        self._records.append((LAST if last else MORE) + data)
        self._wake.set()
        if len(self._records) >= MAX_QUEUED and not self._paused:
            self._paused = True
            self.pipe.pause_reading()

    def data_received(self, data: bytes) -> None:  # (not in message mode)
        raise AssertionError("a message relay on a byte-mode pipe")

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.warning("%s; the message pipe ends here", exc)
        self._ended = True
        self._wake.set()
        self._writable.set()

    # -- the socket's side ------------------------------------------------------------

    async def _to_socket(self) -> None:
        loop = self._loop
        try:
            while True:
                while self._records:
                    await loop.sock_sendall(self.sock, self._records.popleft())
                    if self._paused and len(self._records) <= MAX_QUEUED // 2:
                        self._paused = False
                        self.pipe.resume_reading()
                if self._ended:
                    break
                self._wake.clear()
                await self._wake.wait()
        except OSError as exc:
            log.debug("pipe %s: the local side went away: %s", self.pipe.name, exc)
        finally:
            # After every message relayed, the application reads the end (and its
            # sends fail); the other task's recv() returns 0.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.pipe.close()
            self._done()

    async def _from_socket(self) -> None:
        loop = self._loop
        buf = bytearray(FRAGMENT + 1)
        parts: list[bytes] = []
        try:
            while True:
                n = await loop.sock_recv_into(self.sock, buf)
                if n == 0:
                    break
                parts.append(bytes(buf[1:n]))
                if buf[0] == LAST[0]:
                    await self._writable.wait()
                    if self._ended:
                        break
                    self.pipe.write(b"".join(parts))  # one message, one WRITE
                    parts.clear()
        except OSError as exc:
            log.debug("pipe %s: the local side went away: %s", self.pipe.name, exc)
        finally:
            self.pipe.close()  # the application closed its end
            self._done()

    def _done(self) -> None:
        self._running -= 1
        if self._running == 0:
            self.sock.close()


__all__ = ["MessageRelay", "SambaMessageSocket", "SmbMessageSocket", "open_message_pipe"]
