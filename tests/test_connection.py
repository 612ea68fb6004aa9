"""npipe.connection: message-mode pipes with multiprocessing.connection's API (issue 19).

Locally a message pipe is a SOCK_SEQPACKET Unix socket (npipe.local.messages): every
send_bytes arrives as one recv_bytes, whatever its size.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection as mpc
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import npipe
from npipe import connection
from npipe.errors import ConfigError, MessageTooLarge

# Local message pipes are SOCK_SEQPACKET Unix sockets, which macOS lacks (there
# npipe.connection says so: UnsupportedPlatform).
pytestmark = pytest.mark.linux_only("message pipes are SOCK_SEQPACKET Unix sockets")

SIZES = [0, 1, 70 * 1024, 1024 * 1024]


def _pattern(n: int) -> bytes:
    return bytes((i * 7 + n) & 0xFF for i in range(n))


class Served:
    """A Listener whose accepted connections run ``handler`` on threads."""

    def __init__(self, listener: connection.Listener,
                 handler: Callable[[connection.Connection], None]) -> None:
        self.listener = listener
        self.errors: list[BaseException] = []
        self.callers: list[npipe.Caller | None] = []
        self._thread = threading.Thread(target=self._loop, args=(handler,), daemon=True)
        self._thread.start()

    def _loop(self, handler: Callable[[connection.Connection], None]) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except BaseException as e:  # (AuthenticationError, EOFError: keep serving)
                if self.listener._impl is None:  # type: ignore[attr-defined]
                    return  # closed
                self.errors.append(e)
                continue
            self.callers.append(conn.caller)
            threading.Thread(target=self._serve, args=(handler, conn), daemon=True).start()

    def _serve(self, handler: Callable[[connection.Connection], None],
               conn: connection.Connection) -> None:
        with conn:
            try:
                handler(conn)
            except EOFError:
                pass
            except BaseException as e:
                self.errors.append(e)


def echo(conn: connection.Connection) -> None:
    while True:
        try:
            data = conn.recv_bytes()
        except MessageTooLarge as e:
            conn.send_bytes(b"too large: " + str(e).encode())
            continue
        conn.send_bytes(data)


@pytest.fixture
def served(pipe_dir: Path) -> Iterator[Callable[..., Served]]:
    made: list[connection.Listener] = []

    def serve(name: str, handler: Callable[[connection.Connection], None] = echo,
              **kw: Any) -> Served:
        lst = connection.Listener(name, **kw)
        made.append(lst)
        return Served(lst, handler)

    yield serve
    for lst in made:
        lst.close()


@pytest.mark.parametrize("size", SIZES)
def test_each_message_keeps_its_boundary(served: Callable[..., Served], size: int) -> None:
    served("msgs")
    with connection.Client("msgs") as c:
        c.send_bytes(_pattern(size))
        assert c.recv_bytes() == _pattern(size)


def test_three_messages_arrive_as_three(served: Callable[..., Served]) -> None:
    got: list[bytes] = []
    done = threading.Event()

    def collect(conn: connection.Connection) -> None:
        for _ in range(3):
            got.append(conn.recv_bytes())
        done.set()
        conn.recv_bytes()

    served("three", collect)
    msgs = [b"x" * 100_000, b"", b"abc"]
    with connection.Client("three") as c:
        for m in msgs:  # all sent before the server reads any
            c.send_bytes(m)
        assert done.wait(10)
    assert got == msgs


def test_the_stdlibs_connection_api(served: Callable[..., Served]) -> None:
    served("api")
    with connection.Client("api") as c:
        assert not c.poll(0.05)
        c.send({"a": [1, 2, 3]})
        assert c.poll(5)
        assert c.recv() == {"a": [1, 2, 3]}
        c.send_bytes(b"0123456789", 2, 3)
        assert c.recv_bytes() == b"234"
        c.send_bytes(b"hello")
        buf = bytearray(10)
        assert c.recv_bytes_into(buf, 3) == 5 and bytes(buf[3:8]) == b"hello"
        c.send_bytes(b"too long for the buffer")
        with pytest.raises(multiprocessing.BufferTooShort) as short:
            c.recv_bytes_into(bytearray(4))
        assert short.value.args[0] == b"too long for the buffer"
        c.send_bytes(b"12345")
        with pytest.raises(OSError, match="bad message length"):
            c.recv_bytes(4)
        c.send_bytes(b"after")  # the connection goes on after an oversized message
        assert c.recv_bytes() == b"after"
    assert c.closed
    with pytest.raises(OSError):
        c.send_bytes(b"x")


def test_the_peer_closing_is_eof(served: Callable[..., Served]) -> None:
    def close_at_once(conn: connection.Connection) -> None:
        conn.close()

    served("eof", close_at_once)
    with connection.Client("eof") as c, pytest.raises(EOFError):
        c.recv_bytes()


def test_over_limit_message_is_a_clear_error_and_the_listener_keeps_serving(
    served: Callable[..., Served],
) -> None:
    server = served("limit", max_message=1000)
    with connection.Client("limit") as c:
        c.send_bytes(b"x" * 1001)
        reply = c.recv_bytes()
        assert reply.startswith(b"too large: bad message length"), reply
        assert b"1000" in reply
        c.send_bytes(b"x" * 1000)  # the same connection goes on
        assert c.recv_bytes() == b"x" * 1000
    with connection.Client("limit") as c:  # and so does the listener
        c.send_bytes(b"ok")
        assert c.recv_bytes() == b"ok"
    assert server.errors == []


def test_authkey_right_and_wrong(served: Callable[..., Served]) -> None:
    server = served("auth", authkey=b"right")
    with connection.Client("auth", authkey=b"right") as c:
        c.send_bytes(b"in")
        assert c.recv_bytes() == b"in"
    with pytest.raises(multiprocessing.AuthenticationError):
        connection.Client("auth", authkey=b"wrong")
    with connection.Client("auth") as c:  # no key: what it reads is the challenge
        assert c.recv_bytes().startswith(b"#CHALLENGE#")
    with connection.Client("auth", authkey=b"right") as c:  # still serving
        c.send_bytes(b"again")
        assert c.recv_bytes() == b"again"
    assert any(isinstance(e, multiprocessing.AuthenticationError) for e in server.errors)


def test_authkey_is_the_stdlibs_own_challenge() -> None:
    """The handshake is multiprocessing.connection's, run over npipe's connections: it
    interoperates with the stdlib's Client/Listener wherever they share a wire format
    (Windows AF_PIPE); here it runs against the stdlib's own Connection on a socketpair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    from npipe.local.messages import MessageSocket

    conn = connection.Connection(MessageSocket(ours))

    class Stdlib:  # the stdlib's challenge functions call only these two
        def __init__(self, peer: connection.Connection) -> None:
            self.peer = peer

        def send_bytes(self, b: bytes) -> None:
            self.peer.send_bytes(b)

        def recv_bytes(self, n: int | None = None) -> bytes:
            return self.peer.recv_bytes(n)

    other = connection.Connection(MessageSocket(theirs))
    t = threading.Thread(target=lambda: (mpc.answer_challenge(Stdlib(other), b"k"),
                                         mpc.deliver_challenge(Stdlib(other), b"k")))
    t.start()
    mpc.deliver_challenge(conn, b"k")
    mpc.answer_challenge(conn, b"k")
    t.join(10)
    conn.close()
    other.close()


