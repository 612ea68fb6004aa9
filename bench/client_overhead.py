#!/usr/bin/env python3
"""What the native SMB client itself costs per pipe round trip, with no network and no
server: canned, correctly signed (or encrypted) WRITE and READ responses are fed straight
into the connection, so the time measured is only the client's (building, signing or
encrypting its two requests, checking the two responses, the asyncio transport and the
StreamReader). This is the part of a cross-host round trip npipe controls; the rest is
the wire and smbd (see bench/cross_host.py).

    python bench/client_overhead.py            # 5 rounds of 5,000 round trips per mode
    python bench/client_overhead.py --rounds 1 --calls 500
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import struct
import time
from collections.abc import Iterator

from npipe.smb.native import crypto, wire
from npipe.smb.native.connection import SmbConnection
from npipe.smb.native.negotiate import SMB_3_1_1, Negotiated
from npipe.smb.native.pipe import RemotePipe

SESSION, TREE = 7, 1
READ_ANSWER = struct.pack("<HBBIII", 17, 80, 0, 64, 0, 0) + b"y" * 64
WRITE_ANSWER = struct.pack("<HHII", 17, 0, 64, 0) + bytes(8)


class _Capture(asyncio.Transport):
    """Stands in for the TCP connection: keeps what the client sends."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return False


class _Server:
    """Answers like smbd would, with the session's keys (sign or encrypt)."""

    def __init__(self, key: bytes, encrypt: bool) -> None:
        self.signer = crypto.Signer(crypto.AES_GMAC, key)
        self.cipher = crypto.Cipher(crypto.AES_128_GCM, key, key) if encrypt else None

    def requests(self, chunks: list[bytes]) -> Iterator[tuple[int, int]]:
        """(command, message id) of each request the client sent."""
        for chunk in chunks:
            pos = 0
            while pos < len(chunk):
                size = int.from_bytes(chunk[pos : pos + 4], "big")
                message = chunk[pos + 4 : pos + 4 + size]
                pos += 4 + size
                if self.cipher is not None:
                    message = self.cipher.decrypt(message, SESSION)  # same key both ways here
                fields = wire.HEADER.unpack_from(message)
                yield fields[4], fields[8]

    def answer(self, command: int, message_id: int, body: bytes) -> bytes:
        flags = wire.FLAGS_SERVER_TO_REDIR
        if self.cipher is None:
            flags |= wire.FLAGS_SIGNED
        header = wire.HEADER.pack(wire.PROTOCOL_SMB2, 64, 1, 0, command, 1, flags, 0,
                                  message_id, 0, TREE, SESSION, bytes(16))
        message = bytearray(header + body)
        if self.cipher is not None:
            return b"".join(bytes(p) for p in self.cipher.encrypt(bytes(message), SESSION))
        self.signer.sign(message)
        return len(message).to_bytes(4, "big") + bytes(message)


def _link(key: bytes, encrypt: bool) -> SmbConnection:
    link = SmbConnection("bench", 445)
    core = link.core
    core.negotiated = Negotiated(SMB_3_1_1, 1, 0x44, 1 << 20, 1 << 20, 1 << 20, b"",
                                 crypto.AES_128_GCM, crypto.AES_GMAC)
    core._large_mtu = True
    core.credits = 1000
    core.session_id, core.tree_id = SESSION, TREE
    core.signer = crypto.Signer(crypto.AES_GMAC, key)
    core.sign = True
    if encrypt:
        core.cipher = crypto.Cipher(crypto.AES_128_GCM, key, key)
        core.encrypt = True
    link.transport = _Capture()
    link._loop = asyncio.get_running_loop()
    return link


async def _measure(encrypt: bool, calls: int) -> tuple[float, float]:
    """(client us per round trip, fake server us per round trip)."""
    key = os.urandom(16)
    link = _link(key, encrypt)
    server = _Server(key, encrypt)
    transport = link.transport
    assert isinstance(transport, _Capture)
    loop = asyncio.get_running_loop()
    pipe = RemotePipe(link, os.urandom(16), "bench")
    reader = asyncio.StreamReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    pipe.set_protocol(protocol)
    pipe.start()
    writer = asyncio.StreamWriter(pipe, protocol, reader, loop)
    reads = [mid for cmd, mid in server.requests(transport.sent) if cmd == wire.READ]
    transport.sent = []
    serving = 0.0

    async def round_trip() -> None:
        nonlocal serving
        writer.write(b"x" * 64)
        sent, transport.sent = transport.sent, []
        t0 = time.perf_counter()
        answers = []
        for command, mid in server.requests(sent):
            if command == wire.WRITE:
                answers.append(server.answer(wire.WRITE, mid, WRITE_ANSWER))
            elif command == wire.READ:
                reads.append(mid)
        answers.append(server.answer(wire.READ, reads.pop(0), READ_ANSWER))
        serving += time.perf_counter() - t0
        for answer in answers:
            link.data_received(answer)
        await reader.readexactly(64)

    for _ in range(200):
        await round_trip()
    serving = 0.0
    start = time.perf_counter()
    for _ in range(calls):
        await round_trip()
    total = time.perf_counter() - start
    return (total - serving) / calls * 1e6, serving / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    print(f"native client CPU per 64-byte pipe round trip (median of {args.rounds} rounds "
          f"of {args.calls}); no network, no smbd")
    for label, encrypt in (("signed (AES-GMAC)", False), ("encrypted (AES-128-GCM)", True)):
        runs = [asyncio.run(_measure(encrypt, args.calls)) for _ in range(args.rounds)]
        client = statistics.median(r[0] for r in runs)
        print(f"  {label:26} {client:6.1f} us  (2 requests built, 2 responses checked, "
              "StreamReader wake-up)")


if __name__ == "__main__":
    main()
