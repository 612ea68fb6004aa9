"""Blocking byte streams over local pipes: npipe.connect / npipe.create_server, against
each other and against the asyncio API."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_support import TestUser, ensure_test_users, run_python

import npipe
from npipe import AccessDenied, PipeBusy, PipeNotFound
from npipe.blocking import PipeSocket, relay_to_socket
from npipe.testing.netns import skip_or_fail

WAIT = 10.0


@pytest.fixture
def name(pipe_dir: Path) -> str:  # (pipe_dir: a private pipe directory, in the env)
    return f"blk{os.getpid()}-{time.monotonic_ns() % 10**6}"


def _echo_blocking(conn: PipeSocket, who: npipe.Caller) -> None:
    with conn:
        conn.sendall(f"hello {who.user} {who.uid}\n".encode())
        while data := conn.recv(65536):
            conn.sendall(data)


def _serve_in_thread(server: npipe.blocking.PipeSocketServer) -> threading.Thread:
    def loop() -> None:
        while True:
            try:
                conn, who = server.accept()
            except OSError:
                return
            threading.Thread(target=_echo_blocking, args=(conn, who), daemon=True).start()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def _greeting(conn: PipeSocket) -> str:
    f = conn.makefile("rb")
    line = f.readline()
    f.close()
    return line.decode().strip()


def test_blocking_client_and_asyncio_server(name: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"hello {npipe.caller(writer).uid}\n".encode())
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    def client() -> tuple[str, bytes, int]:
        with npipe.connect(name, timeout=WAIT) as conn:
            greeting = _readline(conn)
            conn.sendall(b"x" * 300_000)
            got = b""
            while len(got) < 300_000:
                got += conn.recv(65536)
            return greeting, got[:3], conn.fileno()

    async def main() -> tuple[str, bytes, int]:
        async with await npipe.start_server(handler, name):
            return await asyncio.to_thread(client)

    greeting, head, fd = asyncio.run(main())
    assert greeting == f"hello {os.getuid()}" and head == b"xxx" and fd >= 0


def _readline(conn: PipeSocket) -> str:
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(1)
        assert chunk, line
        line += chunk
    return line.decode().strip()


def test_asyncio_client_and_blocking_server(name: str) -> None:
    with npipe.create_server(name) as server:
        _serve_in_thread(server)

        async def main() -> tuple[str, bytes]:
            reader, writer = await npipe.open_connection(name)
            greeting = (await reader.readline()).decode().strip()
            writer.write(b"ping")
            await writer.drain()
            echoed = await reader.readexactly(4)
            writer.close()
            return greeting, echoed

        greeting, echoed = asyncio.run(main())
    assert greeting == "hello root 0" or greeting.endswith(f" {os.getuid()}")
    assert echoed == b"ping"


def test_blocking_client_and_blocking_server(name: str) -> None:
    with npipe.create_server(name) as server:
        _serve_in_thread(server)
        with npipe.connect(name) as conn:
            f = conn.makefile("rwb")
            assert f.readline().decode().split()[-1] == str(os.getuid())
            f.write(b"line one\n")
            f.flush()
            assert f.readline() == b"line one\n"
            text = conn.makefile("r", encoding="utf-8")
            conn.sendall("ünï\n".encode())
            assert text.readline() == "ünï\n"
        # many at once, each its own connection
        results: list[bytes] = []

        def one(i: int) -> None:
            with npipe.connect(name, timeout=WAIT) as c:
                _readline(c)
                c.sendall(b"%d" % i)
                results.append(c.recv(10))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
    assert sorted(results) == sorted(b"%d" % i for i in range(10))


def test_accept_names_the_caller_and_hands_over_what_was_sent_at_once(name: str) -> None:
    with npipe.create_server(name) as server, npipe.connect(name) as conn:
        conn.sendall(b"early bytes")  # before accept(): the front door may read them
        time.sleep(0.2)
        accepted, who = server.accept()
        with accepted:
            assert who.uid == os.getuid() and who.pid == os.getpid()
            assert accepted.caller == who and who.transport == "local"
            got = b""
            while len(got) < 11:
                got += accepted.recv(4)
            assert got == b"early bytes"


def test_recv_timeout_raises_and_the_connection_stays_usable(name: str) -> None:
    with npipe.create_server(name) as server, npipe.connect(name) as conn:
        accepted, _ = server.accept()
        conn.settimeout(0.2)
        assert conn.gettimeout() == 0.2
        t0 = time.monotonic()
        with pytest.raises(socket.timeout):
            conn.recv(10)
        assert time.monotonic() - t0 < 2
        accepted.sendall(b"late")
        assert conn.recv(10) == b"late"
        conn.sendall(b"back")
        assert accepted.recv(10) == b"back"
        accepted.close()


def test_connect_timeout_on_a_full_backlog(name: str) -> None:
    """Past max_connections callers wait in the listen backlog; once that is full too,
    the pipe is busy: connect() waits for it, for its timeout, then raises PipeBusy
    (as the SMB client does)."""
    with npipe.create_server(name, max_connections=1) as server:
        held = npipe.connect(name)
        server.accept()
        path = os.fspath(server.server.path)
        fillers = []
        try:
            while True:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                fillers.append(s)
                try:
                    s.connect(path)
                except BlockingIOError:
                    break
                assert len(fillers) < 10_000
            t0 = time.monotonic()
            with pytest.raises(PipeBusy):
                npipe.connect(name, timeout=0.5)
            assert 0.4 < time.monotonic() - t0 < 3
        finally:
            for s in fillers:
                s.close()
            held.close()


def test_missing_pipe(name: str) -> None:
    with pytest.raises(PipeNotFound):
        npipe.connect(name, timeout=1)


def test_half_close(name: str) -> None:
    with npipe.create_server(name) as server, npipe.connect(name) as conn:
        accepted, _ = server.accept()
        conn.sendall(b"request")
        conn.shutdown(socket.SHUT_WR)
        got = b""
        while data := accepted.recv(100):
            got += data
        assert got == b"request"  # and then the end of the stream
        accepted.sendall(b"answer")
        accepted.close()
        assert conn.recv(100) == b"answer"
        assert conn.recv(100) == b""


def test_a_peer_that_vanishes_mid_stream(name: str, pipe_dir: Path) -> None:
    """The server process is killed while the client waits for more: recv ends (b""
    or ConnectionError), it does not hang."""
    import subprocess
    import sys

    body = (
        "import os, sys, npipe\n"
        f"server = npipe.create_server({name!r}, pipe_dir={os.fspath(pipe_dir)!r})\n"
        "print('ready', flush=True)\n"
        "conn, who = server.accept()\n"
        "conn.sendall(b'part of it')\n"
        "conn.recv(1)\n"
        "os._exit(0)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", body], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        conn = npipe.connect(name, pipe_dir=pipe_dir, timeout=WAIT)
        with conn:
            got = b""
            while len(got) < 10:
                got += conn.recv(10)
            assert got == b"part of it"
            conn.sendall(b"!")  # the server exits without closing anything
            t0 = time.monotonic()
            with contextlib.suppress(ConnectionError):
                assert conn.recv(100) == b""
            assert time.monotonic() - t0 < WAIT - 1
    finally:
        proc.kill()
        proc.wait()


def test_close_from_another_thread_unblocks_accept(name: str) -> None:
    server = npipe.create_server(name)
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            server.accept()
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.3)
    server.close()
    t.join(3)
    assert not t.is_alive()
    assert isinstance(outcome[0], OSError) and outcome[0].errno == errno.EBADF
    with pytest.raises(PipeNotFound):
        npipe.connect(name, timeout=0.5)
    with pytest.raises(OSError):
        server.accept()


def test_accept_timeout(name: str) -> None:
    with npipe.create_server(name) as server:
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()


def test_closing_the_server_leaves_accepted_connections_open(name: str) -> None:
    server = npipe.create_server(name)
    with npipe.connect(name) as conn:
        accepted, _ = server.accept()
        server.close()
        accepted.sendall(b"still here")
        assert conn.recv(100) == b"still here"
        accepted.close()
        assert conn.recv(100) == b""


def test_relay_to_socket_the_windows_path() -> None:
    """What Windows uses (its pipes have no descriptor): asyncio streams relayed to a
    socketpair on the I/O thread; run here over a Unix socketpair's streams."""
    from npipe import ioloop

    a, b = socket.socketpair()

    async def relay() -> socket.socket:
        a.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=a)
        return await relay_to_socket(reader, writer, half_close=False)

    ours = ioloop.run(relay(), WAIT)
    with ours, b:
        ours.sendall(b"to the pipe")
        assert b.recv(100) == b"to the pipe"
        b.sendall(b"from the pipe")
        assert ours.recv(100) == b"from the pipe"
        b.close()
        ours.settimeout(WAIT)
        assert ours.recv(100) == b""