def test_a_byte_pipe_and_a_message_pipe_tell_each_other_apart(
    served: Callable[..., Served], pipe_dir: Path,
) -> None:
    import asyncio

    served("mode")
    with pytest.raises(ConfigError, match="message-mode pipe"):
        asyncio.run(npipe.open_connection("mode"))

    async def byte_pipe() -> None:
        async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.close()

        async with await npipe.start_server(h, "bytes"):
            with pytest.raises(ConfigError, match="byte-mode pipe"):
                await asyncio.to_thread(connection.Client, "bytes")

    asyncio.run(byte_pipe())


def test_second_listener_on_a_live_name_is_refused(served: Callable[..., Served]) -> None:
    served("taken")
    with pytest.raises(npipe.PipeInUse):
        connection.Listener("taken")
    with pytest.raises(npipe.PipeInUse):  # a byte pipe cannot take it either
        import asyncio

        async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            pass

        asyncio.run(npipe.start_server(h, "taken"))


def test_caller_names_the_real_user_and_the_acl_is_checked(
    served: Callable[..., Served], pipe_dir: Path,
) -> None:
    from grpc_support import ensure_test_users, make_traversable, require_root, run_python

    require_root()
    users = ensure_test_users()
    a, b = users["npipe-t1"], users["npipe-t2"]
    make_traversable(pipe_dir.parent)
    server = served("who", acl=npipe.Acl.allow(users=[a.name]))
    make_traversable(pipe_dir)
    child = f"""
        from npipe import connection
        try:
            with connection.Client("who", pipe_dir={str(pipe_dir)!r}, server_user=0) as c:
                c.send_bytes(b"x" * 70000)
                result(len(c.recv_bytes()))
        except Exception as e:
            result(type(e).__name__ + ": " + str(e))
    """
    ok = run_python(child, user=a)
    assert ok.result == 70000, ok
    assert server.listener.last_accepted is not None
    assert server.callers[-1] is not None and server.callers[-1].uid == a.uid
    assert server.callers[-1].user == a.name
    refused = run_python(child, user=b)
    assert isinstance(refused.result, str) and refused.result.startswith("AccessDenied"), refused
    assert all(c is not None and c.uid != b.uid for c in server.callers)


