"""The native SMB client against real smbd configurations, and against smbprotocol.

Every dialect Samba speaks (``server max protocol`` SMB2_02 to SMB3_11; 2.x with
``allow_smb2=True``, which SMB 2 servers need since 3.x is the default), signing
mandatory, encryption required, each cipher (AES-128/256-CCM/GCM) and each signing
algorithm (HMAC-SHA256, AES-CMAC, AES-GMAC): the client must negotiate what the server
allows, and move data both ways. Differential: the same byte streams through the
native client and smbprotocol give the same bytes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import socket
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from pipe_servers import PipeServer, SmbdPool

from npipe.errors import ConfigError, ConnectionLost, HostUnreachable
from npipe.smb import get_client, open_pipe
from npipe.smb.credentials import Credentials
from npipe.smb.native import Options, connect, wire
from npipe.smb.native.negotiate import SMB_2_1
from npipe.testing.netns import require_root_and_samba

pytestmark = pytest.mark.root

USER, PASSWORD = "npt-native", "npt-native-pw-1"
CREDS = Credentials(USER, PASSWORD)
T = TypeVar("T")

# name: (smb.conf settings, dialect, security with encrypt=None, with encrypt=False)
CONFIGS: dict[str, tuple[dict[str, str], str, str, str]] = {
    "smb2_02": ({"server max protocol": "SMB2_02"}, "2.0.2",
                "signed (HMAC-SHA256)", "signed (HMAC-SHA256)"),
    "smb2_10": ({"server max protocol": "SMB2_10"}, "2.1",
                "signed (HMAC-SHA256)", "signed (HMAC-SHA256)"),
    "smb3_00": ({"server max protocol": "SMB3_00"}, "3.0",
                "encrypted (AES-128-CCM)", "signed (AES-CMAC)"),
    "smb3_02": ({"server max protocol": "SMB3_02"}, "3.0.2",
                "encrypted (AES-128-CCM)", "signed (AES-CMAC)"),
    "smb3_11": ({}, "3.1.1", "encrypted (AES-128-GCM)", "signed (AES-GMAC)"),
    "signing-mandatory": ({"server signing": "mandatory"}, "3.1.1",
                          "encrypted (AES-128-GCM)", "signed (AES-GMAC)"),
    "encrypt-required-ccm": (
        {"server smb encrypt": "required",
         "server smb3 encryption algorithms": "AES-128-CCM"},
        "3.1.1", "encrypted (AES-128-CCM)", "encrypted (AES-128-CCM)"),
    "encrypt-required-gcm": (
        {"server smb encrypt": "required",
         "server smb3 encryption algorithms": "AES-128-GCM"},
        "3.1.1", "encrypted (AES-128-GCM)", "encrypted (AES-128-GCM)"),
    "aes-256-gcm": ({"server smb3 encryption algorithms": "AES-256-GCM"}, "3.1.1",
                    "encrypted (AES-256-GCM)", "signed (AES-GMAC)"),
    "aes-256-ccm": ({"server smb3 encryption algorithms": "AES-256-CCM"}, "3.1.1",
                    "encrypted (AES-256-CCM)", "signed (AES-GMAC)"),
    "cmac": ({"server smb3 signing algorithms": "AES-128-CMAC"}, "3.1.1",
             "encrypted (AES-128-GCM)", "signed (AES-CMAC)"),
    "hmac-on-311": ({"server smb3 signing algorithms": "HMAC-SHA256"}, "3.1.1",
                    "encrypted (AES-128-GCM)", "signed (HMAC-SHA256)"),
}


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 120))


@pytest.fixture(scope="module")
def servers() -> Iterator[SmbdPool]:
    require_root_and_samba()
    s = SmbdPool({k: v[0] for k, v in CONFIGS.items()}, {USER: PASSWORD}, prefix="npnat")
    try:
        yield s
    finally:
        for name in ("native", "smbprotocol"):
            get_client(name).close_connections()
        s.close()


async def _echo_sizes(
    address: str, encrypt: bool | None, allow_smb2: bool = False
) -> tuple[str, str]:
    reader, writer = await open_pipe(address, credentials=CREDS, encrypt=encrypt,
                                     backend="native", allow_smb2=allow_smb2)
    try:
        for size in (1, 64, 65535, 65536, 200_000, 1 << 20):
            data = os.urandom(size)
            writer.write(data)
            await writer.drain()
            assert await reader.readexactly(size) == data, size
        return writer.get_extra_info("smb_dialect"), writer.get_extra_info("smb_security")
    finally:
        writer.close()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_dialects_ciphers_and_signing(servers: SmbdPool, config: str) -> None:
    _settings, dialect, default, signed_only = CONFIGS[config]
    address = servers.address(config)
    smb2 = dialect.startswith("2.")
    if smb2:
        with pytest.raises(ConfigError, match="allow_smb2=True"):
            run(_echo_sizes(address, None))
    assert run(_echo_sizes(address, None, smb2)) == (dialect, default)
    assert run(_echo_sizes(address, False, smb2)) == (dialect, signed_only)
    if not default.startswith("encrypted"):
        with pytest.raises(ConfigError, match="cannot encrypt"):
            run(_echo_sizes(address, True, smb2))


def test_unsigned_when_the_server_allows_it(servers: SmbdPool) -> None:
    """Only benchmarks ask for it: SMB 2.1 without signing against a server that does
    not require it; a server that requires signing gets it anyway."""
    host, port = "127.0.0.1", int(servers.address("smb2_10").split(":")[1].split("/")[0])

    async def main() -> str:
        link = await connect(host, port, credentials=CREDS, encrypt=False,
                             options=Options(sign=False, dialects=(SMB_2_1,)),
                             allow_smb2=True)
        try:
            await link.echo()
            return link.security
        finally:
            await link.close()

    assert run(main()) == "unsigned"
    port = int(servers.address("signing-mandatory").split(":")[1].split("/")[0])
    port_security = run(_security_of(host, port))
    assert port_security == "signed (HMAC-SHA256)"


async def _security_of(host: str, port: int) -> str:
    link = await connect(host, port, credentials=CREDS, encrypt=False,
                         options=Options(sign=False, dialects=(SMB_2_1,)), allow_smb2=True)
    try:
        await link.echo()
        return link.security
    finally:
        await link.close()


def test_many_reads_in_flight_for_a_stream(servers: SmbdPool) -> None:
    """A bulk stream grows the READs in flight (Samba returns <= 64 KiB per READ);
    a quiet pipe keeps one posted."""

    async def main() -> tuple[int, int]:
        reader, writer = await open_pipe(servers.address("smb3_11"), credentials=CREDS,
                                         backend="native")
        pipe: Any = writer.transport
        quiet = pipe._window
        data = os.urandom(8 << 20)
        writer.write(data)
        got = await reader.readexactly(len(data))
        assert got == data
        busy = pipe._window
        writer.close()
        return quiet, busy

    quiet, busy = run(main())
    assert quiet == 1 and busy >= 8


def test_a_full_read_asks_for_more_before_handing_on_its_data(
    servers: SmbdPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A READ that comes back full means more is waiting: the next READ goes out before
    the protocol gets the data, so that its round trip overlaps the protocol's work
    (posted a loop turn later, it cost a 64 KiB echo ~75 us of ~600)."""
    from npipe.smb.native import connection as connection_module
    from npipe.smb.native import pipe as pipe_module

    events: list[tuple[str, int]] = []
    dispatch = connection_module.SmbConnection._dispatch
    build = pipe_module._ReadSlot.build

    def dispatching(self: Any, responses: list[Any]) -> None:
        for r in responses:
            if r.command == wire.READ and r.status == wire.STATUS_SUCCESS:
                events.append(("answer", len(r.message)))
        dispatch(self, responses)

    def building(self: Any) -> Any:
        events.append(("read sent", 0))
        return build(self)

    monkeypatch.setattr(connection_module.SmbConnection, "_dispatch", dispatching)
    monkeypatch.setattr(pipe_module._ReadSlot, "build", building)

    async def main() -> None:
        reader, writer = await open_pipe(servers.address("smb3_11"), credentials=CREDS,
                                         backend="native")
        protocol: Any = writer.transport.get_protocol()
        received = protocol.data_received

        def data_received(data: bytes) -> None:
            events.append(("data", len(data)))
            received(data)

        protocol.data_received = data_received
        for _ in range(5):
            data = os.urandom(65536 * 3)
            writer.write(data)
            assert await reader.readexactly(len(data)) == data
        writer.close()

    run(main())
    full = [i for i, (kind, size) in enumerate(events) if kind == "data" and size >= 65535]
    assert len(full) >= 10, events
    for i in full:
        answered = max(j for j in range(i) if events[j][0] == "answer")
        assert ("read sent", 0) in events[answered:i], (i, events[answered - 3:i + 3])


