"""npipe.framing (sans I/O): Samba's 2-byte message frames and the standard library's
multiprocessing.connection framing; and the record reassembly a remote message pipe's
reader does (npipe.local.messages records, MORE for a READ that ended in
STATUS_BUFFER_OVERFLOW)."""

from __future__ import annotations

import multiprocessing.connection as mpc
import socket
import struct
import threading

import pytest

from npipe.errors import MessageTooLarge
from npipe.framing import (
    CHUNK,
    SAMBA,
    STDLIB,
    FrameReader,
    MessageNotCarried,
    Oversized,
    check_smb_message,
    samba_header,
    stdlib_header,
)
from npipe.local.messages import LAST, MORE
from npipe.smb.messages import SmbMessageSocket


def read_all(reader: FrameReader, stream: bytes, step: int = 1 << 30) -> list[bytes | Oversized]:
    """Drive the reader as a socket loop does: never more than it asks for (and at most
    ``step`` bytes at a time)."""
    out: list[bytes | Oversized] = []
    pos = 0
    while pos < len(stream):
        n = min(reader.bytes_needed, step, len(stream) - pos)
        got = reader.feed(stream[pos:pos + n])
        pos += n
        if got is not None:
            out.append(got)
    return out


def test_samba_frames_keep_boundaries_fed_byte_by_byte() -> None:
    messages = [b"a", b"x" * 1000, bytes(range(256)) * 255 + b"\x01" * 255]  # 65,535
    stream = b"".join(samba_header(len(m)) + m for m in messages)
    assert stream[:3] == b"\x01\x00a"  # little-endian length, as smbd writes it
    for step in (1, 7, 65537):
        reader = FrameReader(SAMBA)
        assert read_all(reader, stream, step) == messages
        assert not reader.in_message


def test_samba_limits_refused_before_framing() -> None:
    for size in (0, 65536, 1 << 20):
        with pytest.raises(MessageNotCarried) as e:
            samba_header(size)
        assert "Samba" in str(e.value) or "0-byte" in str(e.value)
        assert isinstance(e.value, ValueError)
    check_smb_message(65535)
    check_smb_message(1)


def test_stdlib_framing_is_the_standard_librarys() -> None:
    """What the stdlib's own Connection writes, our reader reads, and the reverse."""
    a, b = socket.socketpair()
    theirs = mpc.Connection(a.detach())
    ours_sock = b
    messages = [b"", b"1", b"z" * 70000, bytes(1 << 20)]
    sender = threading.Thread(target=lambda: [theirs.send_bytes(m) for m in messages])
    sender.start()
    reader = FrameReader(STDLIB)
    got: list[bytes | Oversized] = []
    while len(got) < len(messages):
        chunk = ours_sock.recv(reader.bytes_needed)
        assert chunk
        if (r := reader.feed(chunk)) is not None:
            got.append(r)
    sender.join()
    assert got == messages
    back = threading.Thread(target=lambda: [ours_sock.sendall(stdlib_header(len(m)) + m)
                                            for m in messages])
    back.start()  # (and back: sent from a thread, the socket's buffer being bounded)
    assert [theirs.recv_bytes() for _ in messages] == messages
    back.join()
    theirs.close()
    ours_sock.close()


def test_stdlib_long_header_over_2_gib() -> None:
    assert stdlib_header(1 << 31) == struct.pack("!iQ", -1, 1 << 31)
    reader = FrameReader(STDLIB, limit=10)
    assert reader.feed(struct.pack("!i", -1)) is None
    assert reader.bytes_needed == 8
    assert reader.feed(struct.pack("!Q", 3 << 30)) is None
    assert reader.bytes_needed == CHUNK  # dropped in pieces, never held
    left = 3 << 30
    while left:
        n = reader.bytes_needed
        got = reader.feed(b"\0" * n)
        left -= n
    assert got == Oversized(3 << 30, 10)


def test_over_limit_message_dropped_and_the_next_one_read() -> None:
    stream = stdlib_header(5000) + b"x" * 5000 + stdlib_header(3) + b"yes"
    reader = FrameReader(STDLIB, limit=1000)
    assert read_all(reader, stream, 100) == [Oversized(5000, 1000), b"yes"]


def test_bad_feeds_refused() -> None:
    reader = FrameReader(STDLIB)
    with pytest.raises(ValueError):
        reader.feed(b"12345")  # more than asked for
    with pytest.raises(ValueError, match="negative"):
        reader.feed(struct.pack("!i", -2))
    with pytest.raises(ValueError):
        FrameReader("nope")  # type: ignore[arg-type]


def test_read_parts_gathered_into_one_message() -> None:
    """A Windows server answers a long message's READs with STATUS_BUFFER_OVERFLOW until
    the last: the relay writes each as a MORE record, the last as LAST; the reader gets
    one message (and drops one over its limit, going on with the next)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn = SmbMessageSocket(ours)
    for part in (MORE + b"a" * 65536, MORE + b"b" * 65536, LAST + b"c" * 10):
        theirs.send(part)
    theirs.send(LAST + b"next")
    assert conn.recv_message(None) == b"a" * 65536 + b"b" * 65536 + b"c" * 10
    assert conn.recv_message(None) == b"next"
    for part in (MORE + b"a" * 65536, LAST + b"c"):
        theirs.send(part)
    theirs.send(LAST + b"after")
    with pytest.raises(MessageTooLarge):
        conn.recv_message(1000)
    assert conn.recv_message(1000) == b"after"
    # and what the application sends is held to Samba's limits before it is sent
    with pytest.raises(MessageNotCarried):
        conn.send_message(memoryview(b""))
    with pytest.raises(MessageNotCarried):
        conn.send_message(memoryview(b"x" * 65536))
    conn.send_message(memoryview(b"ok"))
    assert theirs.recv(100) == LAST + b"ok"  # (nothing of the refused ones)
    conn.close()
    theirs.close()
