"""npipe forward / expose / relay with real peers: curl, h2load, grpcio, ssh, socat and
plain sockets, locally and across two network namespaces (SMB through a real smbd).

    client ns: curl/h2load/ssh -> npipe forward|relay --SMB--> server ns: smbd
               -> npipe expose --smb -> hypercorn / sshd
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pipe_servers import free_port

from npipe.bridges.endpoint import Endpoint, parse_endpoint
from npipe.bridges.relay import RelayStats, Side, relay
from npipe.errors import AddressError
from npipe.smb import BACKENDS, ENV_BACKEND
from npipe.testing.netns import (
    SmbSite,
    popen_in,
    require_root_and_samba,
    run_in,
    skip_or_fail,
    smb_site,
    tool,
)

APPS = Path(__file__).resolve().parent / "cross_host"
NPIPE = [sys.executable, "-m", "npipe"]
WAIT = 30.0


# --- helpers ------------------------------------------------------------------------------


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        skip_or_fail(f"{', '.join(missing)} not found (apt-get install "
                     f"{' '.join({'h2load': 'nghttp2-client'}.get(t, t) for t in missing)})")


class Running:
    """A process whose stderr (and with ``stdout_too`` its stdout) is collected line by
    line (to wait for a log line)."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
                 ns: str | None = None, stdout_too: bool = False) -> None:
        kw: dict[str, object] = {"env": env, "stdin": subprocess.DEVNULL, "text": True}
        if stdout_too:
            kw |= {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
        else:
            kw |= {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
        self.proc = popen_in(ns, argv, **kw) if ns else subprocess.Popen(argv, **kw)  # type: ignore[call-overload]
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stream = self.proc.stderr or self.proc.stdout
        assert stream is not None
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = WAIT, count: int = 1) -> list[re.Match[str]]:
        """The first ``count`` matches of ``pattern`` in the log, once there are that many."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        with self._changed:
            while True:
                found = [m for line in self.lines if (m := regex.search(line))]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no {count} x {pattern!r} in the log "
                                         f"(exit {self.proc.poll()}):\n{self.log_unlocked()}")
                self._changed.wait(min(left, 0.5))

    def log_unlocked(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"did not stop within {timeout} s:\n{self.log}") from None
        self._reader.join(5)
        return rc


@contextlib.contextmanager
def running(argv: Sequence[str], **kw: object) -> Iterator[Running]:
    r = Running(argv, **kw)  # type: ignore[arg-type]
    try:
        yield r
    finally:
        if r.proc.poll() is None:
            r.stop()


@contextlib.contextmanager
def app(*args: str, ns: str | None = None,
        env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """A bridge_apps.py peer (see there), stopped by closing its stdin."""
    argv = [sys.executable, str(APPS / "bridge_apps.py"), *args]
    kw: dict[str, object] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True,
                             "env": env}
    proc = popen_in(ns, argv, **kw) if ns else subprocess.Popen(argv, **kw)  # type: ignore[call-overload]
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"{args} did not start: {line!r}"
        yield proc
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def forward(address: str, listen: str = "tcp:127.0.0.1:0", *more: str,
            ns: str | None = None, env: dict[str, str] | None = None
            ) -> contextlib.AbstractContextManager[Running]:
    return running([*NPIPE, "forward", address, "--listen", listen, *more], ns=ns, env=env)


def listening_port(fwd: Running) -> int:
    m = fwd.wait_for(r"listening on tcp:(\S+):(\d+),")[0]
    return int(m.group(2))


def exchange(port: int, payload: bytes, *, half_close: bool = True,
             timeout: float = WAIT) -> bytes:
    """Send ``payload`` (while reading), half-close, read to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        got: list[bytes] = []

        def read() -> None:
            with contextlib.suppress(ConnectionResetError):
                while data := s.recv(65536):
                    got.append(data)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(payload)
            if half_close:
                with contextlib.suppress(OSError):  # (already closed by the other side)
                    s.shutdown(socket.SHUT_WR)
        reader.join(timeout)
        assert not reader.is_alive(), "no end of stream"
        return b"".join(got)


def digest_line(data: bytes) -> bytes:
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode()


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("npipe: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def npipe_run(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NPIPE, *args], capture_output=True, text=True,  # type: ignore[call-overload]
                          timeout=kw.pop("timeout", 60), **kw)


# --- address specs ---------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "expected"), [
    ("tcp:127.0.0.1:8080", Endpoint("tcp", host="127.0.0.1", port=8080)),
    ("tcp:localhost:0", Endpoint("tcp", host="localhost", port=0)),
    ("tcp:[::1]:65535", Endpoint("tcp", host="::1", port=65535)),
    ("tcp:example.test:1", Endpoint("tcp", host="example.test", port=1)),
    ("unix:/run/x.sock", Endpoint("unix", path="/run/x.sock")),
    ("unix:rel/x", Endpoint("unix", path="rel/x")),
])
def test_endpoint_specs(spec: str, expected: Endpoint) -> None:
    assert parse_endpoint(spec) == expected
    assert parse_endpoint(str(expected)) == expected  # str() round-trips


