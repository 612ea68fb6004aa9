"""The Samba test infrastructure itself: a private smbd, two hosts, a pipe through smbd.

Needs root, Samba (smbd, smbclient) and iproute2: without them these tests skip, or
fail when CI=true. Every smbd listens on 127.0.0.1 or on the test namespaces' link only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from smb_probe import smb_login, smb_pipe_echo

from npipe.cli import main
from npipe.samba import npa
from npipe.samba.config import ENV_CONF, ENV_NP_DIR, np_dir_from_conf
from npipe.samba.smbd import PrivateSmbd, SmbdError
from npipe.testing.netns import require_root_and_samba, run_in, tool, two_hosts

STATUS_LOGON_FAILURE = 0xC000006D
STATUS_OBJECT_NAME_NOT_FOUND = 0xC0000034
USER = "npipe-smb1"
SMB_PROBE = str(Path(__file__).with_name("smb_probe.py"))


@contextlib.contextmanager
def temp_dir() -> Iterator[Path]:
    # Short: np/<pipe> and smbd's own sockets must fit in a 108-byte socket path.
    directory = Path(tempfile.mkdtemp(prefix="nps", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def free_port() -> int:
    """A TCP port nothing uses on 127.0.0.1 (one the kernel picks: two test runs on one
    machine, say Debian 12 and a Debian 13 chroot, must not pick the same)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def smbd_processes(conf: Path | None, pgid: int | None = None) -> str:
    """Live (not zombie) processes whose command line names ``conf`` (smbd, and the
    samba-dcerpcd it starts) or that are in process group ``pgid`` (smbd's children,
    which Samba 4.22 renames "smbd: notifyd" and so on)."""
    done = subprocess.run(["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True,
                          text=True, timeout=10, check=True)
    found = []
    for line in done.stdout.splitlines():
        pid, group, state, args = [*line.split(None, 3), ""][:4]
        if int(pid) == os.getpid() or state.startswith("Z"):
            continue
        if (conf is not None and str(conf) in args) or int(group) == pgid:
            found.append(line.strip())
    return "\n".join(found)


@pytest.fixture(scope="module")
def password() -> str:
    return secrets.token_urlsafe(12)


@pytest.fixture(scope="module")
def smbd(password: str) -> Iterator[PrivateSmbd]:
    """One smbd on 127.0.0.1 for the module; its user is USER."""
    require_root_and_samba()
    with temp_dir() as d:
        server = PrivateSmbd(d, port=free_port(), users={USER: password})
        try:
            server.start(timeout=20)
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def echo_listener(np_dir: Path, name: str) -> Iterator[list[npa.NpaRequest]]:
    """A raw listener at np_dir/name: answers smbd's named_pipe_auth request, then echoes
    the pipe's bytes. Yields the list of requests it received."""
    requests: list[npa.NpaRequest] = []
    path = np_dir / name
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    listener.settimeout(0.2)
    stopping = threading.Event()

    def recv_exactly(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError("smbd closed the connection mid-request")
            data += chunk
        return data

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(15)
            header = recv_exactly(conn, 4)
            message = header + recv_exactly(conn, int.from_bytes(header, "big"))
            request = npa.parse_request(message)
            requests.append(request)
            conn.sendall(npa.build_reply(request.level))
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept_loop() -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        yield requests
    finally:
        stopping.set()
        thread.join(5)
        listener.close()
        path.unlink(missing_ok=True)


# --- a private smbd on loopback ----------------------------------------------------


def test_np_dir_is_made_by_smbd_root_owned_0700(
    smbd: PrivateSmbd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_NP_DIR, raising=False)
    monkeypatch.delenv(ENV_CONF, raising=False)
    st = smbd.np_dir.lstat()
    assert stat.S_ISDIR(st.st_mode)
    assert st.st_uid == 0
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert smbd.np_dir == smbd.directory / "ncalrpc" / "np"
    assert np_dir_from_conf(smbd.conf_path) == smbd.np_dir


def test_user_logs_on_with_smbclient(smbd: PrivateSmbd, password: str) -> None:
    require_root_and_samba("smbclient")
    done = subprocess.run(
        [tool("smbclient") or "smbclient", "//127.0.0.1/IPC$", "-p", str(smbd.port),
         "-U", f"{USER}%{password}", "-c", ""],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_user_logs_on_with_smbprotocol(smbd: PrivateSmbd, password: str) -> None:
    assert smb_login("127.0.0.1", smbd.port, USER, password) == 0


def test_wrong_password_fails(smbd: PrivateSmbd, password: str) -> None:
    require_root_and_samba("smbclient")
    assert smb_login("127.0.0.1", smbd.port, USER, password + "x") == STATUS_LOGON_FAILURE
    done = subprocess.run(
        [tool("smbclient") or "smbclient", "//127.0.0.1/IPC$", "-p", str(smbd.port),
         "-U", f"{USER}%wrong-{password}", "-c", ""],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode != 0
    assert "NT_STATUS_LOGON_FAILURE" in done.stdout + done.stderr


def test_unknown_user_is_not_let_in_as_guest(smbd: PrivateSmbd) -> None:
    assert smb_login("127.0.0.1", smbd.port, "npipe-nobody", "x") == STATUS_LOGON_FAILURE


def test_unknown_pipe_is_not_found(smbd: PrivateSmbd, password: str) -> None:
    status = smb_pipe_echo("127.0.0.1", smbd.port, USER, password, "npipe-no-such-pipe", b"x")
    assert status == STATUS_OBJECT_NAME_NOT_FOUND


def test_raw_listener_in_np_dir_echoes_over_smb(smbd: PrivateSmbd, password: str) -> None:
    with echo_listener(smbd.np_dir, "echo-test") as requests:
        got = smb_pipe_echo("127.0.0.1", smbd.port, USER, password, "echo-test", b"hello")
    assert got == b"hello"
    assert requests  # smbd may retry a connect once; normally it is one request
    request = requests[-1]
    assert request.level in npa.SUPPORTED_LEVELS
    assert request.session.account_name == USER
    assert request.session.authenticated
    assert request.remote_client_addr == "127.0.0.1"
    assert request.local_server_port == smbd.port


def test_pipe_names_reach_np_dir_in_lower_case(smbd: PrivateSmbd, password: str) -> None:
    with echo_listener(smbd.np_dir, "echo-case"):
        got = smb_pipe_echo("127.0.0.1", smbd.port, USER, password, "Echo-CASE", b"hi")
    assert got == b"hi"


def test_set_option_reloads_and_signing_mandatory_still_works(
    smbd: PrivateSmbd, password: str
) -> None:
    pid = smbd.pid
    smbd.set_option("server signing", "mandatory")
    try:
        assert smbd.pid == pid  # reloaded, not restarted
        assert "server signing = mandatory" in smbd.conf_path.read_text()
        assert smb_login("127.0.0.1", smbd.port, USER, password) == 0
    finally:
        smbd.set_option("server signing", "default")


def test_start_and_stop_leave_no_process(password: str) -> None:
    require_root_and_samba()
    with temp_dir() as d:
        server = PrivateSmbd(d, port=free_port(), users={USER: password})
        try:
            with server:
                assert server.running
                assert smbd_processes(server.conf_path)
                # An unknown pipe makes smbd start samba-dcerpcd, which leaves smbd's
                # session: stop() must end it too.
                smb_pipe_echo("127.0.0.1", server.port, USER, password, "npipe-nope", b"x")
                first = server.pid
                server.restart()
                assert server.pid != first
                assert smbd_processes(None, first) == ""  # the first smbd and its children
                assert "samba-dcerpcd" not in smbd_processes(server.conf_path)
                assert smb_login("127.0.0.1", server.port, USER, password) == 0
                second = server.pid
            assert not server.running
            assert smbd_processes(server.conf_path, second) == ""
            server.stop()  # idempotent
        finally:
            server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


def test_a_failing_smbd_is_reported_with_its_log(password: str) -> None:
    require_root_and_samba()
    with temp_dir() as d, socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = PrivateSmbd(d, port=port, interfaces="127.0.0.1")
        try:
            with pytest.raises(SmbdError) as caught:
                server.start(timeout=20)
            message = str(caught.value)
            assert "exited with status" in message and f"port {port}" in message
            # smbd's own words from its log, not its panic backtrace
            assert "No sockets available" in message or "in use" in message, message
            assert "BACKTRACE" not in message
            assert not server.running
            assert smbd_processes(server.conf_path) == ""
        finally:
            server.stop()


def test_np_dir_with_a_wrong_mode_is_refused_before_smbd_starts() -> None:
    require_root_and_samba()
    with temp_dir() as d:
        server = PrivateSmbd(d, port=free_port())
        server.np_dir.mkdir(parents=True)
        os.chmod(server.np_dir, 0o755)
        try:
            with pytest.raises(SmbdError, match=r"mode 0755.*root-owned 0700"):
                server.start(timeout=20)
            assert not server.running
        finally:
            server.stop()


# --- the command line --------------------------------------------------------------


@contextlib.contextmanager
def _samba_run(d: Path, port: int, password: str) -> Iterator[subprocess.Popen[str]]:
    """``npipe samba run`` on ``d``; afterwards nothing of it is left, should the test
    fail (the process killed, the smbd it started stopped)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "npipe", "samba", "run", "--dir", str(d), "--port",
         str(port), "--user", f"{USER}:{password}", "--option", "server signing=mandatory"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # On a hang, SIGABRT makes it print every thread's stack (see _stopped).
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        PrivateSmbd(d).stop()


def _stopped(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """Its output once it exits; if it does not within ``timeout``, fail with where each
    of its threads was."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"no exit {timeout} s after SIGTERM:\n{out}\n{err}") from None


def test_cli_run_serves_until_sigterm(password: str) -> None:
    require_root_and_samba()
    with temp_dir() as d:
        port = free_port()
        with _samba_run(d, port, password) as proc:
            deadline = time.monotonic() + 20
            while not (_listening(port) and smb_login("127.0.0.1", port, USER, password) == 0):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "npipe samba run did not start smbd"
                time.sleep(0.1)
            assert "server signing = mandatory" in (d / "smb.conf").read_text()
            proc.send_signal(signal.SIGTERM)
            out, err = _stopped(proc, 20)
        assert proc.returncode == 0, err
        assert f"np dir: {d}/ncalrpc/np" in out
        assert f"config: {d}/smb.conf" in out
        assert smbd_processes(d / "smb.conf") == ""


def test_cli_run_sigterm_while_smbd_starts(password: str) -> None:
    """SIGTERM while smbd is still starting (its config is written, the command's
    handlers are in place): the start finishes or fails, then everything stops, exit 0,
    no smbd left behind."""
    require_root_and_samba()
    with temp_dir() as d:
        with _samba_run(d, free_port(), password) as proc:
            deadline = time.monotonic() + 20
            while not (d / "smb.conf").exists():
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "npipe samba run wrote no smb.conf"
                time.sleep(0.005)
            proc.send_signal(signal.SIGTERM)
            out, err = _stopped(proc, 30)
        assert proc.returncode == 0, err
        assert "stopping smbd" in out
        assert smbd_processes(d / "smb.conf") == ""


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_cli_setup_checks_the_np_dir(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    require_root_and_samba()
    monkeypatch.delenv(ENV_NP_DIR, raising=False)
    monkeypatch.delenv(ENV_CONF, raising=False)
    with temp_dir() as d:
        ncalrpc = d / "run" / "ncalrpc"
        conf = _write_conf(d / "smb.conf", ncalrpc)
        before = sorted((p, p.stat().st_mode) for p in d.rglob("*"))
        # A plain run shows, and changes nothing on disk (the parent is missing: exit 1).
        assert main(["samba", "setup", "--conf", str(conf)]) == 1
        out, err = capsys.readouterr()
        assert f"np dir:   {ncalrpc}/np" in out and "map to guest" in out
        assert "samba setup --apply" in err
        assert sorted((p, p.stat().st_mode) for p in d.rglob("*")) == before
        assert not ncalrpc.exists()
        assert main(["samba", "setup", "--apply", "--conf", str(conf)]) == 0
        out = capsys.readouterr().out
        assert "smbd creates it" in out
        assert ncalrpc.is_dir()  # --apply made the parent; np/ is smbd's to make
        (ncalrpc / "np").mkdir(mode=0o700)
        assert main(["samba", "setup", "--conf", str(conf)]) == 0
        assert "root-owned, mode 0700: ok" in capsys.readouterr().out
        os.chmod(ncalrpc / "np", 0o755)
        assert main(["samba", "setup", "--conf", str(conf)]) == 1
        assert "mode 0755" in capsys.readouterr().err
        assert main(["samba", "setup", "--conf", str(d / "missing.conf")]) == 1
        assert "no smb.conf" in capsys.readouterr().err


# --- two hosts ----------------------------------------------------------------------


def test_smb_across_namespaces(password: str) -> None:
    require_root_and_samba("smbclient")
    with two_hosts() as hosts, temp_dir() as d:
        # Namespaces are separate, so nothing else is on port 445 there.
        server = PrivateSmbd(d, port=445, interfaces=hosts.server_if, netns=hosts.server_ns,
                             users={USER: password})
        try:
            server.start(timeout=20)
            assert server.addresses == [hosts.server_ip]
            done = run_in(
                hosts.client_ns,
                [tool("smbclient") or "smbclient", f"//{hosts.server_ip}/IPC$",
                 "-U", f"{USER}%{password}", "-c", ""],
                capture_output=True, text=True,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            with echo_listener(server.np_dir, "echo-test") as requests:
                done = run_in(
                    hosts.client_ns,
                    [sys.executable, SMB_PROBE, "echo", hosts.server_ip, "445", USER,
                     password, "echo-test", "hello"],
                    capture_output=True, text=True,
                )
            assert done.stdout.strip() == f"data {b'hello'.hex()}", done.stderr
            assert requests[0].remote_client_addr == hosts.client_ip
            assert requests[0].local_server_addr == hosts.server_ip
        finally:
            server.stop()
        assert smbd_processes(server.conf_path) == ""


# --- np_dir_from_conf -------------------------------------------------------------------


def _write_conf(path: Path, ncalrpc: Path) -> Path:
    path.write_text(f"[global]\n  workgroup = X\n  ncalrpc dir = {ncalrpc}\n[share]\n"
                    "  path = /tmp\n  ncalrpc dir = /wrong\n")
    return path


def test_np_dir_env_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_NP_DIR, raising=False)
    monkeypatch.delenv(ENV_CONF, raising=False)
    conf_a = _write_conf(tmp_path / "a.conf", tmp_path / "a")
    conf_b = _write_conf(tmp_path / "b.conf", tmp_path / "b")
    assert np_dir_from_conf(conf_a) == tmp_path / "a" / "np"
    monkeypatch.setenv(ENV_CONF, str(conf_b))
    assert np_dir_from_conf(conf_a) == tmp_path / "b" / "np"
    assert np_dir_from_conf(None) == tmp_path / "b" / "np"
    monkeypatch.setenv(ENV_NP_DIR, str(tmp_path / "elsewhere"))
    assert np_dir_from_conf(conf_a) == tmp_path / "elsewhere"


@pytest.mark.parametrize("with_testparm", [True, False])
def test_np_dir_from_conf_with_and_without_testparm(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, with_testparm: bool
) -> None:
    monkeypatch.delenv(ENV_NP_DIR, raising=False)
    monkeypatch.delenv(ENV_CONF, raising=False)
    if with_testparm and tool("testparm") is None:
        require_root_and_samba()
    if not with_testparm:
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        monkeypatch.setattr("npipe.samba.config._SBIN_PATH", str(tmp_path / "empty"))
    included = _write_conf(tmp_path / "inc.conf", tmp_path / "inc")
    main = tmp_path / "smb.conf"
    main.write_text(f"[global]\n  workgroup = X\n  include = {included}\n")
    assert np_dir_from_conf(main) == tmp_path / "inc" / "np"
    plain = tmp_path / "plain.conf"
    plain.write_text("[global]\n  workgroup = X\n")
    default = np_dir_from_conf(plain)
    assert default.name == "np" and default.is_absolute()
    with pytest.raises(ValueError, match=r"no smb\.conf"):
        np_dir_from_conf(tmp_path / "missing.conf")