def test_closing_pipes_leaves_nothing_waiting(servers: SmbdPool) -> None:
    """Samba never answers the READ a closed pipe leaves pending: the client forgets it
    rather than keeping it (and its callback) for the connection's lifetime."""

    async def main() -> tuple[int, int]:
        address = servers.address("smb3_11")
        for _ in range(30):
            reader, writer = await open_pipe(address, credentials=CREDS, backend="native")
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            writer.close()
            await writer.wait_closed()
        reader, writer = await open_pipe(address, credentials=CREDS, backend="native")
        link: Any = writer.transport.link  # type: ignore[attr-defined]
        waiting = len(link._waiting)
        writer.close()
        await writer.wait_closed()
        return waiting, len(link.pipes)

    waiting, pipes = run(main())
    assert waiting <= 2 and pipes == 0


# --- differential: the same streams through both backends --------------------------------


async def _stream_through(backend: str, address: str, seed: int) -> bytes:
    """Random writes (1 byte to 300 KB, drained or not) while a reader takes what comes
    back in random amounts; the bytes are the same for every backend."""
    data_rng = random.Random(seed)
    rng = random.Random(seed + 1000)
    chunks = [data_rng.randbytes(data_rng.choice([1, 17, 4096, 65535, 65537, 300_000]))
              for _ in range(40)]
    total = sum(len(c) for c in chunks)
    reader, writer = await open_pipe(address, credentials=CREDS, backend=backend,
                                     allow_smb2=True)  # smb2_10 too

    async def read_all() -> bytes:
        got = bytearray()
        while len(got) < total:
            got += await reader.read(rng.choice([1, 100, 1 << 16, 1 << 20]))
        return bytes(got)

    try:
        reading = asyncio.ensure_future(read_all())
        for chunk in chunks:
            writer.write(chunk)
            if rng.random() < 0.5:
                await writer.drain()
        got = await reading
        assert got == b"".join(chunks)
        return got
    finally:
        writer.close()