@pytest.mark.parametrize(("spec", "why"), [
    ("", "use tcp:HOST:PORT"), ("8080", "use tcp:HOST:PORT"), ("udp:1.2.3.4:5", "use tcp"),
    ("tcp:127.0.0.1", "missing :PORT"), ("tcp::80", "missing host"),
    ("tcp:127.0.0.1:http", "port must be a number"), ("tcp:127.0.0.1:65536", "0-65535"),
    ("tcp:127.0.0.1:-1", "port must be"), ("tcp:::1:80", "in brackets"),
    ("tcp:[::1]80", "tcp:[IPV6]:PORT"), ("tcp:[nope]:80", "not an IPv6 address"),
    ("tcp:[::1:80", "tcp:[IPV6]:PORT"), ("unix:", "needs a socket path"),
])
def test_bad_endpoint_specs(spec: str, why: str) -> None:
    with pytest.raises(AddressError, match=re.escape(why)) as e:
        parse_endpoint(spec)
    assert "\n" not in str(e.value) and repr(spec) in str(e.value)


@pytest.mark.parametrize(("spec", "loopback"), [
    ("tcp:127.0.0.1:1", True), ("tcp:127.8.9.10:1", True), ("tcp:[::1]:1", True),
    ("tcp:localhost:1", True), ("unix:x", True), ("tcp:0.0.0.0:1", False),
    ("tcp:[::]:1", False), ("tcp:198.18.0.1:1", False), ("tcp:example.test:1", False),
])
def test_loopback(spec: str, loopback: bool) -> None:
    assert parse_endpoint(spec).is_loopback is loopback


# --- the relay core, on socket pairs ---------------------------------------------------


async def _pairs() -> tuple[Side, Side, asyncio.StreamReader, asyncio.StreamWriter,
                            asyncio.StreamReader, asyncio.StreamWriter]:
    """Sides "a" and "b" of a relay, and the far ends (a test's peers) of each."""
    ends = []
    for _ in range(2):
        near, far = socket.socketpair()
        ends.append((*await asyncio.open_connection(sock=near),
                     *await asyncio.open_connection(sock=far)))
    (ar, aw, far_ar, far_aw), (br, bw, far_br, far_bw) = ends
    return Side("a", ar, aw), Side("b", br, bw), far_ar, far_aw, far_br, far_bw


@pytest.mark.parametrize(("b_half_close", "keep_reading", "a_gets", "ended"), [
    (True, False, b"answer", "closed by a then b"),  # both can: the answer comes
    (False, False, b"", "closed by a (b has no half-close)"),  # an SMB pipe: all ends
    (False, True, b"answer", "closed by b"),  # npipe relay: reads on until b ends
])
def test_relay_end_of_stream(b_half_close: bool, keep_reading: bool, a_gets: bytes,
                             ended: str) -> None:
    async def go() -> tuple[bytes, RelayStats]:
        a, b, far_ar, far_aw, far_br, far_bw = await _pairs()
        b.half_close = b_half_close
        b.final = not b_half_close
        running = asyncio.create_task(relay(a, b, keep_reading=keep_reading))
        far_aw.write(b"question")
        far_aw.write_eof()
        assert await asyncio.wait_for(far_br.readexactly(8), WAIT) == b"question"
        with contextlib.suppress(ConnectionError):
            far_bw.write(b"answer")
            await far_bw.drain()
            if b_half_close:
                assert await far_br.read() == b""  # the half-close came through
                far_bw.write_eof()
            else:
                await asyncio.sleep(0.2)
                far_bw.close()
        got = await asyncio.wait_for(far_ar.read(), WAIT)
        stats = await asyncio.wait_for(running, WAIT)
        for w in (far_aw, far_bw):
            w.close()
        return got, stats

    got, stats = asyncio.run(go())
    assert got == a_gets and stats.ended == ended
    assert stats.a_to_b == 8 and stats.b_to_a == len(a_gets) and stats.duration > 0


# --- command-line errors ---------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["forward", "p", "--listen", "tcp:127.0.0.1"], "missing :PORT"),
    (["forward", "p", "--listen", "bogus"], "bad endpoint 'bogus'"),
    (["forward", "p"], "missing --listen"),
    (["forward", "//", "--listen", "tcp:127.0.0.1:0"], "//"),
    (["forward", "p", "--listen", "tcp:0.0.0.0:0"], "--allow-remote-listen"),
    (["forward", "p", "--listen", "tcp:[::]:0"], "not a loopback address"),
    (["expose", "p", "--to", "tcp:h"], "missing :PORT"),
    (["expose", "p"], "missing --to"),
    (["expose", "p", "--to", "tcp:127.0.0.1:1", "--acl", "nobody"], "bad ACL entry"),
    (["relay", "bad/name"], "bad/name"),
])
def test_bad_usage_is_one_line_and_exit_2(pipe_dir: Path, args: list[str],
                                          message: str) -> None:
    done = npipe_run(*args)
    assert done.returncode == 2, done.stderr
    assert message in one_line_error(done)


