"""Front door limits: ``max_connections``, bounded threads, and no spinning on EMFILE.

Both front doors are covered: the threaded one before a grpcio server
(``npipe.grpc.add_pipe_port``) and the asyncio one of ``npipe.start_server``.
Plain sockets hold the slots: for gRPC each sends HTTP/2's client preface and an
empty SETTINGS frame, and grpcio answers with its own SETTINGS once the front door
has accepted the connection and relayed it; the stream servers here greet at once.
A caller over the cap is not accepted: its connect() succeeds (the kernel's listen
backlog holds it) but nothing answers until a slot frees.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_support import WAIT, Probe, method, run_python, sync_handler, wait_until

import npipe
import npipe.grpc
from npipe import frontdoor

# HTTP/2's client connection preface, then an empty SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
# How long a caller over the cap must see nothing, to count as waiting.
QUIET = 0.5
CAP = 3
GAP = 0.5  # EPISODE_GAP in these tests (60 s by default)
FLOOD = 40  # callers past the cap in the thread test: bounded, the machine is shared


def _cap_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "max_connections" in r.getMessage()]


def _dial(path: Path, hello: bytes = b"") -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(WAIT)
    s.connect(os.fspath(path))
    if hello:
        s.sendall(hello)
    return s


def _answers(s: socket.socket, timeout: float = WAIT) -> bool:
    """True once the server sends something; False if nothing comes within ``timeout``."""
    s.settimeout(timeout)
    try:
        return bool(s.recv(4096))
    except TimeoutError:
        return False


@contextlib.contextmanager
def _grpc_server(pipe_dir: Path, **port: Any) -> Iterator[npipe.grpc.PipePort]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((sync_handler(Probe()),))
    pipe = npipe.grpc.add_pipe_port(server, "svc", pipe_dir=pipe_dir, **port)
    server.start()
    try:
        yield pipe
    finally:
        server.stop(0).wait(WAIT)


def _echo(pipe_dir: Path) -> bytes:
    with npipe.grpc.channel("svc", pipe_dir=pipe_dir) as chan:
        reply: bytes = chan.unary_unary(method("Echo"))(b"ping", timeout=WAIT)
        return reply


def _relay_threads() -> int:
    return sum(t.name.startswith("npipe-relay") for t in threading.enumerate())


def _close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()
    socks.clear()


# --- the gRPC front door ---------------------------------------------------------------------


def test_grpc_callers_over_the_cap_wait_in_the_backlog(
    pipe_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="npipe")
    monkeypatch.setattr(frontdoor.ConnectionSlots, "EPISODE_GAP", GAP)
    with _grpc_server(pipe_dir, max_connections=CAP) as port:
        baseline = threading.active_count()
        held = [_dial(port.path, H2_PREFACE) for _ in range(CAP)]
        extra: list[socket.socket] = []
        try:
            assert all(_answers(s) for s in held), "callers within the cap were not served"
            extra = [_dial(port.path, H2_PREFACE) for _ in range(FLOOD)]
            assert not _answers(extra[0], QUIET), "a caller over the cap was accepted"
            # Relay threads: two per connection within the cap, none for those waiting.
            assert threading.active_count() - baseline <= 2 * CAP
            assert len(_cap_records(caplog)) == 1, [r.getMessage() for r in caplog.records]

            held.pop(0).close()  # a slot frees: the first waiting caller is let in
            assert _answers(extra[0]), "the waiting caller was not served once a slot freed"
            assert threading.active_count() - baseline <= 2 * CAP
        finally:
            _close_all(held)
            _close_all(extra)
        # Everyone is gone: the relays end and the pipe serves normally.
        assert wait_until(lambda: threading.active_count() <= baseline), (
            threading.active_count(), baseline)
        assert _echo(pipe_dir) == b"ping"
        assert len(_cap_records(caplog)) == 1

        # A second overload, once the pipe has not been full for EPISODE_GAP, is a new
        # episode: one more line.
        time.sleep(GAP * 2)
        held = [_dial(port.path, H2_PREFACE) for _ in range(CAP + 2)]
        try:
            assert all(_answers(s) for s in held[:CAP])
            assert not _answers(held[CAP], QUIET)
            assert len(_cap_records(caplog)) == 2
        finally:
            _close_all(held)
        assert _echo(pipe_dir) == b"ping"


def test_grpc_default_cap_follows_the_descriptor_limit(pipe_dir: Path) -> None:
    limit = frontdoor.default_max_connections()
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert 16 <= limit <= 1024
    if soft != resource.RLIM_INFINITY:
        assert limit <= max(16, soft // 4)
    with _grpc_server(pipe_dir):
        assert _echo(pipe_dir) == b"ping"


def test_bad_max_connections_is_a_config_error(pipe_dir: Path) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    with pytest.raises(npipe.ConfigError, match="max_connections"):
        npipe.grpc.add_pipe_port(server, "svc", pipe_dir=pipe_dir, max_connections=0)
    with pytest.raises(npipe.ConfigError, match="max_connections"):
        npipe.grpc.add_pipe_port(
            server, "svc", pipe_dir=pipe_dir, caller_identity=False, max_connections=8
        )
    with pytest.raises(npipe.ConfigError, match="max_connections"):
        asyncio.run(npipe.start_server(_greet, "x", pipe_dir=pipe_dir, max_connections=-1))
    assert not (pipe_dir / "svc").exists() and not (pipe_dir / "x").exists()


def test_grpc_pending_samba_handshakes_hold_slots(
    np_dir: Path, pipe_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """smbd's side of a handshake may stall (up to 10 s): it holds one of the pipe's slots,
    shared with the local door, and its thread counts against the bound."""
    caplog.set_level(logging.INFO, logger="npipe")
    with _grpc_server(pipe_dir, smb=True, max_connections=2) as port:
        baseline = threading.active_count()
        stalled = [_dial(np_dir / "svc") for _ in range(2)]  # root, silent: mid-handshake
        local: list[socket.socket] = []
        try:
            # Both accepted (a thread each, in its handshake) before a local caller comes.
            assert wait_until(lambda: _relay_threads() == 2), (
                baseline, [t.name for t in threading.enumerate()])
            local = [_dial(port.path, H2_PREFACE) for _ in range(FLOOD)]
            assert not _answers(local[0], QUIET), "a local caller got a slot held by smbd"
            assert threading.active_count() - baseline <= 2 * 2
            assert len(_cap_records(caplog)) == 1
            stalled.pop().close()  # that handshake fails and gives its slot back
            assert _answers(local[0])
        finally:
            _close_all(stalled)
            _close_all(local)
        assert wait_until(lambda: threading.active_count() <= baseline)
        assert _echo(pipe_dir) == b"ping"


# --- the asyncio front door (npipe.start_server) -----------------------------------------------


async def _greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"hello\n")
    await writer.drain()
    await reader.read()  # until the caller closes
    writer.close()


async def _aanswers(reader: asyncio.StreamReader, timeout: float = WAIT) -> bool:
    try:
        return bool(await asyncio.wait_for(reader.readline(), timeout))
    except asyncio.TimeoutError:
        return False


def test_streams_callers_over_the_cap_wait_in_the_backlog(
    pipe_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="npipe")
    live = 0
    most = 0

    async def counting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal live, most
        live += 1
        most = max(most, live)
        try:
            await _greet(reader, writer)
        finally:
            live -= 1

    async def main() -> None:
        server = await npipe.start_server(counting, "s", max_connections=CAP)
        conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            conns = [await npipe.open_connection("s") for _ in range(CAP + FLOOD)]
            assert all([await _aanswers(r) for r, _w in conns[:CAP]])
            assert not await _aanswers(conns[CAP][0], QUIET), "a caller over the cap got in"
            assert most == CAP
            assert len(_cap_records(caplog)) == 1, [r.getMessage() for r in caplog.records]

            conns.pop(0)[1].close()  # a slot frees: the first waiting caller is let in
            assert await _aanswers(conns[CAP - 1][0])
            assert most == CAP
        finally:
            for _r, w in conns:
                w.close()
        # Everyone is gone: the pipe serves normally, and closes promptly.
        await asyncio.wait_for(_until(lambda: live == 0), WAIT)
        r, w = await npipe.open_connection("s")
        assert await _aanswers(r)
        w.close()
        assert len(_cap_records(caplog)) == 1
        server.close()
        await asyncio.wait_for(server.wait_closed(), WAIT)
        assert not server.path.exists()

    asyncio.run(main())


def test_streams_pending_samba_handshakes_hold_slots(
    np_dir: Path, pipe_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="npipe")

    async def main() -> None:
        async with await npipe.start_server(_greet, "svc", smb=True, max_connections=2):
            loop = asyncio.get_running_loop()
            stalled = []
            for _ in range(2):  # root, silent: mid-handshake
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                await loop.sock_connect(s, os.fspath(np_dir / "svc"))
                stalled.append(s)
            await asyncio.sleep(0.2)  # let the Samba door take both
            r, w = await npipe.open_connection("svc")
            try:
                assert not await _aanswers(r, QUIET), "a local caller got a slot held by smbd"
                assert len(_cap_records(caplog)) == 1
                stalled.pop().close()  # that handshake fails and gives its slot back
                assert await _aanswers(r)
            finally:
                w.close()
                for s in stalled:
                    s.close()

    asyncio.run(main())


async def _until(predicate: object) -> None:
    assert callable(predicate)
    while not predicate():
        await asyncio.sleep(0.01)


def test_streams_default_cap_serves(pipe_dir: Path) -> None:
    async def main() -> None:
        async with await npipe.start_server(_greet, "d"):
            r, w = await npipe.open_connection("d")
            assert await _aanswers(r)
            w.close()

    asyncio.run(main())


# --- out of descriptors (EMFILE) ---------------------------------------------------------------

# Runs in a child process (its descriptor limit is lowered, not ours). The server is up
# and a caller's socket exists before the process runs out of descriptors; the caller
# then connects, and for SPAN seconds the server cannot accept it. Reports the CPU the
# process used meanwhile, the log records, and whether the caller and a new client are
# served once descriptors are freed.
_EMFILE_PRELUDE = """
    import asyncio, errno, logging, resource
    PIPE_DIR = {pipe_dir!r}
    SPAN = 1.5
    PREFACE = {preface!r}
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(f"{{record.name}} {{record.levelname}} {{record.getMessage()[:1000]}}")

    logging.getLogger().addHandler(Keep(logging.INFO))
    logging.getLogger().setLevel(logging.INFO)

    def exhaust():
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 32, hard))
        fillers = []
        try:
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as e:
            assert e.errno == errno.EMFILE, e

        def free():
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        return free
"""

EMFILE_GRPC = _EMFILE_PRELUDE + """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc_support.sync_handler(grpc_support.Probe()),))
    port = npipe.grpc.add_pipe_port(server, "svc", pipe_dir=PIPE_DIR)
    server.start()
    caller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    free = exhaust()
    caller.settimeout(10)
    caller.connect(str(port.path))
    caller.sendall(PREFACE)
    cpu = time.process_time()
    time.sleep(SPAN)
    cpu = time.process_time() - cpu
    seen = list(records)
    free()
    answered = bool(caller.recv(4096))  # 10 s at most
    with npipe.grpc.channel("svc", pipe_dir=PIPE_DIR) as chan:
        echo = chan.unary_unary("/t.Svc/Echo")(b"again", timeout=10).decode()
    caller.close()
    server.stop(0).wait(5)
    result({{"cpu": cpu, "records": seen, "answered": answered, "echo": echo}})
