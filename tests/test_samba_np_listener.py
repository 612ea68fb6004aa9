"""The Samba front door on its own: what smbd would send, and what it must survive.

No smbd here: the tests play smbd's part on the socket in np/ (as root, as smbd is),
with the named_pipe_auth requests captured from Samba 4.17 and 4.22.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from test_npa import LEVEL7_KERBEROS, LEVEL7_NTLM, LEVEL8_NTLM

import npipe
import npipe.address
import npipe.grpc
from npipe.identity import Caller
from npipe.samba import np_listener as samba
from npipe.samba.npa import REPLY_SIZE, NpaRequest, parse_request


@pytest.fixture
def served(np_dir: Path) -> Iterator[Path]:
    """A grpcio echo server on pipe 'door', open to npt (the user in the vectors)."""
    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        return str(npipe.grpc.caller(context)).encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers = {"Who": grpc.unary_unary_rpc_method_handler(whoami)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("d.S", handlers),))
    # the vectors' user is VM\npt (uid 1002 on 4.17, 1000 on 4.22): allow by domain account
    npipe.grpc.add_pipe_port(server, "door", smb=True, acl=npipe.Acl.allow(users=["VM\\npt"]))
    server.start()
    yield np_dir / "door"
    server.stop(None).wait()


def smbd_connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(path))
    return s


def recv_all(s: socket.socket) -> bytes:
    """Everything until the door closes (a reset, when it closed with our bytes unread)."""
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


@pytest.mark.parametrize("vector", [LEVEL7_NTLM, LEVEL8_NTLM], ids=["level7", "level8"])
def test_a_real_request_opens_the_pipe(served: Path, vector: bytes) -> None:
    s = smbd_connect(served)
    s.sendall(vector)
    reply = s.recv(REPLY_SIZE)
    assert len(reply) == REPLY_SIZE and reply[4:8] == b"NPAM"
    # now the pipe's bytes: an HTTP/2 client preface reaches grpcio, which answers
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
    assert s.recv(9)[3] == 0x04  # grpcio's SETTINGS frame
    s.close()


def test_a_grpc_caller_the_acl_refuses_is_answered_permission_denied(np_dir: Path) -> None:
    """A gRPC pipe sends the named_pipe_auth reply (the open succeeds), then answers the
    caller's calls itself: PERMISSION_DENIED, with the reason; grpcio never sees them."""
    import h2.config
    import h2.connection
    import h2.events

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    npipe.grpc.add_pipe_port(server, "strict", smb=True)  # owner-only: root; npt is not
    server.start()
    try:
        s = smbd_connect(np_dir / "strict")
        s.sendall(LEVEL7_NTLM)
        reply = s.recv(REPLY_SIZE)
        assert len(reply) == REPLY_SIZE and reply[4:8] == b"NPAM"
        client = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8"))
        client.initiate_connection()
        client.send_headers(1, [(":method", "POST"), (":scheme", "http"),
                                (":path", "/t.Svc/Echo"), (":authority", "x"),
                                ("content-type", "application/grpc"), ("te", "trailers")],
                            end_stream=True)
        s.sendall(client.data_to_send())
        s.settimeout(10)
        headers: dict[str, str] = {}
        while not headers and (data := s.recv(65536)):
            for event in client.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    headers = dict(event.headers)
        s.close()
        assert headers["grpc-status"] == "7", headers
        assert headers["grpc-message"].startswith("the ACL of pipe strict does not admit "), headers
    finally:
        server.stop(None)


def test_a_stream_caller_the_acl_refuses_gets_no_reply(np_dir: Path) -> None:
    import asyncio

    async def main() -> bytes:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await npipe.start_server(handler, "strict2", smb=True)  # owner-only
        try:
            s = smbd_connect(np_dir / "strict2")
            s.setblocking(True)
            s.sendall(LEVEL7_NTLM)
            return await asyncio.to_thread(recv_all, s)
        finally:
            server.close()

    assert asyncio.run(main()) == b""  # closed without a reply: smbd fails the CREATE


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00\x00\x00\x04NPAX",
        b"\x00\x00\x00\x0cNPAM\x05\x00\x00\x00\x05\x00\x00\x00",  # level 5
        b"\xff\xff\xff\xff" + b"x" * 100,  # a length far over the limit
        LEVEL7_NTLM[:300],  # truncated, then closed
        b"GET / HTTP/1.1\r\n\r\n",
        os.urandom(2000),
    ],
    ids=["empty", "bad-magic", "level5", "huge", "truncated", "http", "random"],
)
def test_garbage_is_closed_and_the_pipe_keeps_serving(served: Path, garbage: bytes) -> None:
    s = smbd_connect(served)
    s.sendall(garbage)
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == b""
    s.close()
    s = smbd_connect(served)  # the next (good) open still works
    s.sendall(LEVEL8_NTLM)
    assert len(s.recv(REPLY_SIZE)) == REPLY_SIZE
    s.close()


