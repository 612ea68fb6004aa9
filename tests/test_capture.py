"""The wire checker itself (tests/capture.py): it must flag garbage in an SMB stream
and must not flag a sound stream whose TCP segments dumpcap saw out of order (a veth
capture does that under load: CI once failed on it, on Wireshark 3.6)."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import pytest
from capture import check, require_tshark

CLIENT, SERVER = bytes([198, 18, 0, 2]), bytes([198, 18, 0, 1])


@pytest.fixture(autouse=True)
def _tshark() -> None:
    require_tshark()


def _frame(seq: int, payload: bytes) -> bytes:
    """An Ethernet frame: IPv4, TCP from port 40000 to 445, ``payload`` at ``seq``."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 445, seq, 1, 5 << 4, 0x18, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 1, 0, 64, 6, 0,
                     CLIENT, SERVER)
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp + payload


def _pcap(path: Path, frames: list[bytes]) -> Path:
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)
    for i, frame in enumerate(frames):
        out += struct.pack("<IIII", 1, i, len(frame), len(frame)) + frame
    path.write_bytes(out)
    return path


def _smb2(command: int, body: bytes, message_id: int) -> bytes:
    return b"\xfeSMB" + struct.pack("<HHIHHIIQIIQ16s", 64, 0, 0, command, 1, 0, 0,
                                    message_id, 0, 0, 0, b"\0" * 16) + body


def _stream() -> tuple[bytes, int]:
    """An ECHO and a 325 KiB WRITE request, NetBIOS-framed; where the WRITE starts."""
    echo = _smb2(13, struct.pack("<HH", 4, 0), 1)
    data = bytes(range(256)) * 1300
    write = _smb2(9, struct.pack("<HHIQ16sIIHHI", 49, 64 + 48, len(data), 0, b"\1" * 16,
                                 0, 0, 0, 0, 0) + data, 2)
    return b"".join(struct.pack(">I", len(m)) + m for m in (echo, write)), len(echo) + 4


def test_segments_seen_out_of_order_are_not_malformed(tmp_path: Path) -> None:
    """The pattern of the capture that failed CI: the WRITE's segments in order up to
    one, the segment after it, that one, then its first 17,376 bytes again."""
    stream, write_at = _stream()
    cuts = [0, write_at, 40000, 80000, 82000, 112000, 145000, 180000, 240000, 280000,
            len(stream)]
    segments = list(itertools.pairwise(cuts))
    late = segments[8]
    seen = [*segments[:8], segments[9], late, (late[0], late[0] + 17376)]
    path = _pcap(tmp_path / "ooo.pcap", [_frame(1 + a, stream[a:b]) for a, b in seen])
    smb2, bad = check(path)
    assert (smb2, bad) == (2, [])  # the ECHO, and the WRITE that the late segment completes


def test_garbage_in_the_stream_is_malformed(tmp_path: Path) -> None:
    """A NetBIOS session message that is not SMB between two sound ones is flagged
    (the filter looks at frames: one that also carries SMB2 would hide it)."""
    stream, write_at = _stream()
    garbage = struct.pack(">I", 64) + b"\x17" * 64
    bytes_ = stream[:write_at] + garbage + stream[write_at:]
    cuts = [0, write_at, write_at + len(garbage)]
    cuts += [*range(cuts[-1] + 60000, len(bytes_), 60000), len(bytes_)]
    path = _pcap(tmp_path / "garbage.pcap",
                 [_frame(1 + a, bytes_[a:b]) for a, b in itertools.pairwise(cuts)])
    smb2, bad = check(path)
    assert smb2 == 2 and len(bad) == 1, bad
