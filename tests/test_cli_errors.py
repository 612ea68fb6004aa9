"""The npipe command's errors (issue 22): what --timeout bounds, the SMB password (a prompt
on a terminal, --password-file, $NPIPE_PASSWORD), relay's exit status, a pipe that speaks
the other protocol, and one line per error. Run as a user would run it."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from grpc_support import ensure_test_users, require_root, run_python
from http_apps import ServerThread
from served import wait_for_pipe

NPIPE = [sys.executable, "-m", "npipe"]
TESTS = Path(__file__).resolve().parent
USER, PASSWORD = "npt-clialice", "Cli-Passw0rd!"


def run(*args: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([*NPIPE, *args], capture_output=True, text=True, timeout=timeout,
                          **kw)  # type: ignore[call-overload]


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("npipe: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def no_password_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("NPIPE_USER", "NPIPE_PASSWORD", "NPIPE_DOMAIN", "NPIPE_AUTH_PROTOCOL"):
        env.pop(key, None)
    return env


# --- raw Unix-socket servers (unix:PATH addresses) -----------------------------------------


@contextlib.contextmanager
def unix_server(handler: Callable[[socket.socket], None]) -> Iterator[str]:
    """A Unix socket whose every connection goes to ``handler`` on a thread; its address."""
    directory = Path(tempfile.mkdtemp(prefix="npe", dir="/tmp"))
    path = directory / "s"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    conns: list[socket.socket] = []

    def serve(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            handler(conn)
        conn.close()

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conns.append(conn)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"unix:{path}"
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        path.unlink(missing_ok=True)
        directory.rmdir()


def read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


# --- 1. --timeout ------------------------------------------------------------------------


@pytest.mark.parametrize("command, bounds", [
    ("health", "the whole check"),
    ("call", "the whole call"),
    ("http", "the whole request"),
    ("forward", "opening the pipe"),
    ("relay", "opening the pipe"),
])
def test_timeout_help_says_what_it_bounds(command: str, bounds: str) -> None:
    r = run(command, "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    start = text.rindex("--timeout SECONDS")
    assert bounds in text[start:start + 300], text[start:start + 300]


def test_http_timeout_bounds_a_server_that_never_answers() -> None:
    def silent(conn: socket.socket) -> None:
        read_request(conn)
        time.sleep(30)

    with unix_server(silent) as address:
        started = time.monotonic()
        r = run("http", address, "/", "--timeout", "1.5", timeout=30)
        took = time.monotonic() - started
    assert r.returncode == 1
    assert "timed out" in one_line(r.stderr)
    assert took < 10


def test_http_timeout_bounds_the_whole_response() -> None:
    """A server that trickles its body a byte at a time, each byte well within the
    timeout: the whole response is what --timeout bounds."""
    def trickle(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            conn.sendall(b"x")
            time.sleep(0.2)

    with unix_server(trickle) as address:
        started = time.monotonic()
        r = run("http", address, "/", "--timeout", "2", timeout=60)
        took = time.monotonic() - started
    assert r.returncode == 1, r
    assert "timed out" in one_line(r.stderr)
    assert took < 10


# --- 2. the SMB password -----------------------------------------------------------------


@pytest.fixture(scope="module")
def smbd() -> Iterator[str]:
    """A private smbd on loopback with USER; the address of a pipe it does not have
    (after a good logon: "no pipe"; after a bad one: an authentication error)."""
    from pipe_servers import SmbdPool

    from npipe.testing.netns import require_root_and_samba

    require_root_and_samba()
    pool = SmbdPool({"plain": {}}, {USER: PASSWORD}, prefix="npcli")
    try:
        yield f"//127.0.0.1:{pool.port('plain')}/pipe/nosuch"
    finally:
        pool.close()


def logged_on(r: subprocess.CompletedProcess[str]) -> bool:
    """True when the command got past the logon and found no pipe; False for a logon
    refused; anything else fails the test."""
    line = one_line(r.stderr)
    assert r.returncode == 1, r
    if "no pipe" in line:
        return True
    assert "refused the logon" in line, line
    return False


def run_in_pty(argv: list[str], answer: str, env: dict[str, str],
               timeout: float = 60) -> tuple[int, str]:
    """``argv`` with a pseudo-terminal as its terminal and stdin/stdout/stderr; type
    ``answer`` at the first ``Password`` prompt; its exit status and all it printed."""
    pid, fd = pty.fork()
    if pid == 0:  # the child
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    out = b""
    answered = False
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no end in {timeout} s: {out!r}"
            if not select.select([fd], [], [], left)[0]:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child has gone
                break
            if not chunk:
                break
            out += chunk
            if not answered and b"Password" in out:
                os.write(fd, answer.encode() + b"\n")
                answered = True
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert answered, f"no password prompt: {out!r}"
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


@pytest.mark.parametrize("password, good", [(PASSWORD, True), ("wrong-one", False)])
def test_user_without_password_prompts_on_a_terminal(smbd: str, password: str,
                                                     good: bool) -> None:
    code, out = run_in_pty([*NPIPE, "health", smbd, "--user", USER, "--timeout", "2"],
                           password, no_password_env())
    assert code == 1
    assert password not in out  # not echoed
    after = out.split("Password for", 1)[1].split("\n", 1)[1]  # what came after the prompt
    assert (("no pipe" in after) if good else ("refused the logon" in after)), out
    assert len(after.strip().splitlines()) == 1, out


def test_user_without_password_and_no_terminal_is_one_line(smbd: str) -> None:
    r = run("health", smbd, "--user", USER, "--timeout", "2", env=no_password_env())
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert "--password-file" in line and "NPIPE_PASSWORD" in line, line


@pytest.mark.parametrize("password, good", [(PASSWORD, True), ("wrong-one", False)])
def test_password_file(smbd: str, tmp_path: Path, password: str, good: bool) -> None:
    secret = tmp_path / "pw"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    r = run("health", smbd, "--user", USER, "--password-file", str(secret), "--timeout", "2",
            env=no_password_env())
    assert logged_on(r) is good


def test_password_file_readable_by_others_is_refused(smbd: str, tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o644)
    r = run("health", smbd, "--user", USER, "--password-file", str(secret), "--timeout", "2",
            env=no_password_env())
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert str(secret) in line and "others" in line, line


def test_password_file_missing_is_one_line(tmp_path: Path) -> None:
    r = run("health", "//127.0.0.1:1/pipe/x", "--user", USER, "--password-file",
            str(tmp_path / "none"), env=no_password_env())
    assert r.returncode == 2
    assert str(tmp_path / "none") in one_line(r.stderr)


@pytest.mark.parametrize("command", [["health"], ["http", "/"], ["relay"]])
@pytest.mark.parametrize("password, good", [(PASSWORD, True), ("wrong-one", False)])
def test_npipe_password_goes_with_user(smbd: str, command: list[str], password: str,
                                       good: bool) -> None:
    argv = [command[0], smbd, *command[1:], "--user", USER, "--timeout", "2"]
    r = run(*argv, env={**no_password_env(), "NPIPE_PASSWORD": password})
    assert logged_on(r) is good


def test_npipe_password_of_another_npipe_user_is_not_sent(smbd: str) -> None:
    """NPIPE_USER=bob NPIPE_PASSWORD=bob's: --user alice does not get bob's password
    (with no terminal: the one-line error that says how to give alice's)."""
    env = {**no_password_env(), "NPIPE_USER": "bob", "NPIPE_PASSWORD": PASSWORD}
    r = run("health", smbd, "--user", USER, "--timeout", "2", env=env)
    assert r.returncode == 2 and "--password-file" in one_line(r.stderr)


@pytest.mark.parametrize("command", ["health", "call", "http", "forward", "relay"])
def test_help_never_suggests_a_password_on_the_command_line(command: str) -> None:
    r = run(command, "--help")
    assert r.returncode == 0
    assert "--password-file" in r.stdout and "NPIPE_PASSWORD" in r.stdout
    assert "--password " not in r.stdout and "%PASS" not in r.stdout.upper()


# --- 3. relay ----------------------------------------------------------------------------


def test_relay_missing_pipe_is_exit_1_one_line(pipe_dir: Path) -> None:
    r = run("relay", "nosuch", input="hello\n", stdin=None)
    assert r.returncode == 1 and r.stdout == ""
    assert "nosuch" in one_line(r.stderr)


@pytest.fixture
def refusing(pipe_dir: Path, fresh_machine_dir: Path) -> Iterator[str]:
    """`npipe demo --serve` as root on pipe "guarded", for npipe-t2 only (published
    machine-wide, so npipe-t1 finds it, connects, and is refused by the ACL)."""
    require_root()
    ensure_test_users()
    proc = subprocess.Popen([*NPIPE, "demo", "--serve", "--pipe", "guarded",
                             "--acl", "user:npipe-t2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_pipe("guarded", proc)
        yield "guarded"
    finally:
        proc.terminate()
        proc.wait(10)


RELAY_AS_USER = """
    import subprocess
    done = subprocess.run([sys.executable, "-m", "npipe", "relay", {address!r}],
                          input={data!r}, capture_output=True, timeout=60)
    result({{"rc": done.returncode, "stdout": done.stdout.decode(errors="replace"),
            "stderr": done.stderr.decode(errors="replace")}})
"""


def test_relay_refused_pipe_is_exit_1_one_line(refusing: str) -> None:
    users = ensure_test_users()
    for _ in range(3):  # each time: refused whatever the order of the two sides
        outcome = run_python(RELAY_AS_USER.format(address=refusing, data=b"SSH-2.0-x\r\n"),
                             user=users["npipe-t1"], timeout=90).check()
        assert outcome["rc"] == 1, outcome
        assert outcome["stdout"] == ""
        line = one_line(outcome["stderr"])
        # The server's ACL note tells the client before any byte (npipe.local.aclnote).
        assert "access to pipe \\\\.\\pipe\\guarded is denied to npipe-t1" in line
        assert "its ACL does not admit you" in line


def test_relay_short_session_is_exit_0() -> None:
    """A server that answers and closes, and one that closes without a word before any
    input: normal ends, exit 0."""
    def answer(conn: socket.socket) -> None:
        conn.recv(100)
        conn.sendall(b"bye\n")
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(100):
            pass

    with unix_server(answer) as address:
        r = run("relay", address, input="hello\n", stdin=None)
    assert (r.returncode, r.stdout, r.stderr) == (0, "bye\n", "")

    with unix_server(lambda conn: None) as address:
        r = run("relay", address)  # stdin: /dev/null
    assert (r.returncode, r.stderr) == (0, "")


def test_relay_after_the_pipe_answered_a_reset_is_not_an_error() -> None:
    """A server that answers, then closes with input of ours unread (a reset): the
    session happened, exit 0."""
    def answer_and_drop(conn: socket.socket) -> None:
        conn.recv(1)
        conn.sendall(b"hi\n")
        time.sleep(0.5)  # the rest of our input arrives and stays unread

    with unix_server(answer_and_drop) as address:
        r = run("relay", address, input="x" * 100000, stdin=None)
    assert r.returncode == 0, r
    assert r.stdout == "hi\n"


# --- 4. the other protocol ---------------------------------------------------------------


@pytest.fixture
def http_pipe(pipe_dir: Path) -> Iterator[str]:
    with ServerThread("web"):
        yield "web"


@pytest.fixture
def grpc_pipe(pipe_dir: Path, fresh_machine_dir: Path) -> Iterator[str]:
    proc = subprocess.Popen([*NPIPE, "demo", "--serve", "--pipe", "shop"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_pipe("shop", proc)
        yield "shop"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("command", [["health"], ["call", "buy.MyService/Buy"]])
def test_grpc_command_on_an_http_pipe_says_so(http_pipe: str, command: list[str]) -> None:
    r = run(command[0], http_pipe, *command[1:])
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert "answered like an HTTP server, not gRPC" in line and "npipe http" in line, line
    assert "web" in line


@pytest.mark.parametrize("version", [[], ["--http2"]])
def test_http_on_a_grpc_pipe_says_so(grpc_pipe: str, version: list[str]) -> None:
    r = run("http", grpc_pipe, "/", *version)
    assert r.returncode == 1 and r.stdout == ""
    line = one_line(r.stderr)
    assert "answered like a gRPC server, not HTTP" in line, line
    assert "npipe call" in line and "shop" in line


def test_http_protocol_error_of_an_http_server_is_not_called_grpc() -> None:
    """A broken HTTP/1 server is not taken for gRPC."""
    def garbage(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")

    with unix_server(garbage) as address:
        r = run("http", address, "/")
    assert r.returncode == 1
    assert "gRPC" not in one_line(r.stderr)


# --- 5. one line per error ---------------------------------------------------------------


@pytest.mark.parametrize("command", [["health"], ["call", "a.B/C"], ["http", "/"],
                                     ["relay"]])
def test_missing_local_pipe_is_one_line(pipe_dir: Path, command: list[str]) -> None:
    r = run(command[0], "nosuch", *command[1:])
    assert r.returncode == 1
    assert "nosuch" in one_line(r.stderr)


REFUSED_AS_USER = """
    import subprocess
    outcomes = []
    for argv in {commands!r}:
        done = subprocess.run([sys.executable, "-m", "npipe", *argv], input=b"hello",
                              capture_output=True, timeout=60)
        outcomes.append([argv, done.returncode, done.stderr.decode(errors="replace")])
    result(outcomes)
"""


def test_refused_local_pipe_is_one_line_naming_it(refusing: str) -> None:
    users = ensure_test_users()
    commands = [["health", refusing], ["call", refusing, "a.B/C"], ["http", refusing, "/"],
                ["relay", refusing]]
    outcomes = run_python(REFUSED_AS_USER.format(commands=commands),
                          user=users["npipe-t1"], timeout=120).check()
    for argv, rc, stderr in outcomes:
        assert rc == 1, (argv, stderr)
        line = one_line(stderr)
        assert f"access to pipe \\\\.\\pipe\\{refusing} is denied to npipe-t1" in line, \
            (argv, line)
        assert "its ACL does not admit you" in line, (argv, line)
