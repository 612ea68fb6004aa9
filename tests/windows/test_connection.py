"""npipe.connection on Windows against the standard library's own AF_PIPE Listener and
Client (message-mode pipes both): the handshake, message boundaries, the caller, limits."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection as mpc
import threading
from collections.abc import Callable
from typing import Any

import pytest

from npipe.connection import Client, Listener
from npipe.errors import MessageTooLarge
from npipe.windows import win32

KEY = b"npipe-windows-test"
SIZES = (0, 1, 70_000, 1 << 20)


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def _echo_all(conn: Any, count: int) -> None:
    with conn:
        for _ in range(count):
            conn.send_bytes(conn.recv_bytes())


def test_stdlib_client_reaches_an_npipe_listener(name: str) -> None:
    with Listener(name, authkey=KEY) as listener:
        t, out = _in_thread(lambda: listener.accept())
        with mpc.Client(rf"\\.\pipe\{name}", family="AF_PIPE", authkey=KEY) as conn:
            t.join(10)
            server = out[0]
            for size in SIZES:
                conn.send_bytes(bytes([size % 251]) * size)
            got = [server.recv_bytes() for _ in SIZES]
            server.close()
    assert [len(m) for m in got] == list(SIZES)
    assert server.caller is not None and server.caller.sids[0] == win32.current_user_sid()
    assert listener.last_accepted == server.caller


def test_npipe_client_reaches_a_stdlib_listener(name: str) -> None:
    with mpc.Listener(rf"\\.\pipe\{name}", family="AF_PIPE", authkey=KEY) as listener:
        t, _ = _in_thread(lambda: _echo_all(listener.accept(), len(SIZES)))
        with Client(name, authkey=KEY) as conn:
            echoed = []
            for size in SIZES:
                conn.send_bytes(b"x" * size)
                echoed.append(len(conn.recv_bytes()))
        t.join(10)
    assert echoed == list(SIZES)


def test_wrong_authkey_is_refused_both_ways(name: str) -> None:
    with Listener(name, authkey=KEY) as listener:
        t, out = _in_thread(lambda: _accept_error(listener))
        with pytest.raises(multiprocessing.AuthenticationError):
            mpc.Client(rf"\\.\pipe\{name}", family="AF_PIPE", authkey=b"wrong")
        t.join(10)
    assert isinstance(out[0], multiprocessing.AuthenticationError)


def _accept_error(listener: Listener) -> BaseException | None:
    try:
        listener.accept().close()
    except BaseException as e:
        return e
    return None


def test_a_message_over_the_limit_is_an_error_and_the_connection_goes_on(name: str) -> None:
    with Listener(name, max_message=1000) as listener:
        t, out = _in_thread(lambda: listener.accept())
        with Client(name) as conn:
            t.join(10)
            server = out[0]
            conn.send_bytes(b"x" * 1001)
            conn.send_bytes(b"next")
            with pytest.raises(MessageTooLarge):
                server.recv_bytes()
            assert server.recv_bytes() == b"next"
            server.close()