@pytest.mark.parametrize("config", ["smb2_10", "smb3_02", "smb3_11"])
def test_both_backends_carry_the_same_bytes(servers: SmbdPool, config: str) -> None:
    address = servers.address(config)
    for seed in (1, 2):
        native = run(_stream_through("native", address, seed))
        reference = run(_stream_through("smbprotocol", address, seed))
        assert native == reference


def test_both_backends_see_a_server_that_closes(servers: SmbdPool) -> None:
    """A pipe server that answers and closes: both backends read the answer, then EOF."""
    smbd, _echo = servers.running.get("smb3_11") or (None, None)
    if smbd is None:
        servers.address("smb3_11")
        smbd, _echo = servers.running["smb3_11"]

    def answer_and_close(conn: socket.socket, data: bytes) -> None:
        conn.sendall(b"bye")
        # Linger until the client has read (Samba drops unread data of a closed pipe).
        conn.settimeout(2)
        with contextlib.suppress(OSError):
            conn.recv(1)

    server = PipeServer(smbd.np_dir, "closer", answer_and_close)
    try:
        address = f"//127.0.0.1:{smbd.port}/pipe/closer"

        async def main(backend: str) -> bytes:
            reader, writer = await open_pipe(address, credentials=CREDS, backend=backend)
            answer = await reader.readexactly(3)
            writer.write(b"k")
            try:
                rest = await asyncio.wait_for(reader.read(), 10)
            except ConnectionLost:
                rest = b"<lost>"
            writer.close()
            return answer + rest

        assert run(main("native")) == run(main("smbprotocol")) == b"bye"
    finally:
        server.close()