"""

EMFILE_STREAMS = _EMFILE_PRELUDE + """
    async def greet(reader, writer):
        writer.write(b"hello\\n")
        await writer.drain()
        await reader.read()
        writer.close()

    async def main():
        server = await npipe.start_server(greet, "s", pipe_dir=PIPE_DIR)
        caller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        free = exhaust()
        caller.settimeout(10)
        caller.connect(str(server.path))
        cpu = time.process_time()
        await asyncio.sleep(SPAN)
        cpu = time.process_time() - cpu
        seen = list(records)
        free()
        loop = asyncio.get_running_loop()
        caller.setblocking(False)
        answered = bool(await asyncio.wait_for(loop.sock_recv(caller, 100), 10))
        r, w = await npipe.open_connection("s", pipe_dir=PIPE_DIR)
        again = await asyncio.wait_for(r.readline(), 10)
        w.close()
        caller.close()
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)
        return {{"cpu": cpu, "records": seen, "answered": answered, "echo": again.decode()}}

    result(asyncio.run(main()))
"""


@pytest.mark.parametrize("kind", ["grpc", "streams"])
def test_accept_backs_off_when_out_of_descriptors(pipe_dir: Path, kind: str) -> None:
    body = EMFILE_GRPC if kind == "grpc" else EMFILE_STREAMS
    pipe_dir.mkdir(mode=0o700)
    child = run_python(body.format(pipe_dir=str(pipe_dir), preface=H2_PREFACE), timeout=60)
    outcome = child.check()
    # Not spinning: a few retries (10 ms doubling to 1 s), not a busy loop over 1.5 s.
    assert outcome["cpu"] < 0.3, outcome["cpu"]
    # One line for the whole episode, not one per failed accept (nor one per second): a
    # warning from the server's own logger, naming the pipe and the error.
    loud = [r for r in outcome["records"] if " INFO " not in r and " DEBUG " not in r]
    assert len(loud) == 1, outcome["records"][:5]
    logger, pipe = {"grpc": ("npipe.frontdoor", f"{pipe_dir}/svc"),
                    "streams": ("npipe.streams", r"\\.\pipe\s")}[kind]
    emfile = f"[Errno {errno.EMFILE}] {os.strerror(errno.EMFILE)}"
    assert loud[0] == (
        f"{logger} WARNING pipe {pipe} cannot take callers ({emfile}: out of file "
        "descriptors, threads or memory); retrying every 1 s at most until it can"), loud[0]
    # It recovers once descriptors are freed: the waiting caller and a new one are served
    # (a new gRPC caller's call is echoed; a new stream caller is greeted).
    assert outcome["answered"] is True
    assert outcome["echo"] == {"grpc": "again", "streams": "hello\n"}[kind]


def test_threaded_door_closes_while_waiting_for_a_slot(pipe_dir: Path) -> None:
    """Closing a door whose accept loop waits for a slot ends that loop promptly."""
    with _grpc_server(pipe_dir, max_connections=1) as port:
        held = _dial(port.path, H2_PREFACE)
        assert _answers(held)
        waiting = _dial(port.path, H2_PREFACE)
        start = time.monotonic()
        port.close()
        assert time.monotonic() - start < 2.0
        assert not port.path.exists()
        held.close()
        waiting.close()


def test_streams_serve_forever_ends_with_close(pipe_dir: Path) -> None:
    """serve_forever() behaves as asyncio.Server's: close() ends it (CancelledError),
    and cancelling it closes the server."""

    async def main() -> None:
        server = await npipe.start_server(_greet, "f", max_connections=2)
        serving = asyncio.ensure_future(server.serve_forever())
        r, w = await npipe.open_connection("f")
        assert await _aanswers(r)
        w.close()
        server.close()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(serving, WAIT)
        assert not server.path.exists()

        again = await npipe.start_server(_greet, "f")
        serving = asyncio.ensure_future(again.serve_forever())
        await asyncio.sleep(0.05)
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(serving, WAIT)
        assert not again.path.exists()
        with pytest.raises(npipe.PipeNotFound):
            await npipe.open_connection("f")

    asyncio.run(main())
