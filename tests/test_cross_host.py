"""Cross-host named pipes: a client in one network namespace calls, through a real smbd on
port 445 in another, an npipe server that Samba hands each pipe open to.

    client ns 198.18.0.2  --SMB2/3 over TCP 445 (veth)-->  server ns 198.18.0.1: smbd
                                                           -> np/NAME -> npipe front door
                                                           -> grpcio / stream handler
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from capture import Capture, capture, have_tshark, require_tshark

from npipe.smb import BACKENDS, ENV_BACKEND
from npipe.testing.netns import SmbSite, popen_in, require_root_and_samba, run_in, smb_site

APPS = Path(__file__).resolve().parent / "cross_host"
ALICE, BOB, PASSWORD = "npt-alice", "npt-bob", "Pipe-Passw0rd!"
WAIT = 60


@pytest.fixture(scope="module", params=BACKENDS, autouse=True)
def smb_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The whole module runs once per SMB client backend: the client apps inherit
    $NPIPE_SMB_BACKEND."""
    old = os.environ.get(ENV_BACKEND)
    os.environ[ENV_BACKEND] = request.param
    yield request.param
    if old is None:
        os.environ.pop(ENV_BACKEND, None)
    else:
        os.environ[ENV_BACKEND] = old


@dataclass
class Site(SmbSite):
    capture: Capture | None = None  # TCP 445 on the server's veth, for the whole module


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    require_root_and_samba()
    with smb_site({ALICE: PASSWORD, BOB: PASSWORD}, prefix="npx") as bed, \
            contextlib.ExitStack() as stack:
        cap = None
        if have_tshark():  # else test_no_malformed_smb_on_the_wire skips (or fails)
            # Every user has PASSWORD: tshark decrypts and checks SMB3 inside too.
            cap = stack.enter_context(capture(bed.hosts.server_ns, bed.hosts.server_if,
                                              bed.workdir / "smb.pcapng", nt_password=PASSWORD))
        yield Site(bed.hosts, bed.smbd, bed.workdir, cap)


def serve(site: Site, name: str, kind: str = "grpc", users: str = ALICE,
          **env_extra: str) -> contextlib.AbstractContextManager[object]:
    """The npipe server app in the server namespace, serving NAME locally and via smbd."""
    return site.serve([sys.executable, str(APPS / "server_app.py"), kind, name, users],
                      **env_extra)


def client(site: Site, scenario: str, address: str, *args: str, user: str | None = ALICE,
           password: str | None = PASSWORD, allow_smb2: bool = False) -> dict[str, Any]:
    """Run a client scenario in the client namespace; its JSON result."""
    return client_run(site, scenario, address, *args, user=user, password=password,
                      allow_smb2=allow_smb2)[0]