def test_a_listener_gives_its_name_back_on_close(pipe_dir: Path) -> None:
    with connection.Listener("gone") as lst:
        path = lst._impl.claimed.path  # type: ignore[attr-defined]
        assert path.exists()
    assert not path.exists()
    with pytest.raises(npipe.PipeNotFound):
        connection.Client("gone")
    assert os.listdir(pipe_dir) is not None


# --- pipe_mode="byte": a byte pipe carrying the stdlib's own framing ----------------------


@pytest.mark.parametrize("size", SIZES)
def test_byte_mode_keeps_each_boundary(served: Callable[..., Served], size: int) -> None:
    served("bmsgs", pipe_mode="byte", authkey=b"k")
    with connection.Client("bmsgs", b"k", pipe_mode="byte") as c:
        assert not c.poll(0.05)
        c.send_bytes(_pattern(size))
        assert c.poll(10)
        assert c.recv_bytes() == _pattern(size)
        c.send_bytes(b"")
        c.send_bytes(b"after")
        assert [c.recv_bytes(), c.recv_bytes()] == [b"", b"after"]


def test_byte_mode_peer_is_the_stdlibs_connection(served: Callable[..., Served]) -> None:
    server = served("bstd", pipe_mode="byte", authkey=b"k", max_message=2 << 20)
    with npipe.connect("bstd") as sock:
        peer = mpc.Connection(os.dup(sock.fileno()))
        mpc.answer_challenge(peer, b"k")
        mpc.deliver_challenge(peer, b"k")
        for size in SIZES:
            peer.send_bytes(_pattern(size))
            assert peer.recv_bytes() == _pattern(size)
        peer.send({"x": 1})
        assert peer.recv() == {"x": 1}
        peer.close()
    assert server.callers and server.callers[0] is not None
    assert server.callers[0].uid == os.getuid()
    assert server.listener.last_accepted == server.callers[0]


def test_byte_mode_over_limit_is_dropped_and_the_connection_goes_on(
    served: Callable[..., Served],
) -> None:
    served("blim", pipe_mode="byte", max_message=1000)
    with connection.Client("blim", pipe_mode="byte") as c:
        c.send_bytes(b"x" * 70000)
        reply = c.recv_bytes()
        assert reply.startswith(b"too large: bad message length: a message of 70000"), reply
        c.send_bytes(b"ok")
        assert c.recv_bytes() == b"ok"


def test_byte_mode_peer_gone_mid_message_is_eof(served: Callable[..., Served]) -> None:
    def half(conn: connection.Connection) -> None:
        transport: Any = conn._transport  # (byte mode: a ByteModeTransport)
        transport.conn.sendall(b"\0\1\0\0" + b"x" * 1000)  # 65,536 announced, 1000 sent
        conn.close()

    served("bhalf", half, pipe_mode="byte")
    with connection.Client("bhalf", pipe_mode="byte") as c, \
            pytest.raises(EOFError, match="middle of a message"):
        c.recv_bytes()


def test_pipe_modes_must_match_and_be_known(served: Callable[..., Served]) -> None:
    served("mmsg")
    with pytest.raises(ConfigError, match="message-mode pipe"):
        connection.Client("mmsg", pipe_mode="byte")
    with pytest.raises(ConfigError, match="pipe_mode"):
        connection.Client("mmsg", pipe_mode="stream")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="pipe_mode"):
        connection.Listener("other", pipe_mode="bytes")  # type: ignore[arg-type]