def test_forward_max_connections_must_be_positive(pipe_dir: Path) -> None:
    done = npipe_run("forward", "p", "--listen", "tcp:127.0.0.1:0", "--max-connections", "0")
    assert done.returncode == 2  # argparse's usage error
    assert "argument --max-connections: '0': must be 1 or more" in done.stderr


def test_remote_listen_refusal_says_why(pipe_dir: Path) -> None:
    line = one_line_error(npipe_run("forward", "p", "--listen", "tcp:0.0.0.0:0"))
    assert "anyone who can reach it" in line and "credentials" in line


def test_relay_to_a_missing_pipe_is_one_line_and_exit_1(pipe_dir: Path) -> None:
    done = npipe_run("relay", "nosuchpipe", input="")
    assert done.returncode == 1 and done.stdout == ""
    assert "nosuchpipe" in one_line_error(done)


# --- forward, locally -----------------------------------------------------------------


def test_forward_half_close_and_byte_counts(pipe_dir: Path) -> None:
    """A local pipe has half-close: the client shuts its sending side and still gets the
    reply; the log line counts the bytes each way."""
    payload = os.urandom(300_000)
    with app("pipe", "digest", "fwd-digest"), forward("fwd-digest") as fwd:
        port = listening_port(fwd)
        assert exchange(port, payload) == digest_line(payload)
        line = fwd.wait_for(r"127\.0\.0\.1:\d+ -> pipe \S*fwd-digest: .*")[0].group(0)
    reply = len(digest_line(payload))
    assert f": {len(payload)} B to pipe, {reply} B from pipe, " in line
    assert re.search(r"\d+\.\d{3} s, closed by client then pipe$", line), line


def test_forward_fifty_concurrent_connections(pipe_dir: Path) -> None:
    payloads = [os.urandom(50_000 + i) for i in range(50)]
    with app("pipe", "digest", "fwd-many"), forward("fwd-many") as fwd:
        port = listening_port(fwd)
        barrier = threading.Barrier(50)

        def one(payload: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
                barrier.wait(WAIT)  # all 50 open at once
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                return b"".join(iter(lambda: s.recv(65536), b""))

        with ThreadPoolExecutor(50) as pool:
            replies = list(pool.map(one, payloads))
        assert replies == [digest_line(p) for p in payloads]
        lines = fwd.wait_for(r"-> pipe \S*fwd-many: (\d+) B to pipe", count=50)
    assert sorted(int(m.group(1)) for m in lines) == sorted(len(p) for p in payloads)


def test_forward_max_connections_makes_callers_wait(pipe_dir: Path) -> None:
    """At --max-connections the forwarder accepts no more: a third caller's connect()
    succeeds (the listen backlog holds it), but nothing reaches the pipe until one of
    the first two goes; then it is served. One warning says so."""
    with app("pipe", "echo", "fwd-cap"), \
            forward("fwd-cap", "tcp:127.0.0.1:0", "--max-connections", "2") as fwd:
        port = listening_port(fwd)
        first = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(2)]
        for s in first:
            s.sendall(b"ping")
            assert s.recv(10) == b"ping"
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as third:
            third.sendall(b"third")
            third.settimeout(1.0)
            with pytest.raises(TimeoutError):
                third.recv(10)  # waiting: not accepted, no pipe instance
            fwd.wait_for(r"has 2 connections, its max_connections: further callers wait")
            first[0].close()
            third.settimeout(WAIT)
            assert third.recv(10) == b"third"
        first[1].close()
        lines = fwd.wait_for(r"-> pipe \S*fwd-cap: (\d+) B to pipe", count=3)
    assert sorted(int(m.group(1)) for m in lines) == [4, 4, 5]
    assert fwd.log.count("its max_connections") == 1


def test_forward_backpressure_keeps_memory_bounded(pipe_dir: Path) -> None:
    """A pipe that sends 192 MiB to a client that does not read: the forwarder stops
    reading the pipe instead of buffering it (its RSS hardly grows), and every byte
    arrives once the client reads."""
    total = 192 * 1024 * 1024
    with app("pipe", f"flood:{total}", "fwd-flood"), forward("fwd-flood") as fwd:
        port = listening_port(fwd)
        before = rss_kib(fwd.proc.pid)
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            time.sleep(3)  # the flood fills every buffer on the way, then stops
            stalled = rss_kib(fwd.proc.pid)
            received = 0
            while data := s.recv(1 << 20):
                received += len(data)
        assert received == total
        line = fwd.wait_for(r"-> pipe \S*fwd-flood: .*")[0].group(0)
    assert f"0 B to pipe, {total} B from pipe" in line
    assert stalled - before < 32 * 1024, f"RSS grew {stalled - before} KiB with a slow reader"