def client_run(site: Site, scenario: str, address: str, *args: str, user: str | None = ALICE,
               password: str | None = PASSWORD,
               allow_smb2: bool = False) -> tuple[dict[str, Any], str]:
    """The same, and what the client process wrote on stderr. ``user`` None: no
    credentials at all (no NPIPE_USER, NPIPE_PASSWORD, nor a Kerberos ticket)."""
    env = {**clean_env(site), "NPIPE_TEST_ALLOW_SMB2": "1" if allow_smb2 else ""}
    if user is not None:
        env["NPIPE_USER"] = user
    if password is not None:
        env["NPIPE_PASSWORD"] = password
    done = run_in(site.hosts.client_ns, [sys.executable, str(APPS / "client_app.py"), scenario,
                                         address, *args],
                  env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def clean_env(site: Site) -> dict[str, str]:
    """This environment without SMB credentials, and a Kerberos cache that does not exist."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NPIPE_USER", "NPIPE_PASSWORD", "NPIPE_DOMAIN")}
    env["KRB5CCNAME"] = f"FILE:{site.workdir}/no-such-ccache"
    return env


def test_grpc_calls_across_hosts(site: Site) -> None:
    with serve(site, "shop"):
        r = client(site, "calls", site.address("shop"))
    who = r.pop("who")
    assert r == {"counted": True, "joined": True, "flipped": True, "big": True,
                 "concurrent": True}
    assert who["transport"] == "smb" and who["account"] == ALICE
    assert who["address"] == site.hosts.client_ip  # the client host, as smbd saw it
    assert who["sids"][0].startswith("S-1-5-21-") and who["uid"] is not None


def test_twenty_clients_at_once(site: Site) -> None:
    with serve(site, "many"):
        assert client(site, "clients", site.address("many")) == {"ok": 20}


def test_a_thousand_concurrent_calls_over_fifty_pipes(site: Site) -> None:
    with serve(site, "thousand"):
        result = client(site, "thousand", site.address("thousand"))
    assert result["errors"] == [] and result["ok"] == 1000, result
    assert result["connections"] == 1 and result["pipes"] == 50, result  # all on one


def test_user_the_acl_refuses(site: Site) -> None:
    """A stream pipe closes a refused caller without a named_pipe_auth reply: the
    CREATE fails. (A gRPC pipe answers its calls instead: see the test below.)"""
    with serve(site, "private", kind="raw"):
        r = client(site, "error", site.address("private"), user=BOB)
    assert r["error"] == "AccessDenied" and "refused" in r["message"]


def test_user_the_acl_refuses_a_raw_pipe(site: Site) -> None:
    """The asyncio front door (a stream server) refuses as the gRPC one does."""
    with serve(site, "rawprivate", kind="raw"):
        r = client(site, "error", site.address("rawprivate"), user=BOB)
    assert r["error"] == "AccessDenied" and "refused" in r["message"], r
    assert BOB in r["message"]


def test_killed_server_is_not_a_refusal(site: Site) -> None:
    """A server killed (its socket left in np/, nothing listening) is reported as a pipe
    without a server, soon, not as a refusal."""
    with serve(site, "doomed", kind="raw") as proc:
        proc.kill()
        proc.wait(10)
        assert stat.S_ISSOCK(os.lstat(site.smbd.np_dir / "doomed").st_mode)  # left behind
        r = client(site, "error", site.address("doomed"), "10")
    try:
        assert r["error"] == "PipeNotFound", r
        assert "not running" in r["message"] and "refused" not in r["message"], r
        assert r["seconds"] < 3, r  # not the whole timeout (10 s)
    finally:
        os.unlink(site.smbd.np_dir / "doomed")


def test_wrong_password(site: Site) -> None:
    with serve(site, "pw"):
        r = client(site, "error", site.address("pw"), password="Not-Her-Secret-7")
    assert r["error"] == "AuthenticationError" and ALICE in r["message"]
    assert "Not-Her-Secret-7" not in r["message"]  # never the password


@pytest.mark.parametrize("who", ["wrong-password", "unknown-user", "no-credentials"])
def test_authentication_failure_says_why_once(site: Site, who: str) -> None:
    """AuthenticationError with a one-line reason, from the API and once from the CLI;
    the process says nothing else at exit (no task left with an unretrieved error)."""
    user, password = {"wrong-password": (ALICE, "Not-Her-Secret-7"),
                      "unknown-user": ("npt-nobody", PASSWORD),
                      "no-credentials": (None, None)}[who]
    with serve(site, "authfail"):
        r, stderr = client_run(site, "auth_failures", site.address("authfail"), user=user,
                               password=password)
        env = clean_env(site)
        if user is not None and password is not None:
            env.update(NPIPE_USER=user, NPIPE_PASSWORD=password)
        cli = run_in(site.hosts.client_ns, [sys.executable, "-m", "npipe", "health",
                                            site.address("authfail")],
                     env=env, capture_output=True, text=True, timeout=WAIT)
    [(kind, message)] = r["errors"]
    assert kind == "AuthenticationError" and "\n" not in message, message
    assert "SpnegoError" not in message and len(message) < 300, message
    assert r["grpc"] == "UNAUTHENTICATED"  # the bridge answers with what npipe knows
    for bad in ("Task exception was never retrieved", "unhandled exception", "Traceback",
                "cannot schedule new futures"):
        assert bad not in stderr, stderr[-3000:]
    assert cli.returncode == 1
    assert cli.stderr.strip().count("\n") == 0, cli.stderr  # one line, said once
    assert site.hosts.server_ip in cli.stderr and "SpnegoError" not in cli.stderr, cli.stderr


def test_unknown_pipe(site: Site) -> None:
    """A pipe that does not exist fails fast (about 1 s), whatever the timeout."""
    r = client(site, "error", site.address("nosuchpipe"), "10")
    assert r["error"] == "PipeNotFound", r
    assert r["seconds"] < 2.5, r


class FakeDoor:
    """A stand-in for npipe's front door at np/NAME (this process is root, as smbd
    requires), answering smbd's named_pipe_auth request as ``mode`` says: ``refuse``
    (read it, close without a reply, as npipe refuses a caller), ``slam`` (close
    once it has come, unread: a server dying with the connection), ``dead`` (a socket nobody
    listens on: a killed server's), ``status`` (a reply with STATUS_ACCESS_DENIED, then
    serve), ``reply-close`` (a reply, then close at once), ``fields`` (a reply with
    unusual device_state and allocation_size, then serve), ``ok`` (a reply,
    then serve)."""

    def __init__(self, path: Path, mode: str) -> None:
        import socket

        self.mode, self.accepted, self.conns = mode, 0, []
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        if mode == "dead":
            self.sock.close()
            return
        self.sock.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        from npipe.samba.npa import NpaRequestReader, build_reply

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.mode == "slam":
                select.select([conn], [], [], 10)  # smbd's request has come: unread
                conn.close()
                continue
            npa, request = NpaRequestReader(), None
            while request is None and (chunk := conn.recv(npa.bytes_needed)):
                request = npa.feed(chunk)
            if request is None or self.mode == "refuse":
                conn.close()
                continue
            reply = {"status": build_reply(request.level, status=0xC0000022),
                     "fields": build_reply(request.level, device_state=0x1234,
                                           allocation_size=777)}.get(self.mode)
            if self.mode == "reply-close":
                conn.sendall(build_reply(request.level))
                conn.close()
                continue
            conn.sendall((reply or build_reply(request.level)) + b"hi")
            self.conns.append(conn)  # open until the test ends

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_what_smbd_answers_a_create_with(site: Site, smb_backend: str) -> None:
    """Pins what this Samba answers a CREATE of //HOST/pipe/NAME with, for each way
    the socket at np/NAME can behave (npipe.smb.status maps these; a Samba that answers
    otherwise must be looked at). Seen with smbd 4.17.12, through smbprotocol's raw
    requests whatever the module's backend (the module runs twice: so is this, rather
    than skipped once)."""
    modes = ["refuse", "slam", "dead", "status", "reply-close", "fields", "ok"]
    doors = {m: FakeDoor(site.smbd.np_dir / f"door-{m}", m) for m in modes}
    try:
        done = run_in(site.hosts.client_ns,
                      [sys.executable, str(APPS / "create_probe.py"), site.hosts.server_ip,
                       ALICE, PASSWORD, *(f"door-{m}" for m in modes), "door-none"],
                      capture_output=True, text=True, timeout=WAIT)
    finally:
        for m, door in doors.items():
            door.close()
            os.unlink(site.smbd.np_dir / f"door-{m}")
    assert done.returncode == 0, done.stderr[-3000:]
    seen = {r.pop("name")[len("door-"):]: r for r in map(json.loads, done.stdout.splitlines())}
    opened = {"status": 0, "allocation_size": 0, "end_of_file": 0, "file_attributes": 0x80}
    assert seen == {
        # smbd connects again once, then: STATUS_CONNECTION_DISCONNECTED
        "refuse": {"status": 0xC000020C},
        # (its request unread) STATUS_CONNECTION_RESET
        "slam": {"status": 0xC000020D},
        "dead": {"status": 0xC0000236},  # ECONNREFUSED: STATUS_CONNECTION_REFUSED
        "none": {"status": 0xC0000034},  # STATUS_OBJECT_NAME_NOT_FOUND
        # the reply's NTSTATUS is ignored: the pipe opens
        "status": {**opened, "read": "6869"},
        # opens; its first READ fails with STATUS_PIPE_DISCONNECTED, as any pipe's
        # whose server closed it (what npipe's clients see as the end of the stream)
        "reply-close": {**opened, "read": 0xC00000B0},
        # the reply's fields do not reach the CREATE response
        "fields": {**opened, "read": "6869"},
        "ok": {**opened, "read": "6869"},
    }, seen
    assert doors["refuse"].accepted == 2 and doors["ok"].accepted == 1


def test_unreachable_host(site: Site) -> None:
    r = client(site, "error", "//198.18.0.3/pipe/x")  # nobody on the link has it
    assert r["error"] == "HostUnreachable"


def test_grpc_user_the_acl_refuses_is_permission_denied(site: Site) -> None:
    """Samba hands the open over; the gRPC pipe's front door sends the named_pipe_auth
    reply and answers the call itself: PERMISSION_DENIED, with who and which pipe."""
    with serve(site, "private"):
        r = client(site, "grpc_error", site.address("private"), user=BOB)
    assert r["code"] == "PERMISSION_DENIED", r
    assert r["details"].startswith("the ACL of pipe private does not admit "), r
    assert BOB in r["details"] and site.hosts.client_ip in r["details"], r


def test_grpc_wrong_password_is_unauthenticated(site: Site) -> None:
    with serve(site, "pw"):
        r = client(site, "grpc_error", site.address("pw"), password="Not-Her-Secret-7")
    assert r["code"] == "UNAUTHENTICATED", r
    assert ALICE in r["details"] and "Not-Her-Secret-7" not in r["details"], r
    assert len([w for w in r["warnings"] if "could not open" in w]) == 1, r


def test_grpc_missing_pipe_is_unavailable_with_the_reason(site: Site) -> None:
    """Fast (not after the 10 s dial timeout), UNAVAILABLE with npipe's reason."""
    r = client(site, "grpc_error", site.address("nosuchpipe"))
    assert r["code"] == "UNAVAILABLE", r
    assert "nosuchpipe" in r["details"] and "Socket closed" not in r["details"], r
    assert r["took"] < 3, r


