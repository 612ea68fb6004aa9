"""The per-user redirector (npipe.redirector): its protocol, the process, and remote
pipes relayed by it across the two namespace hosts (a real smbd on port 445)."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import npipe
import npipe.redirector
from npipe import errors, ioloop
from npipe.address import PipeAddress, parse_address
from npipe.redirector import client as rclient
from npipe.redirector import protocol
from npipe.smb.credentials import Credentials
from npipe.testing.netns import SmbSite, require_root_and_samba, run_in, smb_site

APPS = Path(__file__).resolve().parent / "cross_host"
ALICE, PASSWORD = "npt-ralice", "Pipe-Passw0rd!"
REMOTE = parse_address("//198.18.0.1/pipe/shop")


def _request(**changes: Any) -> protocol.AttachRequest:
    fields: dict[str, Any] = dict(
        backend="native", address=REMOTE, credentials=Credentials("u", "p\u00e9", "D", "ntlm"),
        timeout=2.5, encrypt=None, allow_smb2=False, initial=b"\x00PRI * HTTP/2.0",
        missing_grace=0.0, tied=True)
    fields.update(changes)
    return protocol.AttachRequest(**fields)


def _payload(frame: bytes) -> bytes:
    reader = protocol.reader()
    message = None
    view = memoryview(frame)
    while message is None:
        chunk, view = view[:reader.bytes_needed], view[reader.bytes_needed:]
        message = protocol.whole(reader.feed(bytes(chunk)))
    assert not view
    return message


# --- the protocol ----------------------------------------------------------------------


def test_an_attach_request_round_trips() -> None:
    for request in (_request(), _request(encrypt=True, missing_grace=None, tied=False,
                                         initial=b"", credentials=Credentials())):
        assert protocol.AttachRequest.decode(_payload(request.encode())) == request


@pytest.mark.parametrize("body, says", [
    ({"v": 2, "op": "attach"}, "not a version 1"),
    ({"v": 1, "op": "exec"}, "not a version 1"),
    ({"v": 1, "op": "attach"}, "malformed attach request: KeyError('address')"),
])
def test_a_wrong_request_is_refused(body: dict[str, Any], says: str) -> None:
    with pytest.raises(protocol.RedirectorProtocolError, match=re.escape(says)):
        protocol.AttachRequest.decode(json.dumps(body).encode())


def test_a_request_with_wrong_fields_is_refused() -> None:
    good = json.loads(_payload(_request().encode()))
    for field, value, says in [
        ("timeout", "10", "expected a number"), ("timeout", -1, "expected a number"),
        ("tied", 1, "expected true or false"), ("initial", "!!", "malformed"),
        ("address", {**good["address"], "kind": "local", "host": ""}, "not a remote pipe"),
        ("address", {**good["address"], "port": "445"}, "expected an integer"),
    ]:
        with pytest.raises(protocol.RedirectorProtocolError, match=says):
            protocol.AttachRequest.decode(json.dumps({**good, field: value}).encode())
    for garbage in (b"\xff\xfe", b"[1, 2]", b""):
        with pytest.raises(protocol.RedirectorProtocolError):
            protocol.AttachRequest.decode(garbage)


def test_an_oversized_frame_is_refused() -> None:
    reader = protocol.reader()
    header = (protocol.MAX_FRAME + 1).to_bytes(4, "big")
    assert reader.feed(header) is None
    with pytest.raises(protocol.RedirectorProtocolError, match="a frame of"):
        while True:
            if (message := reader.feed(b"x" * reader.bytes_needed)) is not None:
                protocol.whole(message)


def test_replies_rebuild_npipe_errors() -> None:
    from npipe.smb.native.wire import ProtocolError

    assert protocol.decode_reply(_payload(protocol.encode_reply(None))) is None
    cases: list[tuple[BaseException, type[BaseException], str]] = [
        (errors.PipeNotFound("pipe //h/pipe/x not found"), errors.PipeNotFound,
         "pipe //h/pipe/x not found"),
        (errors.AuthenticationError("bad password"), errors.AuthenticationError,
         "bad password"),
        (ProtocolError("odd reply"), errors.ConnectionLost, "odd reply"),  # the nearest
        (ValueError("boom"), errors.NpipeError, "RuntimeError: ValueError: boom"),
    ]
    for sent, kind, text in cases:
        got = protocol.decode_reply(_payload(protocol.encode_reply(sent)))
        assert type(got) is kind and text in str(got), got
    with pytest.raises(protocol.RedirectorProtocolError):
        protocol.decode_reply(b'{"ok": "yes"}')


def test_the_mode_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(npipe.redirector.ENV_MODE, "sometimes")
    with pytest.raises(errors.ConfigError, match="NPIPE_REDIRECTOR must be one of"):
        npipe.redirector.mode()
    monkeypatch.setenv(npipe.redirector.ENV_MODE, " OFF ")
    assert npipe.redirector.mode() == "off"
    monkeypatch.delenv(npipe.redirector.ENV_MODE)
    assert npipe.redirector.mode() == "shared"


# --- the process (no SMB needed) --------------------------------------------------------


@pytest.fixture
def private_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A pipe directory of this test's own (so its redirector is this test's), with a
    short idle timeout; the redirector is stopped at the end."""
    directory = Path(f"/tmp/npr-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("NPIPE_PIPE_DIR", str(directory))
    monkeypatch.setenv("NPIPE_SMB_IDLE_TIMEOUT", "1")
    yield directory
    pid = _redirector_pid(directory)
    if pid is not None:
        os.kill(pid, 15)
    subprocess.run(["rm", "-rf", str(directory)], check=False)


def _redirector_pid(directory: Path) -> int | None:
    from npipe.local.peercred import peer_credentials

    for sock_path in directory.glob(rclient.PREFIX + "*[!gk]"):  # not .log, .lock
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(sock_path))
            except OSError:
                continue
            return peer_credentials(probe)[0]
    return None


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if item)