def test_pipe_churn_moves_to_a_fresh_connection(
    servers: SmbdPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each closed pipe may leave a READ Samba never answers (and keeps in smbd):
    after ABANDONED_READS_LIMIT of them new pipes go to a new connection, and the old
    one is closed once its pipes are, which frees smbd's memory."""
    from npipe.smb.native import connection as connection_module

    monkeypatch.setattr(connection_module, "ABANDONED_READS_LIMIT", 20)

    async def main() -> list[Any]:
        address = servers.address("smb3_11")
        links = []
        for _ in range(50):
            reader, writer = await open_pipe(address, credentials=CREDS, backend="native")
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            await asyncio.sleep(0.01)  # the next READ goes out, and stays pending
            link = writer.transport.link  # type: ignore[attr-defined]
            if link not in links:
                links.append(link)
            writer.close()
            await writer.wait_closed()
        await asyncio.sleep(0.2)  # the retired connection's LOGOFF and close
        return links

    links = run(main())
    assert len(links) == 3
    assert [link.alive for link in links[:2]] == [False, False]


def test_transceive_and_peek(servers: SmbdPool) -> None:
    """FSCTL_PIPE_TRANSCEIVE (a write and its answer in one round trip) works on Samba;
    FSCTL_PIPE_PEEK is not implemented there and says so."""
    port = int(servers.address("smb3_11").split(":")[1].split("/")[0])

    async def main() -> tuple[bytes, bool]:
        link = await connect("127.0.0.1", port, credentials=CREDS)
        try:
            created = await link.request(wire.CREATE, wire.create_request("echo"))
            assert created.status == 0
            file_id = wire.parse_create(created.message)
            answer = await link.transceive(file_id, b"over and out")
            with pytest.raises(NotImplementedError, match="FSCTL_PIPE_PEEK"):
                await link.peek(file_id)
            await link.request(wire.CLOSE, wire.close_request(file_id))
            return answer
        finally:
            await link.close()

    assert run(main()) == (b"over and out", False)


def test_request_and_answer_in_one_exchange(
    servers: SmbdPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that finds the pipe quiet goes out as FSCTL_PIPE_TRANSCEIVE (the answer
    in the same exchange); bulk data still flows as WRITEs and READs."""
    from npipe.smb.native import connection as connection_module

    seen: list[int] = []
    dispatch = connection_module.SmbConnection._dispatch

    def counting(self: Any, responses: list[Any]) -> None:
        seen.extend(r.command for r in responses)
        dispatch(self, responses)

    monkeypatch.setattr(connection_module.SmbConnection, "_dispatch", counting)

    async def main() -> None:
        reader, writer = await open_pipe(servers.address("smb3_11"), credentials=CREDS,
                                         backend="native")
        writer.write(b"first")
        assert await reader.readexactly(5) == b"first"
        seen.clear()
        for i in range(20):
            writer.write(b"ping %d" % i)
            assert await reader.readexactly(len(b"ping %d" % i)) == b"ping %d" % i
        assert seen.count(wire.IOCTL) >= 18 and seen.count(wire.WRITE) <= 2, seen
        big = os.urandom(3 << 20)
        writer.write(big)
        assert await reader.readexactly(len(big)) == big
        assert seen.count(wire.READ) > 10 and seen.count(wire.WRITE) >= 3
        writer.close()

    run(main())


def test_server_data_after_a_quiet_spell_still_arrives(servers: SmbdPool) -> None:
    """After an answer the next READ waits a moment (for a TRANSCEIVE); what the server
    sends unasked later is still read at once."""
    smbd, _echo = servers.running.get("smb3_11") or (None, None)
    if smbd is None:
        servers.address("smb3_11")
        smbd, _echo = servers.running["smb3_11"]

    def answer_then_push(conn: socket.socket, data: bytes) -> None:
        while len(data) < 3:
            data += conn.recv(10)
        conn.sendall(b"ack")
        import time

        time.sleep(0.2)
        conn.sendall(b"pushed")
        conn.settimeout(5)
        with contextlib.suppress(OSError):
            conn.recv(1)

    server = PipeServer(smbd.np_dir, "pusher", answer_then_push)
    try:
        async def main() -> float:
            reader, writer = await open_pipe(f"//127.0.0.1:{smbd.port}/pipe/pusher",
                                             credentials=CREDS, backend="native")
            writer.write(b"req")
            assert await reader.readexactly(3) == b"ack"
            loop = asyncio.get_running_loop()
            start = loop.time()
            assert await asyncio.wait_for(reader.readexactly(6), 5) == b"pushed"
            waited = loop.time() - start
            writer.close()
            return waited

        assert run(main()) < 1.0  # 0.2 s of the server's, plus a READ round trip
    finally:
        server.close()


def test_a_server_that_closes_on_a_transceive_ends_the_stream(
    servers: SmbdPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request goes as a TRANSCEIVE and the server closes instead of answering:
    Samba says CONNECTION_DISCONNECTED, which is the end of the stream (not an error)."""
    from npipe.smb.native import pipe as pipe_module

    # The greeting is data the client did not ask for: wait after it too, so that the
    # request finds the pipe quiet.
    monkeypatch.setattr(pipe_module, "QUIET_READ_AFTER_PUSH", True)
    monkeypatch.setattr(pipe_module, "QUIET_READ_DELAY", 5.0)
    servers.address("smb3_11")
    smbd, _echo = servers.running["smb3_11"]

    def greet_then_close(conn: socket.socket, data: bytes) -> None:
        import time

        time.sleep(0.2)  # a posted READ takes the greeting, not the one sent with CREATE
        conn.sendall(b"bye")
        conn.recv(1)  # the client's request, then close without an answer

    server = PipeServer(smbd.np_dir, "slammer", greet_then_close)
    try:
        async def main() -> bytes:
            reader, writer = await open_pipe(f"//127.0.0.1:{smbd.port}/pipe/slammer",
                                             credentials=CREDS, backend="native")
            assert await reader.readexactly(3) == b"bye"
            writer.write(b"k")  # the pipe is quiet: a TRANSCEIVE
            assert writer.transport._transceives  # type: ignore[attr-defined]
            rest = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return rest

        assert run(main()) == b""
    finally:
        server.close()


def test_no_wait_before_the_read_after_pushed_data(
    servers: SmbdPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The READ after an answer to a write waits QUIET_READ_DELAY (for a TRANSCEIVE);
    the READ after data the server pushed unasked goes out at once (bench/server_push.py:
    the wait delayed every message pushed within 1 ms of the one before)."""
    from npipe.smb.native import pipe as pipe_module

    monkeypatch.setattr(pipe_module, "QUIET_READ_DELAY", 0.5)
    servers.address("smb3_11")
    smbd, _echo = servers.running["smb3_11"]

    def answer_then_push(conn: socket.socket, data: bytes) -> None:
        while len(data) < 3:
            data += conn.recv(10)
        conn.sendall(b"ack")
        import time

        for i in range(3):
            time.sleep(0.05)
            conn.sendall(b"m%d" % i)
        conn.settimeout(5)
        with contextlib.suppress(OSError):
            conn.recv(1)

    server = PipeServer(smbd.np_dir, "pusher2", answer_then_push)
    try:
        async def main() -> list[bool]:
            reader, writer = await open_pipe(f"//127.0.0.1:{smbd.port}/pipe/pusher2",
                                             credentials=CREDS, backend="native")
            pipe: Any = writer.transport
            writer.write(b"req")
            assert await asyncio.wait_for(reader.readexactly(3), 5) == b"ack"
            waits = [pipe._read_timer is not None]
            for i in range(3):
                assert await asyncio.wait_for(reader.readexactly(2), 5) == b"m%d" % i
                waits.append(pipe._read_timer is not None)
            writer.close()
            await writer.wait_closed()
            return waits

        assert run(main()) == [True, False, False, False]
    finally:
        server.close()


def test_establish_applies_its_timeout_once() -> None:
    """A slow TCP connect and a server that never answers NEGOTIATE: the whole setup
    fails within the timeout, not after the connect's time plus the timeout again."""
    from npipe.smb.native.connection import SmbConnection

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    real = SmbConnection._connect

    async def slow_connect(self: SmbConnection, loop: asyncio.AbstractEventLoop) -> None:
        await asyncio.sleep(0.7)
        await real(self, loop)

    async def main() -> float:
        link = SmbConnection("127.0.0.1", port)
        link._connect = functools.partial(slow_connect, link)  # type: ignore[method-assign]
        start = time.monotonic()
        with pytest.raises(HostUnreachable):
            await link.establish(Credentials("u", "p"), None, 1.0)
        return time.monotonic() - start

    try:
        took = asyncio.run(main())
    finally:
        listener.close()
    assert took < 1.3, took
