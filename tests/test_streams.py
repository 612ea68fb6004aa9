"""Raw asyncio streams over local pipes: open_connection / start_server."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest

import npipe
from npipe import AccessDenied, PipeInUse, PipeNotFound
from npipe.testing.netns import skip_or_fail


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    who = npipe.caller(writer)
    writer.write(f"{who.uid} {who.pid}\n".encode())
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.mark.parametrize("place", ["machine-wide", "pipe-dir"])
def test_echo_and_caller_identity(
    pipe_dir: Path, request: pytest.FixtureRequest, place: str
) -> None:
    if place == "pipe-dir":
        request.getfixturevalue("no_machine_dir")
        where, mode = pipe_dir, 0o700
    else:
        machine = request.getfixturevalue("fresh_machine_dir")
        if not machine.exists():
            skip_or_fail("only root's servers make the machine-wide directory: run as root")
        where, mode = machine / f".u{os.geteuid()}", 0o711

    async def main() -> None:
        async with await npipe.start_server(_echo, "Echo") as server:
            assert server.path == where / "echo"  # names are case-insensitive
            assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(where).st_mode) == mode
            reader, writer = await npipe.open_connection(r"\\.\pipe\echo")
            assert await reader.readline() == f"{os.getuid()} {os.getpid()}\n".encode()
            payload = os.urandom(1 << 20)
            echoed = asyncio.ensure_future(reader.readexactly(len(payload)))
            writer.write(payload)  # read concurrently: the echo would fill both buffers
            await writer.drain()
            writer.write_eof()
            assert await asyncio.wait_for(echoed, 10) == payload
            assert await reader.read() == b""
            writer.close()
        assert not server.path.exists()

    asyncio.run(main())


def test_backpressure_bounds_the_servers_buffer(pipe_dir: Path) -> None:
    """A handler that stops reading makes the writer wait instead of buffering it all."""
    release = asyncio.Event

    async def main() -> None:
        gate = release()

        async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await gate.wait()
            writer.close()

        async with await npipe.start_server(slow, "slow"):
            _reader, writer = await npipe.open_connection("slow")
            sent = 0
            chunk = b"x" * 65536
            with pytest.raises(asyncio.TimeoutError):
                while sent < 256 << 20:  # bounded: 256 MiB at most
                    writer.write(chunk)
                    await asyncio.wait_for(writer.drain(), 0.5)
                    sent += len(chunk)
            assert sent < 64 << 20, f"{sent} bytes were buffered without backpressure"
            gate.set()
            writer.close()

    asyncio.run(main())


def test_missing_pipe_is_pipe_not_found(pipe_dir: Path) -> None:
    with pytest.raises(PipeNotFound, match="nosuch"):
        asyncio.run(npipe.open_connection("nosuch"))


def test_stale_socket_is_pipe_not_found_for_clients(pipe_dir: Path) -> None:
    pipe_dir.mkdir(mode=0o700)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(pipe_dir / "stale"))
    s.close()
    with pytest.raises(PipeNotFound, match="stale socket"):
        asyncio.run(npipe.open_connection("stale"))


def test_second_server_on_live_name_is_refused(pipe_dir: Path) -> None:
    async def main() -> None:
        async with await npipe.start_server(_echo, "one"):
            with pytest.raises(PipeInUse, match="already served"):
                await npipe.start_server(_echo, "ONE")
            reader, writer = await npipe.open_connection("one")  # the first still serves
            assert (await reader.readline()).startswith(str(os.getuid()).encode())
            writer.close()

    asyncio.run(main())


def test_stale_socket_is_replaced(pipe_dir: Path) -> None:
    pipe_dir.mkdir(mode=0o700)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(pipe_dir / "again"))
    s.close()

    async def main() -> None:
        async with await npipe.start_server(_echo, "again"):
            reader, writer = await npipe.open_connection("again")
            assert await reader.readline()
            writer.close()

    asyncio.run(main())


def test_non_socket_is_never_replaced(pipe_dir: Path, no_machine_dir: Path) -> None:
    pipe_dir.mkdir(mode=0o700)
    (pipe_dir / "file").write_text("keep me")
    with pytest.raises(PipeInUse, match="not a socket"):
        asyncio.run(npipe.start_server(_echo, "file"))
    assert (pipe_dir / "file").read_text() == "keep me"


def test_symlink_is_not_trusted(pipe_dir: Path, tmp_path: Path) -> None:
    async def main() -> None:
        async with await npipe.start_server(_echo, "real") as server:
            os.symlink(server.path, pipe_dir / "link")
            with pytest.raises(AccessDenied, match="symbolic link"):
                await npipe.open_connection("link")

    asyncio.run(main())


def test_pipe_dir_writable_by_others_is_refused(pipe_dir: Path) -> None:
    pipe_dir.mkdir()
    os.chmod(pipe_dir, 0o777)
    with pytest.raises(AccessDenied, match="writable by others"):
        asyncio.run(npipe.start_server(_echo, "x"))


def test_handler_exception_closes_only_that_connection(pipe_dir: Path) -> None:
    async def boom(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await reader.readline() == b"boom\n":
            raise RuntimeError("handler bug")
        writer.write(b"ok\n")

    async def main() -> None:
        async with await npipe.start_server(boom, "boom"):
            r1, w1 = await npipe.open_connection("boom")
            w1.write(b"boom\n")
            assert await asyncio.wait_for(r1.read(), 5) == b""
            r2, w2 = await npipe.open_connection("boom")
            w2.write(b"fine\n")
            assert await asyncio.wait_for(r2.readline(), 5) == b"ok\n"
            w1.close()
            w2.close()

    asyncio.run(main())


def test_peer_vanishing_mid_stream_is_seen_by_handler(pipe_dir: Path) -> None:
    async def main() -> None:
        seen: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readexactly(1000)
            except asyncio.IncompleteReadError as e:
                seen.set_result(e.partial)

        async with await npipe.start_server(handler, "vanish"):
            _r, w = await npipe.open_connection("vanish")
            w.write(b"half")
            await w.drain()
            w.transport.abort()
            assert await asyncio.wait_for(seen, 5) == b"half"

    asyncio.run(main())


@pytest.mark.parametrize("sends", [False, True])
def test_a_caller_that_leaves_before_sending_anything_is_no_handler_failure(
    pipe_dir: Path, caplog: pytest.LogCaptureFixture, sends: bool
) -> None:
    """A liveness probe (is_live: a connect and a close; servers probe each other's
    sockets when they claim a name) meets a handler that talks first: its broken pipe
    is logged at debug level only. A caller that did send something and then vanished
    while the handler wrote is still logged as the handler's failure."""
    import logging

    from npipe.local.listener import is_live

    async def main() -> None:
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def talker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                for _ in range(200):
                    writer.write(b"x" * 65536)
                    await writer.drain()
            finally:
                ended.set_result(None)

        async with await npipe.start_server(talker, "talker") as server:
            if sends:
                _r, w = await npipe.open_connection("talker")
                w.write(b"hello")
                await w.drain()
                await asyncio.sleep(0.1)
                w.transport.abort()
            else:
                live = await asyncio.get_running_loop().run_in_executor(
                    None, is_live, server.path)
                assert live
            await asyncio.wait_for(ended, 5)
            await asyncio.sleep(0.05)

    with caplog.at_level(logging.DEBUG, logger="npipe"):
        asyncio.run(main())
    failed = [r for r in caplog.records if "handler failed" in r.getMessage()]
    if sends:
        assert len(failed) == 1 and failed[0].levelno == logging.ERROR, caplog.records
    else:
        assert not failed, [r.getMessage() for r in failed]
        left = [r for r in caplog.records if "before sending anything" in r.getMessage()]
        assert len(left) == 1 and left[0].levelno == logging.DEBUG, caplog.records
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records