def test_forward_client_reset_ends_cleanly(pipe_dir: Path) -> None:
    """A client that vanishes (RST) mid-stream: one log line saying so, no traceback, and
    the forwarder serves the next connection."""
    import struct

    with app("pipe", "echo", "fwd-reset"), forward("fwd-reset") as fwd:
        port = listening_port(fwd)
        s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        s.sendall(b"x" * 1000)
        echoed = b""
        while len(echoed) < 1000 and (data := s.recv(1000)):
            echoed += data
        # All of the echo is in: nothing is on its way to the client, so the forwarder
        # can only learn of the reset by reading from the client (not as "closed by
        # client": a reset is not an end of stream; nor by writing to it).
        assert echoed == b"x" * 1000
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # with linger 0: a reset
        line = fwd.wait_for(r"-> pipe \S*fwd-reset: .*")[0].string
        reset = f"[Errno {errno.ECONNRESET}] {os.strerror(errno.ECONNRESET)}"
        assert re.search(r": 1000 B to pipe, 1000 B from pipe, \d+\.\d{3} s, client lost: "
                         rf"ConnectionResetError: {re.escape(reset)}$", line), line
        assert exchange(port, b"again") == b"again"
        assert fwd.stop() == 0
    assert "Traceback" not in fwd.log and "ERROR" not in fwd.log


def test_forward_to_a_missing_pipe_closes_that_connection_only(pipe_dir: Path) -> None:
    with forward("fwd-later") as fwd:
        port = listening_port(fwd)
        assert exchange(port, b"x") == b""  # closed at once
        line = fwd.wait_for(r"cannot open pipe \S*fwd-later")[0].string
        assert "Traceback" not in fwd.log and "; connection closed" in line
        with app("pipe", "digest", "fwd-later"):  # the forwarder is still there
            assert exchange(port, b"now") == digest_line(b"now")
        assert fwd.proc.poll() is None
        assert fwd.stop() == 0


def test_forward_on_a_unix_socket_owner_only(pipe_dir: Path) -> None:
    path = pipe_dir.parent / "fwd.sock"
    with app("pipe", "echo", "fwd-unix"), forward("fwd-unix", f"unix:{path}") as fwd:
        fwd.wait_for(rf"listening on unix:{re.escape(str(path))},")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(WAIT)
            s.connect(str(path))
            s.sendall(b"hello")
            s.shutdown(socket.SHUT_WR)
            assert b"".join(iter(lambda: s.recv(100), b"")) == b"hello"
        assert fwd.stop() == 0
    assert not path.exists()  # removed on exit
    with app("pipe", "echo", "fwd-unix2"), \
            forward("fwd-unix2", f"unix:{path}", "--mode", "660") as fwd:
        fwd.wait_for("listening on")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660


def test_sigterm_stops_promptly_with_a_grace(pipe_dir: Path) -> None:
    with app("pipe", "echo", "fwd-term"), forward("fwd-term", "tcp:127.0.0.1:0",
                                                  "--grace", "1") as fwd:
        port = listening_port(fwd)
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            s.sendall(b"ping")
            assert s.recv(10) == b"ping"  # open and idle: the grace runs out
            started = time.monotonic()
            assert fwd.stop(signal.SIGTERM) == 0
            took = time.monotonic() - started
            assert s.recv(10) == b""  # its connection was closed
    assert took < 5, f"took {took:.1f} s"
    assert "1 connection(s) open (grace 1 s)" in fwd.log
    assert re.search(r"-> pipe \S*fwd-term: 4 B to pipe, 4 B from pipe, .*, stopped", fwd.log)
    assert "Traceback" not in fwd.log


def test_sigint_without_connections_exits_0(pipe_dir: Path) -> None:
    with forward("fwd-int") as fwd:
        listening_port(fwd)
        assert fwd.stop(signal.SIGINT, timeout=5) == 0