def test_a_stalled_handshake_is_cut_off(served: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(samba, "HANDSHAKE_TIMEOUT", 0.5)
    s = smbd_connect(served)
    s.sendall(LEVEL7_NTLM[:100])  # then nothing: smbd would wait for us forever
    started = time.monotonic()
    assert recv_all(s) == b""
    assert time.monotonic() - started < 5


def test_no_threads_or_sockets_leak_after_bad_opens(served: Path) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    for _ in range(5):  # warm up thread pools
        s = smbd_connect(served)
        s.sendall(b"junk")
        s.shutdown(socket.SHUT_WR)
        recv_all(s)
        s.close()
    time.sleep(0.2)
    threads, fds = threading.active_count(), open_fds()
    for _ in range(100):
        s = smbd_connect(served)
        s.sendall(os.urandom(64))
        s.shutdown(socket.SHUT_WR)
        recv_all(s)
        s.close()
    deadline = time.monotonic() + 5
    while (threading.active_count(), open_fds()) > (threads, fds) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= threads and open_fds() <= fds


def test_only_root_may_speak_for_smbd(served: Path) -> None:
    """A local user who reaches the socket cannot pose as smbd with a forged request."""
    script = (
        "import os, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.settimeout(10)\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        f"s.connect({str(served)!r})\n"
        "try:\n"
        f"    s.sendall(bytes.fromhex({LEVEL7_NTLM.hex()!r}))\n"
        "    print(len(s.recv(100)))\n"
        "except (ConnectionResetError, BrokenPipeError):  # closed before or after the send\n"
        "    print(0)\n"
    )
    os.chmod(served, 0o666)  # even with the socket open to all (a misconfiguration) ...
    for d in (served.parent, served.parent.parent):
        os.chmod(d, 0o711)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"  # ... it is closed without a reply


# --- admit(): the ACL against real requests (no smbd, no root needed) -----------------

# The captured sessions: VM\npt (standalone smbd; uid 1002 in the 4.17 capture, 1000 in
# the 4.22 one) and NPIPE\alice (AD DC, Kerberos: UPN alice@npipe.test, uid 3000015).
NPT_SID = "S-1-5-21-1584304474-3841467407-2183848180-1000"  # in LEVEL7_NTLM


def admitted(vector: bytes | NpaRequest, acl: npipe.Acl) -> Caller | None:
    request = vector if isinstance(vector, NpaRequest) else parse_request(vector)
    caller, reply = samba.admit(request, acl, "t")
    assert (caller is None) == (reply == b"")
    return caller


def test_admit_by_domain_account() -> None:
    assert admitted(LEVEL7_NTLM, npipe.Acl.allow(users=["VM\\npt"])) is not None
    assert admitted(LEVEL8_NTLM, npipe.Acl.allow(users=["vm\\NPT"])) is not None
    assert admitted(LEVEL7_KERBEROS, npipe.Acl.allow(users=["NPIPE\\alice"])) is not None
    assert admitted(LEVEL7_KERBEROS, npipe.Acl.allow(users=["npipe.test\\alice"])) is not None
    # the same name in another domain is someone else
    assert admitted(LEVEL7_NTLM, npipe.Acl.allow(users=["OTHER\\npt"])) is None
    assert admitted(LEVEL7_KERBEROS, npipe.Acl.allow(users=["VM\\alice"])) is None


def test_admit_by_sid_and_mapped_uid() -> None:
    assert admitted(LEVEL7_NTLM, npipe.Acl.allow(sids=[NPT_SID])) is not None
    assert admitted(LEVEL8_NTLM, npipe.Acl.allow(sids=[NPT_SID])) is None  # another SAM
    assert admitted(LEVEL7_NTLM, npipe.Acl.allow(users=[1002])) is not None
    assert admitted(LEVEL8_NTLM, npipe.Acl.allow(users=[1002])) is None


def test_a_bare_name_does_not_admit_a_remote_namesake(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A local user npt (uid 4242 here) is not the SMB session VM\\npt that Samba maps to
    uid 1002: the bare name means the local user, matched by uid."""
    from npipe import acl as acl_module

    monkeypatch.setattr(acl_module, "_uid", lambda name: {"npt": 4242}[name])
    with caplog.at_level(logging.WARNING, logger="npipe.samba"):
        assert admitted(LEVEL7_NTLM, npipe.Acl.allow(users=["npt"])) is None
    assert "refused VM\\npt uid=1002" in caplog.text and "not allowed by its ACL" in caplog.text
    # ...while the session Samba maps to the local npt's uid is that user
    monkeypatch.setattr(acl_module, "_uid", lambda name: {"npt": 1002}[name])
    assert admitted(LEVEL7_NTLM, npipe.Acl.allow(users=["npt"])) is not None


def test_admit_by_upn() -> None:
    assert admitted(LEVEL7_KERBEROS, npipe.Acl.allow(users=["alice@NPIPE.TEST"])) is not None
    assert admitted(LEVEL7_KERBEROS, npipe.Acl.parse("user:alice@npipe.test")) is not None
    assert admitted(LEVEL7_KERBEROS, npipe.Acl.allow(users=["alice@OTHER.TEST"])) is None
    assert admitted(LEVEL7_KERBEROS, npipe.Acl.allow(users=["bob@NPIPE.TEST"])) is None
    # a standalone server's session has no UPN and no DNS domain: no name@REALM matches
    assert admitted(LEVEL7_NTLM, npipe.Acl.allow(users=["npt@VM"])) is None


def as_uid(vector: bytes, uid: int, gid: int) -> NpaRequest:
    """A captured request whose session Samba mapped to ``uid``/``gid`` instead."""
    request = parse_request(vector)
    session = dataclasses.replace(request.session, uid=uid, gid=gid, unix_groups=(gid,))
    return dataclasses.replace(request, session=session)


def test_admit_refuses_a_session_mapped_to_root_unless_named() -> None:
    remote_root = as_uid(LEVEL8_NTLM, 0, 0)
    assert admitted(remote_root, npipe.Acl()) is None  # owner-only, whoever serves
    assert admitted(remote_root, npipe.Acl.allow(users=[0], groups=[0])) is None
    assert admitted(remote_root, npipe.Acl.allow(users=["VM\\npt"])) is not None


@pytest.mark.parametrize("serving_uid", [1002, 4242])
def test_admit_takes_a_session_mapped_to_the_serving_user_as_the_owner(
    monkeypatch: pytest.MonkeyPatch, serving_uid: int
) -> None:
    """admit() takes the serving process's uid as the owner's: a session Samba maps to it
    gets through an owner-only ACL, one mapped to any other uid does not. (The process is
    made to look like an ordinary user's, whoever runs the tests; tests/test_samba_owner.py
    does it for real, through smbd.)"""
    monkeypatch.setattr(os, "getuid", lambda: serving_uid)
    caller = admitted(as_uid(LEVEL8_NTLM, serving_uid, 1000), npipe.Acl())
    assert caller is not None and caller.uid == serving_uid and caller.account == "npt"
    assert admitted(as_uid(LEVEL8_NTLM, serving_uid + 1, 1000), npipe.Acl()) is None
    # the captured session as it came (uid 1000 on 4.22) is the owner only of uid 1000's pipe
    assert admitted(LEVEL8_NTLM, npipe.Acl()) is None


def test_admit_never_takes_a_session_mapped_to_root_as_roots_owner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "getuid", lambda: 0)
    assert admitted(as_uid(LEVEL8_NTLM, 0, 0), npipe.Acl()) is None
    assert admitted(as_uid(LEVEL8_NTLM, 1002, 1000), npipe.Acl()) is None


def test_admit_still_refuses_guests() -> None:
    guest = parse_request(LEVEL8_NTLM)
    guest = dataclasses.replace(
        guest, session=dataclasses.replace(guest.session, authenticated=False))
    assert admitted(guest, npipe.Acl.allow(everyone=True)) is None


# --- the start-up warning: an SMB pipe whose ACL names no remote caller ---------------


def samba_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "npipe.samba" and r.levelno == logging.WARNING]


@pytest.mark.parametrize(("owner", "says"), [(0, "none will be admitted"),
                                             (1000, "only SMB sessions Samba maps to uid 1000")])
def test_warns_when_the_acl_names_no_remote_caller(
    caplog: pytest.LogCaptureFixture, owner: int, says: str
) -> None:
    addr = npipe.address.parse_address("quiet")
    with caplog.at_level(logging.WARNING, logger="npipe.samba"):
        samba.warn_if_no_remote_callers(npipe.Acl(), addr, owner_uid=owner)
        samba.warn_if_no_remote_callers(npipe.Acl.allow(users=[0]), addr, owner_uid=owner)
        for acl in (npipe.Acl.allow(users=["VM\\npt"]), npipe.Acl.allow(users=[1002]),
                    npipe.Acl.allow(sids=["S-1-5-11"]), npipe.Acl.allow(everyone=True)):
            samba.warn_if_no_remote_callers(acl, addr, owner_uid=owner)
    warnings = samba_warnings(caplog)
    assert len(warnings) == 2, warnings
    assert all("quiet" in w and "names no remote caller" in w and says in w for w in warnings)


def test_add_pipe_port_warns_at_start_up(
    np_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name, acl, expected in [("lonely", npipe.Acl(), 1),
                                ("named", npipe.Acl.allow(users=["VM\\npt"]), 0)]:
        caplog.clear()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        with caplog.at_level(logging.WARNING, logger="npipe.samba"):
            npipe.grpc.add_pipe_port(server, name, smb=True, acl=acl)
        server.start()
        server.stop(None).wait()
        assert len(samba_warnings(caplog)) == expected, samba_warnings(caplog)
        if expected:
            assert "none will be admitted" in samba_warnings(caplog)[0]


def test_start_server_warns_at_start_up(np_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def main() -> None:
        server = await npipe.start_server(handler, "lonelyraw", smb=True)
        server.close()
        await server.wait_closed()

    with caplog.at_level(logging.WARNING, logger="npipe.samba"):
        asyncio.run(main())
    warnings = samba_warnings(caplog)
    assert len(warnings) == 1 and "lonelyraw" in warnings[0], warnings