@pytest.mark.linux_only("reads the redirector's environment and parent from /proc")
def test_the_first_use_starts_it_and_others_share_it(private_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPIPE_USER", "someone")
    monkeypatch.setenv("NPIPE_PASSWORD", "never-in-its-environment")
    with rclient.connect() as conn:
        from npipe.local.peercred import peer_credentials

        pid = peer_credentials(conn)[0]
    assert pid != os.getpid()
    where = rclient.paths()
    assert where.socket.parent == private_dir
    assert (where.socket.stat().st_mode & 0o777) == 0o600
    env = _environ(pid)
    assert "NPIPE_PASSWORD" not in env and "NPIPE_USER" not in env
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"never-in" not in cmdline and b"npipe.redirector" in cmdline
    # Not this process's child (nobody has to reap it), in a session of its own.
    assert os.getppid() != pid and _ppid(pid) != os.getpid()
    assert os.getsid(pid) != os.getsid(0)
    # Another process (same user, same environment) finds the same one.
    code = ("from npipe.redirector import client; from npipe.local.peercred import "
            "peer_credentials; print(peer_credentials(client.connect())[0])")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=30, check=True)
    assert int(other.stdout) == pid


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


@pytest.mark.linux_only("reads the redirector's state from /proc")
def test_it_exits_when_idle(private_dir: Path) -> None:
    with rclient.connect():
        pass
    where = rclient.paths()
    pid = _redirector_pid(private_dir)
    assert pid is not None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (where.socket.exists() or _alive(pid)):
        time.sleep(0.1)
    assert not where.socket.exists() and not _alive(pid)
    assert not where.lock.exists() and not where.log.exists()  # nothing left behind
    with rclient.connect():  # and the next use starts another
        assert _redirector_pid(private_dir) not in (None, pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"


def test_a_failed_open_comes_back_as_its_error_and_leaves_the_socket(
        private_dir: Path) -> None:
    """Port 1 on loopback refuses: HostUnreachable, rebuilt here; the socket that was
    sent is still this process's, unread and unwritten."""
    ours, theirs = socket.socketpair()
    address = PipeAddress(kind="remote", name="x", host="127.0.0.1", port=1)
    with ours, theirs:
        ours.sendall(b"still here")
        with pytest.raises(errors.HostUnreachable, match=re.escape("127.0.0.1")):
            ioloop.run(rclient.attach("native", address, theirs, credentials=Credentials(
                "u", "p"), timeout=3, encrypt=None, allow_smb2=False,
                close_on_failure=False), 20)
        assert theirs.fileno() >= 0
        assert theirs.recv(100) == b"still here"
        theirs.sendall(b"back")
        assert ours.recv(100) == b"back"


def test_another_user_is_refused(private_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")
    with rclient.connect():
        pass
    where = rclient.paths()
    os.chmod(private_dir, 0o711)
    os.chmod(where.socket, 0o666)
    code = (f"import os, socket; os.setgid(65534); os.setuid(65534); "
            f"s = socket.socket(socket.AF_UNIX); s.connect({str(where.socket)!r}); "
            f"s.sendall(b'x' * 8)\ntry: print(repr(s.recv(100)))\n"
            f"except ConnectionResetError: print(repr(b''))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert done.stdout.strip() == "b''", done.stderr
    assert re.search(r"refused a connection from uid 65534 \(pid \d+\): only uid 0 may",
                     where.log.read_text())


def test_garbage_gets_an_error_reply(private_dir: Path) -> None:
    with rclient.connect() as conn:
        conn.sendall(protocol.frame(b'{"v": 1, "op": "rm -rf"}'))
        conn.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
    failure = protocol.decode_reply(_payload(reply))
    assert isinstance(failure, errors.NpipeError) and "not a version 1 request" in str(failure)


def test_without_a_redirector_the_relay_runs_here(private_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A pipe directory whose socket path cannot fit: ``shared`` warns once and opens
    the pipe in this process; ``required`` fails."""
    deep = private_dir / ("d" * 100)
    deep.mkdir(mode=0o700)
    monkeypatch.setenv("NPIPE_PIPE_DIR", str(deep))
    monkeypatch.setattr(npipe.redirector, "_warned", False)
    address = PipeAddress(kind="remote", name="x", host="127.0.0.1", port=1)

    def attach() -> None:
        a, b = socket.socketpair()
        with a:
            ioloop.run(npipe.redirector.attach(
                "native", address, b, credentials=Credentials("u", "p"), timeout=3,
                encrypt=None, allow_smb2=False), 20)

    caplog.set_level(logging.WARNING, "npipe.redirector")
    for _ in range(2):
        with pytest.raises(errors.HostUnreachable):
            attach()
    said = [r.getMessage() for r in caplog.records if r.name == "npipe.redirector"]
    assert len(said) == 1 and "longer than a Unix socket address holds" in said[0] \
        and "relaying remote pipes in this process instead" in said[0], said
    monkeypatch.setenv(npipe.redirector.ENV_MODE, "required")
    with pytest.raises(npipe.redirector.RedirectorUnavailable, match="longer than"):
        attach()


# --- across hosts -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def site() -> Iterator[SmbSite]:
    require_root_and_samba()
    with smb_site({ALICE: PASSWORD}, prefix="npr") as bed:
        yield bed


def _client(site: SmbSite, scenario: str, mode: str = "shared") -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NPIPE_")}
    env.update(NPIPE_USER=ALICE, NPIPE_PASSWORD=PASSWORD, NPIPE_REDIRECTOR=mode,
               NPIPE_PIPE_DIR=str(site.workdir / "client-pipes"),
               KRB5CCNAME=f"FILE:{site.workdir}/no-such-ccache")
    done = run_in(site.hosts.client_ns,
                  [sys.executable, str(APPS / "redirector_app.py"), scenario,
                   site.address("shop"), site.hosts.server_ip],
                  env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_grpc_relayed_by_the_redirector(site: SmbSite) -> None:
    """The SMB connection to port 445 belongs to the redirector, not to the calling
    process, and a second process reuses it (one connection per host and logon)."""
    with site.serve([sys.executable, str(APPS / "server_app.py"), "grpc", "shop", ALICE]):
        first = _client(site, "grpc")
        second = _client(site, "grpc")
    for r in (first, second):
        assert r["echo"] and r["who"] == ALICE
        assert r["smb_owners"] == [r["redirector"]] and r["redirector"] != r["pid"], r
    assert second["redirector"] == first["redirector"]
    assert second["smb_ports"] == first["smb_ports"]  # the same TCP connection
    assert first["connections"] == [{"user": ALICE, "encrypted": True, "alive": True}]


def test_blocking_and_http_are_relayed_by_it_too(site: SmbSite) -> None:
    with site.serve([sys.executable, str(APPS / "server_app.py"), "raw", "shop", ALICE]):
        r = _client(site, "blocking")
    assert r["echo"] == "hello" and r["smb_owners"] == [r["redirector"]] != [r["pid"]], r


def test_off_relays_in_the_calling_process(site: SmbSite) -> None:
    with site.serve([sys.executable, str(APPS / "server_app.py"), "grpc", "shop", ALICE]):
        r = _client(site, "grpc", mode="off")
    # (the redirector of the tests before may still hold its own connection)
    assert r["echo"] and r["pid"] in r["smb_owners"], r
