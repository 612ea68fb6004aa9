"""Dead peers: a connection whose server vanished without a FIN (power off, a dropped
route) fails its pipes with ConnectionLost within ``Options.dead_peer_timeout``; healthy
connections, quiet or busy, are left alone.

The cross-host part runs a real smbd in one network namespace and the native client in
another (npipe.testing.netns), and silences the path between them mid-call: each side's
neighbour entry for the other is pointed at a MAC nobody has, so every packet either
way vanishes (nothing is refused, no RST, no ICMP, the sending kernel reports success),
as when a peer is switched off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pipe_servers import PipeServer, echo
from smb_tamper import TamperProxy

from npipe.address import parse_address
from npipe.errors import ConnectionLost
from npipe.samba.smbd import PrivateSmbd
from npipe.smb.credentials import Credentials
from npipe.smb.native import NativeClient, Options
from npipe.smb.native.connection import (
    KEEPALIVE_PROBES,
    Liveness,
    SmbConnection,
    keepalive_settings,
)
from npipe.testing.netns import (
    Hosts,
    SmbSite,
    popen_in,
    require_root_and_samba,
    run_in,
    smb_site,
    tool,
)

APPS = Path(__file__).resolve().parent / "cross_host"
ALICE, PASSWORD = "npt-alice", "Pipe-Passw0rd!"
TIMEOUT = 3.0  # Options.dead_peer_timeout in the cross-host tests


# --- the ECHO rule (sans-I/O) ----------------------------------------------------------

ECHO, DEAD = Liveness.ECHO, Liveness.DEAD


def test_nothing_outstanding_means_no_echo_however_long_the_silence() -> None:
    live = Liveness(10)
    assert live.poll(now=1000, heard=0, waiting=False) == (None, 1005)
    assert live.echo_sent is None


def test_a_waiting_connection_echoes_after_half_the_timeout_of_silence() -> None:
    live = Liveness(10)
    assert live.poll(now=102, heard=100, waiting=True) == (None, 105)  # not yet
    assert live.poll(now=105, heard=100, waiting=True) == (ECHO, 110)
    assert live.poll(now=107, heard=100, waiting=True) == (None, 110)  # one at a time


def test_an_unanswered_echo_means_dead_at_the_timeout() -> None:
    live = Liveness(10)
    assert live.poll(now=105, heard=100, waiting=True) == (ECHO, 110)
    assert live.poll(now=109.9, heard=100, waiting=True) == (None, 110)
    assert live.poll(now=110, heard=100, waiting=True) == (DEAD, 110)


def test_anything_heard_answers_the_echo() -> None:
    live = Liveness(10)
    assert live.poll(now=105, heard=100, waiting=True)[0] == ECHO
    # The ECHO's answer (or any other message) came at 105.2: the next ECHO is due
    # half a timeout after it, if the silence lasts.
    assert live.poll(now=110, heard=105.2, waiting=True) == (None, 110.2)
    assert live.echo_sent is None
    assert live.poll(now=110.2, heard=105.2, waiting=True) == (ECHO, 115.2)


def test_a_busy_answering_connection_never_echoes() -> None:
    live = Liveness(4)
    now = 0.0
    while now < 100:  # answers every 0.5 s, polled whenever it asks
        heard = now - now % 0.5
        action, wake = live.poll(now, heard, waiting=True)
        assert action is None and wake > now
        now = wake


def test_an_echo_without_credits_waits_and_counts_no_silence_against_the_server() -> None:
    live = Liveness(10)
    assert live.poll(now=105, heard=100, waiting=True, can_echo=False) == (None, 110)
    assert live.poll(now=200, heard=100, waiting=True, can_echo=False) == (None, 205)
    assert live.poll(now=205, heard=100, waiting=True) == (ECHO, 210)


def test_the_timeout_must_be_positive() -> None:
    for bad in (0, -1.0):
        with pytest.raises(ValueError):
            Liveness(bad)


def test_keepalive_follows_the_timeout() -> None:
    assert keepalive_settings(30) == (15, 5, KEEPALIVE_PROBES)
    for timeout in (30, 60, 12):
        idle, interval, probes = keepalive_settings(timeout)
        assert idle + interval * probes == timeout
    assert keepalive_settings(0.5) == (1, 1, KEEPALIVE_PROBES)  # whole seconds, >= 1


def _keepalive_of(options: Options | None) -> tuple[int, ...]:
    async def main() -> tuple[int, ...]:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        transport, _link = await loop.create_connection(
            lambda: SmbConnection("127.0.0.1", port, options), "127.0.0.1", port)
        sock = transport.get_extra_info("socket")
        values = [sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)]
        if hasattr(socket, "TCP_KEEPIDLE"):
            values += [sock.getsockopt(socket.IPPROTO_TCP, o) for o in
                       (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)]
        transport.abort()
        server.close()
        return tuple(values)

    return asyncio.run(main())


def test_a_link_sets_tcp_keepalive() -> None:
    values = _keepalive_of(Options(dead_peer_timeout=12))
    assert values[0] != 0
    if len(values) > 1:  # Linux
        assert values[1:] == keepalive_settings(12)
    assert _keepalive_of(Options(dead_peer_timeout=None))[0] == 0
    assert Options().dead_peer_timeout == 30.0  # the default


# --- a server that stops answering (TCP stays up) ---------------------------------------

STALL_USER, STALL_PASSWORD = "npt-deadpeer", "npt-deadpeer-Pw-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_a_server_that_stops_answering_fails_a_pending_read() -> None:
    """smbd behind a proxy that stops forwarding its messages (the TCP connection stays
    up, so TCP keepalive sees nothing wrong): only the unanswered ECHO tells, and the
    pending read fails with ConnectionLost within the timeout."""
    require_root_and_samba()
    timeout = 2.0
    workdir = Path(tempfile.mkdtemp(prefix="npdp", dir="/tmp"))
    try:
        with PrivateSmbd(workdir / "smbd", port=_free_port(), bind_address="127.0.0.1",
                         users={STALL_USER: STALL_PASSWORD}) as smbd:
            server = PipeServer(smbd.np_dir, "echo", echo)
            try:
                with TamperProxy(smbd.port) as proxy:
                    result = asyncio.run(asyncio.wait_for(
                        _read_until_stalled(proxy, timeout), 60))
                    assert proxy.fired.is_set()
            finally:
                server.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(result)
    assert result["error"] == "ConnectionLost", result
    assert result["echoes"] >= 1, result
    assert timeout * 0.5 <= result["seconds"] <= timeout * 2, result


async def _read_until_stalled(proxy: TamperProxy, timeout: float) -> dict[str, Any]:
    client = NativeClient(Options(dead_peer_timeout=timeout))
    reader, writer = await client.open_pipe(
        parse_address(proxy.address("echo")),
        credentials=Credentials(STALL_USER, STALL_PASSWORD), timeout=20)
    link = writer.transport.link  # type: ignore[attr-defined]
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    proxy.tamper(lambda index, frame: True, "stall")  # from the next server message on
    start = time.monotonic()
    try:
        await asyncio.wait_for(reader.read(100), 30)
        error = "none"
    except ConnectionLost:
        error = "ConnectionLost"
    except asyncio.TimeoutError:
        error = "hung"
    seconds = time.monotonic() - start
    writer.close()
    return {"error": error, "seconds": round(seconds, 2), "echoes": link.echoes}


# --- cross host ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site() -> Iterator[SmbSite]:
    require_root_and_samba()
    with smb_site({ALICE: PASSWORD}, prefix="npd") as bed:
        yield bed


def serve_raw(site: SmbSite, name: str) -> contextlib.AbstractContextManager[object]:
    """The raw echo server app (a greeting line, then echoes) in the server namespace."""
    return site.serve([sys.executable, str(APPS / "server_app.py"), "raw", name, ALICE])


class App:
    """tests/cross_host/dead_peer_app.py in the client namespace, one JSON line a step."""

    def __init__(self, site: SmbSite, scenario: str, name: str) -> None:
        env = {**os.environ, "NPIPE_USER": ALICE, "NPIPE_PASSWORD": PASSWORD}
        self.proc = popen_in(site.hosts.client_ns,
                             [sys.executable, str(APPS / "dead_peer_app.py"), scenario,
                              site.address(name), str(TIMEOUT)],
                             env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)

    def next(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"the client app ended: {err[-3000:]}")
        result: dict[str, Any] = json.loads(line)
        return result

    def tell(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        try:
            self.proc.wait(30)
        finally:
            self.kill()
        assert self.proc.returncode == 0, self.proc.stderr.read() if self.proc.stderr else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# Where the hosts' frames go while the path is silenced: a locally administered MAC
# that no interface has, so the other end's kernel drops every frame as not its own.
NOWHERE = "02:00:5e:10:00:99"


@contextlib.contextmanager
def silenced(hosts: Hosts) -> Iterator[None]:
    """Every packet between the two hosts vanishes until the block ends: each side's
    neighbour entry for the other points at a MAC that nobody has, so frames leave (the
    sender's kernel sees no error, unlike with a blackhole route) and the receiving
    kernel drops them. No RST, no ICMP: a peer switched off, as TCP sees it."""
    ip = tool("ip") or "ip"
    sides = ((hosts.server_ns, hosts.server_if, hosts.client_ip),
             (hosts.client_ns, hosts.client_if, hosts.server_ip))
    try:
        for ns, ifname, peer in sides:
            subprocess.run([ip, "-n", ns, "neigh", "replace", peer, "lladdr", NOWHERE,
                            "dev", ifname, "nud", "permanent"],
                           check=True, capture_output=True, timeout=15)
        yield
    finally:
        for ns, ifname, peer in sides:  # ARP finds the real one again
            subprocess.run([ip, "-n", ns, "neigh", "del", peer, "dev", ifname],
                           capture_output=True, timeout=15)


def test_a_silent_peer_fails_a_pending_read_within_the_timeout(site: SmbSite) -> None:
    """A read waits on a pipe; the path goes silent: the read fails with ConnectionLost
    within about dead_peer_timeout, and once the path is back a new open works."""
    with serve_raw(site, "quietly"):
        app = App(site, "dead", "quietly")
        try:
            assert app.next() == {"opened": True}
            with silenced(site.hosts):
                start = time.monotonic()
                result = app.next()
                elapsed = time.monotonic() - start
                if "message" in result:
                    message = result.pop("message")
                    result = app.next()
                else:
                    message = None
            print(f"the read ended after {elapsed:.2f} s ({result}): {message}")
            assert result["read"] == "ConnectionLost", (result, message)
            assert result["alive"] is False
            assert TIMEOUT * 0.5 <= elapsed <= TIMEOUT * 2, (elapsed, result)
            app.tell()
            assert app.next() == {"recovered": True}
        except BaseException:
            app.kill()
            raise
        app.finish()


def test_healthy_connections_are_left_alone(site: SmbSite) -> None:
    """A quiet pipe over four timeouts gets ECHOs (which are answered) and stays up; a
    busy answering connection gets no ECHO; an idle one (no pipes) gets none either and
    is still the one a new open uses."""
    with serve_raw(site, "healthy"):
        app = App(site, "healthy", "healthy")
        try:
            result = app.next()
        except BaseException:
            app.kill()
            raise
        app.finish()
    print(result)
    assert result["echoed"] is True and result["alive"] is True
    assert result["same_connection"] is True
    assert 2 <= result["quiet_echoes"] <= 10, result  # one per TIMEOUT/2 of silence
    assert result["busy_echoes"] == 0 and result["rounds"] > 10, result
    assert result["idle_echoes"] == 0, result


def test_the_silenced_path_really_is_silent(site: SmbSite) -> None:
    """Silenced, packets vanish without telling the sender: a TCP connect neither
    succeeds nor fails within a second."""
    probe = (
        "import socket, sys\n"
        "s = socket.socket(); s.settimeout(1.0)\n"
        "try:\n"
        f"    s.connect(('{site.hosts.server_ip}', 445)); print('connected')\n"
        "except socket.timeout:\n"
        "    print('silent')\n"
        "except OSError as e:\n"
        "    print('refused', e)\n"
    )
    with silenced(site.hosts):
        done = run_in(site.hosts.client_ns, [sys.executable, "-c", probe],
                      capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "silent", done.stdout + done.stderr
