"""The sync npipe.http.Transport's Windows path, run on Linux with npipe.windows.pipes
stood in for (the real one runs in tests/windows/test_http.py on windows-latest): the
transport asks attach_client for the pipe on npipe's I/O thread and speaks HTTP over its
end of the socketpair; a pipe that cannot be opened is an httpx.ConnectError with
npipe's message."""

from __future__ import annotations

import asyncio
import socket
import sys
import types
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import npipe.http
from npipe.errors import PipeNotFound


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """sys.platform "win32" for the transport, and a stand-in npipe.windows.pipes whose
    attach_client answers one HTTP request per connection (or raises PipeNotFound for
    the pipe "missing")."""
    calls: list[dict[str, Any]] = []

    async def attach_client(address: Any, sock: socket.socket, *, server_user: Any = None,
                            timeout: float = 10.0) -> None:
        calls.append({"address": str(address), "server_user": server_user,
                      "timeout": timeout, "loop": asyncio.get_running_loop()})
        if "missing" in str(address):
            sock.close()
            raise PipeNotFound(f"no pipe {address}")

        async def answer() -> None:
            reader, writer = await asyncio.open_connection(sock=sock)
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n"
                         b"Connection: close\r\n\r\nwindows")
            await writer.drain()
            writer.close()

        asyncio.get_running_loop().create_task(answer())

    fake = types.ModuleType("npipe.windows.pipes")
    fake.attach_client = attach_client  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "npipe.windows.pipes", fake)
    import npipe.windows

    monkeypatch.setattr(npipe.windows, "pipes", fake, raising=False)
    monkeypatch.setattr(sys, "platform", "win32")
    yield calls


def test_sync_transport_opens_windows_pipes_on_the_io_thread(
    windows: list[dict[str, Any]],
) -> None:
    from npipe import ioloop

    transport = npipe.http.Transport("api", server_user="CORP\\svc", timeout=3)
    with httpx.Client(transport=transport, base_url="http://api") as c:
        assert c.get("/").text == "windows"
        assert c.get("/").text == "windows"  # the server closed: a new pipe connection
    assert [call["address"] for call in windows] == [r"\\.\pipe\api"] * 2
    assert windows[0]["server_user"] == "CORP\\svc" and windows[0]["timeout"] <= 3
    assert windows[0]["loop"] is ioloop.get_loop()


def test_sync_transport_windows_open_failure_is_a_connect_error(
    windows: list[dict[str, Any]],
) -> None:
    with (httpx.Client(transport=npipe.http.Transport("missing"), base_url="http://api") as c,
          pytest.raises(httpx.ConnectError, match="no pipe") as failed):
        c.get("/")
    seen: BaseException | None = failed.value
    kinds = []
    while seen is not None:
        kinds.append(type(seen))
        seen = seen.__cause__ or seen.__context__
    assert PipeNotFound in kinds
