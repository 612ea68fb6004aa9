"""Dead peers: a connection whose server vanished without a FIN (power off, a dropped
route) fails its pipes with ConnectionLost within ``Options.dead_peer_timeout``; healthy
connections, quiet or busy, are left alone.

The cross-host part runs a real smbd in one network namespace and the native client in
another (tests/netns.py), and silences the path between them mid-call: blackhole routes
on both sides, so every packet either way vanishes (nothing is refused, no RST, no
ICMP; the sending kernel reports success), as when a peer is switched off.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from netns import Hosts, popen_in, require_root_and_samba, run_in, tool, two_hosts

from npipe.samba.smbd import PrivateSmbd

APPS = Path(__file__).resolve().parent / "cross_host"
ALICE, PASSWORD = "npt-alice", "Pipe-Passw0rd!"
TIMEOUT = 3.0  # Options.dead_peer_timeout in the cross-host tests


# --- cross host ------------------------------------------------------------------------


@dataclass
class Site:
    hosts: Hosts
    smbd: PrivateSmbd
    workdir: Path

    def address(self, name: str) -> str:
        return f"//{self.hosts.server_ip}/pipe/{name}"


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    require_root_and_samba()
    workdir = Path(tempfile.mkdtemp(prefix="npd", dir="/tmp"))
    try:
        with two_hosts() as hosts:
            smbd = PrivateSmbd(workdir / "smbd", port=445, interfaces=hosts.server_if,
                               users={ALICE: PASSWORD}, netns=hosts.server_ns)
            with smbd:
                yield Site(hosts, smbd, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def serve_raw(site: Site, name: str) -> Iterator[None]:
    """The raw echo server app (a greeting line, then echoes) in the server namespace."""
    env = {**os.environ, "NPIPE_SAMBA_NP_DIR": str(site.smbd.np_dir),
           "NPIPE_PIPE_DIR": str(site.workdir / "pipes")}
    proc = popen_in(site.hosts.server_ns,
                    [sys.executable, str(APPS / "server_app.py"), "raw", name, ALICE],
                    env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip() == "ready", f"server app did not start: {line!r}"
        yield
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class App:
    """tests/cross_host/dead_peer_app.py in the client namespace, one JSON line a step."""

    def __init__(self, site: Site, scenario: str, name: str) -> None:
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


@contextlib.contextmanager
def silenced(hosts: Hosts) -> Iterator[None]:
    """Every packet between the two hosts vanishes (a blackhole route each way) until
    the block ends."""
    ip = tool("ip") or "ip"
    routes = ((hosts.server_ns, hosts.client_ip), (hosts.client_ns, hosts.server_ip))
    added = []
    try:
        for ns, peer in routes:
            subprocess.run([ip, "-n", ns, "route", "add", "blackhole", f"{peer}/32"],
                           check=True, capture_output=True, timeout=15)
            added.append((ns, peer))
        yield
    finally:
        for ns, peer in added:
            subprocess.run([ip, "-n", ns, "route", "del", "blackhole", f"{peer}/32"],
                           capture_output=True, timeout=15)


def test_a_silent_peer_fails_a_pending_read_within_the_timeout(site: Site) -> None:
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


def test_healthy_connections_are_left_alone(site: Site) -> None:
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


def test_the_silenced_path_really_is_silent(site: Site) -> None:
    """The blackhole routes drop packets without telling the sender: a TCP connect
    across them neither succeeds nor fails within a second."""
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
