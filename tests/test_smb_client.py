"""The remote pipe client (npipe.smb, every backend) against a real private smbd.

Each smbd listens on loopback on a free port with its own directories; pipe servers are
raw Unix listeners placed in smbd's ``<ncalrpc dir>/np/`` that answer the
named_pipe_auth handshake with ``npipe.samba.npa``. Needs root and Samba's smbd:
without them these tests skip, or fail when CI=true.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import pytest
from capture import Capture, have_tshark, require_tshark, stop_all
from pipe_servers import Handler, PipeServer, echo

from npipe.errors import (
    AccessDenied,
    AddressError,
    AuthenticationError,
    ConfigError,
    ConnectionLost,
    HostUnreachable,
    PipeNotFound,
)
from npipe.local.paths import pipe_dir
from npipe.samba.npa import NpaRequestReader
from npipe.samba.smbd import PrivateSmbd, ensure_unix_user
from npipe.smb import BACKENDS, ENV_BACKEND, get_client, open_pipe
from npipe.smb.credentials import Credentials
from npipe.smb.info import SmbConnectionInfo
from npipe.unix_bridge import bridge_for, close_bridges

pytestmark = pytest.mark.root

USER = "npt-client"
PASSWORD = "npt-client-pw-1"
OTHER_USER = "npt-other"
CREDS = Credentials(USER, PASSWORD)

T = TypeVar("T")


def _require_smbd() -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "needs root to run smbd and serve pipes in its np/ directory"
    elif shutil.which("smbd") is None or shutil.which("smbpasswd") is None:
        reason = "needs Samba (smbd, smbpasswd)"
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true, so this must not be skipped", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Smbd(PrivateSmbd):
    """A private smbd on loopback (``lo``) on a free port, in a directory of its own."""

    def __init__(self, extra: dict[str, str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="npsmb", dir="/tmp"))
        super().__init__(self.dir, port=_free_port(), users={USER: PASSWORD}, extra=extra)

    def address(self, name: str) -> str:
        return f"//127.0.0.1:{self.port}/pipe/{name}"

    def close(self) -> None:
        """Stop smbd (with every process it started) and remove its directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def connection_pids(self) -> list[int]:
        """The smbd children serving established TCP connections (one per connection)."""
        out = subprocess.run(
            ["ss", "-Htnp", "state", "established", f"( sport = :{self.port} )"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        pids = set()
        for line in out.splitlines():
            for part in line.split("pid=")[1:]:
                pids.add(int(part.split(",")[0]))
        return sorted(pids)

    def established(self) -> int:
        out = subprocess.run(
            ["ss", "-Htn", "state", "established", f"( dport = :{self.port} )"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return len(out.splitlines())


@contextlib.contextmanager
def _running_smbd(extra: dict[str, str]) -> Iterator[Smbd]:
    _require_smbd()
    smbd = Smbd(extra)
    try:
        with _captured(smbd):
            smbd.start()
            yield smbd
    finally:
        smbd.close()


# Each smbd's traffic, checked by test_no_malformed_smb_on_the_wire (when tshark is here).
_CAPTURES: list[Capture] = []


@contextlib.contextmanager
def _captured(smbd: Smbd) -> Iterator[None]:
    if not have_tshark():
        yield
        return
    cap = Capture(None, "lo", smbd.dir / "smb.pcap", ports=(smbd.port,),
                  nt_password=PASSWORD).start()
    _CAPTURES.append(cap)
    try:
        yield
    finally:
        _CAPTURES.remove(cap)
        cap.stop(settle=False)


@pytest.fixture(scope="module", params=BACKENDS, autouse=True)
def smb_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs once per backend (chosen through $NPIPE_SMB_BACKEND)."""
    old = os.environ.get(ENV_BACKEND)
    os.environ[ENV_BACKEND] = request.param
    yield request.param
    _close_connections()
    if old is None:
        os.environ.pop(ENV_BACKEND, None)
    else:
        os.environ[ENV_BACKEND] = old


def _close_connections() -> None:
    """This process's connections, and those of the redirector that relays its bridges'
    and blocking callers' pipes (npipe.redirector)."""
    import npipe.redirector

    for name in BACKENDS:
        get_client(name).close_connections()
        npipe.redirector.close_connections(name)


@pytest.fixture(scope="module")
def smbd() -> Iterator[Smbd]:
    with _running_smbd({}) as s:
        yield s
        _close_connections()
        close_bridges()


@pytest.fixture(scope="module")
def strict_smbd() -> Iterator[Smbd]:
    with _running_smbd({"server signing": "mandatory", "smb encrypt": "required"}) as s:
        yield s
        _close_connections()


@pytest.fixture(scope="module")
def smb2_smbd() -> Iterator[Smbd]:
    with _running_smbd({"server max protocol": "SMB2_10"}) as s:
        yield s
        _close_connections()


# --- pipe servers in np/ --------------------------------------------------------------


def linger(conn: socket.socket) -> None:
    """Wait for the client to close: Samba drops pipe data the client has not READ yet
    when the server closes first."""
    conn.settimeout(30)
    with contextlib.suppress(OSError):
        while conn.recv(65536):
            pass


def answer_after(total: int) -> Handler:
    """Send nothing until ``total`` bytes came in; then say how many."""

    def handler(conn: socket.socket, data: bytes) -> None:
        got = len(data)
        while got < total:
            chunk = conn.recv(1 << 20)
            if not chunk:
                return
            got += len(chunk)
        conn.sendall(b"got %d" % got)
        linger(conn)

    return handler


def refuse(conn: socket.socket, data: bytes) -> None:
    """As npipe's front door refuses: read smbd's whole request, close without a reply."""
    reader = NpaRequestReader()
    while (chunk := conn.recv(reader.bytes_needed)) and reader.feed(chunk) is None:
        pass
    conn.close()


def slam(conn: socket.socket, data: bytes) -> None:
    """Close once smbd's request has come, unread (as a server dying with it does)."""
    select.select([conn], [], [], 10)
    conn.close()


def partial_then_close(conn: socket.socket, data: bytes) -> None:
    conn.sendall(b"partial")
    time.sleep(0.3)  # let the client READ it before the end (see linger)


@pytest.fixture
def serve(smbd: Smbd) -> Iterator[Callable[..., PipeServer]]:
    servers: list[PipeServer] = []

    def make(name: str, handler: Handler, *, on: Smbd = smbd, handshake: bool = True) -> PipeServer:
        server = PipeServer(on.np_dir, name, handler, handshake)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def _echo_roundtrip(address: str, payload: bytes, encrypt: bool | None = None,
                          allow_smb2: bool = False) -> bytes:
    reader, writer = await open_pipe(address, credentials=CREDS, encrypt=encrypt,
                                     allow_smb2=allow_smb2)
    try:
        # Read while writing: an echo of more than the buffers hold deadlocks otherwise.
        echoed = asyncio.ensure_future(reader.readexactly(len(payload)))
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(echoed, 30)
    finally:
        writer.close()
        await writer.wait_closed()


def _link_info(smbd: Smbd) -> SmbConnectionInfo:
    """The newest connection to this smbd (the native backend's die with their event
    loop, so the one a finished ``run()`` used is no longer alive)."""
    infos = [c for c in get_client().connections() if c.port == smbd.port]
    assert infos, "no connection to this smbd"
    return infos[-1]


# --- data -----------------------------------------------------------------------------


def test_echo_small_and_large(smbd: Smbd, serve: Callable[..., PipeServer]) -> None:
    serve("echo", echo)
    payload = os.urandom(8 << 20)

    async def main() -> None:
        assert await _echo_roundtrip(smbd.address("echo"), b"hello") == b"hello"
        assert await _echo_roundtrip(smbd.address("ECHO"), payload) == payload  # names fold

    run(main())


def test_full_duplex_write_while_read_pending(smbd: Smbd, serve: Callable[..., PipeServer]) -> None:
    """The server answers only after 1 MiB came in; the client's READ is posted first.

    If a WRITE waited for the pending READ this would deadlock (and time out)."""
    total = 1 << 20
    serve("duplex", answer_after(total))

    async def main() -> bytes:
        reader, writer = await open_pipe(smbd.address("duplex"), credentials=CREDS)
        try:
            await asyncio.sleep(0.2)  # the relay's READ is posted and pending by now
            writer.write(os.urandom(total))
            await writer.drain()
            return await asyncio.wait_for(reader.read(100), 10)
        finally:
            writer.close()
            await writer.wait_closed()

    assert run(main()) == b"got %d" % total


def test_twenty_pipes_share_one_connection(smbd: Smbd, serve: Callable[..., PipeServer]) -> None:
    serve("many", echo)
    _close_connections()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> bool:
        payload = b"%d-" % i * 5000
        writer.write(payload)
        await writer.drain()
        ok = await asyncio.wait_for(reader.readexactly(len(payload)), 20) == payload
        return ok

    async def main() -> None:
        streams = await asyncio.gather(
            *(open_pipe(smbd.address("many"), credentials=CREDS) for _ in range(20))
        )
        try:
            results = await asyncio.gather(*(one(r, w, i) for i, (r, w) in enumerate(streams)))
            assert all(results)
            live = [c for c in get_client().connections() if c.port == smbd.port and c.alive]
            assert len(live) == 1 and live[0].pipes == 20
            assert smbd.established() == 1
        finally:
            for _, writer in streams:
                writer.close()

    run(main())


def test_server_closing_mid_stream_ends_the_reader(
    smbd: Smbd, serve: Callable[..., PipeServer]
) -> None:
    serve("partial", partial_then_close)

    async def main() -> bytes:
        reader, writer = await open_pipe(smbd.address("partial"), credentials=CREDS)
        try:
            return await asyncio.wait_for(reader.read(), 10)  # to EOF
        finally:
            writer.close()

    assert run(main()) == b"partial"


def test_lost_connection_ends_the_stream(
    smbd: Smbd, serve: Callable[..., PipeServer], caplog: pytest.LogCaptureFixture,
    smb_backend: str,
) -> None:
    serve("lost", echo)
    caplog.set_level(logging.WARNING, logger="npipe.smb")

    async def main() -> None:
        reader, writer = await open_pipe(smbd.address("lost"), credentials=CREDS)
        try:
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            for pid in smbd.connection_pids():  # the smbd child serving our connection
                os.kill(pid, signal.SIGKILL)
            if smb_backend == "native":
                # The native client's streams fail with the cause.
                with pytest.raises(ConnectionLost, match="was lost"):
                    await asyncio.wait_for(reader.read(), 10)
            else:  # smbprotocol's relay (a socket pair) can only end the stream
                assert await asyncio.wait_for(reader.read(), 10) == b""
        finally:
            writer.close()
        # The dead connection is replaced on the next open.
        assert await _echo_roundtrip(smbd.address("lost"), b"again") == b"again"

    run(main())
    assert "was lost" in caplog.text


# --- opening: retries and errors ------------------------------------------------------


def test_unknown_pipe_is_retried_for_a_short_grace_only(smbd: Smbd) -> None:
    """About 1 s (npipe.smb.retry.MISSING_GRACE), not the whole timeout."""
    async def main() -> list[SmbConnectionInfo]:
        with pytest.raises(PipeNotFound, match="nowhere"):
            await open_pipe(smbd.address("nowhere"), credentials=CREDS, timeout=10.0)
        return get_client().connections()  # while this loop (and its connections) lives

    start = time.monotonic()
    links = run(main())
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 2.5
    # Samba has no FSCTL_PIPE_WAIT: asked once, remembered for the connection.
    assert any(link.port == smbd.port and not link.pipe_wait for link in links), links


def test_pipe_that_appears_later_is_found(smbd: Smbd, serve: Callable[..., PipeServer]) -> None:
    async def main() -> float:
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, lambda: serve("late", echo))
        reader, writer = await open_pipe(smbd.address("late"), credentials=CREDS, timeout=5)
        elapsed = time.monotonic() - start
        writer.write(b"late")
        assert await reader.readexactly(4) == b"late"
        writer.close()
        return elapsed

    assert 0.5 <= run(main()) < 4


def test_a_server_that_closes_without_answering_refuses(
    smbd: Smbd, serve: Callable[..., PipeServer]
) -> None:
    server = serve("closed", refuse, handshake=False)
    with pytest.raises(AccessDenied, match="refused"):
        run(open_pipe(smbd.address("closed"), credentials=CREDS, timeout=3))
    assert server.accepted >= 1


def test_a_server_that_closes_without_reading_is_not_called_a_refusal(
    smbd: Smbd, serve: Callable[..., PipeServer]
) -> None:
    """smbd answers STATUS_CONNECTION_RESET: a refusal or a failure, nobody can tell."""
    serve("slammed", slam, handshake=False)
    with pytest.raises(ConnectionLost, match="failed, or refused you"):
        run(open_pipe(smbd.address("slammed"), credentials=CREDS, timeout=3))


def test_wrong_password_is_an_authentication_error(smbd: Smbd) -> None:
    bad = Credentials(USER, "not-the-password")
    with pytest.raises(AuthenticationError) as info:
        run(open_pipe(smbd.address("echo"), credentials=bad, timeout=5))
    message = str(info.value)
    assert USER in message and f"127.0.0.1:{smbd.port}" in message
    assert "not-the-password" not in message


def test_nothing_listening_is_host_unreachable_at_once() -> None:
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(HostUnreachable, match=f"127.0.0.1:{port}"):
        run(open_pipe(f"//127.0.0.1:{port}/pipe/x", credentials=CREDS, timeout=5))
    assert time.monotonic() - start < 1.5


def test_unknown_backend_and_local_address() -> None:
    with pytest.raises(ConfigError, match="native, smbprotocol"):
        get_client("nope")
    with pytest.raises(ConfigError, match="native, smbprotocol"):
        run(open_pipe("//h/pipe/x", credentials=CREDS, backend="nope"))
    with pytest.raises(AddressError, match="not a remote pipe"):
        run(open_pipe("shop", credentials=CREDS))


# --- signing and encryption -----------------------------------------------------------


@pytest.mark.parametrize("server", ["default", "strict"])
def test_signed_and_encrypted_by_default(
    server: str, request: pytest.FixtureRequest, serve: Callable[..., PipeServer]
) -> None:
    target: Smbd = request.getfixturevalue("smbd" if server == "default" else "strict_smbd")
    serve("sig", echo, on=target)
    assert run(_echo_roundtrip(target.address("sig"), b"signed")) == b"signed"
    info = _link_info(target)
    assert info.dialect == "3.1.1"
    assert info.signing_required and info.signed and info.encrypted
    if server == "strict":
        # The server requires encryption, so even encrypt=False gets it.
        assert run(_echo_roundtrip(target.address("sig"), b"x", encrypt=False)) == b"x"
        assert all(c.encrypted for c in get_client().connections() if c.port == target.port)


def test_smb2_server_falls_back_to_signing(
    smb2_smbd: Smbd, serve: Callable[..., PipeServer]
) -> None:
    serve("old", echo, on=smb2_smbd)
    with pytest.raises(ConfigError, match=r"negotiated SMB 2\.1.*allow_smb2=True"):
        run(open_pipe(smb2_smbd.address("old"), credentials=CREDS, timeout=5))
    assert run(_echo_roundtrip(smb2_smbd.address("old"), b"2.1", allow_smb2=True)) == b"2.1"
    info = _link_info(smb2_smbd)
    assert info.dialect == "2.1" and info.signed and not info.encrypted
    with pytest.raises(ConfigError, match="cannot encrypt"):
        run(open_pipe(smb2_smbd.address("old"), credentials=CREDS, encrypt=True, timeout=5,
                      allow_smb2=True))


# --- the bridge -----------------------------------------------------------------------


def _unix_echo(path: str, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        return got


def test_bridge_relays_a_raw_client(smbd: Smbd, serve: Callable[..., PipeServer]) -> None:
    serve("bridged", echo)
    bridge = bridge_for(smbd.address("bridged"), credentials=CREDS)
    assert bridge_for(smbd.address("bridged"), credentials=CREDS) is bridge
    assert bridge.target == f"unix:{bridge.path}"
    assert Path(bridge.path).parent.parent == pipe_dir()  # reclaimed if the process dies
    assert Path(bridge.path).parent.name.startswith(".np-")
    assert os.stat(bridge.directory).st_mode & 0o777 == 0o700
    payload = os.urandom(300_000)
    assert _unix_echo(bridge.path, payload) == payload
    assert _unix_echo(bridge.path, b"second") == b"second"  # a new pipe instance each time
    directory = bridge.directory
    bridge.close()
    assert not os.path.exists(directory)
    assert bridge_for(smbd.address("bridged"), credentials=CREDS) is not bridge


def test_bridge_answers_for_a_pipe_it_cannot_open(
    smbd: Smbd, caplog: pytest.LogCaptureFixture
) -> None:
    """It answers the connection's HTTP/2 (the server's SETTINGS first), and ends it
    when the client has nothing more to say; the failure is logged once."""
    caplog.set_level(logging.WARNING, logger="npipe.unix_bridge")
    bridge = bridge_for(smbd.address("absent"), credentials=CREDS, timeout=0.5)
    start = time.monotonic()
    for _ in range(2):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(bridge.path)
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            assert s.recv(9)[3] == 0x04  # a SETTINGS frame
            s.shutdown(socket.SHUT_WR)
            while s.recv(100):
                pass
    assert time.monotonic() - start < 5
    bridge.close()
    assert caplog.text.count("no pipe") == 1, caplog.text


def test_bridge_refuses_other_users(
    smbd: Smbd, serve: Callable[..., PipeServer], caplog: pytest.LogCaptureFixture
) -> None:
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("needs /usr/bin/python3 to run a probe as another user")
    serve("private", echo)
    ensure_unix_user(OTHER_USER)
    caplog.set_level(logging.WARNING, logger="npipe.unix_bridge")
    bridge = bridge_for(smbd.address("private"), credentials=CREDS)
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.settimeout(10)\n"
        "try:\n"
        "    s.connect(sys.argv[1])\n"
        "    print('read', repr(s.recv(100)))\n"
        "except OSError as e:\n"
        "    print('error', type(e).__name__)\n"
    )

    other = pwd.getpwnam(OTHER_USER)

    def attempt() -> str:
        # setpriv changes the user, not subprocess's user=: that makes this process
        # fork() rather than vfork(), and the fork handlers of the gRPC already loaded
        # here then ran in the child, once logging an epoll error into its stderr.
        out = subprocess.run(
            ["setpriv", f"--reuid={other.pw_uid}", f"--regid={other.pw_gid}",
             "--clear-groups", "/usr/bin/python3", "-c", probe, bridge.path],
            cwd="/",
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert out.returncode == 0 and not out.stderr, out.stderr
        return out.stdout.strip()

    # The 0700 directory stops another user before the socket.
    assert attempt() == "error PermissionError"
    # Opened up (and the pipe directory around it), the socket still refuses:
    # SO_PEERCRED says another uid.
    parent = Path(bridge.directory).parent
    parent_mode = os.stat(parent).st_mode & 0o777
    os.chmod(parent, 0o711)
    os.chmod(bridge.directory, 0o711)
    os.chmod(bridge.path, 0o666)
    try:
        assert attempt() == "read b''"
    finally:
        os.chmod(parent, parent_mode)
    assert "refused a connection from uid" in caplog.text
    # This user still gets through.
    assert _unix_echo(bridge.path, b"mine") == b"mine"
    bridge.close()


# --- credentials (no smbd) ------------------------------------------------------------


def test_credentials_resolve_and_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NPIPE_USER", "NPIPE_PASSWORD", "NPIPE_DOMAIN", "NPIPE_AUTH_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)
    assert Credentials.resolve() == Credentials(None, None, None)
    monkeypatch.setenv("NPIPE_USER", "CORP\\alice")
    monkeypatch.setenv("NPIPE_PASSWORD", "s3cret")
    creds = Credentials.resolve()
    assert (creds.username, creds.domain, creds.password) == ("alice", "CORP", "s3cret")
    assert creds.principal == "CORP\\alice"
    assert "s3cret" not in repr(creds) and "s3cret" not in str(creds)
    # An explicit other user does not get the environment's password.
    assert Credentials.resolve("bob").password is None
    upn = Credentials.resolve("carol@example.test", "pw")
    assert (upn.username, upn.domain, upn.principal) == (
        "carol",
        "example.test",
        "carol@example.test",
    )
    assert Credentials.resolve("dave", "pw", domain="X").principal == "X\\dave"
    assert Credentials("a", "1").identity() != Credentials("a", "2").identity()
    with pytest.raises(ConfigError, match="auth_protocol"):
        Credentials("a", "b", None, "basic")


# --- the wire (keep last) -------------------------------------------------------------


def test_no_malformed_smb_on_the_wire(smbd: Smbd, serve: Callable[..., PipeServer]) -> None:
    """tshark finds nothing malformed in the SMB traffic since the last check (this runs
    once per backend, after that backend's tests)."""
    require_tshark()
    serve("wire", echo)
    assert run(_echo_roundtrip(smbd.address("wire"), b"on the wire")) == b"on the wire"
    assert _CAPTURES
    stop_all(_CAPTURES)
    smb2, bad = 0, []
    for cap in _CAPTURES:
        packets, found = cap.check()
        smb2 += packets
        if found:
            kept = shutil.copy(cap.path, f"/tmp/npipe-smb-client-{cap.ports[0]}.pcap")
            bad += [f"{kept}: {line}" for line in found]
        cap.restart()
    print(f"{smb2} SMB2 packets captured, {len(bad)} malformed")
    assert smb2 >= 10, f"only {smb2} SMB2 packets captured"
    assert not bad, f"{len(bad)} of {smb2} SMB2 packets malformed:\n" + "\n".join(bad[:50])


# --- sharing: one I/O thread and one connection per host and user (issue 10) ------------

# The client side of test_hundred_channels_share_one_connection, in a process of its own
# (so that its threads are counted alone). It dials 100 grpcio channels to 50 pipes,
# reports, and after "close" on stdin lets them go and reports what is left.
_MANY_CHANNELS = r"""
import gc, json, os, sys, threading, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
import npipe.grpc, npipe.redirector, npipe.smb, npipe.unix_bridge
from npipe.smb.credentials import Credentials

port, user, password, backend = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
creds = Credentials(user, password)
opts = [("grpc.use_local_subchannel_pool", 1)]  # one pipe per channel, not per target
channels = [
    npipe.grpc.channel(f"//127.0.0.1:{port}/pipe/many{i % 50}", credentials=creds,
                       smb_backend=backend, options=opts)
    for i in range(100)
]
for ch in channels:
    reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

def report():
    # (the channels' pipes are relayed by the user's redirector: its connections)
    conns = [c for c in npipe.smb.get_client(backend).connections()
             + npipe.redirector.connections(backend) if c.alive]
    return {
        "os_threads": len(os.listdir("/proc/self/task")),
        "threads": sorted(t.name for t in threading.enumerate()),
        "connections": [[c.port, c.pipes] for c in conns],
        "bridges": len(npipe.unix_bridge.bridges()),
    }

print(json.dumps(report()), flush=True)
sys.stdin.readline()
for ch in channels:
    ch.close()
del ch, channels
gc.collect()
deadline = time.monotonic() + 15
while time.monotonic() < deadline:
    r = report()
    if not r["connections"] and not r["bridges"]:
        break
    time.sleep(0.1)
print(json.dumps(report()), flush=True)
"""


def _relay_to(path: str) -> Handler:
    """A pipe server handler that relays the pipe to a Unix socket (a grpcio server)."""

    def handler(conn: socket.socket, data: bytes) -> None:
        out = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        out.connect(path)

        def back() -> None:
            with contextlib.suppress(OSError):
                while chunk := out.recv(65536):
                    conn.sendall(chunk)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=back, name=PipeServer.THREAD, daemon=True)
        t.start()
        try:
            if data:
                out.sendall(data)
            while chunk := conn.recv(65536):
                out.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                out.shutdown(socket.SHUT_WR)
            t.join(10)
            out.close()

    return handler


def test_hundred_channels_share_one_connection(
    smbd: Smbd, serve: Callable[..., PipeServer], smb_backend: str
) -> None:
    """100 grpcio channels to 50 pipes on one host: one SMB connection, and a number of
    threads that does not grow with the pipes (the native backend; smbprotocol relays
    each pipe with two threads of its own). Once the channels are gone, the bridges and
    the connection close after the idle timeout; the process exits at once."""
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    _close_connections()
    sock_dir = Path(tempfile.mkdtemp(prefix="npg", dir="/tmp"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(f"unix:{sock_dir}/g")
    server.start()
    try:
        for i in range(50):
            serve(f"many{i}", _relay_to(f"{sock_dir}/g"))
        env = dict(os.environ, NPIPE_SMB_IDLE_TIMEOUT="0.5")
        proc = subprocess.Popen(
            [sys.executable, "-c", _MANY_CHANNELS, str(smbd.port), USER, PASSWORD, smb_backend],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            line = proc.stdout.readline()
            assert line, "the client failed"
            busy = json.loads(line)
            established = smbd.established()
            proc.stdin.write("close\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            idle = json.loads(line) if line else None
            start = time.monotonic()
            assert proc.wait(20) == 0
            exit_took = time.monotonic() - start
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        print(f"{smb_backend}: busy {busy}, smbd sees {established} connection(s); idle {idle}")
        assert established == 1
        assert busy["connections"] == [[smbd.port, 100]]
        relay = ("npipe-smb-read", "npipe-smb-write")  # smbprotocol's per-pipe threads
        ours = [n for n in busy["threads"] if not n.startswith(relay)]
        assert len(ours) <= 10, ours
        if smb_backend == "native":
            assert len(busy["threads"]) <= 10
            assert busy["os_threads"] <= 30  # grpcio's own threads included
        assert idle == {**idle, "connections": [], "bridges": 0}
        # The connection was the redirector's, which closes it once idle (0.5 s here).
        deadline = time.monotonic() + 5
        while smbd.established() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert smbd.established() == 0
        assert exit_took < 5
    finally:
        server.stop(None)
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_open_connection_honours_limit_for_remote_pipes(
    smbd: Smbd, serve: Callable[..., PipeServer]
) -> None:
    import npipe

    serve("limited", echo)

    async def main() -> int:
        reader, writer = await npipe.open_connection(
            smbd.address("limited"), credentials=CREDS, limit=12345
        )
        try:
            limit: int = reader._limit  # type: ignore[attr-defined]
            return limit
        finally:
            writer.close()

    assert run(main()) == 12345


def test_no_task_is_left_without_a_reference() -> None:
    """asyncio keeps only weak references to tasks: one made and dropped may be
    collected before it runs to the end. Every create_task / ensure_future in npipe
    must keep its result."""
    import ast

    import npipe

    root = Path(npipe.__file__).parent
    bare = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Attribute)
                and node.value.func.attr in ("create_task", "ensure_future")
            ):
                bare.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not bare, bare


_EXIT_WITH_OPEN_CHANNELS = r"""
import sys
import npipe.grpc, npipe.smb, npipe.unix_bridge
from grpc_health.v1 import health_pb2, health_pb2_grpc
from npipe.smb.credentials import Credentials

port, user, password, backend = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
creds = Credentials(user, password)
channels = [npipe.grpc.channel(f"//127.0.0.1:{port}/pipe/atexit", credentials=creds,
                               smb_backend=backend) for _ in range(3)]
for ch in channels:
    health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
pinned = npipe.unix_bridge.bridge_for(f"//127.0.0.1:{port}/pipe/atexit2",
                                     credentials=creds, backend=backend)
print(" ".join(b.directory for b in npipe.unix_bridge.bridges()), flush=True)
# exit with the channels open, a call's pipe relayed, and a pinned bridge
"""


def test_exit_with_open_channels_and_bridges(
    smbd: Smbd, serve: Callable[..., PipeServer], smb_backend: str
) -> None:
    """atexit closes the bridges (their directories go) and the process ends at once."""
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    sock_dir = Path(tempfile.mkdtemp(prefix="npg", dir="/tmp"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(f"unix:{sock_dir}/g")
    server.start()
    try:
        serve("atexit", _relay_to(f"{sock_dir}/g"))
        start = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-c", _EXIT_WITH_OPEN_CHANNELS, str(smbd.port), USER, PASSWORD,
             smb_backend],
            capture_output=True, text=True, timeout=30,
        )
        took = time.monotonic() - start
        assert out.returncode == 0, out.stderr
        directories = out.stdout.split()
        assert len(directories) == 2
        assert not [d for d in directories if os.path.exists(d)]
        assert took < 10, took
    finally:
        server.stop(None)
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_an_unused_connection_closes_after_the_idle_timeout(
    smbd: Smbd, serve: Callable[..., PipeServer]
) -> None:
    from npipe import ioloop

    serve("idle", echo)
    _close_connections()
    ioloop.set_idle_timeout(0.4)
    try:

        async def main() -> tuple[int, int, int]:
            assert await _echo_roundtrip(smbd.address("idle"), b"x") == b"x"
            await asyncio.sleep(0.1)
            while_fresh = smbd.established()
            deadline = time.monotonic() + 5
            while smbd.established() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            after = smbd.established()
            # A new open sets up a new connection.
            assert await _echo_roundtrip(smbd.address("idle"), b"y") == b"y"
            return while_fresh, after, smbd.established()

        assert run(main()) == (1, 0, 1)
    finally:
        ioloop.set_idle_timeout(None)
        _close_connections()


def test_dead_peer_timeout_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from npipe.smb import ENV_DEAD_PEER_TIMEOUT, _native_options

    monkeypatch.delenv(ENV_DEAD_PEER_TIMEOUT, raising=False)
    assert _native_options().dead_peer_timeout == 30.0  # the default: under a minute
    monkeypatch.setenv(ENV_DEAD_PEER_TIMEOUT, "7.5")
    assert _native_options().dead_peer_timeout == 7.5
    monkeypatch.setenv(ENV_DEAD_PEER_TIMEOUT, "0")
    assert _native_options().dead_peer_timeout is None
    for bad in ("soon", "-1", "inf", "nan"):
        monkeypatch.setenv(ENV_DEAD_PEER_TIMEOUT, bad)
        with pytest.raises(ConfigError, match=ENV_DEAD_PEER_TIMEOUT):
            _native_options()