def test_caller_outside_a_server_is_none(pipe_dir: Path) -> None:
    """As npipe.grpc.caller(context) for a call that did not come through a pipe."""
    async def main() -> None:
        async with await npipe.start_server(_echo, "c"):
            _r, w = await npipe.open_connection("c")
            assert npipe.caller(w) is None
            w.close()

    asyncio.run(main())


def test_remote_address_is_not_served_locally(pipe_dir: Path) -> None:
    with pytest.raises(npipe.NpipeError):
        asyncio.run(npipe.start_server(_echo, "//host/pipe/x"))


def test_unix_address(pipe_dir: Path) -> None:
    pipe_dir.mkdir(mode=0o700)
    path = pipe_dir / "raw.sock"

    async def main() -> None:
        async with await npipe.start_server(_echo, f"unix:{path}"):
            reader, writer = await npipe.open_connection(f"unix:{path}")
            assert await reader.readline()
            writer.close()

    asyncio.run(main())


def test_dotnet_compatible_path(pipe_dir: Path) -> None:
    name = f"npipe-test-{os.getpid()}"

    async def main() -> None:
        async with await npipe.start_server(_echo, name, dotnet=True) as server:
            assert str(server.path) == f"/tmp/CoreFxPipe_{name}"
            # a client finds it by name alone: the pipe dir first, then .NET's path
            reader, writer = await npipe.open_connection(name)
            assert await reader.readline()
            writer.close()
        assert not os.path.exists(f"/tmp/CoreFxPipe_{name}")

    asyncio.run(main())


def test_pipe_server_has_what_asyncio_server_has(pipe_dir: Path) -> None:
    async def main() -> None:
        server = await npipe.start_server(_echo, "api")
        async with server:
            assert server.is_serving()
            (sock,) = server.sockets
            assert sock.family == socket.AF_UNIX and sock.fileno() >= 0
            forever = asyncio.ensure_future(server.serve_forever())
            await asyncio.sleep(0)
            r, w = await npipe.open_connection("api")
            await r.readline()  # (the echo handler says who called first)
            w.write(b"x")
            assert await r.readexactly(1) == b"x"
            w.close()
            forever.cancel()
            with pytest.raises(asyncio.CancelledError):
                await forever
            assert not server.is_serving()
            assert not server.path.exists()  # serve_forever's end gives up the name

    asyncio.run(main())