def test_shutdown_refused_where_the_pipe_cannot_half_close() -> None:
    a, b = socket.socketpair()
    with PipeSocket(a, npipe.parse_address(r"\\host\pipe\x"), half_close=False) as conn, b:
        with pytest.raises(OSError) as e:
            conn.shutdown(socket.SHUT_WR)
        assert e.value.errno == errno.EOPNOTSUPP


# --- real users ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def users() -> dict[str, TestUser]:
    if os.geteuid() != 0:
        skip_or_fail("switching users needs root")
    return ensure_test_users()


@pytest.fixture
def machine(fresh_machine_dir: Path) -> Iterator[Path]:
    if not fresh_machine_dir.exists():
        skip_or_fail("only root's servers make the machine-wide directory: run as root")
    yield fresh_machine_dir


def test_acl_refused_caller_gets_access_denied_and_never_reaches_accept(
    users: dict[str, TestUser], machine: Path, name: str
) -> None:
    t1, t2 = users["npipe-t1"], users["npipe-t2"]
    with npipe.create_server(name, acl=npipe.Acl.allow(users=[t2.name])) as server:
        server.settimeout(0.5)
        refused = run_python(f"""
            import npipe
            try:
                npipe.connect({name!r}, timeout=5)
            except npipe.AccessDenied as e:
                result(["AccessDenied", str(e)])
            else:
                result(["connected"])
        """, user=t1).check()
        assert refused[0] == "AccessDenied", refused
        with pytest.raises(socket.timeout):
            server.accept()  # the refused caller never shows up

        admitted: list[object] = []

        def child() -> None:
            admitted.append(run_python(f"""
                import npipe
                with npipe.connect({name!r}, timeout=5) as c:
                    c.sendall(b"hi")
                    result(c.recv(100).decode())
            """, user=t2).check())

        t = threading.Thread(target=child)
        t.start()
        server.settimeout(WAIT)
        conn, who = server.accept()
        with conn:
            assert who.user == t2.name and who.uid == t2.uid
            assert conn.recv(2) == b"hi"
            conn.sendall(f"hello {who.user}".encode())
        t.join(WAIT)
    assert admitted == [f"hello {t2.name}"]


def test_accessdenied_is_the_asyncio_apis_error_type(
    users: dict[str, TestUser], machine: Path, name: str
) -> None:
    """And the blocking client refuses a server of another user (the squatter rule)."""
    t1 = users["npipe-t1"]
    with npipe.create_server(name):
        out = run_python(f"""
            import npipe
            try:
                npipe.connect({name!r}, timeout=5)
            except Exception as e:
                result(type(e).__name__)
        """, user=t1).check()
    assert out == AccessDenied.__name__