def test_grpc_wait_for_ready_on_a_missing_pipe_waits_for_its_deadline(site: Site) -> None:
    r = client(site, "wait_for_ready_deadline", site.address("nosuchpipe"))
    assert r["code"] == "DEADLINE_EXCEEDED", r
    assert 1.8 < r["took"] < 4, r


def test_grpc_call_made_before_the_server_starts(site: Site) -> None:
    """wait_for_ready=True across hosts: the bridge waits for the pipe (longer than
    its dial timeout, 2 s) and relays once the server serves."""
    env = {**os.environ, "NPIPE_USER": ALICE, "NPIPE_PASSWORD": PASSWORD}
    proc = popen_in(site.hosts.client_ns, [sys.executable, str(APPS / "client_app.py"),
                                           "late_server", site.address("latecomer")],
                    env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline()) == {"started": True}
        import time

        time.sleep(4)
        with serve(site, "latecomer"):
            out = proc.stdout.readline()
            proc.wait(WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads(out) == {"reply": "late"}, out


def test_raw_stream_server_across_hosts(site: Site) -> None:
    with serve(site, "rawpipe", kind="raw"):
        r = client(site, "raw", site.address("rawpipe"))
    assert r == {"greeting": f"hello {r['greeting'].split()[1]}", "echo": "raw bytes"}
    assert r["greeting"].endswith(f"\\{ALICE}")


def test_impacket_talks_to_a_raw_server(site: Site) -> None:
    """An independent SMB client (impacket) opens the pipe, writes and reads."""
    script = (
        "from impacket.smbconnection import SMBConnection\n"
        f"c = SMBConnection('{site.hosts.server_ip}', '{site.hosts.server_ip}')\n"
        f"c.login('{ALICE}', '{PASSWORD}')\n"
        "t = c.connectTree('IPC$')\n"
        "f = c.openFile(t, '\\\\rawimp', desiredAccess=0x12019f, creationOption=0x40,"
        " fileAttributes=0x80)\n"
        "print(c.readFile(t, f, 0, 4096).decode().strip())\n"
        "c.writeFile(t, f, b'from impacket')\n"
        "print(c.readFile(t, f, 0, 4096).decode())\n"
        "c.closeFile(t, f)\n"
    )
    with serve(site, "rawimp", kind="raw"):
        done = run_in(site.hosts.client_ns, [sys.executable, "-c", script],
                      capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr[-2000:]
    greeting, echoed = done.stdout.splitlines()
    assert greeting.startswith("hello ") and greeting.endswith(ALICE)
    assert echoed == "from impacket"


class HeldCall:
    """A client in the client namespace that has made one call on its channel."""

    def __init__(self, site: Site, name: str) -> None:
        env = {**os.environ, "NPIPE_USER": ALICE, "NPIPE_PASSWORD": PASSWORD}
        self.proc = popen_in(site.hosts.client_ns, [sys.executable, str(APPS / "client_app.py"),
                                                    "held_call", site.address(name)],
                             env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._next() == {"called": True}

    def _next(self, say: str | None = None) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        if say is not None:
            self.proc.stdin.write(say)
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the client died"
        return json.loads(line)

    def call_again(self) -> str:
        return str(self._next("go\n")["second"])

    def recovers(self) -> bool:
        result = self._next("go\n")
        self.proc.wait(30)
        return bool(result["recovered"])


def test_npipe_server_restart(site: Site) -> None:
    """Calls fail with UNAVAILABLE while the npipe server is down and recover on retry."""
    with serve(site, "phoenix"):
        client_ = HeldCall(site, "phoenix")
    assert client_.call_again() == "UNAVAILABLE"
    with serve(site, "phoenix"):
        assert client_.recovers()


def test_smbd_restart(site: Site) -> None:
    with serve(site, "sturdy"):
        client_ = HeldCall(site, "sturdy")
        site.smbd.stop()
        try:
            assert client_.call_again() == "UNAVAILABLE"
        finally:
            site.smbd.start()
        assert client_.recovers()


@pytest.mark.parametrize(
    "options",
    [
        {"server signing": "mandatory"},
        {"smb encrypt": "required"},
        {"server max protocol": "SMB2_10"},
        {"server max protocol": "SMB2_10", "server signing": "mandatory"},
        {"server max protocol": "SMB3_11", "smb encrypt": "required"},
    ],
    ids=["signing-mandatory", "encrypt-required", "smb2_10", "smb2_10-signing-mandatory",
         "smb3_11-encrypted"],
)
def test_server_security_settings(site: Site, options: dict[str, str],
                                  request: pytest.FixtureRequest) -> None:
    """With smbd set up so, the first call succeeds (smbd is ready once restart()
    returns, the server app once serve() does: no retries), and the connection it went
    through negotiated what it must, as the client reports it and as the wire shows it.
    npipe's policy: SMB 3.1.1 where both sides speak it, every message of a session
    encrypted on SMB 3 (encrypt=None: where the server can), signed on SMB 2."""
    require_tshark()
    smb2 = options.get("server max protocol", "").startswith("SMB2")
    saved = dict(site.smbd.extra)
    try:
        for key, value in options.items():
            site.smbd.set_option(key, value)
        site.smbd.restart()
        name = re.sub(r"\W+", "-", request.node.name).strip("-")
        with serve(site, "secure"), \
                capture(site.hosts.server_ns, site.hosts.server_if,
                        site.workdir / f"{name}.pcapng", nt_password=PASSWORD) as cap:
            r = client(site, "security", site.address("secure"), allow_smb2=smb2)
            wire = cap.protection()
    finally:
        site.smbd.extra.clear()
        site.smbd.extra.update(saved)
        site.smbd.write_config()
        site.smbd.restart()
    assert r["ok"] is True, f"the call failed: {r['error']}; npipe said: {r['warnings']}"
    assert len(r["connections"]) == 1, r
    info = r["connections"][0]
    dialect = "2.1" if smb2 else "3.1.1"
    seen = {k: info[k] for k in ("dialect", "signing_required", "signed", "encrypted")}
    assert seen == {"dialect": dialect, "signing_required": True, "signed": True,
                    "encrypted": not smb2}, info
    # The wire agrees, and shows that smbd applied the options.
    assert wire.dialects == [0x0210 if smb2 else 0x0311], wire
    if options.get("server signing") == "mandatory":
        assert wire.signing_required, wire
    if options.get("smb encrypt") == "required":
        assert wire.encrypt_data, wire
    if smb2:  # signing, seen: every message of the session after SESSION_SETUP is signed
        assert wire.encrypted == 0 and wire.signed > 0, wire
        assert wire.unsigned == [], "\n".join(map(str, wire.unsigned))
    else:  # encrypted: not one of them in plaintext
        assert wire.encrypted > 0, wire
        assert wire.plaintext == [], "\n".join(map(str, wire.plaintext))


def test_non_root_server_behind_a_link(site: Site, smb_backend: str) -> None:
    """A server run by an ordinary user listens in the directory root made for it
    (`npipe samba link NAME --user USER`, whose np/NAME link points there), and SMB
    clients reach it."""
    import pwd

    from npipe.local.namespace import root_made_user_dir

    bob = pwd.getpwnam(BOB)
    pipes = site.workdir / f"bob-pipes-{smb_backend}"  # BOB's own pipe directory
    pipes.mkdir(mode=0o700)
    os.chown(pipes, bob.pw_uid, bob.pw_gid)
    os.chmod(site.workdir, 0o755)
    env = {**os.environ, "NPIPE_SAMBA_NP_DIR": str(site.smbd.np_dir)}
    npipe_cmd = [sys.executable, "-m", "npipe", "samba", "link", "bobs"]
    # A target in a directory that another user could one day create is refused.
    done = subprocess.run([*npipe_cmd, "--target", str(pipes / ".smb-bobs")], env=env,
                          capture_output=True, text=True, timeout=WAIT)
    assert done.returncode != 0 and "another user could create it" in done.stderr
    done = subprocess.run([*npipe_cmd, "--user", BOB], env=env, capture_output=True,
                          text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    socket_path = root_made_user_dir(bob.pw_uid) / ".smb-bobs"
    assert os.readlink(site.smbd.np_dir / "bobs") == str(socket_path)
    st = os.lstat(socket_path.parent)
    assert (st.st_uid, stat.S_IMODE(st.st_mode), os.lstat(socket_path.parent.parent).st_uid) \
        == (bob.pw_uid, 0o700, 0)
    with serve(site, "bobs", users=ALICE, NPIPE_TEST_RUN_AS=BOB, NPIPE_PIPE_DIR=str(pipes)):
        assert socket_path.stat().st_uid == bob.pw_uid
        r = client(site, "calls", site.address("bobs"))
        assert r["who"]["account"] == ALICE and r["big"] is True
    done = subprocess.run([*npipe_cmd, "--remove"], env=env, capture_output=True, text=True,
                          timeout=WAIT)
    assert done.returncode == 0 and not os.path.lexists(site.smbd.np_dir / "bobs")


def test_health_and_call_from_the_shell(site: Site) -> None:
    env = {**os.environ, "NPIPE_USER": ALICE, "NPIPE_PASSWORD": PASSWORD}
    npipe_cmd = [sys.executable, "-m", "npipe"]
    with serve(site, "shell"):
        health = run_in(site.hosts.client_ns, [*npipe_cmd, "health", site.address("shell")],
                        env=env, capture_output=True, text=True, timeout=WAIT)
        call = run_in(site.hosts.client_ns, [*npipe_cmd, "call", site.address("shell"),
                                             "x.Health/Nope"],
                      env=env, capture_output=True, text=True, timeout=WAIT)
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING"), health.stderr
    assert call.returncode == 2 and "x.Health" in call.stderr
    refused = run_in(site.hosts.client_ns, [*npipe_cmd, "health", site.address("nosuch"),
                                            "--timeout", "2"],
                     env=env, capture_output=True, text=True, timeout=WAIT)
    assert refused.returncode == 1 and "nosuch" in refused.stderr


def test_no_malformed_smb_on_the_wire(site: Site, smb_backend: str) -> None:
    """Keep last: tshark finds nothing malformed in the SMB traffic on TCP 445 since the
    last check (this runs once per backend, after that backend's tests)."""
    require_tshark()
    assert site.capture is not None
    with serve(site, "wire", kind="raw"):  # some traffic even when run alone
        assert client(site, "raw", site.address("wire"))["echo"] == "raw bytes"
    smb2, bad = site.capture.check()  # stops the capture
    stats = site.capture.stats.strip()
    kept = None
    if bad:  # the workdir goes at the end of the module: keep the capture for a look
        kept = shutil.copy(site.capture.path, f"/tmp/npipe-cross-host-{smb_backend}.pcapng")
    site.capture.restart()  # the next backend's traffic
    print(f"{smb2} SMB2 packets captured, {len(bad)} malformed; {stats}")
    assert smb2 >= 20, f"only {smb2} SMB2 packets captured\n{stats}"
    assert not bad, f"{len(bad)} of {smb2} SMB2 packets malformed (kept in {kept}; " \
        f"{stats}):\n" + "\n".join(bad[:50])
