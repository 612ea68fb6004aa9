"""Native Windows pipes through npipe's public API: echo, big data, many clients, the
caller's identity, ACL refusals, first instance, busy pipes and a name that never lapses."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import npipe
from npipe.errors import AccessDenied, ConfigError, PipeBusy, PipeInUse, PipeNotFound
from npipe.windows import win32

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
MiB = 1024 * 1024


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def line_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    line = await reader.readline()
    writer.write(line.upper())
    await writer.drain()


async def roundtrip(address: str, payload: bytes, **kw: Any) -> bytes:
    reader, writer = await npipe.open_connection(address, timeout=10, **kw)
    try:
        writer.write(payload + b"\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()


def test_echo_over_every_spelling_of_the_address(name: str) -> None:
    async def main() -> list[bytes]:
        async with await npipe.start_server(line_echo, name):
            return [await roundtrip(a, b"hello") for a in
                    (name, f"\\\\.\\pipe\\{name}", f"//./pipe/{name}")]

    assert asyncio.run(main()) == [b"HELLO\n"] * 3


def test_the_caller_is_this_process_and_user(name: str) -> None:
    seen: list[npipe.Caller | None] = []

    async def who(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(npipe.caller(writer))
        writer.write(b"ok\n")
        await writer.drain()

    async def main() -> dict[str, object]:
        async with await npipe.start_server(who, name):
            reader, writer = await npipe.open_connection(name)
            try:
                assert await reader.readline() == b"ok\n"
                return {k: writer.get_extra_info(k) for k in ("server_pid", "server_sid")}
            finally:
                writer.close()

    server_side = asyncio.run(main())
    me = win32.current_user_sid()
    (caller,) = seen
    assert caller is not None
    assert caller.transport == "local"
    assert caller.sids[0] == me
    assert caller.pid == os.getpid()
    assert caller.account  # LookupAccountSid named the runner's account
    # The client saw who serves the pipe: this process, as this user.
    assert server_side == {"server_pid": os.getpid(), "server_sid": me}


def test_big_data_both_ways(name: str) -> None:
    payload = os.urandom(16 * MiB)

    async def main() -> bytes:
        async with await npipe.start_server(echo, name):
            reader, writer = await npipe.open_connection(name)
            got = bytearray()

            async def send() -> None:
                for i in range(0, len(payload), MiB):
                    writer.write(payload[i:i + MiB])
                    await writer.drain()

            sender = asyncio.ensure_future(send())
            while len(got) < len(payload):
                chunk = await asyncio.wait_for(reader.read(MiB), 30)
                assert chunk, "the pipe ended early"
                got += chunk
            await sender
            writer.close()
            return bytes(got)

    assert hashlib.sha256(asyncio.run(main())).digest() == hashlib.sha256(payload).digest()


def test_many_clients_at_once(name: str) -> None:
    async def main() -> list[bytes]:
        async with await npipe.start_server(line_echo, name):
            return await asyncio.gather(
                *(roundtrip(name, f"client {i}".encode()) for i in range(50))
            )

    assert asyncio.run(main()) == [f"CLIENT {i}\n".encode() for i in range(50)]


def test_a_live_name_is_never_joined(name: str) -> None:
    async def main() -> bytes:
        async with await npipe.start_server(line_echo, name):
            with pytest.raises(PipeInUse):
                await npipe.start_server(echo, name)
            return await roundtrip(name, b"still mine")  # the first server still serves

    assert asyncio.run(main()) == b"STILL MINE\n"


def test_closing_gives_up_the_name(name: str) -> None:
    async def main() -> bytes:
        server = await npipe.start_server(line_echo, name)
        server.close()
        await server.wait_closed()
        with pytest.raises(PipeNotFound):
            await npipe.open_connection(name, timeout=0.5)
        async with await npipe.start_server(line_echo, name):  # free for a new server
            return await roundtrip(name, b"again")

    assert asyncio.run(main()) == b"AGAIN\n"


def test_a_missing_pipe_is_not_found(name: str) -> None:
    started = time.monotonic()
    with pytest.raises(PipeNotFound):
        asyncio.run(npipe.open_connection(name, timeout=0.5))
    assert time.monotonic() - started < 5


def test_a_dacl_that_admits_only_system_refuses_the_owner(name: str) -> None:
    """The kernel enforces the SDDL npipe hands it: a pipe whose DACL names only SYSTEM
    refuses this user (who owns it) with AccessDenied, before any server code runs."""
    path = f"\\\\.\\pipe\\{name}"
    me = win32.current_user_sid()
    with win32.security_attributes(f"O:{me}D:P(A;;FA;;;SY)") as sa:
        handle = win32.create_pipe_instance(path, sa, first=True, remote=False)
    try:
        with pytest.raises(AccessDenied):
            asyncio.run(npipe.open_connection(name, timeout=2))
    finally:
        win32.close_handle(handle)


def test_server_user_is_checked(name: str) -> None:
    async def main() -> None:
        async with await npipe.start_server(line_echo, name):
            with pytest.raises(ConfigError):
                await npipe.open_connection(name, server_user=1000)  # a uid: not Windows
            with pytest.raises(ConfigError):
                await npipe.open_connection(name, server_user="NO-SUCH-DOMAIN\\nobody-here")
            # Our own pipe is trusted whoever else is expected (as on Linux).
            assert await roundtrip(name, b"x", server_user="S-1-5-18") == b"X\n"

    asyncio.run(main())


def test_a_busy_pipe_times_out_with_pipe_busy(name: str) -> None:
    """One instance that no server accepts on: the first client takes it, the next
    waits (WaitNamedPipe) and gives up at its timeout with PipeBusy."""
    path = f"\\\\.\\pipe\\{name}"
    me = win32.current_user_sid()
    with win32.security_attributes(f"O:{me}D:P(A;;FA;;;{me})") as sa:
        handle = win32.create_pipe_instance(path, sa, first=True, remote=False)

    async def main() -> float:
        _reader, writer = await npipe.open_connection(name, timeout=2)
        try:
            started = time.monotonic()
            with pytest.raises(PipeBusy):
                await npipe.open_connection(name, timeout=1.0)
            return time.monotonic() - started
        finally:
            writer.close()

    try:
        waited = asyncio.run(main())
    finally:
        win32.close_handle(handle)
    assert 0.8 <= waited < 6, waited


def test_callers_past_max_connections_wait(name: str) -> None:
    release = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"in\n")
        await writer.drain()
        await release.wait()

    async def main() -> bytes:
        async with await npipe.start_server(hold, name, max_connections=1):
            r1, w1 = await npipe.open_connection(name)
            assert await r1.readline() == b"in\n"
            r2, w2 = await npipe.open_connection(name)  # the pending instance holds it
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(r2.readline(), 0.5)  # ... but nobody serves it yet
            with pytest.raises(PipeBusy):  # no instance is left for a third
                await npipe.open_connection(name, timeout=0.5)
            release.set()
            w1.close()
            line = await asyncio.wait_for(r2.readline(), 10)  # served once a slot frees
            w2.close()
            return line

    assert asyncio.run(main()) == b"in\n"


def test_the_name_never_lapses_between_instances(name: str) -> None:
    """Clients that open without retrying, over and over while the server hands each
    connection off: never ERROR_FILE_NOT_FOUND (the next instance exists first)."""
    path = f"\\\\.\\pipe\\{name}"
    errors: list[int] = []
    opened = 0
    done = threading.Event()

    def hammer() -> None:
        nonlocal opened
        deadline = time.monotonic() + 20
        while opened < 300 and time.monotonic() < deadline:
            try:
                win32.close_handle(win32.open_pipe(path))
                opened += 1
            except OSError as e:
                if e.winerror != 231:  # ERROR_PIPE_BUSY: all instances taken, fine
                    errors.append(e.winerror)
                win32.wait_named_pipe(path, 1000)
        done.set()

    async def main() -> None:
        async with await npipe.start_server(echo, name):
            thread = threading.Thread(target=hammer)
            thread.start()
            while not done.is_set():
                await asyncio.sleep(0.05)
            thread.join()

    asyncio.run(main())
    assert errors == []
    assert opened == 300
