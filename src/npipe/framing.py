"""Length-prefixed message framings, sans I/O (npipe.connection's transports drive them).

Two framings put messages on a byte stream:

- **Samba's message mode** (``SAMBA``): on the np/ socket of a pipe whose
  named_pipe_auth reply said file_type 2, smbd puts a 2-byte little-endian length before
  every message a client WRITEs, and takes one such frame per message the server sends
  (seen on Samba 4.17.12; see npipe.smb.messages). So a message through Samba is
  1 to 65,535 bytes: a longer WRITE is refused (0xC000002F), and a 0-byte frame makes
  the client's READ fail (0xC0000185).
- **The standard library's** (``STDLIB``): ``multiprocessing.connection.Connection``'s
  own on a byte stream: a 4-byte big-endian signed length, or -1 and then an 8-byte
  length for messages over 2 GiB - 1. Any size, 0 bytes included.

:class:`FrameReader` says how many bytes it needs next (never more than the frame
still holds, so a driver never reads past a message: what follows stays in the
socket, and select() on it still means something), gathers a message, and drops one
longer than its ``limit`` without keeping it (:class:`Oversized`), so the stream goes
on with the next message.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from npipe.errors import ConnectionLost, MessageTooLarge, NpipeError

Framing = Literal["samba", "stdlib"]
SAMBA: Framing = "samba"
STDLIB: Framing = "stdlib"

# The longest message a Samba message-mode pipe carries (its 2-byte length).
SAMBA_MAX_MESSAGE = 0xFFFF
# The stdlib's framing: a 4-byte signed length; -1 announces an 8-byte one.
_STDLIB_SHORT_MAX = 0x7FFFFFFF
# The most a reader asks for at once (a driver reads a large message in pieces).
CHUNK = 1 << 20


class MessageNotCarried(NpipeError, ValueError):
    """A message this pipe cannot carry (0 bytes, or over 65,535 bytes, on an SMB
    message-mode pipe: Samba's limits); nothing of it was sent and the connection goes
    on."""


class MessageLost(ConnectionLost, EOFError):
    """The peer closed the pipe (the stdlib's Connection raises EOFError)."""


def check_smb_message(size: int) -> None:
    """Raise MessageNotCarried unless a message of ``size`` bytes can cross an SMB
    message-mode pipe served by Samba."""
    if size == 0:
        raise MessageNotCarried(
            "a 0-byte message cannot cross an SMB message-mode pipe (Samba fails the "
            "reader's READ on it); nothing was sent. Use pipe_mode='byte' for 0-byte "
            "messages")
    if size > SAMBA_MAX_MESSAGE:
        raise MessageNotCarried(
            f"a message of {size:,} bytes is over the {SAMBA_MAX_MESSAGE:,} bytes an SMB "
            "message-mode pipe carries through Samba (its 2-byte message length); nothing "
            "was sent. Use pipe_mode='byte' for larger messages")


def samba_header(size: int) -> bytes:
    """The 2-byte frame header smbd expects before a message of ``size`` bytes (checked)."""
    check_smb_message(size)
    return struct.pack("<H", size)


def stdlib_header(size: int) -> bytes:
    """multiprocessing.connection's header for a message of ``size`` bytes."""
    if size > _STDLIB_SHORT_MAX:
        return struct.pack("!iQ", -1, size)
    return struct.pack("!i", size)


@dataclass(frozen=True)
class Oversized:
    """A message longer than the reader's limit: read past and dropped."""

    size: int
    limit: int


class FrameReader:
    """Reads length-prefixed messages from a byte stream, fed as it arrives.

    Ask :attr:`bytes_needed`, read at most that many bytes, :meth:`feed` them: the
    result is None (more needed), the message (bytes), or :class:`Oversized`. ``limit``
    (settable before each message) bounds what is kept.
    """

    def __init__(self, framing: Framing, limit: int | None = None) -> None:
        if framing not in (SAMBA, STDLIB):
            raise ValueError(f"unknown framing {framing!r}")
        self.framing: Framing = framing
        self.limit = limit
        self._header = bytearray()
        self._header_size = 2 if framing == SAMBA else 4
        self._size: int | None = None  # the current message's, once its header is read
        self._left = 0
        self._parts: list[bytes] = []
        self._dropping = False

    @property
    def in_message(self) -> bool:
        """Whether part of a message (its header at least) has been read."""
        return bool(self._header) or self._size is not None

    @property
    def bytes_needed(self) -> int:
        if self._size is None:
            return self._header_size - len(self._header)
        return min(self._left, CHUNK)

    def feed(self, data: bytes) -> bytes | Oversized | None:
        if len(data) > self.bytes_needed or not data:
            raise ValueError(f"fed {len(data)} bytes where {self.bytes_needed} were asked for")
        if self._size is None:
            self._header += data
            if len(self._header) < self._header_size:
                return None
            size = self._parse_header()
            if size is None:  # (the stdlib's -1: the 8-byte length follows)
                return None
            self._start(size)
            return self._finish() if self._left == 0 else None
        self._left -= len(data)
        if not self._dropping:
            self._parts.append(data)
        return self._finish() if self._left == 0 else None

    def _parse_header(self) -> int | None:
        head = bytes(self._header)
        if self.framing == SAMBA:
            return int(struct.unpack("<H", head)[0])
        if len(head) == 4:
            (size,) = struct.unpack("!i", head)
            if size == -1:
                self._header_size = 12
                return None
            if size < 0:
                raise ValueError(f"a negative message length ({size}): not the stdlib's "
                                 "framing")
            return int(size)
        return int(struct.unpack("!Q", head[4:])[0])

    def _start(self, size: int) -> None:
        self._size = size
        self._left = size
        self._dropping = self.limit is not None and size > self.limit

    def _finish(self) -> bytes | Oversized:
        size, self._size = self._size, None
        assert size is not None
        self._header.clear()
        self._header_size = 2 if self.framing == SAMBA else 4
        parts, self._parts = self._parts, []
        if self._dropping:
            self._dropping = False
            assert self.limit is not None
            return Oversized(size, self.limit)
        return b"".join(parts)



def read_message(recv: Callable[[int], bytes], reader: FrameReader, limit: int | None, *,
                 closed: str, cut: str) -> bytes:
    """One whole message off a blocking stream: ``recv(n)`` (a socket's recv) driven by
    ``reader``. An end of stream is MessageLost (``closed`` between messages, ``cut``
    inside one); a message over ``limit`` is MessageTooLarge, read past and dropped, so
    the next call reads the next message; a header that is no length of ``reader``'s
    framing is ConnectionLost."""
    reader.limit = limit
    while True:
        chunk = recv(reader.bytes_needed)
        if not chunk:
            raise MessageLost(cut if reader.in_message else closed)
        try:
            got = reader.feed(chunk)
        except ValueError as e:  # (a negative length: not the stdlib's framing)
            raise ConnectionLost(f"not a message stream: {e}") from None
        if isinstance(got, Oversized):
            raise MessageTooLarge(f"bad message length: a message of {got.size} bytes "
                                  f"is over this connection's limit of {got.limit} "
                                  "(dropped)")
        if got is not None:
            return got


__all__ = [
    "CHUNK",
    "SAMBA",
    "SAMBA_MAX_MESSAGE",
    "STDLIB",
    "FrameReader",
    "MessageLost",
    "MessageNotCarried",
    "Oversized",
    "check_smb_message",
    "read_message",
    "samba_header",
    "stdlib_header",
]