def test_grpc_through_forward(pipe_dir: Path) -> None:
    """grpcio dials 127.0.0.1:PORT; the Buy service is on a pipe (npipe demo --serve)."""
    import grpc

    from npipe.examples.buy import buy_pb2, buy_pb2_grpc

    demo = subprocess.Popen([*NPIPE, "demo", "--serve", "--pipe", "fwd-grpc"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert demo.stdout is not None
        assert demo.stdout.readline().startswith("serving buy.MyService")
        with forward("fwd-grpc") as fwd:
            port = listening_port(fwd)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = buy_pb2_grpc.MyServiceStub(channel)  # type: ignore[no-untyped-call]
                replies = [stub.Buy(buy_pb2.BuyRequest(id="pear", quantity=q, price=7),
                                    timeout=WAIT).result for q in (1, 2, 3)]
            assert replies[2].startswith("bought 3 x 'pear' for 21")
            assert [r.split(" (")[0] for r in replies] == [
                f"bought {q} x 'pear' for {7 * q}" for q in (1, 2, 3)]
            fwd.wait_for(r"-> pipe \S*fwd-grpc: [1-9]\d* B to pipe, [1-9]\d* B from pipe")
    finally:
        demo.send_signal(signal.SIGINT)
        demo.wait(10)


# --- expose, locally -----------------------------------------------------------------


def expose(name: str, to: str, *more: str, ns: str | None = None,
           env: dict[str, str] | None = None) -> contextlib.AbstractContextManager[Running]:
    return running([*NPIPE, "expose", name, "--to", to, *more], ns=ns, env=env)


def pipe_exchange(name: str, payload: bytes, *, half_close: bool = True) -> bytes:
    """Through the pipe with npipe's own client."""
    import npipe

    async def go() -> bytes:
        reader, writer = await npipe.open_connection(name)
        try:
            writer.write(payload)
            await writer.drain()
            if half_close:
                writer.write_eof()
            return await asyncio.wait_for(reader.read(), WAIT)
        except ConnectionError:  # closed by the other side with what was sent unread
            return b""
        finally:
            writer.close()

    return asyncio.run(go())


def test_expose_logs_the_caller_and_half_closes(pipe_dir: Path) -> None:
    target = pipe_dir.parent / "digest.sock"
    payload = os.urandom(200_000)
    with app("unix", "digest", str(target)), expose("exp-digest", f"unix:{target}") as exp:
        exp.wait_for(r"serving pipe exp-digest, relaying to unix:")
        assert pipe_exchange("exp-digest", payload) == digest_line(payload)
        line = exp.wait_for(r"caller .* on pipe exp-digest -> .*")[0].string
    me = f"uid={os.getuid()} pid={os.getpid()}"
    assert me in line, line
    assert f"{len(payload)} B to target, {len(digest_line(payload))} B from target" in line


def test_expose_unreachable_target_is_one_line(pipe_dir: Path) -> None:
    nothing = pipe_dir.parent / "nothing.sock"
    with expose("exp-none", f"unix:{nothing}") as exp:
        exp.wait_for("serving pipe exp-none")
        assert pipe_exchange("exp-none", b"hello") == b""
        line = exp.wait_for(r"cannot reach")[0].string
        assert str(nothing) in line and "caller's connection closed" in line
        port = free_port()  # nobody listens there
    with expose("exp-none", f"tcp:127.0.0.1:{port}") as exp:
        exp.wait_for("serving pipe exp-none")
        assert pipe_exchange("exp-none", b"hello") == b""
        assert "refused" in exp.wait_for(r"cannot reach")[0].string
        assert exp.stop() == 0
    assert "Traceback" not in exp.log


# --- readiness (sd_notify) --------------------------------------------------------------


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[socket.socket, dict[str, str]]]:
    d = tempfile.mkdtemp(prefix="npn", dir="/tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(os.path.join(d, "notify"))
        sock.settimeout(WAIT)
        yield sock, {**os.environ, "NOTIFY_SOCKET": os.path.join(d, "notify")}
    finally:
        sock.close()
        shutil.rmtree(d, ignore_errors=True)


def test_forward_ready_once_the_port_is_bound(pipe_dir: Path) -> None:
    with app("pipe", "echo", "rdy-fwd"), notify_socket() as (sock, env), \
            forward("rdy-fwd", env=env) as fwd:
        message = sock.recv(4096).decode()
        # Usable the moment READY=1 arrives: connect at once, before reading the log.
        port = int(re.search(r"STATUS=listening on tcp:127\.0\.0\.1:(\d+),", message)[1])  # type: ignore[index]
        assert "READY=1" in message.splitlines()
        assert f"MAINPID={fwd.proc.pid}" in message.splitlines()
        assert exchange(port, b"ready?") == b"ready?"
        assert fwd.stop() == 0
        assert "STOPPING=1" in sock.recv(4096).decode().splitlines()


def test_expose_ready_once_the_pipe_is_claimed(pipe_dir: Path) -> None:
    target = pipe_dir.parent / "echo.sock"
    with app("unix", "echo", str(target)), notify_socket() as (sock, env), \
            expose("rdy-exp", f"unix:{target}", env=env):
        message = sock.recv(4096).decode()
        assert "READY=1" in message.splitlines()
        assert "STATUS=serving pipe rdy-exp, relaying to unix:" in message
        assert pipe_exchange("rdy-exp", b"ready?") == b"ready?"


def test_forward_config_file(pipe_dir: Path) -> None:
    """ADDRESS and --listen from --config (a systemd unit's usual form)."""
    config = pipe_dir.parent / "forward.toml"
    config.write_text('address = "cfg-fwd"\nlisten = "tcp:127.0.0.1:0"\ngrace = 1\n')
    with app("pipe", "echo", "cfg-fwd"), \
            running([*NPIPE, "forward", "--config", str(config)]) as fwd:
        assert exchange(listening_port(fwd), b"configured") == b"configured"


# --- relay: stdin/stdout <-> pipe ------------------------------------------------------


def test_relay_files_both_ways_and_half_close(pipe_dir: Path) -> None:
    """stdin a file, stdout a file (read and written without the event loop): the end of
    stdin half-closes the local pipe, the echo comes back whole, exit 0."""
    data = os.urandom(3 * 1024 * 1024 + 17)
    src, dst = pipe_dir.parent / "in.bin", pipe_dir.parent / "out.bin"
    src.write_bytes(data)
    with app("pipe", "echo", "rl-files"), src.open("rb") as fin, dst.open("wb") as fout:
        done = subprocess.run([*NPIPE, "relay", "rl-files"], stdin=fin, stdout=fout,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == ""
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_relay_pipes_digest(pipe_dir: Path) -> None:
    data = os.urandom(1024 * 1024)
    with app("pipe", "digest", "rl-digest"):
        done = subprocess.run([*NPIPE, "relay", "rl-digest"], input=data,
                              capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == digest_line(data)  # nothing but the pipe's bytes on stdout


def test_socat_exec_relay_stdio(pipe_dir: Path) -> None:
    """socat - EXEC:"npipe relay NAME": a few MiB of random bytes there and back."""
    need("socat")
    data = os.urandom(4 * 1024 * 1024)
    relay = " ".join([*NPIPE, "relay", "sc-echo"])
    with app("pipe", "echo", "sc-echo"):
        done = subprocess.run(["socat", "-t", "30", "-", f"EXEC:{relay}"], input=data,
                              capture_output=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(done.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


def test_socat_tcp_listen_to_relay(pipe_dir: Path) -> None:
    """socat TCP-LISTEN -> EXEC npipe relay (one socketpair for stdin and stdout):
    random bytes both ways, and a half-close passed on to the pipe."""
    need("socat")
    port = free_port()
    data = os.urandom(5 * 1024 * 1024)
    relay = " ".join([*NPIPE, "relay", "sc-tcp"])
    with app("pipe", "echo", "sc-tcp"), running(
        ["socat", "-d", "-d", "-t", "30", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr",
         f"EXEC:{relay}"]
    ) as socat:
        socat.wait_for("listening on")
        assert hashlib.sha256(exchange(port, data)).digest() == hashlib.sha256(data).digest()
        assert socat.proc.wait(30) == 0


# --- across two hosts: SMB through a real smbd ------------------------------------------

ALICE, PASSWORD = "npt-bralice", "Bridge-Passw0rd!"


@pytest.fixture(scope="module")
def site() -> Iterator[SmbSite]:
    require_root_and_samba()
    with smb_site({ALICE: PASSWORD}, prefix="npb") as bed:
        yield bed


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each cross-host test runs with each SMB client backend (the client apps inherit
    $NPIPE_SMB_BACKEND)."""
    monkeypatch.setenv(ENV_BACKEND, request.param)
    return str(request.param)


def client_env() -> dict[str, str]:
    return {**os.environ, "NPIPE_USER": ALICE, "NPIPE_PASSWORD": PASSWORD}


def in_client(site: SmbSite, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    kw.setdefault("timeout", 120)
    done = run_in(site.hosts.client_ns, argv, env=client_env(), capture_output=True,
                  text=True, **kw)
    assert done.returncode == 0, f"{argv[0]} exit {done.returncode}: {done.stderr[-2000:]}"
    return done


def expose_smb(site: SmbSite, name: str, to: str) -> contextlib.AbstractContextManager[Running]:
    return expose(name, to, "--smb", "--acl", f"user:{ALICE}", ns=site.hosts.server_ns,
                  env=site.server_env())


def test_http_through_forward_across_hosts(site: SmbSite, backend: str) -> None:
    """curl (HTTP/1.1, h2c) and h2load in the client host -> npipe forward -> SMB ->
    npipe expose --smb -> hypercorn on a Unix socket in the server host."""
    need("curl", "h2load")
    sock = Path(tempfile.mkdtemp(prefix="http", dir=site.workdir)) / "s"  # new each run
    body = site.workdir / "body.bin"
    body.write_bytes(os.urandom(1024 * 1024))
    hypercorn = popen_in(site.hosts.server_ns, [sys.executable, "-m", "hypercorn",
                                                "bridge_apps:app", "--bind", f"unix:{sock}"],
                         cwd=APPS, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + WAIT
        while not accepts(sock):  # bound is not yet listening: connect to know
            assert time.monotonic() < deadline and hypercorn.poll() is None, "no hypercorn"
            time.sleep(0.1)
        with expose_smb(site, "web", f"unix:{sock}") as exp, \
                forward(site.address("web"), ns=site.hosts.client_ns, env=client_env()) as fwd:
            exp.wait_for("serving pipe web")
            url = f"http://127.0.0.1:{listening_port(fwd)}"
            try:
                empty = hashlib.sha256(b"").hexdigest()
                out = in_client(site, ["curl", "-sS", "--http1.1", f"{url}/one"]).stdout
                assert out == f"HTTP/1.1 GET /one 0 {empty}"
                out = in_client(site, ["curl", "-sS", "--http2-prior-knowledge",
                                       "--data-binary", f"@{body}", f"{url}/up"]).stdout
                sha = hashlib.sha256(body.read_bytes()).hexdigest()
                assert out == f"HTTP/2 POST /up {1024 * 1024} {sha}"
                load = in_client(site, ["h2load", "-n", "400", "-c", "8", "-m", "4",
                                        f"{url}/load"]).stdout
                assert re.search(r"requests: 400 total, 400 started, 400 done, "
                                 r"400 succeeded, 0 failed, 0 errored", load), load
                # The expose log names the SMB user and the client host of every caller.
                callers = exp.wait_for(rf"caller \S*{ALICE} .*on pipe web -> unix:", count=10)
                assert all(f"from {site.hosts.client_ip}" in m.string for m in callers)
                fwd.wait_for(r"-> pipe \S*198\.18\.0\.1\S*web: [1-9]\d* B to pipe", count=10)
            except AssertionError as e:  # with both logs: what each side saw
                raise AssertionError(f"{e}\nforward:\n{fwd.log}\nexpose:\n{exp.log}") from None
            assert fwd.stop() == 0 and exp.stop() == 0
        assert "Traceback" not in fwd.log + exp.log
    finally:
        hypercorn.terminate()
        hypercorn.wait(10)


def test_curl_and_h2load_through_forward_to_serve_asgi_across_hosts(
        site: SmbSite, backend: str) -> None:
    """curl (HTTP/1.1, h2c) and h2load in the client host -> npipe forward -> SMB ->
    npipe serve-asgi --smb in the server host (no expose: hypercorn gets the pipe's
    connections itself), the SMB caller reaching the app."""
    need("curl", "h2load")
    body = site.workdir / "asgi-body.bin"
    body.write_bytes(os.urandom(3 * 1024 * 1024))
    serve = [*NPIPE, "serve-asgi", "bridge_apps:app", "--pipe", "webasgi", "--smb",
             "--acl", f"user:{ALICE}"]
    env = {**site.server_env(), "PYTHONPATH": str(APPS)}
    with running(serve, ns=site.hosts.server_ns, env=env) as srv, \
            forward(site.address("webasgi"), ns=site.hosts.client_ns, env=client_env()) as fwd:
        srv.wait_for("serving bridge_apps:app on")
        url = f"http://127.0.0.1:{listening_port(fwd)}"
        try:
            empty = hashlib.sha256(b"").hexdigest()
            out = in_client(site, ["curl", "-sS", "-f", "--http1.1", f"{url}/one"]).stdout
            assert out == f"HTTP/1.1 GET /one 0 {empty} caller={ALICE}", out
            out = in_client(site, ["curl", "-sS", "-f", "--http2-prior-knowledge",
                                   "--data-binary", f"@{body}", f"{url}/up"]).stdout
            sha = hashlib.sha256(body.read_bytes()).hexdigest()
            assert out == f"HTTP/2 POST /up {3 * 1024 * 1024} {sha} caller={ALICE}", out
            # (h2 only: h2load --h1 counts hypercorn's reason-less "HTTP/1.1 200 " status
            # lines as failures, behind plain hypercorn on TCP too.)
            load = in_client(site, ["h2load", "-n", "300", "-c", "6", "-m", "4",
                                    f"{url}/load"]).stdout
            assert re.search(r"requests: 300 total, 300 started, 300 done, "
                             r"300 succeeded, 0 failed, 0 errored", load), load
        except AssertionError as e:
            raise AssertionError(f"{e}\nforward:\n{fwd.log}\nserve-asgi:\n{srv.log}") from None
        assert fwd.stop() == 0 and srv.stop() == 0
    assert "Traceback" not in fwd.log + srv.log


GRPC_CLIENT = """
import sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from npipe.examples.buy import buy_pb2, buy_pb2_grpc
with grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}") as channel:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                       timeout=20)
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(health.status))
    stub = buy_pb2_grpc.MyServiceStub(channel)
    for q in (1, 2, 3):
        print(stub.Buy(buy_pb2.BuyRequest(id="pear", quantity=q, price=7), timeout=20).result)
"""


def test_grpcio_through_forward_to_serve_grpc_across_hosts(
        site: SmbSite, backend: str) -> None:
    """A plain grpcio client (insecure_channel to 127.0.0.1:PORT) in the client host ->
    npipe forward -> SMB -> npipe serve-grpc --smb in the server host: health and the
    Buy service answer on one HTTP/2 connection, and the servicer sees the SMB user."""
    serve = [*NPIPE, "serve-grpc", "npipe.examples.buy.serve:add_services", "--pipe",
             "shopfwd", "--smb", "--acl", f"user:{ALICE}"]
    with running(serve, ns=site.hosts.server_ns, env=site.server_env(),
                 stdout_too=True) as srv, \
            forward(site.address("shopfwd"), ns=site.hosts.client_ns, env=client_env()) as fwd:
        srv.wait_for("serving buy.MyService on")  # (on stderr)
        try:
            out = in_client(site, [sys.executable, "-c", GRPC_CLIENT,
                                   str(listening_port(fwd))]).stdout.splitlines()
            assert out[0] == "SERVING", out
            assert [line.split(" (caller: ")[0] for line in out[1:]] == [
                f"bought {q} x 'pear' for {7 * q}" for q in (1, 2, 3)], out
            assert all(ALICE in line for line in out[1:]), out
            # grpcio keeps one connection: one pipe instance carried all four calls.
            fwd.wait_for(r"-> pipe \S*198\.18\.0\.1\S*shopfwd: [1-9]\d* B to pipe")
        except AssertionError as e:
            raise AssertionError(f"{e}\nforward:\n{fwd.log}\nserve-grpc:\n{srv.log}") from None
        assert fwd.stop() == 0 and srv.stop() == 0
    assert fwd.log.count(" B to pipe, ") == 1
    assert "Traceback" not in fwd.log + srv.log


HALF_CLOSE_CLIENT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
s.sendall(b"ping")
if sys.argv[2] == "echo":
    print(s.recv(10).decode())
s.shutdown(socket.SHUT_WR)
print(repr(b"".join(iter(lambda: s.recv(100), b""))))
"""


def test_smb_pipe_has_no_half_close(site: SmbSite, backend: str) -> None:
    """Over SMB a client's half-close ends the whole connection: a request/response
    exchange works, but a server that answers only at end of stream never gets to."""
    with app("pipe", "echo", "hc-echo", "--smb", "--acl", f"user:{ALICE}",
             ns=site.hosts.server_ns, env=site.server_env()), \
            app("pipe", "digest", "hc-digest", "--smb", "--acl", f"user:{ALICE}",
                ns=site.hosts.server_ns, env=site.server_env()), \
            forward(site.address("hc-echo"), ns=site.hosts.client_ns, env=client_env()) as echo, \
            forward(site.address("hc-digest"), ns=site.hosts.client_ns,
                    env=client_env()) as digest:
        out = in_client(site, [sys.executable, "-c", HALF_CLOSE_CLIENT,
                               str(listening_port(echo)), "echo"]).stdout
        assert out == "ping\nb''\n"
        out = in_client(site, [sys.executable, "-c", HALF_CLOSE_CLIENT,
                               str(listening_port(digest)), "digest"]).stdout
        assert out == "b''\n"  # no digest: the pipe was closed, not half-closed
        for fwd in (echo, digest):
            line = fwd.wait_for(r"-> pipe \S*198\.18\.0\.1\S*: 4 B to pipe")[0].string
            assert line.endswith("closed by client (pipe has no half-close)"), line


def test_ssh_proxycommand_through_relay(site: SmbSite, backend: str) -> None:
    """ssh -o ProxyCommand="npipe relay //SERVER/pipe/ssh" -> SMB -> npipe expose --smb
    -> an sshd of the test's own (own host key, own authorized key) in the server host."""
    need("ssh", "ssh-keygen")
    sshd = tool("sshd")
    if sshd is None:
        skip_or_fail("sshd not found (apt-get install openssh-server)")
    d = Path(tempfile.mkdtemp(prefix="ssh", dir=site.workdir))
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                       check=True, timeout=30)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
    )
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    with running([sshd, "-D", "-e", "-f", str(d / "sshd_config")],
                 ns=site.hosts.server_ns) as daemon, \
            expose_smb(site, "ssh", f"tcp:127.0.0.1:{port}") as exp:
        daemon.wait_for("Server listening on 127.0.0.1")
        exp.wait_for("serving pipe ssh")
        relay = " ".join([*NPIPE, "relay", site.address("ssh")])
        user = pwd.getpwuid(os.getuid()).pw_name
        done = in_client(site, [
            "ssh", "-F", "none", "-i", str(d / "user_key"), "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", f"UserKnownHostsFile={d / 'known_hosts'}", "-o", f"ProxyCommand={relay}",
            "-o", "LogLevel=ERROR", f"{user}@bridged-host", "echo hello-over-a-pipe; id -u",
        ])
        assert done.stdout == f"hello-over-a-pipe\n{os.getuid()}\n"
        line = exp.wait_for(rf"caller \S*{ALICE} .*on pipe ssh -> tcp:127\.0\.0\.1:{port}: ")
        assert re.search(r"[1-9]\d* B to target, [1-9]\d* B from target", line[0].string)
